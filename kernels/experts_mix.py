"""The experts' last layer and the gate in one kernel (inference): ``H`` is never written.

For every row ``b``, expert ``e`` and task ``t`` (``X [B, K]`` or ``[B, E, K]``, ``W [E, K, D]``,
``bias [E, D]``, ``Y [B, T, D]``)::

    H[b,e,:]  = act(X[b,(e),:] @ W[e] + bias[e])      float32, recomputed in registers, never stored;
                                                       rounded to X's dtype where the two-step path stores it
    s[b,t,e]  = scale * <C[t], H[b,e]>                 (attention gate; C : [T, D] or [B, T, D])
    s[b,t,e]  = Z[b,t,e] / temperature                 (softmax gate; Z : [B, T, E] given)
    p[b,t,:]  = softmax_e(s[b,t,:]) over the allowed experts (mask, s != -inf, top-k; none -> 0)
    Y[b,t,:]  = sum_{e : p[b,t,e] != 0} p[b,t,e] * H[b,e,:]

One launch; each program owns ``ROWS >= 16`` rows (the M of ``tl.dot``). ``H[rows, e, chunk]`` is
a ``[ROWS, BLOCK_K] x [BLOCK_K, BLOCK_D]`` ``tl.dot`` loop over K with float32 accumulation, then the
bias and the activation, all in registers.

The attention gate without top-k, when the tile spans D (``D <= 256`` and 16 rows of the
``[ROWS, T, D]`` accumulator fit), runs **one pass** (``ONE_PASS``): for each expert, ``H[rows, e]``
is computed once, scored against every task, and folded into ``Y`` by an online softmax over experts
(running max ``m``, running denominator, accumulator rescaled by ``exp(m_old - m_new)``, as flash
attention does over keys); ``p`` for ``return_weights`` and the NaN rows (an allowed ``+inf`` or NaN
score) come from all ``E`` scores at the end, by ``gate_tile.gate_weights``. The expert matmul runs
once.

Otherwise (top-k, which needs every score before any weight, or a wider D) two passes:

1. scores (attention gate only): per D chunk, for each expert, ``H[rows, e, chunk]`` dotted with
   each task's context chunk (one task at a time, in the matmul's register layout); then ``p`` from
   all ``E`` scores at once by ``gate_tile.gate_weights``, the very function of the two-step kernels,
   so mask, top-k, ties and special values are identical by construction.
2. mix: per D chunk, for each expert, ``H[rows, e, chunk]`` again, accumulated into
   ``Y[rows, :, chunk]`` with its weights ``p[rows, :, e]``; experts no row of the program uses
   (weight 0 for every row and task: masked out, or outside the top-k) are skipped.

The softmax gate runs pass 2 only (its weights come from the logits): the expert matmul once. The
two-pass attention gate computes it twice, trading FLOPs for registers. Either way nothing of size
``B * E * D`` is written: the distinct bytes are ``X + W + bias + C | Z + Y``. Every program reads all
of ``W`` once per pass and its ``X`` rows once per (pass, expert, D chunk): L2 and L1 hits, which more
rows per program reduce.

Every address is computed in 64 bits (rows, experts and loop offsets widened before they meet a
stride); any strides are accepted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_gate.kernels import INTERPRETED
from fused_gate.kernels.config import (
    MIX_REGISTER_LIMIT,
    ExpertsMixConfig,
    KernelLaunch,
    experts_mix_config,
    mask_operand,
    operand,
    registers_for_warps,
)
from fused_gate.kernels.gate_tile import (
    allowed_experts,
    finite_or_zero,
    gate_weights,
    load_gate_tile,
    load_task_vector,
    store_gate_tile,
    weighted,
)

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "identity")


@triton.jit
def _activate(h, ACTIVATION: tl.constexpr):
    """``act(h)`` for a name of ``ACTIVATIONS`` (``"identity"``: ``h``), float32 to a few ulp over the whole
    range; ``+-inf`` map to the activation's limit (GELU and SiLU: ``+inf`` and 0), NaN to NaN. Selects
    rather than max instructions, which would drop NaN where torch keeps it."""
    if ACTIVATION == "relu":
        h = tl.where(h < 0.0, 0.0, h)
    elif ACTIVATION == "leaky_relu":
        h = tl.where(h < 0.0, 0.01 * h, h)  # torch's default negative slope
    elif ACTIVATION == "gelu":
        h = tl.where(h == float("-inf"), 0.0, 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476)))
    elif ACTIVATION == "silu":
        h = tl.where(h == float("-inf"), 0.0, h * tl.sigmoid(h))
    elif ACTIVATION == "sigmoid":
        h = tl.sigmoid(h)
    elif ACTIVATION == "tanh":
        # (1 - e) / (1 + e) with e = exp(-2|h|) cancels as |h| -> 0 (2 * sigmoid(2h) - 1 likewise): below
        # |h| = 0.4 the odd Taylor series to h^11 instead (each within 2.5e-7 relative there; NaN kept).
        a = tl.abs(h)
        e = tl.exp(-2.0 * a)
        h2 = h * h
        series = -17.0 / 315 + h2 * (62.0 / 2835 - h2 * (1382.0 / 155925))
        series = a * (1.0 + h2 * (-1.0 / 3 + h2 * (2.0 / 15 + h2 * series)))
        t = tl.where(a < 0.4, series, (1.0 - e) / (1.0 + e))
        h = tl.where(h < 0.0, -t, t)
    return h


@triton.jit
def _expert_chunk(
    x_ptr, stride_xb, stride_xk,
    w_ptr, stride_wk, stride_wd,
    b_ptr, stride_bd,
    rows, B, K, D,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``act(X[rows] @ W[:, :D] + bias[:D])`` as float32 ``[ROWS, BLOCK_D]``, 0 outside ``[B, D]``.

    ``x_ptr``, ``w_ptr`` and ``b_ptr`` point at one expert's input, weight and bias, moved to the
    D chunk; the K loop steps the pointers (64-bit) so offsets inside stay below ``BLOCK_K``. With a
    half-precision ``X``, ``X @ W + bias`` and the result are rounded to its dtype in registers, as the
    two-step path stores them (so both overflow to ``+-inf`` alike).
    """
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    r = rows[:, None]
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    x_k = x_ptr + r * stride_xb + offs_k[None, :] * stride_xk
    w_k = w_ptr + offs_k[:, None] * stride_wk + offs_d[None, :] * stride_wd
    step = tl.cast(BLOCK_K, tl.int64)  # the K step in 64 bits: BLOCK_K * stride could overflow 32
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_k, mask=(r < B) & (offs_k[None, :] < K - k0), other=0.0)
        w = tl.load(w_k, mask=(offs_k[:, None] < K - k0) & (offs_d[None, :] < D), other=0.0)
        if DOT_IN_FLOAT32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_k += step * stride_xk
        w_k += step * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d * stride_bd, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
    storage = x_ptr.dtype.element_ty
    if storage != tl.float32:
        acc = acc.to(storage).to(tl.float32)
    h = _activate(acc, ACTIVATION)
    if storage != tl.float32:
        h = h.to(storage).to(tl.float32)
    return tl.where((r < B) & (offs_d[None, :] < D), h, 0.0)


