"""Where the fused ops run, decided here for every op: the Triton kernels or the plain-PyTorch reference.

- CUDA tensors run the Triton kernels.
- CPU tensors run the same kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before the kernels load (at the first op call), and the reference otherwise.
- float64 inputs run the reference on every device (the kernels compute in float32), so
  ``model.double()`` works wherever the model runs.
- Under ``torch.func`` transforms or with forward-mode (dual) inputs every op runs the reference, whose
  ``autograd.Function`` has closed-form backward, forward-mode and vmap rules: the ops define a
  backward only.

The kernels, and triton with them, are imported by the first call of :func:`uses_kernels` (every op
makes one) and by the ops' kernel implementations, not by ``import fused_gate``: the reference and
the modules that only register the ops run without them.

:func:`fused_op` registers an op with ``torch.library`` whose body runs its kernel implementation where
:func:`uses_kernels` says so and its reference implementation elsewhere; the public functions first
ask :func:`needs_reference`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from fused_gate.op_names import op_name


@functools.cache
def kernel_devices() -> tuple[str, ...]:
    """The device types that run the kernels: CUDA, and the CPU when the kernels were defined for
    Triton's interpreter (``fused_gate.kernels.INTERPRETED``); the first call imports them."""
    from fused_gate.kernels import INTERPRETED

    return ("cuda", "cpu") if INTERPRETED else ("cuda",)


def uses_kernels(x: object) -> bool:
    """True when an op on ``x``'s device runs the Triton kernels (compiled or interpreted)."""
    return isinstance(x, Tensor) and x.device.type in kernel_devices()


def in_float64(*tensors: Tensor | None) -> bool:
    """True when an input is float64: the op runs :mod:`fused_gate.reference` in float64 on every device."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def needs_reference(*tensors: Tensor | None) -> bool:
    """True for float64 inputs (the kernels compute in float32), under ``torch.func`` transforms or with
    forward-mode (dual) inputs (the ops define a backward only; the reference's ``autograd.Function`` has
    closed-form backward, forward-mode and vmap rules, so it serves these callers exactly)."""
    if in_float64(*tensors):
        return True
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    # Dual tensors exist only inside a dual level; outside one (every ordinary call) skip the unpacking.
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )


def fused_op(name: str, *, reference: Callable) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Register the decorated kernel implementation as the ``torch.library`` custom op ``name``
    (registered as :func:`fused_gate.op_names.op_name` spells it, with its schema version).

    The op runs it where :func:`uses_kernels` holds for its first tensor argument, and ``reference``
    (same arguments, same outputs) elsewhere. The schema comes from the kernel implementation's
    annotations; ``register_fake`` and ``register_autograd`` go on the returned op.
    """

    def register(kernels: Callable) -> torch.library.CustomOpDef:
        @functools.wraps(kernels)
        def run(*args):
            device_tensor = next(a for a in args if isinstance(a, Tensor))
            return (kernels if uses_kernels(device_tensor) else reference)(*args)

        return torch.library.custom_op(op_name(name), run, mutates_args=())

    return register
