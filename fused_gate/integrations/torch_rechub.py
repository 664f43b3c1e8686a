"""torch-rechub's MMOE and PLE (its CGC levels) with the fused gate: ``swap_in(model)``, or converted to the
batched fused layers: ``to_fused(model)``.

A torch-rechub gate is ``MLP(dims=[E], activation="softmax")``: Linear -> BatchNorm1d -> Softmax(dim=1)
-> Dropout(0). The twins run the gate's own layers up to the softmax (so the logits, the BatchNorm
statistics and the hooks on those layers stay the library's) and replace the softmax and the per-task
weighted sums by one :func:`fused_gate.softmax_mix` call per level. Every random draw (the experts' and
towers' dropout) happens in the library's order, so a seeded training step matches the original.

The fused call never computes what a gate ``MLP``, its ``Sequential``, its ``Softmax`` or its ``Dropout``
returns, so a forward hook or pre-hook on one of them (or on every module) would not fire: while one is
registered, the twin runs the library's forward instead, and every hook sees what it sees in the original.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch_rechub.basic.layers import MLP
from torch_rechub.models.multi_task.mmoe import MMOE
from torch_rechub.models.multi_task.ple import CGC, PLE

from fused_gate import layers
from fused_gate._hooks import forward_hooked
from fused_gate.integrations._convert import (
    Dense,
    FusedMultiTask,
    activation_name,
    batched_options,
    cgc_gate_columns,
    load_gate,
    load_mlp,
    load_towers,
    tower_options,
)
from fused_gate.integrations._gates import GateLayout, cgc_layout
from fused_gate.integrations._swap import FusedTwin, module_device, refuse_overridden, report, swap_layers

__all__ = ["FeatureInput", "FusedCGC", "FusedMMOE", "swap_in", "to_fused"]


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


def _gates_hooked(gates: list[MLP]) -> bool:
    """Whether a forward hook or pre-hook would see what the fused call does not compute: a gate's weights."""
    return forward_hooked(*(m for gate in gates for m in (gate, gate.mlp, gate.mlp[-2], gate.mlp[-1])))


class FusedMMOE(FusedTwin, MMOE):
    """torch-rechub ``MMOE`` whose T gates mix the experts in one fused call (the library's forward while a
    hook is registered on a gate's MLP, Softmax or Dropout, or on every module)."""

    @classmethod
    def unsupported(cls, module: MMOE) -> str | None:
        return _first_unsupported([(f"gates.{t}", gate) for t, gate in enumerate(module.gates)])

    @classmethod
    def layouts(cls, module: MMOE) -> dict[str, GateLayout]:
        return {"gates": GateLayout([range(module.n_expert)] * module.n_task, module.n_expert)}

    def forward(self, x):
        if _gates_hooked(list(self.gates)):
            return MMOE.forward(self, x)
        embed_x = self.embedding(x, self.features, squeeze_dim=True)
        expert_outs = torch.stack([expert(embed_x) for expert in self.experts], 1)
        logits = [_gate_logits(gate, embed_x) for gate in self.gates]
        pooled = self.gate_layouts["gates"].mix(logits, expert_outs)
        ys = [
            predict_layer(tower(y))
            for y, tower, predict_layer in zip(pooled, self.towers, self.predict_layers, strict=True)
        ]
        return torch.cat(ys, dim=1)


class FusedCGC(FusedTwin, CGC):
    """torch-rechub ``CGC`` (a PLE level) whose task gates and shared gate mix in one fused call (the library's
    forward while a hook is registered on a gate's MLP, Softmax or Dropout, or on every module)."""

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

    def _gates(self) -> list[MLP]:
        return [*self.gates_specific, *([self.gate_shared] if self.cur_level < self.n_level else [])]

    def forward(self, x_list):
        if _gates_hooked(self._gates()):
            return CGC.forward(self, x_list)
        per_task = self.n_expert_specific
        expert_outs = [
            self.experts_specific[t * per_task + k](x_list[t]) for t in range(self.n_task) for k in range(per_task)
        ]
        expert_outs += [expert(x_list[-1]) for expert in self.experts_shared]
        expert_outs = torch.stack(expert_outs, 1)
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
    return report(swap_layers(model, TWINS, "torch-rechub"), "torch-rechub MMOE or PLE layer")


