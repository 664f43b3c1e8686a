"""The experts' last layer and the gate in one kernel: ``H`` is never written (backward: ``experts_mix_bwd.py``).

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

Two kernels take the same arguments; the launcher picks one. The attention gate without top-k, when
the tile spans D (``D <= 256`` and 16 rows of the ``[ROWS, T, D]`` accumulator fit), runs **one pass**
(``experts_mix_one_pass_kernel``): for each expert, ``H[rows, e]`` is computed once, scored against
every task, and folded into ``Y`` by an online softmax over experts
(running max ``m``, running denominator, accumulator rescaled by ``exp(m_old - m_new)``, as flash
attention does over keys); ``p`` for ``return_weights`` and the NaN rows (an allowed ``+inf`` or NaN
score) come from all ``E`` scores at the end, by ``gate_tile.gate_weights``. The expert matmul runs
once.

Otherwise (top-k, which needs every score before any weight, or a wider D) two passes
(``experts_mix_two_pass_kernel``):

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
from fused_gate.kernels.config import ExpertsMixConfig, experts_mix_config
from fused_gate.kernels.expert_layer import expert_chunk
from fused_gate.kernels.gate_tile import (
    chunk,
    column,
    expert_column,
    finite_or_zero,
    gate_weights,
    load_gate_tile,
    load_task_vector,
    output_column,
    store_gate_tile,
    store_mix_tile,
    unmasked_experts,
    weighted,
)
from fused_gate.kernels.launch import (
    KernelLaunch,
    Plan,
    gate_meta,
    gate_operands,
    mix_outputs,
    new_output,
    operand,
    row_blocks,
)


@triton.jit
def _add_expert_scores(s, h, e, c, at, PER_ROW_CONTEXT: tl.constexpr):
    """``s[:, t, e] += <C[t, chunk], h>`` for every task; ``h`` is expert ``e``'s ``[ROWS, BLOCK_D]`` chunk.

    One task at a time, as 2-D products in ``h``'s own layout: a ``[ROWS, BLOCK_T, BLOCK_D]``
    product would need a layout conversion of ``h`` and more registers than the matmul leaves.
    """
    _, offs_t, offs_e, _, _, T, _, _ = at
    c_t = c[0]
    for t in range(0, T):
        c_vec = tl.sum(load_task_vector(c_t, c, at, PER_ROW_CONTEXT), axis=1)
        dots = tl.sum(h * c_vec, axis=1)
        here = (offs_t == t)[:, None] & (offs_e == e)[None, :]
        s = tl.where(here[None, :, :], s + dots[:, None, None], s)
        c_t += c[2]
    return s


@triton.jit
def _online_mix(
    s, unmasked, e, h, m, denom, acc, offs_e, scale,
):  # fmt: skip
    """One expert's step of the online softmax over experts (flash attention's, over keys).

    ``s`` holds expert ``e``'s unscaled scores in column ``e``; ``h`` is its ``[ROWS, BLOCK_D]`` output.
    ``m`` (running max), ``denom`` (running denominator, ``[ROWS, BLOCK_T]``) and ``acc`` (``[ROWS, BLOCK_T,
    BLOCK_D]``) are rescaled to the new max; only finite scores the mask lets in enter (a row with a
    ``+inf`` or NaN score is made NaN afterwards from ``p``, exactly as the two-pass kernel does).
    """
    s_e = expert_column(s, e, offs_e) * scale
    ok = (expert_column(unmasked.to(tl.float32), e, offs_e) > 0.0) & (tl.abs(s_e) < float("inf"))
    m_new = tl.maximum(m, tl.where(ok, s_e, float("-inf")))
    alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
    w = tl.where(ok, tl.exp(s_e - m_new), 0.0)
    denom = denom * alpha + w
    acc = acc * alpha[:, :, None] + w[:, :, None] * finite_or_zero(h)[:, None, :]
    return m_new, denom, acc


@triton.jit
def _mix_chunk(p, layer, col, at, K, GATE: tl.constexpr, LAYER: tl.constexpr):
    """``Y[rows, :, chunk] = sum_e p[rows, :, e] H[rows, e, chunk]`` as float32 ``[ROWS, BLOCK_T, BLOCK_D]``,
    ``H`` recomputed by :func:`expert_layer.expert_chunk`; an expert no (row, task) of the program uses costs no
    matmul."""
    rows, offs_t, offs_e, offs_d, B, _, E, _ = at
    y = tl.zeros([rows.shape[0], offs_t.shape[0], offs_d.shape[0]], dtype=tl.float32)
    for e in range(0, E):
        p_e = tl.where(rows[:, None, None] < B, expert_column(p, e, offs_e)[:, :, None], 0.0)
        if tl.max(tl.where(p_e != 0.0, 1, 0)) > 0:
            h = expert_chunk(layer, e, col, at, K, LAYER)[:, None, :]
            # Attention: a non-finite H scores NaN or +-inf, so its weight is 0 or its row is NaN
            # already (gate_tile.finite_or_zero); the softmax gate selects on the weight instead.
            y += p_e * finite_or_zero(h) if GATE == "attention" else weighted(p_e, h, p_e)
    return y


@triton.jit
def experts_mix_two_pass_kernel(
    x_ptr, stride_xb, stride_xe, stride_xk,
    w_ptr, stride_we, stride_wk, stride_wd,
    b_ptr, stride_bb, stride_be, stride_bd,
    cz_ptr, stride_czb, stride_czt, stride_czx,
    mask_ptr, stride_mb, stride_mt, stride_me,
    y_ptr, stride_yb, stride_yt, stride_yd,
    p_ptr, stride_pb, stride_pt, stride_pe,
    B, E, K, D, scale, top_k,
    GATE: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    MASK: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    RETURN_WEIGHTS: tl.constexpr,
    NUM_TASKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """Both gates, any D, top-k; see the module docstring. Each input is a pointer and its strides read
    as ``[B, T, X]``: ``x`` as ``[B, E, K]`` (``stride_xe = 0`` when every expert reads the same input),
    ``w`` as ``[E, K, D]``, the bias ``[E, D]`` as ``[1, E, D]``; ``cz`` is the context ``C``
    (``GATE == "attention"``) or the logits ``Z``. ``y`` and ``p`` have a unit last stride."""
    x = (x_ptr, stride_xb, stride_xe, stride_xk)
    w = (w_ptr, stride_we, stride_wk, stride_wd)
    layer = (x, w, (b_ptr, stride_bb, stride_be, stride_bd))
    LAYER: tl.constexpr = (HAS_BIAS, ACTIVATION, PRECISION, DOT_IN_FLOAT32, BLOCK_K)
    cz = (cz_ptr, stride_czb, stride_czt, stride_czx)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    at = (rows, tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_D), B, NUM_TASKS, E, D)

    # pass 1: the scores, <C[t], H[b,e]> over D chunks (attention gate) or the given logits
    if GATE == "attention":
        s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            col = tl.cast(d0, tl.int64)
            chunk_at = chunk(at, d0)
            for e in range(0, E):
                h = expert_chunk(layer, e, col, chunk_at, K, LAYER)
                s = _add_expert_scores(s, h, e, column(cz, col), chunk_at, PER_ROW_CONTEXT)
    else:
        s = load_gate_tile(cz, at)

    # the weights: the masked (top-k) softmax over experts, as in the two-step kernels
    p, _ = gate_weights(s * scale, (mask_ptr, stride_mb, stride_mt, stride_me), at, top_k, MASK, HAS_TOP_K)
    if RETURN_WEIGHTS:
        store_gate_tile((p_ptr, stride_pb, stride_pt, stride_pe), p, at)

    # pass 2: the mix, per D chunk
    for d0 in range(0, D, BLOCK_D):
        col = tl.cast(d0, tl.int64)
        chunk_at = chunk(at, d0)
        y = _mix_chunk(p, layer, col, chunk_at, K, GATE, LAYER)
        store_mix_tile(output_column((y_ptr, stride_yb, stride_yt, stride_yd), col), y, chunk_at)


@triton.jit
def experts_mix_one_pass_kernel(
    x_ptr, stride_xb, stride_xe, stride_xk,
    w_ptr, stride_we, stride_wk, stride_wd,
    b_ptr, stride_bb, stride_be, stride_bd,
    cz_ptr, stride_czb, stride_czt, stride_czx,
    mask_ptr, stride_mb, stride_mt, stride_me,
    y_ptr, stride_yb, stride_yt, stride_yd,
    p_ptr, stride_pb, stride_pt, stride_pe,
    B, E, K, D, scale, top_k,
    GATE: tl.constexpr,
    PER_ROW_CONTEXT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    MASK: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    RETURN_WEIGHTS: tl.constexpr,
    NUM_TASKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """The attention gate without top-k, ``BLOCK_D >= D``: each expert's ``H`` computed once, scored
    and folded into ``Y`` by an online softmax. The arguments are those of
    :func:`experts_mix_two_pass_kernel`, so the launcher only picks the kernel."""
    tl.static_assert(GATE == "attention", "one pass: the attention gate only")
    tl.static_assert(not HAS_TOP_K, "one pass: top-k needs every score before any weight")
    x = (x_ptr, stride_xb, stride_xe, stride_xk)
    w = (w_ptr, stride_we, stride_wk, stride_wd)
    layer = (x, w, (b_ptr, stride_bb, stride_be, stride_bd))
    LAYER: tl.constexpr = (HAS_BIAS, ACTIVATION, PRECISION, DOT_IN_FLOAT32, BLOCK_K)
    mask = (mask_ptr, stride_mb, stride_mt, stride_me)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    at = (rows, offs_t, offs_e, offs_d, B, NUM_TASKS, E, D)

    # stage 1: for each expert, H[rows, e] once: its scores, then its step of the online softmax
    unmasked = unmasked_experts(mask, at, MASK)
    s = tl.zeros([ROWS, BLOCK_T, BLOCK_E], dtype=tl.float32)
    m = tl.full([ROWS, BLOCK_T], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_T, BLOCK_D], dtype=tl.float32)
    for e in range(0, E):
        h = expert_chunk(layer, e, 0, at, K, LAYER)
        s = _add_expert_scores(s, h, e, (cz_ptr, stride_czb, stride_czt, stride_czx), at, PER_ROW_CONTEXT)
        m, denom, acc = _online_mix(s, unmasked, e, h, m, denom, acc, offs_e, scale)

    # epilogue: p and the NaN rows (an allowed +inf or NaN score) from all E scores, then Y
    p, _ = gate_weights(s * scale, mask, at, 0, MASK, False)
    if RETURN_WEIGHTS:
        store_gate_tile((p_ptr, stride_pb, stride_pt, stride_pe), p, at)
    y = tl.where(denom[:, :, None] > 0.0, acc / denom[:, :, None], 0.0)
    nan_row = tl.max(tl.where(p != p, 1, 0), axis=2) > 0
    y = tl.where(nan_row[:, :, None], float("nan"), y)
    store_mix_tile((y_ptr, stride_yb, stride_yt, stride_yd), y, at)


def layer_operands(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
    """The experts' last layer as kernel arguments: ``x`` read as ``[B, E, K]`` (a shared ``[B, K]`` input
    has expert stride 0), ``weight [E, K, D]``, ``bias [E, D]`` read as ``[1, E, D]``."""
    x_strides = x.stride() if x.dim() == 3 else (x.stride(0), 0, x.stride(1))
    return (x, *x_strides, *operand(weight), *operand(bias, placeholder=weight))


def layer_meta(x: Tensor, bias: Tensor | None, activation: str) -> dict:
    """The experts' last layer's constexprs: bias, activation and how ``tl.dot`` multiplies ``x``'s dtype."""
    # Triton's interpreter multiplies bfloat16 dot operands as their raw 16-bit patterns: it gets them
    # in float32, where the products are exact, as on a tensor core. Compiled kernels keep bfloat16.
    interpreted_bf16 = INTERPRETED and x.dtype == torch.bfloat16
    return dict(
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        # float32 inputs multiply in full precision, as torch's matmul does by default (no TF32).
        PRECISION="ieee" if x.dtype == torch.float32 or interpreted_bf16 else "tf32",
        DOT_IN_FLOAT32=interpreted_bf16,
    )


