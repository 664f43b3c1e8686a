"""attention_mix: the Triton kernels against the float64 reference, forward and every gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_gate as fg
from fused_gate.kernels import gate_mix_bwd, gate_mix_fwd
from fused_gate.kernels.config import tile_config

from .conftest import assert_matches
from .helpers import check_attention_mix, make_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, E, D, T): odd sizes, D not a power of two, E = 1, T = 16, E = 256, and widths that make
# the kernels walk D in several chunks.
SHAPES = [
    (1, 1, 1, 1),
    (7, 3, 5, 2),
    (33, 4, 64, 3),
    (10, 6, 100, 5),
    (5, 16, 33, 16),
    (3, 64, 20, 2),
    (2, 256, 3, 2),
    (3, 9, 1100, 2),
]


def test_shapes_cover_both_tile_paths():
    assert any(not tile_config(e, d, t, False).single_chunk for _, e, d, t in SHAPES)
    assert any(not tile_config(e, d, t, True).single_chunk for _, e, d, t in SHAPES)
    assert any(tile_config(e, d, t, True).rows > 1 for _, e, d, t in SHAPES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, device):
    h, context, grad_y = make_inputs(*shape, dtype=dtype, device=device)
    check_attention_mix(h, context, grad_y, dtype=dtype)


def _layout(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``h [B, E, D]`` in another memory layout (no copy back to contiguous)."""
    if kind == "transposed":  # an [E, B, D] buffer, as stacking expert outputs on dim 0 gives
        return h.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "strided_d":  # every other element of a wider buffer
        wide = torch.zeros(*h.shape[:2], 2 * h.shape[2], dtype=h.dtype, device=h.device)
        wide[..., ::2] = h
        return wide[..., ::2]
    return h


@pytest.mark.parametrize("per_row", [False, True], ids=["shared_context", "per_row_context"])
@pytest.mark.parametrize("layout", ["transposed", "strided_d"])
def test_strided_inputs(layout, per_row, device):
    h, context, grad_y = make_inputs(11, 5, 24, 3, device=device, per_row=per_row)
    h = _layout(h, layout)
    assert not h.is_contiguous()
    check_attention_mix(h, context, grad_y.transpose(0, 1).contiguous().transpose(0, 1), dtype=torch.float32)
    if per_row:
        check_attention_mix(h, context.transpose(0, 1).contiguous().transpose(0, 1), grad_y, dtype=torch.float32)


