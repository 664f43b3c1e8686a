"""A multi-task CTR model for TorchRec with a fused-gate over-arch, its synthetic batches and sharding plans.

``MultiTaskCTR``: sparse features pooled by an ``EmbeddingBagCollection`` (one table per feature, sum
pooling), dense features through a ``Linear -> ReLU`` dense arch of the same width, both concatenated
into an :class:`fused_gate.MMoE` or :class:`fused_gate.PLE` over-arch whose towers are the per-task heads
(one click logit per task).

``SyntheticCTR`` draws ``KeyedJaggedTensor`` batches whose labels follow a hidden logistic model, so a
model can learn them (the AUC rises above 0.5). Every rank draws the same global batch from the step's
seed and keeps its own rows: ``world`` processes on ``B / world`` rows see the batch of one process on B.

``sharding_plan`` places every table by one sharding type, or by a mixed plan that cycles through the
four. Tables of the sharded types get TorchRec's ``fused`` compute kernel, which runs the optimizer
attached by ``apply_optimizer_in_backward`` inside the backward; the ``dense`` kernel, which the helpers
pick on a CPU when the optimizer is attached after the plan is made, drops that optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan

import fused_gate as fg
from fused_gate.apps.torchrec import OVER_ARCHS, PLANS, SHARDINGS

SPARSE_MODULE = "sparse_arch"  # the EmbeddingBagCollection's name in MultiTaskCTR, which the plan refers to


def make_tables(num_features: int, num_embeddings: int, embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One ``[num_embeddings, embedding_dim]`` table per sparse feature: table ``t<i>`` pools feature ``f<i>``."""
    return [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=embedding_dim, num_embeddings=num_embeddings, feature_names=[f"f{i}"]
        )
        for i in range(num_features)
    ]


class MultiTaskCTR(nn.Module):
    """Sparse and dense features into a fused-gate over-arch with one head per task.

    ``forward(dense [B, num_dense], sparse: KeyedJaggedTensor)`` returns the click logits ``[B, T]``: the
    pooled embeddings ``[B, F * D]`` (``D = embedding_dim``) and the dense arch's output ``[B, D]`` are
    concatenated into the over-arch's input ``[B, (F + 1) * D]``.

    Args:
        tables: the sparse features' tables, all of one ``embedding_dim``.
        num_dense: width of the dense features.
        num_tasks: T, the number of tasks (heads).
        over_arch: ``"mmoe"`` (``experts`` experts) or ``"ple"`` (two CGC levels, one shared expert and one
            expert per task in each).
        gate: the over-arch's gate, ``"attention"`` or ``"softmax"``.
        experts: E for the MMoE over-arch.
        expert_hidden: the experts' widths.
        tower_hidden: each task's head, ``tower_hidden -> 1``.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        num_dense: int,
        num_tasks: int,
        *,
        over_arch: str = "mmoe",
        gate: str = "attention",
        experts: int = 4,
        expert_hidden: int | Sequence[int] = 32,
        tower_hidden: int | Sequence[int] = 16,
    ) -> None:
        super().__init__()
        if over_arch not in OVER_ARCHS:
            raise ValueError(f"over_arch must be one of {OVER_ARCHS}, got {over_arch!r}")
        dims = {table.embedding_dim for table in tables}
        if len(dims) != 1:
            raise ValueError(f"tables must share one embedding_dim, got {sorted(dims)}")
        (dim,) = dims
        self.sparse_arch = EmbeddingBagCollection(tables=list(tables))
        self.dense_arch = nn.Sequential(nn.Linear(num_dense, dim), nn.ReLU())
        in_features = (len(tables) + 1) * dim
        if over_arch == "mmoe":
            self.over_arch = fg.MMoE(
                in_features, experts, expert_hidden, num_tasks, gate=gate, tower_hidden=tower_hidden
            )
        else:
            self.over_arch = fg.PLE(
                in_features, num_tasks, 1, 1, expert_hidden, num_levels=2, gate=gate, tower_hidden=tower_hidden
            )

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        """Click logits ``[B, T]``."""
        pooled = self.sparse_arch(sparse).values()
        return self.over_arch(torch.cat([self.dense_arch(dense), pooled], dim=1))


@dataclass
class Batch:
    """A batch of B rows: ``dense [B, num_dense]``, the sparse ids ``ids [B, F, max_ids]`` of which the first
    ``lengths [B, F]`` per row and feature are present, and ``labels [B, T]`` (0. or 1.)."""

    dense: Tensor
    ids: Tensor
    lengths: Tensor
    labels: Tensor

    def features(self) -> KeyedJaggedTensor:
        """The sparse ids as a ``KeyedJaggedTensor`` with keys ``f0 .. f{F-1}`` (lengths feature-major)."""
        present = torch.arange(self.ids.shape[2], device=self.ids.device) < self.lengths[..., None]
        return KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{i}" for i in range(self.ids.shape[1])],
            values=self.ids.transpose(0, 1)[present.transpose(0, 1)],
            lengths=self.lengths.T.reshape(-1),
        )

    def rows(self, rank: int, world: int) -> Batch:
        """Rank ``rank``'s contiguous ``B / world`` rows."""
        size = self.dense.shape[0] // world
        rows = slice(rank * size, (rank + 1) * size)
        return Batch(self.dense[rows], self.ids[rows], self.lengths[rows], self.labels[rows])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.dense.to(device), self.ids.to(device), self.lengths.to(device), self.labels.to(device))


