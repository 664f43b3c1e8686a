"""Special values, far offsets, top-k consistency, threads, forward mode and torch.func.

Every semantic test runs both dispatch paths of the public ops: the Triton kernels (interpreted
without a GPU) and the plain-PyTorch fallback (``uses_kernels`` forced False), against the float64
reference.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_gate as fg
import fused_gate.dispatch
from fused_gate.kernels.config import tile_config

from .conftest import assert_matches
from .helpers import make_inputs

NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=["kernels", "fallback"])
def path(request, monkeypatch, device) -> str:
    """Run the public ops through the kernels or through the plain-PyTorch fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
    return request.param


def run_op(op: str, inputs: list[torch.Tensor], grad_y: torch.Tensor, reference_dtype=torch.float64, **kwargs):
    """``(Y, p, gradients)`` of ``fg.<op>`` (kernels or fallback) and of the reference."""
    results = []
    for fn, cast in ((getattr(fg, op), lambda x: x), (getattr(fg.reference, op), lambda x: x.to(reference_dtype))):
        leaves = [cast(x.detach()).requires_grad_() for x in inputs]
        y, p = fn(*leaves, return_weights=True, **kwargs)
        y.backward(cast(grad_y))
        results.append((y, p, [x.grad for x in leaves]))
    return results


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """NaN and +-inf at the same places, finite values within the dtype's tolerance."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(a), kind(e)), f"{what}: {kind.__name__} differs:\n{a}\n{e}"
    finite = e.isfinite()
    assert_matches(a[finite], e[finite], dtype, what)


def assert_same(op: str, inputs, grad_y, dtype=torch.float32, reference_dtype=torch.float64, **kwargs) -> tuple:
    """The public op (this test's path) against the reference, forward and every gradient."""
    (y, p, grads), (yr, pr, grads_r) = run_op(op, inputs, grad_y, reference_dtype, **kwargs)
    assert_same_values(y, yr, dtype, "Y")
    assert_same_values(p, pr, dtype, "p")
    for i, (g, gr) in enumerate(zip(grads, grads_r, strict=True)):
        assert_same_values(g, gr, dtype, f"gradient of input {i}")
    return y, p, grads


# ---------------------------------------------------------------------------- 1. NaN with top-k


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
def test_nan_logit_propagates_with_top_k(top_k, path, device):
    logits = torch.randn(3, 2, 4, device=device)
    logits[0, 0, 2] = NAN
    h = torch.randn(3, 4, 5, device=device)
    y, p, (dz, _) = assert_same("softmax_mix", [logits, h], torch.randn(3, 2, 5, device=device), top_k=top_k)
    assert p[0, 0].isnan().all() and y[0, 0].isnan().all() and dz[0, 0].isnan().all()
    assert p[0, 1].isfinite().all() and p[1:].isfinite().all() and y[1:].isfinite().all()


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_nan_expert_propagates_with_top_k(top_k, path, device):
    h, context, grad_y = make_inputs(4, 5, 6, 2, device=device)
    h[1, 3, 2] = NAN  # every task's score of expert 3 in row 1 is NaN
    y, p, _ = assert_same("attention_mix", [h, context], grad_y, top_k=top_k)
    assert p[1].isnan().all() and y[1].isnan().all()
    assert y[[0, 2, 3]].isfinite().all()


# ---------------------------------------------------------------------------- 2. far offsets


def far_view(values: torch.Tensor, strides: tuple[int, ...], offset: int, device: str = "cpu") -> torch.Tensor:
    """``values`` placed in a view whose offsets pass 2**31 elements (on the CPU storage is only reserved)."""
    extent = offset + sum((n - 1) * s for n, s in zip(values.shape, strides, strict=True)) + 1
    view = torch.empty(extent, dtype=values.dtype, device=device).as_strided(values.shape, strides, offset)
    view.copy_(values)
    return view


def test_far_mask_rows_are_read_at_their_address(path):
    """A bool ``[T, E]`` mask with task stride 2**28: task 8 starts past 2**31 bytes."""
    values = torch.zeros(9, 2, dtype=torch.bool)
    values[:, 1] = True
    values[0, 0] = True
    mask = far_view(values, (2**28, 1), 2**31 + 64)
    logits, h = torch.randn(3, 9, 2), torch.randn(3, 2, 4)
    assert_same("softmax_mix", [logits, h], torch.randn(3, 9, 4), mask=mask)
    p = fg.softmax_mix(logits, h, mask=mask, return_weights=True)[1]
    torch.testing.assert_close(p[:, 8], torch.tensor([[0.0, 1.0]] * 3))


@pytest.mark.parametrize("operand", ["logits", "grad_y", "context"])
def test_far_task_rows_of_small_operands(operand, path):
    """Logits, a per-row context or dL/dY stored task-major (``[T, B, X]``) with offsets past 2**31."""
    batch, experts, dim, tasks = 2, 3, 4, 9
    stride_t = 2**28 if operand != "context" else 2**28 + 8
    h, context, grad_y = make_inputs(batch, experts, dim, tasks, per_row=True, dtype=torch.bfloat16)
    if operand == "logits":
        logits = torch.randn(batch, tasks, experts).bfloat16()
        far = far_view(logits, (experts, stride_t, 1), 64)
        assert_same("softmax_mix", [far, h], grad_y, dtype=torch.bfloat16)
    elif operand == "grad_y":
        far = far_view(grad_y, (dim, stride_t, 1), 64)
        assert_same("attention_mix", [h, context], far, dtype=torch.bfloat16)
    else:
        far = far_view(context, (dim, stride_t, 1), 64)
        assert_same("attention_mix", [h, far], grad_y, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- 3. top-k: backward of the forward


def near_tie_experts(batch: int, experts: int, dim: int) -> torch.Tensor:
    """Each row's experts are permutations of one vector: with a constant context every score is
    the same sum in another order, equal up to rounding."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(batch, 1, dim, generator=gen)
    perms = torch.stack([torch.randperm(dim, generator=gen) for _ in range(batch * experts)])
    return torch.gather(base.expand(batch, experts, dim).reshape(batch * experts, dim), 1, perms).view(
        batch, experts, dim
    )


# (E, D) -> whether the forward and the backward walk D as one tile: every pairing the heuristic makes.
CHUNKINGS = {(2, 4000): (True, False), (8, 1024): (True, False), (16, 1024): (False, False), (4, 40): (True, True)}


@pytest.mark.parametrize(("experts", "dim"), list(CHUNKINGS), ids=lambda x: str(x))
@pytest.mark.parametrize("ties", ["exact", "near"])
def test_top_k_gradient_is_that_of_the_forward(experts, dim, ties, path, device):
    chunking = tile_config(experts, dim, 1, False).single_chunk, tile_config(experts, dim, 1, True).single_chunk
    assert chunking == CHUNKINGS[experts, dim]
    batch = 16
    h = near_tie_experts(batch, experts, dim) if ties == "near" else torch.ones(batch, experts, dim)
    h, context = h.to(device), torch.ones(1, dim, device=device)
    grad_y = torch.randn(batch, 1, dim, device=device)
    hk, ck = h.clone().requires_grad_(), context.clone().requires_grad_()
    y, p = fg.attention_mix(hk, ck, top_k=1, scale=1.0, return_weights=True)
    y.backward(grad_y)
    kept = p != 0
    assert (kept.sum(-1) == 1).all()
    if ties == "exact":
        assert kept[..., 0].all()
    # The gradient of the forward that ran: the reference mixing exactly the kept experts.
    dh, dc = fg.reference.attention_mix_backward(grad_y.double(), h.double(), context.double(), scale=1.0, mask=kept)
    assert_matches(hk.grad, dh, torch.float32, "dH")
    assert_matches(ck.grad, dc, torch.float32, "dC")


# ---------------------------------------------------------------------------- 4. -inf scores


def test_minus_inf_logit_excludes_like_the_mask(path, device):
    logits = torch.randn(5, 2, 4, device=device)
    h = torch.randn(5, 4, 3, device=device)
    grad_y = torch.randn(5, 2, 3, device=device)
    excluded = torch.zeros(2, 4, dtype=torch.bool, device=device)
    excluded[0, 1] = excluded[1, 3] = True
    y, p, (dz, dh) = assert_same("softmax_mix", [logits.masked_fill(excluded, -INF), h], grad_y)
    y_m, p_m, (dz_m, dh_m) = assert_same("softmax_mix", [logits, h], grad_y, mask=~excluded)
    torch.testing.assert_close(y, y_m)
    torch.testing.assert_close(p, p_m)
    torch.testing.assert_close(dh, dh_m)
    torch.testing.assert_close(dz, dz_m.masked_fill(excluded, 0.0))
    assert (dz[:, excluded] == 0).all()


def test_all_minus_inf_row_gives_zeros(path, device):
    logits = torch.randn(3, 2, 4, device=device)
    logits[1, 0] = -INF
    y, p, (dz, _) = assert_same("softmax_mix", [logits, torch.randn(3, 4, 5, device=device)], torch.randn(3, 2, 5))
    assert (p[1, 0] == 0).all() and (y[1, 0] == 0).all() and (dz[1, 0] == 0).all()


def test_overflowing_attention_scores(path, device):
    """float32 scores that overflow: to -inf the expert drops out, to +inf the row is NaN."""
    h, context, grad_y = make_inputs(4, 3, 8, 2, device=device)
    h[0] = 1e30  # row 0: <C[t], H> overflows to +-inf depending on the sign of sum(C[t])
    context[0] = 1e10
    context[1] = -1e10
    # float32 reference: in float64 these scores would not overflow.
    y, p, _ = assert_same("attention_mix", [h, context], grad_y, reference_dtype=torch.float32, scale=1.0)
    assert p[0, 0].isnan().all() and y[0, 0].isnan().all()  # +inf scores
    assert (p[0, 1] == 0).all() and (y[0, 1] == 0).all()  # -inf scores: no expert left
    assert y[1:].isfinite().all()


def test_infinite_context_leaves_a_shared_gradient_finite(path, device):
    """An infinite context entry against zero expert outputs scores NaN (inf * 0); when every row of the
    batch has that task's experts masked or at -inf, dC stays finite, also past the last row of a tile."""
    h = torch.tensor([-1.0, 0.0, 0.0, 0.0], device=device).repeat(2).reshape(2, 2, 2)
    context = torch.zeros(3, 2, device=device)
    context[1, 0] = INF  # task 1 scores expert 0 at -inf, expert 1 (masked) at NaN
    mask = torch.zeros(3, 2, dtype=torch.bool, device=device)
    mask[1, 0] = True
    _, _, (_, dc) = assert_same("attention_mix", [h, context], torch.randn(2, 3, 2), scale=1.0, mask=mask)
    assert (dc == 0).all()


def test_plus_inf_logit_gives_nan_row(path, device):
    logits = torch.randn(2, 1, 3, device=device)
    logits[0, 0, 1] = INF
    y, p, _ = assert_same("softmax_mix", [logits, torch.randn(2, 3, 4, device=device)], torch.randn(2, 1, 4))
    assert p[0].isnan().all() and y[0].isnan().all() and p[1].isfinite().all()


# ---------------------------------------------------------------------------- 5. unused experts


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_masked_out_nonfinite_expert_reaches_nothing(bad, path, device):
    """PLE-like: task 0 may not use expert 2, whose output diverged; task 1 uses it."""
    h, context, grad_y = make_inputs(4, 3, 6, 2, device=device)
    h[:, 2, 1] = bad
    mask = torch.tensor([[True, True, False], [True, True, True]], device=device)
    grad_y[:, 1] = 0.0  # only task 0 feeds the loss
    logits = torch.randn(4, 2, 3, device=device)
    y, _, (dz, dh) = assert_same("softmax_mix", [logits, h], grad_y, mask=mask)
    assert y[:, 0].isfinite().all() and dz[:, 0].isfinite().all() and dh.isfinite().all()
    y, _, (dh, dc) = assert_same("attention_mix", [h, context], grad_y, mask=mask)
    assert y[:, 0].isfinite().all() and dc[0].isfinite().all()


def test_fully_masked_task_is_zero_even_with_nan_experts(path, device):
    h, context, grad_y = make_inputs(3, 2, 4, 2, device=device)
    h[:, 0] = NAN
    mask = torch.tensor([[False, False], [False, True]], device=device)
    y, p, (dh, dc) = assert_same("attention_mix", [h, context], grad_y, mask=mask)
    assert (y[:, 0] == 0).all() and (p[:, 0] == 0).all()
    assert y[:, 1].isfinite().all() and dh[:, 1].isfinite().all() and dc.isfinite().all()


# ---------------------------------------------------------------------------- 5b. the fallback's fast path

# name -> (build(device) -> (logits, h, mask, top_k), whether the exact rules must take over in the
# forward and in the backward). The fast path is plain softmax and batched matmuls; a special value it
# mishandles leaves a NaN or inf in Y (in ds in the backward), and the exact rules then recompute the call.


def _scores_case(change=None, mask=None, top_k=None):
    def build(device):
        gen = torch.Generator().manual_seed(5)
        logits, h = torch.randn(6, 3, 5, generator=gen), torch.randn(6, 5, 4, generator=gen)
        if change is not None:
            change(logits, h)
        m = None if mask is None else torch.tensor(mask)
        return logits.to(device), h.to(device), None if m is None else m.to(device), top_k

    return build


def _set(where, value):
    def change(logits, h):
        (logits if where[0] == "z" else h)[where[1:]] = value

    return change


PARTIAL_MASK = [[True, False, True, True, False], [False, True, True, False, True], [True, True, True, True, True]]
FAST_PATH_CASES = {
    "finite": (_scores_case(), False, False),
    "mask": (_scores_case(mask=PARTIAL_MASK), False, False),
    "top-k": (_scores_case(top_k=2), False, False),
    "-inf logit": (_scores_case(_set(("z", 1, 0, 3), -INF)), False, False),
    "weights below float32's range, masked": (_scores_case(lambda z, h: z.mul_(300), mask=PARTIAL_MASK), False, False),
    "fully masked task": (_scores_case(mask=[[False] * 5, *PARTIAL_MASK[1:]]), True, False),
    "all -inf row": (_scores_case(_set(("z", 2, 1, slice(None)), -INF)), True, False),
    "NaN logit": (_scores_case(_set(("z", 0, 2, 1), NAN)), True, True),
    "+inf logit": (_scores_case(_set(("z", 3, 0, 4), INF)), True, True),
    "NaN expert, masked out": (_scores_case(_set(("h", 4, 1, 2), NAN), mask=PARTIAL_MASK), True, True),
    "inf expert, used": (_scores_case(_set(("h", 4, 0, 0), INF)), True, True),
}


@pytest.mark.parametrize("case", list(FAST_PATH_CASES))
def test_fallback_fast_path_hits_and_misses(case, monkeypatch, device):
    """The float32 fallback against the float64 reference (which always takes the exact path); the exact
    rules run exactly when a special value defeats the fast path, forward and backward apart."""
    monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
    exact = {"forward": 0, "backward": 0}
    for name, key in (("gate_weights", "forward"), ("_weight_grads", "backward")):
        original = getattr(fg.reference, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            exact[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fg.reference, name, counted)
    build, exact_forward, exact_backward = FAST_PATH_CASES[case]
    logits, h, mask, top_k = build(device)
    grad_y = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(6)).to(device)
    z, hk = logits.clone().requires_grad_(), h.clone().requires_grad_()
    y, p = fg.softmax_mix(z, hk, mask=mask, top_k=top_k, return_weights=True)
    assert exact["forward"] == int(exact_forward)
    y.backward(grad_y)
    assert exact == {"forward": int(exact_forward), "backward": int(exact_backward)}
    z64, h64 = logits.double().requires_grad_(), h.double().requires_grad_()
    yr, pr = fg.reference.softmax_mix(z64, h64, mask=mask, top_k=top_k, return_weights=True)
    yr.backward(grad_y.double())
    for actual, expected, what in ((y, yr, "Y"), (p, pr, "p"), (z.grad, z64.grad, "dZ"), (hk.grad, h64.grad, "dH")):
        assert_same_values(actual, expected, torch.float32, what)


def test_fallback_fast_path_of_the_attention_gate(monkeypatch, device):
    """The attention gate's fast path (finite scores, a masked row, top-k) and its exact rules (an expert
    output of inf that only a masked task sees) against float64."""
    monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
    h, context, grad_y = make_inputs(5, 4, 6, 3, device=device)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True] * 4], device=device)
    for top_k in (None, 2):
        assert_same("attention_mix", [h, context], grad_y, mask=mask, top_k=top_k)
    h[2, 1, 0] = INF
    assert_same("attention_mix", [h, context], grad_y, mask=mask)


