"""``@triton.jit`` building blocks shared by the gate kernels.

Shapes inside a program: ``ROWS`` rows of the batch, ``BLOCK_T >= T`` tasks, ``BLOCK_E >= E``
experts, a ``BLOCK_D`` chunk of the expert width. Expert tiles are ``[ROWS, BLOCK_E, BLOCK_D]``,
gate tiles (per-(row, task, expert) scores and weights) ``[ROWS, BLOCK_T, BLOCK_E]``.

Two tuples travel from a kernel into these helpers (``docs/kernels.md``, "Vocabulary"):

- an **operand** ``(ptr, stride_b, stride_t, stride_x)``: a tensor read as ``[B, T, X]`` (``H`` as
  ``[B, E, D]``); an output (allocated contiguous) is written with a unit last stride. Kernels
  move ``ptr`` to the D chunk (:func:`column`, :func:`output_column`) or the task they work on, so
  offsets inside stay small.
- **at** ``(rows, offs_t, offs_e, offs_d, B, T, E, D)``: the program's rows (64-bit) and its task,
  expert and column offsets, and the bounds they are masked against; ``D`` is the width left from the
  chunk's first column (:func:`chunk`).

Every offset is 64-bit before it meets a stride: ``B * E * D`` may exceed ``2**31``, and so may a
small operand's offsets in a transposed layout (``tests/aot.py`` proves it for every load and store).

Special values: a ``-inf`` score excludes its expert exactly like the mask; ``+inf`` or NaN among a
(row, task)'s allowed scores make its whole ``p`` NaN (with or without top-k); an expert whose weight
is 0 contributes nothing (not ``0 * NaN``) to ``Y`` or to any gradient.
"""

import triton
import triton.language as tl


@triton.jit
def column(x, col):
    """Input operand ``x`` moved to column ``col`` (a 64-bit scalar) of its last axis."""
    return (x[0] + col * x[3], x[1], x[2], x[3])


@triton.jit
def output_column(x, col):
    """Output ``x`` (unit last stride) moved to column ``col`` (a 64-bit scalar) of its last axis."""
    return (x[0] + col, x[1], x[2], x[3])


@triton.jit
def chunk(at, d0):
    """``at`` for the D chunk that starts at column ``d0``: the width left is ``D - d0``."""
    rows, offs_t, offs_e, offs_d, B, T, E, D = at
    return (rows, offs_t, offs_e, offs_d, B, T, E, D - d0)


@triton.jit
def load_expert_tile(x, at):
    """``X[rows, e, d]`` as float32 ``[ROWS, BLOCK_E, BLOCK_D]``, zero outside ``[B, E, D]``."""
    ptr, stride_b, stride_e, stride_d = x
    rows, _, offs_e, offs_d, B, _, E, D = at
    r = rows[:, None, None]
    e = offs_e.to(tl.int64)[None, :, None]
    d = offs_d.to(tl.int64)[None, None, :]
    v = tl.load(ptr + r * stride_b + e * stride_e + d * stride_d, mask=(r < B) & (e < E) & (d < D), other=0.0)
    return v.to(tl.float32)


@triton.jit
def store_expert_tile(x, value, at):
    """``X[rows, e, d] = value`` for the output ``x``, cast to its dtype."""
    ptr, stride_b, stride_e, _ = x
    rows, _, offs_e, offs_d, B, _, E, D = at
    r = rows[:, None, None]
    e = offs_e.to(tl.int64)[None, :, None]
    d = offs_d.to(tl.int64)[None, None, :]
    tl.store(ptr + r * stride_b + e * stride_e + d, value.to(ptr.dtype.element_ty), mask=(r < B) & (e < E) & (d < D))


@triton.jit
def load_task_vector(x_t, x, at, PER_ROW: tl.constexpr):
    """One task's vector of operand ``x`` as float32, from ``x_t`` = ``&X[0, t, 0]`` (``&X[t, 0]`` when
    shared): ``X[rows, t, d]`` -> ``[ROWS, 1, BLOCK_D]`` when ``PER_ROW``, else ``X[t, d]`` ->
    ``[1, 1, BLOCK_D]`` (loaded once, broadcast over rows).

    Callers step ``x_t`` by the task stride ``x[2]`` from one task to the next: a 64-bit pointer
    increment, where ``t * stride_t`` in 32 bits could overflow.
    """
    rows, _, _, offs_d, B, _, _, D = at
    d = offs_d.to(tl.int64)
    if PER_ROW:
        ptrs = x_t + rows[:, None] * x[1] + d[None, :] * x[3]
        v = tl.load(ptrs, mask=(rows[:, None] < B) & (d[None, :] < D), other=0.0).to(tl.float32)[:, None, :]
    else:
        v = tl.load(x_t + d * x[3], mask=d < D, other=0.0).to(tl.float32)[None, None, :]
    return v


