"""Multi-task MoE layers built on the fused gates: MMoE and PLE (stacked CGC levels).

Experts are E multi-layer MLPs evaluated as one batched matmul per layer (:class:`fused_gate.experts.Experts`),
never a Python loop; their output ``[B, E, hidden]`` is read by the gate kernels in place. PLE's
"shared + task-specific experts" structure is expressed with the gate mask. Every gate kind is called
the same way, ``gate.mix(x, h)``, so the layers' forwards do not depend on the gate kind.

The options cover torch-rechub's and DeepCTR-Torch's MMoE and PLE: multi-layer experts, BatchNorm and
dropout (``Linear -> BatchNorm -> activation -> dropout`` per layer), a gate DNN, a BatchNorm on the
gate logits, gate Linears without bias, multi-layer towers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_gate._hooks import forward_hooked
from fused_gate._validation import (
    MAX_EXPERTS,
    MAX_TASKS,
    fits_one_kernel,
    validate_count,
    validate_flag,
    validate_top_k,
    validate_widths,
)
from fused_gate.dispatch import uses_kernels
from fused_gate.experts import Experts, TaskTowers
from fused_gate.gates import AttentionMix, InputQueryAttentionMix, SoftmaxGate
from fused_gate.options import LAYER_GATES, ExpertOptions, GateOptions, TowerOptions, layer_options

__all__ = ["LAYER_GATES", "PLE", "CGCLevel", "MMoE"]

Gate = AttentionMix | InputQueryAttentionMix | SoftmaxGate

SHARED_GATE_EXPERTS = ("all", "shared")


def _validate_shared_gate_experts(value: object, num_shared_experts: int, shared_gate: bool) -> str:
    if not isinstance(value, str):
        raise TypeError(f"shared_gate_experts must be a str, one of {SHARED_GATE_EXPERTS}, got {type(value).__name__}")
    if value not in SHARED_GATE_EXPERTS:
        raise ValueError(f"shared_gate_experts must be one of {SHARED_GATE_EXPERTS}, got {value!r}")
    if value == "shared" and shared_gate and num_shared_experts < 1:
        raise ValueError("shared_gate_experts='shared' needs num_shared_experts >= 1 (the shared gate mixes them)")
    return value


def _make_gate(
    options: GateOptions,
    experts: ExpertOptions,
    in_features: int,
    num_gates: int,
    num_experts: int,
    expert_width: int,
    *,
    mask: Tensor | None,
    top_k: int | None,
) -> Gate:
    """The layer's gate module; the softmax gate's DNN shares the experts' activation, dropout and BatchNorm."""
    if options.gate == "attention":
        return AttentionMix(num_gates, expert_width, mask=mask, top_k=top_k)
    if options.gate == "attention_input_query":
        return InputQueryAttentionMix(
            in_features, num_gates, expert_width, mask=mask, top_k=top_k, bias=options.gate_bias
        )
    return SoftmaxGate(
        in_features,
        num_gates,
        num_experts,
        mask=mask,
        top_k=top_k,
        bias=options.gate_bias,
        hidden=options.gate_hidden,
        activation=experts.activation,
        dropout=experts.dropout,
        hidden_batch_norm=experts.batch_norm,
        logits_batch_norm=options.gate_batch_norm,
    )


def _or(value, default):
    return default if value is None else value


def _make_towers(options: TowerOptions, experts: ExpertOptions, num_tasks: int, in_features: int) -> TaskTowers | None:
    """The layer's towers (None without ``tower_hidden``); an option left None is the experts'."""
    if options.tower_hidden is None:
        return None
    return TaskTowers(
        num_tasks,
        in_features,
        options.tower_hidden,
        activation=_or(options.tower_activation, experts.activation),
        dropout=_or(options.tower_dropout, experts.dropout),
        batch_norm=_or(options.tower_batch_norm, experts.batch_norm),
        bias=options.tower_bias,
    )


