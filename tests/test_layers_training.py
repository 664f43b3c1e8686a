"""MMoE / PLE in training: the experts' last layer and the gate as one ``experts_mix`` kernel, forward and backward.

With autograd on (train mode, or eval mode with gradients) the layers launch one ``experts_mix`` forward and
one backward kernel per gate set (per level for PLE) instead of the experts' matmul and the gate kernels;
the output and every gradient (input, parameters) and the BatchNorm statistics equal the two-step path
(``fused_experts=False``) within the dtype's tolerance, and autograd keeps nothing of the experts' outputs.
Where the path does not apply (dropout after the last expert layer in training, a hook), the two steps run.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils import parametrize

import fused_gate as fg
from fused_gate.kernels import experts_mix, experts_mix_bwd, gate_mix_bwd, gate_mix_fwd

from .conftest import assert_matches
from .test_attention_mix import LaunchCounter
from .test_layers_inference import CONFIGS, HOOKS, build, levels


@pytest.fixture
def launches(monkeypatch):
    return LaunchCounter(
        monkeypatch,
        experts_mix.experts_mix_one_pass_kernel,
        experts_mix.experts_mix_two_pass_kernel,
        experts_mix_bwd.experts_mix_bwd_kernel,
        gate_mix_fwd.gate_mix_fwd_kernel,
        gate_mix_bwd.gate_mix_bwd_kernel,
    )


def fused_launches(launches) -> tuple[int, int]:
    """(experts_mix forward launches, experts_mix backward launches)."""
    counts = launches.counts
    forward = counts["experts_mix_one_pass_kernel"] + counts["experts_mix_two_pass_kernel"]
    return forward, counts["experts_mix_bwd_kernel"]


def two_step_launches(launches) -> tuple[int, int]:
    return launches.counts["gate_mix_fwd_kernel"], launches.counts["gate_mix_bwd_kernel"]


def step(
    model: torch.nn.Module, x: torch.Tensor, seed: int = 5, dynamic: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of ``<G, model(x)>``: the output and the gradients of ``x`` and every parameter
    (``dynamic``: the batch marked dynamic for ``torch.compile``)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    out = model(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    (out * grad).sum().backward()
    grads = {"x": x.grad, **{name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}}
    return out.detach(), grads


def assert_same_step(fused, two_steps, dtype, what):
    (out, grads), (want, want_grads) = fused, two_steps
    assert_matches(out, want, dtype, f"{what}: output")
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"{what}: no gradient for {name}"
        assert_matches(grad, want_grads[name], dtype, f"{what}: d{name}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_runs_one_kernel_each_way_and_equals_two_steps(name, mode, launches, device):
    """Train mode (BatchNorm on earlier layers and on the gate logits with batch statistics), and eval mode with
    autograd on: one experts_mix forward and backward per gate set, no gate kernel, the two-step path's output,
    gradients and BatchNorm statistics."""
    model = build(name, device).train(mode == "train")
    two_steps = build(name, device, fused_experts=False).train(mode == "train")
    x = torch.randn(37, 10, device=device)
    launches.reset()
    fused = step(model, x)
    assert fused_launches(launches) == (levels(name), levels(name)) and two_step_launches(launches) == (0, 0)
    assert_same_step(fused, step(two_steps, x), torch.float32, name)
    for (key, buffer), want in zip(model.state_dict().items(), two_steps.state_dict().values(), strict=True):
        if buffer.is_floating_point():  # parameters and BatchNorm statistics (the masks are equal by construction)
            assert_matches(buffer, want, torch.float32, key)


@pytest.mark.parametrize(("name", "dtype"), [("mmoe_attention", torch.bfloat16), ("ple_softmax_deep", torch.float16)])
def test_half_precision_training(name, dtype, launches, device):
    model, two_steps = (build(name, device, fused_experts=f).to(dtype).train() for f in (True, False))
    x = torch.randn(21, 10, device=device, dtype=dtype)
    fused = step(model, x)
    assert fused_launches(launches) == (levels(name), levels(name))
    assert_same_step(fused, step(two_steps, x), dtype, str(dtype))


@pytest.mark.parametrize("name", ["mmoe_attention", "mmoe_softmax_top_k"])
def test_float16_overflow_in_training_is_the_same_on_both_paths(name, device):
    """Experts' outputs beyond float16's range: inf and NaN at the same places in the output and in every
    gradient on both paths, equal values elsewhere."""
    model, two_steps = (build(name, device, tower_hidden=None, fused_experts=f) for f in (True, False))
    for m in (model, two_steps):
        with torch.no_grad():
            m.experts.layers[-1].weight.mul_(60)
        m.half().train()
    x = torch.randn(24, 10, device=device, dtype=torch.float16)
    x[::3] *= 1e3
    (out, grads), (want, want_grads) = step(model, x), step(two_steps, x)
    assert not want.isfinite().all(), "no overflow to test"
    for what, got, expected in [("output", out, want), *((k, grads[k], want_grads[k]) for k in grads)]:
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(got), kind(expected)), f"{what}: {kind.__name__} differs"
        finite = expected.isfinite()
        assert_matches(got[finite], expected[finite], torch.float16, what)


def test_dropout_after_the_last_expert_layer_keeps_two_steps_in_training(launches, device):
    """Dropout after the experts' last layer: two steps in training (it would drop entries of H), one kernel in
    eval mode (where dropout is the identity)."""
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, 8, 3, dropout=0.5).to(device)
    step(model.train(), torch.randn(9, 10, device=device))
    assert fused_launches(launches) == (0, 0) and two_step_launches(launches) == (1, 1)
    launches.reset()
    step(model.eval(), torch.randn(9, 10, device=device))
    assert fused_launches(launches) == (1, 1) and two_step_launches(launches) == (0, 0)


@pytest.mark.parametrize("where", [w for w in HOOKS if w != "prune"])
def test_training_keeps_hooks(where, launches, device):
    """A hook on a module the fused path does not call: the two steps run in training too, the hook fires once."""
    model, two_steps = (build("mmoe_attention", device, fused_experts=f).train() for f in (True, False))
    calls = []
    handles = [HOOKS[where](m, calls) for m in (model, two_steps)]
    try:
        x = torch.randn(13, 10, device=device)
        launches.reset()
        fused = step(model, x)
        assert fused_launches(launches) == (0, 0), where
        assert_same_step(fused, step(two_steps, x), torch.float32, where)
    finally:
        for handle in handles:
            if handle is not None:
                handle.remove()
    assert len(calls) >= 2


def _scale_grad_input(module, grad_input, grad_output):
    return tuple(None if g is None else 0.5 * g for g in grad_input)


def _scale_grad_output(module, grad_output):
    return tuple(None if g is None else 2.0 * g for g in grad_output)


BACKWARD_HOOKS = {
    "full backward hook on the experts": lambda m: m.experts.register_full_backward_hook(_scale_grad_input),
    "backward pre-hook on the gate": lambda m: m.gate.register_full_backward_pre_hook(_scale_grad_output),
    "global backward hook": lambda m: torch.nn.modules.module.register_module_full_backward_hook(
        lambda module, gi, go: _scale_grad_input(module, gi, go) if module is m.experts else None
    ),
}


@pytest.mark.parametrize("where", list(BACKWARD_HOOKS))
def test_training_keeps_backward_hooks(where, launches, device):
    """A backward hook on a module the fused path does not call (here one that changes the gradients): the two
    steps run with autograd on, so it fires and acts as with ``fused_experts=False``; without autograd the one
    kernel runs (no backward to hook)."""
    model, two_steps = (build("mmoe_attention", device, fused_experts=f).train() for f in (True, False))
    handles = [BACKWARD_HOOKS[where](m) for m in (model, two_steps)]
    try:
        x = torch.randn(13, 10, device=device)
        launches.reset()
        fused = step(model, x)
        assert fused_launches(launches) == (0, 0), where
        assert_same_step(fused, step(two_steps, x), torch.float32, where)
        with torch.no_grad():
            model(x)
        assert fused_launches(launches) == (1, 0), where
    finally:
        for handle in handles:
            handle.remove()


class _Scaled(torch.nn.Module):
    def forward(self, weight):
        return 0.5 * weight


def test_training_reads_a_parametrized_weight(launches, device):
    """A ``torch.nn.utils.parametrize`` parametrization: the fused path reads the weight through the module, and
    the gradient reaches the original parameter as on the two-step path."""
    model, two_steps = (build("mmoe_attention", device, fused_experts=f).train() for f in (True, False))
    for m in (model, two_steps):
        parametrize.register_parametrization(m.experts.layers[-1], "weight", _Scaled())
    x = torch.randn(13, 10, device=device)
    launches.reset()
    fused = step(model, x)
    assert fused_launches(launches) == (1, 1)
    assert "experts.layers.0.parametrizations.weight.original" in fused[1]
    assert_same_step(fused, step(two_steps, x), torch.float32, "parametrized weight")


@pytest.mark.parametrize("name", ["mmoe_deep_softmax", "ple_attention"])
def test_compile_fullgraph_dynamic_batch_training(name, launches, device):
    """Training compiles into one graph for every batch size, with the fused forward and backward in it."""
    model = build(name, device).train()
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for batch in (8, 11):
        x = torch.randn(batch, 10, device=device)
        assert_same_step(step(compiled, x, dynamic=True), step(model, x), torch.float32, f"B = {batch}")
    assert counter.frame_count == 1
    assert fused_launches(launches)[1] > 0 and two_step_launches(launches) == (0, 0)


def saved_tensors(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What autograd keeps for the backward of one forward (``saved_tensors_hooks``)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    return saved


@pytest.mark.parametrize("layer", ["mmoe", "ple"])
def test_fused_training_saves_nothing_of_the_experts_size(layer, device):
    """B = 33 rows, E = 4 experts of width D = 12 from K = 5 inputs (a one-level PLE: 1 shared and 1 + 1 + 1
    task experts): the two-step path keeps tensors of B * E * D elements (H, the pre-activation); the fused
    path's largest is Y or the input."""
    batch, experts, dim = 33, 4, 12

    def make(fused: bool) -> torch.nn.Module:
        if layer == "mmoe":
            return fg.MMoE(5, experts, dim, 2, gate="softmax", fused_experts=fused).to(device)
        return fg.PLE(5, 3, 1, 1, dim, fused_experts=fused).to(device)

    x = torch.randn(batch, 5, device=device)
    fused, two_steps = (saved_tensors(make(f), x) for f in (True, False))
    assert max(t.numel() for t in two_steps) >= batch * experts * dim
    assert max(t.numel() for t in fused) < batch * experts * dim
