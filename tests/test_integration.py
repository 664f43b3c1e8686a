"""fused_gate where users put it: compile with dynamic batch, checkpointing, save/load, CUDA graphs."""

from __future__ import annotations

import io

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import fused_gate as fg

from .conftest import DEVICE
from .models import LAYERS, loss_step


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_compile_fullgraph_dynamic_batch_without_recompiling(name, device):
    torch.manual_seed(0)
    model = LAYERS[name]().to(device)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for batch in (8, 11, 13):
        x = torch.randn(batch, 10, device=device)
        torch._dynamo.mark_dynamic(x, 0)
        out, grads = loss_step(compiled, x)
        want, want_grads = loss_step(model, x)
        torch.testing.assert_close(out, want)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)
    assert counter.frame_count == 1, f"recompiled for new batch sizes: {counter.frame_count} frames"


@pytest.mark.parametrize("name", ["mmoe_attention", "ple_softmax"])
def test_activation_checkpointing(name, device):
    torch.manual_seed(0)
    model = LAYERS[name]().to(device)
    x = torch.randn(9, 10, device=device)
    want, want_grads = loss_step(model, x)

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    out, grads = loss_step(Checkpointed(model), x)
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_save_load_whole_module(device):
    torch.manual_seed(0)
    model = LAYERS["ple_attention"]().to(device)
    x = torch.randn(5, 10, device=device)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))


def test_list_mode_state_dict_loads_into_tensor_mode(device):
    """A gate trained with list inputs (drop-in mode) and one used with [B, E, D] share one state_dict."""
    torch.manual_seed(0)
    trained = fg.AttentionMix(2, 8).to(device)
    trained([torch.randn(4, 8, device=device) for _ in range(3)])
    fresh = fg.AttentionMix(2, 8).to(device)
    fresh.load_state_dict(trained.state_dict())
    h = torch.randn(4, 3, 8, device=device)
    torch.testing.assert_close(fresh(h), torch.stack(trained(list(h.unbind(1))), dim=1))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_and_replay():
    torch.manual_seed(0)
    gate = fg.AttentionMix(3, 64).cuda()
    h = torch.randn(256, 8, 64, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(gate, (h,))
    for _ in range(3):  # each replay reads new inputs through the graph's static buffers
        x = torch.randn(256, 8, 64, device="cuda", requires_grad=True)
        gate.context.grad = None
        y = graphed(x)
        y.square().sum().backward()
        graphed_context_grad = gate.context.grad.clone()
        xr = x.detach().clone().requires_grad_()
        gate.context.grad = None
        want = fg.attention_mix(xr, gate.context)
        want.square().sum().backward()
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(graphed_context_grad, gate.context.grad)


@pytest.mark.skipif(DEVICE != "cuda", reason="B * E * D > 2**31 elements needs a GPU with > 8 GB free")
def test_more_than_2_pow_31_elements():
    batch, experts, dim = 2**20 + 3, 16, 128  # 2**31 + 6144 elements of bf16, 4 GB
    h = torch.randn(experts, dim, device="cuda", dtype=torch.bfloat16).expand(batch, experts, dim).contiguous()
    h[-1] = 1.0  # the last rows live past element 2**31: a 32-bit offset would wrap to the start
    context = torch.randn(2, dim, device="cuda", dtype=torch.bfloat16)
    y = fg.attention_mix(h, context)
    torch.testing.assert_close(y[-1].float(), torch.ones(2, dim, device="cuda"), rtol=1e-2, atol=1e-2)
    first = fg.reference.attention_mix(h[:4].float(), context.float())
    torch.testing.assert_close(y[:4].float(), first, rtol=2e-2, atol=2e-2)
