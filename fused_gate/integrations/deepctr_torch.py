"""DeepCTR-Torch's MMOE and PLE with the fused gate: ``swap_in(model)``, or converted to the batched fused
layers: ``to_fused(model)``.

A DeepCTR-Torch gate is an optional DNN, then a Linear without bias (the logits), then
``softmax(1)`` and a matmul with the stacked experts. The twins keep the gate's own layers up to the
logits and replace the softmax and the per-gate matmuls by one :func:`fused_gate.softmax_mix` call per
level. The MMOE twin without a gate DNN computes its gates' final Linears as one matmul (the same values)
unless a hook is registered on one of them. Every random draw (dropout in the experts, gate DNNs and
towers) happens in the library's order, so a seeded training step matches the original.

The library's PLE also computes a shared gate on its last level and discards it. The twin skips its
logits and mix; in training it still runs that gate's DNN, because the library's DNN draws dropout
masks and updates BatchNorm statistics there, and skipping it would change the random stream and the
buffers.
"""

from __future__ import annotations

import copy

import torch
from deepctr_torch.inputs import combined_dnn_input
from deepctr_torch.models.basemodel import BaseModel
from deepctr_torch.models.multitask.mmoe import MMOE
from deepctr_torch.models.multitask.ple import PLE
from torch import Tensor, nn
from torch.nn import functional as F

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

__all__ = ["FeatureInput", "FusedMMOE", "FusedPLE", "swap_in", "to_fused"]


class FusedMMOE(FusedTwin, MMOE):
    """DeepCTR-Torch ``MMOE`` whose task gates mix the experts in one fused call."""

    @classmethod
    def layouts(cls, module: MMOE) -> dict[str, GateLayout]:
        return {"gates": GateLayout([range(module.num_experts)] * module.num_tasks, module.num_experts)}

    def _gate_logits(self, dnn_input: Tensor) -> Tensor | list[Tensor]:
        """The T gates' logits: ``[B, T, E]`` from one matmul when the gates are their final Linears alone
        (no gate DNN, plain ``nn.Linear``, no hook to see each call), else one ``[B, E]`` per task."""
        finals = list(self.gate_dnn_final_layer)
        if len(self.gate_dnn_hidden_units) > 0:
            return [final(gate_dnn(dnn_input)) for gate_dnn, final in zip(self.gate_dnn, finals, strict=True)]
        if any(type(final) is not nn.Linear for final in finals) or forward_hooked(*finals):
            return [final(dnn_input) for final in finals]
        weight = torch.cat([final.weight for final in finals])
        bias = None if finals[0].bias is None else torch.cat([final.bias for final in finals])
        return F.linear(dnn_input, weight, bias).unflatten(1, (self.num_tasks, self.num_experts))

    def forward(self, X):
        sparse_embedding_list, dense_value_list = self.input_from_feature_columns(
            X, self.dnn_feature_columns, self.embedding_dict
        )
        dnn_input = combined_dnn_input(sparse_embedding_list, dense_value_list)
        expert_outs = torch.stack([expert(dnn_input) for expert in self.expert_dnn], 1)
        mmoe_outs = self.gate_layouts["gates"].mix(self._gate_logits(dnn_input), expert_outs)
        task_outs = []
        for task in range(self.num_tasks):
            tower_input = mmoe_outs[task]
            if len(self.tower_dnn_hidden_units) > 0:
                tower_input = self.tower_dnn[task](tower_input)
            task_outs.append(self.out[task](self.tower_dnn_final_layer[task](tower_input)))
        return torch.cat(task_outs, -1)


class FusedPLE(FusedTwin, PLE):
    """DeepCTR-Torch ``PLE`` whose CGC levels mix all their gates in one fused call each."""

    reproduces = ("forward", "cgc_net")

    @classmethod
    def caveat(cls, module: PLE) -> str | None:
        built = len(module.shared_experts[0][0])
        if built < module.shared_expert_num:
            return (
                f"the library cannot run it: shared_experts.0.0 holds {built} experts, fewer than shared_expert_num = "
                f"{module.shared_expert_num} (DeepCTR-Torch builds specific_expert_num of them), so its forward "
                "raises IndexError, swapped or not"
            )
        return None

    @classmethod
    def layouts(cls, module: PLE) -> dict[str, GateLayout]:
        shape = module.num_tasks, module.specific_expert_num, module.shared_expert_num
        return {"inner": cgc_layout(*shape, shared_gate=True), "last": cgc_layout(*shape, shared_gate=False)}

    def _specific_gate_logits(self, level: int, task: int, x: Tensor) -> Tensor:
        if len(self.gate_dnn_hidden_units) > 0:
            x = self.specific_gate_dnn[level][task][0](x)
        return self.specific_gate_dnn_final_layer[level][task](x)

    def _shared_gate_logits(self, level: int, x: Tensor) -> Tensor:
        if len(self.gate_dnn_hidden_units) > 0:
            x = self.shared_gate_dnn[level](x)
        return self.shared_gate_dnn_final_layer[level](x)

    def cgc_net(self, inputs, level_num):
        """One CGC level: T task outputs, plus the shared output on every level but the last."""
        tasks, per_task = self.num_tasks, self.specific_expert_num
        expert_outs = [self.specific_experts[level_num][t][k](inputs[t]) for t in range(tasks) for k in range(per_task)]
        expert_outs += [self.shared_experts[level_num][0][s](inputs[-1]) for s in range(self.shared_expert_num)]
        expert_outs = torch.stack(expert_outs, 1)
        logits = [self._specific_gate_logits(level_num, t, inputs[t]) for t in range(tasks)]
        if level_num < self.num_levels - 1:
            logits.append(self._shared_gate_logits(level_num, inputs[-1]))
            return self.gate_layouts["inner"].mix(logits, expert_outs)
        if self.training and len(self.gate_dnn_hidden_units) > 0:
            self.shared_gate_dnn[level_num](inputs[-1])  # discarded output; its dropout and BatchNorm side effects
        return self.gate_layouts["last"].mix(logits, expert_outs)


