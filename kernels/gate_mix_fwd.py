"""Forward of the fused gate: scores, masked softmax over experts and weighted sum in one kernel.

For every row ``b`` and task ``t`` (``H [B, E, D]``, ``Y [B, T, D]``)::

    s[b,t,e] = scale * <C[t], H[b,e]>      (attention gate; C : [T, D] or [B, T, D])
    s[b,t,e] = scale * Z[b,t,e]            (softmax gate; Z : [B, T, E], scale = 1 / temperature)
    p[b,t,:] = softmax_e(s[b,t,:])  over the allowed experts (mask, s != -inf, top-k; none -> 0)
    Y[b,t,:] = sum_{e : p[b,t,e] != 0} p[b,t,e] * H[b,e,:]

One launch; each program owns ``ROWS`` rows. When the ``[ROWS, BLOCK_E, BLOCK_D]`` tile covers all
of D (``SINGLE_CHUNK``), ``H`` is read from memory exactly once and nothing of size ``B*E`` is
written unless ``p`` is asked for. With top-k the launch also writes the kept experts as one byte
per ``(b, t, e)``: the backward mixes exactly those, so its gradient is the gradient of the forward
that was computed even where a near-tie would round differently in its own summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fused_gate.kernels.config import TileConfig, register_limit, tile_config
from fused_gate.kernels.gate_tile import (
    add_task_dots,
    chunk,
    column,
    finite_or_zero,
    gate_weights,
    load_expert_tile,
    load_gate_tile,
    load_task_vector,
    output_column,
    store_gate_tile,
    store_task_vector,
    task_row,
    weighted,
)
from fused_gate.kernels.launch import (
    KernelLaunch,
    Plan,
    as_uint8,
    gate_meta,
    gate_operands,
    mix_outputs,
    operand,
    row_blocks,
)


@triton.jit
def _add_context_scores(s, tile, c, at, PER_ROW_CONTEXT: tl.constexpr):
    """``s[:, t, e] += <C[t], tile[:, e]>`` for every task, over the D chunk ``c`` and ``at`` start at."""
    _, offs_t, _, _, _, T, _, _ = at
    c_t = c[0]
    for t in range(0, T):
        s = add_task_dots(s, tile, load_task_vector(c_t, c, at, PER_ROW_CONTEXT), t, offs_t)
        c_t += c[2]
    return s


@triton.jit
def _store_mix(y, tile, p, at, GATE: tl.constexpr):
    """``Y[rows, t, chunk] = sum_{e : p != 0} p[:, t, e] * tile[:, e, :]`` for every task."""
    _, offs_t, _, _, _, T, _, _ = at
    if GATE == "attention":
        tile = finite_or_zero(tile)
    y_t = y[0]
    for t in range(0, T):
        p_t = task_row(p, t, offs_t)[:, :, None]
        # Attention: the tile is already finite where it matters, so no select per task.
        mix = tl.sum(p_t * tile if GATE == "attention" else weighted(p_t, tile, p_t), axis=1)
        store_task_vector(y_t, y, mix, at)
        y_t += y[2]


@triton.jit
def gate_mix_fwd_kernel(
    h_ptr, stride_hb, stride_he, stride_hd,
    cz_ptr, stride_czb, stride_czt, stride_czx,
    mask_ptr, stride_mb, stride_mt, stride_me,
    y_ptr, stride_yb, stride_yt, stride_yd,
    p_ptr, stride_pb, stride_pt, stride_pe,
    kept_ptr, stride_kb, stride_kt, stride_ke,
    B, E, D, scale, top_k,
    GATE: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    MASK: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    RETURN_WEIGHTS: tl.constexpr,
    STORE_KEPT: tl.constexpr,
    NUM_TASKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):  # fmt: skip
    """``cz`` is the context ``C`` (``GATE == "attention"``) or the logits ``Z``; see the module
    docstring. Each operand is a pointer and its ``[B, T, X]`` strides (``kernels/launch.py``); the
    outputs ``y``, ``p`` and ``kept`` are written with a unit last stride."""
    h = (h_ptr, stride_hb, stride_he, stride_hd)
    cz = (cz_ptr, stride_czb, stride_czt, stride_czx)
    mask = (mask_ptr, stride_mb, stride_mt, stride_me)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    at = (rows, tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_D), B, NUM_TASKS, E, D)
    # With SINGLE_CHUNK the tile holds all of D and the chunk loops below run once (a constant trip
    # count the compiler folds away), on the tile already in registers.
    chunks_end = BLOCK_D if SINGLE_CHUNK else D
    if SINGLE_CHUNK:
        tile = load_expert_tile(h, at)

    # stage 1: scores, <C[t], H[b,e]> over D (attention gate) or the given logits (softmax gate)
    if GATE == "attention":
        s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, chunks_end, BLOCK_D):
            # Each chunk moves the base pointers (64-bit scalars); offsets inside stay < BLOCK_D.
            col = tl.cast(d0, tl.int64)
            chunk_at = chunk(at, d0)
            tile_d = tile if SINGLE_CHUNK else load_expert_tile(column(h, col), chunk_at)
            s = _add_context_scores(s, tile_d, column(cz, col), chunk_at, PER_ROW_CONTEXT)
    else:
        s = load_gate_tile(cz, at)

    # stage 2: the weights, a masked (top-k) softmax over experts
    p, kept = gate_weights(s * scale, mask, at, top_k, MASK, HAS_TOP_K)
    if RETURN_WEIGHTS:
        store_gate_tile((p_ptr, stride_pb, stride_pt, stride_pe), p, at)
    if STORE_KEPT:
        store_gate_tile((kept_ptr, stride_kb, stride_kt, stride_ke), kept, at)

    # stage 3: the mix, Y[b,t] = sum_e p[b,t,e] H[b,e]; chunked, the second walk over this program's
    # rows of H hits L2 (they were just read).
    for d0 in range(0, chunks_end, BLOCK_D):
        col = tl.cast(d0, tl.int64)
        chunk_at = chunk(at, d0)
        tile_d = tile if SINGLE_CHUNK else load_expert_tile(column(h, col), chunk_at)
        _store_mix(output_column((y_ptr, stride_yb, stride_yt, stride_yd), col), tile_d, p, chunk_at, GATE)


def plan_forward(
    h: Tensor,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    top_k: int | None,
    *,
    gate: str,
    return_weights: bool,
    kept: Tensor | None = None,
    config: TileConfig | None = None,
) -> Plan:
    """The forward's plan (``kernels/launch.py``): outputs ``(Y [B, T, D], p [B, T, E] or None)`` in
    ``h``'s dtype, and one launch (none when ``B = 0``).

    Args:
        h: the expert outputs ``[B, E, D]``, any strides (no copies).
        cz: the context ``C [T, D]`` or ``[B, T, D]`` (``gate="attention"``) or the logits ``Z [B, T, E]``
            (``gate="softmax"``; ``scale = 1 / temperature``).
        mask, top_k: as in :func:`fused_gate.attention_mix`.
        return_weights: also write ``p``.
        kept: a contiguous bool ``[B, T, E]`` the launch fills with the experts each (row, task) mixed
            (with ``top_k``: what the backward must use).
        config: replaces the heuristic tile (``bench/tune.py`` sweeps it); its ``block_t`` and
            ``block_e`` must cover ``T`` and ``E``.

    Inputs are validated by the caller.
    """
    batch, experts, dim = h.shape
    tasks = cz.shape[-2]
    y, p = mix_outputs(h, batch, tasks, experts, dim, return_weights)
    if batch == 0:
        return Plan((y, p))
    cfg = config or tile_config(experts, dim, tasks, backward=False)
    args = (
        *operand(h),
        *gate_operands(cz, mask, placeholder=h),
        *operand(y),
        *operand(p, placeholder=y),
        *operand(as_uint8(kept), placeholder=y),
        batch,
        experts,
        dim,
        scale,
        top_k or 0,
    )
    meta = dict(
        **gate_meta(gate, cz, mask),
        HAS_TOP_K=top_k is not None,
        RETURN_WEIGHTS=return_weights,
        STORE_KEPT=kept is not None,
        **cfg.meta(register_limit(backward=False, gate=gate)),
    )
    return Plan((y, p), (KernelLaunch(gate_mix_fwd_kernel, row_blocks(batch, cfg.rows), args, meta),))
