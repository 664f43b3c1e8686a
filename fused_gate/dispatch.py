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

Exported and AOTInductor-compiled models hold no fused_gate operator where they run
(:class:`FusedOp`): ``torch.export`` traces a call on a device without compiled kernels (a CPU) as the
reference's plain ATen ops, and keeps the op, one node, where the kernels are compiled (CUDA); when
AOTInductor compiles that node, the op turns into its kernel launches
(``torch.library.wrap_triton``), which Inductor compiles into the package. ``torch.compile`` keeps
every op one opaque node, as in eager mode. Within :func:`export_as_reference`, ``torch.export`` and
``ExportedProgram.run_decompositions`` trace the reference's ATen ops on every device: a program exported
on CUDA then loads where fused_gate is not installed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from fused_gate.op_names import op_name


@functools.cache
def kernels_interpreted() -> bool:
    """Whether the kernels were defined for Triton's interpreter (``fused_gate.kernels.INTERPRETED``);
    the first call imports them."""
    from fused_gate.kernels import INTERPRETED

    return INTERPRETED


def kernel_devices() -> tuple[str, ...]:
    """The device types that run the kernels: CUDA, and the CPU when the kernels are interpreted."""
    return ("cuda", "cpu") if kernels_interpreted() else ("cuda",)


def uses_kernels(x: object) -> bool:
    """True when an op on ``x``'s device runs the Triton kernels (compiled or interpreted)."""
    return isinstance(x, Tensor) and x.device.type in kernel_devices()


def compiled_kernels(x: Tensor) -> bool:
    """True when an op on ``x``'s device runs compiled Triton kernels (CUDA, not interpreted): the
    kernels that AOTInductor can compile into a package."""
    return x.device.type == "cuda" and not kernels_interpreted()


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


# Whether export_as_reference is active: a module global, which torch.export's Dynamo front end (strict
# mode) reads as a constant, where a ContextVar would break its graph.
_as_reference = False


@contextlib.contextmanager
def export_as_reference() -> Iterator[None]:
    """Within it, ``torch.export.export`` and ``ExportedProgram.run_decompositions`` trace every fused op
    as its reference's plain ATen ops on every device, as ``torch.export`` does on a CPU: a program
    exported on CUDA (which keeps the ops, one node each, for AOTInductor to compile their kernels) then
    saves (``torch.export.save``) as one that loads and runs where fused_gate is not installed, on
    PyTorch's own kernels: ``with export_as_reference(): portable = program.run_decompositions()``.
    """
    global _as_reference
    outer, _as_reference = _as_reference, True
    try:
        yield
    finally:
        _as_reference = outer


def _device_tensor(args: tuple) -> Tensor:
    """The op's first tensor argument: the one whose device decides where the op runs."""
    return next(a for a in args if isinstance(a, Tensor))


class FusedOp:
    """A registered op and its reference implementation, called as the op.

    While ``torch.export`` traces a call on a device without compiled kernels (a CPU, interpreted
    kernels included) or within :func:`export_as_reference`, the call runs the reference instead: the
    exported graph holds its plain ATen ops (the exact formulation, no data-dependent branch: the fast
    path never applies while tracing), so neither the graph nor an AOTInductor package built from it
    needs fused_gate where it runs.
    Everywhere else the call is the op's (one node under ``torch.compile`` and ``torch.export``).
    ``register_fake``, ``register_autograd`` and the op's other attributes are the op's.
    """

    def __init__(self, op: torch.library.CustomOpDef, reference: Callable) -> None:
        self.op, self.reference = op, reference

    def __call__(self, *args):
        if torch.compiler.is_exporting() and (_as_reference or not compiled_kernels(_device_tensor(args))):
            return self.reference(*args)
        return self.op(*args)

    def __getattr__(self, name: str):
        return getattr(self.op, name)


def _aot_compiling() -> bool:
    """True while AOTInductor compiles a graph (``torch._inductor.aoti_compile_and_package``)."""
    from torch._inductor.virtualized import V

    return V.aot_compilation


def _functional_rule(run: Callable, reference: Callable) -> Callable:
    """The op's rule under functionalization (``FunctionalTensorMode``, where AOTInductor lowers a graph and
    ``ExportedProgram.run_decompositions`` retraces one): while AOTInductor compiles a call on compiled
    kernels, the op is replaced by ``run``'s kernel launches, recorded with ``torch.library.wrap_triton``
    so that Inductor compiles the kernels into the package, as ``torch.library.triton_op`` does; within
    :func:`export_as_reference`, by the reference's ATen ops; elsewhere (``torch.compile``,
    ``torch.export``) the op stays one node."""

    def rule(mode, op, types, args, kwargs):
        if _as_reference:
            with mode:
                return reference(*args, **kwargs)
        if not (_aot_compiling() and compiled_kernels(_device_tensor(args))):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from fused_gate.kernels.launch import traced_launches

        with mode, traced_launches():
            return run(*args, **kwargs)

    return rule


def fused_op(name: str, *, reference: Callable) -> Callable[[Callable], FusedOp]:
    """Register the decorated kernel implementation as the ``torch.library`` custom op ``name``
    (registered as :func:`fused_gate.op_names.op_name` spells it, with its schema version).

    The op runs it where :func:`uses_kernels` holds for its first tensor argument, and ``reference``
    (same arguments, same outputs) elsewhere; exported and AOTInductor-compiled graphs get the reference's
    ATen ops or the kernel launches instead (:class:`FusedOp`). The schema comes from the kernel
    implementation's annotations; ``register_fake`` and ``register_autograd`` go on the returned op.
    """

    def register(kernels: Callable) -> FusedOp:
        @functools.wraps(kernels)
        def run(*args):
            return (kernels if uses_kernels(_device_tensor(args)) else reference)(*args)

        op = torch.library.custom_op(op_name(name), run, mutates_args=())
        op.register_torch_dispatch(FunctionalTensorMode, _functional_rule(run, reference))
        return FusedOp(op, reference)

    return register
