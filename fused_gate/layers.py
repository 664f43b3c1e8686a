"""Multi-task MoE layers built on the fused gates: MMoE and PLE (stacked CGC levels).

Experts are E one-layer MLPs evaluated as one batched matmul (``einsum`` over an ``[E, in, hidden]``
weight), never a Python loop; their output ``[B, E, hidden]`` is a strided view that the gate kernels
read in place. PLE's "shared + task-specific experts" structure is expressed with the gate mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fused_gate._checks import validate_top_k
from fused_gate.gates import AttentionMix, SoftmaxGate
from fused_gate.ops import softmax_mix

GATES = ("attention", "softmax")


def _check_gate(gate: str) -> None:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def _uniform_(weight: Tensor, fan_in: int) -> None:
    """``nn.Linear``'s default initialisation, for batched weights."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class Experts(nn.Module):
    """E one-layer MLPs ``act(x_e W_e + b_e)`` as one batched matmul.

    ``forward(x)`` takes ``[B, in]`` (every expert sees the same input) or ``[B, E, in]`` (one input per
    expert) and returns ``[B, E, hidden]``.
    """

    def __init__(self, in_features: int, num_experts: int, hidden: int, activation: nn.Module | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.activation = activation if activation is not None else nn.ReLU()
        _uniform_(self.weight, in_features)
        _uniform_(self.bias, in_features)

    def forward(self, x: Tensor) -> Tensor:
        pattern = "bi,eih->beh" if x.dim() == 2 else "bei,eih->beh"
        return self.activation(torch.einsum(pattern, x, self.weight) + self.bias)


class TaskTowers(nn.Module):
    """One ``hidden -> tower_hidden -> 1`` MLP per task, batched: ``[B, T, hidden] -> [B, T]``."""

    def __init__(self, num_tasks: int, hidden: int, tower_hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_tasks, hidden, tower_hidden))
        self.b1 = nn.Parameter(torch.empty(num_tasks, tower_hidden))
        self.w2 = nn.Parameter(torch.empty(num_tasks, tower_hidden))
        self.b2 = nn.Parameter(torch.zeros(num_tasks))
        for p, fan_in in ((self.w1, hidden), (self.b1, hidden), (self.w2, tower_hidden)):
            _uniform_(p, fan_in)

    def forward(self, y: Tensor) -> Tensor:
        z = torch.relu(torch.einsum("bth,thk->btk", y, self.w1) + self.b1)
        return (z * self.w2).sum(-1) + self.b2


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018) with a fused gate.

    ``forward(x [B, in_features])`` returns the per-task mixed features ``[B, T, expert_hidden]``, or the
    towers' outputs ``[B, T]`` when ``tower_hidden`` is given.

    Args:
        in_features: width of the input ``x``, which every expert and the softmax gate read.
        num_experts: E, the number of experts (each one ``Linear(in_features, expert_hidden)`` + ReLU).
        expert_hidden: the experts' output width D, which is also the width of each task's mix.
        num_tasks: T, the number of tasks (one gate each).
        gate: ``"attention"`` (learned task context vectors over the expert outputs) or ``"softmax"``
            (``softmax(W_t x)``, the paper's gate).
        top_k: sparse gate, keep the ``top_k`` best experts per row and task (default: all E).
        tower_hidden: add one ``expert_hidden -> tower_hidden -> 1`` MLP tower per task.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: int,
        num_tasks: int,
        *,
        gate: str = "attention",
        top_k: int | None = None,
        tower_hidden: int | None = None,
    ) -> None:
        super().__init__()
        _check_gate(gate)
        self.gate_kind = gate
        top_k = validate_top_k(top_k, num_experts)
        self.experts = Experts(in_features, num_experts, expert_hidden)
        if gate == "attention":
            self.gate = AttentionMix(num_tasks, expert_hidden, top_k=top_k)
        else:
            self.gate = SoftmaxGate(in_features, num_tasks, num_experts, top_k=top_k)
        self.towers = TaskTowers(num_tasks, expert_hidden, tower_hidden) if tower_hidden else None

    def forward(self, x: Tensor) -> Tensor:
        """Run the experts and the gates (and the towers) on ``x``, a ``[B, in_features]`` batch.

        Returns ``[B, T, expert_hidden]``, or ``[B, T]`` with towers.
        """
        h = self.experts(x)
        y = self.gate(h) if self.gate_kind == "attention" else self.gate(x, h)
        return self.towers(y) if self.towers is not None else y


