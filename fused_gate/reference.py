"""Plain-PyTorch reference of the fused ops: the oracle of every test and the CPU fallback.

Math (``B`` rows, ``E`` experts, ``T`` tasks, ``D`` expert width)::

    attention_mix:  s[b,t,e] = scale * <C[t], H[b,e]>          C : [T, D] or [B, T, D]
    softmax_mix:    s[b,t,e] = Z[b,t,e] / temperature          Z : [B, T, E]
    allowed[b,t,e] = mask[t,e] (or mask[b,t,e]) and s[b,t,e] != -inf, then only the top_k best
    p[b,t,:] = softmax_e(s[b,t,:]) over the allowed experts   (none allowed: p = 0, Y = 0)
    Y[b,t,:] = sum_{e : p[b,t,e] != 0} p[b,t,e] * H[b,e,:]      Y : [B, T, D]
    experts_mix:    H[b,e,:] = act(X[b,(e)] @ W[e] + bias[e]), rounded to X's dtype, then either gate on H;
                    its backward is the two-step path's: the gate's, then the activation's and the matmul's

Special values, the same in the kernels: a ``-inf`` score excludes its expert exactly like the mask;
``+inf`` or NaN among a (row, task)'s allowed scores make its whole ``p`` NaN (top-k always keeps a
NaN score, so it propagates as without top-k); an expert whose weight is 0 contributes nothing to
``Y`` or to any gradient, even when its output is NaN or infinite. Top-k ties go to the lowest index.

Everything is computed in float32 (float64 if any input is float64) and returned in ``H``'s
dtype; ``p`` is returned in ``H``'s dtype too. The ``*_backward`` functions spell out the gradients
in closed form (they are what the Triton backward implements); the differentiable functions use
them as their backward (and a matching forward-mode rule), so the reference also works under
``torch.func`` transforms and ``torch.autograd.forward_ad``.

Two paths, one result. The exact path applies the rules above term by term. On float32 and in eager
mode (real values: not traced, compiled or under ``torch.func`` transforms) the reference first takes
the fast path, plain ``softmax`` and batched matmuls, and keeps its result only when the output (the
score gradient in the backward) is finite: a special value the fast path mishandles (a row with no
allowed expert, ``0 * inf`` of an excluded expert) always leaves a NaN or inf there, and then the exact
path recomputes the call. Float64, the tests' oracle, always takes the exact path. The differentiable
functions save ``p`` for the backward; only a higher-order backward (``create_graph=True``,
``torch.func``) recomputes it from the inputs.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from fused_gate._validation import validate_attention_mix, validate_experts_mix, validate_softmax_mix
from fused_gate.activations import ACTIVATIONS

__all__ = [
    "allowed_experts",
    "attention_mix",
    "attention_mix_backward",
    "attention_mix_forward",
    "experts_mix",
    "experts_mix_backward",
    "experts_mix_forward",
    "experts_mix_function",
    "experts_output",
    "gate_weights",
    "softmax_mix",
    "softmax_mix_backward",
    "softmax_mix_forward",
]


LOG2_E = 1 / math.log(2)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    for t in tensors:  # a loop, not any() of a generator: this runs on every call of the CPU fallback
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without the dispatcher call when ``x`` already has that dtype (about 1 us on a CPU)."""
    return x if x.dtype == dtype else x.to(dtype)


def _fast_path_applies(dtype: torch.dtype) -> bool:
    """Whether the reference may try its fast path: float32, and real values it may branch on (not
    traced, compiled or exported, no dispatch mode, no ``torch.func`` transform: each needs one graph
    for every value). Float64, the tests' oracle, always takes the exact path."""
    return not (
        dtype == torch.float64
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack() > 0
    )


def _all_finite(x: Tensor) -> bool:
    """One reduction: a NaN or inf anywhere makes the sum NaN or inf (a finite sum overflowing is only
    a false alarm, which sends the call down the exact path)."""
    return math.isfinite((x.detach() if x.requires_grad else x).sum())


