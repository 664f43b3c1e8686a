"""MMoE / PLE / SoftmaxGate against loop models: plain PyTorch, one expert, gate and tower at a time.

The loop models read the modules' parameters and compute in float64 with Python loops over the experts, gates
and tasks, their own activations and BatchNorm (batch statistics in train mode, running ones in eval
mode); the gate mix is ``fused_gate.reference``'s. The layers run through the Triton kernels
(interpreted without a GPU) and through the reference fallback.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fused_gate as fg
import fused_gate.dispatch
from fused_gate.experts import BatchedDense, BatchedMLP, Experts
from fused_gate.kernels import experts_mix, gate_mix_fwd
from fused_gate.layers import CGCLevel

from .conftest import assert_matches
from .test_attention_mix import LaunchCounter

LOOP_ACTIVATIONS = {
    "relu": lambda y: y.clamp_min(0),
    "sigmoid": lambda y: 1 / (1 + torch.exp(-y)),
    "tanh": lambda y: (torch.exp(y) - torch.exp(-y)) / (torch.exp(y) + torch.exp(-y)),
    "leaky_relu": lambda y: torch.where(y > 0, y, 0.01 * y),
    "gelu": lambda y: 0.5 * y * (1 + torch.erf(y / 2**0.5)),
    "silu": lambda y: y / (1 + torch.exp(-y)),
    "identity": lambda y: y,
}


class LoopModel:
    """The float64 loop model of one layer call; ``running`` collects the BatchNorm statistics a train-mode
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
        assert layer.dropout == 0 or not self.training, "the loop model compares dropout-free training steps"
        outs = self.linear(layer, xs)
        if layer.batch_norm is not None:
            width = layer.out_features
            outs = [self.batch_norm(layer.batch_norm, slice(g * width, (g + 1) * width), y) for g, y in enumerate(outs)]
        return [LOOP_ACTIVATIONS[layer.activation](y) for y in outs]

    def mlp(self, mlp: BatchedMLP, xs):
        for layer in mlp.layers:
            xs = self.dense(layer, xs)
        return xs

    def gate(self, gate, xs, h, mask=None):
        """``xs``: one input per gate; ``h [B, E, D]``; ``mask``: the experts each gate mixes (default the gate's)."""
        mask = gate.mask if mask is None else mask
        if isinstance(gate, fg.AttentionMix):
            return fg.reference.attention_mix(h, gate.context.double(), mask=mask, top_k=gate.top_k)
        if isinstance(gate, fg.InputQueryAttentionMix):
            queries = torch.stack(self.linear(gate.query, xs), dim=1)  # [B, T, D]: one query per row and task
            return fg.reference.attention_mix(h, queries, mask=mask, top_k=gate.top_k)
        z = self.linear(gate.linear, self.mlp(gate.dnn, xs) if gate.dnn is not None else xs)
        if gate.batch_norm is not None:
            e = gate.num_experts
            z = [self.batch_norm(gate.batch_norm, slice(g * e, (g + 1) * e), y) for g, y in enumerate(z)]
        logits = torch.stack(z, dim=1)
        return fg.reference.softmax_mix(logits, h, mask=mask, top_k=gate.top_k, temperature=gate.temperature)

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

    @staticmethod
    def cgc_mask(level: CGCLevel, num_tasks: int, shared_gate: bool):
        """The CGC layout written out: task t's gate mixes the shared experts (those reading input T) and t's
        own; the shared gate every expert, or only the shared ones with ``shared_gate_experts="shared"``."""
        rows = [[g in (t, num_tasks) for g in level.group.tolist()] for t in range(num_tasks)]
        if shared_gate:
            rows.append([level.shared_gate_experts == "all" or g == num_tasks for g in level.group.tolist()])
        return torch.tensor(rows)

    def cgc(self, level: CGCLevel, inputs, num_tasks: int, shared_gate: bool):
        h = self.experts(level.experts, [inputs[:, g] for g in level.group.tolist()])
        mask = self.cgc_mask(level, num_tasks, shared_gate).to(h.device)
        return self.gate(level.gate, [inputs[:, g] for g in range(num_tasks + shared_gate)], h, mask)

    def ple(self, model: fg.PLE, x):
        out = x[:, None, :].expand(x.shape[0], model.num_tasks + 1, x.shape[1])
        for i, level in enumerate(model.levels):
            out = self.cgc(level, out, model.num_tasks, shared_gate=i < len(model.levels) - 1)
        return self.towers(model.towers, out) if model.towers is not None else out


