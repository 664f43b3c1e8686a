"""Launch configuration of the gate kernels, chosen by a cached heuristic (no autotuning on the hot path).

A program owns a ``[ROWS, BLOCK_E, BLOCK_D]`` tile of ``H`` (rows x all experts x a chunk of D),
held in float32 registers. When ``BLOCK_D >= D`` the tile is the whole of ``H[rows]`` and the
kernels read ``H`` exactly once; otherwise they walk D in chunks twice (scores, then the mix), the
second walk hitting L2. The tile budget bounds registers per program so that no configuration
spills (checked by ``tests/test_compile.py`` for sm_80 and sm_90).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from fused_gate.kernels.launch import CONTEXT_GATES

MAX_ROWS = 64
MIN_BLOCK_D = 8
FORWARD_TILE = 8192
BACKWARD_TILE = 4096
ELEMENTS_PER_THREAD = 16
MAX_WARPS = 16
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90)
GATE_ELEMENTS_PER_THREAD = 4
# The dC reduction: each program sums REDUCE_BLOCK columns of every workspace slot, REDUCE_SLOTS
# slots per load (a [16, 256] float32 tile: 32 values per thread at 4 warps).
REDUCE_BLOCK = 256
REDUCE_SLOTS = 16


@dataclass(frozen=True)
class TileConfig:
    """Block sizes of one kernel launch; ``single_chunk`` means the tile spans all of D."""

    block_t: int
    block_e: int
    block_d: int
    rows: int
    num_warps: int
    single_chunk: bool
    # Software pipelining of the D-chunk loops keeps several tiles live and spills; the kernels are
    # latency-hidden by running several programs per SM instead.
    num_stages: int = 1

    def meta(self, register_limit: int) -> dict:
        """The launch's block-size constexprs and options, ptxas capped at ``register_limit`` per thread."""
        return dict(
            BLOCK_T=self.block_t,
            BLOCK_E=self.block_e,
            BLOCK_D=self.block_d,
            ROWS=self.rows,
            SINGLE_CHUNK=self.single_chunk,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            maxnreg=registers_for_warps(register_limit, self.num_warps),
        )