def _softmax(s: Tensor) -> Tensor:
    """``exp(s - max) / sum`` over the last axis, as ``torch.softmax`` computes it but several times
    faster for a few experts on a CPU; a row of ``-inf`` only gives NaN. The shift is a constant to
    autograd (the softmax does not depend on it), so higher derivatives stay exact. Without a graph to
    record, the temporaries are reused in place.

    Below float64 the exponential is ``exp2((s - max) * log2(e))``: torch's CPU ``exp`` of a float32 below
    -87 (a result under the smallest normal float, ``-inf`` of a masked expert included) leaves its
    vectorized loop and costs 10 to 100 times as much, ``exp2`` does not. The rounded product costs a
    relative error of at most ``|s - max| * 6e-8`` (3e-7 for a weight above 1e-2).
    """
    shift = s.amax(-1, keepdim=True)
    if torch.is_grad_enabled():
        d = s - shift.detach()
        e = d.exp() if s.dtype == torch.float64 else (d * LOG2_E).exp2()
        return e / e.sum(-1, keepdim=True)
    e = s - shift
    e = e.exp_() if s.dtype == torch.float64 else e.mul_(LOG2_E).exp2_()
    return e.div_(e.sum(-1, keepdim=True))


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
    return torch.where(any_allowed, _softmax(s), torch.zeros_like(s))


