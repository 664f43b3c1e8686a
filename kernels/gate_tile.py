"""``@triton.jit`` building blocks shared by the gate kernels.

Shapes inside a program: ``ROWS`` rows of the batch, ``BLOCK_T >= T`` tasks, ``BLOCK_E >= E``
experts, a ``BLOCK_D`` chunk of the expert width. Expert tiles are ``[ROWS, BLOCK_E, BLOCK_D]``,
per-(row, task) quantities (scores, weights) are ``[ROWS, BLOCK_T, BLOCK_E]``. Every offset is
64-bit before it meets a stride: ``B * E * D`` may exceed ``2**31``, and so may a small operand's
offsets in a transposed layout (``tests/aot.py`` proves it for every load and store).

Special values: a ``-inf`` score excludes its expert exactly like the mask; ``+inf`` or NaN among a
(row, task)'s allowed scores make its whole ``p`` NaN (with or without top-k); an expert whose weight
is 0 contributes nothing (not ``0 * NaN``) to ``Y`` or to any gradient.
"""

import triton
import triton.language as tl


@triton.jit
def load_expert_tile(ptr, rows, offs_e, offs_d, B, E, D, stride_b, stride_e, stride_d):
    """``X[rows, e, d]`` as float32 ``[ROWS, BLOCK_E, BLOCK_D]``, zero outside ``[B, E, D]``."""
    r = rows[:, None, None]
    e = offs_e.to(tl.int64)[None, :, None]
    d = offs_d.to(tl.int64)[None, None, :]
    x = tl.load(ptr + r * stride_b + e * stride_e + d * stride_d, mask=(r < B) & (e < E) & (d < D), other=0.0)
    return x.to(tl.float32)


@triton.jit
def store_expert_tile(ptr, x, rows, offs_e, offs_d, B, E, D, stride_b, stride_e):
    """``X[rows, e, d] = x`` for a unit-stride last axis, cast to ``X``'s dtype."""
    r = rows[:, None, None]
    e = offs_e.to(tl.int64)[None, :, None]
    d = offs_d.to(tl.int64)[None, None, :]
    tl.store(ptr + r * stride_b + e * stride_e + d, x.to(ptr.dtype.element_ty), mask=(r < B) & (e < E) & (d < D))


@triton.jit
def load_task_vector(task_ptr, rows, offs_d, B, D, stride_b, stride_d, PER_ROW: tl.constexpr):
    """One task's vector as float32, from ``task_ptr`` = ``&X[0, t, 0]`` (``&X[t, 0]`` when shared):
    ``X[rows, t, d]`` -> ``[ROWS, 1, BLOCK_D]`` when ``PER_ROW``, else ``X[t, d]`` -> ``[1, 1, BLOCK_D]``
    (loaded once, broadcast over rows).

    Callers step ``task_ptr`` by the task stride from one task to the next: a 64-bit pointer
    increment, where ``t * stride_t`` in 32 bits could overflow.
    """
    d = offs_d.to(tl.int64)
    if PER_ROW:
        ptrs = task_ptr + rows[:, None] * stride_b + d[None, :] * stride_d
        x = tl.load(ptrs, mask=(rows[:, None] < B) & (d[None, :] < D), other=0.0).to(tl.float32)[:, None, :]
    else:
        x = tl.load(task_ptr + d * stride_d, mask=d < D, other=0.0).to(tl.float32)[None, None, :]
    return x


@triton.jit
def store_task_vector(task_ptr, x, rows, offs_d, B, D, stride_b):
    """``X[rows, t, d] = x`` at ``task_ptr`` = ``&X[0, t, 0]`` (``x`` is ``[ROWS, BLOCK_D]``, unit-stride last axis)."""
    d = offs_d.to(tl.int64)[None, :]
    tl.store(
        task_ptr + rows[:, None] * stride_b + d, x.to(task_ptr.dtype.element_ty), mask=(rows[:, None] < B) & (d < D)
    )


@triton.jit
def add_task_dots(acc, tile, vec, t, offs_t):
    """``acc[:, t, :] += sum_d tile * vec``: the dot products of one task's vector with every expert.

    Broadcast-multiply-sum rather than ``tl.dot``: T and E are often below 16 and the op is
    memory-bound, so tensor cores buy nothing here.
    """
    dots = tl.sum(tile * vec, axis=2)
    return tl.where((offs_t == t)[None, :, None], acc + dots[:, None, :], acc)


@triton.jit
def task_row(x, t, offs_t):
    """``x[:, t, :]`` of a ``[ROWS, BLOCK_T, BLOCK_E]`` tensor as ``[ROWS, BLOCK_E]``."""
    return tl.sum(tl.where((offs_t == t)[None, :, None], x, 0.0), axis=1)


