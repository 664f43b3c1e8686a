"""``experts_mix``: the experts' last layer and the gate in one kernel, for inference.

The two-step path writes the experts' outputs ``H [B, E, D]`` (one batched matmul) and the fused gate
reads them back; this op computes ``H`` tile by tile in registers and mixes it at once, so ``H``
never reaches memory. It has no backward: training keeps the two-step path. Registered with
``torch.library`` (one node under ``torch.compile``); it runs the Triton kernel or the reference as
``fused_gate/dispatch.py`` decides for every op: the kernel on CUDA tensors, and on CPU tensors through
the interpreter when ``TRITON_INTERPRET=1`` was set before the kernels load (at the first op call); the
reference (the experts' layer, then the gate of :mod:`fused_gate.reference`) otherwise, and
:func:`fused_gate.reference.experts_mix` for float64 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_gate import reference
from fused_gate._validation import validate_experts_mix
from fused_gate.activations import ACTIVATIONS
from fused_gate.dispatch import fused_op, reference_call

__all__ = ["experts_mix"]


# The op takes the gate kind as ``attention: bool``: its schema is unchanged since version 1 of the
# operator names (a schema change renames every operator, fused_gate/op_names.py).


def _experts_mix_reference(x, weight, bias, cz, mask, scale, top_k, attention, activation, return_weights):
    h = reference.experts_output(x, weight, bias, activation)
    if attention:
        y, p, _ = reference.attention_mix_forward(h, cz, scale, mask, top_k)
    else:
        y, p, _ = reference.softmax_mix_forward(cz, h, 1.0 / scale, mask, top_k)
    return y.to(x.dtype), p.to(x.dtype) if return_weights else x.new_empty((0,))


@fused_op("experts_mix", reference=_experts_mix_reference)
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
    from fused_gate.kernels.experts_mix import plan_experts_mix  # the kernels load at the first kernel call

    y, p = plan_experts_mix(
        x, weight, bias, cz, mask, scale, top_k, gate="attention" if attention else "softmax",
        activation=ACTIVATIONS[activation].kernel,
        return_weights=return_weights,
    ).run()  # fmt: skip
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
        ``Y [B, T, D]`` (and ``p [B, T, E]``) in ``x``'s dtype. ``H`` is rounded to ``x``'s dtype (before
        and after the activation) where the two-step path stores it, so both overflow alike in float16.

    Raises:
        TypeError: an input of the wrong type or dtype (checked first); ValueError: a shape, gate or
            activation is not as described, or an input requires grad while grad mode is on (there is no
            backward).
    """
    score_scale, top_k = validate_experts_mix(
        x, weight, bias, gate, context, logits, activation, mask, top_k, scale, temperature, return_weights
    )
    _refuse_gradients(x=x, weight=weight, bias=bias, context=context, logits=logits)
    if reference_call(x, weight, bias, context, logits) is not None:  # no autograd: either call is the same
        return reference.experts_mix(
            x, weight, bias, gate=gate, context=context, logits=logits, activation=activation, mask=mask,
            top_k=top_k, scale=scale, temperature=temperature, return_weights=return_weights,
        )  # fmt: skip
    attention = gate == "attention"
    cz = context if attention else logits
    y, p = _experts_mix_op(x, weight, bias, cz, mask, score_scale, top_k, attention, activation, return_weights)
    return (y, p) if return_weights else y
