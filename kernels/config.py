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

MAX_EXPERTS = 256
MAX_TASKS = 16
MAX_ROWS = 64
MIN_BLOCK_D = 16
FORWARD_TILE = 8192
BACKWARD_TILE = 4096
ELEMENTS_PER_THREAD = 16
REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class TileConfig:
    """Block sizes of one kernel launch; ``single_chunk`` means the tile spans all of D."""

    block_t: int
    block_e: int
    block_d: int
    rows: int
    num_warps: int
    single_chunk: bool


@functools.lru_cache(maxsize=1024)
def tile_config(num_experts: int, dim: int, num_tasks: int, backward: bool) -> TileConfig:
    """Pick the tile for ``E`` experts, width ``D`` and ``T`` tasks.

    All experts sit in one tile (the softmax runs over them in registers); D is chunked only when
    ``BLOCK_E * D`` exceeds the budget; spare budget packs several rows per program so that short
    rows (small ``E * D``) still move enough bytes per program to saturate memory bandwidth.
    """
    budget = BACKWARD_TILE if backward else FORWARD_TILE
    block_e = triton.next_power_of_2(num_experts)
    block_d = min(triton.next_power_of_2(dim), max(MIN_BLOCK_D, budget // block_e))
    rows = max(1, min(MAX_ROWS, budget // (block_e * block_d)))
    tile = rows * block_e * block_d
    num_warps = max(1, min(8, tile // (32 * ELEMENTS_PER_THREAD)))
    return TileConfig(
        block_t=triton.next_power_of_2(num_tasks),
        block_e=block_e,
        block_d=block_d,
        rows=rows,
        num_warps=num_warps,
        single_chunk=block_d >= dim,
    )


@functools.lru_cache(maxsize=16)
def max_persistent_programs(device: torch.device) -> int:
    """Upper bound on backward programs; each owns one fp32 ``[T, D]`` slot of the dC workspace."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8
