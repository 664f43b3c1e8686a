"""The fused gate ops, registered with ``torch.library`` (fake kernels + autograd).

``torch.compile(fullgraph=True)`` sees each op as one node (no graph break) and uses the fake
kernels for shapes. Each op runs the Triton kernels or the plain-PyTorch reference as
``fused_gate/dispatch.py`` decides (as in docs/semantics.md): the kernels on CUDA tensors, and on CPU
tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernels load (at the
first op call; setting it before ``import fused_gate`` is enough); the reference otherwise. float64
inputs run the reference on every device (the kernels compute in float32), so ``model.double()`` works
wherever the model runs; in eager mode on a device without kernels the public functions call the
reference directly (:func:`fused_gate.dispatch.reference_call`).
"""

import torch
from torch import Tensor

from fused_gate import reference
from fused_gate._validation import validate_attention_mix, validate_softmax_mix
from fused_gate.dispatch import fused_op, reference_call

__all__ = ["attention_mix", "softmax_mix"]


def _no_weights(h: Tensor) -> Tensor:
    return h.new_empty((0,))


def _no_kept(h: Tensor) -> Tensor:
    return h.new_empty((0,), dtype=torch.bool)


def _kept_buffer(h: Tensor, tasks: int, top_k: int | None) -> Tensor | None:
    """With top-k, the forward records the experts it kept (bool ``[B, T, E]``) for the backward."""
    return h.new_empty((h.shape[0], tasks, h.shape[1]), dtype=torch.bool) if top_k is not None else None


def _forward_outputs(h, y, p, kept, top_k, return_weights) -> tuple[Tensor, Tensor, Tensor]:
    """The forward ops' outputs ``(Y, p, kept)``; ``p`` and ``kept`` are empty placeholders when not asked for."""
    return y, p if return_weights else _no_weights(h), kept if top_k is not None else _no_kept(h)


def _forward_kernels(h, cz, mask, scale, top_k, return_weights, gate) -> tuple[Tensor, Tensor, Tensor]:
    """The forward ops' outputs from the kernels; with top-k the launch fills the kept experts."""
    from fused_gate.kernels.gate_mix_fwd import plan_forward  # the kernels load at the first kernel call

    kept = _kept_buffer(h, cz.shape[-2], top_k)
    y, p = plan_forward(h, cz, mask, scale, top_k, gate=gate, return_weights=return_weights, kept=kept).run()
    return _forward_outputs(h, y, p, kept, top_k, return_weights)


def _backward_kernels(grad_y, grad_p, h, cz, mask, scale, gate) -> tuple[Tensor, Tensor]:
    """``(dH, dC)`` or ``(dH, dZ)`` from the kernels."""
    from fused_gate.kernels.gate_mix_bwd import plan_backward  # the kernels load at the first kernel call

    return plan_backward(grad_y, grad_p, h, cz, mask, scale, gate=gate).run()


def _backward_mask(mask: Tensor | None, kept: Tensor, top_k: int | None) -> Tensor | None:
    """The backward mixes the forward's kept experts (top-k already applied) or the user's mask."""
    return kept if top_k is not None else mask


def _grad_weights(grad_p: Tensor | None) -> Tensor | None:
    # p is an empty placeholder when return_weights=False; its gradient carries no information.
    return grad_p if grad_p is not None and grad_p.dim() == 3 else None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(reference.DOUBLE_BACKWARD_REFUSED)


# ---------------------------------------------------------------------------- attention_mix


def _attention_mix_reference(h, context, mask, scale, top_k, return_weights):
    y, p, kept = reference.attention_mix_forward(h, context, scale, mask, top_k)
    return _forward_outputs(h, y, p, kept, top_k, return_weights)