TWINS: dict[type, type[FusedTwin]] = {MMOE: FusedMMOE, PLE: FusedPLE}


def swap_in(model: nn.Module) -> list[str]:
    """Make every DeepCTR-Torch ``MMOE`` and ``PLE`` in ``model`` use the fused gate, in place.

    Returns the qualified names of the swapped modules (``""`` for ``model`` itself), as
    ``model.named_modules()`` gives them. Warns and returns ``[]`` when there is nothing to swap.
    """
    return report(swap_layers(model, TWINS, "DeepCTR-Torch"), "DeepCTR-Torch MMOE or PLE")


# ---------------------------------------------------------------------------- to_fused


class FeatureInput(nn.Module):
    """DeepCTR-Torch's input layer: the sparse embeddings and dense values of ``X`` as one ``[B, in]`` tensor.

    Holds a copy of the model's ``embedding_dict`` and its feature index, and runs the library's own
    ``BaseModel.input_from_feature_columns`` and ``combined_dnn_input``.
    """

    def __init__(self, model: BaseModel) -> None:
        super().__init__()
        self.embedding_dict = copy.deepcopy(model.embedding_dict)
        self.feature_index, self.dnn_feature_columns, self.device = (
            model.feature_index,
            model.dnn_feature_columns,
            model.device,
        )

    def forward(self, X: Tensor) -> Tensor:
        # The library method reads only embedding_dict, feature_index and device from its model.
        sparse, dense = BaseModel.input_from_feature_columns(self, X, self.dnn_feature_columns, self.embedding_dict)
        return combined_dnn_input(sparse, dense)


def _dnn_layers(dnn: nn.Module, where: str) -> list[Dense]:
    """A ``DNN``'s layers: Linear, BatchNorm1d (with ``use_bn``), activation, and its one shared Dropout."""
    norms = list(dnn.bn) if dnn.use_bn else [None] * len(dnn.linears)
    return [
        Dense(linear, bn, activation_name(act, f"{where}.activation_layers.{i}"), dnn.dropout.p, f"{where}.linears.{i}")
        for i, (linear, bn, act) in enumerate(zip(dnn.linears, norms, dnn.activation_layers, strict=True))
    ]


def _many(modules, names: list[str]) -> list[list[Dense]]:
    return [_dnn_layers(m, name) for m, name in zip(modules, names, strict=True)]


def _gate_options(gate_dnns: list[list[Dense]], names: list[str], finals: list[nn.Linear], experts: dict) -> dict:
    """The fused gate options; its DNN shares the experts' activation, dropout and BatchNorm, as in the library."""
    if not gate_dnns:
        return dict(gate_hidden=(), gate_bias=finals[0].bias is not None)
    options = batched_options(gate_dnns, names)
    if any(options[k] != experts[k] for k in ("activation", "dropout", "batch_norm")):
        raise ValueError(f"{names[0]}: the gate DNN must have the experts' activation, dropout and BatchNorm setting")
    return dict(gate_hidden=options["hidden"], gate_bias=finals[0].bias is not None)


def _towers(model: BaseModel) -> tuple[list[list[Dense]], list[nn.Linear], dict]:
    names = [f"tower_dnn.{t}" for t in range(model.num_tasks)]
    hidden = _many(model.tower_dnn, names) if len(model.tower_dnn_hidden_units) > 0 else [[] for _ in names]
    outputs = list(model.tower_dnn_final_layer)
    return hidden, outputs, tower_options(hidden, outputs, names)


def _convert_mmoe(model: MMOE) -> layers.MMoE:
    tasks, names = model.num_tasks, [f"expert_dnn.{e}" for e in range(model.num_experts)]
    experts = _many(model.expert_dnn, names)
    options = batched_options(experts, names)
    gate_names = [f"gate_dnn.{t}" for t in range(tasks)]
    gate_dnns = _many(model.gate_dnn, gate_names) if len(model.gate_dnn_hidden_units) > 0 else []
    finals = list(model.gate_dnn_final_layer)
    gate = _gate_options(gate_dnns, gate_names, finals, options)
    hidden, outputs, towers = _towers(model)
    layer = layers.MMoE(
        model.input_dim, model.num_experts, options.pop("hidden"), tasks, gate="softmax", **options, **gate, **towers
    )
    layer.to(module_device(model))
    load_mlp(layer.experts, experts)
    load_gate(layer.gate, gate_dnns, finals, None)
    load_towers(layer.towers, hidden, outputs)
    return layer


