"""Backward of ``experts_mix``: ``H`` recomputed tile by tile from ``X`` and ``W``, never read from memory.

The forward saved its inputs, the weights ``p [B, T, E]`` (float32) and, for the attention gate, its
output ``Y``: nothing of size ``B * E * D``. For the upstream gradients ``G = dL/dY [B, T, D]`` (and
optionally ``Gp = dL/dp``) the kernel recomputes ``pre = X W_e + b_e`` and ``H = act(pre)`` (rounded as
the forward rounds them) and writes::

    dp[b,t,e]   = <G[b,t], H[b,e]> (+ Gp[b,t,e])                      (0 where p = 0)
    ds[b,t,e]   = p[b,t,e] * (dp[b,t,e] - delta[b,t])                  delta = sum_e p dp = <G, Y> (+ sum_e p Gp)
    dH[b,e]     = sum_t p[b,t,e] G[b,t] + scale * sum_t ds[b,t,e] C[t]  (C term: attention gate only)
    dpre[b,e]   = dH[b,e] * act'(pre[b,e])                             written, [B, E, D] in X's dtype
    dC[t]       = scale * sum_b sum_e ds[b,t,e] H[b,e]                 (no sum over b: per-row C)
    dZ[b,t,e]   = scale * ds[b,t,e]                                    (softmax gate, scale = 1/temperature)

``dpre`` is the one tensor of size ``B * E * D``: a transient that the caller hands to cuBLAS
(``dW_e = X_e^T dpre_e``, ``dX = sum_e dpre_e W_e^T``, ``db = sum_b dpre``) and frees. Fusing those
reductions over B here would need a ``[K, D]`` partial per expert and program, or the whole of ``H``
recomputed for every output tile of ``dW``: more than the transient costs.

Each program owns row blocks of ``ROWS`` rows (a persistent grid). Per block:

1. stage 1, the attention gate's ``ds``: with the tile spanning D (``SINGLE_CHUNK``), from ``delta``, the
   row sums of ``G * Y`` (as flash attention's backward does), so that each expert's ``dp`` and ``ds``
   come from the ``H`` computed in stage 2 and each expert's matmul runs once; with D in chunks, ``dp``
   needs all of ``H[b, e]`` before any ``dH``: a first pass over the chunks computes it, and the matmul
   runs twice.
2. stage 2, per D chunk and expert: ``pre`` and ``H`` recomputed, ``dH``, ``dpre`` stored; the attention
   gate's ``dC`` accumulated over the experts in registers; the softmax gate's ``dp`` accumulated.
3. epilogue: ``dZ`` (softmax gate); ``dC`` stored per row, or folded into the program's float32
   ``[T, D]`` workspace slot for a shared context, which ``context_grad_reduce_kernel`` then sums in a
   fixed order. No float atomics: two runs give bit-identical gradients.

An expert whose weight is 0 reaches ``dH`` with nothing (``dp`` is taken as 0 there, even for a NaN or
infinite ``H``); ``dpre`` then follows torch's activation backward, as the two-step path does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_gate.kernels.config import (
    REDUCE_BLOCK,
    REDUCE_SLOTS,
    ExpertsMixConfig,
    experts_mix_backward_config,
    max_persistent_programs,
)
from fused_gate.kernels.expert_layer import activation_grad, expert_chunk, expert_output, expert_preactivation
from fused_gate.kernels.experts_mix import layer_meta, layer_operands
from fused_gate.kernels.gate_mix_bwd import context_grad_reduce_kernel
from fused_gate.kernels.gate_tile import (
    chunk,
    column,
    finite_or_zero,
    load_gate_tile,
    load_task_vector,
    output_column,
    score_grads,
    store_gate_tile,
    store_mix_tile,
)
from fused_gate.kernels.launch import CONTEXT_GATES, KernelLaunch, Plan, new_output, operand


@triton.jit
def _task_vector(x_t, x, at, PER_ROW: tl.constexpr):
    """One task's ``[ROWS, BLOCK_D]`` (``PER_ROW``) or ``[1, BLOCK_D]`` vector of operand ``x``, in the
    layout of the matmul's output (see ``gate_tile.load_task_vector``)."""
    return tl.sum(load_task_vector(x_t, x, at, PER_ROW), axis=1)


