"""What the benchmarks time: shape grids, the implementations compared, and the bytes each pass must move.

Every case is one op (``attention_mix`` or ``softmax_mix``), one pass (``fwd``, ``bwd``, ``fwd+bwd``),
one dtype, one shape ``(B, E, T, D)`` and one implementation:

- ``fused``: ``fused_gate.attention_mix`` / ``softmax_mix`` (the Triton kernels);
- ``eager``: the gate as eager PyTorch code writes it (einsum, softmax, einsum; ``EAGER``);
- ``compile``: that code under ``torch.compile`` (default mode);
- ``compile-max``: that code under ``torch.compile(mode="max-autotune-no-cudagraphs")``;
- ``sdpa``: ``scaled_dot_product_attention(q = C, k = v = H)`` (attention gate only);
- ``copy``: a device copy of the case's byte floor, the measured bandwidth ceiling.

Byte floors (see ``docs/performance.md``), with ``|X|`` the bytes of tensor X::

    attention_mix  fwd  |H| + |Y| + |C|          bwd  2|H| + |G| + |C|
    softmax_mix    fwd  |H| + |Z| + |Y|          bwd  2|H| + |G| + 2|Z|
    fwd+bwd        fwd + bwd
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fused_gate as fg

OPS = ("attention_mix", "softmax_mix")
PASSES = ("fwd", "bwd", "fwd+bwd")
PEERS = ("eager", "compile", "compile-max", "sdpa")
IMPLS = ("fused", *PEERS, "copy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    B: int
    E: int
    T: int
    D: int

    @property
    def id(self) -> str:
        return f"B{self.B}-E{self.E}-T{self.T}-D{self.D}"


def _grid(batches, experts, tasks, dims) -> list[Shape]:
    return [Shape(b, e, t, d) for e, t, d, b in itertools.product(experts, tasks, dims, batches)]


GRIDS: dict[str, list[Shape]] = {
    # CPU smoke check through the Triton interpreter: proves the suite and the report work, times nothing.
    "smoke": [Shape(4, 3, 2, 8), Shape(16, 3, 2, 8)],
    # A few representative shapes of the full grid; the default on a GPU.
    "small": [
        Shape(b, e, t, d)
        for e, t, d in ((8, 4, 256), (4, 2, 128), (16, 8, 512), (64, 1, 64))
        for b in (256, 4096, 65536)
    ],
    # The grid the performance targets are stated on (docs/performance.md): every combination of
    # E in {4, 8, 16, 64}, T in {1, 2, 4, 8}, D in {64 ... 1024} and B in {256, 4096, 65536}.
    "full": _grid((256, 4096, 65536), (4, 8, 16, 64), (1, 2, 4, 8), (64, 128, 256, 512, 1024)),
}


def impls_for(op: str) -> tuple[str, ...]:
    return tuple(i for i in IMPLS if op == "attention_mix" or i != "sdpa")


def floor_bytes(op: str, pass_: str, shape: Shape, dtype: torch.dtype) -> int:
    """Bytes a pass must move at the least (see the module docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    B, E, T, D = shape.B, shape.E, shape.T, shape.D
    h, y, c, z = B * E * D * size, B * T * D * size, T * D * size, B * T * E * size
    fwd = h + y + (c if op == "attention_mix" else z)
    bwd = 2 * h + y + (c if op == "attention_mix" else 2 * z)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def make_inputs(op: str, shape: Shape, dtype: torch.dtype, device: str) -> tuple[list[Tensor], Tensor]:
    """The op's differentiable inputs (``[H, C]`` or ``[Z, H]``) and an upstream gradient ``G [B, T, D]``."""
    gen = torch.Generator(device=device).manual_seed(0)
    B, E, T, D = shape.B, shape.E, shape.T, shape.D

    def randn(*size: int) -> Tensor:
        return torch.randn(size, generator=gen, device=device, dtype=dtype).requires_grad_()

    h = randn(B, E, D)
    first = randn(T, D) if op == "attention_mix" else randn(B, T, E)
    grad_y = torch.randn(B, T, D, generator=gen, device=device, dtype=dtype)
    return ([h, first] if op == "attention_mix" else [first, h]), grad_y


def _sdpa_gate(h: Tensor, context: Tensor) -> Tensor:
    # The attention gate as one-head attention: queries are the T contexts, keys and values the E experts.
    q = context.expand(h.shape[0], -1, -1).unsqueeze(1)
    kv = h.unsqueeze(1)
    return F.scaled_dot_product_attention(q, kv, kv, scale=h.shape[-1] ** -0.5).squeeze(1)


def _eager_attention_mix(h: Tensor, context: Tensor) -> Tensor:
    s = torch.einsum("td,bed->bte", context, h) * h.shape[-1] ** -0.5
    return torch.einsum("bte,bed->btd", torch.softmax(s.float(), dim=-1).to(h.dtype), h)


def _eager_softmax_mix(logits: Tensor, h: Tensor) -> Tensor:
    return torch.einsum("bte,bed->btd", torch.softmax(logits.float(), dim=-1).to(h.dtype), h)


# The peers run the gate as a user's own PyTorch code does: scores, softmax in float32, weighted sum.
# (``fused_gate.reference`` is the tests' oracle: it also spells out the special-value rules, at a
# cost a user's code does not pay, so it would be an unfairly slow peer.)
EAGER = {"attention_mix": _eager_attention_mix, "softmax_mix": _eager_softmax_mix}


def op_function(op: str, impl: str) -> Callable[..., Tensor]:
    """The forward of ``impl`` for ``op``; compiled peers are compiled afresh (their first call compiles)."""
    if impl == "fused":
        return getattr(fg, op)
    if impl == "sdpa":
        if op != "attention_mix":
            raise ValueError("sdpa is a peer of attention_mix only")
        return _sdpa_gate
    if impl == "eager":
        return EAGER[op]
    if impl in ("compile", "compile-max"):
        torch._dynamo.reset()
        mode = "max-autotune-no-cudagraphs" if impl == "compile-max" else None
        return torch.compile(EAGER[op], mode=mode, dynamic=False, fullgraph=True)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def copy_call(nbytes: int, device: str) -> Callable[[], object]:
    """A device copy that moves ``nbytes`` (even): half read, half written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def timed_call(op: str, pass_: str, impl: str, inputs: list[Tensor], grad_y: Tensor) -> Callable[[], object]:
    """A no-argument callable running one pass of ``impl`` (not ``copy``): what the benchmark times.

    ``fwd`` runs without autograd (inference); ``bwd`` replays the backward of one recorded forward
    (``retain_graph``); ``fwd+bwd`` records a forward and runs its backward, as a training step does.
    """
    fn = op_function(op, impl)
    if pass_ == "fwd":

        def forward() -> Tensor:
            with torch.no_grad():
                return fn(*inputs)

        return forward
    if pass_ == "bwd":
        y = fn(*inputs)
        return lambda: torch.autograd.grad(y, inputs, grad_y, retain_graph=True)
    if pass_ == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_y)
    raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")
