"""Swap the fused gate into the multi-task models of other libraries, in place: ``swap_in(model)``.

Supported: torch-rechub ``MMOE`` and ``PLE`` (each ``CGC`` level), DeepCTR-Torch ``MMOE`` and ``PLE``,
at the top of ``model`` or anywhere inside it. Neither library is imported by ``import fused_gate``:
a library's integration module is imported only when ``model`` holds one of its classes.
"""

from __future__ import annotations

import importlib

from torch import nn

from fused_gate.integrations._swap import Swaps, report, swap_layers

__all__ = ["swap_in"]

# top-level package of the library -> (integration module, library name in messages)
INTEGRATIONS = {
    "torch_rechub": ("fused_gate.integrations.torch_rechub", "torch-rechub"),
    "deepctr_torch": ("fused_gate.integrations.deepctr_torch", "DeepCTR-Torch"),
}


def swap_in(model: nn.Module) -> list[str]:
    """Make every supported MMoE / PLE layer in ``model`` use :func:`fused_gate.softmax_mix`, in place.

    The gate logits stay computed by the library's own layers; the softmax and the weighted sum of the
    experts become one fused call per level. Parameters, buffers and ``state_dict`` keys are unchanged.
    A layer the fused gate cannot express is left as it is, with a warning naming it and why; so is a
    subclass of a library class that overrides ``forward`` (or another method the swap replaces), while a
    subclass that keeps them is swapped and keeps its other methods. A layer swapped before is not
    swapped again.

    Returns:
        The qualified names (as in ``model.named_modules()``, ``""`` for ``model`` itself) of the
        swapped modules; ``[]``, with a warning, when nothing was swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # The classes' bases too: a user's subclass of a library class lives in the user's module.
    packages = {cls.__module__.partition(".")[0] for module in model.modules() for cls in type(module).__mro__}
    swaps = Swaps()
    for package, (integration, library) in INTEGRATIONS.items():
        if package in packages:
            swaps += swap_layers(model, importlib.import_module(integration).TWINS, library)
    return report(swaps, "MMoE / PLE layer of " + " or ".join(n for _, n in INTEGRATIONS.values()))
