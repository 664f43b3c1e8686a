"""Plain-PyTorch reference of the fused ops: the oracle of every test and the CPU fallback.

Math (``B`` rows, ``E`` experts, ``T`` tasks, ``D`` expert width)::

    attention_mix:  s[b,t,e] = scale * <C[t], H[b,e]>          C : [T, D] or [B, T, D]
    softmax_mix:    s[b,t,e] = Z[b,t,e] / temperature          Z : [B, T, E]
    s[b,t,e] = -inf where mask[t,e] (or mask[b,t,e]) is False, or e is not among the top_k
    p[b,t,:] = softmax_e(s[b,t,:])        (a row with no allowed expert gives p = 0, Y = 0)
    Y[b,t,:] = sum_e p[b,t,e] * H[b,e,:]                        Y : [B, T, D]

Everything is computed in float32 (float64 if any input is float64) and returned in ``H``'s
dtype; ``p`` is returned in ``H``'s dtype too. Top-k ties go to the lowest expert index.
The backward functions spell out the gradients in closed form (they are what the Triton
backward implements), independent of autograd, so tests can check one against the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_gate._checks import check_attention_mix, check_softmax_mix

__all__ = [
    "attention_mix",
    "attention_mix_backward",
    "gate_weights",
    "softmax_mix",
    "softmax_mix_backward",
]


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _top_k_keep(s: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Bool [..., E]: the k largest allowed entries of each row, ties to the lowest index.

    An expert's rank counts the allowed experts that beat it (higher score, or equal score and
    lower index); it is kept when allowed and ranked below k.
    """
    mine, other = s.unsqueeze(-1), s.unsqueeze(-2)  # [..., e, e']
    idx = torch.arange(s.shape[-1], device=s.device)
    beats = (other > mine) | ((other == mine) & (idx[None, :] < idx[:, None]))
    rank = (beats & allowed.unsqueeze(-2)).sum(-1)
    return allowed & (rank < k)


def gate_weights(s: Tensor, mask: Tensor | None = None, top_k: int | None = None) -> Tensor:
    """Masked (optionally top-k) softmax over the last axis of scores ``s [B, T, E]``.

    Rows with no allowed expert give zeros instead of NaN.

    Args:
        s: scores ``[..., E]``.
        mask: bool, broadcastable to ``s``; False excludes an expert.
        top_k: keep only the ``top_k`` largest allowed scores of each row; ties go to the lowest index.
    """
    allowed = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand_as(s)
    if top_k is not None:
        allowed = _top_k_keep(s, allowed, top_k)
    any_allowed = allowed.any(-1, keepdim=True)
    # Fully masked rows get finite dummy scores so the softmax (and its gradient) stays NaN-free.
    s = torch.where(any_allowed, s.masked_fill(~allowed, float("-inf")), torch.zeros_like(s))
    return torch.where(any_allowed, torch.softmax(s, dim=-1), torch.zeros_like(s))


def attention_mix(
    h: Tensor,
    context: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    top_k: int | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention gate: ``h [B, E, D]``, ``context [T, D] | [B, T, D]`` -> ``Y [B, T, D]``.

    Args:
        h, context, scale, mask, top_k, return_weights: as in :func:`fused_gate.attention_mix`.
    """
    check_attention_mix(h, context, scale, mask, top_k, kernel_path=False)
    dtype = _compute_dtype(h, context)
    scale = h.shape[-1] ** -0.5 if scale is None else float(scale)
    hc, cc = h.to(dtype), context.to(dtype)
    s = torch.einsum("td,bed->bte" if cc.dim() == 2 else "btd,bed->bte", cc, hc) * scale
    p = gate_weights(s, mask, top_k)
    y = torch.einsum("bte,bed->btd", p, hc).to(h.dtype)
    return (y, p.to(h.dtype)) if return_weights else y


def softmax_mix(
    logits: Tensor,
    h: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    top_k: int | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Classic gate: ``logits [B, T, E]``, ``h [B, E, D]`` -> ``Y [B, T, D]``.

    Args:
        logits, h, temperature, mask, top_k, return_weights: as in :func:`fused_gate.softmax_mix`.
    """
    check_softmax_mix(logits, h, temperature, mask, top_k, kernel_path=False)
    dtype = _compute_dtype(logits, h)
    hc = h.to(dtype)
    p = gate_weights(logits.to(dtype) / temperature, mask, top_k)
    y = torch.einsum("bte,bed->btd", p, hc).to(h.dtype)
    return (y, p.to(h.dtype)) if return_weights else y


def _softmax_backward(p: Tensor, grad_y: Tensor, hc: Tensor, grad_p: Tensor | None) -> Tensor:
    """ds[b,t,e] = p * (dp - <G, Y>) with dp[b,t,e] = <G[b,t], H[b,e]> (+ dL/dp when given)."""
    dp = torch.einsum("btd,bed->bte", grad_y, hc)
    if grad_p is not None:
        dp = dp + grad_p.to(dp.dtype)
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def attention_mix_backward(
    grad_y: Tensor,
    h: Tensor,
    context: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    top_k: int | None = None,
    grad_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Closed-form gradients ``(dH [B, E, D], dC [T, D] | [B, T, D])`` for ``dL/dY = grad_y``::

    dH[b,e] = sum_t p[b,t,e] G[b,t] + scale * sum_t ds[b,t,e] C[t]
    dC[t]   = scale * sum_b sum_e ds[b,t,e] H[b,e]      (no sum over b for a per-row C)

    Args:
        grad_y: ``G = dL/dY [B, T, D]``.
        h, context, scale, mask, top_k: the forward's inputs, as in :func:`fused_gate.attention_mix`.
        grad_weights: ``dL/dp [B, T, E]`` when the forward returned the weights and they were used.
    """
    dtype = _compute_dtype(h, context)
    scale = h.shape[-1] ** -0.5 if scale is None else float(scale)
    hc, cc, g = h.to(dtype), context.to(dtype), grad_y.to(dtype)
    per_row = cc.dim() == 3
    s = torch.einsum("btd,bed->bte" if per_row else "td,bed->bte", cc, hc) * scale
    p = gate_weights(s, mask, top_k)
    ds = _softmax_backward(p, g, hc, grad_weights)
    dh = torch.einsum("bte,btd->bed", p, g)
    dh = dh + scale * torch.einsum("bte,btd->bed" if per_row else "bte,td->bed", ds, cc)
    dc = scale * torch.einsum("bte,bed->btd" if per_row else "bte,bed->td", ds, hc)
    return dh.to(h.dtype), dc.to(context.dtype)


def softmax_mix_backward(
    grad_y: Tensor,
    logits: Tensor,
    h: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    top_k: int | None = None,
    grad_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Closed-form gradients ``(dZ [B, T, E], dH [B, E, D])``: ``dZ = ds / temperature``.

    Args:
        grad_y: ``G = dL/dY [B, T, D]``.
        logits, h, temperature, mask, top_k: the forward's inputs, as in :func:`fused_gate.softmax_mix`.
        grad_weights: ``dL/dp [B, T, E]`` when the forward returned the weights and they were used.
    """
    dtype = _compute_dtype(logits, h)
    hc, g = h.to(dtype), grad_y.to(dtype)
    p = gate_weights(logits.to(dtype) / temperature, mask, top_k)
    ds = _softmax_backward(p, g, hc, grad_weights)
    dh = torch.einsum("bte,btd->bed", p, g)
    return (ds / temperature).to(logits.dtype), dh.to(h.dtype)