# ---------------------------------------------------------------------------- to_fused


class FeatureInput(nn.Module):
    """torch-rechub's input layer: the features' embeddings (and dense values) as one ``[B, in]`` tensor."""

    def __init__(self, embedding: nn.Module, features: list) -> None:
        super().__init__()
        self.embedding, self.features = embedding, features

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.embedding(x, self.features, squeeze_dim=True)


def _mlp_layers(mlp: nn.Module, where: str, *, output_layer: bool) -> tuple[list[Dense], nn.Linear | None]:
    """An ``MLP``'s hidden layers (Linear, BatchNorm1d, activation, Dropout each) and its output Linear."""
    layers = list(mlp.mlp) if isinstance(mlp, MLP) else None
    output = layers.pop() if layers and output_layer else None
    if layers is None or (output_layer and not isinstance(output, nn.Linear)) or len(layers) % 4:
        raise ValueError(f"{where} is not a torch-rechub MLP of Linear -> BatchNorm1d -> activation -> Dropout layers")
    dense = []
    for i in range(0, len(layers), 4):
        linear, bn, act, dropout = layers[i : i + 4]
        if not (isinstance(linear, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and isinstance(dropout, nn.Dropout)):
            raise ValueError(f"{where}.mlp.{i}: expected Linear -> BatchNorm1d -> activation -> Dropout")
        dense.append(Dense(linear, bn, activation_name(act, f"{where}.mlp.{i + 2}"), dropout.p, f"{where}.mlp.{i}"))
    return dense, output


def _gate_layers(gate: nn.Module, where: str) -> tuple[nn.Linear, nn.BatchNorm1d]:
    """The Linear and the logits' BatchNorm of a gate ``MLP(dims=[n], activation="softmax")``."""
    reason = _gate_unsupported(gate, where)
    if reason is None and (len(gate.mlp) != 4 or not isinstance(gate.mlp[1], nn.BatchNorm1d)):
        reason = f"{where} is not Linear -> BatchNorm1d -> Softmax -> Dropout"
    if reason is not None:
        raise ValueError(f"cannot convert: {reason}")
    return gate.mlp[0], gate.mlp[1]


def _towers(model: nn.Module) -> tuple[list[list[Dense]], list[nn.Linear], dict]:
    names = [f"towers.{t}" for t in range(len(model.towers))]
    parsed = [_mlp_layers(tower, name, output_layer=True) for tower, name in zip(model.towers, names, strict=True)]
    hidden, outputs = [p[0] for p in parsed], [p[1] for p in parsed]
    return hidden, outputs, tower_options(hidden, outputs, names)


def _layer_options(experts: list[list[Dense]], names: list[str]) -> dict:
    options = batched_options(experts, names)
    return dict(expert_hidden=options.pop("hidden"), **options)


def _convert_mmoe(model: MMOE) -> layers.MMoE:
    names = [f"experts.{e}" for e in range(model.n_expert)]
    experts = [
        _mlp_layers(expert, name, output_layer=False)[0] for expert, name in zip(model.experts, names, strict=True)
    ]
    gates = [_gate_layers(gate, f"gates.{t}") for t, gate in enumerate(model.gates)]
    hidden, outputs, towers = _towers(model)
    options = _layer_options(experts, names)
    layer = layers.MMoE(
        model.input_dims,
        model.n_expert,
        options.pop("expert_hidden"),
        model.n_task,
        gate="softmax",
        gate_batch_norm=True,
        **options,
        **towers,
    )
    layer.to(module_device(model))
    load_mlp(layer.experts, experts)
    load_gate(layer.gate, [], [g[0] for g in gates], [g[1] for g in gates])
    load_towers(layer.towers, hidden, outputs)
    return layer


def _convert_ple(model: PLE) -> layers.PLE:
    first = model.cgc_layers[0]
    tasks, per_task, shared = model.n_task, first.n_expert_specific, first.n_expert_shared
    levels = []  # per level: (expert MLPs in fused order, gates, options)
    for level, cgc in enumerate(model.cgc_layers):
        prefix = f"cgc_layers.{level}"
        names = [f"{prefix}.experts_shared.{s}" for s in range(shared)]
        names += [f"{prefix}.experts_specific.{i}" for i in range(tasks * per_task)]
        modules = [*cgc.experts_shared, *cgc.experts_specific]
        experts = [_mlp_layers(m, name, output_layer=False)[0] for m, name in zip(modules, names, strict=True)]
        gates = [_gate_layers(gate, f"{prefix}.gates_specific.{t}") for t, gate in enumerate(cgc.gates_specific)]
        if cgc.cur_level < cgc.n_level:
            gates.append(_gate_layers(cgc.gate_shared, f"{prefix}.gate_shared"))
        levels.append((experts, gates, _layer_options(experts, names)))
    options = levels[0][2]
    for level, (_, _, level_options) in enumerate(levels):
        if level_options != options:
            raise ValueError(
                f"cgc_layers.{level}'s experts differ from cgc_layers.0's; the fused PLE builds every level alike"
            )
    hidden, outputs, towers = _towers(model)
    options = dict(options)
    layer = layers.PLE(
        model.input_dims,
        tasks,
        shared,
        per_task,
        options.pop("expert_hidden"),
        num_levels=model.n_level,
        gate="softmax",
        gate_batch_norm=True,
        **options,
        **towers,
    )
    layer.to(module_device(model))
    for level, (fused, (experts, gates, _)) in enumerate(zip(layer.levels, levels, strict=True)):
        columns = cgc_gate_columns(tasks, per_task, shared, shared_gate=level < model.n_level - 1)
        load_mlp(fused.experts, experts)
        load_gate(fused.gate, [], [g[0] for g in gates], [g[1] for g in gates], columns)
    load_towers(layer.towers, hidden, outputs)
    return layer


def to_fused(model: nn.Module) -> FusedMultiTask:
    """A torch-rechub ``MMOE`` or ``PLE`` as a :class:`~fused_gate.MMoE` / :class:`~fused_gate.PLE` with towers.

    Every weight and BatchNorm buffer is copied: the experts into one batched MLP per level, the gates
    (Linear, BatchNorm on the logits) into one :class:`~fused_gate.SoftmaxGate` per level, the towers into
    batched towers. The result keeps copies of the model's embedding and prediction layers, so
    ``converted(x)`` takes the model's input and returns its output ``[B, T]``; ``converted.layer`` is the
    fused layer, which maps the embedded input ``[B, in]`` to the towers' logits ``[B, T]``. ``model`` is
    not changed.

    Raises:
        TypeError: ``model`` is neither a torch-rechub ``MMOE`` nor ``PLE``, or a subclass that overrides
            ``forward`` (as are its ``CGC`` levels), which the converted model would not compute; a subclass
            that keeps the library's ``forward`` is converted, as ``swap_in`` swaps it.
        ValueError: a part cannot be converted (named in the message): an activation other than ReLU,
            LeakyReLU(0.01), GELU, SiLU, Sigmoid, Tanh or identity (PReLU and Dice have learned parameters),
            towers or experts of different widths, activations or dropout, a gate with dropout after its
            softmax.
    """
    if isinstance(model, MMOE):
        refuse_overridden(model, MMOE, FusedMMOE.reproduces, "torch-rechub", "model")
        layer = _convert_mmoe(model)
    elif isinstance(model, PLE):
        refuse_overridden(model, PLE, ("forward",), "torch-rechub", "model")
        for level, cgc in enumerate(model.cgc_layers):
            refuse_overridden(cgc, CGC, FusedCGC.reproduces, "torch-rechub", f"cgc_layers.{level}")
        layer = _convert_ple(model)
    else:
        raise TypeError(f"model must be a torch-rechub MMOE or PLE, got {type(model).__name__}")
    embed = FeatureInput(copy.deepcopy(model.embedding), model.features)
    return FusedMultiTask(embed, layer, copy.deepcopy(model.predict_layers))
