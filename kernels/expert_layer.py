"""``@triton.jit`` helpers of the experts' last layer, shared by the ``experts_mix`` forward and backward.

For expert ``e`` and a chunk of its columns (``X [B, K]`` or ``[B, E, K]``, ``W [E, K, D]``, ``bias [E, D]``)::

    pre = X[rows, (e)] @ W[e][:, chunk] + bias[e][chunk]     the pre-activation
    H   = act(pre)                                            the expert output
    dL/dpre = dL/dH * act'(pre)                               the backward through the activation

all in float32 registers, ``pre`` and ``H`` rounded to ``X``'s dtype where the two-step path (a batched
matmul, then the activation) stores them, so both paths overflow to ``+-inf`` alike in float16. The
derivative follows torch's own backward formulas value for value, special values included (NaN at
``+-inf`` for GELU and SiLU, a select rather than a product for ReLU and leaky ReLU), so the fused
backward and the two-step path's autograd agree on every input.
"""

import triton
import triton.language as tl

# 1 / sqrt(2) and 1 / sqrt(2 pi): GELU's cdf and pdf.
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def activate(h, ACTIVATION: tl.constexpr):
    """``act(h)`` for an activation's kernel name (``fused_gate/activations.py``; ``"identity"``: ``h``),
    float32 to a few ulp over the whole range; ``+-inf`` map to the activation's limit (GELU and SiLU:
    ``+inf`` and 0), NaN to NaN. Selects rather than max instructions, which would drop NaN where torch
    keeps it."""
    if ACTIVATION == "relu":
        h = tl.where(h < 0.0, 0.0, h)
    elif ACTIVATION == "leaky_relu":
        h = tl.where(h < 0.0, 0.01 * h, h)  # torch's default negative slope
    elif ACTIVATION == "gelu":
        h = tl.where(h == float("-inf"), 0.0, 0.5 * h * (1.0 + tl.math.erf(h * SQRT_HALF)))
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
def activation_grad(dh, pre, h, ACTIVATION: tl.constexpr):
    """``dL/dpre`` from ``dh = dL/dH``, the pre-activation ``pre`` and the output ``h = act(pre)``, as torch's
    backward of each activation computes it: ReLU ``threshold_backward`` on the output (a NaN output passes
    ``dh``), leaky ReLU ``pre > 0 ? dh : 0.01 dh``, GELU ``dh (Phi(pre) + pre phi(pre))`` and SiLU
    ``dh s (1 + pre (1 - s))`` (NaN at ``pre = +-inf``, as torch's formulas give), sigmoid ``dh h (1 - h)``,
    tanh ``dh (1 - h^2)``."""
    if ACTIVATION == "relu":
        g = tl.where(h <= 0.0, 0.0, dh)
    elif ACTIVATION == "leaky_relu":
        g = tl.where(pre > 0.0, dh, 0.01 * dh)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(pre * SQRT_HALF))
        g = dh * (cdf + pre * (tl.exp(-0.5 * pre * pre) * INV_SQRT_2PI))
    elif ACTIVATION == "silu":
        s = tl.sigmoid(pre)
        g = dh * (s * (1.0 + pre * (1.0 - s)))
    elif ACTIVATION == "sigmoid":
        g = dh * ((1.0 - h) * h)
    elif ACTIVATION == "tanh":
        g = dh * (1.0 - h * h)
    else:
        g = dh
    return g


@triton.jit
def expert_preactivation(layer, e, col, at, K, LAYER: tl.constexpr):
    """``X[rows, (e)] @ W[e][:, chunk] + bias[e][chunk]`` as float32 ``[ROWS, BLOCK_D]``, rounded to ``X``'s
    dtype, for the chunk of columns from ``col`` (a 64-bit scalar; ``at`` holds its width). Rows past ``B``
    and columns past ``D`` hold the bias or 0: :func:`expert_output` zeroes them.

    ``layer`` is the operands ``(x, w, b)``, read as ``[B, E, K]``, ``[E, K, D]`` and ``[1, E, D]``;
    ``LAYER`` the constexprs ``(HAS_BIAS, ACTIVATION, PRECISION, DOT_IN_FLOAT32, BLOCK_K)``. The K loop
    steps the pointers (64-bit) so offsets inside stay below ``BLOCK_K``.
    """
    x, w, b = layer
    HAS_BIAS, _, PRECISION, DOT_IN_FLOAT32, BLOCK_K = LAYER
    rows, _, _, offs_d, B, _, _, D = at
    expert = tl.cast(e, tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_d = offs_d.to(tl.int64)
    r = rows[:, None]
    acc = tl.zeros([rows.shape[0], offs_d.shape[0]], dtype=tl.float32)
    x_k = x[0] + expert * x[2] + r * x[1] + offs_k[None, :] * x[3]
    w_k = w[0] + expert * w[1] + col * w[3] + offs_k[:, None] * w[2] + offs_d[None, :] * w[3]
    step = tl.cast(BLOCK_K, tl.int64)  # the K step in 64 bits: BLOCK_K * stride could overflow 32
    for k0 in range(0, K, BLOCK_K):
        x_tile = tl.load(x_k, mask=(r < B) & (offs_k[None, :] < K - k0), other=0.0)
        w_tile = tl.load(w_k, mask=(offs_k[:, None] < K - k0) & (offs_d[None, :] < D), other=0.0)
        if DOT_IN_FLOAT32:
            x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)
        x_k += step * x[3]
        w_k += step * w[2]
    if HAS_BIAS:
        bias = b[0] + expert * b[2] + col * b[3]
        acc += tl.load(bias + offs_d * b[3], mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
    storage = x[0].dtype.element_ty
    if storage != tl.float32:
        acc = acc.to(storage).to(tl.float32)
    return acc


@triton.jit
def expert_output(pre, layer, at, LAYER: tl.constexpr):
    """``act(pre)`` rounded to ``X``'s dtype, 0 outside ``[B, D]`` (``pre`` from :func:`expert_preactivation`)."""
    _, ACTIVATION, _, _, _ = LAYER
    rows, _, _, offs_d, B, _, _, D = at
    h = activate(pre, ACTIVATION)
    storage = layer[0][0].dtype.element_ty
    if storage != tl.float32:
        h = h.to(storage).to(tl.float32)
    return tl.where((rows[:, None] < B) & (offs_d[None, :] < D), h, 0.0)


@triton.jit
def expert_chunk(layer, e, col, at, K, LAYER: tl.constexpr):
    """``act(X[rows, (e)] @ W[e][:, chunk] + bias[e][chunk])`` as float32 ``[ROWS, BLOCK_D]``, 0 outside
    ``[B, D]``: :func:`expert_output` of :func:`expert_preactivation`."""
    return expert_output(expert_preactivation(layer, e, col, at, K, LAYER), layer, at, LAYER)
