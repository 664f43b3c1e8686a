"""Does the attention gate beat the softmax gate? A tuned, seeded comparison of MMoE's two gates.

    python -m fused_gate.apps.study [--quick] [--workers 2] [--out study_out]

Settings: the MMoE paper's synthetic two-task regression (``fused_gate.apps.synthetic``) at task correlations
p = 0.5, 0.9 and 1.0 with 8 experts, and a harder one where the gate has to route: 4 tasks in two pairs
(cosine 0.9 within a pair, 0 across) sharing 16 experts. Every setting has d = 100 inputs, one 16-unit
layer per expert and 8-unit towers, 50,000 training, 5,000 validation and 10,000 test rows.

Protocol, the same for both gates: Adam on batches of 128 for at most ``--steps`` steps; every
``--eval-every`` steps the validation MSE (mean over tasks) is recorded, training stops after
``--patience`` evaluations without improvement and the best weights are kept. Each gate gets its own
learning rate: the grid 1e-3 ... 1e-1 (half decades) is swept on ``--sweep-seeds`` seeds, the rate with the
lowest validation MSE wins, and the grid is widened while the winner sits on its edge. Then ``--seeds``
other seeds train at the chosen rate and are scored on the test split. Seed s fixes the data set, the
experts' initial weights and the batch order, identically for both gates.

Verdict per setting and task, on the test MSE over the seeds: with ``d = mean(attention) - mean(softmax)``
and ``se = sqrt(sd_a^2 / n + sd_s^2 / n)`` (sample standard deviations, n seeds each), the attention gate
is "better" when ``d < -2 se``, "worse" when ``d > 2 se`` and a "tie" otherwise.

Each run trains on one CPU thread (the models are small, so a second thread does not pay), and
``--workers`` runs train in parallel. On the CPU the gates run the plain-PyTorch reference; with
``TRITON_INTERPRET=1`` every step would go through Triton's interpreter, so the study refuses to start.
Writes ``results.md``, ``results.json``, ``learning_curves.png`` and ``gate_entropy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fused_gate as fg
from fused_gate.apps.synthetic import make_tasks
from fused_gate.apps.training import History, Progress, train
from fused_gate.kernels import INTERPRETED
from fused_gate.layers import GATES

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
MAX_WIDENINGS = 2  # grid points added on one side before a winner on the edge is reported as such
VERDICT_SE = 2.0  # a difference of means beyond this many standard errors is a verdict, else a tie
PAIRED_COSINES = ((1.0, 0.9, 0.0, 0.0), (0.9, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.9), (0.0, 0.0, 0.9, 1.0))


@dataclass(frozen=True)
class Setting:
    """One data set family: ``correlation`` is the two tasks' cosine, or a ``[T, T]`` cosine matrix."""

    name: str
    correlation: float | tuple[tuple[float, ...], ...]
    experts: int

    @property
    def tasks(self) -> int:
        return 2 if isinstance(self.correlation, float) else len(self.correlation)


@dataclass(frozen=True)
class Job:
    setting: Setting
    gate: str
    lr: float
    seed: int
    split: str  # "validation" for the learning-rate sweep, "test" for the seeds at the chosen rate


