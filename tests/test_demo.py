"""The demo's data generator and a fast end-to-end run of the demo (kernels interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch

from fused_gate.apps import demo
from fused_gate.apps.synthetic import make_tasks, task_weights


@pytest.mark.parametrize("correlation", [0.0, 0.5, 0.9, 1.0])
def test_task_weights_have_the_requested_cosine(correlation):
    w = task_weights(100, correlation, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert abs(torch.dot(w[0], w[1]).item() - correlation) < 1e-12


def test_identical_tasks_differ_only_by_noise():
    x, y = make_tasks(500, 20, 1.0, torch.Generator().manual_seed(0))
    assert x.shape == (500, 20) and y.shape == (500, 2)
    assert (y[:, 0] - y[:, 1]).std() < 0.05


def test_demo_smoke(tmp_path, capsys):
    args = [
        "--correlations", "0.5", "--seeds", "1", "--steps", "4", "--batch-size", "16", "--train-size", "64",
        "--test-size", "32", "--eval-every", "2", "--input-dim", "10", "--experts", "3", "--expert-hidden", "8",
        "--device", "cpu", "--out", str(tmp_path),
    ]  # fmt: skip
    result = demo.main(args)
    out = capsys.readouterr().out
    assert "Final test MSE per task" in out and "softmax: task 1" in out and "attention_input_query: task 1" in out
    assert set(result["finals"]) == {(0.5, gate) for gate in ("softmax", "attention", "attention_input_query")}
    curves = [curve for runs in result["curves"].values() for curve in runs]
    assert all(len(curve) == 2 and all(len(mse) == 2 for mse in curve) for curve in curves)  # 2 evaluations x 2 tasks
    assert "mean over 1 seed;" in out
    assert (tmp_path / "mmoe_gates_loss.png").stat().st_size > 0


def test_quick_is_one_correlation_and_one_seed():
    args = demo._parse(["--quick", "--correlations", "0.9", "1.0", "--seeds", "5"])
    assert args.correlations == [0.9] and args.seeds == 1
    assert demo._parse(["--quick"]).correlations == [0.5]
