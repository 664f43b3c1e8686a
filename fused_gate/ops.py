"""The fused gate ops, registered with ``torch.library`` (fake kernels + autograd).

``torch.compile(fullgraph=True)`` sees each op as one node (no graph break) and uses the fake
kernels for shapes. Dispatch (as in docs/semantics.md): CUDA tensors run the Triton kernels; CPU
tensors run the same kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
import, and the plain-PyTorch reference otherwise.
"""

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from fused_gate import reference
from fused_gate._checks import check_attention_mix, check_softmax_mix
from fused_gate.kernels import INTERPRETED
from fused_gate.kernels.gate_mix_bwd import gate_mix_backward
from fused_gate.kernels.gate_mix_fwd import gate_mix_forward

__all__ = ["attention_mix", "softmax_mix", "uses_kernels"]


def uses_kernels(x: object) -> bool:
    """True when an op on ``x``'s device runs the Triton kernels (compiled or interpreted)."""
    return isinstance(x, Tensor) and (x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRETED))


def _needs_reference(*tensors: Tensor) -> bool:
    """True under ``torch.func`` transforms or with forward-mode (dual) inputs.

    The custom ops define a backward only; the reference is a plain-PyTorch ``autograd.Function``
    with closed-form backward, forward-mode and vmap rules, so it serves these callers exactly.
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    # Dual tensors exist only inside a dual level; outside one (every ordinary call) skip the unpacking.
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _no_weights(h: Tensor) -> Tensor:
    return h.new_empty((0,))


def _no_kept(h: Tensor) -> Tensor:
    return h.new_empty((0,), dtype=torch.bool)


def _kept_buffer(h: Tensor, tasks: int, top_k: int | None) -> Tensor | None:
    """With top-k, the forward records the experts it kept (bool ``[B, T, E]``) for the backward."""
    return h.new_empty((h.shape[0], tasks, h.shape[1]), dtype=torch.bool) if top_k is not None else None


def _backward_mask(mask: Tensor | None, kept: Tensor, top_k: int | None) -> Tensor | None:
    """The backward mixes the forward's kept experts (top-k already applied) or the user's mask."""
    return kept if top_k is not None else mask


def _grad_weights(grad_p: Tensor | None) -> Tensor | None:
    # p is an empty placeholder when return_weights=False; its gradient carries no information.
    return grad_p if grad_p is not None and grad_p.dim() == 3 else None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "fused_gate ops do not support double backward (create_graph=True through the gate); "
        "use fused_gate.reference for higher-order gradients"
    )


# ---------------------------------------------------------------------------- attention_mix


@torch.library.custom_op("fused_gate::attention_mix", mutates_args=())
def _attention_mix_op(
    h: Tensor, context: Tensor, mask: Tensor | None, scale: float, top_k: int | None, return_weights: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if uses_kernels(h):
        kept = _kept_buffer(h, context.shape[-2], top_k)
        y, p = gate_mix_forward(
            h, context, mask, scale, top_k, attention=True, return_weights=return_weights, kept=kept
        )
    else:
        y, p, kept = reference.attention_mix_forward(h, context, scale, mask, top_k)
    return y, p if return_weights else _no_weights(h), kept if top_k is not None else _no_kept(h)


@_attention_mix_op.register_fake
def _(h, context, mask, scale, top_k, return_weights):
    batch, experts, dim = h.shape
    tasks = context.shape[-2]
    p = h.new_empty((batch, tasks, experts)) if return_weights else _no_weights(h)
    kept = _kept_buffer(h, tasks, top_k) if top_k is not None else _no_kept(h)
    return h.new_empty((batch, tasks, dim)), p, kept


@torch.library.custom_op("fused_gate::attention_mix_backward", mutates_args=())
def _attention_mix_backward_op(
    grad_y: Tensor,
    grad_p: Tensor | None,
    h: Tensor,
    context: Tensor,
    mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``mask`` holds the experts the forward mixed (with top-k: the kept ones), so no top-k here."""
    if uses_kernels(h):
        return gate_mix_backward(grad_y, grad_p, h, context, mask, scale, attention=True)
    return reference.attention_mix_backward(grad_y, h, context, scale=scale, mask=mask, grad_weights=grad_p)


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
        ``context`` and through ``p`` when it is returned. Under ``torch.func`` transforms and
        forward-mode AD the op runs :func:`fused_gate.reference.attention_mix` (same semantics).
    """
    scale, top_k = check_attention_mix(h, context, scale, mask, top_k, kernel_path=uses_kernels(h))
    if _needs_reference(h, context):
        return reference.attention_mix(h, context, scale=scale, mask=mask, top_k=top_k, return_weights=return_weights)
    y, p, _ = _attention_mix_op(h, context, mask, scale, top_k, return_weights)
    return (y, p) if return_weights else y


# ---------------------------------------------------------------------------- softmax_mix


@torch.library.custom_op("fused_gate::softmax_mix", mutates_args=())
def _softmax_mix_op(
    logits: Tensor,
    h: Tensor,
    mask: Tensor | None,
    temperature: float,
    top_k: int | None,
    return_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if uses_kernels(h):
        kept = _kept_buffer(h, logits.shape[1], top_k)
        y, p = gate_mix_forward(
            h, logits, mask, 1.0 / temperature, top_k, attention=False, return_weights=return_weights, kept=kept
        )
    else:
        y, p, kept = reference.softmax_mix_forward(logits, h, temperature, mask, top_k)
    return y, p if return_weights else _no_weights(h), kept if top_k is not None else _no_kept(h)


@_softmax_mix_op.register_fake
def _(logits, h, mask, temperature, top_k, return_weights):
    batch, _, dim = h.shape
    p = h.new_empty(logits.shape) if return_weights else _no_weights(h)
    kept = _kept_buffer(h, logits.shape[1], top_k) if top_k is not None else _no_kept(h)
    return h.new_empty((batch, logits.shape[1], dim)), p, kept


@torch.library.custom_op("fused_gate::softmax_mix_backward", mutates_args=())
def _softmax_mix_backward_op(
    grad_y: Tensor,
    grad_p: Tensor | None,
    logits: Tensor,
    h: Tensor,
    mask: Tensor | None,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``mask`` holds the experts the forward mixed (with top-k: the kept ones), so no top-k here."""
    if uses_kernels(h):
        return gate_mix_backward(grad_y, grad_p, h, logits, mask, 1.0 / temperature, attention=False)
    return reference.softmax_mix_backward(grad_y, logits, h, temperature=temperature, mask=mask, grad_weights=grad_p)


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
        Under ``torch.func`` transforms and forward-mode AD the op runs
        :func:`fused_gate.reference.softmax_mix` (same semantics).
    """
    temperature, top_k = check_softmax_mix(logits, h, temperature, mask, top_k, kernel_path=uses_kernels(h))
    if _needs_reference(logits, h):
        return reference.softmax_mix(
            logits, h, temperature=temperature, mask=mask, top_k=top_k, return_weights=return_weights
        )
    y, p, _ = _softmax_mix_op(logits, h, mask, temperature, top_k, return_weights)
    return (y, p) if return_weights else y