@triton.jit
def _add_context_scores(
    s, h, e, c_ptr, rows, offs_t, offs_e, offs_d, B, D, stride_cb, stride_ct, stride_cd,
    PER_ROW_CONTEXT: tl.constexpr,
    NUM_TASKS: tl.constexpr,
):  # fmt: skip
    """``s[:, t, e] += <C[t, chunk], h>`` for every task; ``h`` is expert ``e``'s ``[ROWS, BLOCK_D]`` chunk.

    One task at a time, as 2-D products in ``h``'s own layout: a ``[ROWS, BLOCK_T, BLOCK_D]``
    product would need a layout conversion of ``h`` and more registers than the matmul leaves.
    """
    c_t = c_ptr
    for t in range(0, NUM_TASKS):
        c = tl.sum(load_task_vector(c_t, rows, offs_d, B, D, stride_cb, stride_cd, PER_ROW_CONTEXT), axis=1)
        dots = tl.sum(h * c, axis=1)
        here = (offs_t == t)[:, None] & (offs_e == e)[None, :]
        s = tl.where(here[None, :, :], s + dots[:, None, None], s)
        c_t += stride_ct
    return s


@triton.jit
def _expert_column(p, e, offs_e):
    """``p[:, :, e]`` of a ``[ROWS, BLOCK_T, BLOCK_E]`` tile as ``[ROWS, BLOCK_T]``."""
    return tl.sum(tl.where((offs_e == e)[None, None, :], p, 0.0), axis=2)