@pytest.fixture(params=["kernels", "reference"])
def gate_path(request, monkeypatch):
    """The fused mixes through the Triton kernels or through the reference fallback."""
    if request.param == "reference":
        monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
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


def compare(model, loop_method: str, x, *, training: bool):
    """One forward and backward of ``model`` against its loop model: output, dx, every parameter gradient
    and, in train mode, the BatchNorm running statistics."""
    model.train(training)
    loop_model = LoopModel(model, training)
    model.zero_grad()
    xr = x.double().clone().requires_grad_()
    ref = getattr(loop_model, loop_method)(model, xr)
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
    for name, expected in loop_model.running.items():
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
    # every activation the kernels support is a layer option, gelu and silu included
    "gelu_silu": (dict(activation="gelu", tower_hidden=3, tower_activation="silu"), ("softmax",)),
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
def test_mmoe_matches_loop_model(name, gate, training, gate_path, device):
    compare(build_mmoe(name, gate, device), "mmoe", torch.randn(7, 10, device=device), training=training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "gate"), CASES)
def test_ple_matches_loop_model(name, gate, training, gate_path, device):
    compare(build_ple(name, gate, device), "ple", torch.randn(6, 10, device=device), training=training)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("towers", [None, 4])
@pytest.mark.parametrize("gate", fg.layers.LAYER_GATES)
def test_mmoe_positional_api(gate, towers, top_k, device):
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, 8, 3, gate=gate, top_k=top_k, tower_hidden=towers).to(device)
    out = compare(model, "mmoe", torch.randn(7, 10, device=device), training=True)
    assert out.shape == ((7, 3) if towers else (7, 3, 8))


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("gate", fg.layers.LAYER_GATES)
def test_ple_levels(gate, levels, device):
    torch.manual_seed(0)
    model = fg.PLE(10, 2, 2, 1, 8, num_levels=levels, gate=gate, tower_hidden=3).to(device)
    compare(model, "ple", torch.randn(6, 10, device=device), training=True)


@pytest.mark.parametrize("layer", ["mmoe", "ple"])
@pytest.mark.parametrize(("name", "gate"), [("deep_bn", "attention"), ("gate_dnn", "softmax")])
def test_batch_of_one_and_zero(layer, name, gate, device):
    """B = 1 (eval: BatchNorm cannot train on one row, as in torch) matches the loop model; B = 0 keeps the batch
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


def test_dropout_gradient_is_the_mask(device):
    """The gradient through dropout is the upstream one where the entry was kept, scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    p = 0.3
    layer = BatchedDense(5, 16, 3, activation="identity", dropout=p).to(device).train()
    y = layer(torch.randn(64, 3, 5, device=device))
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    kept = (y != 0).to(y.dtype)
    torch.testing.assert_close(layer.bias.grad, (grad_y * kept / (1 - p)).sum(0))


@pytest.mark.parametrize("per_group_input", [False, True])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_eval_batch_norm_folded_into_the_matmul(per_group_input, activation, device):
    """In eval mode the layer folds its BatchNorm into the matmul: the same output and gradients as the
    BatchNorm module applied after it; a BatchNorm with a forward hook is called as a module instead."""
    torch.manual_seed(0)
    layer = BatchedDense(5, 4, 3, activation=activation, batch_norm=True).to(device)
    bn = layer.batch_norm
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(), bn.bias.normal_()
    layer.eval()
    x = torch.randn(7, 3, 5, device=device) if per_group_input else torch.randn(7, 5, device=device)

    def unfolded() -> torch.Tensor:
        z = torch.einsum("bgi,gio->bgo" if per_group_input else "bi,gio->bgo", x, layer.weight) + layer.bias
        return LOOP_ACTIVATIONS[activation](bn(z.flatten(1)).unflatten(1, z.shape[1:]))

    grad_y = torch.randn(7, 3, 4, device=device)
    results = []
    for forward in (layer, lambda _: unfolded()):
        layer.zero_grad()
        y = forward(x)
        y.backward(grad_y)
        results.append((y, layer.weight.grad, bn.weight.grad, bn.bias.grad))
    for got, want in zip(*results, strict=True):
        assert_matches(got, want, torch.float32)
    calls = []
    bn.register_forward_hook(lambda *_: calls.append(1))
    assert_matches(layer(x), results[1][0], torch.float32)
    assert calls == [1]


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