@triton.jit
def _load_expert_column(x, e, at):
    """``X[rows, :, e]`` of a ``[B, T, E]`` operand as float32 ``[ROWS, BLOCK_T]``, zero outside ``[B, T]``."""
    rows, offs_t, _, _, B, T, _, _ = at
    t = offs_t.to(tl.int64)[None, :]
    ptrs = x[0] + tl.cast(e, tl.int64) * x[3] + rows[:, None] * x[1] + t * x[2]
    return tl.load(ptrs, mask=(rows[:, None] < B) & (t < T), other=0.0).to(tl.float32)


@triton.jit
def _task_dots(h, g, at):
    """``[ROWS, BLOCK_T]``: ``<G[rows, t, chunk], h>`` for every task, ``h`` a ``[ROWS, BLOCK_D]`` chunk."""
    rows, offs_t, _, _, _, T, _, _ = at
    dots = tl.zeros([rows.shape[0], offs_t.shape[0]], dtype=tl.float32)
    g_t = g[0]
    for t in range(0, T):
        dots = tl.where(
            (offs_t == t)[None, :], dots + tl.sum(h * _task_vector(g_t, g, at, True), axis=1)[:, None], dots
        )
        g_t += g[2]
    return dots


@triton.jit
def _mix_dots(y, g, at):
    """``[ROWS, BLOCK_T]``: ``<G[rows, t], Y[rows, t]>`` over the chunk (all of D when it spans D)."""
    rows, offs_t, _, _, _, T, _, _ = at
    dots = tl.zeros([rows.shape[0], offs_t.shape[0]], dtype=tl.float32)
    g_t = g[0]
    y_t = y[0]
    for t in range(0, T):
        product = _task_vector(y_t, y, at, True) * _task_vector(g_t, g, at, True)
        dots = tl.where((offs_t == t)[None, :], dots + tl.sum(product, axis=1)[:, None], dots)
        g_t += g[2]
        y_t += y[2]
    return dots


@triton.jit
def _weighted_grads(weights, dp, gp, at, HAS_DP: tl.constexpr, HAS_GRAD_P: tl.constexpr):
    """``delta = sum_e p[:, :, e] (dp[:, :, e] + Gp[:, :, e])`` over the experts with ``p != 0`` as ``[ROWS, BLOCK_T]``,
    from the scratch ``dp`` (``HAS_DP``) and ``Gp`` (``HAS_GRAD_P``): one expert's column at a time, so that no
    ``[ROWS, BLOCK_T, BLOCK_E]`` tile is ever live."""
    rows, offs_t, _, _, _, _, E, _ = at
    delta = tl.zeros([rows.shape[0], offs_t.shape[0]], dtype=tl.float32)
    for e in range(0, E):
        dp_e = tl.zeros([rows.shape[0], offs_t.shape[0]], dtype=tl.float32)
        if HAS_DP:
            dp_e += _load_expert_column(dp, e, at)
        if HAS_GRAD_P:
            dp_e += _load_expert_column(gp, e, at)
        p_e = _load_expert_column(weights, e, at)
        delta += tl.where(p_e != 0.0, p_e * dp_e, 0.0)
    return delta


@triton.jit
def _add_row_sums(dc, ds_e, h, at):
    """``dc[t, :] += sum_rows ds_e[:, t] * h`` for every task (``dc [BLOCK_T, BLOCK_D]``, ``h [ROWS, BLOCK_D]``):
    one task at a time, so no ``[ROWS, BLOCK_T, BLOCK_D]`` product is ever live."""
    _, offs_t, _, _, _, T, _, _ = at
    for t in range(0, T):
        ds_t = tl.sum(tl.where((offs_t == t)[None, :], ds_e, 0.0), axis=1)
        dc = tl.where((offs_t == t)[:, None], dc + tl.sum(ds_t[:, None] * h, axis=0)[None, :], dc)
    return dc


