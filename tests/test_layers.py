"""MMoE / PLE / SoftmaxGate against loop-based twins: plain PyTorch, one expert, gate and tower at a time.

The twins read the modules' parameters and compute in float64 with Python loops over the experts, gates
and tasks, their own activations and BatchNorm (batch statistics in train mode, running ones in eval
mode); the gate mix is ``fused_gate.reference``'s. The layers run through the Triton kernels
(interpreted without a GPU) and through the reference fallback.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fused_gate as fg
import fused_gate.ops
from fused_gate.experts import BatchedDense, BatchedMLP, Experts
from fused_gate.layers import CGCLevel

from .conftest import assert_matches

ACTIVATION_TWINS = {
    "relu": lambda y: y.clamp_min(0),
    "sigmoid": lambda y: 1 / (1 + torch.exp(-y)),
    "tanh": lambda y: (torch.exp(y) - torch.exp(-y)) / (torch.exp(y) + torch.exp(-y)),
    "leaky_relu": lambda y: torch.where(y > 0, y, 0.01 * y),
    "identity": lambda y: y,
}


class Twin:
    """The float64 loop twin of one layer call; ``running`` collects the BatchNorm statistics a train-mode
    forward must leave (``name -> expected tensor``), from the buffers as they were before it."""

    def __init__(self, model: torch.nn.Module, training: bool):
        self.training = training
        self.names = {id(m): n for n, m in model.named_modules()}
        self.running: dict[str, torch.Tensor] = {}

    def batch_norm(self, bn, channels: slice, y):
        mean, var = bn.running_mean[channels].double(), bn.running_var[channels].double()
        if self.training:
            batch_mean, batch_var = y.mean(0), y.var(0, unbiased=False)
            m = bn.momentum  # torch's running variance is the unbiased one
            self._record(bn, channels, (1 - m) * mean + m * batch_mean.detach(), (1 - m) * var + m * y.var(0).detach())
            mean, var = batch_mean, batch_var
        return (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[channels].double() + bn.bias[channels].double()

    def _record(self, bn, channels, new_mean, new_var):
        name = self.names[id(bn)]
        for key, value, buffer in (
            ("running_mean", new_mean, bn.running_mean),
            ("running_var", new_var, bn.running_var),
        ):
            full = self.running.setdefault(f"{name}.{key}", buffer.detach().double().clone())
            full[channels] = value

    def linear(self, layer, xs):
        """G inputs ``[B, in]`` -> G outputs ``[B, out]``, one matmul per group."""
        outs = []
        for g, x in enumerate(xs):
            y = x @ layer.weight[g].double()
            outs.append(y if layer.bias is None else y + layer.bias[g].double())
        return outs

    def dense(self, layer: BatchedDense, xs):
        assert layer.dropout == 0 or not self.training, "the twin compares dropout-free training steps"
        outs = self.linear(layer, xs)
        if layer.batch_norm is not None:
            width = layer.out_features
            outs = [self.batch_norm(layer.batch_norm, slice(g * width, (g + 1) * width), y) for g, y in enumerate(outs)]
        return [ACTIVATION_TWINS[layer.activation](y) for y in outs]

    def mlp(self, mlp: BatchedMLP, xs):
        for layer in mlp.layers:
            xs = self.dense(layer, xs)
        return xs

    def gate(self, gate, xs, h):
        """``xs``: one input per gate; ``h [B, E, D]``."""
        if isinstance(gate, fg.AttentionMix):
            return fg.reference.attention_mix(h, gate.context.double(), mask=gate.mask, top_k=gate.top_k)
        if isinstance(gate, fg.InputQueryAttentionMix):
            queries = torch.stack(self.linear(gate.query, xs), dim=1)  # [B, T, D]: one query per row and task
            return fg.reference.attention_mix(h, queries, mask=gate.mask, top_k=gate.top_k)
        z = self.linear(gate.linear, self.mlp(gate.dnn, xs) if gate.dnn is not None else xs)
        if gate.batch_norm is not None:
            e = gate.num_experts
            z = [self.batch_norm(gate.batch_norm, slice(g * e, (g + 1) * e), y) for g, y in enumerate(z)]
        logits = torch.stack(z, dim=1)
        return fg.reference.softmax_mix(logits, h, mask=gate.mask, top_k=gate.top_k, temperature=gate.temperature)

    def towers(self, towers, y):
        zs = list(y.unbind(1))
        if towers.hidden is not None:
            zs = self.mlp(towers.hidden, zs)
        return torch.cat(self.linear(towers.output, zs), dim=1)

    def experts(self, experts: Experts, xs):
        return torch.stack(self.mlp(experts, xs), dim=1)

    def mmoe(self, model: fg.MMoE, x):
        h = self.experts(model.experts, [x] * model.num_experts)
        y = self.gate(model.gate, [x] * model.num_tasks, h)
        return self.towers(model.towers, y) if model.towers is not None else y

    def cgc(self, level: CGCLevel, inputs):
        h = self.experts(level.experts, [inputs[:, g] for g in level.group.tolist()])
        return self.gate(level.gate, [inputs[:, g] for g in range(level.num_gates)], h)

    def ple(self, model: fg.PLE, x):
        out = x[:, None, :].expand(x.shape[0], model.num_tasks + 1, x.shape[1])
        for level in model.levels:
            out = self.cgc(level, out)
        return self.towers(model.towers, out) if model.towers is not None else out


@pytest.fixture(params=["kernels", "reference"])
def gate_path(request, monkeypatch):
    """The fused mixes through the Triton kernels or through the reference fallback."""
    if request.param == "reference":
        monkeypatch.setattr(fused_gate.ops, "uses_kernels", lambda x: False)
    return request.param


def _randomize_batch_norms(model, seed=1):
    """BatchNorm statistics and affine parameters away from (0, 1), so eval mode differs from train mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def compare(model, twin_method: str, x, *, training: bool):
    """One forward and backward of ``model`` against its twin: output, dx, every parameter gradient and,
    in train mode, the BatchNorm running statistics."""
    model.train(training)
    twin = Twin(model, training)
    model.zero_grad()
    xr = x.double().clone().requires_grad_()
    ref = getattr(twin, twin_method)(model, xr)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (ref * g).sum().backward()
    params = dict(model.named_parameters())
    want = {n: p.grad.clone() for n, p in params.items()}

    model.zero_grad()
    xk = x.clone().requires_grad_()
    out = model(xk)
    (out * g.to(out.device, out.dtype)).sum().backward()
    assert out.shape == ref.shape
    assert_matches(out, ref, torch.float32, "output")
    assert_matches(xk.grad, xr.grad, torch.float32, "dx")
    for name, p in params.items():
        assert_matches(p.grad, want[name], torch.float32, name)
    buffers = dict(model.named_buffers())
    for name, expected in twin.running.items():
        assert_matches(buffers[name], expected, torch.float32, name)
    return out


