"""Data-parallel child program: 2 gloo ranks train one step of each layer in ``tests/models.py``.

    TRITON_INTERPRET=1 python -m tests.ddp OUT

Each rank builds the same model (same seed), wraps it in DDP, and runs forward + backward on its half
of one batch; then the same with FSDP2 (``fully_shard`` on every experts module and on the layer: the
parameters are sharded over the ranks and gathered for each forward and backward); rank 0 also runs the
whole batch in a plain, single-process model. Each rank saves its gradients (FSDP2's gathered whole) to
``OUT.rank<r>`` for ``tests/test_distributed.py`` to compare. It runs in its own process
(started with a timeout by the test) so that a stuck collective can never hang the test session, and
every collective has a timeout of its own.
"""

from __future__ import annotations

import datetime
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from fused_gate.experts import Experts

from .models import LAYERS, loss_step

WORLD = 2
BATCH = 8


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with FSDP2: each experts module is a unit of its own (PLE: one per level), the rest the root's."""
    for module in model.modules():
        if isinstance(module, Experts):
            fully_shard(module)
    return fully_shard(model)


def worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        x = torch.randn(BATCH, 10, generator=torch.Generator().manual_seed(1))
        mine = x.chunk(WORLD)[rank]
        grads = {}
        for name, make in LAYERS.items():
            torch.manual_seed(0)
            _, grads[name] = loss_step(DistributedDataParallel(make()), mine)
            torch.manual_seed(0)
            _, fsdp = loss_step(sharded(make()), mine)
            grads[f"{name}/fsdp2"] = [grad.full_tensor() for grad in fsdp]
            if rank == 0:
                torch.manual_seed(0)
                _, grads[f"{name}/single"] = loss_step(make(), x)
        torch.save(grads, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(str(Path(tmp) / "init"), out), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main(sys.argv[1])