class CGCLevel(nn.Module):
    """One Customized Gate Control level: S shared experts plus K experts per task.

    Input ``[B, T + 1, in]`` (one input per task, then the shared input); output ``[B, G, hidden]`` with
    ``G = T + 1`` when the level feeds another one (its last gate mixes every expert for the shared
    path) and ``G = T`` for the last level. Task t's gate may use the shared experts and its own.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: int,
        *,
        shared_gate: bool,
        gate: str,
        top_k: int | None,
    ) -> None:
        super().__init__()
        _check_gate(gate)
        self.gate_kind = gate
        num_experts = num_shared_experts + num_tasks * num_task_experts
        top_k = validate_top_k(top_k, num_experts)
        # Which input each expert reads: the shared input (index T) or its task's input.
        group = [num_tasks] * num_shared_experts + [t for t in range(num_tasks) for _ in range(num_task_experts)]
        self.register_buffer("group", torch.tensor(group), persistent=False)
        gates = num_tasks + int(shared_gate)
        mask = torch.zeros(gates, num_experts, dtype=torch.bool)
        for t in range(num_tasks):
            mask[t] = (self.group == num_tasks) | (self.group == t)
        if shared_gate:
            mask[num_tasks] = True
        self.experts = Experts(in_features, num_experts, expert_hidden)
        if gate == "attention":
            self.gate = AttentionMix(gates, expert_hidden, mask=mask, top_k=top_k)
        else:
            self.register_buffer("mask", mask)
            self.gate_weight = nn.Parameter(torch.empty(gates, in_features, num_experts))
            self.gate_bias = nn.Parameter(torch.empty(gates, num_experts))
            _uniform_(self.gate_weight, in_features)
            _uniform_(self.gate_bias, in_features)
            self.top_k = top_k

    def forward(self, inputs: Tensor) -> Tensor:
        h = self.experts(inputs[:, self.group])
        if self.gate_kind == "attention":
            return self.gate(h)
        gate_inputs = inputs[:, : self.gate_weight.shape[0]]
        logits = torch.einsum("bgi,gie->bge", gate_inputs, self.gate_weight) + self.gate_bias
        return softmax_mix(logits, h, mask=self.mask, top_k=self.top_k)


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020): stacked CGC levels with fused gates.

    ``forward(x [B, in_features])`` returns ``[B, T, expert_hidden]`` (or ``[B, T]`` with towers).
    ``num_levels = 1`` is a single CGC layer.

    Each level has ``num_shared_experts`` experts that every task's gate may use and
    ``num_task_experts`` experts per task that only that task's gate may use (a gate mask). Every level
    but the last also has a shared gate over all its experts, whose output is the next level's shared
    input; task t's gate output is the next level's input for task t's experts.

    Args:
        in_features: width of the input ``x`` (the first level's input for every expert).
        num_tasks: T, the number of tasks (one gate each per level).
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task per level.
        expert_hidden: the experts' output width (the input width of the levels after the first).
        num_levels: number of stacked CGC levels.
        gate: ``"attention"`` or ``"softmax"`` (``softmax(W_g x_g)`` on each gate's own input), as in
            :class:`MMoE`.
        top_k: sparse gates, keep the ``top_k`` best allowed experts per row and gate.
        tower_hidden: add one ``expert_hidden -> tower_hidden -> 1`` MLP tower per task.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: int,
        *,
        num_levels: int = 1,
        gate: str = "attention",
        top_k: int | None = None,
        tower_hidden: int | None = None,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_tasks = num_tasks
        self.levels = nn.ModuleList(
            CGCLevel(
                in_features if level == 0 else expert_hidden,
                num_tasks,
                num_shared_experts,
                num_task_experts,
                expert_hidden,
                shared_gate=level < num_levels - 1,
                gate=gate,
                top_k=top_k,
            )
            for level in range(num_levels)
        )
        self.towers = TaskTowers(num_tasks, expert_hidden, tower_hidden) if tower_hidden else None

    def forward(self, x: Tensor) -> Tensor:
        """Run the experts and the gates (and the towers) on ``x``, a ``[B, in_features]`` batch.

        Returns ``[B, T, expert_hidden]``, or ``[B, T]`` with towers.
        """
        out = x[:, None, :].expand(x.shape[0], self.num_tasks + 1, x.shape[1])
        for level in self.levels:
            out = level(out)
        return self.towers(out) if self.towers is not None else out
