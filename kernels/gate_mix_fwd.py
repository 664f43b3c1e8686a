"""Forward of the fused gate: scores, masked softmax over experts and weighted sum in one kernel.

For every row ``b`` and task ``t`` (``H [B, E, D]``, ``Y [B, T, D]``)::

    s[b,t,e] = scale * <C[t], H[b,e]>      (ATTENTION; C : [T, D] or [B, T, D])
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

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_gate.kernels.config import (
    KernelLaunch,
    TileConfig,
    mask_operand,
    operand,
    register_limit,
    registers_for_warps,
    tile_config,
)
from fused_gate.kernels.gate_tile import (
    add_task_dots,
    finite_or_zero,
    gate_weights,
    load_expert_tile,
    load_gate_tile,
    load_task_vector,
    store_gate_tile,
    store_task_vector,
    task_row,
    weighted,
)


@triton.jit
def _context_scores(
    s,
    tile,
    rows,
    offs_t,
    offs_d,
    c_ptr,
    B,
    D,
    stride_cb,
    stride_ct,
    stride_cd,
    PER_ROW_CONTEXT: tl.constexpr,
    NUM_TASKS: tl.constexpr,
):
    """``s[:, t, e] += <C[t], tile[:, e]>`` for every task, over one D chunk."""
    c_t = c_ptr
    for t in range(0, NUM_TASKS):
        c = load_task_vector(c_t, rows, offs_d, B, D, stride_cb, stride_cd, PER_ROW_CONTEXT)
        s = add_task_dots(s, tile, c, t, offs_t)
        c_t += stride_ct
    return s


@triton.jit
def _mix_and_store(
    tile, p, rows, offs_t, offs_d, y_ptr, B, D, stride_yb, stride_yt, NUM_TASKS: tl.constexpr, ATTENTION: tl.constexpr
):
    """``Y[rows, t, chunk] = sum_{e : p != 0} p[:, t, e] * tile[:, e, :]`` for every task."""
    if ATTENTION:
        tile = finite_or_zero(tile)
    y_t = y_ptr
    for t in range(0, NUM_TASKS):
        p_t = task_row(p, t, offs_t)[:, :, None]
        # Attention: the tile is already finite where it matters, so no select per task.
        y = tl.sum(p_t * tile if ATTENTION else weighted(p_t, tile, p_t), axis=1)
        store_task_vector(y_t, y, rows, offs_d, B, D, stride_yb)
        y_t += stride_yt


@triton.jit
def gate_mix_fwd_kernel(
    h_ptr, stride_hb, stride_he, stride_hd,
    cz_ptr, stride_czb, stride_czt, stride_czx,
    mask_ptr, stride_mb, stride_mt, stride_me,
    y_ptr, stride_yb, stride_yt, stride_yd,
    p_ptr, stride_pb, stride_pt, stride_pe,
    kept_ptr, stride_kb, stride_kt, stride_ke,
    B, E, D, scale, top_k,
    ATTENTION: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_PER_ROW: tl.constexpr,
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
    """``cz`` is the context ``C`` (``ATTENTION``) or the logits ``Z``; see the module docstring.
    Each operand is a pointer and its ``[B, T, X]`` strides (``config.operand``); ``y``, ``p`` and
    ``kept`` are written with a unit last stride."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)

    # 1. scores: <C[t], H[b,e]> over D, or the given logits. With SINGLE_CHUNK the tile holds all
    # of D and the chunk loops below run once (a constant trip count the compiler folds away), on
    # the tile already in registers.
    chunks_end = BLOCK_D if SINGLE_CHUNK else D
    if SINGLE_CHUNK:
        tile = load_expert_tile(h_ptr, rows, offs_e, offs_d, B, E, D, stride_hb, stride_he, stride_hd)
    if ATTENTION:
        s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, chunks_end, BLOCK_D):
            # Each chunk moves the base pointers (64-bit scalars); offsets inside stay < BLOCK_D.
            col = tl.cast(d0, tl.int64)
            chunk = tile if SINGLE_CHUNK else load_expert_tile(
                h_ptr + col * stride_hd, rows, offs_e, offs_d, B, E, D - d0, stride_hb, stride_he, stride_hd
            )  # fmt: skip
            s = _context_scores(
                s, chunk, rows, offs_t, offs_d, cz_ptr + col * stride_czx, B, D - d0,
                stride_czb, stride_czt, stride_czx, PER_ROW_CONTEXT, NUM_TASKS,
            )  # fmt: skip
    else:
        s = load_gate_tile(cz_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_czb, stride_czt, stride_czx)

    # 2. the masked (top-k) softmax over experts
    p, kept = gate_weights(
        s * scale, mask_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_mb, stride_mt, stride_me,
        top_k, HAS_MASK, MASK_PER_ROW, HAS_TOP_K, BLOCK_E,
    )  # fmt: skip
    if RETURN_WEIGHTS:
        store_gate_tile(p_ptr, p, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_pb, stride_pt)
    if STORE_KEPT:
        store_gate_tile(kept_ptr, kept, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_kb, stride_kt)

    # 3. the mix, Y[b,t] = sum_e p[b,t,e] H[b,e]; chunked, the second walk over this program's rows
    # of H hits L2 (they were just read).
    for d0 in range(0, chunks_end, BLOCK_D):
        col = tl.cast(d0, tl.int64)
        chunk = tile if SINGLE_CHUNK else load_expert_tile(
            h_ptr + col * stride_hd, rows, offs_e, offs_d, B, E, D - d0, stride_hb, stride_he, stride_hd
        )  # fmt: skip
        _mix_and_store(
            chunk, p, rows, offs_t, offs_d, y_ptr + col, B, D - d0, stride_yb, stride_yt, NUM_TASKS, ATTENTION
        )


