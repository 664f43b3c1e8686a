"""DeepCTR-Torch's MMOE and PLE with the fused gate: ``swap_in(model)``.

A DeepCTR-Torch gate is an optional DNN, then a Linear without bias (the logits), then
``softmax(1)`` and a matmul with the stacked experts. The twins keep the gate's own layers up to the
logits and replace the softmax and the per-gate matmuls by one :func:`fused_gate.softmax_mix` call per
level. Every random draw (dropout in the experts, gate DNNs and towers) happens in the library's order,
so a seeded training step matches the original.

The library's PLE also computes a shared gate on its last level and discards it. The twin skips its
logits and mix; in training it still runs that gate's DNN, because the library's DNN draws dropout
masks and updates BatchNorm statistics there, and skipping it would change the random stream and the
buffers.
"""

from __future__ import annotations

import torch
from deepctr_torch.inputs import combined_dnn_input
from deepctr_torch.models.multitask.mmoe import MMOE
from deepctr_torch.models.multitask.ple import PLE
from torch import Tensor, nn

from fused_gate.integrations._gates import GateLayout, cgc_layout
from fused_gate.integrations._swap import FusedTwin, swap_layers, warn_if_nothing_swapped

__all__ = ["FusedMMOE", "FusedPLE", "swap_in"]


class FusedMMOE(FusedTwin, MMOE):
    """DeepCTR-Torch ``MMOE`` whose task gates mix the experts in one fused call."""

    @classmethod
    def layouts(cls, module: MMOE) -> dict[str, GateLayout]:
        return {"gates": GateLayout([range(module.num_experts)] * module.num_tasks, module.num_experts)}

    def _gate_logits(self, task: int, dnn_input: Tensor) -> Tensor:
        if len(self.gate_dnn_hidden_units) > 0:
            dnn_input = self.gate_dnn[task](dnn_input)
        return self.gate_dnn_final_layer[task](dnn_input)

    def forward(self, X):
        sparse_embedding_list, dense_value_list = self.input_from_feature_columns(
            X, self.dnn_feature_columns, self.embedding_dict
        )
        dnn_input = combined_dnn_input(sparse_embedding_list, dense_value_list)
        expert_outs = [expert(dnn_input) for expert in self.expert_dnn]
        logits = [self._gate_logits(task, dnn_input) for task in range(self.num_tasks)]
        mmoe_outs = self.gate_layouts["gates"].mix(logits, expert_outs)
        task_outs = []
        for task in range(self.num_tasks):
            tower_input = mmoe_outs[task]
            if len(self.tower_dnn_hidden_units) > 0:
                tower_input = self.tower_dnn[task](tower_input)
            task_outs.append(self.out[task](self.tower_dnn_final_layer[task](tower_input)))
        return torch.cat(task_outs, -1)


class FusedPLE(FusedTwin, PLE):
    """DeepCTR-Torch ``PLE`` whose CGC levels mix all their gates in one fused call each."""

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
    return warn_if_nothing_swapped(swap_layers(model, TWINS, "DeepCTR-Torch"), "DeepCTR-Torch MMOE or PLE")