@pytest.mark.parametrize("op", ["attention_mix", "softmax_mix"])
def test_fallback_through_the_custom_op_under_torch_compile(op, monkeypatch, device):
    """Compiled, the fallback runs behind the custom op (its backward recomputes p), fast path and exact
    rules alike; eager, it calls the reference's function. Both give the same values."""
    monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
    h, context, grad_y = make_inputs(4, 3, 5, 2, device=device)
    logits = torch.randn(4, 2, 3, device=device)
    inputs = [h, context] if op == "attention_mix" else [logits, h]
    mask = torch.tensor([[True, False, True], [False, False, False]], device=device)
    fn = getattr(fg, op)

    def forward_backward(call, values):
        leaves = [x.clone().requires_grad_() for x in values]
        y, p = call(*leaves)
        y.backward(grad_y)
        return [y, p, *(x.grad for x in leaves)]

    def gate(*args):
        return fn(*args, mask=mask, return_weights=True)

    compiled = torch.compile(gate, backend="aot_eager", fullgraph=True)
    for values in (inputs, [x.masked_fill(torch.rand_like(x) < 0.2, NAN) for x in inputs]):
        for got, want in zip(forward_backward(compiled, values), forward_backward(gate, values), strict=True):
            assert_same_values(got, want, torch.float32, op)


