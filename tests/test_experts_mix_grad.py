"""experts_mix's gradients: the backward kernel (``H`` recomputed from ``x`` and ``weight``, never saved) against
autograd of the reference formulation in float64, which is the two-step path's (the experts' layer, then the gate).

Every gradient (``x``, ``weight``, ``bias``, ``context`` or ``logits``, through ``p`` too) on the kernel path,
interpreted without a GPU; what autograd keeps for the backward; launches, determinism, ``torch.compile``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fused_gate as fg
from fused_gate.activations import ACTIVATIONS
from fused_gate.kernels import experts_mix_bwd
from fused_gate.kernels.config import experts_mix_backward_config
from fused_gate.kernels.gate_mix_bwd import context_grad_reduce_kernel

from .conftest import assert_matches
from .test_attention_mix import LaunchCounter, _mask
from .test_experts_mix import DTYPES, SHAPES, gate_inputs, make_layer

NAN, INF = float("nan"), float("inf")
GATES = ["attention", "softmax"]


def _leaves(x, weight, bias, inputs) -> dict[str, torch.Tensor]:
    """Fresh differentiable copies of ``x``, ``weight``, ``bias`` and the context or logits, by argument name."""
    tensors = {
        "x": x,
        "weight": weight,
        "bias": bias,
        **{k: v for k, v in inputs.items() if k in ("context", "logits")},
    }
    return {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}


def run(x, weight, bias, inputs, *, reference=False, dtype=None, grad_p=False, seed=3):
    """``(Y, p, grads)`` of the loss ``<G, Y> (+ <Gp, p>)`` through ``fg.experts_mix`` (or the reference, on the
    inputs cast to ``dtype``); ``G`` and ``Gp`` are drawn in ``x``'s dtype, so both paths see the same values."""
    leaves = _leaves(x, weight, bias, inputs)
    if dtype is not None:
        leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    options = {k: v for k, v in inputs.items() if k not in leaves}
    if "bias" not in leaves:
        options["bias"] = None
    function = fg.reference.experts_mix if reference else fg.experts_mix
    y, p = function(**leaves, **options, return_weights=True)
    gen = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=gen).to(x.dtype).double().to(y.device)
    loss = (y.double() * grad_y).sum()
    if grad_p:
        loss = loss + (p.double() * torch.randn(p.shape, generator=gen).to(x.dtype).double().to(p.device)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), p.detach(), dict(zip(leaves, grads, strict=True))


def check(x, weight, bias, dtype, *, grad_p=False, **inputs):
    """Y, p and every gradient of the kernel path against float64 autograd of the reference on the same values."""
    y, p, grads = run(x, weight, bias, inputs, grad_p=grad_p)
    yr, pr, want = run(x, weight, bias, inputs, reference=True, dtype=torch.float64, grad_p=grad_p)
    assert_matches(y, yr, dtype, "Y")
    assert_matches(p, pr, dtype, "p")
    leaves = _leaves(x, weight, bias, inputs)
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape, name
        assert_matches(grad, want[name], dtype, f"d{name}")
    return grads


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_reference(shape, gate, device):
    """E = 1 to 64, K and D not powers of two, T = 1 to 8, several programs, K chunks and D chunks (float32:
    the attention gate's D = 130 runs the two-pass backward, the narrower ones the one-pass backward)."""
    batch, experts, _, dim, tasks = shape
    x, weight, bias = make_layer(*shape[:4], per_expert=gate == "softmax", device=device)
    check(x, weight, bias, torch.float32, **gate_inputs(gate, batch, experts, dim, tasks, device=device))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_half_precision_gradients(dtype, gate, device):
    batch, experts, in_features, dim, tasks = 70, 4, 37, 48, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, dtype=dtype, device=device)
    check(x, weight, bias, dtype, **gate_inputs(gate, batch, experts, dim, tasks, dtype=dtype, device=device))