def _mask(kind: str, batch: int, tasks: int, experts: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "per_task":
        mask = torch.rand(tasks, experts, generator=gen) > 0.4
        mask[0] = False  # a task with no expert: p = 0, Y = 0
        mask[1] = True
    elif kind == "per_row":
        mask = torch.rand(batch, tasks, experts, generator=gen) > 0.5
        mask[0] = False
    else:  # broadcast view of a [T, E] mask: stride 0 over rows
        mask = (torch.rand(tasks, experts, generator=gen) > 0.3).expand(batch, tasks, experts)
    return mask.to(device)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared_context", "per_row_context"])
@pytest.mark.parametrize("kind", ["per_task", "per_row", "expanded"])
def test_masks(kind, per_row, device):
    batch, experts, dim, tasks = 13, 6, 40, 3
    h, context, grad_y = make_inputs(batch, experts, dim, tasks, device=device, per_row=per_row)
    mask = _mask(kind, batch, tasks, experts, device)
    check_attention_mix(h, context, grad_y, dtype=torch.float32, mask=mask, return_weights=True)


def test_fully_masked_task_gives_zeros(device):
    h, context, _ = make_inputs(4, 3, 8, 2, device=device)
    mask = torch.tensor([[False, False, False], [True, False, True]], device=device)
    y, p = fg.attention_mix(h, context, mask=mask, return_weights=True)
    assert torch.all(y[:, 0] == 0) and torch.all(p[:, 0] == 0)
    assert torch.all(p[:, 1, 1] == 0)
    torch.testing.assert_close(p[:, 1].sum(-1), torch.ones(4, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_through_weights(dtype, device):
    h, context, grad_y = make_inputs(9, 5, 30, 4, dtype=dtype, device=device)
    grad_p = torch.randn(9, 4, 5).to(device=device, dtype=dtype)
    check_attention_mix(h, context, grad_y, dtype=dtype, grad_p=grad_p)


@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_top_k(top_k, device):
    h, context, grad_y = make_inputs(12, 6, 16, 3, device=device)
    check_attention_mix(h, context, grad_y, dtype=torch.float32, top_k=top_k, return_weights=True)


def test_top_k_ties_go_to_lowest_expert(device):
    h = torch.ones(2, 4, 8, device=device)  # every expert scores the same
    context = torch.ones(1, 8, device=device)
    _, p = fg.attention_mix(h, context, top_k=2, return_weights=True)
    torch.testing.assert_close(p, torch.tensor([[[0.5, 0.5, 0.0, 0.0]]] * 2, device=device))


def test_scale(device):
    h, context, grad_y = make_inputs(6, 4, 12, 2, device=device)
    check_attention_mix(h, context, grad_y, dtype=torch.float32, scale=0.37)


def test_mixed_dtypes(device):
    """bf16 expert outputs with a float32 context (a float32 parameter under autocast)."""
    h, _, grad_y = make_inputs(8, 4, 32, 3, dtype=torch.bfloat16, device=device)
    context = torch.randn(3, 32, device=device)
    check_attention_mix(h, context, grad_y, dtype=torch.bfloat16)


def test_autocast(device):
    h, context, _ = make_inputs(8, 4, 32, 3, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = fg.attention_mix(h.bfloat16(), context)
    assert y.dtype == torch.bfloat16
    assert_matches(y, fg.reference.attention_mix(h.bfloat16().double(), context.double()), torch.bfloat16)


@pytest.mark.parametrize("per_row", [False, True])
def test_empty_batch(per_row, device):
    h, context, _ = make_inputs(0, 4, 16, 3, device=device, per_row=per_row)
    h.requires_grad_()
    context.requires_grad_()
    y, p = fg.attention_mix(h, context, return_weights=True)
    assert y.shape == (0, 3, 16) and p.shape == (0, 3, 4)
    y.sum().backward()
    assert h.grad.shape == h.shape and context.grad.shape == context.shape
    assert torch.all(context.grad == 0)


def test_nan_propagates_like_reference(device):
    h, context, _ = make_inputs(5, 4, 16, 2, device=device)
    h[2, 1, 3] = float("nan")
    y = fg.attention_mix(h, context)
    ref = fg.reference.attention_mix(h.double(), context.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4]]).any()


@given(
    batch=st.integers(1, 12),
    experts=st.integers(1, 12),
    dim=st.integers(1, 48),
    tasks=st.integers(1, 5),
    per_row=st.booleans(),
    use_mask=st.booleans(),
    use_top_k=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_matches_reference(batch, experts, dim, tasks, per_row, use_mask, use_top_k, seed, device):
    h, context, grad_y = make_inputs(batch, experts, dim, tasks, device=device, per_row=per_row, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(tasks, experts, generator=gen) > 0.3).to(device) if use_mask else None
    top_k = 1 + seed % experts if use_top_k else None
    check_attention_mix(h, context, grad_y, dtype=torch.float32, mask=mask, top_k=top_k, return_weights=True)


class LaunchCounter:
    def __init__(self, monkeypatch, *kernels):
        self.counts = {k.fn.__name__: 0 for k in kernels}
        for kernel in kernels:
            monkeypatch.setattr(kernel, "run", self._wrap(kernel, kernel.run))

    def _wrap(self, kernel, run):
        def counted(*args, **kwargs):
            self.counts[kernel.fn.__name__] += 1
            return run(*args, **kwargs)

        return counted

    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)


@pytest.mark.parametrize("per_row", [False, True])
def test_kernels_really_run(per_row, monkeypatch, device):
    """Forward: exactly one launch. Backward: one, plus the dC reduction for a shared context."""
    counter = LaunchCounter(
        monkeypatch,
        gate_mix_fwd.gate_mix_fwd_kernel,
        gate_mix_bwd.gate_mix_bwd_kernel,
        gate_mix_bwd.context_grad_reduce_kernel,
    )
    h, context, _ = make_inputs(20, 4, 16, 3, device=device, per_row=per_row)
    h.requires_grad_()
    context.requires_grad_()
    y = fg.attention_mix(h, context)
    assert counter.counts == {
        "gate_mix_fwd_kernel": 1,
        "gate_mix_bwd_kernel": 0,
        "context_grad_reduce_kernel": 0,
    }
    y.sum().backward()
    assert counter.counts["gate_mix_bwd_kernel"] == 1
    assert counter.counts["context_grad_reduce_kernel"] == (0 if per_row else 1)
    assert counter.total() <= 3


def test_gradients_are_bit_identical(device):
    """Several programs, several row blocks each: the dC reduction order is fixed, no atomics."""
    h, context, grad_y = make_inputs(200, 16, 64, 3, device=device)
    cfg = tile_config(16, 64, 3, True)
    assert 200 / cfg.rows > 2 * 8  # more row blocks than persistent programs on CPU

    def grads():
        hk = h.clone().requires_grad_()
        ck = context.clone().requires_grad_()
        fg.attention_mix(hk, ck).backward(grad_y)
        return hk.grad, ck.grad

    first, second = grads(), grads()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_double_backward_raises(device):
    h, context, _ = make_inputs(3, 2, 5, 2, device=device)
    h.requires_grad_()
    (gh,) = torch.autograd.grad(fg.attention_mix(h, context).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gh.sum().backward()


@pytest.mark.parametrize("partials", [1, 16, 37])
def test_context_grad_reduction_sums_every_slot(partials, device):
    """More slots than one tile of them (as an H100's 528 persistent programs give), and a width that
    is not a multiple of the block: the sum of every slot, bit-identical from run to run."""
    from fused_gate.kernels.config import REDUCE_BLOCK, REDUCE_SLOTS
    from fused_gate.kernels.launch import KernelLaunch

    tasks, dim = 3, 300
    ws = torch.randn(partials, tasks, dim, generator=torch.Generator().manual_seed(partials)).to(device)

    def reduce() -> torch.Tensor:
        dc = torch.empty(tasks, dim, device=device)
        grid = (-(-tasks * dim // REDUCE_BLOCK),)
        meta = dict(BLOCK=REDUCE_BLOCK, SLOTS=REDUCE_SLOTS, num_warps=4)
        KernelLaunch(gate_mix_bwd.context_grad_reduce_kernel, grid, (ws, dc, partials, tasks * dim), meta).launch()
        return dc

    first = reduce()
    assert torch.equal(first, reduce())
    torch.testing.assert_close(first.double(), ws.double().sum(0), rtol=1e-6, atol=1e-5)
