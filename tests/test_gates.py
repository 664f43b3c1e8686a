"""AttentionMix as a drop-in layer: list mode, state_dict, torch.compile without graph breaks."""

from __future__ import annotations

import io

import torch
from torch import nn

import fused_gate as fg


class TinyMMoE(nn.Module):
    """Experts as one batched matmul, the attention gate, one linear tower per task."""

    def __init__(self, in_features=12, experts=4, hidden=16, tasks=3):
        super().__init__()
        self.expert_weight = nn.Parameter(torch.randn(experts, in_features, hidden) / in_features**0.5)
        self.gate = fg.AttentionMix(tasks, hidden)
        self.towers = nn.Parameter(torch.randn(tasks, hidden) / hidden**0.5)

    def forward(self, x):
        h = torch.relu(torch.einsum("bi,eih->beh", x, self.expert_weight))
        return (self.gate(h) * self.towers).sum(-1)


def test_list_in_list_out(device):
    torch.manual_seed(0)
    gate = fg.AttentionMix(3, 16).to(device)
    experts = [torch.randn(5, 16, device=device) for _ in range(4)]
    outs = gate(experts)
    assert isinstance(outs, list) and len(outs) == 3 and outs[0].shape == (5, 16)
    stacked = gate(torch.stack(experts, dim=1))
    torch.testing.assert_close(torch.stack(outs, dim=1), stacked)


def test_return_weights_sum_to_one(device):
    gate = fg.AttentionMix(2, 8).to(device)
    _, p = gate(torch.randn(6, 5, 8, device=device), return_weights=True)
    torch.testing.assert_close(p.sum(-1), torch.ones(6, 2, device=device))


def test_state_dict_round_trip():
    mask = torch.tensor([[True, False, True], [True, True, False]])
    gate = fg.AttentionMix(2, 8, mask=mask, top_k=1)
    buf = io.BytesIO()
    torch.save(gate.state_dict(), buf)
    buf.seek(0)
    other = fg.AttentionMix(2, 8, mask=torch.zeros(2, 3, dtype=torch.bool), top_k=1)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.context, gate.context) and torch.equal(other.mask, mask)
    assert "num_tasks=2, dim=8, top_k=1, masked=True" in repr(gate)


def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = TinyMMoE().to(device)
    x = torch.randn(9, 12, device=device)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