@pytest.mark.parametrize("gate", GATES)
def test_one_pass_and_two_pass_backward_agree_with_the_reference(gate, monkeypatch, device):
    """The attention gate's one-pass backward (the tile spans D, ds from <G, Y>) and its two-pass backward (forced
    by a narrower D chunk, dp = <G, H> first); the softmax gate in one chunk and in several."""
    batch, experts, in_features, dim, tasks = 37, 5, 24, 48, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    inputs = gate_inputs(gate, batch, experts, dim, tasks, device=device)
    grads = []
    for block_d in (64, 16):

        def narrow(*args, block_d=block_d, **kwargs):
            return dataclasses.replace(experts_mix_backward_config(*args, **kwargs), block_d=block_d)

        monkeypatch.setattr(experts_mix_bwd, "experts_mix_backward_config", narrow)
        grads.append(check(x, weight, bias, torch.float32, grad_p=True, **inputs))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("gate", GATES)
def test_per_row_context_and_per_expert_input(gate, device):
    batch, experts, in_features, dim, tasks = 21, 3, 19, 22, 2
    x, weight, bias = make_layer(batch, experts, in_features, dim, per_expert=True, device=device)
    check(x, weight, bias, torch.float32, **gate_inputs(gate, batch, experts, dim, tasks, per_row=True, device=device))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_and_no_bias(activation, device):
    x, weight, _ = make_layer(9, 3, 17, 20, device=device)
    check(x, weight, None, torch.float32, activation=activation, **gate_inputs("attention", 9, 3, 20, 2, device=device))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("kind", ["per_task", "per_row", "expanded"])
def test_masks(kind, gate, device):
    """Every mask kind; ``per_task`` masks task 0 fully (p = 0, Y = 0, no gradient from it)."""
    batch, experts, in_features, dim, tasks = 13, 6, 16, 24, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    mask = _mask(kind, batch, tasks, experts, device)
    check(x, weight, bias, torch.float32, mask=mask, **gate_inputs(gate, batch, experts, dim, tasks, device=device))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_and_gradients_through_p(top_k, gate, device):
    batch, experts, in_features, dim, tasks = 12, 5, 16, 40, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    inputs = gate_inputs(gate, batch, experts, dim, tasks, device=device)
    check(x, weight, bias, torch.float32, grad_p=True, top_k=top_k, **inputs)


def test_top_k_ties_send_the_gradient_to_the_lowest_expert(device):
    """Every expert alike: top-2 keeps experts 0 and 1, and only their weights get a gradient."""
    x, weight = torch.ones(2, 4, device=device), torch.ones(4, 4, 8, device=device).requires_grad_()
    y = fg.experts_mix(x, weight, context=torch.ones(1, 8, device=device), top_k=2)
    (grad,) = torch.autograd.grad(y.sum(), weight)
    assert grad[:2].ne(0).all() and grad[2:].eq(0).all()


@pytest.mark.parametrize(
    ("gate", "where"), [(g, w) for g in GATES for w in ("x", "weight", "bias")] + [("softmax", "logits")]
)
def test_special_values(gate, where, device):
    """NaN and +-inf in x, weight, bias (an expert masked out for some tasks) and in the logits, and a fully
    masked task: the kernel path's Y and gradients have NaN and inf exactly where float32 autograd of the
    reference (the two-step path's formulation, same rounding) has them, and agree elsewhere."""
    batch, experts, in_features, dim, tasks = 6, 3, 8, 10, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    inputs = gate_inputs(gate, batch, experts, dim, tasks, device=device)
    mask = torch.ones(tasks, experts, dtype=torch.bool, device=device)
    mask[0, 2] = False  # task 0 does not use expert 2
    mask[2] = False  # task 2 uses none: p = 0, Y = 0
    if where == "x":
        x[1, 3], x[4, 0] = NAN, INF
    elif where == "weight":
        weight[2, 0, 1], weight[0, 5, 4] = NAN, -INF
    elif where == "bias":
        bias[2, 3], bias[1, 0] = INF, NAN
    else:
        inputs["logits"][0, 1, 0], inputs["logits"][2, 0, 1], inputs["logits"][3, 1] = NAN, INF, -INF
    y, p, grads = run(x, weight, bias, {**inputs, "mask": mask}, grad_p=True)
    yr, pr, want = run(x, weight, bias, {**inputs, "mask": mask}, reference=True, grad_p=True)
    assert y.isnan().any() or any(g.isnan().any() for g in grads.values()), "no special value reached the outputs"
    for name, got, expected in [("Y", y, yr), ("p", p, pr), *((f"d{k}", grads[k], want[k]) for k in grads)]:
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(got).cpu(), kind(expected).cpu()), f"{name}: {kind.__name__} differs"
        finite = expected.isfinite()
        assert_matches(got[finite], expected[finite], torch.float32, name)
    assert (y[:, 2] == 0).all() and (p[:, 2] == 0).all()


