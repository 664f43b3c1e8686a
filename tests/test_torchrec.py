"""TorchRec: the TorchRec app's model under DistributedModelParallel on 2 gloo processes (CPU).

The ranks run in a child program (``tests/torchrec_ranks.py``) launched by ``torch.distributed.run`` in a
session of its own, killed whole on timeout. With ``TRITON_INTERPRET=1`` the over-arch's gates run the
Triton kernels, interpreted. Both over-arch kinds (MMoE with the attention gate, PLE with the softmax gate)
train with the mixed plan, so every sharding type is exercised: a table-wise, a row-wise, a column-wise
and a data-parallel table. Without TorchRec (``bash scripts/dev.sh`` installs it) these tests skip. The
app's argument checks and its AUC need no TorchRec.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_gate.apps import torchrec as app

from .torchrec_ranks import MODELS

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], str]:
    """Each rank's saved results, and the log of the run."""
    out = tmp_path_factory.mktemp("torchrec") / "ranks"
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    child = subprocess.Popen(
        [*command, "-m", "tests.torchrec_ranks", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = child.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        log, _ = child.communicate()
        pytest.fail(f"the TorchRec ranks did not finish in 300 s:\n{log[-3000:]}")
    unavailable = Path(f"{out}.unavailable")
    if unavailable.exists():
        pytest.skip(f"TorchRec cannot be imported ({unavailable.read_text()}); bash scripts/dev.sh installs it")
    assert child.returncode == 0, f"the TorchRec ranks failed:\n{log[-5000:]}"
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(WORLD)], log


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_training_runs_and_reports(ranks, name):
    saved, log = ranks
    history = saved[0][name]["history"]
    assert saved[0][name]["kernels"], "the gates ran the reference, not the (interpreted) kernels"
    assert history.steps == [2]
    assert all(math.isfinite(loss) and loss > 0 for loss in history.loss[0])
    assert all(0 <= auc <= 1 for auc in history.auc[0])
    assert saved[1][name]["history"].auc == history.auc  # every rank gathers every rank's rows
    assert f"step     2  loss  task 1 {history.loss[0][0]:.4f}" in log


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_single_process(ranks, name):
    """Dense arch, over-arch and the replicated table: the 2 ranks on half batches hold the gradients of
    one process on the whole batch (the all-reduce leaves both ranks the same bits)."""
    rank0, rank1 = (saved[name] for saved in ranks[0])
    single = rank0["single_grads"]
    assert set(rank0["grads"]) == set(single) - {f"sparse_arch.embedding_bags.t{i}.weight" for i in range(3)}
    for key, grad in rank0["grads"].items():
        torch.testing.assert_close(grad, rank1["grads"][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(grad, single[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sum(g.abs().sum() for g in single.values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_dense_parameters_identical_across_ranks(ranks, name):
    rank0, rank1 = (saved[name]["parameters"] for saved in ranks[0])
    assert rank0.keys() == rank1.keys()
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key


def _rowwise_adagrad_step(weight: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One step of row-wise Adagrad from a zero state: each row moves by ``lr * g / sqrt(mean(g**2))``."""
    return weight - lr * grad / (grad.square().mean(1, keepdim=True).sqrt() + 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_embedding_shards_follow_the_whole_model(ranks, name):
    """Each rank holds the plan's shards; after one step each shard is one row-wise Adagrad step of the whole
    model's gradient on the whole batch (taken on the shard's rows and columns); training changes them all."""
    rank0 = ranks[0][0][name]
    weights, grads = rank0["single_parameters"], rank0["single_grads"]
    lr = app.parse_args([]).embedding_lr
    expected_shards = {0: {"t0": 1, "t1": 1, "t2": 1, "t3": 1}, 1: {"t1": 1, "t2": 1, "t3": 1}}
    for rank, saved in enumerate(ranks[0]):
        held = {key.split(".")[-2]: len(shards) for key, shards in saved[name]["tables_before"].items() if shards}
        assert held == expected_shards[rank]
        for key, shards in saved[name]["tables_step1"].items():
            for row, col, shard in shards:
                rows, cols = slice(row, row + shard.shape[0]), slice(col, col + shard.shape[1])
                expected = _rowwise_adagrad_step(weights[key][rows, cols], grads[key][rows, cols], lr)
                torch.testing.assert_close(shard, expected, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {key}")
        for key, before in saved[name]["tables_before"].items():
            for (_, _, old), (_, _, new) in zip(before, saved[name]["tables_after"][key], strict=True):
                assert not torch.equal(old, new), f"rank {rank}: a shard of {key} was not trained"


def test_auc_counts_pairs():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=gen).float()  # many ties
    labels = torch.randint(0, 2, (60,), generator=gen).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert app.auc(scores, labels) == pytest.approx(pairs.mean().item(), abs=1e-12)
    assert math.isnan(app.auc(scores, torch.ones(60)))


@pytest.mark.parametrize(
    ("argv", "world", "message"),
    [
        (["--steps", "0"], 1, "argument --steps: expected a positive integer, got '0'"),
        (["--lr", "nan"], 1, "argument --lr: expected a positive number, got 'nan'"),
        (["--sharding", "grid"], 1, "argument --sharding: invalid choice: 'grid'"),
        (["--batch-size", "7"], 2, "--batch-size must be a multiple of the number of processes (2), got 7"),
        (["--embedding-dim", "6"], 1, "--embedding-dim must be a multiple of 4"),
        (["--embedding-dim", "12", "--sharding", "column_wise"], 8, "--embedding-dim must be a multiple of 8"),
        (["--num-embeddings", "3", "--sharding", "row_wise"], 4, "--num-embeddings must be at least 4, got 3"),
        pytest.param(
            ["--device", "cuda"],
            1,
            "--device cuda: no GPU is visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
    ],
)
def test_rejects_bad_arguments(argv, world, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(argv)
    assert exit_info.value.code == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("python -m fused_gate.apps.torchrec: error: ") and message in error


def test_help_and_parsing_need_no_torchrec(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchrec", None)  # any import of it fails
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--sharding" in capsys.readouterr().out
    args = app.parse_args(["--gate", "softmax", "--over-arch", "ple"])
    assert isinstance(args, argparse.Namespace) and args.sharding == "mixed"
    with pytest.raises(SystemExit, match=r"TorchRec cannot be imported .*scripts/dev\.sh"):
        app.main(["--steps", "1"])
