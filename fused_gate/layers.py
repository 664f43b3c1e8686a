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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_gate._hooks import forward_hooked
from fused_gate._validation import (
    GATES,
    MAX_EXPERTS,
    MAX_TASKS,
    fits_one_kernel,
    validate_activation,
    validate_count,
    validate_dropout,
    validate_flag,
    validate_top_k,
    validate_widths,
)
from fused_gate.dispatch import uses_kernels
from fused_gate.experts import Experts, TaskTowers
from fused_gate.gates import AttentionMix, InputQueryAttentionMix, SoftmaxGate

LAYER_GATES = (*GATES, "attention_input_query")
"""The layers' gate kinds: the ops' two, and the attention gate whose per-task queries are computed from the
input (:class:`~fused_gate.gates.InputQueryAttentionMix`)."""
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
    kind: str,
    in_features: int,
    num_gates: int,
    num_experts: int,
    expert_width: int,
    *,
    mask: Tensor | None,
    top_k: int | None,
    gate_hidden: Sequence[int],
    gate_bias: bool,
    gate_batch_norm: bool,
    activation: str,
    dropout: float,
    batch_norm: bool,
) -> Gate:
    """The layer's gate module; the gate DNN shares the experts' activation, dropout and BatchNorm option."""
    if kind not in LAYER_GATES:
        raise ValueError(f"gate must be one of {LAYER_GATES}, got {kind!r}")
    gate_hidden = validate_widths("gate_hidden", gate_hidden, allow_empty=True)
    if kind == "attention":
        if gate_hidden or not gate_bias or gate_batch_norm:
            raise ValueError(
                "gate_hidden, gate_bias and gate_batch_norm configure the softmax gate's logits; "
                "the attention gate has none, use gate='softmax'"
            )
        return AttentionMix(num_gates, expert_width, mask=mask, top_k=top_k)
    if kind == "attention_input_query":
        if gate_hidden or gate_batch_norm:
            raise ValueError(
                "gate_hidden and gate_batch_norm configure the softmax gate's logits; gate='attention_input_query' "
                "has a query Linear per task (gate_bias is its bias)"
            )
        return InputQueryAttentionMix(in_features, num_gates, expert_width, mask=mask, top_k=top_k, bias=gate_bias)
    return SoftmaxGate(
        in_features,
        num_gates,
        num_experts,
        mask=mask,
        top_k=top_k,
        bias=gate_bias,
        hidden=gate_hidden,
        activation=activation,
        dropout=dropout,
        hidden_batch_norm=batch_norm,
        logits_batch_norm=gate_batch_norm,
    )


def _make_towers(
    num_tasks: int,
    in_features: int,
    tower_hidden: int | Sequence[int] | None,
    *,
    activation: str,
    dropout: float,
    batch_norm: bool,
    bias: bool,
) -> TaskTowers | None:
    if tower_hidden is None:
        return None
    return TaskTowers(
        num_tasks, in_features, tower_hidden, activation=activation, dropout=dropout, batch_norm=batch_norm, bias=bias
    )


def _check_options(**options: object) -> None:
    """The layers' options that take a bool (``None``: the default of a tower option), an activation name or a
    dropout probability, each checked by its name."""
    for name, value in options.items():
        if value is None:
            continue
        if name.endswith("activation"):
            validate_activation(value)
        elif name.endswith("dropout"):
            validate_dropout(value)
        else:
            validate_flag(name, value)


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