def plan_experts_mix(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cz: Tensor,
    mask: Tensor | None,
    scale: float,
    top_k: int | None,
    *,
    gate: str,
    activation: str,
    return_weights: bool,
    weights_dtype: torch.dtype | None = None,
    config: ExpertsMixConfig | None = None,
) -> Plan:
    """The plan (``kernels/launch.py``): outputs ``(Y [B, T, D], p [B, T, E] or None)``, ``Y`` in ``x``'s
    dtype and ``p`` in ``weights_dtype`` (default ``x``'s; float32 for the backward), and one launch (none
    when ``B = 0``), of the one-pass kernel where it applies (the attention gate without top-k, the tile
    spanning D), else of the two-pass kernel.

    Args:
        x, weight, bias: the experts' last layer, as in :func:`fused_gate.experts_mix`; any strides.
        cz: the context ``C [T, D]``/``[B, T, D]`` (``gate="attention"``) or the logits ``Z [B, T, E]``
            (``gate="softmax"``, ``scale = 1 / temperature``).
        mask, top_k, return_weights: as in :func:`fused_gate.experts_mix`.
        activation: the activation's kernel name (``fused_gate/activations.py``).
        weights_dtype: the dtype of ``p``.
        config: replaces the heuristic (``kernels/config.py``); its ``block_t`` and ``block_e`` must
            cover ``T`` and ``E``.

    Inputs are validated by the caller.
    """
    experts, in_features, dim = weight.shape
    batch = x.shape[0]
    tasks = cz.shape[-2]
    y, p = mix_outputs(x, batch, tasks, experts, dim, return_weights)
    if return_weights and weights_dtype is not None:
        p = new_output(x, (batch, tasks, experts), dtype=weights_dtype)
    if batch == 0:
        return Plan((y, p))
    one_pass = gate == "attention" and top_k is None
    cfg = config or experts_mix_config(experts, in_features, dim, tasks, x.element_size(), one_pass=one_pass)
    one_pass = one_pass and cfg.block_d >= dim
    args = (
        *layer_operands(x, weight, bias),
        *gate_operands(cz, mask, placeholder=x),
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
        **gate_meta(gate, cz, mask),
        **layer_meta(x, bias, activation),
        HAS_TOP_K=top_k is not None,
        RETURN_WEIGHTS=return_weights,
        **cfg.meta(),
    )
    kernel = experts_mix_one_pass_kernel if one_pass else experts_mix_two_pass_kernel
    return Plan((y, p), (KernelLaunch(kernel, row_blocks(batch, cfg.rows), args, meta),))