# name -> (options, the gate kinds they apply to); dropout is exercised by test_dropout_* below.
MMOE_CONFIGS = {
    "one_layer": (dict(), ("attention", "softmax", "attention_input_query")),
    "deep_bn": (
        dict(expert_hidden=(8, 6), batch_norm=True, activation="tanh", tower_hidden=(5, 4)),
        ("attention", "softmax", "attention_input_query"),
    ),
    # the input-query gate's Linears without bias (c_t(x) = x W_t), sparse
    "query_no_bias": (dict(gate_bias=False, top_k=2, tower_hidden=3), ("attention_input_query",)),
    # DeepCTR-Torch's MMOE: gate DNN, gate Linear without bias, tower output without bias
    "gate_dnn": (
        dict(
            expert_hidden=(9, 6),
            gate_hidden=(7,),
            gate_bias=False,
            batch_norm=True,
            tower_hidden=(4,),
            tower_bias=False,
        ),
        ("softmax",),
    ),
    # torch-rechub's MMOE: BatchNorm on the gate logits, towers with their own activation
    "gate_bn": (
        dict(gate_batch_norm=True, batch_norm=True, tower_hidden=(), tower_activation="sigmoid", top_k=3),
        ("softmax",),
    ),
    "leaky_sigmoid": (
        dict(activation="leaky_relu", tower_hidden=3, tower_activation="sigmoid", tower_batch_norm=True),
        ("attention",),
    ),
}
CASES = [(name, gate) for name, (_, gates) in MMOE_CONFIGS.items() for gate in gates]


