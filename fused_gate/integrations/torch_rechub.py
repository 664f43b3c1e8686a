"""torch-rechub's MMOE and PLE (its CGC levels) with the fused gate: ``swap_in(model)``.

A torch-rechub gate is ``MLP(dims=[E], activation="softmax")``: Linear -> BatchNorm1d -> Softmax(dim=1)
-> Dropout(0). The twins run the gate's own layers up to the softmax (so the logits, the BatchNorm
statistics and any hook stay the library's) and replace the softmax and the per-task weighted sums by
one :func:`fused_gate.softmax_mix` call per level. Every random draw (the experts' and towers' dropout)
happens in the library's order, so a seeded training step matches the original.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_rechub.basic.layers import MLP
from torch_rechub.models.multi_task.mmoe import MMOE
from torch_rechub.models.multi_task.ple import CGC

from fused_gate.integrations._gates import GateLayout, cgc_layout
from fused_gate.integrations._swap import FusedTwin, swap_layers, warn_if_nothing_swapped

__all__ = ["FusedCGC", "FusedMMOE", "swap_in"]


def _gate_unsupported(gate: nn.Module, what: str) -> str | None:
    """None when ``gate`` is an MLP ending in Softmax over dim 1 and a zero Dropout, else why not."""
    layers = list(gate.mlp) if isinstance(gate, MLP) else []
    if len(layers) < 3 or not isinstance(layers[-2], nn.Softmax) or not isinstance(layers[-1], nn.Dropout):
        return f"{what} is not a torch-rechub MLP ending in Softmax -> Dropout"
    if layers[-2].dim not in (1, -1):
        return f"{what} takes its softmax over dim {layers[-2].dim}, not over the experts (dim 1)"
    if layers[-1].p != 0:
        return (
            f"{what} applies Dropout(p={layers[-1].p}) to the gate weights after the softmax, "
            "which the fused mix does not compute"
        )
    return None


def _gate_logits(gate: MLP, x: Tensor) -> Tensor:
    """The gate MLP's layers before its Softmax and Dropout: the logits ``[B, n]``."""
    for i in range(len(gate.mlp) - 2):
        x = gate.mlp[i](x)
    return x


def _first_unsupported(gates: list[tuple[str, nn.Module]]) -> str | None:
    return next((r for r in (_gate_unsupported(g, what) for what, g in gates) if r is not None), None)


class FusedMMOE(FusedTwin, MMOE):
    """torch-rechub ``MMOE`` whose T gates mix the experts in one fused call."""

    @classmethod
    def unsupported(cls, module: MMOE) -> str | None:
        return _first_unsupported([(f"gates.{t}", gate) for t, gate in enumerate(module.gates)])

    @classmethod
    def layouts(cls, module: MMOE) -> dict[str, GateLayout]:
        return {"gates": GateLayout([range(module.n_expert)] * module.n_task, module.n_expert)}

    def forward(self, x):
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        expert_outs = [expert(embed_x) for expert in self.experts]
        logits = [_gate_logits(gate, embed_x) for gate in self.gates]
        pooled = self.gate_layouts["gates"].mix(logits, expert_outs)
        ys = [
            predict_layer(tower(y))
            for y, tower, predict_layer in zip(pooled, self.towers, self.predict_layers, strict=True)
        ]
        return torch.cat(ys, dim=1)


class FusedCGC(FusedTwin, CGC):
    """torch-rechub ``CGC`` (a PLE level) whose task gates and shared gate mix in one fused call."""

    @classmethod
    def unsupported(cls, module: CGC) -> str | None:
        gates = [(f"gates_specific.{t}", gate) for t, gate in enumerate(module.gates_specific)]
        if module.cur_level < module.n_level:
            gates.append(("gate_shared", module.gate_shared))
        return _first_unsupported(gates)

    @classmethod
    def layouts(cls, module: CGC) -> dict[str, GateLayout]:
        shared_gate = module.cur_level < module.n_level
        layout = cgc_layout(module.n_task, module.n_expert_specific, module.n_expert_shared, shared_gate=shared_gate)
        return {"gates": layout}

    def forward(self, x_list):
        per_task = self.n_expert_specific
        expert_outs = [
            self.experts_specific[t * per_task + k](x_list[t]) for t in range(self.n_task) for k in range(per_task)
        ]
        expert_outs += [expert(x_list[-1]) for expert in self.experts_shared]
        logits = [_gate_logits(gate, x_list[t]) for t, gate in enumerate(self.gates_specific)]
        if self.cur_level < self.n_level:
            logits.append(_gate_logits(self.gate_shared, x_list[-1]))
        return self.gate_layouts["gates"].mix(logits, expert_outs)


TWINS: dict[type, type[FusedTwin]] = {MMOE: FusedMMOE, CGC: FusedCGC}


def swap_in(model: nn.Module) -> list[str]:
    """Make every torch-rechub ``MMOE`` and ``CGC`` (PLE level) in ``model`` use the fused gate, in place.

    Returns the qualified names of the swapped modules (``""`` for ``model`` itself), as
    ``model.named_modules()`` gives them. Warns and returns ``[]`` when there is nothing to swap.
    """
    return warn_if_nothing_swapped(swap_layers(model, TWINS, "torch-rechub"), "torch-rechub MMOE or PLE layer")