@triton.jit
def _expert_grad(p_e, ds_e, g, cz, at, scale, GATE: tl.constexpr, PER_ROW_CONTEXT: tl.constexpr):
    """``dH[rows, e, chunk] = sum_t p[:, t, e] G[:, t] (+ scale * sum_t ds[:, t, e] C[t])`` as ``[ROWS, BLOCK_D]``,
    from expert ``e``'s weights ``p_e`` and score gradients ``ds_e`` (``[ROWS, BLOCK_T]``)."""
    rows, offs_t, _, offs_d, _, T, _, _ = at
    dh = tl.zeros([rows.shape[0], offs_d.shape[0]], dtype=tl.float32)
    g_t = g[0]
    c_t = cz[0]
    for t in range(0, T):
        here = (offs_t == t)[None, :]
        dh += tl.sum(tl.where(here, p_e, 0.0), axis=1)[:, None] * _task_vector(g_t, g, at, True)
        g_t += g[2]
        if GATE == "attention":
            ds_t = tl.sum(tl.where(here, ds_e, 0.0), axis=1)[:, None]
            dh += scale * ds_t * _task_vector(c_t, cz, at, PER_ROW_CONTEXT)
            c_t += cz[2]
    return dh


@triton.jit
def _store_expert_rows(x, value, e, at):
    """``X[rows, e, chunk] = value`` (``[ROWS, BLOCK_D]``) for a ``[B, E, D]`` output ``x`` with a unit last stride."""
    rows, _, _, offs_d, B, _, _, D = at
    d = offs_d.to(tl.int64)[None, :]
    ptrs = x[0] + tl.cast(e, tl.int64) * x[2] + rows[:, None] * x[1] + d
    tl.store(ptrs, value.to(x[0].dtype.element_ty), mask=(rows[:, None] < B) & (d < D))


@triton.jit
def _accumulate_column(x, e, value, accumulate, at):
    """``X[rows, :, e] (+)= value`` (``[ROWS, BLOCK_T]``) for a float32 ``[B, T, E]`` scratch ``x``; the sum
    starts afresh unless ``accumulate``. Loaded and stored in one layout: each thread adds to its own entries."""
    rows, offs_t, _, _, B, T, _, _ = at
    t = offs_t.to(tl.int64)[None, :]
    ptrs = x[0] + tl.cast(e, tl.int64) * x[3] + rows[:, None] * x[1] + t * x[2]
    ok = (rows[:, None] < B) & (t < T)
    tl.store(ptrs, tl.load(ptrs, mask=ok & accumulate, other=0.0) + value, mask=ok)


@triton.jit
def _attention_delta(
    y, g, gp, dp, weights, layer, at, K, LAYER: tl.constexpr, HAS_GRAD_P: tl.constexpr, SINGLE_CHUNK: tl.constexpr
):
    """Stage 1 of the attention gate: ``delta[rows, t] = sum_e p[:, t, e] dp[:, t, e]`` as ``[ROWS, BLOCK_T]``,
    from which each expert's ``ds`` follows in stage 2. With one chunk (``SINGLE_CHUNK``),
    ``delta = <G, Y> (+ sum_e p Gp)`` from the forward's ``Y``; with D in chunks, ``dp = <G, H>`` is first
    summed over every chunk into the float32 ``[B, T, E]`` scratch ``dp`` (each expert's ``H`` recomputed)."""
    if SINGLE_CHUNK:
        delta = _mix_dots(y, g, at)
        if HAS_GRAD_P:
            delta += _weighted_grads(weights, dp, gp, at, False, True)
    else:
        _, _, _, offs_d, _, _, E, D = at
        for d0 in range(0, D, offs_d.shape[0]):
            col = tl.cast(d0, tl.int64)
            chunk_at = chunk(at, d0)
            for e in range(0, E):
                h = expert_chunk(layer, e, col, chunk_at, K, LAYER)
                _accumulate_column(dp, e, _task_dots(h, column(g, col), chunk_at), d0 > 0, chunk_at)
        tl.debug_barrier()  # every chunk's sum is in the scratch before it is read
        delta = _weighted_grads(weights, dp, gp, at, True, HAS_GRAD_P)
    return delta