@pytest.mark.parametrize("gate", GATES)
def test_float16_overflow_after_the_matmul(gate, device):
    """X @ W beyond float16's range in some rows: inf and NaN at the same places in Y and in every gradient as
    the reference with the same float16 inputs (which rounds where the two-step path stores)."""
    batch, experts, in_features, dim, tasks = 12, 3, 8, 10, 2
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    x[::4] *= 3e4  # x stays finite in float16, x @ W does not
    x, weight, bias = (t.half() for t in (x, weight, bias))
    inputs = gate_inputs(gate, batch, experts, dim, tasks, dtype=torch.float16, device=device)
    y, p, grads = run(x, weight, bias, inputs)
    yr, pr, want = run(x, weight, bias, inputs, reference=True)
    assert not y.isfinite().all(), "no overflow to test"
    for name, got, expected in [("Y", y, yr), ("p", p, pr), *((f"d{k}", grads[k], want[k]) for k in grads)]:
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(got).cpu(), kind(expected).cpu()), f"{name}: {kind.__name__} differs"
        finite = expected.isfinite()
        assert_matches(got[finite], expected[finite], torch.float16, name)


@pytest.mark.parametrize("gate", GATES)
def test_strided_and_expanded_inputs(gate, device):
    """A weight stored [E, D, K] (as nn.Linear), a transposed bias, a strided context or logits, and a shared
    input expanded to one per expert (stride 0 over the experts)."""
    batch, experts, in_features, dim, tasks = 21, 3, 40, 22, 2
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.zeros(dim, experts, device=device).t().copy_(bias)
    inputs = gate_inputs(gate, batch, experts, dim, tasks, per_row=True, device=device)
    inputs = {k: v.transpose(0, 1).contiguous().transpose(0, 1) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}  # fmt: skip
    expanded = x[:, None].expand(batch, experts, in_features)
    grads = check(expanded, weight, bias, torch.float32, **inputs)
    assert grads["x"].shape == (batch, experts, in_features)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("batch", [0, 1])
def test_batch_of_zero_and_one(batch, gate, device):
    x, weight, bias = make_layer(batch, 3, 8, 6, device=device)
    grads = check(x, weight, bias, torch.float32, **gate_inputs(gate, batch, 3, 6, 2, device=device))
    if batch == 0:
        assert all(g.eq(0).all() for g in grads.values())


