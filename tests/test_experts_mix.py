"""experts_mix: the one-kernel experts' last layer + gate against the float64 reference (the forward; the
gradients are in ``tests/test_experts_mix_grad.py``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_gate as fg
import fused_gate.dispatch
from bench.memory_traffic import count_traffic
from fused_gate._validation import MIX_MAX_GATE
from fused_gate.activations import ACTIVATIONS
from fused_gate.kernels import experts_mix as kernel
from fused_gate.kernels.config import experts_mix_config

from .conftest import assert_matches
from .test_attention_mix import LaunchCounter, _mask
from .test_special_values import far_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")

# (B, E, K, D, T): E = 1 and 64, K and D not powers of two, T = 1..8; several programs (B > 64 rows),
# several K chunks (K > 32) and D chunks (D > the accumulator's chunk).
SHAPES = [
    (1, 1, 1, 1, 1),
    (19, 3, 20, 24, 2),
    (70, 4, 37, 9, 3),
    (6, 5, 33, 130, 5),
    (3, 64, 7, 5, 8),
]


def test_shapes_cover_the_tiling():
    configs = [(experts_mix_config(e, k, d, t), b, k, d) for b, e, k, d, t in SHAPES]
    assert any(b > cfg.rows for cfg, b, _, _ in configs)
    assert any(k > cfg.block_k for cfg, _, k, _ in configs)
    assert any(d > cfg.block_d for cfg, _, _, d in configs)
    assert all(cfg.rows >= 16 and cfg.block_k >= 16 and cfg.block_d >= 16 for cfg, *_ in configs)


def make_layer(batch, experts, in_features, dim, *, per_expert=False, dtype=torch.float32, device="cpu", seed=0):
    """``(x, weight, bias)`` with ``nn.Linear``-sized weights, so ``H`` is of order 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *((experts,) if per_expert else ()), in_features, generator=gen)
    weight = torch.randn(experts, in_features, dim, generator=gen) / in_features**0.5
    bias = torch.randn(experts, dim, generator=gen) * 0.1
    return [t.to(device=device, dtype=dtype) for t in (x, weight, bias)]


def gate_inputs(gate, batch, experts, dim, tasks, *, per_row=False, dtype=torch.float32, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    if gate == "attention":
        shape = (batch, tasks, dim) if per_row else (tasks, dim)
        return {"context": torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)}
    return {"gate": "softmax", "logits": torch.randn(batch, tasks, experts, generator=gen).to(device, dtype)}


def compare(x, weight, bias, dtype, **kwargs):
    """The kernel's ``Y`` and ``p`` against the float64 reference on the same (rounded) inputs."""
    with torch.no_grad():
        y, p = fg.experts_mix(x, weight, bias, return_weights=True, **kwargs)
    wide = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    bias64 = None if bias is None else bias.double()
    yr, pr = fg.reference.experts_mix(x.double(), weight.double(), bias64, return_weights=True, **wide)
    assert y.dtype == x.dtype and y.shape == yr.shape and p.shape == pr.shape
    assert_matches(y, yr, dtype, "Y")
    assert_matches(p, pr, dtype, "p")
    return y, p