@triton.jit
def _expert_chunk_backward(
    e, d0, delta, dc_rows, dc_acc, dc, layer, weights, dp, gp, g, cz, dpre, at, K, scale,
    GATE: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    HAS_GRAD_P: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    LAYER: tl.constexpr,
):  # fmt: skip
    """Stage 2 for expert ``e`` and the D chunk at column ``d0`` (``at``): ``pre`` and ``H`` recomputed
    (``[ROWS, BLOCK_D]``), ``dH`` and ``dpre[rows, e, chunk] = dH * act'(pre)`` stored. Returns the ``dC``
    accumulators with the attention gate's ``scale * ds[:, :, e] H`` added, ``ds = p (dp - delta)``
    (``[ROWS, BLOCK_T]``): ``dc_rows [ROWS, BLOCK_T, BLOCK_D]`` (per-row context), ``dc_acc`` (the program's
    ``[BLOCK_T, BLOCK_D]`` partial, one chunk) or ``dc`` (the chunk's, summed over the rows); the softmax
    gate instead sums ``dp = <G, H>`` over the chunks in the scratch ``dp``."""
    _, ACTIVATION, _, _, _ = LAYER
    col = tl.cast(d0, tl.int64)
    g_chunk = column(g, col)
    pre = expert_preactivation(layer, e, col, at, K, LAYER)
    h = expert_output(pre, layer, at, LAYER)
    # One expert's weights at a time, from memory (L1): no [ROWS, BLOCK_T, BLOCK_E] tile stays live.
    p_e = _load_expert_column(weights, e, at)
    ds_e = p_e  # the softmax gate's dH reads no ds
    if GATE == "attention":
        # With D in chunks, stage 1 left dp in the scratch; with one chunk it comes from this H.
        dp_e = _task_dots(h, g_chunk, at) if SINGLE_CHUNK else _load_expert_column(dp, e, at)
        if HAS_GRAD_P:
            dp_e += _load_expert_column(gp, e, at)
        ds_e = p_e * (tl.where(p_e != 0.0, dp_e, 0.0) - delta)
        hf = finite_or_zero(h)  # exact: see finite_or_zero
        if PER_ROW_CONTEXT:
            dc_rows += ds_e[:, :, None] * hf[:, None, :]
        elif SINGLE_CHUNK:
            dc_acc = _add_row_sums(dc_acc, scale * ds_e, hf, at)
        else:
            dc = _add_row_sums(dc, scale * ds_e, hf, at)
    else:
        _accumulate_column(dp, e, _task_dots(h, g_chunk, at), d0 > 0, at)
    dh = _expert_grad(p_e, ds_e, g_chunk, column(cz, col), at, scale, GATE, PER_ROW_CONTEXT)
    _store_expert_rows(output_column(dpre, col), activation_grad(dh, pre, h, ACTIVATION), e, at)
    return dc_rows, dc_acc, dc


@triton.jit
def _add_to_slot(ws, dc, first_block, at):
    """``slot[t, chunk] += dc[t]`` (``dc [BLOCK_T, BLOCK_D]``) in this program's float32 ``[T, D]`` workspace
    slot, ``ws`` its pointer at the chunk's first column and its task pitch. The slot belongs to this program
    alone: read-add-write without atomics. The program's first block initialises it, so the workspace needs
    no memset launch."""
    _, offs_t, _, offs_d, _, T, _, D = at
    ptrs = ws[0] + offs_t[:, None].to(tl.int64) * ws[1] + offs_d[None, :]
    ok = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    tl.store(ptrs, tl.load(ptrs, mask=ok & ~first_block, other=0.0) + dc, mask=ok)


@triton.jit
def _softmax_logit_grads(dz, weights, dp, gp, at, scale, HAS_GRAD_P: tl.constexpr):
    """The softmax gate's ``dZ[rows] = scale * p * (dp - sum_e p dp)`` (``[ROWS, BLOCK_T, BLOCK_E]``), ``dp`` the
    scratch's ``<G, H>`` (``+ Gp``), taken as 0 where ``p = 0``."""
    tl.debug_barrier()  # the scratch is read in another layout than it was written in
    dp_all = load_gate_tile(dp, at)
    if HAS_GRAD_P:
        dp_all += load_gate_tile(gp, at)
    store_gate_tile(dz, scale * score_grads(load_gate_tile(weights, at), dp_all), at)