@triton.jit
def _online_mix(
    s, allowed, e, h, m, denom, acc, offs_e, scale,
):  # fmt: skip
    """One expert's step of the online softmax over experts (flash attention's, over keys).

    ``s`` holds expert ``e``'s unscaled scores in column ``e``; ``h`` is its ``[ROWS, BLOCK_D]`` output.
    ``m`` (running max), ``denom`` (running denominator, ``[ROWS, BLOCK_T]``) and ``acc`` (``[ROWS, BLOCK_T,
    BLOCK_D]``) are rescaled to the new max; only finite allowed scores enter (a row with a ``+inf`` or
    NaN score is made NaN afterwards from ``p``, exactly as the two-pass path does).
    """
    s_e = _expert_column(s, e, offs_e) * scale
    ok = (_expert_column(allowed.to(tl.float32), e, offs_e) > 0.0) & (tl.abs(s_e) < float("inf"))
    m_new = tl.maximum(m, tl.where(ok, s_e, float("-inf")))
    alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
    w = tl.where(ok, tl.exp(s_e - m_new), 0.0)
    denom = denom * alpha + w
    acc = acc * alpha[:, :, None] + w[:, :, None] * finite_or_zero(h)[:, None, :]
    return m_new, denom, acc


@triton.jit
def experts_mix_kernel(
    x_ptr, stride_xb, stride_xe, stride_xk,
    w_ptr, stride_we, stride_wk, stride_wd,
    b_ptr, stride_bb, stride_be, stride_bd,
    cz_ptr, stride_czb, stride_czt, stride_czx,
    mask_ptr, stride_mb, stride_mt, stride_me,
    y_ptr, stride_yb, stride_yt, stride_yd,
    p_ptr, stride_pb, stride_pt, stride_pe,
    B, E, K, D, scale, top_k,
    ATTENTION: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_PER_ROW: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    RETURN_WEIGHTS: tl.constexpr,
    ONE_PASS: tl.constexpr,
    NUM_TASKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """See the module docstring. Operands are a pointer and strides read as ``[B, T, X]``
    (``config.operand``): ``x`` as ``[B, E, K]`` (``stride_xe = 0`` when every expert reads the same
    input), ``w`` as ``[E, K, D]``, the bias ``[E, D]`` as ``[1, E, D]``; ``cz`` is the context ``C``
    (``ATTENTION``) or the logits ``Z``. ``y`` and ``p`` have a unit last stride."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)

    # 0. one pass (attention gate, no top-k, the tile spans D): score and mix each expert at once
    if ONE_PASS:
        allowed = allowed_experts(
            mask_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_mb, stride_mt, stride_me, HAS_MASK, MASK_PER_ROW
        )  # fmt: skip
        s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        m = tl.full([ROWS, BLOCK_T], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        acc = tl.zeros([ROWS, BLOCK_T, BLOCK_D], dtype=tl.float32)
        for e in range(0, E):
            expert = tl.cast(e, tl.int64)
            h = _expert_chunk(
                x_ptr + expert * stride_xe, stride_xb, stride_xk, w_ptr + expert * stride_we, stride_wk, stride_wd,
                b_ptr + expert * stride_be, stride_bd,
                rows, B, K, D, HAS_BIAS, ACTIVATION, PRECISION, DOT_IN_FLOAT32, ROWS, BLOCK_K, BLOCK_D,
            )  # fmt: skip
            s = _add_context_scores(
                s, h, e, cz_ptr, rows, offs_t, offs_e, offs_d, B, D, stride_czb, stride_czt, stride_czx,
                PER_ROW_CONTEXT, NUM_TASKS,
            )  # fmt: skip
            m, denom, acc = _online_mix(s, allowed, e, h, m, denom, acc, offs_e, scale)
        p, _ = gate_weights(
            s * scale, mask_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_mb, stride_mt, stride_me,
            0, HAS_MASK, MASK_PER_ROW, False, BLOCK_E,
        )  # fmt: skip
        if RETURN_WEIGHTS:
            store_gate_tile(p_ptr, p, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_pb, stride_pt)
        y = tl.where(denom[:, :, None] > 0.0, acc / denom[:, :, None], 0.0)
        nan_row = tl.max(tl.where(p != p, 1, 0), axis=2) > 0  # an allowed +inf or NaN score
        y = tl.where(nan_row[:, :, None], float("nan"), y)
        store_gate_tile(y_ptr, y, rows, offs_t, offs_d, B, NUM_TASKS, D, stride_yb, stride_yt)
        return

    # 1. scores: <C[t], H[b,e]> over D chunks (attention), or the given logits.
    if ATTENTION:
        s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            col = tl.cast(d0, tl.int64)
            for e in range(0, E):
                expert = tl.cast(e, tl.int64)
                h = _expert_chunk(
                    x_ptr + expert * stride_xe, stride_xb, stride_xk,
                    w_ptr + expert * stride_we + col * stride_wd, stride_wk, stride_wd,
                    b_ptr + expert * stride_be + col * stride_bd, stride_bd,
                    rows, B, K, D - d0, HAS_BIAS, ACTIVATION, PRECISION, DOT_IN_FLOAT32, ROWS, BLOCK_K, BLOCK_D,
                )  # fmt: skip
                s = _add_context_scores(
                    s, h, e, cz_ptr + col * stride_czx, rows, offs_t, offs_e, offs_d, B, D - d0,
                    stride_czb, stride_czt, stride_czx, PER_ROW_CONTEXT, NUM_TASKS,
                )  # fmt: skip
    else:
        s = load_gate_tile(cz_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_czb, stride_czt, stride_czx)

    # 2. the masked (top-k) softmax over experts, as in the two-step kernels
    p, _ = gate_weights(
        s * scale, mask_ptr, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_mb, stride_mt, stride_me,
        top_k, HAS_MASK, MASK_PER_ROW, HAS_TOP_K, BLOCK_E,
    )  # fmt: skip
    if RETURN_WEIGHTS:
        store_gate_tile(p_ptr, p, rows, offs_t, offs_e, B, NUM_TASKS, E, stride_pb, stride_pt)

    # 3. the mix, per D chunk: Y[rows, :, chunk] = sum_e p[rows, :, e] H[rows, e, chunk]
    for d0 in range(0, D, BLOCK_D):
        col = tl.cast(d0, tl.int64)
        y = tl.zeros([ROWS, BLOCK_T, BLOCK_D], dtype=tl.float32)
        for e in range(0, E):
            p_e = tl.where(rows[:, None, None] < B, _expert_column(p, e, offs_e)[:, :, None], 0.0)
            # An expert no (row, task) of this program uses costs no matmul.
            if tl.max(tl.where(p_e != 0.0, 1, 0)) > 0:
                expert = tl.cast(e, tl.int64)
                h = _expert_chunk(
                    x_ptr + expert * stride_xe, stride_xb, stride_xk,
                    w_ptr + expert * stride_we + col * stride_wd, stride_wk, stride_wd,
                    b_ptr + expert * stride_be + col * stride_bd, stride_bd,
                    rows, B, K, D - d0, HAS_BIAS, ACTIVATION, PRECISION, DOT_IN_FLOAT32, ROWS, BLOCK_K, BLOCK_D,
                )[:, None, :]  # fmt: skip
                # Attention: a non-finite H scores NaN or +-inf, so its weight is 0 or its row is NaN
                # already (gate_tile.finite_or_zero); the softmax gate selects on the weight instead.
                y += p_e * finite_or_zero(h) if ATTENTION else weighted(p_e, h, p_e)
        store_gate_tile(y_ptr + col, y, rows, offs_t, offs_d, B, NUM_TASKS, D - d0, stride_yb, stride_yt)


def plan_experts_mix(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    top_k: int | None,
    *,
    attention: bool,
    activation: str,
    return_weights: bool,
    config: ExpertsMixConfig | None = None,
) -> tuple[Tensor, Tensor | None, list[KernelLaunch]]:
    """Allocate the outputs and describe the launch (none when ``B = 0``); see :func:`experts_mix_forward`.

    ``config`` replaces the heuristic (``kernels/config.py``); its ``block_t`` and ``block_e`` must
    cover ``T`` and ``E``.
    """
    experts, in_features, dim = weight.shape
    batch = x.shape[0]
    tasks = cz.shape[-2]
    y = torch.empty((batch, tasks, dim), device=x.device, dtype=x.dtype)
    p = torch.empty((batch, tasks, experts), device=x.device, dtype=x.dtype) if return_weights else None
    if batch == 0:
        return y, p, []
    one_pass = attention and top_k is None
    cfg = config or experts_mix_config(experts, in_features, dim, tasks, x.element_size(), one_pass=one_pass)
    m = mask_operand(mask)
    # Triton's interpreter multiplies bfloat16 dot operands as their raw 16-bit patterns: it gets them
    # in float32, where the products are exact, as on a tensor core. Compiled kernels keep bfloat16.
    interpreted_bf16 = INTERPRETED and x.dtype == torch.bfloat16
    # x as [B, E, K]: a shared [B, K] input has expert stride 0.
    x_strides = x.stride() if x.dim() == 3 else (x.stride(0), 0, x.stride(1))
    args = (
        x,
        *x_strides,
        *operand(weight),
        *operand(bias, placeholder=weight),
        *operand(cz),
        *operand(m, placeholder=x),
        *operand(y),
        *operand(p, placeholder=y),
        batch,
        experts,
        in_features,
        dim,
        scale,
        top_k or 0,
    )
    meta = dict(
        ATTENTION=attention,
        PER_ROW_CONTEXT=attention and cz.dim() == 3,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        # float32 inputs multiply in full precision, as torch's matmul does by default (no TF32).
        PRECISION="ieee" if x.dtype == torch.float32 or interpreted_bf16 else "tf32",
        DOT_IN_FLOAT32=interpreted_bf16,
        HAS_MASK=m is not None,
        MASK_PER_ROW=m is not None and m.dim() == 3,
        HAS_TOP_K=top_k is not None,
        RETURN_WEIGHTS=return_weights,
        ONE_PASS=one_pass and cfg.block_d >= dim,
        NUM_TASKS=tasks,
        BLOCK_T=cfg.block_t,
        BLOCK_E=cfg.block_e,
        BLOCK_K=cfg.block_k,
        BLOCK_D=cfg.block_d,
        ROWS=cfg.rows,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=registers_for_warps(MIX_REGISTER_LIMIT, cfg.num_warps),
    )
    return y, p, [KernelLaunch(experts_mix_kernel, (triton.cdiv(batch, cfg.rows),), args, meta)]


def experts_mix_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    top_k: int | None,
    *,
    attention: bool,
    activation: str,
    return_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run the kernel. ``cz``: the context ``C [T, D]``/``[B, T, D]`` (attention gate) or the logits
    ``Z [B, T, E]`` (softmax gate, ``scale = 1 / temperature``).

    Returns ``Y [B, T, D]`` in ``x``'s dtype and, when ``return_weights``, ``p [B, T, E]`` too. Inputs
    are validated by the caller; any strides are accepted (no copies).
    """
    y, p, launches = plan_experts_mix(
        x, weight, bias, cz, mask, scale, top_k, attention=attention, activation=activation,
        return_weights=return_weights,
    )  # fmt: skip
    for launch in launches:
        launch.launch()
    return y, p