@functools.lru_cache(maxsize=1024)
def tile_config(num_experts: int, dim: int, num_tasks: int, backward: bool) -> TileConfig:
    """Pick the tile for ``E`` experts, width ``D`` and ``T`` tasks.

    All experts sit in one tile (the softmax runs over them in registers); D is chunked only when
    ``BLOCK_E * D`` exceeds the budget; spare budget packs several rows per program so that short
    rows (small ``E * D``) still move enough bytes per program to saturate memory bandwidth.
    """
    budget = BACKWARD_TILE if backward else FORWARD_TILE
    block_e = triton.next_power_of_2(num_experts)
    block_t = triton.next_power_of_2(num_tasks)
    # The backward also keeps a shared context's dC partial, [BLOCK_T, BLOCK_D], in registers.
    widest = max(block_e, block_t) if backward else block_e
    block_d = min(triton.next_power_of_2(dim), max(MIN_BLOCK_D, budget // widest))
    per_thread = ELEMENTS_PER_THREAD
    if backward and block_d < dim:
        # Walking D in chunks keeps p, ds and the workspace slot live across the loop: halve the tile,
        # and spread it over twice the threads, so it fits 128 registers (16 resident warps per SM)
        # without spilling.
        budget //= 2
        block_d = max(MIN_BLOCK_D, block_d // 2)
        per_thread //= 2
    # Rows also multiply the gate tile of per-(row, task, expert) scores and weights, [ROWS, BLOCK_T, BLOCK_E].
    rows = max(1, min(MAX_ROWS, budget // (block_e * block_d), budget // (block_t * block_e)))
    # Several gate tiles (scores, weights, their gradients, top-k state) are live at once, so they get
    # fewer elements per thread than the expert tile.
    gate_tile = rows * block_t * block_e
    expert_tile = rows * block_e * block_d
    warps = max(min(8, expert_tile // (32 * per_thread)), gate_tile // (32 * GATE_ELEMENTS_PER_THREAD))
    num_warps = max(1, min(MAX_WARPS, warps))
    return TileConfig(
        block_t=block_t,
        block_e=block_e,
        block_d=block_d,
        rows=rows,
        num_warps=num_warps,
        single_chunk=block_d >= dim,
    )


# experts_mix (kernels/experts_mix.py): rows per program are the M of tl.dot (>= 16); the per-(row,
# task, expert) scores and weights, [ROWS, BLOCK_T, BLOCK_E], stay live through the whole kernel.
MIX_MIN_DOT = 16
MIX_MAX_ROWS = 64
MIX_GATE_TILE = 4096
MIX_ACCUMULATOR = 8192  # the Y accumulator [ROWS, BLOCK_T, BLOCK_D], float32
MIX_MAX_BLOCK_D = 128
MIX_MAX_ONE_PASS_D = 256  # the widest D the attention gate's one-pass kernel holds
MIX_DOT_BYTES = 64
# A matmul kernel: one 8-warp program per SM may use the whole register file (tensor-core tiles hide
# latency within a program).
MIX_REGISTER_LIMIT = 255
# 8 warps: a 16-warp program fits the register file only at 128 per thread, where the widest tiles spill.
MIX_MAX_WARPS = 8


@dataclass(frozen=True)
class ExpertsMixConfig:
    """Block sizes of one ``experts_mix`` launch: ``rows`` x ``block_k`` x ``block_d`` matmul tiles."""

    block_t: int
    block_e: int
    block_k: int
    block_d: int
    rows: int
    num_warps: int
    num_stages: int = 1

    def meta(self) -> dict:
        """The launch's block-size constexprs and options (ptxas capped at ``MIX_REGISTER_LIMIT``)."""
        return dict(
            BLOCK_T=self.block_t,
            BLOCK_E=self.block_e,
            BLOCK_K=self.block_k,
            BLOCK_D=self.block_d,
            ROWS=self.rows,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            maxnreg=registers_for_warps(MIX_REGISTER_LIMIT, self.num_warps),
        )


@functools.lru_cache(maxsize=1024)
def experts_mix_config(
    num_experts: int, in_features: int, dim: int, num_tasks: int, element_size: int = 2, *, one_pass: bool = False
) -> ExpertsMixConfig:
    """Pick the tile for ``E`` experts of ``K = in_features`` inputs and width ``D``, ``T`` tasks.

    Every program reads all of ``W`` (an L2 hit after the first), so it takes as many rows as the gate
    tile allows (up to 64, at least the 16 of ``tl.dot``); the D chunk then fills the accumulator
    budget; the K chunk holds ``MIX_DOT_BYTES`` per row of the matmul's operands (32 values of 16
    bits, 16 of float32). Both gates share the tile. ``one_pass`` (the attention gate without top-k)
    asks for a D chunk spanning all of D, with fewer rows if need be, when ``D <= 256`` and 16 rows fit
    the accumulator: the kernel then scores and mixes each expert in one pass (an online softmax).
    """
    block_t = triton.next_power_of_2(num_tasks)
    block_e = triton.next_power_of_2(num_experts)
    rows = MIX_MAX_ROWS
    while rows > MIX_MIN_DOT and rows * block_t * block_e > MIX_GATE_TILE:
        rows //= 2
    block_d = max(MIX_MIN_DOT, min(triton.next_power_of_2(dim), MIX_MAX_BLOCK_D, MIX_ACCUMULATOR // (rows * block_t)))
    # The D chunk cannot go below the 16 of tl.dot: then fewer rows keep the accumulator in budget.
    while rows > MIX_MIN_DOT and rows * block_t * block_d > MIX_ACCUMULATOR:
        rows //= 2
    whole_d = max(MIX_MIN_DOT, triton.next_power_of_2(dim))
    if one_pass and whole_d <= MIX_MAX_ONE_PASS_D and MIX_MIN_DOT * block_t * whole_d <= MIX_ACCUMULATOR:
        # The attention gate's one pass holds Y[rows, :, all of D]: fewer rows buy the whole of D.
        while rows * block_t * whole_d > MIX_ACCUMULATOR:
            rows //= 2
        block_d = whole_d
    block_k = max(MIX_MIN_DOT, min(triton.next_power_of_2(in_features), MIX_DOT_BYTES // element_size))
    gate_tile = rows * block_t * block_e
    accumulator = rows * block_t * block_d
    warps = max(accumulator // (32 * ELEMENTS_PER_THREAD * 2), gate_tile // (32 * GATE_ELEMENTS_PER_THREAD * 4), 4)
    return ExpertsMixConfig(
        block_t=block_t,
        block_e=block_e,
        block_k=block_k,
        block_d=block_d,
        rows=rows,
        num_warps=min(MIX_MAX_WARPS, triton.next_power_of_2(warps)),
    )


# The experts_mix backward (kernels/experts_mix_bwd.py) keeps [ROWS, BLOCK_D] float32 tiles live in its expert
# loop (the pre-activation, H, dL/dH, a task's G and C) next to the matmul's: MIX_BWD_TILE elements of one (half
# that with float32 operands, whose dot takes more registers), and a per-row context's dC accumulator
# [ROWS, BLOCK_T, BLOCK_D] through each chunk, MIX_BWD_ACCUMULATOR elements. The weights and their gradients,
# [ROWS, BLOCK_T, BLOCK_E], are read one expert at a time, so they bound the rows only as the forward's do.
MIX_BWD_TILE = 4096
MIX_BWD_ACCUMULATOR = 4096


@functools.lru_cache(maxsize=1024)
def experts_mix_backward_config(
    num_experts: int,
    in_features: int,
    dim: int,
    num_tasks: int,
    element_size: int = 2,
    *,
    context_grad: bool,
    per_row_context: bool = False,
) -> ExpertsMixConfig:
    """Pick the backward's tile for ``E`` experts of ``K = in_features`` inputs and width ``D``, ``T`` tasks.

    ``context_grad`` (the attention gate) takes 16 rows (the M of ``tl.dot``) and a chunk spanning all of D
    when ``D <= 256`` and it fits the tile: the kernel then needs one pass (each expert's matmul once), where
    a chunked D needs two (``dp = <G, H>`` over all of D first). Otherwise as many rows as the gate tile allows
    (up to 64) and the widest D chunk within the budgets (halved for the attention gate), up to 128 columns.
    ``per_row_context`` adds the ``dC`` accumulator ``[ROWS, BLOCK_T, BLOCK_D]``. The K step is the smallest of
    ``tl.dot``: its 64-bit pointer tile of ``W``, ``[BLOCK_K, BLOCK_D]``, is live through the matmul.
    """
    block_t = triton.next_power_of_2(num_tasks)
    block_e = triton.next_power_of_2(num_experts)
    tile = MIX_BWD_TILE if element_size <= 2 else MIX_BWD_TILE // 2
    accumulated = block_t if context_grad and per_row_context else 1  # the dC accumulator's tasks per (row, column)
    whole_d = max(MIX_MIN_DOT, triton.next_power_of_2(dim))
    rows = MIX_MAX_ROWS
    while rows > MIX_MIN_DOT and rows * block_t * block_e > MIX_GATE_TILE:
        rows //= 2
    one_pass = (
        context_grad
        and whole_d <= MIX_MAX_ONE_PASS_D
        and MIX_MIN_DOT * whole_d <= tile
        and MIX_MIN_DOT * accumulated * whole_d <= MIX_BWD_ACCUMULATOR
    )
    budget = MIX_BWD_ACCUMULATOR
    if one_pass:
        rows, block_d = MIX_MIN_DOT, whole_d
    else:
        if context_grad:  # D in chunks: the dC chunk and the gate's stage 1 take registers too
            tile, budget = tile // 2, budget // 2
        widest = min(tile // rows, budget // (rows * accumulated))
        block_d = max(MIX_MIN_DOT, min(whole_d, MIX_MAX_BLOCK_D, widest))
    while rows > MIX_MIN_DOT and (rows * block_d > tile or rows * accumulated * block_d > budget):
        rows //= 2
    warps = max(
        rows * block_d // (32 * ELEMENTS_PER_THREAD), rows * accumulated * block_d // (32 * ELEMENTS_PER_THREAD), 4
    )
    warps = max(warps, rows * block_t * block_e // (32 * GATE_ELEMENTS_PER_THREAD * 4))
    return ExpertsMixConfig(
        block_t=block_t,
        block_e=block_e,
        block_k=MIX_MIN_DOT,
        block_d=block_d,
        rows=rows,
        num_warps=min(MIX_MAX_WARPS, triton.next_power_of_2(warps)),
    )


def registers_for_warps(limit: int, num_warps: int) -> int:
    """``limit``, lowered so that one program of ``num_warps`` warps fits an SM's 65536 registers (a
    16-warp program gets at most 128 per thread); a program that does not fit cannot launch."""
    return min(limit, REGISTER_FILE // (32 * num_warps))


def register_limit(*, backward: bool, gate: str) -> int:
    """The per-thread register limit handed to ptxas.

    An explicit limit: without one, ptxas may spill a few registers to reach an occupancy of its own
    choosing. 128 keeps two 8-warp programs (16 warps) resident per SM, and every forward and softmax
    backward tile fits it; the backward of a gate that reads a context (the attention gate) also keeps
    its ``dC`` partial and the ``C`` term of ``dH`` live, so it gets the whole register file instead
    (its occupancy is listed by ``python -m bench.occupancy``). ``tests/test_compile.py`` checks that
    nothing spills.
    """
    return 255 if backward and gate in CONTEXT_GATES else 128


@functools.lru_cache(maxsize=16)
def max_persistent_programs(device: torch.device) -> int:
    """Upper bound on backward programs; each owns one fp32 ``[T, D]`` slot of the dC workspace."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8