def test_launches_and_bit_identical_gradients(monkeypatch, device):
    """Forward: one launch; backward: the kernel and the shared context's dC reduction (two launches, no
    atomics), bit-identical over runs with several programs."""
    counter = LaunchCounter(monkeypatch, experts_mix_bwd.experts_mix_bwd_kernel, context_grad_reduce_kernel)
    x, weight, bias = make_layer(200, 4, 16, 24, device=device)
    inputs = gate_inputs("attention", 200, 4, 24, 2, device=device)
    first = run(x, weight, bias, inputs)[2]
    assert counter.counts == {"experts_mix_bwd_kernel": 1, "context_grad_reduce_kernel": 1}
    second = run(x, weight, bias, inputs)[2]
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("gate", GATES)
def test_saves_nothing_of_the_experts_size(gate, device):
    """Autograd keeps the inputs, the float32 weights p [B, T, E] and (attention) Y [B, T, D]: no tensor of
    B * E * D elements, where the two-step path keeps H (and its pre-activation)."""
    batch, experts, in_features, dim, tasks = 33, 4, 5, 12, 2
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    leaves = _leaves(x, weight, bias, gate_inputs(gate, batch, experts, dim, tasks, device=device))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fg.experts_mix(**leaves, gate=gate)
    assert saved and max(t.numel() for t in saved) < batch * experts * dim
    assert {tuple(t.shape) for t in saved} >= {(batch, tasks, experts)}


def test_double_backward_is_refused(device):
    x, weight, bias = (t.requires_grad_() for t in make_layer(5, 2, 4, 6, device=device))
    y = fg.experts_mix(x, weight, bias, context=torch.randn(2, 6, device=device))
    (grad,) = torch.autograd.grad(y.sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("gate", GATES)
def test_compiled_training_step_matches_eager(gate, device):
    """``torch.compile(fullgraph=True)`` traces the forward op and AOTAutograd the backward op (one node each)."""
    x, weight, bias = make_layer(19, 3, 12, 8, device=device)
    inputs = gate_inputs(gate, 19, 3, 8, 2, device=device)

    def loss(x, weight, bias, cz):
        kind = {"context": cz} if gate == "attention" else {"gate": "softmax", "logits": cz}
        y = fg.experts_mix(x, weight, bias, activation="gelu", **kind)
        return (y * y).sum()

    leaves = list(_leaves(x, weight, bias, inputs).values())
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("gate", GATES)
def test_reference_formulation_passes_gradcheck(gate):
    """float64 gradcheck of the reference (the oracle above), smooth activation, mask and top-k included."""
    x, weight, bias = make_layer(4, 3, 5, 6, dtype=torch.float64)
    inputs = gate_inputs(gate, 4, 3, 6, 2, dtype=torch.float64)
    leaves = _leaves(x, weight, bias, inputs)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    options = {"gate": gate, "activation": "tanh", "mask": mask, "top_k": 2, "return_weights": True}

    def function(*tensors):
        return fg.reference.experts_mix(**dict(zip(leaves, tensors, strict=True)), **options)

    assert torch.autograd.gradcheck(function, tuple(leaves.values()))


@pytest.mark.parametrize("gate", GATES)
def test_reference_backward_is_the_closed_form_of_its_autograd(gate):
    """``fg.reference.experts_mix_backward`` (the backward op off the kernels' device) equals float64 autograd
    of the reference: ``dpre`` through the matmul's own backward, ``dC`` or ``dZ`` directly."""
    x, weight, bias = make_layer(7, 3, 5, 6, dtype=torch.float64)
    inputs = gate_inputs(gate, 7, 3, 6, 2, dtype=torch.float64)
    cz = inputs.get("context", inputs.get("logits")).requires_grad_()
    pre = (torch.einsum("bk,ekd->bed", x, weight) + bias).requires_grad_()
    h = ACTIVATIONS["gelu"].function(pre)
    scale = 6**-0.5 if gate == "attention" else 1.0
    mix = fg.reference.attention_mix if gate == "attention" else lambda h, z, **kw: fg.reference.softmax_mix(z, h, **kw)
    y, p = mix(h, cz, return_weights=True)
    grad_y = torch.randn_like(y)
    want = torch.autograd.grad((y * grad_y).sum(), (pre, cz))
    got = fg.reference.experts_mix_backward(grad_y, x, weight, bias, cz, p.detach(), scale=scale, gate=gate,
                                            activation="gelu")  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