def test_cgc_shared_gate_over_shared_experts_only():
    level = fg.PLE(4, 3, 2, 1, 5, num_levels=2, shared_gate_experts="shared").levels[0]
    assert torch.equal(level.gate.mask[3], torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool))
    assert torch.equal(level.gate.mask[:3], fg.PLE(4, 3, 2, 1, 5, num_levels=2).levels[0].gate.mask[:3])


@pytest.mark.parametrize("gate", ["attention", "softmax"])
def test_ple_shared_gate_experts_matches_loop_model(gate, gate_path, monkeypatch, device):
    """``shared_gate_experts="shared"`` in training, in eval with autograd (two steps), and in inference, where
    each level runs as one ``experts_mix`` kernel on the kernels' path (its reference on the other)."""
    torch.manual_seed(0)
    model = fg.PLE(10, 2, 2, 1, (6, 5), num_levels=3, gate=gate, shared_gate_experts="shared", tower_hidden=3)
    model = model.to(device)
    _randomize_batch_norms(model)
    x = torch.randn(6, 10, device=device)
    for training in (True, False):
        compare(model, "ple", x, training=training)
    kernels = (experts_mix.experts_mix_one_pass_kernel, experts_mix.experts_mix_two_pass_kernel)
    launches = LaunchCounter(monkeypatch, *kernels, gate_mix_fwd.gate_mix_fwd_kernel)
    with torch.no_grad():
        out = model(x)
        want = LoopModel(model, training=False).ple(model, x.double())
    assert_matches(out, want, torch.float32, "inference")
    one_kernel = launches.counts["experts_mix_one_pass_kernel"] + launches.counts["experts_mix_two_pass_kernel"]
    assert (one_kernel, launches.counts["gate_mix_fwd_kernel"]) == ((3, 0) if gate_path == "kernels" else (0, 0))
    all_experts = fg.PLE(10, 2, 2, 1, (6, 5), num_levels=3, gate=gate, tower_hidden=3).to(device).eval()
    weights = {name: value for name, value in model.state_dict().items() if not name.endswith(".mask")}
    all_experts.load_state_dict(weights, strict=False)  # the gate masks are buffers: each model keeps its own
    inputs = x[:, None, :].expand(6, 3, 10)
    with torch.no_grad():  # the layouts differ in the first level's shared path only
        shared_only, every = model.levels[0](inputs), all_experts.levels[0](inputs)
    torch.testing.assert_close(shared_only[:, :2], every[:, :2])
    assert not torch.allclose(shared_only[:, 2], every[:, 2])


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
        (lambda: fg.MMoE(4, 2, 3, 2, activation="softplus"), "activation must be one of"),
        (lambda: fg.MMoE(4, 2, 3, 2, dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
        (lambda: fg.MMoE(4, 2, 3, 2, tower_hidden=(2,), tower_dropout=-0.1), "dropout must be"),
        (lambda: fg.MMoE(4, 2, 3, 2, gate="attention", gate_hidden=(4,)), "attention gate has none"),
        (lambda: fg.PLE(4, 2, 1, 1, 3, gate="attention", gate_batch_norm=True), "attention gate has none"),
        (lambda: fg.MMoE(4, 2, 3, 2, gate="attention_input_query", gate_hidden=(4,)), "query Linear per task"),
        (lambda: fg.PLE(4, 2, 1, 1, 3, gate="attention_input_query", gate_batch_norm=True), "query Linear"),
        (lambda: fg.InputQueryAttentionMix(4, 0, 3), r"num_tasks must be in 1\.\.16, got 0"),
        (lambda: fg.InputQueryAttentionMix(4, 2, 3, scale=-1.0), "scale must be a finite positive number"),
        (lambda: fg.InputQueryAttentionMix(4, 2, 3, mask=torch.ones(3, 2, dtype=torch.bool)), "mask must have shape"),
        (lambda: fg.PLE(4, 2, 1, 1, 3, num_levels=2, shared_gate_experts="task"), "shared_gate_experts must be one"),
        (lambda: fg.PLE(4, 2, 0, 1, 3, num_levels=2, shared_gate_experts="shared"), "num_shared_experts >= 1"),
    ],
)
def test_rejects_bad_options(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        # counts: type and range, and the kernels' limits, at construction rather than at the first forward
        (lambda: fg.MMoE(0, 2, 3, 2), ValueError, "in_features must be >= 1, got 0"),
        (lambda: fg.MMoE(5, 0, 4, 2), ValueError, r"num_experts must be in 1\.\.256, got 0"),
        (lambda: fg.MMoE(5, 300, 4, 1), ValueError, r"num_experts must be in 1\.\.256, got 300"),
        (lambda: fg.MMoE(5, 4, 4, 17), ValueError, r"num_tasks must be in 1\.\.16, got 17"),
        (lambda: fg.MMoE(5, 4.0, 4, 2), TypeError, "num_experts must be an int, got float"),
        (lambda: fg.MMoE("5", 4, 4, 2), TypeError, "in_features must be an int, got str"),
        (lambda: fg.PLE(5, 2, 0, 0, 4), ValueError, "each level needs 1 to 256 experts"),
        (lambda: fg.PLE(5, 2, 200, 30, 4), ValueError, "each level needs 1 to 256 experts"),
        (lambda: fg.PLE(5, 2, -1, 1, 4), ValueError, "num_shared_experts must be >= 0, got -1"),
        (lambda: fg.PLE(5, 16, 1, 1, 4, num_levels=2), ValueError, "num_tasks = 16 with num_levels = 2.*at most 16"),
        (lambda: fg.PLE(5, 17, 1, 1, 4), ValueError, "num_tasks = 17"),
        (lambda: fg.PLE(5, 2, 1, 1, 4, num_levels=1.5), TypeError, "num_levels must be an int"),
        # flags: a string such as "no" is not taken as True
        (lambda: fg.MMoE(5, 4, 4, 2, fused_experts="no"), TypeError, "fused_experts must be a bool, got str"),
        (lambda: fg.PLE(5, 2, 1, 1, 4, batch_norm=1), TypeError, "batch_norm must be a bool, got int"),
        (lambda: fg.MMoE(5, 4, 4, 2, gate="softmax", gate_bias="False"), TypeError, "gate_bias must be a bool"),
        (lambda: fg.MMoE(5, 4, 4, 2, tower_batch_norm="yes"), TypeError, "tower_batch_norm must be a bool"),
        # names and probabilities, the tower options too even without towers
        (lambda: fg.MMoE(5, 4, 4, 2, tower_activation="softplus"), ValueError, "activation must be one of"),
        (lambda: fg.MMoE(5, 4, 4, 2, activation=None), TypeError, "activation must be a name"),
        (lambda: fg.MMoE(5, 4, 4, 2, tower_dropout="0.1"), TypeError, "dropout must be a probability"),
        (lambda: fg.MMoE(4, 2, 3, 2, gate="softmax", gate_hidden=(2.5,)), TypeError, "gate_hidden must be"),
        (lambda: fg.MMoE(4, 2, 3, 2, tower_hidden="4"), TypeError, "tower_hidden must be"),
        (lambda: fg.AttentionMix(17, 4), ValueError, r"num_tasks must be in 1\.\.16"),
        (lambda: fg.SoftmaxGate(4, 2, 300), ValueError, r"num_experts must be in 1\.\.256"),
    ],
)
def test_constructors_name_every_bad_argument(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_largest_layers_within_the_limits_build():
    fg.MMoE(3, 256, 2, 16)
    fg.PLE(3, 15, 1, 1, 2, num_levels=2)
    fg.PLE(3, 16, 0, 1, 2)


def test_rejects_shared_gate_experts_of_wrong_type():
    with pytest.raises(TypeError, match="shared_gate_experts must be a str"):
        CGCLevel(4, 2, 1, 1, 3, shared_gate=True, shared_gate_experts=True)


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
