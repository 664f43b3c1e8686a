"""MMoE / PLE in inference: the experts' last layer and the gate as one ``experts_mix`` kernel.

In ``eval()`` under ``torch.no_grad()`` / ``torch.inference_mode()`` the layers call one
``experts_mix_kernel`` per gate (per level for PLE) instead of the experts' matmul and the gate kernel;
the output equals the two-step path (``fused_experts=False``) within the dtype's tolerance. Everywhere
else (training, autograd, BatchNorm on the last expert layer, a gate tile the kernel does not hold) the
two steps run, with the same result.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fused_gate as fg
from fused_gate.kernels import experts_mix, gate_mix_fwd

from .conftest import assert_matches
from .test_attention_mix import LaunchCounter

# name -> (layer, options): one-layer and two-layer experts, both gates, gate DNN / logits BatchNorm,
# top-k and towers; BatchNorm before the last expert layer (it stays a plain Linear + activation).
CONFIGS = {
    "mmoe_attention": ("mmoe", dict(gate="attention", tower_hidden=4)),
    "mmoe_softmax_top_k": ("mmoe", dict(gate="softmax", top_k=2)),
    "mmoe_deep_softmax": (
        "mmoe",
        dict(gate="softmax", expert_hidden=(9, 6), activation="tanh", gate_hidden=(5,), gate_batch_norm=True),
    ),
    "ple_attention": ("ple", dict(gate="attention", num_levels=2, tower_hidden=3)),
    "ple_softmax_deep": ("ple", dict(gate="softmax", num_levels=2, expert_hidden=(7, 5), activation="sigmoid")),
    # the queries come from the input: experts_mix with a per-row context [B, T, D]
    "mmoe_input_query_top_k": ("mmoe", dict(gate="attention_input_query", top_k=2, tower_hidden=4)),
    "ple_input_query_deep": ("ple", dict(gate="attention_input_query", num_levels=2, expert_hidden=(7, 5))),
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
    return LaunchCounter(monkeypatch, experts_mix.experts_mix_kernel, gate_mix_fwd.gate_mix_fwd_kernel)


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
    assert launches.counts == {"experts_mix_kernel": levels(name), "gate_mix_fwd_kernel": 0}
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
    assert launches.counts == {"experts_mix_kernel": 0, "gate_mix_fwd_kernel": 1}, why
    assert_matches(out.detach(), reference, torch.float32, why)


def test_gate_tile_too_large_for_one_kernel_keeps_two_steps(launches, device):
    """E = 64 experts and T = 16 tasks exceed the kernel's gate tile (next_power_of_2(T) * E <= 512)."""
    torch.manual_seed(0)
    model = fg.MMoE(6, 64, 4, 16).to(device).eval()
    with torch.no_grad():
        model(torch.randn(3, 6, device=device))
    assert launches.counts == {"experts_mix_kernel": 0, "gate_mix_fwd_kernel": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference(dtype, launches, device):
    model = build("mmoe_attention", device).to(dtype)
    x = torch.randn(21, 10, device=device, dtype=dtype)
    with torch.no_grad():
        expected = build("mmoe_attention", device, fused_experts=False)(x.float())  # float32 parameters
        out = model(x)
    assert launches.counts["experts_mix_kernel"] == 1
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
