"""Plain-PyTorch reference of the fused ops: the oracle of every test and the CPU fallback.

Math (``B`` rows, ``E`` experts, ``T`` tasks, ``D`` expert width)::

    attention_mix:  s[b,t,e] = scale * <C[t], H[b,e]>          C : [T, D] or [B, T, D]
    softmax_mix:    s[b,t,e] = Z[b,t,e] / temperature          Z : [B, T, E]
    allowed[b,t,e] = mask[t,e] (or mask[b,t,e]) and s[b,t,e] != -inf, then only the top_k best
    p[b,t,:] = softmax_e(s[b,t,:]) over the allowed experts   (none allowed: p = 0, Y = 0)
    Y[b,t,:] = sum_{e : p[b,t,e] != 0} p[b,t,e] * H[b,e,:]      Y : [B, T, D]
    experts_mix:    H[b,e,:] = act(X[b,(e)] @ W[e] + bias[e]), rounded to X's dtype, then either gate on H

Special values, the same in the kernels: a ``-inf`` score excludes its expert exactly like the mask;
``+inf`` or NaN among a (row, task)'s allowed scores make its whole ``p`` NaN (top-k always keeps a
NaN score, so it propagates as without top-k); an expert whose weight is 0 contributes nothing to
``Y`` or to any gradient, even when its output is NaN or infinite. Top-k ties go to the lowest index.

Everything is computed in float32 (float64 if any input is float64) and returned in ``H``'s
dtype; ``p`` is returned in ``H``'s dtype too. The ``*_backward`` functions spell out the gradients
in closed form (they are what the Triton backward implements); the differentiable functions use
them as their backward (and a matching forward-mode rule), so the reference also works under
``torch.func`` transforms and ``torch.autograd.forward_ad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_gate._validation import validate_attention_mix, validate_experts_mix, validate_softmax_mix
from fused_gate.activations import ACTIVATIONS

__all__ = [
    "allowed_experts",
    "attention_mix",
    "attention_mix_backward",
    "attention_mix_forward",
    "experts_mix",
    "experts_output",
    "gate_weights",
    "softmax_mix",
    "softmax_mix_backward",
    "softmax_mix_forward",
]


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _top_k_keep(s: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Bool ``[..., E]``: the k largest allowed scores of each row (ties to the lowest index), plus
    every allowed NaN score, so that a NaN reaches ``p`` exactly as it does without top-k.

    A stable descending sort ranks the experts in O(E) memory per row; disallowed and NaN scores
    rank as ``-inf`` and are filtered out again by ``allowed``.
    """
    nan = s.isnan()
    ranked = s.masked_fill(~allowed | nan, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(s.shape[-1], device=s.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return allowed & ((rank < k) & ~nan | nan)


def allowed_experts(s: Tensor, mask: Tensor | None = None, top_k: int | None = None) -> Tensor:
    """Bool ``[B, T, E]``: the experts each (row, task) mixes, from scores ``s``, ``mask`` and ``top_k``."""
    allowed = ~s.isneginf()
    if mask is not None:
        allowed = allowed & mask
    if top_k is not None:
        allowed = _top_k_keep(s, allowed, top_k)
    return allowed


def _masked_softmax(s: Tensor, allowed: Tensor) -> Tensor:
    any_allowed = allowed.any(-1, keepdim=True)
    # A (row, task) with no allowed expert gets finite dummy scores so the softmax stays NaN-free.
    s = torch.where(any_allowed, s.masked_fill(~allowed, float("-inf")), torch.zeros_like(s))
    return torch.where(any_allowed, torch.softmax(s, dim=-1), torch.zeros_like(s))


def gate_weights(s: Tensor, mask: Tensor | None = None, top_k: int | None = None) -> Tensor:
    """Masked (optionally top-k) softmax over the last axis of scores ``s [B, T, E]``.

    Args:
        s: scores ``[..., E]``; ``-inf`` excludes an expert, ``+inf``/NaN make the row NaN.
        mask: bool, broadcastable to ``s``; False excludes an expert. A row with no allowed expert
            gets zeros.
        top_k: keep only the ``top_k`` largest allowed scores of each row; ties go to the lowest index.
    """
    return _masked_softmax(s, allowed_experts(s, mask, top_k))


def _mix(p: Tensor, h: Tensor) -> Tensor:
    """``Y[b,t] = sum_{e : p[b,t,e] != 0} p[b,t,e] * H[b,e]`` (``p >= 0`` or NaN).

    One einsum over the finite part of ``H``; the non-finite entries are added back only where a
    weight that is not 0 meets them (counted with indicator einsums), so ``0 * NaN`` never happens.
    """
    y = torch.einsum("bte,bed->btd", p, torch.where(h.isfinite(), h, torch.zeros_like(h)))
    used = (p != 0).to(p.dtype)

    def met(entries: Tensor) -> Tensor:
        return torch.einsum("bte,bed->btd", used, entries.to(p.dtype)) > 0

    nan, pos, neg = met(h.isnan()), met(h.isposinf()), met(h.isneginf())
    inf = torch.full_like(y, float("inf"))
    extra = torch.where(pos, inf, torch.where(neg, -inf, torch.zeros_like(y)))
    return y + torch.where(nan | (pos & neg), torch.full_like(y, float("nan")), extra)


def _finite(x: Tensor) -> Tensor:
    return torch.where(x.isfinite(), x, torch.zeros_like(x))


def _scores(h: Tensor, context: Tensor, scale: float) -> Tensor:
    return torch.einsum("td,bed->bte" if context.dim() == 2 else "btd,bed->bte", context, h) * scale


def _weight_grads(p: Tensor, grad_y: Tensor, h: Tensor, grad_p: Tensor | None) -> Tensor:
    """``ds = p * (dp - sum_e p dp)`` with ``dp = <G[b,t], H[b,e]> (+ dL/dp)``, and ``dp = 0`` where ``p = 0``."""
    dp = torch.einsum("btd,bed->bte", grad_y, h)
    if grad_p is not None:
        dp = dp + grad_p.to(dp.dtype)
    dp = torch.where(p != 0, dp, torch.zeros_like(dp))
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def _weight_tangents(p: Tensor, ds: Tensor) -> Tensor:
    """Forward mode of the softmax: ``dp = p * (ds - sum_e p ds)`` with ``ds = 0`` where ``p = 0``."""
    ds = torch.where(p != 0, ds, torch.zeros_like(ds))
    return p * (ds - (p * ds).sum(-1, keepdim=True))


# ---------------------------------------------------------------------------- attention_mix


def attention_mix_forward(
    h: Tensor, context: Tensor, scale: float, mask: Tensor | None, top_k: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Y, p, allowed)`` without autograd: ``allowed`` is the expert set the backward must use.

    Args:
        h, context, mask, top_k: as in :func:`attention_mix`.
        scale: the score scale (no default here).
    """
    dtype = _compute_dtype(h, context)
    hc = h.to(dtype)
    s = _scores(hc, context.to(dtype), scale)
    allowed = allowed_experts(s, mask, top_k)
    p = _masked_softmax(s, allowed)
    # Exact without _mix's indicator sums: an expert whose output is not finite scores NaN or +-inf,
    # so either its weight is 0 (-inf) or its whole (row, task) is NaN already.
    y = torch.einsum("bte,bed->btd", p, _finite(hc))
    return y.to(h.dtype), p.to(h.dtype), allowed


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

        dp[b,t,e] = <G[b,t], H[b,e]> (+ dL/dp)           (0 where p = 0)
        ds[b,t,e] = p * (dp - sum_e' p dp)
        dH[b,e]   = sum_t p[b,t,e] G[b,t] + scale * sum_t ds[b,t,e] C[t]
        dC[t]     = scale * sum_b sum_e ds[b,t,e] H[b,e]      (no sum over b for a per-row C)

    Args:
        grad_y: ``G = dL/dY [B, T, D]``.
        h, context, scale, mask, top_k: the forward's inputs, as in :func:`attention_mix`.
        grad_weights: ``dL/dp [B, T, E]`` when the weights were returned and used, else None.
    """
    dtype = _compute_dtype(h, context)
    scale = h.shape[-1] ** -0.5 if scale is None else float(scale)
    hc, cc, g = h.to(dtype), context.to(dtype), grad_y.to(dtype)
    per_row = cc.dim() == 3
    p = gate_weights(_scores(hc, cc, scale), mask, top_k)
    ds = _weight_grads(p, g, hc, grad_weights)
    dh = torch.einsum("bte,btd->bed", p, g)
    dh = dh + scale * torch.einsum("bte,btd->bed" if per_row else "bte,td->bed", ds, cc)
    # ds = 0 where p = 0, and a non-finite H[b,e] with p != 0 makes the whole row's ds NaN: the
    # finite part of H gives the exact sum.
    dc = scale * torch.einsum("bte,bed->btd" if per_row else "bte,bed->td", ds, _finite(hc))
    return dh.to(h.dtype), dc.to(context.dtype)


class _AttentionMix(torch.autograd.Function):
    """Differentiable reference attention gate; backward and forward mode in closed form."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, context, scale, mask, top_k):
        return attention_mix_forward(h, context, scale, mask, top_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, context, scale, _, _ = inputs
        _, _, allowed = output
        ctx.mark_non_differentiable(allowed)
        ctx.save_for_backward(h, context, allowed)
        ctx.save_for_forward(h, context, allowed)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad_y, grad_p, _):
        h, context, allowed = ctx.saved_tensors
        return (
            *attention_mix_backward(grad_y, h, context, scale=ctx.scale, mask=allowed, grad_weights=grad_p),
            None,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx, h_t, context_t, *_):
        h, context, allowed = ctx.saved_tensors
        dtype = _compute_dtype(h, context)
        hc, cc = h.to(dtype), context.to(dtype)
        p = _masked_softmax(_scores(hc, cc, ctx.scale), allowed)
        s_t = torch.zeros_like(p)
        if context_t is not None:
            s_t = s_t + _scores(hc, context_t.to(dtype), ctx.scale)
        if h_t is not None:
            s_t = s_t + _scores(h_t.to(dtype), cc, ctx.scale)
        p_t = _weight_tangents(p, s_t)
        y_t = torch.einsum("bte,bed->btd", p_t, _finite(hc))
        if h_t is not None:
            y_t = y_t + _mix(p, h_t.to(dtype))
        return y_t.to(h.dtype), p_t.to(h.dtype), None


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
        h, context, scale, mask, top_k, return_weights: as in :func:`fused_gate.attention_mix`
            (float64 accepted too).
    """
    scale, top_k = validate_attention_mix(h, context, scale, mask, top_k, return_weights)
    y, p, _ = _AttentionMix.apply(h, context, scale, mask, top_k)
    return (y, p) if return_weights else y


# ---------------------------------------------------------------------------- softmax_mix


def softmax_mix_forward(
    logits: Tensor, h: Tensor, temperature: float, mask: Tensor | None, top_k: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Y, p, allowed)`` without autograd, as :func:`attention_mix_forward`.

    Args:
        logits, h, temperature, mask, top_k: as in :func:`softmax_mix`.
    """
    dtype = _compute_dtype(logits, h)
    s = logits.to(dtype) / temperature
    allowed = allowed_experts(s, mask, top_k)
    p = _masked_softmax(s, allowed)
    return _mix(p, h.to(dtype)).to(h.dtype), p.to(h.dtype), allowed


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
    """Closed-form gradients ``(dZ [B, T, E], dH [B, E, D])``: ``dZ = ds / temperature``,
    ``dH[b,e] = sum_t p[b,t,e] G[b,t]`` (``ds`` as in :func:`attention_mix_backward`).

    Args:
        grad_y: ``G = dL/dY [B, T, D]``.
        logits, h, temperature, mask, top_k: the forward's inputs, as in :func:`softmax_mix`.
        grad_weights: ``dL/dp [B, T, E]`` when the weights were returned and used, else None.
    """
    dtype = _compute_dtype(logits, h)
    hc, g = h.to(dtype), grad_y.to(dtype)
    p = gate_weights(logits.to(dtype) / temperature, mask, top_k)
    ds = _weight_grads(p, g, hc, grad_weights)
    dh = torch.einsum("bte,btd->bed", p, g)
    return (ds / temperature).to(logits.dtype), dh.to(h.dtype)


class _SoftmaxMix(torch.autograd.Function):
    """Differentiable reference classic gate; backward and forward mode in closed form."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, h, temperature, mask, top_k):
        return softmax_mix_forward(logits, h, temperature, mask, top_k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, h, temperature, _, _ = inputs
        _, _, allowed = output
        ctx.mark_non_differentiable(allowed)
        ctx.save_for_backward(logits, h, allowed)
        ctx.save_for_forward(logits, h, allowed)
        ctx.temperature = temperature

    @staticmethod
    def backward(ctx, grad_y, grad_p, _):
        logits, h, allowed = ctx.saved_tensors
        grads = softmax_mix_backward(grad_y, logits, h, temperature=ctx.temperature, mask=allowed, grad_weights=grad_p)
        return (*grads, None, None, None)

    @staticmethod
    def jvp(ctx, logits_t, h_t, *_):
        logits, h, allowed = ctx.saved_tensors
        dtype = _compute_dtype(logits, h)
        hc = h.to(dtype)
        p = _masked_softmax(logits.to(dtype) / ctx.temperature, allowed)
        p_t = torch.zeros_like(p)
        if logits_t is not None:
            p_t = _weight_tangents(p, logits_t.to(dtype) / ctx.temperature)
        y_t = torch.einsum("bte,bed->btd", p_t, _finite(hc))
        if h_t is not None:
            y_t = y_t + _mix(p, h_t.to(dtype))
        return y_t.to(h.dtype), p_t.to(h.dtype), None


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
        logits, h, temperature, mask, top_k, return_weights: as in :func:`fused_gate.softmax_mix`
            (float64 accepted too).
    """
    temperature, top_k = validate_softmax_mix(logits, h, temperature, mask, top_k, return_weights)
    y, p, _ = _SoftmaxMix.apply(logits, h, temperature, mask, top_k)
    return (y, p) if return_weights else y


# ---------------------------------------------------------------------------- experts_mix


def experts_output(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "relu") -> Tensor:
    """The experts' last layer ``H[b,e] = act(X[b,(e)] @ W[e] + bias[e])`` as ``[B, E, D]`` in ``x``'s dtype.

    Computed in float32 (float64 if an input is), with ``X @ W + bias`` and ``H`` rounded to ``x``'s dtype
    where the two-step path (a batched matmul, then the activation) stores them: values beyond a half
    dtype's range become ``+-inf`` before the activation, as they do there.

    Args:
        x: ``[B, K]`` (every expert reads the same input) or ``[B, E, K]`` (one input per expert).
        weight: ``[E, K, D]``.
        bias: ``[E, D]`` or None.
        activation: a name of :data:`fused_gate.activations.ACTIVATIONS`.
    """
    dtype = _compute_dtype(x, weight, bias)
    z = torch.einsum("bk,ekd->bed" if x.dim() == 2 else "bek,ekd->bed", x.to(dtype), weight.to(dtype))
    if bias is not None:
        z = z + bias.to(dtype)
    return ACTIVATIONS[activation].function(z.to(x.dtype).to(dtype)).to(x.dtype)


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
    """The experts' last layer and the gate: :func:`experts_output`, then :func:`attention_mix_forward`
    or :func:`softmax_mix_forward` on it. No autograd (inference).

    Args:
        x, weight, bias, gate, context, logits, activation, mask, top_k, scale, temperature, return_weights: as
            in :func:`fused_gate.experts_mix` (float64 accepted too).

    Returns:
        ``Y [B, T, D]`` (and ``p [B, T, E]``) in ``x``'s dtype.
    """
    score_scale, top_k = validate_experts_mix(
        x, weight, bias, gate, context, logits, activation, mask, top_k, scale, temperature, return_weights
    )
    with torch.no_grad():  # H in x's dtype; the gates compute in float32 (float64 with a float64 input)
        h = experts_output(x, weight, bias, activation)
        if gate == "attention":
            y, p, _ = attention_mix_forward(h, context, score_scale, mask, top_k)
        else:
            y, p, _ = softmax_mix_forward(logits, h, 1.0 / score_scale, mask, top_k)
    y, p = y.to(x.dtype), p.to(x.dtype)
    return (y, p) if return_weights else y