@pytest.mark.parametrize("op", ["attention_mix", "softmax_mix"])
def test_fallback_refuses_double_backward_as_the_kernels(op, path, device):
    h, context, _ = make_inputs(3, 2, 5, 2, device=device)
    inputs = [h, context] if op == "attention_mix" else [torch.randn(3, 2, 2, device=device), h]
    leaves = [x.clone().requires_grad_() for x in inputs]
    (grad,) = torch.autograd.grad(getattr(fg, op)(*leaves).pow(2).sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_float32_reference_double_backward_matches_float64():
    """The fast path saves p; a higher-order backward recomputes it from the inputs."""
    h, context, _ = make_inputs(4, 5, 6, 3)
    logits = torch.randn(4, 3, 5)

    def second_order(dtype):
        hk, ck, zk = (x.to(dtype).requires_grad_() for x in (h, context, logits))
        y = fg.reference.attention_mix(hk, ck, top_k=3) + fg.reference.softmax_mix(zk, hk, temperature=0.5)
        (gh,) = torch.autograd.grad(y.pow(2).sum(), hk, create_graph=True)
        return torch.autograd.grad(gh.pow(2).sum(), (ck, zk))

    for got, want in zip(second_order(torch.float32), second_order(torch.float64), strict=True):
        assert_matches(got, want, torch.float32, "second-order gradient")


# ---------------------------------------------------------------------------- 6, 9. forward mode, torch.func


def _naive_attention(h, context, scale):
    """Plain autograd-transparent formulation (no special-value handling), for finite inputs."""
    p = torch.softmax(torch.einsum("td,bed->bte", context, h) * scale, dim=-1)
    return torch.einsum("bte,bed->btd", p, h)


def test_forward_mode_tangents(device):
    h, context, _ = make_inputs(5, 4, 6, 3, device=device)
    th, tc = torch.randn_like(h), torch.randn_like(context)
    _, tangent = torch.func.jvp(lambda a, b: fg.attention_mix(a, b), (h, context), (th, tc))
    doubles = (h.double(), context.double()), (th.double(), tc.double())
    _, want = torch.func.jvp(lambda a, b: _naive_attention(a, b, 6**-0.5), *doubles)
    assert tangent.abs().sum() > 0
    assert_matches(tangent, want, torch.float32, "jvp")
    import torch.autograd.forward_ad as fwAD

    logits = torch.randn(5, 3, 4, device=device)
    tz = torch.randn_like(logits)
    with fwAD.dual_level():
        y = fg.softmax_mix(fwAD.make_dual(logits, tz), h)
        dual = fwAD.unpack_dual(y).tangent
    p = torch.softmax(logits.double(), -1)
    dp = p * (tz.double() - (p * tz.double()).sum(-1, keepdim=True))
    assert_matches(dual, torch.einsum("bte,bed->btd", dp, h.double()), torch.float32, "forward_ad")


def test_reference_passes_gradcheck_and_forward_gradcheck():
    h, context, _ = make_inputs(3, 4, 5, 2, dtype=torch.float64)
    logits = torch.randn(3, 2, 4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    for fn, inputs in (
        (lambda a, b: fg.reference.attention_mix(a, b, mask=mask, top_k=2, return_weights=True), (h, context)),
        (lambda a, b: fg.reference.softmax_mix(a, b, temperature=0.7, mask=mask, return_weights=True), (logits, h)),
    ):
        inputs = tuple(x.clone().requires_grad_() for x in inputs)
        assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_torch_func_grad_and_vjp(transform, device):
    h, context, grad_y = make_inputs(4, 3, 5, 2, device=device)

    def loss(a, b):
        return (fg.attention_mix(a, b, top_k=2) * grad_y).sum()

    if transform == "grad":
        dh, dc = torch.func.grad(loss, argnums=(0, 1))(h, context)
    else:
        _, pullback = torch.func.vjp(lambda a, b: fg.attention_mix(a, b, top_k=2), h, context)
        dh, dc = pullback(grad_y)
    hk, ck = h.clone().requires_grad_(), context.clone().requires_grad_()
    loss(hk, ck).backward()
    assert_matches(dh, hk.grad, torch.float32, "dH")
    assert_matches(dc, ck.grad, torch.float32, "dC")


def test_vmap_over_a_batch_of_gates(device):
    h = make_inputs(4, 3, 5, 2, device=device)[0]
    contexts = torch.randn(6, 2, 5, device=device)
    stacked = torch.func.vmap(lambda c: fg.attention_mix(h, c))(contexts)
    for i in range(6):
        assert_matches(stacked[i], fg.reference.attention_mix(h.double(), contexts[i].double()), torch.float32)


@pytest.mark.parametrize("op", ["attention_mix", "softmax_mix"])
def test_backward_and_forward_mode_through_a_vmapped_gate(op, device):
    """A vmapped forward (a stack of models trained at once) differentiates as each member alone, in reverse
    mode and in forward mode."""
    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, 6, device=device)  # [stack, B, E, D]
    second = torch.randn(3, 4, 2, 6 if op == "attention_mix" else 5, device=device)  # contexts or logits

    def mix(h, second):
        return fg.attention_mix(h, second) if op == "attention_mix" else fg.softmax_mix(second, h)

    leaves = h.clone().requires_grad_(), second.clone().requires_grad_()
    torch.func.vmap(mix)(*leaves).square().sum().backward()
    tangents = torch.randn_like(h), torch.randn_like(second)
    _, jvp = torch.func.vmap(lambda a, b, ta, tb: torch.func.jvp(mix, (a, b), (ta, tb)))(h, second, *tangents)
    for i in range(3):
        alone = h[i].clone().requires_grad_(), second[i].clone().requires_grad_()
        mix(*alone).square().sum().backward()
        for stacked, single in zip(leaves, alone, strict=True):
            assert_matches(stacked.grad[i], single.grad, torch.float32, "gradient")
        assert_matches(jvp[i], torch.func.jvp(mix, alone, (tangents[0][i], tangents[1][i]))[1], torch.float32)


# ---------------------------------------------------------------------------- 7. reference top-k memory


def test_reference_top_k_memory_is_linear_in_experts():
    """B = 512, E = 256, T = 16, top_k = 2: an [B, T, E, E] rank matrix would peak at about 5.7 GB."""
    code = textwrap.dedent(
        """
        import resource, torch
        import fused_gate as fg
        h = torch.randn(512, 256, 32)
        y = fg.reference.attention_mix(h, torch.randn(16, 32), top_k=2)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    assert int(out.stdout.split()[-1]) < 1500  # MiB, with torch itself about 300


@given(
    scores=st.lists(st.integers(-2, 2), min_size=1, max_size=9),
    top_k=st.integers(1, 9),
    masked=st.lists(st.booleans(), min_size=9, max_size=9),
)
@settings(max_examples=100, deadline=None)
def test_reference_top_k_matches_rank_definition(scores, top_k, masked):
    s = torch.tensor(scores, dtype=torch.float64)[None, None]
    allowed = torch.tensor(masked[: len(scores)])[None, None]
    top_k = min(top_k, len(scores))
    kept = fg.reference.allowed_experts(s, allowed, top_k)[0, 0].tolist()
    # An allowed expert is kept when fewer than top_k allowed experts beat it (higher score, or
    # the same score and a lower index).
    for e, (score, ok) in enumerate(zip(scores, allowed[0, 0].tolist(), strict=True)):
        beaten_by = sum(
            1 for f, (other, ok_f) in enumerate(zip(scores, allowed[0, 0].tolist(), strict=True))
            if ok_f and (other > score or (other == score and f < e))
        )  # fmt: skip
        assert kept[e] == (ok and beaten_by < top_k)


# ---------------------------------------------------------------------------- 8. threads


def test_concurrent_calls_give_the_serial_results(device):
    # Many programs per launch (E = 64: two rows per program) keep every launch long enough to overlap.
    cases = [make_inputs(40 + 2 * i, 64, 16 + i, 2, device=device, seed=i) for i in range(8)]

    def forward_backward(case):
        h, context, grad_y = (x.clone() for x in case)
        h.requires_grad_()
        context.requires_grad_()
        y = fg.attention_mix(h, context, top_k=2)
        y.backward(grad_y)
        return y.detach(), h.grad, context.grad

    serial = [forward_backward(c) for c in cases]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(forward_backward, cases))
    for one, other in zip(serial, threaded, strict=True):
        for a, b in zip(one, other, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- 10. validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scale=1e39), "scale .* float32"),
        (dict(scale=1e-39), "scale .* float32"),
        (dict(scale=10**400), "scale .* too large"),
        (dict(scale=math.inf), "scale must be a finite positive"),
    ],
)
def test_unrepresentable_scale_is_rejected(kwargs, match, device):
    h, context, _ = make_inputs(2, 3, 4, 2, device=device)
    with pytest.raises(ValueError, match=match):
        fg.attention_mix(h, context, **kwargs)
    with pytest.raises(ValueError, match=match):
        fg.reference.attention_mix(h, context, **kwargs)


@pytest.mark.parametrize("temperature", [1e-39, 1e38, 10**400])
def test_unrepresentable_temperature_is_rejected(temperature, device):
    logits, h = torch.randn(2, 2, 3, device=device), torch.randn(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="temperature"):
        fg.softmax_mix(logits, h, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        fg.SoftmaxGate(4, 2, 3, temperature=temperature)


def test_numpy_scalars_are_the_python_numbers(device):
    h, context, _ = make_inputs(3, 4, 5, 2, device=device)
    want = fg.attention_mix(h, context, scale=0.5, top_k=2)
    torch.testing.assert_close(fg.attention_mix(h, context, scale=np.float32(0.5), top_k=np.int64(2)), want)
    logits = torch.randn(3, 2, 4, device=device)
    torch.testing.assert_close(
        fg.softmax_mix(logits, h, temperature=np.float64(0.5), top_k=np.int32(3)),
        fg.softmax_mix(logits, h, temperature=0.5, top_k=3),
    )
    gate = fg.AttentionMix(2, 5, scale=np.float32(0.5), top_k=np.int64(2))
    assert type(gate.scale) is float and type(gate.top_k) is int


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: fg.AttentionMix(2, 8, top_k=0), ValueError, "top_k"),
        (lambda: fg.AttentionMix(2, 8, top_k=1.5), TypeError, "top_k"),
        (lambda: fg.AttentionMix(2, 8, scale=-1.0), ValueError, "scale"),
        (lambda: fg.SoftmaxGate(4, 2, 3, top_k=4), ValueError, "top_k"),
        (lambda: fg.SoftmaxGate(4, 2, 3, temperature=0.0), ValueError, "temperature"),
        (lambda: fg.MMoE(4, 3, 8, 2, top_k=4), ValueError, "top_k"),
        (lambda: fg.MMoE(4, 3, 8, 2, gate="softmax", top_k=True), TypeError, "top_k"),
        (lambda: fg.PLE(4, 2, 1, 1, 8, top_k=5), ValueError, "top_k"),
    ],
)
def test_constructors_validate_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


# ---------------------------------------------------------------------------- property test with special values

FINITE = st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0])
SPECIAL = st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, NAN, INF, -INF])


@given(
    batch=st.integers(1, 5),
    experts=st.integers(1, 6),
    dim=st.integers(1, 6),
    tasks=st.integers(1, 3),
    data=st.data(),
    use_top_k=st.booleans(),
    mask_kind=st.sampled_from(["none", "random", "fully_masked_task"]),
    attention=st.booleans(),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_special_values(batch, experts, dim, tasks, data, use_top_k, mask_kind, attention, path, device):
    """Small integers (exact sums, so ties are exact on both paths) mixed with NaN and +-inf; a tensor is
    finite half the time, so that the fallback's fast path is hit as well as missed."""

    def tensor(*shape):
        values = SPECIAL if data.draw(st.booleans()) else FINITE
        flat = data.draw(st.lists(values, min_size=math.prod(shape), max_size=math.prod(shape)))
        return torch.tensor(flat, dtype=torch.float32, device=device).view(*shape)

    h = tensor(batch, experts, dim)
    grad_y = torch.randn(batch, tasks, dim, device=device)
    mask = None
    if mask_kind != "none":
        mask = torch.tensor(
            data.draw(st.lists(st.booleans(), min_size=tasks * experts, max_size=tasks * experts)), device=device
        ).view(tasks, experts)
        if mask_kind == "fully_masked_task":
            mask[0] = False
    top_k = data.draw(st.integers(1, experts)) if use_top_k else None
    if attention:
        assert_same("attention_mix", [h, tensor(tasks, dim)], grad_y, mask=mask, top_k=top_k, scale=1.0)
    else:
        assert_same("softmax_mix", [tensor(batch, tasks, experts), h], grad_y, mask=mask, top_k=top_k)
