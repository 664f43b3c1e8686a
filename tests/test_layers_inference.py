"""MMoE / PLE in inference: the experts' last layer and the gate as one ``experts_mix`` kernel.

In ``eval()`` under ``torch.no_grad()`` / ``torch.inference_mode()`` the layers launch one
``experts_mix`` kernel (one pass or two) per gate (per level for PLE) instead of the experts' matmul and
the gate kernel;
the output equals the two-step path (``fused_experts=False``) within the dtype's tolerance. Everywhere
else (training, autograd, BatchNorm on the last expert layer, a gate tile the kernel does not hold) the
two steps run, with the same result.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils import parametrize, prune

import fused_gate as fg
from fused_gate.kernels import experts_mix, gate_mix_fwd

from .conftest import assert_matches
from .test_attention_mix import LaunchCounter

# name -> (layer, options): one-layer and two-layer experts, both gates, gate DNN / logits BatchNorm,
# top-k and towers, activations; BatchNorm before the last expert layer (it stays a plain Linear + activation).
CONFIGS = {
    "mmoe_attention": ("mmoe", dict(gate="attention", tower_hidden=4)),
    "mmoe_softmax_top_k": ("mmoe", dict(gate="softmax", top_k=2)),
    "mmoe_gelu_top_k": ("mmoe", dict(gate="attention", activation="gelu", top_k=2)),
    "mmoe_deep_softmax": (
        "mmoe",
        dict(gate="softmax", expert_hidden=(9, 6), activation="tanh", gate_hidden=(5,), gate_batch_norm=True),
    ),
    "ple_attention": ("ple", dict(gate="attention", num_levels=2, tower_hidden=3)),
    "ple_softmax_deep": ("ple", dict(gate="softmax", num_levels=2, expert_hidden=(7, 5), activation="sigmoid")),
    # the queries come from the input: experts_mix with a per-row context [B, T, D]
    "mmoe_input_query_top_k": ("mmoe", dict(gate="attention_input_query", top_k=2, tower_hidden=4)),
    "ple_input_query_deep": ("ple", dict(gate="attention_input_query", num_levels=2, expert_hidden=(7, 5))),
    "ple_shared_gate_over_shared": ("ple", dict(gate="attention", num_levels=2, shared_gate_experts="shared")),
}


def build(name: str, device: str, **overrides) -> torch.nn.Module:
    layer, options = CONFIGS[name]
    options = {**options, **overrides}
    hidden = options.pop("expert_hidden", 8)
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, hidden, 3, **options) if layer == "mmoe" else fg.PLE(10, 2, 2, 1, hidden, **options)
    model = model.to(device).eval()
    for module in model.modules():  # eval-mode BatchNorm with statistics away from (0, 1)
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def levels(name: str) -> int:
    layer, options = CONFIGS[name]
    return options.get("num_levels", 1) if layer == "ple" else 1


@pytest.fixture
def launches(monkeypatch):
    return LaunchCounter(
        monkeypatch,
        experts_mix.experts_mix_one_pass_kernel,
        experts_mix.experts_mix_two_pass_kernel,
        gate_mix_fwd.gate_mix_fwd_kernel,
    )


def one_kernel_launches(launches) -> int:
    return launches.counts["experts_mix_one_pass_kernel"] + launches.counts["experts_mix_two_pass_kernel"]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_inference_runs_one_kernel_per_gate(name, context, launches, device):
    model = build(name, device)
    x = torch.randn(37, 10, device=device)
    with torch.no_grad():
        expected = build(name, device, fused_experts=False)(x)
    launches.reset()
    with torch.no_grad() if context == "no_grad" else torch.inference_mode():
        out = model(x)
    assert (one_kernel_launches(launches), launches.counts["gate_mix_fwd_kernel"]) == (levels(name), 0)
    assert_matches(out, expected, torch.float32, name)


@pytest.mark.parametrize(
    ("why", "overrides", "mode"),
    [
        ("switched off", dict(fused_experts=False), "no_grad"),
        ("training mode", dict(), "train"),
        ("autograd on", dict(), "grad"),
        ("BatchNorm on the last expert layer", dict(batch_norm=True), "no_grad"),
    ],
)
def test_two_steps_run_elsewhere(why, overrides, mode, launches, device):
    model = build("mmoe_deep_softmax", device, **overrides)
    x = torch.randn(9, 10, device=device)
    model.train(mode == "train")
    with torch.no_grad():
        reference = fg.reference.softmax_mix(
            model.gate.logits(x), model.experts(x), mask=model.gate.mask, top_k=model.gate.top_k
        )
    launches.reset()
    with torch.enable_grad() if mode == "grad" else torch.no_grad():
        out = model(x)
    assert (one_kernel_launches(launches), launches.counts["gate_mix_fwd_kernel"]) == (0, 1), why
    assert_matches(out.detach(), reference, torch.float32, why)


def test_gate_tile_too_large_for_one_kernel_keeps_two_steps(launches, device):
    """E = 64 experts and T = 16 tasks exceed the kernel's gate tile (next_power_of_2(T) * E <= 512)."""
    torch.manual_seed(0)
    model = fg.MMoE(6, 64, 4, 16).to(device).eval()
    with torch.no_grad():
        model(torch.randn(3, 6, device=device))
    assert (one_kernel_launches(launches), launches.counts["gate_mix_fwd_kernel"]) == (0, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference(dtype, launches, device):
    model = build("mmoe_attention", device).to(dtype)
    x = torch.randn(21, 10, device=device, dtype=dtype)
    with torch.no_grad():
        expected = build("mmoe_attention", device, fused_experts=False)(x.float())  # float32 parameters
        out = model(x)
    assert one_kernel_launches(launches) == 1
    assert out.dtype == dtype
    assert_matches(out, expected, dtype, str(dtype))


@pytest.mark.parametrize("name", ["mmoe_deep_softmax", "ple_attention"])
def test_compile_fullgraph_dynamic_batch(name, launches, device):
    """In inference the one-kernel path compiles into one graph (experts_mix is one node) for every batch."""
    model = build(name, device)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for batch in (8, 11):
            x = torch.randn(batch, 10, device=device)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1
    assert launches.counts["gate_mix_fwd_kernel"] == 0


def _inference_and_two_steps(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval output under ``no_grad`` (one kernel where it applies) and with autograd on (two steps)."""
    with torch.no_grad():
        fast = model(x)
    with torch.enable_grad():
        two_steps = model(x).detach()
    return fast, two_steps


def _clamp_output(module, args, output):
    return output.clamp(max=0.05)


def _halve_input(module, args):
    return (args[0] * 0.5,)


def _counted(hook, calls: list):
    def counting(*args):
        calls.append(1)
        return hook(*args)

    return counting


def _prune_then_update(model, calls):
    """Pruning recomputes the weight in a pre-hook; an update of ``weight_orig`` shows only through it."""
    last = model.experts.layers[-1]
    prune.l1_unstructured(last, "weight", amount=0.5)
    with torch.no_grad():
        last.weight_orig.mul_(-1.5)


def _global_hook(model, calls):
    def clamp_experts(module, args, output):
        if module is model.experts:
            calls.append(1)
            return output.clamp(max=0.05)
        return None

    return torch.nn.modules.module.register_module_forward_hook(clamp_experts)


# where -> what it registers on a fresh model (counting the hook's calls); each changes the output
HOOKS = {
    "forward hook on the experts": lambda m, c: m.experts.register_forward_hook(_counted(_clamp_output, c)),
    "forward hook on the last expert layer": lambda m, c: m.experts.layers[-1].register_forward_hook(
        _counted(_clamp_output, c)
    ),
    "pre-hook on the last expert layer": lambda m, c: m.experts.layers[-1].register_forward_pre_hook(
        _counted(_halve_input, c)
    ),
    "forward hook on the gate": lambda m, c: m.gate.register_forward_hook(_counted(_clamp_output, c)),
    "global forward hook": _global_hook,
    "prune": _prune_then_update,
}


@pytest.mark.parametrize("where", list(HOOKS))
def test_inference_keeps_hooks_and_prune(where, dispatch_path, device):
    """With a hook on a module the one-kernel path does not call, the two steps run: the hook fires once per
    forward and acts as with autograd on."""
    model = build("mmoe_attention", device)
    calls = []
    handle = HOOKS[where](model, calls)
    try:
        fast, two_steps = _inference_and_two_steps(model, torch.randn(13, 10, device=device))
    finally:
        if handle is not None:
            handle.remove()
    assert len(calls) == (0 if where == "prune" else 2), "the hook fired once per forward in both modes"
    assert_matches(fast, two_steps, torch.float32, where)


class _Scaled(torch.nn.Module):
    def forward(self, weight):
        return 0.5 * weight


def test_inference_reads_a_parametrized_weight_in_one_kernel(dispatch_path, launches, device):
    model = build("mmoe_attention", device)
    parametrize.register_parametrization(model.experts.layers[-1], "weight", _Scaled())
    fast, two_steps = _inference_and_two_steps(model, torch.randn(13, 10, device=device))
    assert one_kernel_launches(launches) == (1 if dispatch_path == "kernels" else 0)
    assert_matches(fast, two_steps, torch.float32, "parametrized weight")


def test_inference_without_hooks_still_runs_one_kernel(launches, device):
    model = build("mmoe_attention", device)
    handle = model.experts.register_forward_hook(_clamp_output)
    handle.remove()
    with torch.no_grad():
        model(torch.randn(5, 10, device=device))
    assert (one_kernel_launches(launches), launches.counts["gate_mix_fwd_kernel"]) == (1, 0)


@pytest.mark.parametrize("gate", ["attention", "softmax"])
def test_tanh_experts_agree_at_small_values(gate, dispatch_path, device):
    """tanh near 0 (``H`` ~ 1e-5): both paths agree to float32's relative precision, not only absolutely."""
    name = "mmoe_attention" if gate == "attention" else "mmoe_softmax_top_k"
    model = build(name, device, activation="tanh", tower_hidden=None)
    with torch.no_grad():
        model.experts.layers[-1].weight.mul_(1e-5)
        model.experts.layers[-1].bias.zero_()
    fast, two_steps = _inference_and_two_steps(model, torch.randn(11, 10, device=device))
    assert fast.abs().max() < 1e-4
    torch.testing.assert_close(fast, two_steps, rtol=2e-5, atol=0)


@pytest.mark.parametrize("name", ["mmoe_attention", "mmoe_softmax_top_k", "ple_attention"])
def test_float16_overflow_is_the_same_on_both_paths(name, dispatch_path, device):
    """Experts' outputs beyond float16's range: ``H`` is rounded to float16 in the one kernel as the two steps
    store it, so both give inf and NaN at the same places and agree elsewhere."""
    model = build(name, device, tower_hidden=None)
    with torch.no_grad():
        for experts in (m.experts for m in model.modules() if hasattr(m, "experts")):
            experts.layers[-1].weight.mul_(60)
    model.half()
    x = torch.randn(24, 10, device=device, dtype=torch.float16)
    x[::3] *= 1e3  # every third row overflows some experts' outputs (x itself stays finite)
    fast, two_steps = _inference_and_two_steps(model, x)
    assert two_steps.isnan().any() or two_steps.isinf().any(), "no overflow to test"
    assert not two_steps[1::3].isnan().any()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(fast), kind(two_steps)), f"{kind.__name__} differs"
    finite = two_steps.isfinite()
    assert_matches(fast[finite], two_steps[finite], torch.float16, name)


@pytest.mark.parametrize("name", ["mmoe_attention", "ple_softmax_deep"])
def test_float64_layers_train_and_serve_on_every_path(name, dispatch_path, device):
    """``model.double()`` runs the reference in float64 wherever the layer runs (the kernels compute in float32)."""
    model = build(name, device).double()
    x = torch.randn(7, 10, device=device, dtype=torch.float64)
    fast, two_steps = _inference_and_two_steps(model, x)
    model.train()
    model(x).sum().backward()
    assert fast.dtype == torch.float64 and all(p.grad.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(fast, two_steps)