def _one_kernel_applies(experts: Experts, gate: Gate, x: Tensor) -> bool:
    """Whether :func:`fused_gate.experts_mix` can serve this call: inference (eval mode, no autograd), a last
    expert layer without BatchNorm, the kernels' device, one dtype (no autocast), a gate tile it holds, and
    no forward hook or pre-hook on the modules it does not call (the experts, their last layer, the gate)
    nor on every module."""
    last = experts.layers[-1]
    return (
        not experts.training
        and not torch.is_grad_enabled()
        and last.batch_norm is None
        and uses_kernels(x)
        and not torch.is_autocast_enabled(x.device.type)
        and not forward_hooked(experts, last, gate)
        and x.dtype == last.weight.dtype
        and fits_one_kernel(gate.num_tasks, last.groups)
    )


def _gate_mix(gate: Gate, experts: Experts, gate_input: Tensor, expert_input: Tensor, fused_experts: bool) -> Tensor:
    """``gate.mix(gate_input, experts(expert_input))``; in inference, with ``fused_experts``, the experts' last
    layer and the gate run as one kernel and the experts' outputs are never written. The last layer's weight
    is read through the module at every call, so a ``torch.nn.utils.parametrize`` parametrization applies."""
    if fused_experts and _one_kernel_applies(experts, gate, expert_input):
        return gate.mix_experts(gate_input, experts.last_layer_input(expert_input), experts.layers[-1])
    return gate.mix(gate_input, experts(expert_input))


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018) with a fused gate.

    ``forward(x [B, in_features])`` returns the per-task mixed features ``[B, T, D]`` with
    ``D = expert_hidden[-1]``, or the towers' outputs ``[B, T]`` when ``tower_hidden`` is given.

    The options of the experts, the gate and the towers come in three groups, each given either as its
    frozen dataclass or as keywords named like its fields, ``MMoE(..., gate="softmax", dropout=0.1)`` or
    ``MMoE(..., gate_options=GateOptions(gate="softmax"), expert_options=ExpertOptions(dropout=0.1))``
    (the same module); each option once.

    Args:
        in_features: width of the input ``x``, which every expert and the gate (but ``"attention"``) read.
        num_experts: E, the number of experts.
        expert_hidden: the experts' widths (an int for one layer); the last one, D, is the width of
            each task's mix.
        num_tasks: T, the number of tasks (one gate each).
        expert_options: :class:`~fused_gate.ExpertOptions`, or its keywords ``activation`` (default
            ``"relu"``), ``dropout`` (0) and ``batch_norm`` (False): the experts' hidden layers', also the
            softmax gate's DNN's and, by default, the towers'.
        gate_options: :class:`~fused_gate.GateOptions`, or its keywords ``gate`` (``"attention"``,
            ``"softmax"`` or ``"attention_input_query"``; default ``"attention"``), ``top_k`` (default: all
            E), ``gate_hidden``, ``gate_bias`` and ``gate_batch_norm`` (the softmax gate's logits).
        tower_options: :class:`~fused_gate.TowerOptions`, or its keywords ``tower_hidden`` (default None: no
            towers), ``tower_activation``, ``tower_dropout``, ``tower_batch_norm`` (default: the experts')
            and ``tower_bias``.
        options: the keywords of the groups not given as a dataclass.
        fused_experts: in inference (``eval()`` under ``torch.no_grad()`` or ``torch.inference_mode()``,
            on the kernels' device), run the experts' last layer and the gate as one kernel,
            :func:`fused_gate.experts_mix`, which never writes the experts' outputs; it applies when that
            layer has no BatchNorm, the input has the weights' dtype (no autocast),
            ``next_power_of_2(T) * next_power_of_2(E) <= 512``, and no forward hook or pre-hook is
            registered on ``experts``, ``experts.layers[-1]`` or ``gate`` (modules that path does not
            call; ``torch.nn.utils.prune`` and the hook-based weight and spectral norms are such hooks) nor
            on every module. ``False`` keeps the two steps. Both paths give the same result.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range, named in the message;
            ``num_experts`` is at most 256 and ``num_tasks`` at most 16 (the kernels' limits). A keyword
            beside its group's dataclass, or a keyword of no group, is a ``TypeError`` naming it.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: int | Sequence[int],
        num_tasks: int,
        *,
        expert_options: ExpertOptions | None = None,
        gate_options: GateOptions | None = None,
        tower_options: TowerOptions | None = None,
        fused_experts: bool = True,
        **options: object,
    ) -> None:
        super().__init__()
        in_features = validate_count("in_features", in_features, 1)
        num_experts = validate_count("num_experts", num_experts, 1, MAX_EXPERTS)
        num_tasks = validate_count("num_tasks", num_tasks, 1, MAX_TASKS)
        expert_options, gate_options, tower_options = layer_options(
            "MMoE", options, expert_options=expert_options, gate_options=gate_options, tower_options=tower_options
        )
        top_k = validate_top_k(gate_options.top_k, num_experts)
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.fused_experts = validate_flag("fused_experts", fused_experts)
        expert_hidden = validate_widths("expert_hidden", expert_hidden)
        self.experts = Experts(in_features, num_experts, expert_hidden, **dataclasses.asdict(expert_options))
        self.out_features = self.experts.out_features
        self.gate = _make_gate(
            gate_options, expert_options, in_features, num_tasks, num_experts, self.out_features, mask=None, top_k=top_k
        )
        self.towers = _make_towers(tower_options, expert_options, num_tasks, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Run the experts and the gates (and the towers) on ``x``, a ``[B, in_features]`` batch.

        Returns ``[B, T, D]``, or ``[B, T]`` with towers.
        """
        y = _gate_mix(self.gate, self.experts, x, x, self.fused_experts)
        return self.towers(y) if self.towers is not None else y


class CGCLevel(nn.Module):
    """One Customized Gate Control level: S shared experts plus K experts per task.

    Input ``[B, T + 1, in]`` (one input per task, then the shared input); output ``[B, G, D]`` with
    ``G = T + 1`` when the level feeds another one (its last gate, the shared gate, mixes the experts
    that ``shared_gate_experts`` names for the shared path) and ``G = T`` for the last level. The experts
    are ordered ``[S shared, task 0's K, ..., task T-1's K]``; gate g reads input g, and task t's gate may
    use the shared experts and its own (the gate mask). ``shared_gate_experts``: ``"all"`` (every expert,
    as in the PLE paper, torch-rechub and DeepCTR-Torch) or ``"shared"`` (the S shared experts only, as in
    FuxiCTR). ``expert_options`` and ``gate_options`` (or their keywords, ``options``) and ``fused_experts``
    are :class:`MMoE`'s; ``shared_gate``: whether the level has the shared gate.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: int | Sequence[int],
        *,
        shared_gate: bool,
        shared_gate_experts: str = "all",
        expert_options: ExpertOptions | None = None,
        gate_options: GateOptions | None = None,
        fused_experts: bool = True,
        **options: object,
    ) -> None:
        super().__init__()
        expert_options, gate_options = layer_options(
            "CGCLevel", options, expert_options=expert_options, gate_options=gate_options
        )
        self.shared_gate_experts = _validate_shared_gate_experts(shared_gate_experts, num_shared_experts, shared_gate)
        self.fused_experts = validate_flag("fused_experts", fused_experts)
        num_experts = num_shared_experts + num_tasks * num_task_experts
        top_k = validate_top_k(gate_options.top_k, num_experts)
        # Which input each expert reads: the shared input (index T) or its task's input.
        group = [num_tasks] * num_shared_experts + [t for t in range(num_tasks) for _ in range(num_task_experts)]
        self.register_buffer("group", torch.tensor(group), persistent=False)
        self.num_gates = num_tasks + int(shared_gate)
        mask = torch.zeros(self.num_gates, num_experts, dtype=torch.bool)
        for t in range(num_tasks):
            mask[t] = (self.group == num_tasks) | (self.group == t)
        if shared_gate:
            mask[num_tasks] = True if shared_gate_experts == "all" else self.group == num_tasks
        expert_hidden = validate_widths("expert_hidden", expert_hidden)
        self.experts = Experts(in_features, num_experts, expert_hidden, **dataclasses.asdict(expert_options))
        width = self.experts.out_features
        self.gate = _make_gate(
            gate_options, expert_options, in_features, self.num_gates, num_experts, width, mask=mask, top_k=top_k
        )

    def forward(self, inputs: Tensor) -> Tensor:
        gate_inputs, expert_inputs = inputs[:, : self.num_gates], inputs[:, self.group]
        return _gate_mix(self.gate, self.experts, gate_inputs, expert_inputs, self.fused_experts)


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020): stacked CGC levels with fused gates.

    ``forward(x [B, in_features])`` returns ``[B, T, D]`` with ``D = expert_hidden[-1]`` (or ``[B, T]``
    with towers). ``num_levels = 1`` is a single CGC layer.

    Each level has ``num_shared_experts`` experts that every task's gate may use and
    ``num_task_experts`` experts per task that only that task's gate may use (a gate mask). Every level
    but the last also has a shared gate, over all its experts or only its shared ones
    (``shared_gate_experts``), whose output is the next level's shared input; task t's gate output is the
    next level's input for task t's experts. Every level has its own experts and gates, built with the
    same options.

    Args:
        in_features: width of the input ``x`` (the first level's input for every expert).
        num_tasks: T, the number of tasks (one gate each per level).
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task per level.
        expert_hidden: the experts' widths (an int for one layer); the last one, D, is the input width
            of the levels after the first.
        num_levels: number of stacked CGC levels.
        shared_gate_experts: the experts a non-final level's shared gate mixes: ``"all"`` (the PLE paper's,
            torch-rechub's and DeepCTR-Torch's layout) or ``"shared"`` (only the shared experts, FuxiCTR's).
        expert_options, gate_options: as in :class:`MMoE` (dataclasses or keywords), for every level. The
            softmax gate reads each gate's own input, ``softmax(W_g x_g)``, and ``"attention_input_query"``
            computes each gate's queries ``x_g W_g + b_g`` from it; ``top_k`` keeps the best allowed experts.
        tower_options: as in :class:`MMoE`.
        options: the keywords of the groups not given as a dataclass.
        fused_experts: as in :class:`MMoE`, for every level.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range, named in the message. A level
            has ``E = num_shared_experts + num_tasks * num_task_experts`` experts, 1 to 256, and
            ``num_tasks`` gates (16 at most), plus a shared gate when ``num_levels > 1`` (15 tasks at most).
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: int | Sequence[int],
        *,
        num_levels: int = 1,
        shared_gate_experts: str = "all",
        expert_options: ExpertOptions | None = None,
        gate_options: GateOptions | None = None,
        tower_options: TowerOptions | None = None,
        fused_experts: bool = True,
        **options: object,
    ) -> None:
        super().__init__()
        in_features = validate_count("in_features", in_features, 1)
        num_levels = validate_count("num_levels", num_levels, 1)
        num_tasks = validate_count("num_tasks", num_tasks, 1)
        if num_tasks + int(num_levels > 1) > MAX_TASKS:
            raise ValueError(
                f"num_tasks = {num_tasks} with num_levels = {num_levels}: every level but the last has a shared gate "
                f"besides the task gates, and the kernels support at most {MAX_TASKS} gates per level"
            )
        num_shared_experts = validate_count("num_shared_experts", num_shared_experts, 0)
        num_task_experts = validate_count("num_task_experts", num_task_experts, 0)
        num_experts = num_shared_experts + num_tasks * num_task_experts
        if not 1 <= num_experts <= MAX_EXPERTS:
            raise ValueError(
                f"num_shared_experts + num_tasks * num_task_experts = {num_experts}: each level needs 1 to "
                f"{MAX_EXPERTS} experts (the kernels' limit)"
            )
        expert_options, gate_options, tower_options = layer_options(
            "PLE", options, expert_options=expert_options, gate_options=gate_options, tower_options=tower_options
        )
        self.num_tasks = num_tasks
        self.levels = nn.ModuleList()
        width = in_features
        for level in range(num_levels):
            cgc = CGCLevel(
                width,
                num_tasks,
                num_shared_experts,
                num_task_experts,
                expert_hidden,
                shared_gate=level < num_levels - 1,
                shared_gate_experts=shared_gate_experts,
                expert_options=expert_options,
                gate_options=gate_options,
                fused_experts=fused_experts,
            )
            self.levels.append(cgc)
            width = cgc.experts.out_features
        self.out_features = width
        self.towers = _make_towers(tower_options, expert_options, num_tasks, width)

    def forward(self, x: Tensor) -> Tensor:
        """Run the experts and the gates (and the towers) on ``x``, a ``[B, in_features]`` batch.

        Returns ``[B, T, D]``, or ``[B, T]`` with towers.
        """
        out = x[:, None, :].expand(x.shape[0], self.num_tasks + 1, x.shape[1])
        for level in self.levels:
            out = level(out)
        return self.towers(out) if self.towers is not None else out
