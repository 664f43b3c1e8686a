"""The gate study: its decision rules, the training loops (one model, and a stack of models at once), and a quick
end-to-end run of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_gate as fg
import fused_gate.dispatch
import fused_gate.layers
from fused_gate.apps import study
from fused_gate.apps.stacked import train_stacked
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


def test_paired_verdict_uses_the_spread_of_the_per_seed_differences():
    """Seeds that move both gates alike: a tie unpaired, a clear verdict paired."""
    softmax = [1.0, 2.0, 3.0, 4.0]
    attention = [1.1, 2.1, 3.1, 4.2]
    assert study.verdict(attention, softmax)[2] == "tie"
    d, se, word = study.paired_verdict(attention, softmax)
    assert word == "worse" and d == pytest.approx(0.125) and se == pytest.approx(0.025)
    assert study.paired_verdict(softmax, attention)[2] == "better"
    with pytest.raises(ValueError, match="one value of each per seed"):
        study.paired_verdict([1.0, 2.0], [1.0, 2.0, 3.0])


def test_the_summary_counts_verdicts_and_compares_the_halves():
    def row(unpaired, paired, halves):
        verdicts = {"verdict": unpaired, "paired_verdict": paired, "half_verdicts": halves}
        return {"gate": "attention", "against": "softmax"} | verdicts

    rows = [
        row("tie", "worse", ["worse", "worse"]),
        row("tie", "tie", ["better", "worse"]),
        row("worse", "worse", ["tie", "worse"]),
    ]
    assert "| attention - softmax | 0 / 2 / 1 | 0 / 1 / 2 | 1 of 3 | 1 of 3 |" in study.verdict_summary(rows)


@pytest.mark.parametrize(("n", "first", "second"), [(10, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]), (5, [0, 1], [3, 4])])
def test_halves_are_disjoint_seed_sets_of_equal_size(n, first, second):
    assert study.halves(list(range(n))) == (first, second)


def test_choose_lr_reports_a_winner_on_the_grid_edge():
    assert study.choose_lr({1e-3: 2.0, 1e-2: 1.0, 1e-1: 3.0}) == (1e-2, 0)
    assert study.choose_lr({1e-3: 0.5, 1e-2: 1.0, 1e-1: 3.0}) == (1e-3, -1)
    assert study.choose_lr({1e-3: 2.0, 1e-2: 1.0, 1e-1: 0.5}) == (1e-1, 1)


def test_a_diverged_sweep_run_scores_infinity():
    finite = History(steps=[10], mse=[[1.0, 3.0]])
    diverged = History(steps=[10], mse=[[float("nan"), 1.0]])
    run = lambda history: study.Outcome(None, "softmax", 1e-2, 0, "validation", history, [])
    assert study.sweep_score([run(finite)]) == 2.0
    assert study.sweep_score([run(finite), run(diverged)]) == float("inf")


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


def test_history_records_the_best_evaluation_and_stalls_after_patience():
    history = History()
    assert history.record(100, [2.0, 4.0], [0.5, 0.5])
    assert history.record(200, [1.0, 3.0], [0.5, 0.5])
    assert not history.record(300, [2.0, 2.5], [0.5, 0.5])  # mean 2.25 > 2.0
    assert history.best_step == 200 and history.best_mse == [1.0, 3.0]
    assert not history.stalled(2) and history.stalled(1)
    assert not history.record(400, [float("nan"), 1.0], [0.5, 0.5]) and history.stalled(10)


@pytest.mark.parametrize("gate", fg.layers.LAYER_GATES)
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


@pytest.mark.parametrize("gate", fg.layers.LAYER_GATES)
def test_a_stack_trains_each_member_as_train_would_alone(gate, monkeypatch):
    """Members with their own seed, data and learning rate (one that diverges, one that stops early, one that
    runs to the cap) end with the histories and weights that ``train`` gives each alone. The mixes run the
    reference in both, as the stack's vmapped forward does."""
    for module in (fused_gate.dispatch, fused_gate.layers):
        monkeypatch.setattr(module, "uses_kernels", lambda x: False)
    seeds, lrs = [0, 1, 1], [1.0, 0.3, 1e-2]
    data = [make_tasks(160, 8, 0.5, torch.Generator().manual_seed(s)) for s in seeds]
    x, y = (torch.stack([d[i][:128] for d in data]) for i in (0, 1))
    x_eval, y_eval = (torch.stack([d[i][128:] for d in data]) for i in (0, 1))

    def build(seed):
        torch.manual_seed(seed)
        return fg.MMoE(8, 3, 4, 2, gate=gate, tower_hidden=4)

    options = dict(steps=24, batch_size=16, eval_every=3, patience=2)
    models = [build(s) for s in seeds]
    stacked = train_stacked(models, x, y, x_eval, y_eval, lrs=lrs, seeds=seeds, **options)
    assert len({h.steps[-1] for h in stacked}) > 1  # the members stopped at different steps
    for i, (seed, lr) in enumerate(zip(seeds, lrs, strict=True)):
        alone = build(seed)
        history = train(alone, x[i], y[i], x_eval[i], y_eval[i], lr=lr, seed=seed, **options)
        assert stacked[i].steps == history.steps and stacked[i].best == history.best
        torch.testing.assert_close(torch.tensor(stacked[i].mse), torch.tensor(history.mse), rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(models[i].named_parameters(), alone.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_a_stack_rejects_mismatched_members_and_batch_norm():
    models = [fg.MMoE(8, 3, 4, 2, tower_hidden=4) for _ in range(2)]
    x, y = torch.randn(2, 16, 8), torch.randn(2, 16, 2)
    options = dict(steps=2, batch_size=4, eval_every=1, patience=1)
    with pytest.raises(ValueError, match="one model, lr, seed and data set per member"):
        train_stacked(models, x, y, x, y, lrs=[1e-2], seeds=[0, 1], **options)
    with pytest.raises(ValueError, match="without BatchNorm"):
        normed = [fg.MMoE(8, 3, 4, 2, tower_hidden=4, batch_norm=True) for _ in range(2)]
        train_stacked(normed, x, y, x, y, lrs=[1e-2, 1e-2], seeds=[0, 1], **options)


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
    record = json.loads((tmp_path / "results.json").read_text())
    rows = record["comparisons"]
    cells = [("p = 0.5", 1), ("p = 0.5", 2)] + [("4 tasks, 16 experts", t) for t in range(1, 5)]
    assert [(r["setting"], r["task"], r["gate"], r["against"]) for r in rows] == [
        (*cell, *pair) for cell in cells for pair in study.COMPARISONS
    ]
    for row in rows:
        assert {row["verdict"], row["paired_verdict"], *row["half_verdicts"]} <= {"better", "tie", "worse"}
        assert len(row[f"{row['gate']}_test_mse"]) == len(row[f"{row['against']}_test_mse"]) == 4
    assert {(c["setting"], c["gate"]) for c in record["chosen_lr"]} == {
        (s, g) for s in ("p = 0.5", "4 tasks, 16 experts") for g in study.LAYER_GATES
    }
    tests = [r for r in record["runs"] if r["split"] == "test"]
    assert len(tests) == 2 * 3 * 4 and all(len(r["test_mse"]) in (2, 4) for r in tests)
    table = (tmp_path / "results.md").read_text()
    assert "| p = 0.5 | 2 |" in table and "| 4 tasks, 16 experts | 4 |" in table
    assert "| 4 tasks, 16 experts | attention_input_query |" in table  # the training table
    for figure in ("learning_curves", "gate_entropy", "paired_differences"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 0
    assert "[" + "#" * 30 + "]" in done.stderr  # the progress bar, full at the end