def plan_forward(
    h: Tensor,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    top_k: int | None,
    *,
    attention: bool,
    return_weights: bool,
    kept: Tensor | None = None,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor | None, list[KernelLaunch]]:
    """Allocate the outputs and describe the launch (none when ``B = 0``); see :func:`gate_mix_forward`.

    ``kept``: a contiguous bool ``[B, T, E]`` the launch fills with the experts each (row, task)
    mixed (with ``top_k``: what the backward must use). ``config`` replaces the heuristic tile
    (``bench/tune.py`` sweeps it); its ``block_t`` and ``block_e`` must cover ``T`` and ``E``.
    """
    batch, experts, dim = h.shape
    tasks = cz.shape[-2]
    y = torch.empty((batch, tasks, dim), device=h.device, dtype=h.dtype)
    p = torch.empty((batch, tasks, experts), device=h.device, dtype=h.dtype) if return_weights else None
    if batch == 0:
        return y, p, []
    cfg = config or tile_config(experts, dim, tasks, backward=False)
    m = mask_operand(mask)
    args = (
        *operand(h),
        *operand(cz),
        *operand(m, placeholder=h),
        *operand(y),
        *operand(p, placeholder=y),
        *operand(mask_operand(kept), placeholder=y),
        batch,
        experts,
        dim,
        scale,
        top_k or 0,
    )
    meta = dict(
        ATTENTION=attention,
        PER_ROW_CONTEXT=attention and cz.dim() == 3,
        HAS_MASK=m is not None,
        MASK_PER_ROW=m is not None and m.dim() == 3,
        HAS_TOP_K=top_k is not None,
        RETURN_WEIGHTS=return_weights,
        STORE_KEPT=kept is not None,
        NUM_TASKS=tasks,
        BLOCK_T=cfg.block_t,
        BLOCK_E=cfg.block_e,
        BLOCK_D=cfg.block_d,
        ROWS=cfg.rows,
        SINGLE_CHUNK=cfg.single_chunk,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=registers_for_warps(register_limit(backward=False, attention=attention), cfg.num_warps),
    )
    return y, p, [KernelLaunch(gate_mix_fwd_kernel, (triton.cdiv(batch, cfg.rows),), args, meta)]


def gate_mix_forward(
    h: Tensor,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    top_k: int | None,
    *,
    attention: bool,
    return_weights: bool,
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run the forward. ``cz``: the context ``C [T, D]``/``[B, T, D]`` (attention gate) or the logits
    ``Z [B, T, E]`` (softmax gate).

    Returns ``Y [B, T, D]`` in ``h``'s dtype and, when ``return_weights``, ``p [B, T, E]`` too; fills
    ``kept`` when given (see :func:`plan_forward`). Inputs are validated by the caller; any strides
    are accepted (no copies).
    """
    y, p, launches = plan_forward(
        h, cz, mask, scale, top_k, attention=attention, return_weights=return_weights, kept=kept
    )
    for launch in launches:
        launch.launch()
    return y, p
