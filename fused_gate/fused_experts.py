"""``experts_mix``: the experts' last layer and the gate in one kernel, in inference and training.

The two-step path writes the experts' outputs ``H [B, E, D]`` (one batched matmul) and the fused gate
reads them back; in training autograd also keeps ``H`` and the pre-activation alive until the backward.
This op computes ``H`` tile by tile in registers and mixes it at once, so ``H`` never reaches memory.
Its backward recomputes ``H`` the same way from the saved inputs and the forward's weights ``p``
(``kernels/experts_mix_bwd.py``), writes the gradient of the pre-activation and leaves the reductions
over the batch, ``dW`` and ``dX`` (and ``db``), to cuBLAS. Registered with ``torch.library`` (one node
under ``torch.compile``, forward and backward); it runs the Triton kernels or the reference as
``fused_gate/dispatch.py`` decides for every op: the kernels on CUDA tensors, and on CPU tensors through
the interpreter when ``TRITON_INTERPRET=1`` was set before the kernels load (at the first op call); the
reference (:func:`fused_gate.reference.experts_mix_function`: the experts' layer, then the gate of
:mod:`fused_gate.reference`) otherwise, and for float64 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_gate import reference
from fused_gate._validation import validate_experts_mix
from fused_gate.activations import ACTIVATIONS
from fused_gate.dispatch import fused_op, reference_call

__all__ = ["experts_mix"]


# The op takes the gate kind as ``attention: bool`` (its schema since version 1 of the operator names);
# ``for_backward`` (version 2) makes it return the weights in float32, which the backward reads.


def _gate_kind(attention: bool) -> str:
    return "attention" if attention else "softmax"


def _weights_output(x: Tensor, p: Tensor | None, return_weights: bool, for_backward: bool) -> Tensor:
    """The op's second output: ``p`` in float32 for the backward, in ``x``'s dtype when only returned, else empty."""
    if for_backward:
        return p.float()
    return p.to(x.dtype) if return_weights else x.new_empty((0,))


def _experts_mix_reference(
    x, weight, bias, cz, mask, scale, top_k, attention, activation, return_weights, for_backward
):
    gate = _gate_kind(attention)
    y, p = reference.experts_mix_forward(x, weight, bias, cz, scale, mask, top_k, gate, activation)
    return y, _weights_output(x, p, return_weights, for_backward)


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
    for_backward: bool,
) -> tuple[Tensor, Tensor]:
    """``(Y, p)``: ``p`` in float32 with ``for_backward``, in ``x``'s dtype with ``return_weights`` only, else
    empty."""
    from fused_gate.kernels.experts_mix import plan_experts_mix  # the kernels load at the first kernel call

    y, p = plan_experts_mix(
        x, weight, bias, cz, mask, scale, top_k, gate=_gate_kind(attention), activation=ACTIVATIONS[activation].kernel,
        return_weights=return_weights or for_backward, weights_dtype=torch.float32 if for_backward else None,
    ).run()  # fmt: skip
    return y, p if return_weights or for_backward else x.new_empty((0,))


@_experts_mix_op.register_fake
def _(x, weight, bias, cz, mask, scale, top_k, attention, activation, return_weights, for_backward):
    experts, _, dim = weight.shape
    tasks = cz.shape[-2]
    p = x.new_empty((0,))
    if return_weights or for_backward:
        p = x.new_empty((x.shape[0], tasks, experts), dtype=torch.float32 if for_backward else x.dtype)
    return x.new_empty((x.shape[0], tasks, dim)), p


def _experts_mix_backward_reference(grad_y, grad_p, x, weight, bias, cz, p, y, scale, attention, activation):
    return reference.experts_mix_backward(
        grad_y, x, weight, bias, cz, p, scale=scale, gate=_gate_kind(attention), activation=activation,
        grad_weights=grad_p,
    )  # fmt: skip


@fused_op("experts_mix_backward", reference=_experts_mix_backward_reference)
def _experts_mix_backward_op(
    grad_y: Tensor,
    grad_p: Tensor | None,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    p: Tensor,
    y: Tensor | None,
    scale: float,
    attention: bool,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """``(dL/dpre [B, E, D], dC | dZ)`` from the forward's inputs, its float32 weights ``p`` and (attention
    gate) its mix ``y``: ``H`` recomputed, never read."""
    from fused_gate.kernels.experts_mix_bwd import plan_experts_mix_backward  # the kernels load at the first call

    return plan_experts_mix_backward(
        grad_y, grad_p, x, weight, bias, cz, p, y, scale, gate=_gate_kind(attention),
        activation=ACTIVATIONS[activation].kernel,
    ).run()  # fmt: skip


@_experts_mix_backward_op.register_fake
def _(grad_y, grad_p, x, weight, bias, cz, p, y, scale, attention, activation):
    return x.new_empty((x.shape[0], *weight.shape[::2])), cz.new_empty(cz.shape)


def _layer_grads(
    dpre: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, needed: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dX, dW, db)`` of ``pre[b,e] = X[b,(e)] W[e] + b[e]`` from ``dpre [B, E, D]``, as cuBLAS matmuls (and a
    sum over the rows); None where ``needed`` (for ``x``, ``weight``, ``bias``) says no gradient is asked for."""
    batch, experts, dim = dpre.shape
    if x.dim() == 2:
        # One input for every expert: [B, E * D] against the experts side by side.
        flat = dpre.reshape(batch, experts * dim)
        dx = flat @ weight.permute(0, 2, 1).reshape(experts * dim, -1) if needed[0] else None
        dw = (x.t() @ flat).view(-1, experts, dim).transpose(0, 1) if needed[1] else None
    else:
        # One input per expert: a batched matmul per expert, every operand read in place.
        per_expert = dpre.transpose(0, 1)
        dx = torch.bmm(per_expert, weight.transpose(1, 2)).transpose(0, 1) if needed[0] else None
        dw = torch.bmm(x.permute(1, 2, 0), per_expert) if needed[1] else None
    db = dpre.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None and needed[2] else None
    return dx, dw, db


