"""Demo: MMoE with the classic softmax gate vs the two attention gates, on the MMoE paper's synthetic tasks.

    python -m fused_gate.apps.demo [--quick] [--correlations 0.5 0.9 1.0 --seeds 3 --steps 5000 --device cuda]

The gates: ``softmax`` (the paper's), ``attention`` (one learned query per task) and ``attention_input_query``
(each task's query computed from the input). For each task correlation and seed the three models start
from the same seed, see the same batches and train for the same number of steps (Adam, MSE per task).
The demo prints each gate's final per-task test loss (mean over seeds) and the time per training step of the
gate op alone, fused vs the plain-PyTorch reference, on the chosen device. It writes a PNG of the
test-loss curves, one panel per task and correlation. The setup follows the paper: d = 100 inputs,
8 experts of one 16-unit layer, 8-unit towers. ``--quick`` trains one correlation with one seed (3 trainings
instead of 27).

On a CPU without ``TRITON_INTERPRET=1`` the fused ops fall back to the reference, so training runs at
eager speed and the gate timing is not meaningful: the kernels need a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fused_gate as fg
from fused_gate._validation import MAX_EXPERTS
from fused_gate.apps.arguments import device, integer, real
from fused_gate.apps.synthetic import make_tasks
from fused_gate.apps.training import Progress, train
from fused_gate.layers import LAYER_GATES


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fused_gate.apps.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the first correlation only, one seed: 3 trainings instead of 27"
    )
    parser.add_argument("--correlations", type=real(-1.0, 1.0), nargs="+", default=[0.5, 0.9, 1.0])
    parser.add_argument("--seeds", type=integer(1), default=3, help="seeds per correlation")
    parser.add_argument("--steps", type=integer(1), default=5000)
    parser.add_argument("--batch-size", type=integer(1), default=128)
    parser.add_argument("--train-size", type=integer(1), default=50000)
    parser.add_argument("--test-size", type=integer(1), default=2000)
    parser.add_argument("--input-dim", type=integer(2), default=100, help="at least 2 (two task directions)")
    parser.add_argument("--experts", type=integer(1, MAX_EXPERTS), default=8)
    parser.add_argument("--expert-hidden", type=integer(1), default=16)
    parser.add_argument("--tower-hidden", type=integer(1), default=8)
    parser.add_argument("--lr", type=real(0.0, low_open=True), default=1e-2)
    parser.add_argument("--eval-every", type=integer(1), default=50)
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the loss-curve PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.correlations, args.seeds = args.correlations[:1], 1
    return args


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _train(args, gate: str, x, y, x_test, y_test, seed: int) -> tuple[list[list[float]], list[float]]:
    """Train one MMoE; returns the test MSE ``[task 1, task 2]`` at each evaluation, and the last one."""
    torch.manual_seed(seed)
    model = fg.MMoE(args.input_dim, args.experts, args.expert_hidden, 2, gate=gate, tower_hidden=args.tower_hidden).to(
        args.device
    )
    history = train(
        model,
        x,
        y,
        x_test,
        y_test,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        seed=seed,
    )
    return history.mse, history.mse[-1]


def _gate_step_ms(args, fn, repeats: int = 20) -> float:
    """Median time of the gate op alone (forward + backward) at the training batch shape."""
    h = torch.randn(args.batch_size, args.experts, args.expert_hidden, device=args.device, requires_grad=True)
    context = torch.randn(2, args.expert_hidden, device=args.device, requires_grad=True)
    times = []
    for i in range(repeats + 1):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(h, context).sum().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first call compiles the kernels
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _plot(curves: dict, args: argparse.Namespace) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'fused_gate[bench]')")
        return None
    cols = len(args.correlations)
    fig, axes = plt.subplots(2, cols, figsize=(max(4.5 * cols, 6.0), 6.6), squeeze=False, sharey="row")
    for col, corr in enumerate(args.correlations):
        for task in range(2):
            ax = axes[task][col]
            for gate in LAYER_GATES:
                runs = curves[(corr, gate)]
                mean = [statistics.fmean(run[i][task] for run in runs) for i in range(len(runs[0]))]
                steps = [min((i + 1) * args.eval_every, args.steps) for i in range(len(mean))]
                ax.plot(steps, mean, label=f"{gate} gate")
            ax.set_title(f"task {task + 1}, correlation p = {corr}", fontsize=10)
            ax.set_xlabel("training step")
            if col == 0:
                ax.set_ylabel(f"task {task + 1} test MSE")
            ax.legend(fontsize=8)
    title = f"MMoE on the MMoE paper's synthetic data\ntest MSE per task, mean over {_seeds(args.seeds)}"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "mmoe_gates_loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict:
    """Train every (correlation, gate, seed); print the tables; return the results."""
    kernels = fg.uses_kernels(torch.empty(0, device=args.device))
    print(f"fused_gate demo: MMoE, gates {', '.join(LAYER_GATES)}; device {args.device}, torch {torch.__version__}")
    print(
        f"d={args.input_dim}, {args.experts} experts x {args.expert_hidden} units, towers {args.tower_hidden}, "
        f"{args.steps} steps of {args.batch_size}, {_seeds(args.seeds)}, Adam lr {args.lr}\n"
    )
    progress = Progress(len(args.correlations) * len(LAYER_GATES) * args.seeds)
    curves: dict = {}
    finals: dict = {}
    for corr in args.correlations:
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(1000 + seed)
            x, y = make_tasks(args.train_size + args.test_size, args.input_dim, corr, gen)
            x, y = x.to(args.device), y.to(args.device)
            train, test = slice(0, args.train_size), slice(args.train_size, None)
            for gate in LAYER_GATES:
                curve, per_task = _train(args, gate, x[train], y[train], x[test], y[test], seed)
                curves.setdefault((corr, gate), []).append(curve)
                finals.setdefault((corr, gate), []).append(per_task)
                progress.step(f"p={corr} {gate} seed {seed}")

    print(f"\nFinal test MSE per task (mean over {_seeds(args.seeds)}; lower is better)")
    print(f"{'p':>5} | " + " | ".join(f"{f'{gate}: task 1':>{len(gate) + 8}} {'task 2':>8}" for gate in LAYER_GATES))
    for corr in args.correlations:
        cells = []
        for gate in LAYER_GATES:
            runs = finals[(corr, gate)]
            task_1, task_2 = (statistics.fmean(r[k] for r in runs) for k in range(2))
            cells.append(f"{task_1:>{len(gate) + 8}.4f} {task_2:>8.4f}")
        print(f"{corr:>5} | " + " | ".join(cells))

    fused = _gate_step_ms(args, fg.attention_mix)
    reference = _gate_step_ms(args, fg.reference.attention_mix)
    print(f"\nAttention gate op, forward + backward at [{args.batch_size}, {args.experts}, {args.expert_hidden}]:")
    print(f"  fused {fused:.3f} ms, reference {reference:.3f} ms per step on {args.device}")
    if not kernels:
        print("  (no kernels on this device: the fused op ran the reference; use a GPU for the kernels' speed)")
    path = _plot(curves, args)
    if path:
        print(f"\nLoss curves: {path}")
    return {"finals": finals, "curves": curves, "gate_ms": {"fused": fused, "reference": reference}}


def main(argv: list[str] | None = None) -> dict:
    return run(_parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
