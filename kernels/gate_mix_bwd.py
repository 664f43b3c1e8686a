"""Backward of the fused gate: recompute ``p`` from the inputs, then ``dH`` and ``dC`` (or ``dZ``).

For the upstream gradient ``G = dL/dY [B, T, D]`` (and optionally ``Gp = dL/dp [B, T, E]``)::

    dp[b,t,e] = <G[b,t], H[b,e]> (+ Gp[b,t,e])                               (0 where p = 0)
    ds[b,t,e] = p[b,t,e] * (dp[b,t,e] - sum_e' p[b,t,e'] dp[b,t,e'])      (= dp - <G, Y>)
    dH[b,e]   = sum_t p[b,t,e] G[b,t] + scale * sum_t ds[b,t,e] C[t]     (C term: attention gate only)
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
    TileConfig,
    max_persistent_programs,
    register_limit,
    tile_config,
)
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
    store_expert_tile,
    store_gate_tile,
    store_task_vector,
    task_row,
)
from fused_gate.kernels.launch import (
    CONTEXT_GATES,
    KernelLaunch,
    Plan,
    gate_meta,
    gate_operands,
    new_output,
    operand,
)


@triton.jit
def _add_score_and_grad_dots(s, dp, tile, cz, g, at, GATE: tl.constexpr, PER_ROW_CONTEXT: tl.constexpr):
    """Over the D chunk ``cz``, ``g`` and ``at`` start at: ``s += <C[t], H[e]>`` (attention gate) and
    ``dp += <G[t], H[e]>`` for every task."""
    _, offs_t, _, _, _, T, _, _ = at
    c_t = cz[0]
    g_t = g[0]
    for t in range(0, T):
        if GATE == "attention":
            s = add_task_dots(s, tile, load_task_vector(c_t, cz, at, PER_ROW_CONTEXT), t, offs_t)
            c_t += cz[2]
        dp = add_task_dots(dp, tile, load_task_vector(g_t, g, at, True), t, offs_t)
        g_t += g[2]
    return s, dp


@triton.jit
def _weights_and_grads(s, dp, mask, gp, at, scale, MASK: tl.constexpr, HAS_GRAD_P: tl.constexpr):
    """``(p, ds)`` from the scores ``s`` and ``dp = <G, H>``: the forward's weights (the mask holds the
    experts it kept, so no top-k here), ``dp`` plus ``dL/dp`` and zero where ``p = 0``, then ``ds``."""
    p, _ = gate_weights(s * scale, mask, at, 0, MASK, False)
    if HAS_GRAD_P:
        dp += load_gate_tile(gp, at)
    dp = tl.where(p != 0.0, dp, 0.0)
    ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None])
    # Rows past B load zeros, which an infinite context entry scores NaN (inf * 0): their ds must not
    # reach a shared context's dC, the one sum over rows.
    rows, B = at[0], at[4]
    return p, tl.where((rows < B)[:, None, None], ds, 0.0)


@triton.jit
def _input_grads_chunk(
    tile, p, ds, dc_acc, first_block, cz, g, dh, dcz, ws, at, scale,
    GATE: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Write ``dH`` for one D chunk and fold this chunk's ``dC`` into its destination: a per-row
    ``dC``, the register-held partial ``dc_acc`` (one chunk) or the workspace slot ``ws`` (its
    pointer, its task pitch).

    Every pointer already points at the chunk's first column and ``at`` holds the chunk's remaining
    width, so the offsets here stay small.
    """
    _, offs_t, _, offs_d, _, T, _, D = at
    dh_tile = tl.zeros_like(tile)
    if GATE == "attention":
        tile = finite_or_zero(tile)  # exact: see finite_or_zero
    c_t = cz[0]
    g_t = g[0]
    dc_t = dcz[0]
    ws_t = ws[0]
    for t in range(0, T):
        g_vec = load_task_vector(g_t, g, at, True)
        g_t += g[2]
        dh_tile += task_row(p, t, offs_t)[:, :, None] * g_vec
        if GATE == "attention":
            ds_t = task_row(ds, t, offs_t)[:, :, None]
            c = load_task_vector(c_t, cz, at, PER_ROW_CONTEXT)
            c_t += cz[2]
            dh_tile += scale * ds_t * c
            dc = scale * tl.sum(ds_t * tile, axis=1)
            if PER_ROW_CONTEXT:
                store_task_vector(dc_t, dcz, dc, at)
                dc_t += dcz[2]
            elif SINGLE_CHUNK:
                dc_acc = tl.where((offs_t == t)[:, None], dc_acc + tl.sum(dc, axis=0)[None, :], dc_acc)
            else:
                # The slot belongs to this program alone: read-add-write without atomics. The
                # program's first block initialises it, so the workspace needs no memset launch.
                ok = offs_d < D
                prev = tl.load(ws_t + offs_d, mask=ok & ~first_block, other=0.0)
                tl.store(ws_t + offs_d, prev + tl.sum(dc, axis=0), mask=ok)
                ws_t += ws[1]
    store_expert_tile(dh, dh_tile, at)
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
    GATE: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    MASK: tl.constexpr,
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
    h = (h_ptr, stride_hb, stride_he, stride_hd)
    cz = (cz_ptr, stride_czb, stride_czt, stride_czx)
    mask = (mask_ptr, stride_mb, stride_mt, stride_me)
    g = (g_ptr, stride_gb, stride_gt, stride_gd)
    gp = (gp_ptr, stride_gpb, stride_gpt, stride_gpe)
    dh = (dh_ptr, stride_dhb, stride_dhe, stride_dhd)
    dcz = (dcz_ptr, stride_dczb, stride_dczt, stride_dczx)
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    dc_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    ws_slot = ws_ptr + pid.to(tl.int64) * NUM_TASKS * D  # this program's [T, D] float32 slot
    chunks_end = BLOCK_D if SINGLE_CHUNK else D  # one chunk loop trip when the tile spans D

    for block in range(pid, tl.cdiv(B, ROWS), tl.num_programs(0)):
        rows = tl.arange(0, ROWS).to(tl.int64) + tl.cast(block, tl.int64) * ROWS
        at = (rows, offs_t, offs_e, offs_d, B, NUM_TASKS, E, D)
        # stage 1: scores and dp = <G, H> over D. With SINGLE_CHUNK the tile holds all of D and the
        # chunk loops run once (a constant trip count the compiler folds away), on the tile in registers.
        if SINGLE_CHUNK:
            tile = load_expert_tile(h, at)
        s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        dp = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, chunks_end, BLOCK_D):
            # Each chunk moves the base pointers (64-bit scalars); offsets inside stay < BLOCK_D.
            col = tl.cast(d0, tl.int64)
            chunk_at = chunk(at, d0)
            tile_d = tile if SINGLE_CHUNK else load_expert_tile(column(h, col), chunk_at)
            s, dp = _add_score_and_grad_dots(
                s, dp, tile_d, column(cz, col), column(g, col), chunk_at, GATE, PER_ROW_CONTEXT
            )

        # stage 2: the weights and ds (dZ = scale * ds for the softmax gate)
        if GATE != "attention":
            s = load_gate_tile(cz, at)
        p, ds = _weights_and_grads(s, dp, mask, gp, at, scale, MASK, HAS_GRAD_P)
        if GATE != "attention":
            store_gate_tile(dcz, scale * ds, at)

        # stage 3: dH, and dC into registers (one chunk) or this program's workspace slot (per chunk)
        first_block = block == pid
        for d0 in range(0, chunks_end, BLOCK_D):
            col = tl.cast(d0, tl.int64)
            chunk_at = chunk(at, d0)
            tile_d = tile if SINGLE_CHUNK else load_expert_tile(column(h, col), chunk_at)
            dc_acc = _input_grads_chunk(
                tile_d, p, ds, dc_acc, first_block, column(cz, col), column(g, col),
                output_column(dh, col), output_column(dcz, col), (ws_slot + col, D),
                chunk_at, scale, GATE, PER_ROW_CONTEXT, SINGLE_CHUNK,
            )  # fmt: skip

    # epilogue: flush the register-held dC partial into this program's slot
    if GATE == "attention" and not PER_ROW_CONTEXT and SINGLE_CHUNK:
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
    gate: str,
    config: TileConfig | None = None,
) -> Plan:
    """The backward's plan (``kernels/launch.py``): outputs ``(dH [B, E, D], dC | dZ)`` in the shapes
    and dtypes of ``h`` and ``cz``, and the launches (none when ``B = 0``): one kernel, plus the small
    ``dC`` reduction for a shared context.

    Args:
        grad_y: ``G = dL/dY [B, T, D]``.
        grad_p: ``dL/dp [B, T, E]`` when the weights were returned and used, else None.
        h, cz, scale: the forward's inputs, as in :func:`plan_forward`.
        mask: the experts the forward mixed (with top-k: the kept ones), so no top-k here.
        config: replaces the heuristic tile, as in :func:`plan_forward`.
    """
    batch, experts, dim = h.shape
    tasks = cz.shape[-2]
    dh = new_output(h, (batch, experts, dim))
    # A shared context's dC sums over the rows: zero for an empty batch.
    dcz = new_output(cz, cz.shape, zeroed=batch == 0)
    if batch == 0:
        return Plan((dh, dcz))
    shared_context = gate in CONTEXT_GATES and cz.dim() == 2
    cfg = config or tile_config(experts, dim, tasks, backward=True)
    num_blocks = triton.cdiv(batch, cfg.rows)
    programs = min(num_blocks, max_persistent_programs(h.device)) if shared_context else num_blocks
    # A shared context's dC is written by the reduction kernel; the main kernel only fills the slots.
    ws = new_output(h, (programs, tasks, dim), dtype=torch.float32) if shared_context else dcz
    args = (
        *operand(h),
        *gate_operands(cz, mask, placeholder=h),
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
        **gate_meta(gate, cz, mask),
        HAS_GRAD_P=grad_p is not None,
        **cfg.meta(register_limit(backward=True, gate=gate)),
    )
    launches = [KernelLaunch(gate_mix_bwd_kernel, (programs,), args, meta)]
    if shared_context:
        numel = tasks * dim
        grid = (triton.cdiv(numel, REDUCE_BLOCK),)
        meta = dict(BLOCK=REDUCE_BLOCK, SLOTS=REDUCE_SLOTS, num_warps=4)
        launches.append(KernelLaunch(context_grad_reduce_kernel, grid, (ws, dcz, programs, numel), meta))
    return Plan((dh, dcz), tuple(launches))
