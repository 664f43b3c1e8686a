"""Small MMoE/PLE layers, one per gate kind, and one training step; shared by the integration tests and
the DDP child."""

from __future__ import annotations

import torch

import fused_gate as fg

LAYERS = {
    "mmoe_attention": lambda: fg.MMoE(10, 4, 8, 2, gate="attention", tower_hidden=4),
    "mmoe_softmax": lambda: fg.MMoE(10, 4, 8, 2, gate="softmax", tower_hidden=4),
    "ple_attention": lambda: fg.PLE(10, 2, 2, 1, 8, num_levels=2, gate="attention"),
    "ple_softmax": lambda: fg.PLE(10, 2, 2, 1, 8, num_levels=2, gate="softmax"),
}


def loss_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward, ``mean(out**2)`` backward from zeroed gradients: the output and every parameter gradient."""
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]