def build_mmoe(name, gate, device):
    options = dict(MMOE_CONFIGS[name][0])
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, options.pop("expert_hidden", 8), 3, gate=gate, **options).to(device)
    _randomize_batch_norms(model)
    return model


def build_ple(name, gate, device, levels=2):
    options = dict(MMOE_CONFIGS[name][0])
    options.pop("top_k", None)
    torch.manual_seed(0)
    model = fg.PLE(10, 2, 2, 1, options.pop("expert_hidden", 8), num_levels=levels, gate=gate, **options).to(device)
    _randomize_batch_norms(model)
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "gate"), CASES)
def test_mmoe_matches_twin(name, gate, training, gate_path, device):
    compare(build_mmoe(name, gate, device), "mmoe", torch.randn(7, 10, device=device), training=training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "gate"), CASES)
def test_ple_matches_twin(name, gate, training, gate_path, device):
    compare(build_ple(name, gate, device), "ple", torch.randn(6, 10, device=device), training=training)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("towers", [None, 4])
@pytest.mark.parametrize("gate", fg.layers.GATES)
def test_mmoe_positional_api(gate, towers, top_k, device):
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, 8, 3, gate=gate, top_k=top_k, tower_hidden=towers).to(device)
    out = compare(model, "mmoe", torch.randn(7, 10, device=device), training=True)
    assert out.shape == ((7, 3) if towers else (7, 3, 8))


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("gate", fg.layers.GATES)
def test_ple_levels(gate, levels, device):
    torch.manual_seed(0)
    model = fg.PLE(10, 2, 2, 1, 8, num_levels=levels, gate=gate, tower_hidden=3).to(device)
    compare(model, "ple", torch.randn(6, 10, device=device), training=True)


@pytest.mark.parametrize("layer", ["mmoe", "ple"])
@pytest.mark.parametrize(("name", "gate"), [("deep_bn", "attention"), ("gate_dnn", "softmax")])
def test_batch_of_one_and_zero(layer, name, gate, device):
    """B = 1 (eval: BatchNorm cannot train on one row, as in torch) matches the twin; B = 0 keeps the batch
    dimension and backpropagates in train and eval mode."""
    model = (build_mmoe if layer == "mmoe" else build_ple)(name, gate, device)
    out = compare(model, layer, torch.randn(1, 10, device=device), training=False)
    assert out.shape == (1, 3 if layer == "mmoe" else 2)
    for training in (True, False):
        model.train(training)
        x = torch.randn(0, 10, device=device, requires_grad=True)
        out = model(x)
        assert out.shape == (0, 3 if layer == "mmoe" else 2)
        out.sum().backward()
        assert x.grad.shape == (0, 10)


def test_dropout_masks_each_expert_independently(device):
    """Train mode drops each (row, expert, unit) on its own with probability p and scales the rest by
    1 / (1 - p); eval mode applies no dropout."""
    torch.manual_seed(0)
    p = 0.4
    experts = Experts(6, 4, 32, activation="identity", dropout=p).to(device)
    x = torch.randn(256, 6, device=device)
    experts.eval()
    full = experts(x)
    experts.train()
    dropped = experts(x)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], full[kept] / (1 - p))
    assert abs(1 - kept.double().mean().item() - p) < 0.02
    per_expert = (~kept).double().mean(dim=(0, 2))
    assert torch.all((per_expert - p).abs() < 0.04), per_expert
    assert not torch.equal(kept[:, 0], kept[:, 1])