@triton.jit
def experts_mix_bwd_kernel(
    x_ptr, stride_xb, stride_xe, stride_xk,
    w_ptr, stride_we, stride_wk, stride_wd,
    b_ptr, stride_bb, stride_be, stride_bd,
    cz_ptr, stride_czb, stride_czt, stride_czx,
    p_ptr, stride_pb, stride_pt, stride_pe,
    y_ptr, stride_yb, stride_yt, stride_yd,
    g_ptr, stride_gb, stride_gt, stride_gd,
    gp_ptr, stride_gpb, stride_gpt, stride_gpe,
    dpre_ptr, stride_dprb, stride_dpre, stride_dprd,
    dcz_ptr, stride_dczb, stride_dczt, stride_dczx,
    dp_ptr, stride_dpb, stride_dpt, stride_dpe,
    ws_ptr,
    B, E, K, D, scale,
    GATE: tl.constexpr, PER_ROW_CONTEXT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr,
    HAS_GRAD_P: tl.constexpr, NUM_TASKS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
):  # fmt: skip
    """See the module docstring. ``x``, ``w``, ``b`` and ``cz`` are the forward's operands (as in
    ``experts_mix_two_pass_kernel``), ``p`` its float32 weights and ``y`` its mix (read with
    ``SINGLE_CHUNK`` by the attention gate only); ``g`` and ``gp`` the upstream gradients. ``dpre``
    receives ``dL/dpre [B, E, D]``, ``dcz`` a per-row ``dC`` or ``dZ``; ``dp`` is a float32 ``[B, T, E]``
    scratch for ``<G, H>`` (the softmax gate, the attention gate with D in chunks), so that no
    ``[ROWS, BLOCK_T, BLOCK_E]`` tile stays in registers through the matmuls, and ``ws`` the
    ``[programs, T, D]`` float32 workspace of a shared context's ``dC``."""
    layer = (
        (x_ptr, stride_xb, stride_xe, stride_xk),
        (w_ptr, stride_we, stride_wk, stride_wd),
        (b_ptr, stride_bb, stride_be, stride_bd),
    )
    LAYER: tl.constexpr = (HAS_BIAS, ACTIVATION, PRECISION, DOT_IN_FLOAT32, BLOCK_K)
    cz = (cz_ptr, stride_czb, stride_czt, stride_czx)
    weights = (p_ptr, stride_pb, stride_pt, stride_pe)
    g = (g_ptr, stride_gb, stride_gt, stride_gd)
    gp = (gp_ptr, stride_gpb, stride_gpt, stride_gpe)
    dpre = (dpre_ptr, stride_dprb, stride_dpre, stride_dprd)
    dcz = (dcz_ptr, stride_dczb, stride_dczt, stride_dczx)
    dp = (dp_ptr, stride_dpb, stride_dpt, stride_dpe)
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    dc_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    ws_slot = ws_ptr + pid.to(tl.int64) * NUM_TASKS * D  # this program's [T, D] float32 slot

    for block in range(pid, tl.cdiv(B, ROWS), tl.num_programs(0)):
        rows = tl.arange(0, ROWS).to(tl.int64) + tl.cast(block, tl.int64) * ROWS
        at = (rows, offs_t, offs_e, offs_d, B, NUM_TASKS, E, D)

        # stage 1 (attention gate): delta = sum_e p dp, from which each expert's ds follows in stage 2
        delta = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        if GATE == "attention":
            y = (y_ptr, stride_yb, stride_yt, stride_yd)
            delta = _attention_delta(y, g, gp, dp, weights, layer, at, K, LAYER, HAS_GRAD_P, SINGLE_CHUNK)

        # stage 2: per D chunk and expert, pre and H recomputed; dH and dpre; dC accumulated over the experts
        for d0 in range(0, BLOCK_D if SINGLE_CHUNK else D, BLOCK_D):  # one trip when the tile spans D
            chunk_at = chunk(at, d0)
            dc_rows = tl.zeros([ROWS, BLOCK_T, BLOCK_D], dtype=tl.float32)  # a per-row dC's chunk
            dc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # a shared dC's chunk (of several), over the rows
            for e in range(0, E):
                dc_rows, dc_acc, dc = _expert_chunk_backward(
                    e, d0, delta, dc_rows, dc_acc, dc, layer, weights, dp, gp, g, cz, dpre, chunk_at, K, scale,
                    GATE, PER_ROW_CONTEXT, HAS_GRAD_P, SINGLE_CHUNK, LAYER,
                )  # fmt: skip
            if GATE == "attention":
                if PER_ROW_CONTEXT:
                    store_mix_tile(output_column(dcz, tl.cast(d0, tl.int64)), scale * dc_rows, chunk_at)
                elif not SINGLE_CHUNK:
                    _add_to_slot((ws_slot + tl.cast(d0, tl.int64), D), dc, block == pid, chunk_at)

        # epilogue of the block: the softmax gate's dZ = scale * ds from dp = <G, H> (+ Gp)
        if GATE != "attention":
            _softmax_logit_grads(dcz, weights, dp, gp, at, scale, HAS_GRAD_P)

    # epilogue: flush the register-held dC partial into this program's slot
    if GATE == "attention" and not PER_ROW_CONTEXT and SINGLE_CHUNK:
        ws = ws_slot + offs_t[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(ws, dc_acc, mask=(offs_t[:, None] < NUM_TASKS) & (offs_d[None, :] < D))


def plan_experts_mix_backward(
    grad_y: Tensor,
    grad_p: Tensor | None,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    p: Tensor,
    y: Tensor | None,
    scale: float,
    *,
    gate: str,
    activation: str,
    config: ExpertsMixConfig | None = None,
) -> Plan:
    """The backward's plan (``kernels/launch.py``): outputs ``(dpre [B, E, D] in x's dtype, dC | dZ in cz's
    shape and dtype)`` and the launches (none when ``B = 0``): the kernel, plus the ``dC`` reduction for a
    shared context.

    Args:
        grad_y: ``G = dL/dY [B, T, D]``.
        grad_p: ``dL/dp [B, T, E]`` when the weights were returned and used, else None.
        x, weight, bias, cz, scale: the forward's inputs, as in :func:`fused_gate.kernels.experts_mix.plan_experts_mix`.
        p: the forward's weights ``[B, T, E]`` (float32).
        y: the forward's mix ``Y [B, T, D]`` (the attention gate reads it when the tile spans D; else None).
        activation: the activation's kernel name.
        config: replaces the heuristic (``kernels/config.py``).
    """
    experts, in_features, dim = weight.shape
    batch = x.shape[0]
    tasks = cz.shape[-2]
    dpre = new_output(x, (batch, experts, dim))
    # A shared context's dC sums over the rows: zero for an empty batch.
    dcz = new_output(cz, cz.shape, zeroed=batch == 0)
    if batch == 0:
        return Plan((dpre, dcz))
    context_grad = gate in CONTEXT_GATES
    shared_context = context_grad and cz.dim() == 2
    cfg = config or experts_mix_backward_config(
        experts, in_features, dim, tasks, x.element_size(), context_grad=context_grad, per_row_context=cz.dim() == 3
    )
    single_chunk = cfg.block_d >= dim
    if context_grad and single_chunk and y is None:
        raise ValueError("the attention gate's one-pass backward reads the forward's Y")
    num_blocks = triton.cdiv(batch, cfg.rows)
    programs = min(num_blocks, max_persistent_programs(x.device)) if shared_context else num_blocks
    # A shared context's dC is written by the reduction kernel; the main kernel only fills the slots.
    ws = new_output(x, (programs, tasks, dim), dtype=torch.float32) if shared_context else dcz
    # dp = <G, H>, float32 [B, T, E], where the kernel sums it over the chunks (see the kernel's docstring).
    dp = new_output(x, (batch, tasks, experts), dtype=torch.float32) if not (context_grad and single_chunk) else None
    args = (
        *layer_operands(x, weight, bias),
        *operand(cz),
        *operand(p),
        *operand(y, placeholder=grad_y),
        *operand(grad_y),
        *operand(grad_p, placeholder=grad_y),
        *operand(dpre),
        *operand(dcz),
        *operand(dp, placeholder=p),
        ws,
        batch,
        experts,
        in_features,
        dim,
        scale,
    )
    meta = dict(
        GATE=gate,
        PER_ROW_CONTEXT=context_grad and cz.dim() == 3,
        **layer_meta(x, bias, activation),
        HAS_GRAD_P=grad_p is not None,
        NUM_TASKS=tasks,
        **cfg.meta(),
        SINGLE_CHUNK=single_chunk,
    )
    launches = [KernelLaunch(experts_mix_bwd_kernel, (programs,), args, meta)]
    if shared_context:
        numel = tasks * dim
        grid = (triton.cdiv(numel, REDUCE_BLOCK),)
        meta = dict(BLOCK=REDUCE_BLOCK, SLOTS=REDUCE_SLOTS, num_warps=4)
        launches.append(KernelLaunch(context_grad_reduce_kernel, grid, (ws, dcz, programs, numel), meta))
    return Plan((dpre, dcz), tuple(launches))
