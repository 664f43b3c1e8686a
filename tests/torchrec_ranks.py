"""TorchRec child program: the TorchRec app's model trained by 2 gloo ranks under DistributedModelParallel.

    TRITON_INTERPRET=1 python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.torchrec_ranks OUT

For each over-arch in ``MODELS`` each rank builds the app's model with the mixed plan (a table-wise, a
row-wise, a column-wise and a data-parallel table) at tiny shapes and takes one step on its half of batch 0;
rank 0 also runs the whole, unsharded model on the whole batch. Then the app's training loop runs its steps.
Each rank saves what ``tests/test_torchrec.py`` compares to ``OUT.rank<r>``: the gradients of the parameters
outside the fused optimizer (dense arch, over-arch, the replicated table), the parameters after training,
and its shards of every table (with their row and column offsets) before training, after the first step
and at the end. Where TorchRec cannot be imported, each rank writes the error to ``OUT.unavailable`` instead.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

import fused_gate as fg
from fused_gate.apps.torchrec import build, make_data, make_model, parse_args, split_parameters, train, train_step

SHAPES = [
    "--sharding", "mixed", "--steps", "2", "--eval-every", "2", "--batch-size", "8", "--features", "4",
    "--dense-features", "3", "--num-embeddings", "10", "--embedding-dim", "8", "--experts", "3",
    "--expert-hidden", "4", "--tower-hidden", "2",
]  # fmt: skip
MODELS = {
    "mmoe_attention": ["--over-arch", "mmoe", "--gate", "attention"],
    "ple_softmax": ["--over-arch", "ple", "--gate", "softmax"],
}

Shard = tuple[int, int, torch.Tensor]  # row offset, column offset, values


def local_tables(model: torch.nn.Module) -> dict[str, list[Shard]]:
    """This rank's shards of every table (its replica of a data-parallel one), copied."""
    tables = {}
    from fused_gate.apps.torchrec_model import SPARSE_MODULE

    for name, value in model.state_dict().items():
        if not name.startswith(f"{SPARSE_MODULE}."):
            continue
        if hasattr(value, "local_shards"):
            shards = [(*s.metadata.shard_offsets, s.tensor.detach().clone()) for s in value.local_shards()]
        else:
            shards = [(0, 0, value.detach().clone())]
        tables[name] = shards
    return tables


def run_model(argv: list[str], rank: int, world: int) -> dict:
    args = parse_args(SHAPES + argv)
    device = torch.device("cpu")
    model, optimizer = build(args, world, device)
    data = make_data(args)
    saved = {"kernels": fg.uses_kernels(torch.empty(0)), "tables_before": local_tables(model)}

    batch = data.batch(0, args.batch_size)
    train_step(model, optimizer, batch.rows(rank, world))
    dense, replicated = split_parameters(model)
    saved["grads"] = {name: p.grad.clone() for name, p in {**dense, **replicated}.items()}
    saved["tables_step1"] = local_tables(model)
    if rank == 0:
        single = make_model(args)
        saved["single_parameters"] = {name: p.detach().clone() for name, p in single.named_parameters()}
        logits = single(batch.dense, batch.features())
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        loss.mean(0).sum().backward()
        saved["single_grads"] = {name: p.grad.clone() for name, p in single.named_parameters()}

    saved["history"] = train(args, model, optimizer, data, rank, world, device)
    saved["parameters"] = {name: p.detach().clone() for name, p in {**dense, **replicated}.items()}
    saved["tables_after"] = local_tables(model)
    return saved


def main(out: str) -> None:
    try:
        import torchrec  # noqa: F401
    except ImportError as error:  # the test skips, with this reason
        with open(f"{out}.unavailable", "w") as file:
            file.write(str(error))
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.save({name: run_model(argv, rank, world) for name, argv in MODELS.items()}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
