"""``experts_mix``: the experts' last layer and the gate in one kernel, for inference.

The two-step path writes the experts' outputs ``H [B, E, D]`` (one batched matmul) and the fused gate
reads them back; this op computes ``H`` tile by tile in registers and mixes it at once, so ``H``
never reaches memory. It has no backward: training keeps the two-step path. Registered with
``torch.library`` (one node under ``torch.compile``); dispatch as for the other ops: CUDA tensors run
the Triton kernel, CPU tensors run it through the interpreter when ``TRITON_INTERPRET=1`` was set
before import, and :func:`fused_gate.reference.experts_mix` otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_gate import reference
from fused_gate._checks import check_experts_mix
from fused_gate.kernels.experts_mix import experts_mix_forward
from fused_gate.op_names import op_name
from fused_gate.ops import uses_kernels

__all__ = ["experts_mix"]


@torch.library.custom_op(op_name("experts_mix"), mutates_args=())
def _experts_mix_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    top_k: int | None,
    attention: bool,
    activation: str,
    return_weights: bool,
) -> tuple[Tensor, Tensor]:
    y, p = experts_mix_forward(
        x, weight, bias, cz, mask, scale, top_k, attention=attention, activation=activation,
        return_weights=return_weights,
    )  # fmt: skip
    return y, p if return_weights else x.new_empty((0,))


@_experts_mix_op.register_fake
def _(x, weight, bias, cz, mask, scale, top_k, attention, activation, return_weights):
    experts, _, dim = weight.shape
    tasks = cz.shape[-2]
    p = x.new_empty((x.shape[0], tasks, experts)) if return_weights else x.new_empty((0,))
    return x.new_empty((x.shape[0], tasks, dim)), p


def _refuse_gradients(**tensors: Tensor | None) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"experts_mix is inference-only (no backward) but {name} requires grad while grad mode is on; "
                "call it under torch.no_grad() or torch.inference_mode(), or train with the two-step path "
                "(the experts, then fused_gate.attention_mix / softmax_mix)"
            )


def experts_mix(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    gate: str = "attention",
    context: Tensor | None = None,
    logits: Tensor | None = None,
    activation: str = "relu",
    mask: Tensor | None = None,
    top_k: int | None = None,
    scale: float | None = None,
    temperature: float = 1.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The experts' last layer and a gate in one kernel launch: ``H`` is never written.

    ``H[b,e] = act(x[b,(e)] @ weight[e] + bias[e])``, then ``Y[b,t] = sum_e p[b,t,e] H[b,e]`` with
    ``p = softmax_e(scale * <context[t], H[b,e]>)`` (``gate="attention"``, as
    :func:`fused_gate.attention_mix`) or ``p = softmax_e(logits[b,t] / temperature)``
    (``gate="softmax"``, as :func:`fused_gate.softmax_mix`).

    Args:
        x: ``[B, K]`` (every expert reads the same input, as MMoE's one-layer experts) or ``[B, E, K]``
            (one input per expert: the last layer of deeper experts, PLE's per-group inputs); any strides.
        weight: ``[E, K, D]``, same dtype as ``x``.
        bias: ``[E, D]`` or None.
        gate: ``"attention"`` (scores from ``context``) or ``"softmax"`` (scores from ``logits``).
        context: the attention gate's task vectors ``[T, D]`` (shared) or ``[B, T, D]`` (per row).
        logits: the softmax gate's scores ``[B, T, E]``, from the gate's own layers.
        activation: ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"gelu"`` (erf), ``"silu"``, ``"sigmoid"``,
            ``"tanh"`` or ``"identity"``.
        scale: the attention gate's score scale, default ``1 / sqrt(D)``.
        temperature: the softmax gate's temperature (> 0).
        mask, top_k, return_weights: as in :func:`fused_gate.attention_mix`.

    Returns:
        ``Y [B, T, D]`` (and ``p [B, T, E]``) in ``x``'s dtype.

    Raises:
        ValueError: an input requires grad while grad mode is on (there is no backward), or a shape,
            gate or activation is not as described; TypeError: a wrong dtype.
    """
    _refuse_gradients(x=x, weight=weight, bias=bias, context=context, logits=logits)
    score_scale, top_k = check_experts_mix(
        x, weight, bias, gate, context, logits, activation, mask, top_k, scale, temperature,
        kernel_path=uses_kernels(x),
    )  # fmt: skip
    if not uses_kernels(x):
        return reference.experts_mix(
            x, weight, bias, gate=gate, context=context, logits=logits, activation=activation, mask=mask,
            top_k=top_k, scale=scale, temperature=temperature, return_weights=return_weights,
        )  # fmt: skip
    attention = gate == "attention"
    cz = context if attention else logits
    y, p = _experts_mix_op(x, weight, bias, cz, mask, score_scale, top_k, attention, activation, return_weights)
    return (y, p) if return_weights else y