@pytest.mark.parametrize("gate", ["attention", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, gate, device):
    batch, experts, _, dim, tasks = shape
    # MMoE's shared input for the attention gate, one input per expert for the softmax gate.
    x, weight, bias = make_layer(*shape[:4], per_expert=gate == "softmax", dtype=dtype, device=device)
    compare(x, weight, bias, dtype, **gate_inputs(gate, batch, experts, dim, tasks, dtype=dtype, device=device))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_and_no_bias(activation, device):
    x, weight, _ = make_layer(9, 3, 17, 20, device=device)
    compare(x, weight, None, torch.float32, activation=activation, **gate_inputs("attention", 9, 3, 20, 2))


def _activation_of(activation: str, values: torch.Tensor) -> torch.Tensor:
    """``act(values)`` as ``experts_mix`` computes it: one expert of weight 1, no bias, a softmax gate of weight 1."""
    x, weight = values[:, None], torch.ones(1, 1, 1, dtype=values.dtype, device=values.device)
    logits = torch.zeros(len(values), 1, 1, dtype=values.dtype, device=values.device)
    with torch.no_grad():
        return fg.experts_mix(x, weight, gate="softmax", logits=logits, activation=activation)[:, 0, 0]


TORCH_ACTIVATIONS = {
    "relu": torch.relu,
    "leaky_relu": torch.nn.functional.leaky_relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda h: h,
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_are_accurate_near_zero_and_far_out(activation, dispatch_path, device):
    """Every activation, from |h| = 1e-12 to 40, within 2x torch's float32 error plus 4e-7 relative of the
    float64 value (``2 * sigmoid(2h) - 1`` for tanh was off by 5e-3 relative at 1e-5)."""
    magnitudes = torch.logspace(-12, 1.6, 400, dtype=torch.float64)
    exact_in = torch.cat([magnitudes, -magnitudes]).float()
    exact = TORCH_ACTIVATIONS[activation](exact_in.double())
    torch32 = TORCH_ACTIVATIONS[activation](exact_in).double()
    got = _activation_of(activation, exact_in.to(device)).double().cpu()
    bound = 2 * (torch32 - exact).abs() + 4e-7 * exact.abs()
    worst = ((got - exact).abs() / bound.clamp(min=1e-45)).argmax()
    assert (got - exact).abs()[worst] <= bound[worst], f"{activation}({exact_in[worst].item():.3g}) = {got[worst]}"


# act(+inf), act(-inf), act(NaN): the limits, one rule for the kernel and the reference (torch's float32 GELU
# gives NaN at +inf, its GELU and SiLU NaN at -inf).
LIMITS = {
    "relu": (INF, 0.0),
    "leaky_relu": (INF, -INF),
    "gelu": (INF, 0.0),
    "silu": (INF, 0.0),
    "sigmoid": (1.0, 0.0),
    "tanh": (1.0, -1.0),
    "identity": (INF, -INF),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_map_infinities_to_their_limits(activation, dtype, dispatch_path, device):
    values = torch.tensor([INF, -INF, NAN], dtype=dtype, device=device)
    got = _activation_of(activation, values).float().cpu()
    expected = torch.tensor([*LIMITS[activation], NAN])
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
    reference = ACTIVATIONS[activation].function(values.cpu().float())  # what the reference and the layers apply
    torch.testing.assert_close(reference, expected, equal_nan=True, rtol=0, atol=0)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values with the first two axes swapped in memory (a view, not contiguous)."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("per_expert", [False, True], ids=["x_BK", "x_BEK"])
@pytest.mark.parametrize("gate", ["attention", "softmax"])
def test_any_strides(gate, per_expert, device):
    batch, experts, in_features, dim, tasks = 21, 3, 40, 22, 2  # K: two chunks
    x, weight, bias = make_layer(batch, experts, in_features, dim, per_expert=per_expert, device=device)
    weight = weight.transpose(1, 2).contiguous().transpose(1, 2)  # an [E, D, K] buffer, as nn.Linear stores it
    bias = torch.zeros(dim, experts, device=device).t().copy_(bias)
    inputs = gate_inputs(gate, batch, experts, dim, tasks, per_row=True, device=device)
    inputs = {k: _strided(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    x = _strided(x) if per_expert else x.t().contiguous().t()
    for t in (x, weight, bias, *[v for v in inputs.values() if isinstance(v, torch.Tensor)]):
        assert not t.is_contiguous()
    compare(x, weight, bias, torch.float32, **inputs)


@pytest.mark.parametrize("gate", ["attention", "softmax"])
@pytest.mark.parametrize("kind", ["per_task", "per_row", "expanded"])
def test_masks(kind, gate, device):
    batch, experts, in_features, dim, tasks = 13, 6, 16, 24, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    mask = _mask(kind, batch, tasks, experts, device)
    y, p = compare(x, weight, bias, torch.float32, mask=mask, **gate_inputs(gate, batch, experts, dim, tasks))
    if kind == "per_task":
        assert torch.all(y[:, 0] == 0) and torch.all(p[:, 0] == 0)


@pytest.mark.parametrize("gate", ["attention", "softmax"])
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_top_k(top_k, gate, device):
    batch, experts, in_features, dim, tasks = 12, 5, 16, 40, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    mask = _mask("per_row", batch, tasks, experts, device)
    _, p = compare(x, weight, bias, torch.float32, top_k=top_k, mask=mask, **gate_inputs(gate, 12, 5, 40, 3))
    assert ((p != 0).sum(-1) <= top_k).all()


def test_top_k_ties_go_to_the_lowest_expert(device):
    x, weight = torch.ones(2, 4, device=device), torch.ones(4, 4, 8, device=device)  # every expert alike
    with torch.no_grad():
        _, p = fg.experts_mix(x, weight, context=torch.ones(1, 8, device=device), top_k=2, return_weights=True)
    torch.testing.assert_close(p, torch.tensor([[[0.5, 0.5, 0.0, 0.0]]] * 2, device=device))


def test_scale_and_temperature(device):
    x, weight, bias = make_layer(7, 4, 12, 10, device=device)
    compare(x, weight, bias, torch.float32, scale=0.37, **gate_inputs("attention", 7, 4, 10, 2))
    compare(x, weight, bias, torch.float32, temperature=2.5, **gate_inputs("softmax", 7, 4, 10, 2))


def test_special_values(device):
    """-inf excludes like the mask; +inf / NaN scores make the row NaN; weight-0 experts add nothing."""
    x, weight, bias = make_layer(4, 3, 8, 6, device=device)
    logits = torch.randn(4, 2, 3, device=device)
    logits[0, 0, 1] = -INF  # excluded
    logits[1, 0, 2] = INF  # row NaN
    logits[2, 1, 0] = NAN  # row NaN
    logits[3, :, 2] = -INF  # expert 2, whose H is NaN in every row, excluded for row 3
    weight[2, 0, 0] = NAN
    with torch.no_grad():
        y, p = fg.experts_mix(x, weight, bias, gate="softmax", logits=logits, return_weights=True)
    yr, pr = fg.reference.experts_mix(
        x.double(), weight.double(), bias.double(), gate="softmax", logits=logits.double(), return_weights=True
    )
    assert torch.equal(y.isnan(), yr.isnan()) and torch.equal(p.isnan(), pr.isnan())
    assert y[1, 0].isnan().all() and y[2, 1].isnan().all() and not y[3].isnan().any()
    assert p[0, 0, 1] == 0 and p[3, :, 2].eq(0).all()
    finite = yr.isfinite()
    assert_matches(y[finite], yr[finite], torch.float32, "Y")


def test_non_finite_expert_output_makes_the_attention_row_nan(device):
    x, weight, bias = make_layer(5, 3, 8, 6, device=device)
    x[2, 4] = NAN
    context = torch.randn(2, 6, device=device)
    with torch.no_grad():
        y = fg.experts_mix(x, weight, bias, context=context)
    assert y[2].isnan().all() and not y[[0, 1, 3, 4]].isnan().any()
    mask = torch.tensor([[True, False, False], [False, True, True]], device=device)
    x[2, 4], weight[1, :, 0] = 0.0, INF  # expert 1 scores NaN/inf, but task 0 does not use it
    with torch.no_grad():
        y, p = fg.experts_mix(x, weight, bias, context=context, mask=mask, return_weights=True)
    assert not y[:, 0].isnan().any() and y[:, 1].isnan().all()
    assert p[:, 0, 1].eq(0).all() and p[:, 1].isnan().all()


def test_two_step_path_gives_the_same_output(device):
    """The experts as MMoE writes them, then the fused gate: the same Y (float32)."""
    x, weight, bias = make_layer(10, 4, 16, 12, device=device)
    context = torch.randn(3, 12, device=device)
    with torch.no_grad():
        h = torch.relu(torch.einsum("bk,ekd->bed", x, weight) + bias)
        torch.testing.assert_close(fg.experts_mix(x, weight, bias, context=context), fg.attention_mix(h, context))


def test_empty_batch(device):
    x, weight, bias = make_layer(0, 3, 8, 6, device=device)
    with torch.no_grad():
        y, p = fg.experts_mix(x, weight, bias, context=torch.randn(2, 6, device=device), return_weights=True)
    assert y.shape == (0, 2, 6) and p.shape == (0, 2, 3)


def test_one_launch_and_no_expert_output_written(monkeypatch, device):
    counter = LaunchCounter(monkeypatch, kernel.experts_mix_one_pass_kernel, kernel.experts_mix_two_pass_kernel)
    batch, experts, in_features, dim, tasks = 40, 4, 16, 24, 2
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    with torch.no_grad(), count_traffic() as launches:
        y = fg.experts_mix(x, weight, bias, context=torch.randn(tasks, dim, device=device))
    assert counter.total() == 1 and len(launches) == 1
    # Everything stored is Y: nothing of size B * E * D.
    assert launches[0].stored == launches[0].unique_stored == y.numel() * y.element_size()


def test_unused_experts_cost_no_matmul(monkeypatch, device):
    """A mask that leaves expert 1 to no task: its weight is never read."""
    x, weight, bias = make_layer(20, 3, 16, 8, device=device)
    logits = torch.randn(20, 2, 3, device=device)
    mask = torch.tensor([[True, False, True], [True, False, False]], device=device)
    with torch.no_grad(), count_traffic() as launches:
        fg.experts_mix(x, weight, bias, gate="softmax", logits=logits, mask=mask)
    read = launches[0].by_operand["w_ptr"].unique_loaded
    assert read == 2 * 16 * 8 * 4  # experts 0 and 2, float32


ERROR_CASES = [
    # (changes to the valid inputs, exception, message fragment)
    ({"x": torch.randn(4)}, ValueError, "x must be [B, K]"),
    ({"x": torch.randn(4, 3, 8)}, ValueError, "x must be [B, K]"),
    ({"x": torch.randn(4, 9)}, ValueError, "K = 8 from weight"),
    ({"weight": torch.randn(2, 8)}, ValueError, "weight must be 3-D [E, K, D]"),
    ({"x": torch.randn(4, 8).half()}, TypeError, "must have the same dtype"),
    ({"bias": torch.randn(6)}, ValueError, "bias must be None or [E, D]"),
    ({"activation": "softplus"}, ValueError, "activation must be one of"),
    ({"gate": "linear"}, ValueError, "gate must be one of"),
    ({"context": None}, ValueError, "gate='attention' needs context"),
    ({"context": torch.randn(2, 7)}, ValueError, "context has D = 7 but x and weight has D = 6"),
    ({"logits": torch.randn(4, 2, 2)}, ValueError, "logits and temperature belong to gate='softmax'"),
    ({"gate": "softmax"}, ValueError, "context and scale belong to gate='attention'"),
    ({"gate": "softmax", "context": None}, ValueError, "gate='softmax' needs logits"),
    ({"gate": "softmax", "context": None, "logits": torch.randn(4, 2, 3)}, ValueError, "E = 2 from x and weight"),
    ({"gate": "softmax", "context": None, "logits": torch.randn(4, 2, 2), "temperature": 0.0}, ValueError, "finite"),
    ({"scale": -1.0}, ValueError, "scale must be a finite positive"),
    ({"mask": torch.ones(2, 3, dtype=torch.bool)}, ValueError, "mask must have shape"),
    ({"top_k": 3}, ValueError, "top_k must be in 1..E"),
    ({"context": torch.randn(16, 6), "weight": torch.randn(64, 8, 6)}, ValueError, f"<= {MIX_MAX_GATE}"),
]


@pytest.mark.parametrize(("changes", "exc", "message"), ERROR_CASES)
def test_rejects(changes, exc, message, device):
    inputs = dict(zip(("x", "weight", "bias"), make_layer(4, 2, 8, 6, device=device), strict=True))
    inputs["context"] = torch.randn(2, 6)
    inputs.update(changes)
    if "weight" in changes:
        inputs["bias"] = None
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad(), pytest.raises(exc, match=message.replace("[", r"\[").replace(".", r"\.")):
        fg.experts_mix(**inputs)


def test_fallback_runs_the_reference(monkeypatch, device):
    """Off the kernel path (CPU without the interpreter) the op is the reference itself."""
    monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
    x, weight, bias = make_layer(5, 3, 8, 6, dtype=torch.float64, device=device)
    context = torch.randn(2, 6, dtype=torch.float64, device=device)
    y = fg.experts_mix(x, weight, bias, context=context, top_k=2)
    assert torch.equal(y, fg.reference.experts_mix(x, weight, bias, context=context, top_k=2))


@given(
    batch=st.integers(1, 20),
    experts=st.integers(1, 9),
    in_features=st.integers(1, 40),
    dim=st.integers(1, 40),
    tasks=st.integers(1, 4),
    gate=st.sampled_from(["attention", "softmax"]),
    per_expert=st.booleans(),
    use_top_k=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_matches_reference(batch, experts, in_features, dim, tasks, gate, per_expert, use_top_k, seed, device):
    x, weight, bias = make_layer(batch, experts, in_features, dim, per_expert=per_expert, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(tasks, experts, generator=gen) > 0.3).to(device)
    top_k = 1 + seed % experts if use_top_k else None
    inputs = gate_inputs(gate, batch, experts, dim, tasks, device=device, seed=seed + 1)
    compare(x, weight, bias, torch.float32, mask=mask, top_k=top_k, **inputs)


def test_one_graph_node_under_torch_compile(device):
    """A custom op with a fake kernel: ``torch.compile(fullgraph=True)`` traces through it."""
    x, weight, bias = make_layer(9, 3, 16, 8, device=device)
    context = torch.randn(2, 8, device=device)

    def layer(x, weight, bias, context):
        return fg.experts_mix(x, weight, bias, context=context, activation="tanh") * 2.0

    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, weight, bias, context), layer(x, weight, bias, context))


@pytest.mark.parametrize("gate", ["attention", "softmax"])
def test_far_experts_are_read_at_their_address(gate, device):
    """Weights and per-expert inputs stored expert-major 2**28 elements apart: expert 8 starts past 2**31."""
    batch, experts, in_features, dim, tasks = 3, 9, 4, 5, 2
    x, weight, bias = make_layer(batch, experts, in_features, dim, per_expert=True, dtype=torch.bfloat16)
    far_x = far_view(x, (in_features, 2**28, 1), 64, device)
    far_weight = far_view(weight, (2**28, dim, 1), 64, device)
    inputs = gate_inputs(gate, batch, experts, dim, tasks, dtype=torch.bfloat16, device=device)
    compare(far_x, far_weight, bias.to(device), torch.bfloat16, **inputs)


def test_attention_without_top_k_runs_one_pass():
    """The tile spans D (<= 256) for the attention gate without top-k: one pass, an online softmax."""
    x, weight, bias = make_layer(40, 8, 32, 200)
    context = torch.randn(2, 200)
    launches = {
        top_k: kernel.plan_experts_mix(x, weight, bias, context, None, 0.1, top_k, gate="attention",
                                       activation="relu", return_weights=False).launches[0]
        for top_k in (None, 3)
    }  # fmt: skip
    assert launches[None].kernel is kernel.experts_mix_one_pass_kernel and launches[None].meta["BLOCK_D"] >= 200
    assert launches[3].kernel is kernel.experts_mix_two_pass_kernel
    assert experts_mix_config(8, 32, 512, 2, one_pass=True).block_d < 512  # wider D: two passes


@pytest.mark.parametrize("case", ["plain", "mask", "special"])
def test_one_pass_equals_two_passes(case, device):
    """The online softmax and the two-pass kernel (forced by a D chunk narrower than D) agree, masks and
    special values (an all -inf row, a +inf score, a NaN expert behind the mask) included."""
    batch, experts, in_features, dim, tasks = 37, 5, 24, 48, 3
    x, weight, bias = make_layer(batch, experts, in_features, dim, device=device)
    context = torch.randn(tasks, dim, device=device)
    mask = None
    if case != "plain":
        mask = _mask("per_row", batch, tasks, experts, device)
    if case == "special":
        x[3] = NAN  # every expert of row 3 scores NaN: NaN rows where any expert is allowed
        context[1, 0] = INF  # task 1 scores +-inf or NaN on every row
        mask[5] = False  # row 5: no allowed expert, p = 0 and Y = 0
    one = experts_mix_config(experts, in_features, dim, tasks, 4, one_pass=True)
    two = dataclasses.replace(one, block_d=16)
    outs = []
    for cfg in (one, two):
        plan = kernel.plan_experts_mix(
            x, weight, bias, context, mask, dim**-0.5, None, gate="attention", activation="tanh",
            return_weights=True, config=cfg,
        )  # fmt: skip
        one_pass = plan.launches[0].kernel is kernel.experts_mix_one_pass_kernel
        assert one_pass == (cfg is one)
        outs.append(plan.run())
    torch.testing.assert_close(outs[0][0], outs[1][0], equal_nan=True)
    torch.testing.assert_close(outs[0][1], outs[1][1], equal_nan=True)
    if case == "special":
        assert outs[0][0][3].isnan().any() and (outs[0][0][5] == 0).all()