@dataclass
class Outcome:
    job: Job
    history: History
    test_mse: list[float]  # per task, at the best validation step


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fused_gate.apps.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: p = 0.5 only, 2 seeds, 40 steps")
    parser.add_argument("--correlations", type=float, nargs="+", help="two-task cosines (default 0.5 0.9 1.0)")
    parser.add_argument("--four-tasks", action=argparse.BooleanOptionalAction, help="the 4-task, 16-expert setting")
    parser.add_argument("--seeds", type=int, help="seeds at the chosen learning rate (default 5)")
    parser.add_argument("--sweep-seeds", type=int, default=1, help="seeds per learning rate in the sweep")
    parser.add_argument("--steps", type=int, help="step budget per run (default 5000)")
    parser.add_argument("--eval-every", type=int, help="steps between validation evaluations (default 100)")
    parser.add_argument("--patience", type=int, help="evaluations without improvement before stopping (default 20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, help="default 50000")
    parser.add_argument("--val-size", type=int, help="default 5000")
    parser.add_argument("--test-size", type=int, help="default 10000")
    parser.add_argument("--workers", type=int, help="runs trained in parallel (default 2, or 1 with --quick)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("study_out"))
    args = parser.parse_args(argv)
    full = {
        "correlations": [0.5, 0.9, 1.0],
        "four_tasks": True,
        "workers": min(2, os.cpu_count() or 1),
        "seeds": 5,
        "steps": 5000,
        "eval_every": 100,
    }
    full |= {"patience": 20, "train_size": 50000, "val_size": 5000, "test_size": 10000}
    quick = {
        "correlations": [0.5],
        "four_tasks": False,
        "seeds": 2,
        "workers": 1,
        "steps": 40,
        "eval_every": 20,
        "patience": 2,
    }
    quick |= {"train_size": 1000, "val_size": 300, "test_size": 300}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("seeds", "sweep_seeds", "steps", "eval_every", "patience", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    found = [Setting(f"p = {p}", float(p), 8) for p in args.correlations]
    if args.four_tasks:
        found.append(Setting("4 tasks, 16 experts", PAIRED_COSINES, 16))
    return found


def _run_job(job: Job, args: argparse.Namespace) -> Outcome:
    """Train one MMoE on its seed's data; score the best-validation weights on the job's split."""
    torch.set_num_threads(1)
    setting = job.setting
    correlation = setting.correlation
    if not isinstance(correlation, float):
        correlation = torch.tensor(correlation, dtype=torch.float64)
    sizes = (args.train_size, args.val_size, args.test_size)
    x, y = make_tasks(sum(sizes), 100, correlation, torch.Generator().manual_seed(1000 + job.seed))
    x_train, x_val, x_test = x.to(args.device).split(sizes)
    y_train, y_val, y_test = y.to(args.device).split(sizes)
    torch.manual_seed(job.seed)
    model = fg.MMoE(100, setting.experts, 16, setting.tasks, gate=job.gate, tower_hidden=8).to(args.device)
    history = train(
        model, x_train, y_train, x_val, y_val, steps=args.steps, batch_size=args.batch_size, lr=job.lr,
        eval_every=args.eval_every, seed=job.seed, patience=args.patience,
    )  # fmt: skip
    test_mse = _mse_per_task(model, x_test, y_test) if job.split == "test" else []
    return Outcome(job, history, test_mse)


@torch.no_grad()
def _mse_per_task(model: fg.MMoE, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return ((model(x) - y) ** 2).mean(0).tolist()


def _execute(jobs: list[Job], args: argparse.Namespace, progress: Progress, pool) -> list[Outcome]:
    """Run ``jobs`` on ``pool`` (in this process when it is None); the results come in the jobs' order."""
    label = lambda job: f"{job.setting.name[:12]} {job.gate} lr {job.lr:.0e} s{job.seed}"
    by_job = {}
    if pool is None:
        for job in jobs:
            by_job[job] = _run_job(job, args)
            progress.step(label(job))
    else:
        futures = {pool.submit(_run_job, job, args): job for job in jobs}
        for future in as_completed(futures):
            by_job[futures[future]] = future.result()
            progress.step(label(futures[future]))
    return [by_job[job] for job in jobs]


def _neighbour_lr(lr: float, direction: int) -> float:
    """The next point of the 1-3-10 grid above (``direction = 1``) or below (``-1``) ``lr``."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent)
    if direction > 0:
        return 3 * 10**exponent if mantissa == 1 else 10 ** (exponent + 1)
    return 10**exponent if mantissa == 3 else 3 * 10 ** (exponent - 1)


def sweep_score(outcomes: list[Outcome]) -> float:
    """Best validation MSE (mean over tasks), averaged over seeds; a diverged run scores infinity."""
    scores = [statistics.fmean(o.history.best_mse) for o in outcomes]
    return statistics.fmean(s if math.isfinite(s) else math.inf for s in scores)


def choose_lr(scores: dict[float, float]) -> tuple[float, int]:
    """The learning rate with the lowest score and where it sits: -1 lowest of the grid, 1 highest, 0 inside."""
    best = min(scores, key=lambda lr: (scores[lr], lr))
    edge = -1 if best == min(scores) else 1 if best == max(scores) else 0
    return best, edge


def verdict(attention: list[float], softmax: list[float]) -> tuple[float, float, str]:
    """``(d, se, word)`` for the attention gate against the softmax gate (lower MSE is better); see the module doc."""
    d = statistics.fmean(attention) - statistics.fmean(softmax)
    se = math.sqrt(statistics.variance(attention) / len(attention) + statistics.variance(softmax) / len(softmax))
    if d < -VERDICT_SE * se:
        return d, se, "better"
    if d > VERDICT_SE * se:
        return d, se, "worse"
    return d, se, "tie"


def _sweep(args, setting_list, progress, pool) -> tuple[dict, dict, list[Outcome]]:
    """Learning-rate sweep per (setting, gate): the scores per lr, the chosen (lr, edge) and every run."""
    seeds = range(args.sweep_seeds)
    pairs = [(s, g) for s in setting_list for g in GATES]
    scores: dict = {pair: {} for pair in pairs}
    pending = {pair: list(LR_GRID) for pair in pairs}
    widenings, done = 0, []
    while True:
        jobs = [Job(s, g, lr, seed, "validation") for (s, g), lrs in pending.items() for lr in lrs for seed in seeds]
        outcomes = _execute(jobs, args, progress, pool)
        done += outcomes
        for (s, g), lrs in pending.items():
            for lr in lrs:
                scores[(s, g)][lr] = sweep_score(
                    [o for o in outcomes if (o.job.setting, o.job.gate, o.job.lr) == (s, g, lr)]
                )
        chosen = {pair: choose_lr(scores[pair]) for pair in pairs}
        pending = {pair: [_neighbour_lr(lr, edge)] for pair, (lr, edge) in chosen.items() if edge}
        if not pending or widenings == MAX_WIDENINGS:
            return scores, chosen, done
        widenings += 1
        progress.total += len(pending) * len(seeds)


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _lr_text(lr: float, edge: int) -> str:
    return f"{lr:.0e}" + (" (grid edge)" if edge else "")


def results_table(setting_list, chosen, finals) -> tuple[str, list[dict]]:
    """The Markdown table of test MSE per setting and task, and its rows as dicts."""
    lines = [
        "| setting | task | softmax: test MSE | lr | steps to best | attention: test MSE | lr | steps to best "
        "| attention - softmax (± se) | attention gate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for setting in setting_list:
        runs = {g: finals[(setting, g)] for g in GATES}
        best_steps = {g: [o.history.best_step for o in runs[g]] for g in GATES}
        for task in range(setting.tasks):
            mse = {g: [o.test_mse[task] for o in runs[g]] for g in GATES}
            d, se, word = verdict(mse["attention"], mse["softmax"])
            cells = []
            for g in GATES:
                lr, edge = chosen[(setting, g)]
                steps = f"{statistics.fmean(best_steps[g]):.0f} ± {statistics.stdev(best_steps[g]):.0f}"
                cells += [_mean_std(mse[g]), _lr_text(lr, edge), steps]
            lines.append(f"| {setting.name} | {task + 1} | {' | '.join(cells)} | {d:+.3f} (± {se:.3f}) | {word} |")
            rows.append(
                {
                    "setting": setting.name,
                    "task": task + 1,
                    "difference": d,
                    "se": se,
                    "verdict": word,
                    **{f"{g}_test_mse": mse[g] for g in GATES},
                    **{f"{g}_lr": chosen[(setting, g)][0] for g in GATES},
                }
            )
    return "\n".join(lines), rows


def sweep_table(setting_list, scores, chosen) -> str:
    """Markdown: validation MSE (mean over tasks, best step) per setting, gate and learning rate."""
    lrs = sorted({lr for per_lr in scores.values() for lr in per_lr})
    lines = [
        "| setting | gate | " + " | ".join(f"{lr:.0e}" for lr in lrs) + " |",
        "| --- | --- |" + " --- |" * len(lrs),
    ]
    for setting in setting_list:
        for g in GATES:
            per_lr = scores[(setting, g)]
            cells = []
            for lr in lrs:
                text = f"{per_lr[lr]:.3f}" if lr in per_lr else ""
                cells.append(f"**{text}**" if lr == chosen[(setting, g)][0] else text)
            lines.append(f"| {setting.name} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'fused_gate[bench]')")
        return None
    return plt


COLORS = {"softmax": "tab:blue", "attention": "tab:orange"}


def _label(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _save(plt, fig, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(plt, setting_list, finals, path: Path) -> None:
    """One panel per setting and task: each seed's validation MSE over training, a dot at its best step."""
    columns = max(s.tasks for s in setting_list)
    from matplotlib import ticker

    fig, axes = plt.subplots(
        len(setting_list), columns, figsize=(3.6 * columns, 2.9 * len(setting_list)), squeeze=False
    )
    for row, setting in zip(axes, setting_list, strict=True):
        for task, ax in enumerate(row):
            if task >= setting.tasks:
                ax.axis("off")
                continue
            for g in GATES:
                for i, o in enumerate(finals[(setting, g)]):
                    h = o.history
                    label = f"{g} gate, lr {o.job.lr:.0e}" if i == 0 else None
                    ax.plot(h.steps, [m[task] for m in h.mse], color=COLORS[g], alpha=0.55, lw=1, label=label)
                    ax.plot(h.best_step, h.best_mse[task], "o", color=COLORS[g], ms=3)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            _label(ax, f"{setting.name}: task {task + 1}", "validation MSE")
    title = "MMoE validation MSE per task, one line per seed (dot: best step, whose weights are tested)"
    _save(plt, fig, title, path)


def plot_gate_entropy(plt, setting_list, finals, path: Path) -> None:
    """One panel per setting: each seed's gate-weight entropy (mean over tasks, / log E) over training."""
    fig, axes = plt.subplots(1, len(setting_list), figsize=(3.8 * len(setting_list), 3.2), squeeze=False)
    for ax, setting in zip(axes[0], setting_list, strict=True):
        for g in GATES:
            for i, o in enumerate(finals[(setting, g)]):
                entropy = [statistics.fmean(e) for e in o.history.entropy]
                ax.plot(
                    o.history.steps, entropy, color=COLORS[g], alpha=0.55, lw=1, label=f"{g} gate" if i == 0 else None
                )
        ax.set_ylim(0, 1.02)
        _label(ax, setting.name, "gate entropy / log E")
    _save(plt, fig, "Gate weights' entropy on the validation rows (1 = uniform over experts, 0 = one expert)", path)


def run(args: argparse.Namespace) -> dict:
    """Sweep, train the seeds, write the table, the JSON and the figures; returns the results."""
    setting_list = settings(args)
    pairs = [(s, g) for s in setting_list for g in GATES]
    print(
        f"fused_gate study: softmax vs attention gate on {', '.join(s.name for s in setting_list)}; "
        f"lr grid {', '.join(f'{lr:.0e}' for lr in LR_GRID)} on {args.sweep_seeds} seed(s), then {args.seeds} seeds; "
        f"<= {args.steps} steps of {args.batch_size}, patience {args.patience} x {args.eval_every} steps; "
        f"{args.workers} worker(s) on {args.device}, torch {torch.__version__}"
    )
    progress = Progress(len(pairs) * (len(LR_GRID) * args.sweep_seeds + args.seeds))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        pool = None
        if args.workers > 1:  # spawn: a fresh interpreter per worker, no forked torch state
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(args.workers, mp_context=context))
        scores, chosen, sweep_runs = _sweep(args, setting_list, progress, pool)
        seeds = range(args.sweep_seeds, args.sweep_seeds + args.seeds)  # disjoint from the sweep's seeds
        jobs = [Job(s, g, chosen[(s, g)][0], seed, "test") for s, g in pairs for seed in seeds]
        outcomes = _execute(jobs, args, progress, pool)
    wall = time.perf_counter() - start
    finals = {pair: [o for o in outcomes if (o.job.setting, o.job.gate) == pair] for pair in pairs}

    every_run = sweep_runs + outcomes
    steps = sum(o.history.steps[-1] for o in every_run)
    ms_per_step = 1e3 * sum(o.history.seconds for o in every_run) / steps
    table, rows = results_table(setting_list, chosen, finals)
    runtime = (
        f"{len(every_run)} runs, {steps} training steps in all; {wall:.0f} s wall time on {args.workers} worker(s), "
        f"{ms_per_step:.2f} ms per step (validation included) on {args.device}."
    )
    markdown = "\n\n".join(
        [
            "# Softmax gate vs attention gate in MMoE",
            f"Test MSE over {args.seeds} seeds (mean ± std) at each gate's chosen learning rate; steps to the best "
            f"validation MSE (mean ± std). Verdict: difference of means beyond ±{VERDICT_SE:g} standard errors.",
            table,
            f"Learning-rate sweep: best validation MSE (mean over tasks, {args.sweep_seeds} seed(s)); bold = chosen.",
            sweep_table(setting_list, scores, chosen),
            runtime,
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown + "\n")
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "runs": [{**asdict(o.job), "history": asdict(o.history), "test_mse": o.test_mse} for o in every_run],
        "wall_seconds": wall,
        "ms_per_step": ms_per_step,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    plt = _pyplot()
    if plt is not None:
        plot_learning_curves(plt, setting_list, finals, args.out / "learning_curves.png")
        plot_gate_entropy(plt, setting_list, finals, args.out / "gate_entropy.png")
    print("\n" + markdown + f"\n\nWritten to {args.out}/")
    return {"rows": rows, "chosen": chosen, "scores": scores, "finals": finals, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if INTERPRETED and args.device == "cpu":
        raise SystemExit(
            "TRITON_INTERPRET=1 is set: every training step would run the Triton kernels through the interpreter, "
            "far too slow for the study. Unset it: on the CPU the gates then run the plain-PyTorch reference."
        )
    return run(args)


if __name__ == "__main__":
    main()