def test_dropout_reaches_gate_dnn_and_towers(device):
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, 8, 3, gate="softmax", gate_hidden=(16,), tower_hidden=(16,), tower_dropout=0.5).to(device)
    model.train()
    x = torch.randn(64, 10, device=device)
    assert model.towers.hidden.layers[0].dropout == 0.5 and model.gate.dnn.layers[0].dropout == 0.0
    first, second = model(x), model(x)
    assert not torch.equal(first, second)  # the towers' dropout draws new masks
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_experts_last_layer_exposes_weight_bias_and_activation():
    experts = Experts(10, 4, (16, 8), activation="sigmoid")
    last = experts.layers[-1]
    assert last.weight.shape == (4, 16, 8) and last.bias.shape == (4, 8) and last.activation == "sigmoid"
    assert fg.MMoE(10, 4, (16, 8), 3).out_features == 8


def test_cgc_mask_gives_each_task_shared_and_own_experts():
    level = fg.PLE(4, 3, 2, 1, 5, num_levels=2).levels[0]
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 1, 0, 0, 1],
            [1, 1, 1, 1, 1],  # the shared gate of a non-final level mixes every expert
        ],
        dtype=torch.bool,
    )
    assert torch.equal(level.gate.mask, expected)


def test_one_gate_call_for_every_kind(device):
    """``gate.mix(x, h)`` is the layers' only gate call: AttentionMix ignores x, the other gates read it."""
    torch.manual_seed(0)
    h = torch.randn(5, 3, 4, device=device)
    x = torch.randn(5, 6, device=device)
    attention = fg.AttentionMix(2, 4).to(device)
    torch.testing.assert_close(attention.mix(x, h), attention(h))
    softmax = fg.SoftmaxGate(6, 2, 3).to(device)
    torch.testing.assert_close(softmax.mix(x, h), softmax(x, h))
    input_query = fg.InputQueryAttentionMix(6, 2, 4).to(device)
    torch.testing.assert_close(input_query.mix(x, h), input_query(x, h))


