"""MMoE / PLE / SoftmaxGate against pure-PyTorch twins: loops over experts and the reference gates."""

from __future__ import annotations

import pytest
import torch

import fused_gate as fg
from fused_gate.layers import CGCLevel

from .conftest import assert_matches


def _experts_twin(experts, inputs):
    """Loop over experts: ``inputs`` is [B, in] or a list of E [B, in]."""
    outs = []
    for e in range(experts.weight.shape[0]):
        x = inputs if isinstance(inputs, torch.Tensor) else inputs[e]
        outs.append(torch.relu(x @ experts.weight[e].double() + experts.bias[e].double()))
    return torch.stack(outs, dim=1)


def _towers_twin(towers, y):
    outs = []
    for t in range(y.shape[1]):
        z = torch.relu(y[:, t] @ towers.w1[t].double() + towers.b1[t].double())
        outs.append(z @ towers.w2[t].double() + towers.b2[t].double())
    return torch.stack(outs, dim=1)


def mmoe_twin(model, x):
    h = _experts_twin(model.experts, x)
    if model.gate_kind == "attention":
        g = model.gate
        y = fg.reference.attention_mix(h, g.context.double(), top_k=g.top_k)
    else:
        g = model.gate
        logits = (x @ g.linear.weight.double().T + g.linear.bias.double()).view(x.shape[0], g.num_tasks, -1)
        y = fg.reference.softmax_mix(logits, h, top_k=g.top_k)
    return _towers_twin(model.towers, y) if model.towers is not None else y


def cgc_twin(level: CGCLevel, inputs):
    group = level.group.tolist()
    h = _experts_twin(level.experts, [inputs[:, g] for g in group])
    if level.gate_kind == "attention":
        return fg.reference.attention_mix(h, level.gate.context.double(), mask=level.gate.mask, top_k=level.gate.top_k)
    gates = level.gate_weight.shape[0]
    logits = torch.stack(
        [inputs[:, t] @ level.gate_weight[t].double() + level.gate_bias[t].double() for t in range(gates)], dim=1
    )
    return fg.reference.softmax_mix(logits, h, mask=level.mask, top_k=level.top_k)


def ple_twin(model, x):
    out = x[:, None, :].expand(x.shape[0], model.num_tasks + 1, x.shape[1])
    for level in model.levels:
        out = cgc_twin(level, out)
    return _towers_twin(model.towers, out) if model.towers is not None else out


def _compare(model, twin, x, dtype=torch.float32):
    xk = x.clone().requires_grad_()
    out = model(xk)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out * g).sum().backward()
    params = dict(model.named_parameters())
    got = {n: p.grad.clone() for n, p in params.items()}

    model.zero_grad()
    xr = x.double().clone().requires_grad_()
    ref = twin(model, xr)
    (ref * g.double()).sum().backward()
    assert_matches(out, ref, dtype, "output")
    assert_matches(xk.grad, xr.grad, dtype, "dx")
    for name, p in params.items():
        assert_matches(got[name], p.grad, dtype, name)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("towers", [None, 4])
@pytest.mark.parametrize("gate", ["attention", "softmax"])
def test_mmoe_matches_twin(gate, towers, top_k, device):
    torch.manual_seed(0)
    model = fg.MMoE(10, 4, 8, 3, gate=gate, top_k=top_k, tower_hidden=towers).to(device)
    _compare(model, mmoe_twin, torch.randn(7, 10, device=device))


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("gate", ["attention", "softmax"])
def test_ple_matches_twin(gate, levels, device):
    torch.manual_seed(0)
    model = fg.PLE(10, 2, 2, 1, 8, num_levels=levels, gate=gate, tower_hidden=3).to(device)
    _compare(model, ple_twin, torch.randn(6, 10, device=device))


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


def test_experts_output_is_read_in_place(device):
    """The batched-matmul expert output is a non-contiguous [B, E, hidden] view, fed to the gate as is."""
    model = fg.MMoE(10, 4, 8, 3).to(device)
    h = model.experts(torch.randn(5, 10, device=device))
    assert h.shape == (5, 4, 8)


def test_softmax_gate_module(device):
    torch.manual_seed(0)
    gate = fg.SoftmaxGate(6, 2, 3, temperature=0.5).to(device)
    x = torch.randn(4, 6, device=device)
    h = torch.randn(4, 3, 5, device=device)
    y, p = gate(x, h, return_weights=True)
    logits = gate.linear(x).view(4, 2, 3)
    y_ref, p_ref = fg.reference.softmax_mix(logits, h, temperature=0.5, return_weights=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(p, p_ref)


def test_rejects_unknown_gate():
    with pytest.raises(ValueError, match="gate must be one of"):
        fg.MMoE(4, 2, 3, 2, gate="linear")
    with pytest.raises(ValueError, match="num_levels"):
        fg.PLE(4, 2, 1, 1, 3, num_levels=0)