@fused_op("attention_mix", reference=_attention_mix_reference)
def _attention_mix_op(
    h: Tensor, context: Tensor, mask: Tensor | None, scale: float, top_k: int | None, return_weights: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_kernels(h, context, mask, scale, top_k, return_weights, "attention")


@_attention_mix_op.register_fake
def _(h, context, mask, scale, top_k, return_weights):
    batch, experts, dim = h.shape
    tasks = context.shape[-2]
    p = h.new_empty((batch, tasks, experts)) if return_weights else _no_weights(h)
    kept = _kept_buffer(h, tasks, top_k) if top_k is not None else _no_kept(h)
    return h.new_empty((batch, tasks, dim)), p, kept


def _attention_mix_backward_reference(grad_y, grad_p, h, context, mask, scale):
    return reference.attention_mix_backward(grad_y, h, context, scale=scale, mask=mask, grad_weights=grad_p)


@fused_op("attention_mix_backward", reference=_attention_mix_backward_reference)
def _attention_mix_backward_op(
    grad_y: Tensor,
    grad_p: Tensor | None,
    h: Tensor,
    context: Tensor,
    mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``(dH, dC)``. ``mask`` holds the experts the forward mixed (with top-k: the kept ones), so no top-k here."""
    return _backward_kernels(grad_y, grad_p, h, context, mask, scale, "attention")


@_attention_mix_backward_op.register_fake
def _(grad_y, grad_p, h, context, mask, scale):
    return h.new_empty(h.shape), context.new_empty(context.shape)


def _attention_mix_setup(ctx, inputs, output):
    h, context, mask, scale, top_k, _ = inputs
    ctx.save_for_backward(h, context, _backward_mask(mask, output[2], top_k))
    ctx.scale = scale


def _attention_mix_backward(ctx, grad_y, grad_p, _grad_kept):
    h, context, mask = ctx.saved_tensors
    dh, dc = _attention_mix_backward_op(grad_y, _grad_weights(grad_p), h, context, mask, ctx.scale)
    return dh, dc, None, None, None, None


_attention_mix_op.register_autograd(_attention_mix_backward, setup_context=_attention_mix_setup)
_attention_mix_backward_op.register_autograd(_refuse_double_backward)


def attention_mix(
    h: Tensor,
    context: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    top_k: int | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention gate, fused: ``Y[b,t] = sum_e softmax_e(scale * <C[t], H[b,e]>) * H[b,e]``.

    Args:
        h: expert outputs ``[B, E, D]``, any strides (a transposed ``[E, B, D]`` tensor is read in place).
        context: task query vectors ``[T, D]`` (shared) or ``[B, T, D]`` (per row).
        scale: score scale, default ``1 / sqrt(D)``.
        mask: bool ``[T, E]`` or ``[B, T, E]``; False excludes an expert. A task with no allowed
            expert gets ``p = 0`` and ``Y = 0``.
        top_k: keep only the ``top_k`` largest scores per (row, task); ties go to the lowest expert.
            The backward uses exactly the experts the forward kept.
        return_weights: also return the gate weights ``p [B, T, E]``.

    Returns:
        ``Y [B, T, D]`` in ``h``'s dtype (and ``p`` in ``h``'s dtype). Gradients flow to ``h``,
        ``context`` and through ``p`` when it is returned. With a float64 input, under ``torch.func``
        transforms, with forward-mode AD and in eager mode on a CPU without ``TRITON_INTERPRET`` the op runs
        :func:`fused_gate.reference.attention_mix` (same semantics).
    """
    scale, top_k = validate_attention_mix(h, context, scale, mask, top_k, return_weights)
    first_order = reference_call(h, context)
    if first_order is not None:
        y, p = reference.attention_mix_function(h, context, scale, mask, top_k, first_order=first_order)
        return (y, p.to(h.dtype)) if return_weights else y
    y, p, _ = _attention_mix_op(h, context, mask, scale, top_k, return_weights)
    return (y, p) if return_weights else y


# ---------------------------------------------------------------------------- softmax_mix


def _softmax_mix_reference(logits, h, mask, temperature, top_k, return_weights):
    y, p, kept = reference.softmax_mix_forward(logits, h, temperature, mask, top_k)
    return _forward_outputs(h, y, p, kept, top_k, return_weights)


@fused_op("softmax_mix", reference=_softmax_mix_reference)
def _softmax_mix_op(
    logits: Tensor,
    h: Tensor,
    mask: Tensor | None,
    temperature: float,
    top_k: int | None,
    return_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_kernels(h, logits, mask, 1.0 / temperature, top_k, return_weights, "softmax")


@_softmax_mix_op.register_fake
def _(logits, h, mask, temperature, top_k, return_weights):
    batch, _, dim = h.shape
    p = h.new_empty(logits.shape) if return_weights else _no_weights(h)
    kept = _kept_buffer(h, logits.shape[1], top_k) if top_k is not None else _no_kept(h)
    return h.new_empty((batch, logits.shape[1], dim)), p, kept


def _softmax_mix_backward_reference(grad_y, grad_p, logits, h, mask, temperature):
    return reference.softmax_mix_backward(grad_y, logits, h, temperature=temperature, mask=mask, grad_weights=grad_p)


@fused_op("softmax_mix_backward", reference=_softmax_mix_backward_reference)
def _softmax_mix_backward_op(
    grad_y: Tensor,
    grad_p: Tensor | None,
    logits: Tensor,
    h: Tensor,
    mask: Tensor | None,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``(dZ, dH)``. ``mask`` holds the experts the forward mixed (with top-k: the kept ones), so no top-k here."""
    dh, dz = _backward_kernels(grad_y, grad_p, h, logits, mask, 1.0 / temperature, "softmax")
    return dz, dh


@_softmax_mix_backward_op.register_fake
def _(grad_y, grad_p, logits, h, mask, temperature):
    return logits.new_empty(logits.shape), h.new_empty(h.shape)


def _softmax_mix_setup(ctx, inputs, output):
    logits, h, mask, temperature, top_k, _ = inputs
    ctx.save_for_backward(logits, h, _backward_mask(mask, output[2], top_k))
    ctx.temperature = temperature


def _softmax_mix_backward(ctx, grad_y, grad_p, _grad_kept):
    logits, h, mask = ctx.saved_tensors
    dz, dh = _softmax_mix_backward_op(grad_y, _grad_weights(grad_p), logits, h, mask, ctx.temperature)
    return dz, dh, None, None, None, None


_softmax_mix_op.register_autograd(_softmax_mix_backward, setup_context=_softmax_mix_setup)
_softmax_mix_backward_op.register_autograd(_refuse_double_backward)


def softmax_mix(
    logits: Tensor,
    h: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    top_k: int | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Classic MMoE/PLE gate, fused: ``Y[b,t] = sum_e softmax_e(Z[b,t] / temperature)[e] * H[b,e]``.

    Args:
        logits: gate logits ``[B, T, E]`` (from the caller's own Linear, which stays a cuBLAS GEMM).
        h: expert outputs ``[B, E, D]``, any strides.
        temperature: softmax temperature (> 0).
        mask, top_k, return_weights: as in :func:`attention_mix`.

    Returns:
        ``Y [B, T, D]`` in ``h``'s dtype (and ``p [B, T, E]``); gradients flow to ``logits`` and ``h``.
        With a float64 input, under ``torch.func`` transforms, with forward-mode AD and in eager mode on a CPU without
        ``TRITON_INTERPRET`` the op runs :func:`fused_gate.reference.softmax_mix` (same semantics).
    """
    temperature, top_k = validate_softmax_mix(logits, h, temperature, mask, top_k, return_weights)
    first_order = reference_call(h, logits)
    if first_order is not None:
        y, p = reference.softmax_mix_function(logits, h, temperature, mask, top_k, first_order=first_order)
        return (y, p.to(h.dtype)) if return_weights else y
    y, p, _ = _softmax_mix_op(logits, h, mask, temperature, top_k, return_weights)
    return (y, p) if return_weights else y