@pytest.mark.parametrize("per_gate_input", [False, True], ids=["shared_input", "input_per_gate"])
def test_input_query_gate_module(per_gate_input, device):
    """Each row's query is ``x W_t + b_t``: the gate equals attention_mix with that per-row context, weights
    included, and its gradient reaches the query Linears through both outputs."""
    torch.manual_seed(0)
    gate = fg.InputQueryAttentionMix(6, 2, 5, scale=0.7).to(device)
    x = torch.randn(4, 2, 6, device=device) if per_gate_input else torch.randn(4, 6, device=device)
    h = torch.randn(4, 3, 5, device=device)
    y, p = gate(x, h, return_weights=True)
    xs = x.unbind(1) if per_gate_input else (x, x)
    queries = torch.stack([xs[t] @ gate.query.weight[t] + gate.query.bias[t] for t in range(2)], dim=1)
    y_ref, p_ref = fg.reference.attention_mix(h, queries, scale=0.7, return_weights=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(p, p_ref)
    (y.sum() + p[..., 0].sum()).backward()
    assert gate.query.weight.grad.abs().sum() > 0 and gate.query.bias.grad.abs().sum() > 0


def test_softmax_gate_module(device):
    torch.manual_seed(0)
    gate = fg.SoftmaxGate(6, 2, 3, temperature=0.5).to(device)
    x = torch.randn(4, 6, device=device)
    h = torch.randn(4, 3, 5, device=device)
    y, p = gate(x, h, return_weights=True)
    logits = torch.stack([x @ gate.linear.weight[t] + gate.linear.bias[t] for t in range(2)], dim=1)
    y_ref, p_ref = fg.reference.softmax_mix(logits, h, temperature=0.5, return_weights=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(p, p_ref)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["mmoe", "ple"])
def test_compile_fullgraph_dynamic_batch(layer, device):
    """Experts, gate DNN, BatchNorms and towers compile into one graph reused for every batch size."""
    model = (build_mmoe if layer == "mmoe" else build_ple)("gate_dnn", "softmax", device)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for batch in (8, 11, 13):
        x = torch.randn(batch, 10, device=device)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1, f"recompiled for new batch sizes: {counter.frame_count} frames"


def test_compile_with_symbolic_floats(device):
    """``dynamic=True`` traces Python floats symbolically too: the softmax gate's temperature is then
    validated with comparisons that torch.compile can trace (``math.isfinite`` cannot)."""
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, 8, 3, gate="softmax", tower_hidden=4).to(device)
    model.gate.temperature = 0.7
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    x = torch.randn(6, 10, device=device)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: fg.MMoE(4, 2, 3, 2, gate="linear"), "gate must be one of"),
        (lambda: fg.PLE(4, 2, 1, 1, 3, num_levels=0), "num_levels"),
        (lambda: fg.MMoE(4, 2, (3, 0), 2), "expert_hidden must be an int >= 1"),
        (lambda: fg.PLE(4, 2, 1, 1, ()), "expert_hidden must be"),
        (lambda: fg.MMoE(4, 2, 3, 2, gate="softmax", gate_hidden=(2.5,)), "gate_hidden must be"),
        (lambda: fg.MMoE(4, 2, 3, 2, activation="gelu"), "activation must be one of"),
        (lambda: fg.MMoE(4, 2, 3, 2, dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
        (lambda: fg.MMoE(4, 2, 3, 2, tower_hidden=(2,), tower_dropout=-0.1), "dropout must be"),
        (lambda: fg.MMoE(4, 2, 3, 2, tower_hidden="4"), "tower_hidden must be"),
        (lambda: fg.MMoE(4, 2, 3, 2, gate="attention", gate_hidden=(4,)), "attention gate has none"),
        (lambda: fg.PLE(4, 2, 1, 1, 3, gate="attention", gate_batch_norm=True), "attention gate has none"),
        (lambda: fg.MMoE(4, 2, 3, 2, gate="attention_input_query", gate_hidden=(4,)), "query Linear per task"),
        (lambda: fg.PLE(4, 2, 1, 1, 3, gate="attention_input_query", gate_batch_norm=True), "query Linear"),
        (lambda: fg.InputQueryAttentionMix(4, 0, 3), "num_tasks must be >= 1"),
        (lambda: fg.InputQueryAttentionMix(4, 2, 3, scale=-1.0), "scale must be a finite positive number"),
        (lambda: fg.InputQueryAttentionMix(4, 2, 3, mask=torch.ones(3, 2, dtype=torch.bool)), "mask must have shape"),
    ],
)
def test_rejects_bad_options(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_rejects_bad_option_types():
    with pytest.raises(TypeError, match="in_features must be an int, got float"):
        fg.InputQueryAttentionMix(4.0, 2, 3)
    with pytest.raises(TypeError, match="top_k must be an int or None"):
        fg.InputQueryAttentionMix(4, 2, 3, top_k="2")


@pytest.mark.parametrize("shape", [(4, 3, 6), (4, 5)], ids=["wrong_T", "wrong_in_features"])
@pytest.mark.parametrize("kind", ["SoftmaxGate", "InputQueryAttentionMix"])
def test_gates_reject_wrong_input_shape(kind, shape):
    gate = fg.SoftmaxGate(6, 2, 3) if kind == "SoftmaxGate" else fg.InputQueryAttentionMix(6, 2, 5)
    with pytest.raises(ValueError, match=r"x must have shape \[B, in_features\] or \[B, T, in_features\]"):
        gate(torch.randn(shape), torch.randn(4, 3, 5))
