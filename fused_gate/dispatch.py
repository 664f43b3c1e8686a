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
ask :func:`reference_call` (in eager mode on a device without kernels they call the reference
directly, with no dispatch boundary between them and it).
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


def reference_call(device_tensor: Tensor, *tensors: Tensor | None) -> bool | None:
    """Whether a public function calls the reference's ``autograd.Function`` instead of the op, and how;
    ``device_tensor`` is the input whose device :func:`uses_kernels` reads.

    - ``False``, for float64 inputs (the kernels compute in float32: the reference runs in float64 on
      every device), under ``torch.func`` transforms or with forward-mode (dual) inputs: the ops define
      a backward only; the reference has closed-form backward, forward-mode and vmap rules, and serves
      higher-order gradients too.
    - ``True``, in eager mode where the reference is the op (a device without kernels): the op would run
      the same reference behind its dispatch boundary and recompute the weights in its backward; the
      reference's function saves them. First order only (``True``), as the kernels.
    - None otherwise: the op (compiling, exporting or tracing keep it, one node).
    """
    tensors = (device_tensor, *tensors)
    if in_float64(*tensors):
        return False
    if torch.compiler.is_compiling():
        return None
    if torch._C._are_functorch_transforms_active():
        return False
    if not uses_kernels(device_tensor) and not torch.jit.is_tracing() and torch._C._len_torch_dispatch_stack() == 0:
        return True
    # Dual tensors exist only inside a dual level; outside one (every ordinary call) skip the unpacking.
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        return False
    return None


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
