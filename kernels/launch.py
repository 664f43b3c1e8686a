"""Plan, then launch: the skeleton every launcher of ``kernels/`` follows.

A launcher's ``plan_*`` function runs nothing. It returns a :class:`Plan`: the outputs it allocated and
the kernel launches that will fill them, each a :class:`KernelLaunch` (kernel, grid, arguments, meta).
``Plan.run()`` launches them, each as one plain ``kernel[grid](*args, **meta)`` call, and returns the
outputs. Keeping the plan apart lets ``tests/aot.py`` compile exactly what a launcher would run for a GPU
it does not have, and ``bench/`` count and time the launches.

Every plan takes the same steps:

1. **outputs**: allocate them (:func:`new_output`, :func:`mix_outputs`). With an empty batch there is
   nothing to launch: return ``Plan(outputs)``, an output that sums over the rows (a shared ``dC``)
   allocated ``zeroed``.
2. **tile**: the launch configuration, from the cached heuristic of ``kernels/config.py`` (or the
   caller's, for ``bench/tune.py``).
3. **arguments**, in the kernel's parameter order: each tensor, input or output, as the group of its
   pointer and strides read as ``[B, T, X]`` (:func:`operand`; an output, allocated contiguous, is written
   with a unit last stride); then the sizes and scalars. The gate's operands and meta are the same in
   every family: :func:`gate_operands`, :func:`gate_meta`.
4. **meta**: the gate's constexprs, the tile's (``TileConfig.meta``, ``ExpertsMixConfig.meta``) and the
   family's own flags.
5. **grid**: one program per block of ``ROWS`` rows (:func:`row_blocks`), or a persistent grid.

Every kernel takes flat pointers, integers and constexprs (no tuples), the form
``torch.library.wrap_triton`` and Inductor accept; the kernel groups them itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from fused_gate.kernels import INTERPRETED

# Triton's interpreter keeps per-launch state in module globals (the grid, the program ids), so two
# threads interpreting kernels at once corrupt each other's launch. Compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock()
_TRACING = threading.local()
# Launch options Inductor does not pass on to a user kernel it compiles (torch 2.13 keeps num_warps and
# num_stages only): left out of a traced launch, where they would be read as kernel arguments.
_UNTRACED_OPTIONS = ("maxnreg",)


@contextlib.contextmanager
def traced_launches() -> Iterator[None]:
    """Within it, launches are recorded into the graph being traced (``torch.library.wrap_triton``)
    instead of run: how AOTInductor sees the kernels and compiles them into its package."""
    outer, _TRACING.on = getattr(_TRACING, "on", False), True
    try:
        yield
    finally:
        _TRACING.on = outer


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch, as a launcher's ``plan_*`` function describes it."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    meta: dict

    def launch(self) -> None:
        if getattr(_TRACING, "on", False):
            meta = {k: v for k, v in self.meta.items() if k not in _UNTRACED_OPTIONS}
            torch.library.wrap_triton(self.kernel)[self.grid](*self.args, **meta)
            return
        with _INTERPRETER_LOCK if INTERPRETED else contextlib.nullcontext():
            self.kernel[self.grid](*self.args, **self.meta)


@dataclass(frozen=True)
class Plan:
    """The outputs a launcher allocated and the launches that fill them (none for an empty batch)."""

    outputs: tuple[Tensor | None, ...]
    launches: tuple[KernelLaunch, ...] = ()

    def run(self) -> tuple[Tensor | None, ...]:
        """Launch every kernel in order; returns :attr:`outputs`."""
        for launch in self.launches:
            launch.launch()
        return self.outputs


def new_output(
    like: Tensor, shape: tuple[int, ...], *, dtype: torch.dtype | None = None, zeroed: bool = False
) -> Tensor:
    """A contiguous output on ``like``'s device, in ``dtype`` (default ``like``'s), zero-filled when ``zeroed``."""
    return (torch.zeros if zeroed else torch.empty)(shape, device=like.device, dtype=dtype or like.dtype)


def mix_outputs(
    like: Tensor, batch: int, tasks: int, experts: int, dim: int, return_weights: bool
) -> tuple[Tensor, Tensor | None]:
    """The mix ``Y [B, T, D]`` and, with ``return_weights``, the weights ``p [B, T, E]`` (else None)."""
    y = new_output(like, (batch, tasks, dim))
    return y, new_output(like, (batch, tasks, experts)) if return_weights else None


def row_strides(x: Tensor | None) -> tuple[int, int, int]:
    """Strides of ``x`` read as ``[B, T, X]``: a ``[T, X]`` tensor is shared by every row (row stride 0);
    an absent tensor gives zeros."""
    if x is None:
        return (0, 0, 0)
    return tuple(x.stride()) if x.dim() == 3 else (0, *x.stride())


def operand(x: Tensor | None, placeholder: Tensor | None = None) -> tuple:
    """A tensor as the kernel arguments of its group: its pointer, then its strides read as ``[B, T, X]``
    (:func:`row_strides`). An absent tensor passes ``placeholder`` (never dereferenced) and zeros.

    Outputs are groups of four too, though kernels write them with a unit last stride: the same
    parameters in every kernel, and the compiled code of a group does not depend on its use.
    """
    return (x if x is not None else placeholder, *row_strides(x))


def mask_kind(mask: Tensor | None) -> str:
    """``"none"``, ``"shared"`` (``[T, E]``, the same for every row) or ``"per_row"`` (``[B, T, E]``)."""
    if mask is None:
        return "none"
    return "per_row" if mask.dim() == 3 else "shared"


def as_uint8(x: Tensor | None) -> Tensor | None:
    """A bool tensor (a mask, the kept experts) as the ``uint8`` view the kernels load and store (same
    storage, no copy)."""
    return x.view(torch.uint8) if x is not None else None


def gate_operands(cz: Tensor, mask: Tensor | None, placeholder: Tensor) -> tuple:
    """The arguments of the gate's inputs: the context ``C`` or the logits ``Z``, then the mask."""
    return (*operand(cz), *operand(as_uint8(mask), placeholder))


# The gate kinds whose scores read a context ``C`` against ``H``; the others read given logits ``Z``.
CONTEXT_GATES = ("attention",)


def gate_meta(gate: str, cz: Tensor, mask: Tensor | None) -> dict:
    """The gate's constexprs: its kind, whether the context is per row, the mask kind and ``T``."""
    return dict(
        GATE=gate,
        PER_ROW_CONTEXT=gate in CONTEXT_GATES and cz.dim() == 3,
        MASK=mask_kind(mask),
        NUM_TASKS=cz.shape[-2],
    )


def row_blocks(batch: int, rows: int) -> tuple[int]:
    """The grid of one program per ``rows`` rows."""
    return (triton.cdiv(batch, rows),)