@triton.jit
def load_gate_tile(ptr, rows, offs_t, offs_e, B, T, E, stride_b, stride_t, stride_e):
    """``X[rows, t, e]`` of a ``[B, T, E]`` tensor as float32 ``[ROWS, BLOCK_T, BLOCK_E]``."""
    r = rows[:, None, None]
    t = offs_t.to(tl.int64)[None, :, None]
    e = offs_e.to(tl.int64)[None, None, :]
    x = tl.load(ptr + r * stride_b + t * stride_t + e * stride_e, mask=(r < B) & (t < T) & (e < E), other=0.0)
    return x.to(tl.float32)


@triton.jit
def store_gate_tile(ptr, x, rows, offs_t, offs_e, B, T, E, stride_b, stride_t):
    """``X[rows, t, e] = x`` for a ``[B, T, E]`` tensor with unit-stride last axis."""
    r = rows[:, None, None]
    t = offs_t.to(tl.int64)[None, :, None]
    e = offs_e.to(tl.int64)[None, None, :]
    tl.store(ptr + r * stride_b + t * stride_t + e, x.to(ptr.dtype.element_ty), mask=(r < B) & (t < T) & (e < E))


@triton.jit
def allowed_experts(
    mask_ptr,
    rows,
    offs_t,
    offs_e,
    B,
    T,
    E,
    stride_b,
    stride_t,
    stride_e,
    HAS_MASK: tl.constexpr,
    MASK_PER_ROW: tl.constexpr,
):
    """Bool ``[ROWS or 1, BLOCK_T, BLOCK_E]``: which (task, expert) pairs the mask lets take part."""
    t = offs_t.to(tl.int64)[None, :, None]
    e = offs_e.to(tl.int64)[None, None, :]
    ok = (t < T) & (e < E)
    if HAS_MASK:
        if MASK_PER_ROW:
            r = rows[:, None, None]
            m = tl.load(mask_ptr + r * stride_b + t * stride_t + e * stride_e, mask=ok & (r < B), other=0)
        else:
            m = tl.load(mask_ptr + t * stride_t + e * stride_e, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def top_k_keep(s, allowed, top_k, offs_e, BLOCK_E: tl.constexpr):
    """Keep the ``top_k`` largest allowed scores of each (row, task); ties go to the lowest expert.

    ``top_k`` rounds of "take the best remaining expert": O(k * E) work per (row, task) and only
    ``[ROWS, BLOCK_T, BLOCK_E]`` of state, where a rank matrix would need ``E**2`` registers. An
    allowed NaN score is always kept (``tl.max`` skips NaN), so it makes ``p`` NaN as without top-k.
    """
    e = offs_e[None, None, :]
    nan = s != s
    kept = tl.zeros_like(s) != 0.0
    for _ in range(0, top_k):
        avail = allowed & ~kept & ~nan
        best = tl.max(tl.where(avail, s, float("-inf")), axis=2)
        first = tl.min(tl.where(avail & (s == best[:, :, None]), e, BLOCK_E), axis=2)
        kept = kept | (e == first[:, :, None])
    return kept | (allowed & nan)


@triton.jit
def masked_softmax(s, allowed):
    """Softmax over the expert axis (last) of ``s [ROWS, BLOCK_T, BLOCK_E]`` restricted to ``allowed``.

    Rows with no allowed expert give ``p = 0`` (not NaN); an allowed ``+inf`` or NaN score makes the
    row's ``p`` NaN, as in torch.
    """
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, axis=2)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m[:, :, None])
    denom = tl.sum(p, axis=2)
    return p / tl.where(denom == 0.0, 1.0, denom)[:, :, None]


@triton.jit
def weighted(w, x, p):
    """``w * x`` where the gate weight ``p`` is not 0, else 0: an unused expert's NaN or inf never
    reaches a sum as ``0 * NaN``."""
    return tl.where(p != 0.0, w * x, 0.0)


@triton.jit
def finite_or_zero(x):
    """``x`` with NaN and inf replaced by 0.

    For the attention gate this makes every weighted sum over experts exact without a select per
    task: an expert whose output is not finite scores NaN or +-inf, so either its weight is 0
    (a -inf score) or its whole (row, task) is NaN already.
    """
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def gate_weights(
    s,
    mask_ptr,
    rows,
    offs_t,
    offs_e,
    B,
    T,
    E,
    stride_mb,
    stride_mt,
    stride_me,
    top_k,
    HAS_MASK: tl.constexpr,
    MASK_PER_ROW: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``(p, allowed)``: ``p = softmax_e(s)`` over the allowed experts, which are those the mask
    lets in, whose score is not ``-inf``, and (``HAS_TOP_K``) among the ``top_k`` best."""
    allowed = allowed_experts(
        mask_ptr, rows, offs_t, offs_e, B, T, E, stride_mb, stride_mt, stride_me, HAS_MASK, MASK_PER_ROW
    )
    allowed = allowed & (s != float("-inf"))
    if HAS_TOP_K:
        allowed = top_k_keep(s, allowed, top_k, offs_e, BLOCK_E)
    return masked_softmax(s, allowed), allowed
