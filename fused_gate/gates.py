"""The gate modules, each one fused mix per call: ``AttentionMix`` (one learned query per task over the expert
outputs), ``InputQueryAttentionMix`` (each task's query computed from the input, ``x W_t + b_t``) and
``SoftmaxGate`` (``softmax(W_t x)``, the classic MMoE/PLE gate)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_gate._validation import (
    MAX_EXPERTS,
    MAX_TASKS,
    validate_count,
    validate_flag,
    validate_module_mask,
    validate_positive_float,
    validate_top_k,
    validate_widths,
)
from fused_gate.experts import BatchedDense, BatchedLinear, BatchedMLP
from fused_gate.fused_experts import experts_mix
from fused_gate.ops import attention_mix, softmax_mix


def _as_expert_tensor(h: Tensor | Sequence[Tensor]) -> tuple[Tensor, bool]:
    """``[B, E, D]`` from a tensor or from a list of E ``[B, D]`` tensors (stacked: one copy)."""
    if isinstance(h, Tensor):
        return h, False
    if isinstance(h, list | tuple) and h and all(isinstance(x, Tensor) for x in h):
        if any(x.dim() != 2 or x.shape != h[0].shape for x in h):
            raise ValueError(
                "a list of expert outputs must hold E tensors of the same shape [B, D], got shapes "
                f"{[tuple(x.shape) for x in h]}"
            )
        return torch.stack(list(h), dim=1), True
    raise TypeError(f"h must be a [B, E, D] tensor or a non-empty list of [B, D] tensors, got {type(h).__name__}")


class AttentionMix(nn.Module):
    """Attention gate of a multi-task MoE: each task owns a learned context (query) vector.

    ``Y[b,t] = sum_e softmax_e(scale * <C[t], H[b,e]>) * H[b,e]`` with ``C [T, D]`` the module's
    ``context`` parameter, initialised from ``N(0, 1)`` (with the default ``scale = 1/sqrt(D)`` the
    initial scores have unit-order spread, like attention logits).

    ``forward(h)`` takes ``[B, E, D]`` and returns ``[B, T, D]``; given a list of E ``[B, D]`` tensors
    (what most MMoE code builds) it returns a list of T ``[B, D]`` tensors, one per task tower.

    Args:
        num_tasks: T, the number of gates (tasks).
        dim: D, the experts' output width.
        scale: score scale, default ``1 / sqrt(D)``.
        mask: optional bool ``[T, E]`` of the experts each task may use (a buffer, saved in the
            ``state_dict``).
        top_k: keep only the ``top_k`` best experts per row and task.
        device: where the ``context`` parameter (and the mask buffer) are created, as in ``nn.Linear``.
        dtype: the ``context`` parameter's dtype (default: torch's default dtype). It may differ from
            ``h``'s: a float32 context over bf16 experts is fine.
    """

    def __init__(
        self,
        num_tasks: int,
        dim: int,
        *,
        scale: float | None = None,
        mask: Tensor | None = None,
        top_k: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_tasks = validate_count("num_tasks", num_tasks, 1, MAX_TASKS)
        dim = validate_count("dim", dim, 1)
        self.num_tasks, self.dim = num_tasks, dim
        self.scale = None if scale is None else validate_positive_float("scale", scale)
        self.top_k = validate_top_k(top_k)
        self.context = nn.Parameter(torch.empty(num_tasks, dim, device=device, dtype=dtype))
        validate_module_mask(mask, num_tasks)
        self.register_buffer("mask", None if mask is None else mask.to(device), persistent=mask is not None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the context vectors from ``N(0, 1)``."""
        nn.init.normal_(self.context)

    def forward(
        self, h: Tensor | Sequence[Tensor], return_weights: bool = False
    ) -> Tensor | list[Tensor] | tuple[Tensor | list[Tensor], Tensor]:
        """Mix the expert outputs for every task.

        Args:
            h: the expert outputs, in one of two forms:

                - a tensor ``[B, E, D]`` with ``D = dim``, any strides: an ``[E, B, D]`` buffer is
                  passed as ``h.transpose(0, 1)`` and read in place, with no copy;
                - a list (or tuple) of E tensors ``[B, D]``, what most MMoE code builds; they are
                  stacked into one ``[B, E, D]`` tensor (one copy).
            return_weights: also return the gate weights ``p [B, T, E]`` (``p[b,t,e]`` is expert e's
                share in task t's mix; differentiable), e.g. to monitor expert use.

        Returns:
            ``Y [B, T, D]`` for a tensor ``h``, or a list of T tensors ``[B, D]`` (one per task
            tower) for a list; with ``return_weights``, the pair ``(Y, p)``. ``Y`` and ``p`` take
            ``h``'s dtype.
        """
        stacked, from_list = _as_expert_tensor(h)
        if stacked.dim() == 3 and stacked.shape[-1] != self.dim:
            got = f"a list of [B, D] tensors of shape {tuple(h[0].shape)}" if from_list else f"shape {tuple(h.shape)}"
            raise ValueError(
                f"h's last dimension must be dim = {self.dim} (h is [B, E, D] with D = dim), got {got}; "
                "h may be a transposed view, e.g. an [E, B, D] buffer passed as h.transpose(0, 1)"
            )
        out = attention_mix(
            stacked,
            self.context,
            scale=self.scale,
            mask=self.mask,
            top_k=self.top_k,
            return_weights=return_weights,
        )
        y, p = out if return_weights else (out, None)
        if from_list:
            y = list(y.unbind(1))
        return (y, p) if return_weights else y

    def mix(self, x: Tensor, h: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The gate call of the MMoE / PLE layers (shared with :meth:`SoftmaxGate.mix`): ``forward(h)``.

        ``x`` (the layer's input) is not read: the attention gate scores the expert outputs ``h``
        (``[B, E, D]``) against its context vectors. ``return_weights`` as in :meth:`forward`.
        """
        return self(h, return_weights)

    def mix_experts(self, x: Tensor, z: Tensor, layer: BatchedDense) -> Tensor:
        """:meth:`mix` of ``layer(z)`` in one kernel that never writes the experts' outputs
        (:func:`fused_gate.experts_mix`; inference only).

        Args:
            x: the layer's input (not read: the attention gate scores the experts' outputs).
            z: the input of the experts' last layer, ``[B, K]`` or ``[B, E, K]``.
            layer: the experts' last layer (``weight [E, K, D]``, ``bias [E, D]``, its activation).
        """
        return experts_mix(
            z, layer.weight, layer.bias, activation=layer.activation, context=self.context, scale=self.scale,
            mask=self.mask, top_k=self.top_k,
        )  # fmt: skip

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={v}" for k, v in (("scale", self.scale), ("top_k", self.top_k)) if v is not None)
        return f"num_tasks={self.num_tasks}, dim={self.dim}{extras}, masked={self.mask is not None}"


def _validate_gate_input(x: Tensor, num_tasks: int, in_features: int) -> None:
    """A gate input is ``[B, in_features]`` (one input for every gate) or ``[B, T, in_features]`` (one per gate)."""
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[1] != num_tasks) or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have shape [B, in_features] or [B, T, in_features] with T = {num_tasks} and "
            f"in_features = {in_features}, got {list(x.shape)}"
        )


class InputQueryAttentionMix(nn.Module):
    """Attention gate whose task queries are computed from the input: ``c_t(x) = x W_t + b_t``.

    ``Y[b,t] = sum_e softmax_e(scale * <c_t(x_b), H[b,e]>) * H[b,e]``: the scores read the expert outputs,
    as in :class:`AttentionMix`, but each row's query is a Linear of its own input (one Linear per task,
    ``query.weight [T, in_features, D]``, ``query.bias [T, D]``, ``nn.Linear``'s initialisation), so the
    gate can route every row by its input, as the softmax gate does. The queries ``[B, T, D]`` go to
    :func:`fused_gate.attention_mix` as its per-row context. With ``W_t = 0`` it is :class:`AttentionMix`
    with context ``b``.

    ``forward(x, h)`` takes the gates' input ``x`` and the expert outputs ``h [B, E, D]`` and returns
    ``[B, T, D]``.

    Args:
        in_features: width of the gate's input ``x``.
        num_tasks: T, the number of gates (tasks).
        dim: D, the experts' output width (and the queries').
        scale: score scale, default ``1 / sqrt(D)``.
        mask: optional bool ``[T, E]`` of the experts each task may use (a buffer, saved in the
            ``state_dict``).
        top_k: keep only the ``top_k`` best experts per row and task.
        bias: whether the query Linears have the bias ``b_t``.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        dim: int,
        *,
        scale: float | None = None,
        mask: Tensor | None = None,
        top_k: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        in_features = validate_count("in_features", in_features, 1)
        num_tasks = validate_count("num_tasks", num_tasks, 1, MAX_TASKS)
        dim = validate_count("dim", dim, 1)
        validate_flag("bias", bias)
        self.in_features, self.num_tasks, self.dim = in_features, num_tasks, dim
        self.scale = None if scale is None else validate_positive_float("scale", scale)
        self.top_k = validate_top_k(top_k)
        self.query = BatchedLinear(in_features, dim, num_tasks, bias=bias)
        validate_module_mask(mask, num_tasks)
        self.register_buffer("mask", mask, persistent=mask is not None)

    def queries(self, x: Tensor) -> Tensor:
        """The tasks' queries ``[B, T, D]`` from ``x``, ``[B, in]`` (one input for every gate) or ``[B, T, in]``."""
        _validate_gate_input(x, self.num_tasks, self.in_features)
        return self.query(x)

    def forward(self, x: Tensor, h: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gate ``h`` by scores against queries computed from ``x``.

        Args:
            x: the gates' input, ``[B, in_features]`` (shared by every gate) or ``[B, T, in_features]``
                (one per gate, as in a CGC level).
            h: the expert outputs ``[B, E, D]``, any strides.
            return_weights: also return the gate weights ``p [B, T, E]`` (differentiable).

        Returns:
            ``Y [B, T, D]``, or ``(Y, p)`` with ``return_weights``.
        """
        return attention_mix(
            h, self.queries(x), scale=self.scale, mask=self.mask, top_k=self.top_k, return_weights=return_weights
        )

    def mix(self, x: Tensor, h: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The gate call of the MMoE / PLE layers (shared with :meth:`SoftmaxGate.mix`): ``forward(x, h)``.

        Args: ``x``, ``h`` and ``return_weights`` as in :meth:`forward`.
        """
        return self(x, h, return_weights)

    def mix_experts(self, x: Tensor, z: Tensor, layer: BatchedDense) -> Tensor:
        """:meth:`mix` of ``layer(z)`` in one kernel that never writes the experts' outputs
        (:func:`fused_gate.experts_mix` with a per-row context; inference only).

        Args:
            x: the gates' input, as in :meth:`forward` (the queries come from it).
            z: the input of the experts' last layer, ``[B, K]`` or ``[B, E, K]``.
            layer: the experts' last layer (``weight [E, K, D]``, ``bias [E, D]``, its activation).
        """
        return experts_mix(
            z, layer.weight, layer.bias, activation=layer.activation, context=self.queries(x), scale=self.scale,
            mask=self.mask, top_k=self.top_k,
        )  # fmt: skip

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={v}" for k, v in (("scale", self.scale), ("top_k", self.top_k)) if v is not None)
        sizes = f"in_features={self.in_features}, num_tasks={self.num_tasks}, dim={self.dim}"
        return f"{sizes}{extras}, masked={self.mask is not None}"


class SoftmaxGate(nn.Module):
    """Classic MMoE/PLE gate: ``p_t = softmax(BN(dnn_t(x_t) W_t + b_t) / temperature)``, then the fused mix.

    Each of the T gates has its own optional DNN (``hidden`` widths, ``Linear -> BatchNorm -> activation
    -> dropout`` per layer, DeepCTR-Torch's gate DNN), its own final Linear to the E logits
    (``linear.weight [T, K, E]``, ``linear.bias [T, E]``), and an optional BatchNorm on the logits
    (torch-rechub's gate), all batched over the gates. The softmax and the weighted sum of the experts
    run in :func:`fused_gate.softmax_mix`. ``forward(x, h)`` returns ``[B, T, D]``.

    Args:
        in_features: width of the gate's input ``x``.
        num_tasks: T, the number of gates (tasks).
        num_experts: E, the number of experts mixed.
        temperature: softmax temperature (> 0); the logits are divided by it.
        mask: optional bool ``[T, E]`` of the experts each task may use (a buffer, saved in the
            ``state_dict``).
        top_k: keep only the ``top_k`` largest logits per row and task.
        bias: whether the final Linear (the logits) has a bias.
        hidden: widths of the gate DNN before the final Linear (default: none).
        activation, dropout, hidden_batch_norm: the gate DNN's activation name, dropout probability and
            per-layer BatchNorm.
        logits_batch_norm: a BatchNorm on each gate's logits before the softmax.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_experts: int,
        *,
        temperature: float = 1.0,
        mask: Tensor | None = None,
        top_k: int | None = None,
        bias: bool = True,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        hidden_batch_norm: bool = False,
        logits_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        in_features = validate_count("in_features", in_features, 1)
        num_tasks = validate_count("num_tasks", num_tasks, 1, MAX_TASKS)
        num_experts = validate_count("num_experts", num_experts, 1, MAX_EXPERTS)
        flags = dict(bias=bias, hidden_batch_norm=hidden_batch_norm, logits_batch_norm=logits_batch_norm)
        for name, flag in flags.items():
            validate_flag(name, flag)
        self.in_features, self.num_tasks, self.num_experts = in_features, num_tasks, num_experts
        self.temperature = validate_positive_float("temperature", temperature, reciprocal=True)
        self.top_k = validate_top_k(top_k, num_experts)
        hidden = validate_widths("hidden", hidden, allow_empty=True)
        options = dict(activation=activation, dropout=dropout, batch_norm=hidden_batch_norm)
        self.dnn = BatchedMLP(in_features, num_tasks, hidden, **options) if hidden else None
        self.linear = BatchedLinear(hidden[-1] if hidden else in_features, num_experts, num_tasks, bias=bias)
        self.batch_norm = nn.BatchNorm1d(num_tasks * num_experts) if logits_batch_norm else None
        validate_module_mask(mask, num_tasks)
        self.register_buffer("mask", mask, persistent=mask is not None)

    def logits(self, x: Tensor) -> Tensor:
        """The gates' logits ``[B, T, E]`` from ``x``, ``[B, in]`` (one input for every gate) or ``[B, T, in]``."""
        _validate_gate_input(x, self.num_tasks, self.in_features)
        z = self.linear(self.dnn(x) if self.dnn is not None else x)
        return z if self.batch_norm is None else self.batch_norm(z.flatten(1)).unflatten(1, z.shape[1:])

    def forward(self, x: Tensor, h: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Gate ``h`` by logits computed from ``x``.

        Args:
            x: the gates' input, ``[B, in_features]`` (shared by every gate) or ``[B, T, in_features]``
                (one per gate, as in a CGC level).
            h: the expert outputs ``[B, E, D]``, any strides.
            return_weights: also return the gate weights ``p [B, T, E]``.

        Returns:
            ``Y [B, T, D]``, or ``(Y, p)`` with ``return_weights``.
        """
        return softmax_mix(
            self.logits(x),
            h,
            temperature=self.temperature,
            mask=self.mask,
            top_k=self.top_k,
            return_weights=return_weights,
        )

    def mix(self, x: Tensor, h: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The gate call of the MMoE / PLE layers (shared with the attention gates): ``forward(x, h)``.

        Args: ``x``, ``h`` and ``return_weights`` as in :meth:`forward`.
        """
        return self(x, h, return_weights)

    def mix_experts(self, x: Tensor, z: Tensor, layer: BatchedDense) -> Tensor:
        """:meth:`mix` of ``layer(z)`` in one kernel that never writes the experts' outputs
        (:func:`fused_gate.experts_mix`; inference only).

        Args:
            x: the gates' input, as in :meth:`forward` (the logits come from it).
            z: the input of the experts' last layer, ``[B, K]`` or ``[B, E, K]``.
            layer: the experts' last layer (``weight [E, K, D]``, ``bias [E, D]``, its activation).
        """
        return experts_mix(
            z, layer.weight, layer.bias, gate="softmax", activation=layer.activation, logits=self.logits(x),
            temperature=self.temperature, mask=self.mask, top_k=self.top_k,
        )  # fmt: skip