def _fast_gate_weights(s: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`gate_weights` (no top-k) for every (row, task) with an allowed expert; one without gets NaN
    (the exact path then takes the call over). The mask and ``-inf`` exclude alike: ``exp(-inf) = 0``."""
    return _softmax(s if mask is None else s.masked_fill(~mask, float("-inf")))


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


def _weight_gradient(grad_y: Tensor, h: Tensor) -> Tensor:
    """``dp[b,t,e] = <G[b,t], H[b,e]>``, as the transpose of ``H G^T`` (twice as fast on a CPU as ``G H^T``
    for a few tasks and experts: one long dot product per output rather than short ones)."""
    return torch.bmm(h, grad_y.transpose(1, 2)).transpose(1, 2)


def _weight_grads(p: Tensor, grad_y: Tensor, h: Tensor, grad_p: Tensor | None) -> Tensor:
    """``ds = p * (dp - sum_e p dp)`` with ``dp = <G[b,t], H[b,e]> (+ dL/dp)``, and ``dp = 0`` where ``p = 0``."""
    dp = _weight_gradient(grad_y, h)
    if grad_p is not None:
        dp = dp + grad_p.to(dp.dtype)
    dp = torch.where(p != 0, dp, torch.zeros_like(dp))
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def _fast_weight_grads(p: Tensor, grad_y: Tensor, h: Tensor, grad_p: Tensor | None) -> Tensor | None:
    """:func:`_weight_grads` without zeroing ``dp`` where ``p = 0``; None when that could matter or the fast
    path does not apply.

    A non-finite ``dp[b,t,e]`` meets ``p`` in ``sum_e p dp``, where ``0 * inf`` and ``0 * NaN`` are NaN, so a
    finite ``ds`` is exact. Every ``dp[b,t,e]`` reads all of ``G[b,t]`` and ``H[b,e]``, so a finite ``ds``
    also means finite ``G`` and ``H``.
    """
    if not _fast_path_applies(p.dtype):
        return None
    dp = _weight_gradient(grad_y, h)
    if grad_p is not None:
        dp = dp + grad_p.to(dp.dtype)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return ds if _all_finite(ds) else None


def _weight_tangents(p: Tensor, ds: Tensor) -> Tensor:
    """Forward mode of the softmax: ``dp = p * (ds - sum_e p ds)`` with ``ds = 0`` where ``p = 0``."""
    ds = torch.where(p != 0, ds, torch.zeros_like(ds))
    return p * (ds - (p * ds).sum(-1, keepdim=True))


def _kept(s: Tensor, mask: Tensor | None, top_k: int | None) -> Tensor | None:
    """The experts top-k keeps (bool ``[B, T, E]``), None without top-k."""
    return None if top_k is None else allowed_experts(s, mask, top_k)


def _checked_gate_weights(s: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`gate_weights` (no top-k): by the fast path when it applies and gives finite weights."""
    if _fast_path_applies(s.dtype):
        p = _fast_gate_weights(s, mask)
        if _all_finite(p):
            return p
    return gate_weights(s, mask)


def _old_style(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``function`` (``forward`` without ``ctx``, then ``setup_context``) as a ``forward(ctx, ...)`` function,
    for calls outside ``torch.func`` transforms (which need the first form).

    ``autograd.Function.apply`` binds the arguments of a function with ``setup_context`` to its forward's
    signature on every call (``inspect.signature``: about 40 us on a CPU, a third of a small gate's forward).
    """

    def forward(ctx, *inputs):
        output = function.forward(*inputs)
        function.setup_context(ctx, inputs, output)
        return output

    methods = {"forward": forward, "backward": function.backward, "jvp": function.jvp}
    members = {name: staticmethod(method) for name, method in methods.items()}
    return type(function.__name__ + "OldStyle", (torch.autograd.Function,), members)


def _apply(function: type[torch.autograd.Function], old_style: type[torch.autograd.Function], *args):
    """``function.apply(*args)``; without anything to differentiate (inference), its forward alone."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    if forward_ad._current_level < 0 and not (
        torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
    ):
        return function.forward(*args)
    return old_style.apply(*args)


DOUBLE_BACKWARD_REFUSED = (
    "fused_gate ops do not support double backward (create_graph=True through the gate); "
    "use fused_gate.reference for higher-order gradients"
)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the gradients of a first-order call (the fused ops' CPU path): differentiating them
    raises, as through the kernels."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_REFUSED)


def _higher_order_grads(ctx, recompute) -> tuple[Tensor, ...]:
    """The gradients of a backward with ``create_graph=True``: ``recompute()`` derives ``p`` from the
    inputs again so that its graph is recorded; a first-order call refuses to be differentiated again."""
    grads = recompute()
    if ctx.first_order and not torch._C._are_functorch_transforms_active():
        grads = _RefuseDoubleBackward.apply(*grads)
    return grads


def _save_for_both_modes(ctx, *tensors: Tensor | None) -> None:
    """Save the same tensors for the backward and for forward mode: ``generate_vmap_rule`` keeps one record of
    batch dimensions for both, so different lists would break a vmapped forward's backward."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


def _grad_or_zeros(grad_y: Tensor | None, p: Tensor, h: Tensor) -> Tensor:
    """``dL/dY``, zeros when only ``p`` was used (the functions do not materialize unused gradients)."""
    return p.new_zeros((*p.shape[:2], h.shape[-1])) if grad_y is None else grad_y


# ---------------------------------------------------------------------------- attention_mix


def _attention_forward(
    h: Tensor, context: Tensor, scale: float, mask: Tensor | None, top_k: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, p, kept)`` in the compute dtype."""
    dtype = _compute_dtype(h, context)
    hc = _as(h, dtype)
    s = _scores(hc, _as(context, dtype), scale)
    kept = _kept(s, mask, top_k)
    allowed = mask if kept is None else kept
    if _fast_path_applies(dtype):
        p = _fast_gate_weights(s, allowed)
        # A non-finite H[b,e] scores NaN or +-inf: its weight is 0 (a NaN in Y from 0 * inf) or its row NaN.
        y = torch.bmm(p, hc)
        if _all_finite(y):
            return y, p, kept
    p = gate_weights(s, allowed)
    # Exact without _mix's indicator sums: an expert whose output is not finite scores NaN or +-inf,
    # so either its weight is 0 (-inf) or its whole (row, task) is NaN already.
    return torch.bmm(p, _finite(hc)), p, kept


def attention_mix_forward(
    h: Tensor, context: Tensor, scale: float, mask: Tensor | None, top_k: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, p, kept)`` without autograd: ``kept`` is the expert set top-k kept (None without top-k), which
    the backward must use.

    Args:
        h, context, mask, top_k: as in :func:`attention_mix`.
        scale: the score scale (no default here).
    """
    y, p, kept = _attention_forward(h, context, scale, mask, top_k)
    return y.to(h.dtype), p.to(h.dtype), kept


def _attention_grads(
    grad_y: Tensor, h: Tensor, context: Tensor, p: Tensor, scale: float, grad_p: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(dH, dC)`` from the forward's weights ``p``, every tensor in the compute dtype."""
    ds, h_read = _fast_weight_grads(p, grad_y, h, grad_p), h
    if ds is None:
        # ds = 0 where p = 0, and a non-finite H[b,e] with p != 0 makes the whole row's ds NaN: the
        # finite part of H gives the exact sum.
        ds, h_read = _weight_grads(p, grad_y, h, grad_p), _finite(h)
    per_row = context.dim() == 3
    # dH = p^T G + scale ds^T C: the second matmul accumulates into the first's result.
    dh = torch.bmm(p.transpose(1, 2), grad_y)
    if per_row:
        dh = dh.baddbmm(ds.transpose(1, 2), context, alpha=scale)
    else:
        dh = dh.flatten(0, 1).addmm(ds.transpose(1, 2).flatten(0, 1), context, alpha=scale).view(dh.shape)
    dc = torch.einsum("bte,bed->btd" if per_row else "bte,bed->td", ds, h_read) * scale
    return dh, dc


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
    hc, cc = h.to(dtype), context.to(dtype)
    s = _scores(hc, cc, scale)
    kept = _kept(s, mask, top_k)
    p = _checked_gate_weights(s, mask if kept is None else kept)
    dh, dc = _attention_grads(grad_y.to(dtype), hc, cc, p, scale, grad_weights)
    return dh.to(h.dtype), dc.to(context.dtype)


class _AttentionMix(torch.autograd.Function):
    """Differentiable reference attention gate: ``(Y in H's dtype, p in the compute dtype)``; backward
    and forward mode in closed form from the saved ``p``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, context, scale, mask, top_k, first_order):
        y, p, _ = _attention_forward(h, context, scale, mask, top_k)
        return _as(y, h.dtype), p

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, context, scale, mask, top_k, first_order = inputs
        _, p = output
        _save_for_both_modes(ctx, h, context, mask, p)
        ctx.scale, ctx.top_k, ctx.first_order = scale, top_k, first_order
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, grad_p):
        h, context, mask, p = ctx.saved_tensors
        grad_y = _grad_or_zeros(grad_y, p, h)
        if torch.is_grad_enabled():
            grads = _higher_order_grads(
                ctx,
                lambda: attention_mix_backward(
                    grad_y, h, context, scale=ctx.scale, mask=mask, top_k=ctx.top_k, grad_weights=grad_p
                ),
            )
        else:
            dtype = p.dtype
            dh, dc = _attention_grads(grad_y.to(dtype), h.to(dtype), context.to(dtype), p, ctx.scale, grad_p)
            grads = dh.to(h.dtype), dc.to(context.dtype)
        return *grads, None, None, None, None

    @staticmethod
    def jvp(ctx, h_t, context_t, *_):
        h, context, _, p = ctx.saved_tensors
        dtype = p.dtype
        hc, cc = h.to(dtype), context.to(dtype)
        s_t = torch.zeros_like(p)
        if context_t is not None:
            s_t = s_t + _scores(hc, context_t.to(dtype), ctx.scale)
        if h_t is not None:
            s_t = s_t + _scores(h_t.to(dtype), cc, ctx.scale)
        p_t = _weight_tangents(p, s_t)
        y_t = torch.einsum("bte,bed->btd", p_t, _finite(hc))
        if h_t is not None:
            y_t = y_t + _mix(p, h_t.to(dtype))
        return y_t.to(h.dtype), p_t


_AttentionMixOldStyle = _old_style(_AttentionMix)


def attention_mix_function(
    h: Tensor, context: Tensor, scale: float, mask: Tensor | None, top_k: int | None, *, first_order: bool
) -> tuple[Tensor, Tensor]:
    """``(Y, p)`` of validated arguments, differentiable (``p`` in the compute dtype); with ``first_order``
    a second backward raises, as through the fused ops."""
    return _apply(_AttentionMix, _AttentionMixOldStyle, h, context, scale, mask, top_k, first_order)


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
    y, p = attention_mix_function(h, context, scale, mask, top_k, first_order=False)
    return (y, p.to(h.dtype)) if return_weights else y


# ---------------------------------------------------------------------------- softmax_mix


def _softmax_scores(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    s = _as(logits, dtype)
    return s if temperature == 1.0 else s / temperature


def _softmax_forward(
    logits: Tensor, h: Tensor, temperature: float, mask: Tensor | None, top_k: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, p, kept)`` in the compute dtype."""
    dtype = _compute_dtype(logits, h)
    hc = _as(h, dtype)
    s = _softmax_scores(logits, dtype, temperature)
    kept = _kept(s, mask, top_k)
    allowed = mask if kept is None else kept
    if _fast_path_applies(dtype):
        p = _fast_gate_weights(s, allowed)
        y = torch.bmm(p, hc)
        if _all_finite(y):
            return y, p, kept
    p = gate_weights(s, allowed)
    return _mix(p, hc), p, kept


def softmax_mix_forward(
    logits: Tensor, h: Tensor, temperature: float, mask: Tensor | None, top_k: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, p, kept)`` without autograd, as :func:`attention_mix_forward`.

    Args:
        logits, h, temperature, mask, top_k: as in :func:`softmax_mix`.
    """
    y, p, kept = _softmax_forward(logits, h, temperature, mask, top_k)
    return y.to(h.dtype), p.to(h.dtype), kept


def _softmax_grads(
    grad_y: Tensor, h: Tensor, p: Tensor, temperature: float, grad_p: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(dZ, dH)`` from the forward's weights ``p``, every tensor in the compute dtype."""
    ds = _fast_weight_grads(p, grad_y, h, grad_p)
    if ds is None:
        ds = _weight_grads(p, grad_y, h, grad_p)
    dz = ds if temperature == 1.0 else ds / temperature
    return dz, torch.bmm(p.transpose(1, 2), grad_y)


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
    s = _softmax_scores(logits, dtype, temperature)
    kept = _kept(s, mask, top_k)
    p = _checked_gate_weights(s, mask if kept is None else kept)
    dz, dh = _softmax_grads(grad_y.to(dtype), h.to(dtype), p, temperature, grad_weights)
    return dz.to(logits.dtype), dh.to(h.dtype)


class _SoftmaxMix(torch.autograd.Function):
    """Differentiable reference classic gate: ``(Y in H's dtype, p in the compute dtype)``; backward and
    forward mode in closed form from the saved ``p``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, h, temperature, mask, top_k, first_order):
        y, p, _ = _softmax_forward(logits, h, temperature, mask, top_k)
        return _as(y, h.dtype), p

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, h, temperature, mask, top_k, first_order = inputs
        _, p = output
        _save_for_both_modes(ctx, logits, h, mask, p)
        ctx.temperature, ctx.top_k, ctx.first_order = temperature, top_k, first_order
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, grad_p):
        logits, h, mask, p = ctx.saved_tensors
        grad_y = _grad_or_zeros(grad_y, p, h)
        if torch.is_grad_enabled():
            grads = _higher_order_grads(
                ctx,
                lambda: softmax_mix_backward(
                    grad_y, logits, h, temperature=ctx.temperature, mask=mask, top_k=ctx.top_k, grad_weights=grad_p
                ),
            )
        else:
            dz, dh = _softmax_grads(grad_y.to(p.dtype), h.to(p.dtype), p, ctx.temperature, grad_p)
            grads = dz.to(logits.dtype), dh.to(h.dtype)
        return *grads, None, None, None, None

    @staticmethod
    def jvp(ctx, logits_t, h_t, *_):
        _, h, _, p = ctx.saved_tensors
        dtype = p.dtype
        p_t = torch.zeros_like(p)
        if logits_t is not None:
            p_t = _weight_tangents(p, logits_t.to(dtype) / ctx.temperature)
        y_t = torch.einsum("bte,bed->btd", p_t, _finite(h.to(dtype)))
        if h_t is not None:
            y_t = y_t + _mix(p, h_t.to(dtype))
        return y_t.to(h.dtype), p_t


_SoftmaxMixOldStyle = _old_style(_SoftmaxMix)


def softmax_mix_function(
    logits: Tensor, h: Tensor, temperature: float, mask: Tensor | None, top_k: int | None, *, first_order: bool
) -> tuple[Tensor, Tensor]:
    """``(Y, p)`` of validated arguments, as :func:`attention_mix_function`."""
    return _apply(_SoftmaxMix, _SoftmaxMixOldStyle, logits, h, temperature, mask, top_k, first_order)


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
    y, p = softmax_mix_function(logits, h, temperature, mask, top_k, first_order=False)
    return (y, p.to(h.dtype)) if return_weights else y


# ---------------------------------------------------------------------------- experts_mix


def _preactivation(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``X @ W + bias`` as ``[B, E, D]`` in ``dtype``, rounded to ``x``'s dtype as the two-step path stores it."""
    z = torch.einsum("bk,ekd->bed" if x.dim() == 2 else "bek,ekd->bed", x.to(dtype), weight.to(dtype))
    if bias is not None:
        z = z + bias.to(dtype)
    return z.to(x.dtype).to(dtype)


def experts_output(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "relu") -> Tensor:
    """The experts' last layer ``H[b,e] = act(X[b,(e)] @ W[e] + bias[e])`` as ``[B, E, D]`` in ``x``'s dtype.

    Computed in float32 (float64 if an input is), with ``X @ W + bias`` and ``H`` rounded to ``x``'s dtype
    where the two-step path (a batched matmul, then the activation) stores them: values beyond a half
    dtype's range become ``+-inf`` before the activation, as they do there. Differentiable.

    Args:
        x: ``[B, K]`` (every expert reads the same input) or ``[B, E, K]`` (one input per expert).
        weight: ``[E, K, D]``.
        bias: ``[E, D]`` or None.
        activation: a name of :data:`fused_gate.activations.ACTIVATIONS`.
    """
    z = _preactivation(x, weight, bias, _compute_dtype(x, weight, bias))
    return ACTIVATIONS[activation].function(z).to(x.dtype)


def experts_mix_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    scale: float,
    mask: Tensor | None,
    top_k: int | None,
    gate: str,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """``(Y in x's dtype, p in the compute dtype)`` without autograd: :func:`experts_output`, then the gate.

    Args:
        x, weight, bias, activation: the experts' last layer, as in :func:`experts_output`.
        cz: the context ``C`` (``gate="attention"``) or the logits ``Z`` (``gate="softmax"``).
        scale: the score scale (``1 / temperature`` for the softmax gate).
        mask, top_k: as in :func:`fused_gate.experts_mix`.
        gate: ``"attention"`` or ``"softmax"``.
    """
    with torch.no_grad():
        h = experts_output(x, weight, bias, activation)
        if gate == "attention":
            y, p, _ = _attention_forward(h, cz, scale, mask, top_k)
        else:
            y, p, _ = _softmax_forward(cz, h, 1.0 / scale, mask, top_k)
    return y.to(x.dtype), p


def experts_mix_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    p: Tensor,
    *,
    scale: float,
    gate: str,
    activation: str,
    grad_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Closed-form ``(dL/dpre [B, E, D] in x's dtype, dC or dZ in cz's dtype)`` from the forward's weights
    ``p``, what the Triton backward writes: ``H`` recomputed, the gate's gradient ``dH`` (and ``dC`` or
    ``dZ``) as :func:`attention_mix_backward` / :func:`softmax_mix_backward` give it, then
    ``dpre = dH * act'(pre)`` through the activation's own torch backward (``pre = X W + bias``).

    Args:
        grad_y: ``G = dL/dY [B, T, D]``.
        x, weight, bias, cz, scale, gate, activation: the forward's inputs, as in :func:`experts_mix_forward`.
        p: the forward's weights ``[B, T, E]``.
        grad_weights: ``dL/dp [B, T, E]`` when the weights were returned and used, else None.
    """
    dtype = _compute_dtype(x, weight, bias, cz, p)
    with torch.enable_grad():
        pre = _preactivation(x, weight, bias, dtype).detach().requires_grad_()
        h = ACTIVATIONS[activation].function(pre)
    hc = h.detach().to(x.dtype).to(dtype)
    pc, gc = p.to(dtype), grad_y.to(dtype)
    if gate == "attention":
        dh, dcz = _attention_grads(gc, hc, cz.to(dtype), pc, scale, grad_weights)
    else:
        dcz, dh = _softmax_grads(gc, hc, pc, 1.0 / scale, grad_weights)
    (dpre,) = torch.autograd.grad(h, pre, dh)
    return dpre.to(x.dtype), dcz.to(cz.dtype)


def experts_mix_function(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    scale: float,
    mask: Tensor | None,
    top_k: int | None,
    gate: str,
    activation: str,
    *,
    first_order: bool,
) -> tuple[Tensor, Tensor]:
    """``(Y, p)`` of validated arguments, differentiable (``p`` in the compute dtype): :func:`experts_output`
    (torch's autograd), then :func:`attention_mix_function` or :func:`softmax_mix_function`, the two-step
    path's formulation, so its gradients are the two-step path's.

    Args:
        x, weight, bias, cz, scale, mask, top_k, gate, activation: as in :func:`experts_mix_forward`.
        first_order: a second backward raises, as through the fused ops (see :func:`attention_mix_function`).
    """
    h = experts_output(x, weight, bias, activation)
    if gate == "attention":
        y, p = attention_mix_function(h, cz, scale, mask, top_k, first_order=first_order)
    else:
        y, p = softmax_mix_function(cz, h, 1.0 / scale, mask, top_k, first_order=first_order)
    return y.to(x.dtype), p


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
    """The experts' last layer and the gate: :func:`experts_output`, then :func:`attention_mix` or
    :func:`softmax_mix` on it; differentiable (:func:`experts_mix_function`).

    Args:
        x, weight, bias, gate, context, logits, activation, mask, top_k, scale, temperature, return_weights: as
            in :func:`fused_gate.experts_mix` (float64 accepted too).

    Returns:
        ``Y [B, T, D]`` (and ``p [B, T, E]``) in ``x``'s dtype.
    """
    score_scale, top_k = validate_experts_mix(
        x, weight, bias, gate, context, logits, activation, mask, top_k, scale, temperature, return_weights
    )
    cz = context if gate == "attention" else logits
    y, p = experts_mix_function(x, weight, bias, cz, score_scale, mask, top_k, gate, activation, first_order=False)
    return (y, p.to(x.dtype)) if return_weights else y