def _or(value, default):
    return default if value is None else value


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018) with a fused gate.

    ``forward(x [B, in_features])`` returns the per-task mixed features ``[B, T, D]`` with
    ``D = expert_hidden[-1]``, or the towers' outputs ``[B, T]`` when ``tower_hidden`` is given.

    Args:
        in_features: width of the input ``x``, which every expert and the gate (but ``"attention"``) read.
        num_experts: E, the number of experts.
        expert_hidden: the experts' widths (an int for one layer); the last one, D, is the width of
            each task's mix.
        num_tasks: T, the number of tasks (one gate each).
        gate: ``"attention"`` (one learned query vector per task over the expert outputs:
            :class:`~fused_gate.AttentionMix`), ``"softmax"`` (``softmax(W_t x)``, the paper's gate:
            :class:`~fused_gate.SoftmaxGate`) or ``"attention_input_query"`` (attention over the expert
            outputs with each task's query computed from the input, ``x W_t + b_t``:
            :class:`~fused_gate.InputQueryAttentionMix`).
        top_k: sparse gate, keep the ``top_k`` best experts per row and task (default: all E).
        tower_hidden: add one MLP tower per task, ``D -> tower_hidden... -> 1`` (an int for one hidden
            layer, ``()`` for a single Linear), giving ``[B, T]``.
        activation: the activation of every hidden layer (experts, gate DNN, towers unless
            ``tower_activation``): one of ``fused_gate.activations.ACTIVATIONS``.
        dropout: dropout probability after every hidden layer's activation (experts, gate DNN, towers
            unless ``tower_dropout``).
        batch_norm: a BatchNorm after every hidden layer's Linear (experts, gate DNN, towers unless
            ``tower_batch_norm``), one per expert / gate / tower.
        gate_hidden: the softmax gate's DNN widths before its final Linear (default: none).
        gate_bias: whether the softmax gate's final Linear (or ``"attention_input_query"``'s query Linear)
            has a bias.
        gate_batch_norm: a BatchNorm on the softmax gate's logits, before the softmax.
        tower_activation, tower_dropout, tower_batch_norm: the towers' hidden layers' options (default:
            the experts').
        tower_bias: whether the towers' output Linear has a bias.
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
            ``num_experts`` is at most 256 and ``num_tasks`` at most 16 (the kernels' limits).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: int | Sequence[int],
        num_tasks: int,
        *,
        gate: str = "attention",
        top_k: int | None = None,
        tower_hidden: int | Sequence[int] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        gate_hidden: Sequence[int] = (),
        gate_bias: bool = True,
        gate_batch_norm: bool = False,
        tower_activation: str | None = None,
        tower_dropout: float | None = None,
        tower_batch_norm: bool | None = None,
        tower_bias: bool = True,
        fused_experts: bool = True,
    ) -> None:
        super().__init__()
        in_features = validate_count("in_features", in_features, 1)
        num_experts = validate_count("num_experts", num_experts, 1, MAX_EXPERTS)
        num_tasks = validate_count("num_tasks", num_tasks, 1, MAX_TASKS)
        top_k = validate_top_k(top_k, num_experts)
        _check_options(
            batch_norm=batch_norm, gate_bias=gate_bias, gate_batch_norm=gate_batch_norm, tower_bias=tower_bias,
            tower_batch_norm=tower_batch_norm, fused_experts=fused_experts, tower_activation=tower_activation,
            tower_dropout=tower_dropout,
        )  # fmt: skip
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.fused_experts = fused_experts
        options = dict(activation=activation, dropout=dropout, batch_norm=batch_norm)
        expert_hidden = validate_widths("expert_hidden", expert_hidden)
        self.experts = Experts(in_features, num_experts, expert_hidden, **options)
        self.out_features = self.experts.out_features
        self.gate = _make_gate(
            gate,
            in_features,
            num_tasks,
            num_experts,
            self.out_features,
            mask=None,
            top_k=top_k,
            gate_hidden=gate_hidden,
            gate_bias=gate_bias,
            gate_batch_norm=gate_batch_norm,
            **options,
        )
        self.towers = _make_towers(
            num_tasks,
            self.out_features,
            tower_hidden,
            activation=_or(tower_activation, activation),
            dropout=_or(tower_dropout, dropout),
            batch_norm=_or(tower_batch_norm, batch_norm),
            bias=tower_bias,
        )

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
    FuxiCTR). The expert and gate options are :class:`MMoE`'s.
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
        gate: str = "attention",
        top_k: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        gate_hidden: Sequence[int] = (),
        gate_bias: bool = True,
        gate_batch_norm: bool = False,
        fused_experts: bool = True,
    ) -> None:
        super().__init__()
        self.shared_gate_experts = _validate_shared_gate_experts(shared_gate_experts, num_shared_experts, shared_gate)
        self.fused_experts = fused_experts
        num_experts = num_shared_experts + num_tasks * num_task_experts
        top_k = validate_top_k(top_k, num_experts)
        # Which input each expert reads: the shared input (index T) or its task's input.
        group = [num_tasks] * num_shared_experts + [t for t in range(num_tasks) for _ in range(num_task_experts)]
        self.register_buffer("group", torch.tensor(group), persistent=False)
        self.num_gates = num_tasks + int(shared_gate)
        mask = torch.zeros(self.num_gates, num_experts, dtype=torch.bool)
        for t in range(num_tasks):
            mask[t] = (self.group == num_tasks) | (self.group == t)
        if shared_gate:
            mask[num_tasks] = True if shared_gate_experts == "all" else self.group == num_tasks
        options = dict(activation=activation, dropout=dropout, batch_norm=batch_norm)
        expert_hidden = validate_widths("expert_hidden", expert_hidden)
        self.experts = Experts(in_features, num_experts, expert_hidden, **options)
        self.gate = _make_gate(
            gate,
            in_features,
            self.num_gates,
            num_experts,
            self.experts.out_features,
            mask=mask,
            top_k=top_k,
            gate_hidden=gate_hidden,
            gate_bias=gate_bias,
            gate_batch_norm=gate_batch_norm,
            **options,
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
        gate: ``"attention"``, ``"softmax"`` (``softmax(W_g x_g)`` on each gate's own input) or
            ``"attention_input_query"`` (queries ``x_g W_g + b_g`` from each gate's own input), as in :class:`MMoE`.
        top_k: sparse gates, keep the ``top_k`` best allowed experts per row and gate.
        tower_hidden: add one MLP tower per task, as in :class:`MMoE`.
        activation, dropout, batch_norm: as in :class:`MMoE`, for every level.
        gate_hidden, gate_bias, gate_batch_norm: as in :class:`MMoE`, for every level.
        tower_activation, tower_dropout, tower_batch_norm, tower_bias: as in :class:`MMoE`.
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
        gate: str = "attention",
        top_k: int | None = None,
        tower_hidden: int | Sequence[int] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        gate_hidden: Sequence[int] = (),
        gate_bias: bool = True,
        gate_batch_norm: bool = False,
        tower_activation: str | None = None,
        tower_dropout: float | None = None,
        tower_batch_norm: bool | None = None,
        tower_bias: bool = True,
        fused_experts: bool = True,
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
        top_k = validate_top_k(top_k, num_experts)
        _check_options(
            batch_norm=batch_norm, gate_bias=gate_bias, gate_batch_norm=gate_batch_norm, tower_bias=tower_bias,
            tower_batch_norm=tower_batch_norm, fused_experts=fused_experts, tower_activation=tower_activation,
            tower_dropout=tower_dropout,
        )  # fmt: skip
        self.num_tasks = num_tasks
        options = dict(activation=activation, dropout=dropout, batch_norm=batch_norm)
        gate_options = dict(gate_hidden=gate_hidden, gate_bias=gate_bias, gate_batch_norm=gate_batch_norm)
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
                gate=gate,
                top_k=top_k,
                fused_experts=fused_experts,
                **options,
                **gate_options,
            )
            self.levels.append(cgc)
            width = cgc.experts.out_features
        self.out_features = width
        self.towers = _make_towers(
            num_tasks,
            width,
            tower_hidden,
            activation=_or(tower_activation, activation),
            dropout=_or(tower_dropout, dropout),
            batch_norm=_or(tower_batch_norm, batch_norm),
            bias=tower_bias,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Run the experts and the gates (and the towers) on ``x``, a ``[B, in_features]`` batch.

        Returns ``[B, T, D]``, or ``[B, T]`` with towers.
        """
        out = x[:, None, :].expand(x.shape[0], self.num_tasks + 1, x.shape[1])
        for level in self.levels:
            out = level(out)
        return self.towers(out) if self.towers is not None else out
