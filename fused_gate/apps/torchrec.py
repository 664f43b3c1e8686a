"""TorchRec: a multi-task CTR model with a fused-gate over-arch, trained under DistributedModelParallel.

    python -m torch.distributed.run --nproc-per-node 2 -m fused_gate.apps.torchrec \\
        [--sharding mixed] [--over-arch mmoe|ple] [--gate attention|softmax] [--steps 300] [--batch-size 256]

The sparse features' tables live in an ``EmbeddingBagCollection`` sharded by the chosen plan
(``table_wise``, ``row_wise``, ``column_wise``, ``data_parallel``, or ``mixed``: one table of each);
the dense arch and the over-arch (``fused_gate.MMoE`` or ``fused_gate.PLE``, one head per task) are
data-parallel: ``DistributedModelParallel`` wraps them in ``DistributedDataParallel``. Every step each
process trains on its ``batch-size / processes`` rows of a synthetic ``KeyedJaggedTensor`` batch
(``fused_gate.apps.torchrec_model.SyntheticCTR``): binary cross-entropy per task, summed. The sharded
tables are stepped inside the backward by row-wise Adagrad (TorchRec's fused kernel); the replicated
(data-parallel) tables by the same optimizer after the all-reduce; the dense parameters by Adam.
Process 0 prints a progress bar, and every ``--eval-every`` steps each task's training loss (mean over
the steps since the last line, over all processes) and its AUC on a held-out set of 4 batches.

Every process builds the whole model from ``--seed`` and copies its shards of the tables in, so every
plan and every number of processes starts from the same weights and sees the same batches. Run without
``torch.distributed.run`` it trains as one process. On a GPU each process uses the GPU of its local rank
(NCCL); on a CPU, gloo. The gates run the Triton kernels on a GPU, and on a CPU the plain-PyTorch
reference (or the kernels through Triton's interpreter with ``TRITON_INTERPRET=1``, slowly).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from fused_gate.layers import LAYER_GATES

if TYPE_CHECKING:  # TorchRec takes seconds to import: the app imports it after parsing, so --help answers at once
    import torch
    from torch import Tensor, nn
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.keyed import CombinedOptimizer

    from fused_gate.apps.torchrec_model import Batch, MultiTaskCTR, SyntheticCTR

SHARDINGS = ("table_wise", "row_wise", "column_wise", "data_parallel")
PLANS = (*SHARDINGS, "mixed")  # "mixed": table i is placed by SHARDINGS[i % 4]
OVER_ARCHS = ("mmoe", "ple")
OVER_ARCH_NAMES = {"mmoe": "MMoE", "ple": "PLE"}
EVAL_BATCHES = 4
INSTALL = (
    "bash scripts/dev.sh installs it on a CPU; elsewhere pip install '.[torchrec]', then TorchRec 1.8.0 and "
    "the fbgemm 1.8.0 build for your device with --no-deps (docs/torchrec.md)"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Errors are one line (the usage is long): the message, and where the options are listed."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _world_size() -> int:
    """The number of processes ``torch.distributed.run`` started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The app's options, checked against each other and against the number of processes (exit 2 if wrong)."""
    parser = _Parser(
        prog="python -m fused_gate.apps.torchrec",
        description=__doc__.split("\n\n")[0],
        epilog="N processes: python -m torch.distributed.run --nproc-per-node N -m fused_gate.apps.torchrec [options]",
    )
    parser.add_argument(
        "--sharding",
        choices=PLANS,
        default="mixed",
        help="how the tables are placed (mixed: table i gets the i-th of the other four, cyclically)",
    )
    parser.add_argument("--over-arch", choices=OVER_ARCHS, default="mmoe", help="fused_gate.MMoE or fused_gate.PLE")
    parser.add_argument("--gate", choices=LAYER_GATES, default="attention", help="the over-arch's gate")
    parser.add_argument("--steps", type=_positive_int, default=300)
    parser.add_argument(
        "--batch-size", type=_positive_int, default=256, help="rows per step over all processes (a multiple of N)"
    )
    parser.add_argument("--tasks", type=_positive_int, default=2)
    parser.add_argument("--features", type=_positive_int, default=4, help="sparse features, one table each")
    parser.add_argument("--dense-features", type=_positive_int, default=8)
    parser.add_argument("--num-embeddings", type=_positive_int, default=1000, help="rows per table")
    parser.add_argument("--embedding-dim", type=_positive_int, default=16, help="a multiple of 4")
    parser.add_argument("--experts", type=_positive_int, default=4, help="experts of the MMoE over-arch")
    parser.add_argument("--expert-hidden", type=_positive_int, default=32)
    parser.add_argument("--tower-hidden", type=_positive_int, default=16)
    parser.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam's learning rate (dense parameters)")
    parser.add_argument(
        "--embedding-lr", type=_positive_float, default=0.05, help="row-wise Adagrad's learning rate (tables)"
    )
    parser.add_argument("--eval-every", type=_positive_int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch  # already imported with the package

        if not torch.cuda.is_available():
            parser.error("--device cuda: no GPU is visible")
    world = _world_size()
    if args.batch_size % world:
        parser.error(f"--batch-size must be a multiple of the number of processes ({world}), got {args.batch_size}")
    if args.embedding_dim % 4:
        parser.error(f"--embedding-dim must be a multiple of 4 (for fbgemm's kernels), got {args.embedding_dim}")
    if args.sharding in ("column_wise", "mixed") and args.embedding_dim % world:
        parser.error(
            f"--sharding {args.sharding} splits each table's columns over the {world} processes: "
            f"--embedding-dim must be a multiple of {world}, got {args.embedding_dim}"
        )
    if args.sharding in ("row_wise", "mixed") and args.num_embeddings < world:
        parser.error(
            f"--sharding {args.sharding} splits each table's rows over the {world} processes: "
            f"--num-embeddings must be at least {world}, got {args.num_embeddings}"
        )
    return args


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores [N]`` for ``labels [N]`` (1. positive, 0. negative).

    The probability that a random positive scores above a random negative, ties counting one half
    (Mann-Whitney: ``(sum of the positives' ranks - P (P + 1) / 2) / (P N)`` with tied scores sharing their
    mean rank); NaN unless both classes are present.
    """
    import torch

    positive = labels > 0.5
    num_pos = int(positive.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    sorted_scores, order = scores.double().sort()
    _, group, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, averaged over ties
    ranks = torch.empty_like(sorted_scores)
    ranks[order] = mean_rank[group]
    return ((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)).item()


def make_model(args: argparse.Namespace) -> MultiTaskCTR:
    """The whole, unsharded model, its weights drawn from ``args.seed``."""
    import torch

    from fused_gate.apps.torchrec_model import MultiTaskCTR, make_tables

    torch.manual_seed(args.seed)
    return MultiTaskCTR(
        make_tables(args.features, args.num_embeddings, args.embedding_dim),
        args.dense_features,
        args.tasks,
        over_arch=args.over_arch,
        gate=args.gate,
        experts=args.experts,
        expert_hidden=args.expert_hidden,
        tower_hidden=args.tower_hidden,
    )


def make_data(args: argparse.Namespace) -> SyntheticCTR:
    """The synthetic batches for ``args``' features and tasks, drawn from ``args.seed``."""
    from fused_gate.apps.torchrec_model import SyntheticCTR

    return SyntheticCTR(args.features, args.num_embeddings, args.dense_features, args.tasks, seed=args.seed)


def build(
    args: argparse.Namespace, world: int, device: torch.device
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """The sharded model and its optimizer; the process group must be initialised.

    The model is built whole from ``args.seed``; row-wise Adagrad is attached to its tables before the plan
    is made, and every process then copies its shards of the seeded tables in.
    """
    import torch
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from fused_gate.apps.torchrec_model import sharding_plan

    model = make_model(args)
    tables = {name: weight.detach().clone() for name, weight in model.sparse_arch.state_dict().items()}
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": args.embedding_lr})
    plan = sharding_plan(model, args.sharding, world, device.type)
    sharded = DistributedModelParallel(model, device=device, plan=plan)
    copy_into_shards(sharded, tables)
    dense, replicated = split_parameters(sharded)
    optimizers = [sharded.fused_optimizer, KeyedOptimizerWrapper(dense, lambda p: torch.optim.Adam(p, lr=args.lr))]
    if replicated:
        optimizers.append(KeyedOptimizerWrapper(replicated, lambda p: RowWiseAdagrad(p, lr=args.embedding_lr)))
    return sharded, CombinedOptimizer(optimizers)


def copy_into_shards(model: DistributedModelParallel, tables: dict[str, Tensor]) -> None:
    """Copy each whole table (``tables``: ``embedding_bags.<name>.weight -> [rows, dim]``) into this process's
    shards of it (row and column offsets from the shard metadata), or into its replica."""
    import torch

    from fused_gate.apps.torchrec_model import SPARSE_MODULE

    state = model.state_dict()
    with torch.no_grad():
        for key, whole in tables.items():
            target = state[f"{SPARSE_MODULE}.{key}"]
            if not hasattr(target, "local_shards"):  # a data-parallel replica
                target.copy_(whole)
                continue
            for shard in target.local_shards():
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(whole[row : row + rows, col : col + cols])


def split_parameters(model: DistributedModelParallel) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """``(dense, replicated tables)``: the parameters a dense optimizer steps, by name. The sharded tables'
    optimizer runs in the backward, so they are in neither."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from fused_gate.apps.torchrec_model import SPARSE_MODULE

    outside_backward = dict(in_backward_optimizer_filter(model.named_parameters()))
    replicated = {name: p for name, p in outside_backward.items() if name.startswith(f"{SPARSE_MODULE}.")}
    dense = {name: p for name, p in outside_backward.items() if name not in replicated}
    return dense, replicated


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> Tensor:
    """One step on ``batch``: the loss is the sum over tasks of the binary cross-entropy; returns the
    per-task losses ``[T]`` (detached). The gradients stay in ``.grad`` until the next step."""
    from torch.nn.functional import binary_cross_entropy_with_logits

    optimizer.zero_grad(set_to_none=True)
    logits = model(batch.dense, batch.features())
    per_task = binary_cross_entropy_with_logits(logits, batch.labels, reduction="none").mean(0)
    per_task.sum().backward()
    optimizer.step()
    return per_task.detach()


def evaluate(model: nn.Module, batches: list[Batch], world: int) -> list[float]:
    """Each task's AUC over every process's rows of ``batches`` (gathered; all processes get the result)."""
    import torch
    import torch.distributed as dist

    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(batch.dense, batch.features()) for batch in batches])
    model.train()
    labels = torch.cat([batch.labels for batch in batches])
    both = torch.cat([scores, labels], dim=1)
    parts = [torch.empty_like(both) for _ in range(world)]
    dist.all_gather(parts, both)
    everything = torch.cat(parts).cpu()
    tasks = scores.shape[1]
    return [auc(everything[:, t], everything[:, tasks + t]) for t in range(tasks)]


@dataclass
class History:
    """What ``train`` reported at each line: ``loss[i][t]`` (training) and ``auc[i][t]`` after ``steps[i]``."""

    steps: list[int] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    auc: list[list[float]] = field(default_factory=list)


def _tasks(values: list[float]) -> str:
    return "  ".join(f"task {t + 1} {value:.4f}" for t, value in enumerate(values))


def train(
    args: argparse.Namespace,
    model: DistributedModelParallel,
    optimizer: CombinedOptimizer,
    data: SyntheticCTR,
    rank: int,
    world: int,
    device: torch.device,
) -> History:
    """``args.steps`` steps on batches ``1 .. steps`` of ``data`` (this process's rows of each); every
    ``args.eval_every`` steps and after the last, the mean training loss and the held-out AUC per task,
    printed by process 0."""
    import torch.distributed as dist

    from fused_gate.apps.training import Progress

    held_out = [data.batch(-1 - i, args.batch_size).rows(rank, world).to(device) for i in range(EVAL_BATCHES)]
    progress = Progress(args.steps) if rank == 0 else None
    history = History()
    running, since = None, 0
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, data.batch(step, args.batch_size).rows(rank, world).to(device))
        dist.all_reduce(loss)
        loss /= world
        running = loss if running is None else running + loss
        since += 1
        if progress is not None:
            progress.step("loss " + " ".join(f"{value:.3f}" for value in loss.tolist()))
        if step % args.eval_every and step != args.steps:
            continue
        history.steps.append(step)
        history.loss.append((running / since).tolist())
        history.auc.append(evaluate(model, held_out, world))
        running, since = None, 0
        if progress is not None:
            progress.print(f"step {step:>5}  loss  {_tasks(history.loss[-1])}   AUC  {_tasks(history.auc[-1])}")
    return history


def _describe_plan(model: DistributedModelParallel) -> list[str]:
    from fused_gate.apps.torchrec_model import SPARSE_MODULE

    lines = []
    for name, sharding in model.plan.plan[SPARSE_MODULE].items():
        ranks = sorted(set(sharding.ranks))
        where = f"process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        lines.append(f"  table {name}: {sharding.sharding_type} on {where}, {sharding.compute_kernel} kernel")
    return lines


def _quiet_library_notices() -> None:
    """Hide the notices TorchRec 1.8 and torch 2.13 print about each other's internals, which a user cannot act
    on: deprecated arguments TorchRec passes to torch, a cache option that data-parallel tables ignore, and
    fbgemm's dense kernel (data-parallel tables) lacking an autograd registration (its gradients are the
    unsharded model's: ``tests/test_torchrec.py``)."""
    import logging
    import warnings

    for message in (
        "`broadcast_buffers` is deprecated",
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
    ):
        warnings.filterwarnings("ignore", message=message)
    for logger in ("torchrec.distributed.utils", "torch.fx._symbolic_trace"):
        logging.getLogger(logger).setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> History:
    """Set up the process group, build, train, and tear down; returns process 0's history (the others' too)."""
    import torch
    import torch.distributed as dist

    import fused_gate as fg

    _quiet_library_notices()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=10)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # one process, without torch.distributed.run
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, optimizer = build(args, world, device)
        data = make_data(args)
        if rank == 0:
            gates = "Triton kernels" if fg.uses_kernels(torch.empty(0, device=device)) else "plain-PyTorch reference"
            print(
                f"fused_gate TorchRec app: {OVER_ARCH_NAMES[args.over_arch]} over-arch, {args.gate} gate ({gates}); "
                f"{world} process{'es' if world > 1 else ''} ({backend}, {device.type}); {args.steps} steps of "
                f"{args.batch_size} rows; {args.features} tables of {args.num_embeddings} x {args.embedding_dim}, "
                f"plan {args.sharding}:",
                *_describe_plan(model),
                sep="\n",
                flush=True,
            )
        return train(args, model, optimizer, data, rank, world, device)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> History:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import torchrec  # noqa: F401
    except ImportError as error:
        sys.exit(f"python -m fused_gate.apps.torchrec: TorchRec cannot be imported ({error}); {INSTALL}")
    return run(args)


if __name__ == "__main__":
    main()
