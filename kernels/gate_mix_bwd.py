"""Backward of the fused gate: recompute ``p`` from the inputs, then ``dH`` and ``dC`` (or ``dZ``).

For the upstream gradient ``G = dL/dY [B, T, D]`` (and optionally ``Gp = dL/dp [B, T, E]``)::

    dp[b,t,e] = <G[b,t], H[b,e]> (+ Gp[b,t,e])                               (0 where p = 0)
    ds[b,t,e] = p[b,t,e] * (dp[b,t,e] - sum_e' p[b,t,e'] dp[b,t,e'])      (= dp - <G, Y>)
    dH[b,e]   = sum_t p[b,t,e] G[b,t] + scale * sum_t ds[b,t,e] C[t]     (C term: ATTENTION only)
    dC[t]     = scale * sum_b sum_e ds[b,t,e] H[b,e]                       (no sum over b: per-row C)
    dZ[b,t,e] = scale * ds[b,t,e]                                          (softmax gate, scale = 1/temperature)

Nothing is saved by the forward but, with top-k, the kept experts (passed here as the mask): ``p``
is recomputed from ``H`` and ``C`` (or ``Z``). An expert with ``p = 0`` reaches no gradient, even
when its output is NaN or infinite. A shared ``C``
is reduced deterministically: a persistent grid where each program accumulates its rows into its
own float32 ``[T, D]`` workspace slot, then ``context_grad_reduce_kernel`` sums the slots in a
fixed order. No float atomics: two runs give bit-identical gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_gate.kernels.config import (
    REDUCE_BLOCK,
    REDUCE_SLOTS,
    KernelLaunch,
    TileConfig,
    mask_operand,
    max_persistent_programs,
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
    store_expert_tile,
    store_gate_tile,
    store_task_vector,
    task_row,
)


@triton.jit
def _score_and_grad_dots(
    s,
    dp,
    tile,
    rows,
    offs_t,
    offs_d,
    cz_ptr,
    g_ptr,
    B,
    D,
    stride_czb,
    stride_czt,
    stride_czx,
    stride_gb,
    stride_gt,
    stride_gd,
    ATTENTION: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    NUM_TASKS: tl.constexpr,
):
    """Over one D chunk: ``s += <C[t], H[e]>`` (ATTENTION) and ``dp += <G[t], H[e]>`` for every task."""
    c_t = cz_ptr
    g_t = g_ptr
    for t in range(0, NUM_TASKS):
        if ATTENTION:
            c = load_task_vector(c_t, rows, offs_d, B, D, stride_czb, stride_czx, PER_ROW_CONTEXT)
            s = add_task_dots(s, tile, c, t, offs_t)
            c_t += stride_czt
        g = load_task_vector(g_t, rows, offs_d, B, D, stride_gb, stride_gd, True)
        dp = add_task_dots(dp, tile, g, t, offs_t)
        g_t += stride_gt
    return s, dp


@triton.jit
def _input_grads_chunk(
    tile,
    p,
    ds,
    dc_acc,
    rows,
    offs_t,
    offs_e,
    offs_d,
    first_block,
    cz_ptr,
    g_ptr,
    dh_ptr,
    dcz_ptr,
    ws_slot,
    ws_pitch,
    B,
    E,
    D,
    scale,
    stride_czb,
    stride_czt,
    stride_czx,
    stride_gb,
    stride_gt,
    stride_gd,
    stride_dhb,
    stride_dhe,
    stride_dczb,
    stride_dczt,
    ATTENTION: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    NUM_TASKS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    """Write ``dH`` for one D chunk and fold this chunk's ``dC`` into its destination.

    Every pointer already points at the chunk's first column and ``D`` is the chunk's remaining
    width, so the offsets here stay small; ``ws_slot`` is this program's ``[T, ws_pitch]`` slot.
    """
    dh = tl.zeros_like(tile)
    if ATTENTION:
        tile = finite_or_zero(tile)  # exact: see finite_or_zero
    c_t = cz_ptr
    g_t = g_ptr
    dc_t = dcz_ptr
    ws_t = ws_slot
    for t in range(0, NUM_TASKS):
        g = load_task_vector(g_t, rows, offs_d, B, D, stride_gb, stride_gd, True)
        g_t += stride_gt
        dh += task_row(p, t, offs_t)[:, :, None] * g
        if ATTENTION:
            ds_t = task_row(ds, t, offs_t)[:, :, None]
            c = load_task_vector(c_t, rows, offs_d, B, D, stride_czb, stride_czx, PER_ROW_CONTEXT)
            c_t += stride_czt
            dh += scale * ds_t * c
            dc = scale * tl.sum(ds_t * tile, axis=1)
            if PER_ROW_CONTEXT:
                store_task_vector(dc_t, dc, rows, offs_d, B, D, stride_dczb)
                dc_t += stride_dczt
            elif SINGLE_CHUNK:
                dc_acc = tl.where((offs_t == t)[:, None], dc_acc + tl.sum(dc, axis=0)[None, :], dc_acc)
            else:
                # The slot belongs to this program alone: read-add-write without atomics. The
                # program's first block initialises it, so the workspace needs no memset launch.
                ok = offs_d < D
                prev = tl.load(ws_t + offs_d, mask=ok & ~first_block, other=0.0)
                tl.store(ws_t + offs_d, prev + tl.sum(dc, axis=0), mask=ok)
                ws_t += ws_pitch
    store_expert_tile(dh_ptr, dh, rows, offs_e, offs_d, B, E, D, stride_dhb, stride_dhe)
    return dc_acc


@triton.jit
def gate_mix_bwd_kernel(
    h_ptr, stride_hb, stride_he, stride_hd,
    cz_ptr, stride_czb, stride_czt, stride_czx,
    mask_ptr, stride_mb, stride_mt, stride_me,
    g_ptr, stride_gb, stride_gt, stride_gd,
    gp_ptr, stride_gpb, stride_gpt, stride_gpe,
    dh_ptr, stride_dhb, stride_dhe, stride_dhd,
    dcz_ptr, stride_dczb, stride_dczt, stride_dczx,
    ws_ptr,
    B, E, D, scale,
    ATTENTION: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_PER_ROW: tl.constexpr,
    HAS_GRAD_P: tl.constexpr,
    NUM_TASKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Persistent over row blocks. ``cz`` is the context ``C`` or the logits ``Z``; ``dcz`` receives a
    per-row ``dC`` or ``dZ``, and ``ws`` is the ``[programs, T, D]`` float32 workspace of a shared
    context's ``dC``."""
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    dc_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    ws_slot = ws_ptr + pid.to(tl.int64) * NUM_TASKS * D  # this program's [T, D] float32 slot
    chunks_end = BLOCK_D if SINGLE_CHUNK else D  # one chunk loop trip when the tile spans D

    for block in range(pid, tl.cdiv(B, ROWS), tl.num_programs(0)):
        rows = tl.arange(0, ROWS).to(tl.int64) + tl.cast(block, tl.int64) * ROWS
        # 1. scores and dp = <G, H> over D. With SINGLE_CHUNK the tile holds all of D and the chunk
        # loops run once (a constant trip count the compiler folds away), on the tile in registers.
        if SINGLE_CHUNK:
            tile = load_expert_tile(h_ptr, rows, offs_e, offs_d, B, E, D, stride_hb, stride_he, stride_hd)
        s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        dp = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, chunks_end, BLOCK_D):
            # Each chunk moves the base pointers (64-bit scalars); offsets inside stay < BLOCK_D.
            col = tl.cast(d0, tl.int64)
            chunk = tile if SINGLE_CHUNK else load_expert_tile(
                h_ptr + col * stride_hd, rows, offs_e, offs_d, B, E, D - d0, stride_hb, stride_he, stride_hd
            )  # fmt: skip
            s, dp = _score_and_grad_dots(
                s, dp, chunk, rows, offs_t, offs_d, cz_ptr + col * stride_czx, g_ptr + col * stride_gd, B, D - d0,
                stride_czb, stride_czt, stride_czx, stride_gb, stride_gt, stride_gd,
                ATTENTION, PER_ROW_CONTEXT, NUM_TASKS,
            )  # fmt: skip

        # 2. softmax and ds
        if not ATTENTION:
            s = load_gate_tile(cz_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_czb, stride_czt, stride_czx)
        p, _ = gate_weights(
            s * scale, mask_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_mb, stride_mt, stride_me,
            0, HAS_MASK, MASK_PER_ROW, False, BLOCK_E,  # no top-k: the mask holds the experts the forward kept
        )  # fmt: skip
        if HAS_GRAD_P:
            dp += load_gate_tile(gp_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_gpb, stride_gpt, stride_gpe)
        dp = tl.where(p != 0.0, dp, 0.0)
        ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None])
        if not ATTENTION:
            store_gate_tile(dcz_ptr, scale * ds, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_dczb, stride_dczt)

        # 3. dH, and dC into registers (one tile) or this program's workspace slot (per chunk)
        first_block = block == pid
        for d0 in range(0, chunks_end, BLOCK_D):
            col = tl.cast(d0, tl.int64)
            chunk = tile if SINGLE_CHUNK else load_expert_tile(
                h_ptr + col * stride_hd, rows, offs_e, offs_d, B, E, D - d0, stride_hb, stride_he, stride_hd
            )  # fmt: skip
            dc_acc = _input_grads_chunk(
                chunk, p, ds, dc_acc, rows, offs_t, offs_e, offs_d, first_block,
                cz_ptr + col * stride_czx, g_ptr + col * stride_gd, dh_ptr + col, dcz_ptr + col, ws_slot + col, D,
                B, E, D - d0, scale,
                stride_czb, stride_czt, stride_czx, stride_gb, stride_gt, stride_gd,
                stride_dhb, stride_dhe, stride_dczb, stride_dczt,
                ATTENTION, PER_ROW_CONTEXT, NUM_TASKS, SINGLE_CHUNK,
            )  # fmt: skip

    # 4. flush the register-held dC partial into this program's slot
    if ATTENTION and not PER_ROW_CONTEXT and SINGLE_CHUNK:
        ws = ws_slot + offs_t[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(ws, dc_acc, mask=(offs_t[:, None] < NUM_TASKS) & (offs_d[None, :] < D))


@triton.jit
def context_grad_reduce_kernel(ws_ptr, dc_ptr, num_partials, N, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """``dC.flatten()[i] = sum_k ws[k, i]`` over the ``num_partials`` slots, in a fixed order.

    ``SLOTS`` slots are loaded at once as a ``[SLOTS, BLOCK]`` tile (enough loads in flight to hide
    memory latency where one slot at a time would wait on each), summed over the slots, and the
    tiles are added in slot order: the same grid always sums in the same order.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    slots = tl.arange(0, SLOTS)
    pitch = tl.cast(N, tl.int64)
    ptrs = ws_ptr + slots.to(tl.int64)[:, None] * pitch + offs[None, :]
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, num_partials, SLOTS):
        ok = ((k0 + slots) < num_partials)[:, None] & (offs < N)[None, :]
        acc += tl.sum(tl.load(ptrs, mask=ok, other=0.0), axis=0)
        ptrs += SLOTS * pitch
    tl.store(dc_ptr + offs, acc.to(dc_ptr.dtype.element_ty), mask=offs < N)


def plan_backward(
    grad_y: Tensor,
    grad_p: Tensor | None,
    h: Tensor,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    *,
    attention: bool,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor, list[KernelLaunch]]:
    """Allocate the gradients and describe the launches; see :func:`gate_mix_backward`.

    ``config`` replaces the heuristic tile, as in :func:`plan_forward`.
    """
    batch, experts, dim = h.shape
    tasks = cz.shape[-2]
    dh = torch.empty((batch, experts, dim), device=h.device, dtype=h.dtype)
    if batch == 0:
        return dh, torch.zeros(cz.shape, device=cz.device, dtype=cz.dtype), []
    shared_context = attention and cz.dim() == 2
    cfg = config or tile_config(experts, dim, tasks, backward=True)
    num_blocks = triton.cdiv(batch, cfg.rows)
    programs = min(num_blocks, max_persistent_programs(h.device)) if shared_context else num_blocks
    dcz = torch.empty(cz.shape, device=cz.device, dtype=cz.dtype)
    # A shared context's dC is written by the reduction kernel; the main kernel only fills the slots.
    ws = torch.empty((programs, tasks, dim), device=h.device, dtype=torch.float32) if shared_context else dcz
    m = mask_operand(mask)
    args = (
        *operand(h),
        *operand(cz),
        *operand(m, placeholder=h),
        *operand(grad_y),
        *operand(grad_p, placeholder=grad_y),
        *operand(dh),
        *operand(dcz),
        ws,
        batch,
        experts,
        dim,
        scale,
    )
    meta = dict(
        ATTENTION=attention,
        PER_ROW_CONTEXT=attention and not shared_context,
        HAS_MASK=m is not None,
        MASK_PER_ROW=m is not None and m.dim() == 3,
        HAS_GRAD_P=grad_p is not None,
        NUM_TASKS=tasks,
        BLOCK_T=cfg.block_t,
        BLOCK_E=cfg.block_e,
        BLOCK_D=cfg.block_d,
        ROWS=cfg.rows,
        SINGLE_CHUNK=cfg.single_chunk,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=registers_for_warps(register_limit(backward=True, attention=attention), cfg.num_warps),
    )
    launches = [KernelLaunch(gate_mix_bwd_kernel, (programs,), args, meta)]
    if shared_context:
        numel = tasks * dim
        launches.append(
            KernelLaunch(
                context_grad_reduce_kernel,
                (triton.cdiv(numel, REDUCE_BLOCK),),
                (ws, dcz, programs, numel),
                dict(BLOCK=REDUCE_BLOCK, SLOTS=REDUCE_SLOTS, num_warps=4),
            )
        )
    return dh, dcz, launches


def gate_mix_backward(
    grad_y: Tensor,
    grad_p: Tensor | None,
    h: Tensor,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    *,
    attention: bool,
) -> tuple[Tensor, Tensor]:
    """Run the backward: one kernel, plus the small dC reduction for a shared context.

    Returns the gradients in the op's argument order: ``(dH [B, E, D], dC)`` for the attention gate
    (``attention_mix(h, context)``), ``(dZ, dH)`` for the softmax gate (``softmax_mix(logits, h)``),
    each in the shape and dtype of its input.
    """
    dh, dcz, launches = plan_backward(grad_y, grad_p, h, cz, mask, scale, attention=attention)
    for launch in launches:
        launch.launch()
    return (dh, dcz) if attention else (dcz, dh)
