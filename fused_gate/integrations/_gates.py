"""All the gates of one MMoE / CGC level as one :func:`fused_gate.softmax_mix` call.

Library code computes each gate's logits with its own layers, one ``[B, n_g]`` tensor per gate, where
gate ``g`` scores its own list of experts (a PLE task gate: the task's experts, then the shared ones).
:class:`GateLayout` places those logits in one ``[B, G, E]`` tensor over all ``E`` experts of the level
and masks out the experts a gate does not read, so one fused call replaces the per-gate
softmax-and-sum loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_gate.ops import softmax_mix


class GateLayout:
    """Which experts each of the G gates of a level mixes, in the order of its logits.

    ``gate_experts[g]`` lists the experts (indices into the level's E experts) that gate g scores, in
    the order of its logit columns. When every gate scores all experts in order (MMoE), the logits
    are only stacked and no mask is used. Otherwise ``index [G, E]`` picks, from the gates' logits
    concatenated along columns, gate g's logit of expert e, and ``mask [G, E]`` is True where gate g
    reads expert e; masked entries point at any column of the gate (the masked softmax ignores them).
    """

    def __init__(
        self, gate_experts: Sequence[Sequence[int]], num_experts: int, device: torch.device | str | None = None
    ) -> None:
        self.gate_experts = tuple(tuple(experts) for experts in gate_experts)
        self.num_experts = num_experts
        for g, experts in enumerate(self.gate_experts):
            if not experts or len(set(experts)) != len(experts) or not all(0 <= e < num_experts for e in experts):
                raise ValueError(f"gate {g} must list distinct experts in 0..{num_experts - 1}, got {experts}")
        every_expert = tuple(range(num_experts))
        if all(experts == every_expert for experts in self.gate_experts):
            self.index = self.mask = None
            return
        index, mask, offset = [], [], 0
        for experts in self.gate_experts:
            column = {e: offset + i for i, e in enumerate(experts)}
            index.append([column.get(e, offset) for e in range(num_experts)])
            mask.append([e in column for e in range(num_experts)])
            offset += len(experts)
        self.index = torch.tensor(index, device=device)
        self.mask = torch.tensor(mask, device=device)

    @property
    def num_gates(self) -> int:
        return len(self.gate_experts)

    def to(self, device: torch.device | str) -> GateLayout:
        """The same layout with its tensors on ``device`` (built anew, so a meta or empty copy never leaks)."""
        return GateLayout(self.gate_experts, self.num_experts, device)

    def mix(self, gate_logits: Sequence[Tensor] | Tensor, experts: Tensor) -> list[Tensor]:
        """``softmax_g(logits) . experts`` for every gate at once.

        Args:
            gate_logits: G tensors ``[B, len(gate_experts[g])]``, the logits before the softmax; or, for a
                layout without a mask (every gate scores every expert in order), one ``[B, G, E]`` tensor.
            experts: ``[B, E, D]``, the level's expert outputs stacked along dim 1. The caller stacks them as
                they are computed, so that their list is freed before the mix allocates (a CPU forward that
                holds it writes the mix's temporaries to memory that is not in the cache yet).

        Returns:
            G tensors ``[B, D]``: ``y_g = sum_i softmax(z_g)[i] * experts[:, gate_experts[g][i]]``.
        """
        if isinstance(gate_logits, Tensor):
            if self.index is not None:
                raise ValueError("gate_logits: a layout with a mask takes one [B, n_g] tensor per gate")
            logits = gate_logits
        elif self.index is None:
            logits = torch.stack(list(gate_logits), dim=1)
        else:
            logits = torch.cat(list(gate_logits), dim=1)[:, self.index]
        return list(softmax_mix(logits, experts, mask=self.mask).unbind(1))

    def __repr__(self) -> str:
        return f"GateLayout(gate_experts={self.gate_experts}, num_experts={self.num_experts})"


def cgc_layout(
    num_tasks: int, num_task_experts: int, num_shared_experts: int, *, shared_gate: bool, device=None
) -> GateLayout:
    """A CGC level's gates, experts ordered ``[task 0's K, ..., task T-1's K, S shared]``.

    Task t's gate scores its own K experts, then the S shared ones; the shared gate (on every PLE
    level but the last) scores all ``T * K + S`` experts in order.
    """
    shared = [num_tasks * num_task_experts + s for s in range(num_shared_experts)]
    gates = [[t * num_task_experts + k for k in range(num_task_experts)] + shared for t in range(num_tasks)]
    num_experts = num_tasks * num_task_experts + num_shared_experts
    if shared_gate:
        gates.append(list(range(num_experts)))
    return GateLayout(gates, num_experts, device)