def _experts_mix_setup(ctx, inputs, output):
    x, weight, bias, cz, _, scale, _, attention, activation, return_weights, _ = inputs
    y, p = output
    # The inputs, p (float32, [B, T, E]) and, for the attention gate, Y: nothing of size B * E * D.
    ctx.save_for_backward(x, weight, bias, cz, p, y if attention else None)
    ctx.scale, ctx.attention, ctx.activation, ctx.return_weights = scale, attention, activation, return_weights


def _experts_mix_backward(ctx, grad_y, grad_p):
    x, weight, bias, cz, p, y = ctx.saved_tensors
    grad_p = grad_p if ctx.return_weights else None  # p was kept for the backward only: no gradient reaches it
    dpre, dcz = _experts_mix_backward_op(
        grad_y, grad_p, x, weight, bias, cz, p, y, ctx.scale, ctx.attention, ctx.activation
    )
    dx, dw, db = _layer_grads(dpre, x, weight, bias, ctx.needs_input_grad[:3])
    return dx, dw, db, dcz if ctx.needs_input_grad[3] else None, *(None,) * 7


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(reference.DOUBLE_BACKWARD_REFUSED)


_experts_mix_op.register_autograd(_experts_mix_backward, setup_context=_experts_mix_setup)
_experts_mix_backward_op.register_autograd(_refuse_double_backward)


def _records_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    """The experts' last layer and a gate in one kernel launch: ``H`` is never written, in the forward or
    the backward.

    ``H[b,e] = act(x[b,(e)] @ weight[e] + bias[e])``, then ``Y[b,t] = sum_e p[b,t,e] H[b,e]`` with
    ``p = softmax_e(scale * <context[t], H[b,e]>)`` (``gate="attention"``, as
    :func:`fused_gate.attention_mix`) or ``p = softmax_e(logits[b,t] / temperature)``
    (``gate="softmax"``, as :func:`fused_gate.softmax_mix`).

    Differentiable in ``x``, ``weight``, ``bias``, ``context`` or ``logits`` (and through ``p`` when it is
    returned): the forward saves its inputs, ``p`` and (attention gate) ``Y``, nothing of size
    ``B * E * D``; the backward recomputes ``H`` in the kernel and hands the gradient of the pre-activation
    to cuBLAS for ``dW`` and ``dX``. The gradients are the two-step path's (the experts as a batched matmul,
    then the fused gate), special values included.

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
            activation is not as described.
    """
    score_scale, top_k = validate_experts_mix(
        x, weight, bias, gate, context, logits, activation, mask, top_k, scale, temperature, return_weights
    )
    attention = gate == "attention"
    cz = context if attention else logits
    first_order = reference_call(x, weight, bias, cz)
    if first_order is not None:
        y, p = reference.experts_mix_function(
            x, weight, bias, cz, score_scale, mask, top_k, gate, activation, first_order=first_order
        )
        return (y, p.to(x.dtype)) if return_weights else y
    for_backward = _records_graph(x, weight, bias, cz)
    y, p = _experts_mix_op(
        x, weight, bias, cz, mask, score_scale, top_k, attention, activation, return_weights, for_backward
    )
    return (y, p.to(x.dtype)) if return_weights else y
