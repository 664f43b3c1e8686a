"""Whether calling a module runs user code around its forward or its backward: hooks and pre-hooks.

The fused paths compute some modules' results without calling them (the layers' one-kernel path skips
the experts' last layer; the torch-rechub twins skip a gate's softmax). A hook there could read or
change what the module returns (or, in training, the gradients it receives or passes on), so those paths
check first and, when a hook is registered, take the path that calls the modules.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as module_globals


def forward_hooked(*modules: nn.Module) -> bool:
    """True when a forward hook or pre-hook is registered on one of ``modules`` or on every module
    (``torch.nn.modules.module.register_module_forward_hook`` / ``..._pre_hook``).

    ``torch.nn.utils.prune`` and the hook-based ``weight_norm`` / ``spectral_norm`` recompute the
    weight in a pre-hook, so they count as hooks; ``torch.nn.utils.parametrize`` does not need one
    (the weight is computed whenever it is read).
    """
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def backward_hooked(*modules: nn.Module) -> bool:
    """True when a backward hook or pre-hook (``register_full_backward_hook`` / ``..._pre_hook``, or the
    deprecated ``register_backward_hook``) is registered on one of ``modules`` or on every module
    (``torch.nn.modules.module.register_module_full_backward_hook`` / ``..._pre_hook``): a path that does not
    call the module would never run it."""
    if module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks:
        return True
    return any(m._backward_hooks or m._backward_pre_hooks for m in modules)