class SyntheticCTR:
    """Clicks for T related tasks from a hidden logistic model of F multi-hot sparse features and dense ones.

    Each feature holds 0 to ``max_ids`` ids drawn uniformly from ``num_embeddings``; id ``i`` of feature ``f``
    adds ``effect[f, i, t]`` to task t's logit (the mean over the row's ids of that feature), with
    ``effect = sqrt(rho) * shared + sqrt(1 - rho) * own`` (standard normal draws, ``rho = correlation``), and the
    dense features ``x ~ N(0, I)`` add ``x @ weight[:, t]``. The label is ``Bernoulli(sigmoid(logit - 1))``.
    Batch ``index`` is drawn from its own seed, so every process draws the same batch.
    """

    def __init__(
        self,
        num_features: int,
        num_embeddings: int,
        num_dense: int,
        num_tasks: int,
        *,
        max_ids: int = 3,
        correlation: float = 0.5,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        shared = torch.randn(num_features, num_embeddings, 1, generator=gen)
        own = torch.randn(num_features, num_embeddings, num_tasks, generator=gen)
        self.effect = correlation**0.5 * shared + (1 - correlation) ** 0.5 * own
        self.weight = torch.randn(num_dense, num_tasks, generator=gen) / num_dense**0.5
        self.num_features, self.num_embeddings, self.num_dense = num_features, num_embeddings, num_dense
        self.max_ids, self.seed = max_ids, seed

    def batch(self, index: int, batch_size: int) -> Batch:
        """Batch number ``index`` (any int; the evaluation set uses negative ones) of ``batch_size`` rows."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        dense = torch.randn(batch_size, self.num_dense, generator=gen)
        ids = torch.randint(0, self.num_embeddings, (batch_size, self.num_features, self.max_ids), generator=gen)
        lengths = torch.randint(0, self.max_ids + 1, (batch_size, self.num_features), generator=gen)
        present = torch.arange(self.max_ids) < lengths[..., None]  # [B, F, max_ids]
        features = torch.arange(self.num_features)[:, None]
        effects = self.effect[features, ids] * present[..., None]  # [B, F, max_ids, T]
        logit = (effects.sum(2) / lengths.clamp_min(1)[..., None]).sum(1) + dense @ self.weight - 1.0
        labels = torch.bernoulli(torch.sigmoid(logit), generator=gen)
        return Batch(dense, ids, lengths, labels)


def _placement(kind: str, table: int, world: int) -> Callable:
    """TorchRec's parameter sharding generator for one table; the sharded kinds run the fused kernel."""
    if kind == "table_wise":
        return table_wise(rank=table % world, compute_kernel="fused")
    if kind == "row_wise":
        return row_wise(compute_kernel="fused")
    if kind == "column_wise":
        return column_wise(ranks=list(range(world)), compute_kernel="fused")
    return data_parallel()


def table_shardings(plan: str, num_tables: int) -> tuple[str, ...]:
    """The sharding type of each table under ``plan`` (one of ``PLANS``)."""
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    return tuple(SHARDINGS[i % len(SHARDINGS)] if plan == "mixed" else plan for i in range(num_tables))


def sharding_plan(model: MultiTaskCTR, plan: str, world: int, device_type: str) -> ShardingPlan:
    """A ``ShardingPlan`` for ``model``'s tables over ``world`` ranks: ``plan`` is one of ``PLANS``.

    ``table_wise`` puts table i on rank ``i % world``; ``row_wise`` splits every table's rows over the ranks;
    ``column_wise`` splits its columns over the ranks (``embedding_dim`` divisible by ``world``; TorchRec cuts
    shards of a multiple of 4 columns, so fewer than ``world`` where ``embedding_dim / world`` is not one);
    ``data_parallel`` replicates it on every rank (the gradients are all-reduced and
    a dense optimizer steps it); ``mixed`` gives table i the type ``SHARDINGS[i % 4]``.
    """
    tables = model.sparse_arch.embedding_bag_configs()
    kinds = table_shardings(plan, len(tables))
    per_table = {
        table.name: _placement(kind, i, world) for i, (table, kind) in enumerate(zip(tables, kinds, strict=True))
    }
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    module_plan = construct_module_sharding_plan(
        model.sparse_arch, per_table, local_size=local_size, world_size=world, device_type=device_type
    )
    return ShardingPlan({SPARSE_MODULE: module_plan})