def _convert_ple(model: PLE) -> layers.PLE:
    tasks, per_task, shared, num_levels = (
        model.num_tasks,
        model.specific_expert_num,
        model.shared_expert_num,
        model.num_levels,
    )
    has_gate_dnn = len(model.gate_dnn_hidden_units) > 0
    levels = []  # per level: (expert DNNs in fused order, gate DNNs, gate final Linears, options)
    for level in range(num_levels):
        if len(model.shared_experts[level][0]) < shared:
            raise ValueError(
                f"shared_experts.{level}.0 holds {len(model.shared_experts[level][0])} experts, fewer than "
                f"shared_expert_num = {shared} (DeepCTR-Torch builds specific_expert_num of them), so the model "
                "itself cannot run"
            )
        names = [f"shared_experts.{level}.0.{s}" for s in range(shared)]
        names += [f"specific_experts.{level}.{t}.{k}" for t in range(tasks) for k in range(per_task)]
        modules = [model.shared_experts[level][0][s] for s in range(shared)]
        modules += [model.specific_experts[level][t][k] for t in range(tasks) for k in range(per_task)]
        experts = _many(modules, names)
        # The last level's shared gate is computed and discarded by the library: it is not converted.
        gate_names = [f"specific_gate_dnn.{level}.{t}.0" for t in range(tasks)]
        gate_modules = [model.specific_gate_dnn[level][t][0] for t in range(tasks)] if has_gate_dnn else []
        finals = [model.specific_gate_dnn_final_layer[level][t] for t in range(tasks)]
        if level < num_levels - 1:
            gate_names.append(f"shared_gate_dnn.{level}")
            gate_modules += [model.shared_gate_dnn[level]] if has_gate_dnn else []
            finals.append(model.shared_gate_dnn_final_layer[level])
        gate_dnns = _many(gate_modules, gate_names) if has_gate_dnn else []
        options = batched_options(experts, names)
        options.update(_gate_options(gate_dnns, gate_names, finals, options))
        levels.append((experts, gate_dnns, finals, options))
    options = dict(levels[0][3])
    hidden, outputs, towers = _towers(model)
    layer = layers.PLE(
        model.input_dim,
        tasks,
        shared,
        per_task,
        options.pop("hidden"),
        num_levels=num_levels,
        gate="softmax",
        **options,
        **towers,
    )
    layer.to(module_device(model))
    for level, (fused, (experts, gate_dnns, finals, _)) in enumerate(zip(layer.levels, levels, strict=True)):
        load_mlp(fused.experts, experts)
        columns = cgc_gate_columns(tasks, per_task, shared, shared_gate=level < num_levels - 1)
        load_gate(fused.gate, gate_dnns, finals, None, columns)
    load_towers(layer.towers, hidden, outputs)
    return layer


def to_fused(model: nn.Module) -> FusedMultiTask:
    """A DeepCTR-Torch ``MMOE`` or ``PLE`` as a :class:`~fused_gate.MMoE` / :class:`~fused_gate.PLE` with towers.

    Every weight and BatchNorm buffer is copied: the expert DNNs into one batched MLP per level, the gate
    DNNs and their final Linears (no bias) into one :class:`~fused_gate.SoftmaxGate` per level, the tower
    DNNs and final Linears into batched towers. PLE's last-level shared gate, which the library computes
    and discards, is not built. The result keeps copies of the model's embeddings and prediction layers
    (their bias included), so ``converted(X)`` takes the model's input and returns its output ``[B, T]``;
    ``converted.layer`` is the fused layer (embedded input ``[B, in]`` to the towers' logits ``[B, T]``).
    ``model`` is not changed; the L2 regularisation terms of the library's ``fit`` are not carried over.

    Raises:
        TypeError: ``model`` is neither a DeepCTR-Torch ``MMOE`` nor ``PLE``, or a subclass that overrides
            ``forward`` (or, for ``PLE``, ``cgc_net``), which the converted model would not compute; a
            subclass that keeps them is converted, as ``swap_in`` swaps it.
        ValueError: a part cannot be converted (named in the message): an activation other than ReLU,
            LeakyReLU(0.01), GELU, SiLU, Sigmoid, Tanh or linear (PReLU and Dice have learned parameters), or a PLE
            with fewer shared experts built than it uses.
    """
    if isinstance(model, MMOE):
        refuse_overridden(model, MMOE, FusedMMOE.reproduces, "DeepCTR-Torch", "model")
        layer = _convert_mmoe(model)
    elif isinstance(model, PLE):
        refuse_overridden(model, PLE, FusedPLE.reproduces, "DeepCTR-Torch", "model")
        layer = _convert_ple(model)
    else:
        raise TypeError(f"model must be a DeepCTR-Torch MMOE or PLE, got {type(model).__name__}")
    return FusedMultiTask(FeatureInput(model), layer, copy.deepcopy(model.out))