@triton.jit
def store_task_vector(x_t, x, value, at):
    """``X[rows, t, d] = value`` at ``x_t`` = ``&X[0, t, 0]`` of the output ``x`` (``value`` is ``[ROWS, BLOCK_D]``)."""
    rows, _, _, offs_d, B, _, _, D = at
    d = offs_d.to(tl.int64)[None, :]
    tl.store(x_t + rows[:, None] * x[1] + d, value.to(x_t.dtype.element_ty), mask=(rows[:, None] < B) & (d < D))


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
def expert_column(x, e, offs_e):
    """``x[:, :, e]`` of a ``[ROWS, BLOCK_T, BLOCK_E]`` tensor as ``[ROWS, BLOCK_T]``."""
    return tl.sum(tl.where((offs_e == e)[None, None, :], x, 0.0), axis=2)


@triton.jit
def load_gate_tile(x, at):
    """``X[rows, t, e]`` of a ``[B, T, E]`` operand as float32 ``[ROWS, BLOCK_T, BLOCK_E]``."""
    ptr, stride_b, stride_t, stride_e = x
    rows, offs_t, offs_e, _, B, T, E, _ = at
    r = rows[:, None, None]
    t = offs_t.to(tl.int64)[None, :, None]
    e = offs_e.to(tl.int64)[None, None, :]
    v = tl.load(ptr + r * stride_b + t * stride_t + e * stride_e, mask=(r < B) & (t < T) & (e < E), other=0.0)
    return v.to(tl.float32)


@triton.jit
def store_rows_tasks(x, value, rows, offs_t, offs_x, B, T, X):
    """``X[rows, t, x] = value`` (``[ROWS, BLOCK_T, BLOCK_X]``) for a ``[B, T, X]`` output ``x``."""
    ptr, stride_b, stride_t, _ = x
    r = rows[:, None, None]
    t = offs_t.to(tl.int64)[None, :, None]
    c = offs_x.to(tl.int64)[None, None, :]
    tl.store(ptr + r * stride_b + t * stride_t + c, value.to(ptr.dtype.element_ty), mask=(r < B) & (t < T) & (c < X))


@triton.jit
def store_gate_tile(x, value, at):
    """``X[rows, t, e] = value`` for a ``[B, T, E]`` output ``x`` (weights, kept experts, ``dZ``)."""
    rows, offs_t, offs_e, _, B, T, E, _ = at
    store_rows_tasks(x, value, rows, offs_t, offs_e, B, T, E)


@triton.jit
def store_mix_tile(x, value, at):
    """``Y[rows, t, d] = value`` (``[ROWS, BLOCK_T, BLOCK_D]``) for a ``[B, T, D]`` output ``x``."""
    rows, offs_t, _, offs_d, B, T, _, D = at
    store_rows_tasks(x, value, rows, offs_t, offs_d, B, T, D)


@triton.jit
def unmasked_experts(mask, at, MASK: tl.constexpr):
    """Bool ``[ROWS or 1, BLOCK_T, BLOCK_E]``: the (task, expert) pairs inside ``[T, E]`` that the mask
    (``MASK``: ``"none"``, ``"shared"`` ``[T, E]`` or ``"per_row"`` ``[B, T, E]``) does not exclude."""
    ptr, stride_b, stride_t, stride_e = mask
    rows, offs_t, offs_e, _, B, T, E, _ = at
    t = offs_t.to(tl.int64)[None, :, None]
    e = offs_e.to(tl.int64)[None, None, :]
    ok = (t < T) & (e < E)
    if MASK == "per_row":
        r = rows[:, None, None]
        ok = ok & (tl.load(ptr + r * stride_b + t * stride_t + e * stride_e, mask=ok & (r < B), other=0) != 0)
    elif MASK == "shared":
        ok = ok & (tl.load(ptr + t * stride_t + e * stride_e, mask=ok, other=0) != 0)
    return ok


@triton.jit
def top_k_keep(s, allowed, top_k, offs_e):
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
        first = tl.min(tl.where(avail & (s == best[:, :, None]), e, offs_e.shape[0]), axis=2)
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
def score_grads(p, dp):
    """``ds = p * (dp - sum_e p dp)``, the gradient of the scores from the weights' ``dp = dL/dp``, with ``dp``
    taken as 0 where ``p = 0`` (an expert the softmax left out reaches no gradient, even a NaN or inf one)."""
    dp = tl.where(p != 0.0, dp, 0.0)
    return p * (dp - tl.sum(p * dp, axis=2)[:, :, None])


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
def gate_weights(s, mask, at, top_k, MASK: tl.constexpr, HAS_TOP_K: tl.constexpr):
    """``(p, allowed)``: ``p = softmax_e(s)`` over the allowed experts, which are those the mask
    lets in, whose score is not ``-inf``, and (``HAS_TOP_K``) among the ``top_k`` best."""
    allowed = unmasked_experts(mask, at, MASK) & (s != float("-inf"))
    if HAS_TOP_K:
        allowed = top_k_keep(s, allowed, top_k, at[2])
    return masked_softmax(s, allowed), allowed
