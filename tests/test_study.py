"""The gate study: its decision rules, the shared training loop, and a quick end-to-end run of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_gate as fg
from fused_gate.apps import study
from fused_gate.apps.synthetic import cosine_task_weights, make_tasks
from fused_gate.apps.training import History, evaluate, train
from fused_gate.kernels import INTERPRETED

ROOT = Path(__file__).resolve().parents[1]


def test_verdict_compares_the_difference_of_means_with_two_standard_errors():
    softmax = [1.0, 1.1, 0.9, 1.0, 1.0]
    assert study.verdict([0.5, 0.6, 0.4, 0.5, 0.5], softmax)[2] == "better"
    assert study.verdict([1.5, 1.6, 1.4, 1.5, 1.5], softmax)[2] == "worse"
    d, se, word = study.verdict([1.05, 1.15, 0.95, 1.05, 1.05], softmax)
    assert word == "tie" and d == pytest.approx(0.05) and se == pytest.approx((2 * 0.005 / 5) ** 0.5)


def test_choose_lr_reports_a_winner_on_the_grid_edge():
    assert study.choose_lr({1e-3: 2.0, 1e-2: 1.0, 1e-1: 3.0}) == (1e-2, 0)
    assert study.choose_lr({1e-3: 0.5, 1e-2: 1.0, 1e-1: 3.0}) == (1e-3, -1)
    assert study.choose_lr({1e-3: 2.0, 1e-2: 1.0, 1e-1: 0.5}) == (1e-1, 1)


def test_a_diverged_sweep_run_scores_infinity():
    finite = History(steps=[10], mse=[[1.0, 3.0]])
    diverged = History(steps=[10], mse=[[float("nan"), 1.0]])
    assert study.sweep_score([study.Outcome(None, finite, [])]) == 2.0
    assert study.sweep_score([study.Outcome(None, finite, []), study.Outcome(None, diverged, [])]) == float("inf")


@pytest.mark.parametrize(
    ("lr", "direction", "expected"), [(1e-3, -1, 3e-4), (3e-4, -1, 1e-4), (1e-1, 1, 3e-1), (3e-1, 1, 1.0)]
)
def test_the_grid_widens_by_half_decades(lr, direction, expected):
    assert study._neighbour_lr(lr, direction) == pytest.approx(expected)


def test_cosine_task_weights_have_the_requested_cosines():
    cosines = torch.tensor(study.PAIRED_COSINES, dtype=torch.float64)
    w = cosine_task_weights(100, cosines, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w @ w.T, cosines)
    x, y = make_tasks(300, 100, cosines, torch.Generator().manual_seed(0))
    assert x.shape == (300, 100) and y.shape == (300, 4)


@pytest.mark.parametrize(
    ("cosines", "message"),
    [
        ([[1.0, 0.5], [0.4, 1.0]], "symmetric"),
        ([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]], "positive semi-definite"),
        ([1.0, 0.5], "square"),
    ],
)
def test_cosine_task_weights_reject_a_bad_matrix(cosines, message):
    with pytest.raises(ValueError, match=message):
        cosine_task_weights(10, torch.tensor(cosines), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("gate", fg.layers.GATES)
def test_early_stopping_keeps_the_best_weights(gate):
    x, y = make_tasks(256, 8, 0.5, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = fg.MMoE(8, 3, 4, 2, gate=gate, tower_hidden=4)
    history = train(
        model, x[:192], y[:192], x[192:], y[192:], steps=16, batch_size=16, lr=1.0, eval_every=2, seed=0, patience=2
    )
    assert history.steps[-1] < 16 and len(history.steps) - 1 - history.best == 2  # stopped by the patience
    mse, entropy = evaluate(model, x[192:], y[192:])
    torch.testing.assert_close(torch.tensor(mse), torch.tensor(history.best_mse))
    assert all(0.0 <= e <= 1.0 + 1e-6 for e in entropy)


@pytest.mark.skipif(not INTERPRETED, reason="the refusal concerns Triton's interpreter on the CPU")
def test_study_refuses_to_train_through_the_interpreter():
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        study.main(["--quick"])


def test_quick_study_end_to_end(tmp_path):
    """The CLI as a user runs it on the CPU: without the interpreter, so the gates run the reference."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fused_gate.apps.study", "--quick", "--four-tasks", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["setting"], r["task"]) for r in rows] == [("p = 0.5", 1), ("p = 0.5", 2)] + [
        ("4 tasks, 16 experts", t) for t in range(1, 5)
    ]
    for row in rows:
        assert row["verdict"] in {"better", "tie", "worse"}
        assert len(row["softmax_test_mse"]) == len(row["attention_test_mse"]) == 2
        assert row["softmax_lr"] > 0 and row["attention_lr"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| p = 0.5 | 2 |" in table and "| 4 tasks, 16 experts | 4 |" in table
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    assert (tmp_path / "gate_entropy.png").stat().st_size > 0
    assert "[" + "#" * 30 + "]" in done.stderr  # the progress bar, full at the end
