"""Which gate should MMoE use? A tuned, seeded comparison of its three gates, trained to convergence.

    python -m fused_gate.apps.study [--quick] [--workers 2] [--out study_out]

Gates: ``softmax`` (``softmax(W_t x)``, the MMoE paper's), ``attention`` (one learned query per task over
the experts' outputs, blind to the input) and ``attention_input_query`` (the same attention with each
task's query computed from the input, ``x W_t + b_t``).

Settings: the MMoE paper's synthetic two-task regression (``fused_gate.apps.synthetic``) at task correlations
p = 0.5, 0.9 and 1.0 with 8 experts, and a harder one where the gate has to route: 4 tasks in two pairs
(cosine 0.9 within a pair, 0 across) sharing 16 experts. Every setting has d = 100 inputs, one 16-unit
layer per expert and 8-unit towers, 50,000 training, 5,000 validation and 10,000 test rows.

Protocol, the same for every gate: Adam on batches of 128 for at most ``--steps`` steps; every
``--eval-every`` steps the validation MSE (mean over tasks) is recorded, training stops after
``--patience`` evaluations without improvement and the best weights are kept. Each gate gets its own
learning rate: the grid ``--lr-grid`` is swept on ``--sweep-seeds`` seeds, the rate with the lowest
validation MSE wins, and the grid is widened by half decades while the winner sits on its edge. Then
``--seeds`` other seeds train at the chosen rate and are scored on the test split. Seed s fixes the data
set, the experts' initial weights and the batch order, identically for every gate.

Verdicts, per setting and task, of a gate against another on the test MSE over the seeds, lower being
better, each with the rule "better" when ``d < -2 se``, "worse" when ``d > 2 se``, "tie" otherwise:

* unpaired: ``d = mean(a) - mean(b)``, ``se = sqrt(sd_a^2 / n + sd_b^2 / n)`` (sample standard deviations);
* paired (the same seed is the same data set and the same experts' start for both): ``d`` the mean of the
  per-seed differences ``a_s - b_s``, ``se`` their sample standard deviation over ``sqrt(n)``;
* the paired verdict again on each half of the seeds (two disjoint seed sets), to show whether it holds.

Each worker trains one stack at a time on one CPU thread: all the runs of one gate in one phase (the
learning-rate sweep, or the seeds at the chosen rate) on the settings whose models have one shape (the
three two-task settings share a stack), as one vmapped model (``fused_gate.apps.stacked``), which on a
CPU costs far less per run than separate trainings. On the CPU
the gates run the plain-PyTorch reference; with ``TRITON_INTERPRET=1`` every step would go through
Triton's interpreter, so the study refuses to start. Writes ``results.md``, ``results.json``,
``learning_curves.png``, ``gate_entropy.png`` and ``paired_differences.png`` to ``--out``.
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
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fused_gate as fg
from fused_gate.apps.stacked import train_stacked
from fused_gate.apps.synthetic import make_tasks
from fused_gate.apps.training import History, Progress
from fused_gate.kernels import INTERPRETED
from fused_gate.layers import LAYER_GATES

# (a, b): the verdicts compare gate a against gate b, d = a - b
COMPARISONS = (("attention", "softmax"), ("attention_input_query", "softmax"), ("attention_input_query", "attention"))
LR_GRID = (3e-3, 1e-2, 3e-2)
MAX_WIDENINGS = 2  # grid points added on one side before a winner on the edge is reported as such
VERDICT_SE = 2.0  # a difference beyond this many standard errors is a verdict, else a tie
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
    """One stack: runs ``(setting, lr, seed)`` of one gate on settings of one model shape, trained together."""

    gate: str
    runs: tuple[tuple[Setting, float, int], ...]
    split: str  # "validation" for the learning-rate sweep, "test" for the seeds at the chosen rate


@dataclass
class Outcome:
    """One run: its gate, learning rate and seed, what training recorded, and its test MSE per task."""

    setting: Setting
    gate: str
    lr: float
    seed: int
    split: str
    history: History
    test_mse: list[float]  # per task, at the best validation step ([] for a sweep run)


@dataclass
class JobResult:
    job: Job
    outcomes: list[Outcome]
    seconds: float  # the stack's wall time (data, training, scoring)
    cpu_seconds: float
    steps: int  # training steps over all runs (a stopped run leaves the stack)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fused_gate.apps.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: p = 0.5 only, 4 seeds, 40 steps")
    parser.add_argument("--correlations", type=float, nargs="+", help="two-task cosines (default 0.5 0.9 1.0)")
    parser.add_argument("--four-tasks", action=argparse.BooleanOptionalAction, help="the 4-task, 16-expert setting")
    parser.add_argument(
        "--gates", nargs="+", choices=LAYER_GATES, help=f"gates to compare (default: {' '.join(LAYER_GATES)})"
    )
    parser.add_argument("--seeds", type=int, help="seeds at the chosen learning rate (default 10)")
    parser.add_argument("--sweep-seeds", type=int, default=1, help="seeds per learning rate in the sweep")
    parser.add_argument("--lr-grid", type=float, nargs="+", help="learning rates swept first (default 3e-3 1e-2 3e-2)")
    parser.add_argument("--steps", type=int, help="step cap per run (default 30000)")
    parser.add_argument("--eval-every", type=int, help="steps between validation evaluations (default 200)")
    parser.add_argument("--patience", type=int, help="evaluations without improvement before stopping (default 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, help="default 50000")
    parser.add_argument("--val-size", type=int, help="default 5000")
    parser.add_argument("--test-size", type=int, help="default 10000")
    parser.add_argument("--workers", type=int, help="stacks trained in parallel (default 2, or 1 with --quick)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("study_out"))
    args = parser.parse_args(argv)
    full = {
        "correlations": [0.5, 0.9, 1.0],
        "four_tasks": True,
        "workers": min(2, os.cpu_count() or 1),
        "seeds": 10,
        "steps": 30000,
        "eval_every": 200,
    }
    full |= {"patience": 10, "train_size": 50000, "val_size": 5000, "test_size": 10000}
    quick = {
        "correlations": [0.5],
        "four_tasks": False,
        "seeds": 4,
        "workers": 1,
        "steps": 40,
        "eval_every": 20,
        "patience": 2,
    }
    quick |= {"train_size": 1000, "val_size": 300, "test_size": 300}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.gates = list(dict.fromkeys(args.gates or LAYER_GATES))  # once each, in the order given
    args.lr_grid = sorted(set(args.lr_grid or LR_GRID))
    for name in ("sweep_seeds", "steps", "eval_every", "patience", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seeds < 2:
        raise SystemExit(f"--seeds must be >= 2 (a standard deviation needs two), got {args.seeds}")
    if not all(0 < lr < math.inf for lr in args.lr_grid):
        raise SystemExit(f"--lr-grid takes positive learning rates, got {args.lr_grid}")
    if len(args.gates) < 2:
        raise SystemExit(f"--gates needs two gates or more to compare, got {args.gates}")
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    found = [Setting(f"p = {p}", float(p), 8) for p in args.correlations]
    if args.four_tasks:
        found.append(Setting("4 tasks, 16 experts", PAIRED_COSINES, 16))
    return found


def _splits(setting: Setting, seed: int, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """Seed ``seed``'s data set: ``(x_train, y_train, x_val, y_val, x_test, y_test)`` on ``args.device``."""
    correlation = setting.correlation
    if not isinstance(correlation, float):
        correlation = torch.tensor(correlation, dtype=torch.float64)
    sizes = (args.train_size, args.val_size, args.test_size)
    x, y = make_tasks(sum(sizes), 100, correlation, torch.Generator().manual_seed(1000 + seed))
    x_train, x_val, x_test = x.to(args.device).split(sizes)
    y_train, y_val, y_test = y.to(args.device).split(sizes)
    return x_train, y_train, x_val, y_val, x_test, y_test


def _run_job(job: Job, args: argparse.Namespace) -> JobResult:
    """Train the job's runs as one stack; score each run's best-validation weights on the job's split."""
    torch.set_num_threads(1)
    # A gate that puts nearly all its weight on one expert leaves the others' weights subnormal (below 1e-38),
    # and subnormal float arithmetic is slow on CPUs: flushed to 0, a step of such a run costs about 10% less.
    torch.set_flush_denormal(True)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = {(s, seed): _splits(s, seed, args) for s, _, seed in job.runs}
    models = []
    for setting, _, seed in job.runs:
        torch.manual_seed(seed)
        model = fg.MMoE(100, setting.experts, 16, setting.tasks, gate=job.gate, tower_hidden=8)
        models.append(model.to(args.device))
    x_train, y_train, x_val, y_val = (torch.stack([data[(s, seed)][i] for s, _, seed in job.runs]) for i in range(4))
    histories = train_stacked(
        models, x_train, y_train, x_val, y_val, lrs=[lr for _, lr, _ in job.runs],
        seeds=[seed for _, _, seed in job.runs], steps=args.steps, batch_size=args.batch_size,
        eval_every=args.eval_every, patience=args.patience,
    )  # fmt: skip
    outcomes = []
    for (setting, lr, seed), model, history in zip(job.runs, models, histories, strict=True):
        test_mse = _mse_per_task(model, *data[(setting, seed)][4:]) if job.split == "test" else []
        outcomes.append(Outcome(setting, job.gate, lr, seed, job.split, history, test_mse))
    steps = sum(h.steps[-1] for h in histories)
    return JobResult(job, outcomes, time.perf_counter() - start, time.process_time() - cpu_start, steps)


@torch.no_grad()
def _mse_per_task(model: fg.MMoE, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return ((model(x) - y) ** 2).mean(0).tolist()


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


def _word(d: float, se: float) -> str:
    return "better" if d < -VERDICT_SE * se else "worse" if d > VERDICT_SE * se else "tie"


def verdict(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """Unpaired ``(d, se, word)`` for gate a against gate b (lower MSE is better); see the module doc."""
    d = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return d, se, _word(d, se)


def paired_verdict(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """Paired ``(d, se, word)``: ``a[i]`` and ``b[i]`` come from the same seed; see the module doc."""
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs one value of each per seed, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    d = statistics.fmean(differences)
    se = statistics.stdev(differences) / math.sqrt(len(differences))
    return d, se, _word(d, se)


def halves(values: list[float]) -> tuple[list[float], list[float]]:
    """The first and the second half of the seeds (the middle one, for an odd count, in neither)."""
    half = len(values) // 2
    return values[:half], values[len(values) - half :]


class _Inline:
    """A pool that runs each job at once in this process (``--workers 1``)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


def _study(args, setting_list, progress, pool) -> tuple[dict, dict, list[JobResult]]:
    """Sweep each gate's learning rate and train its seeds at the chosen rate, as soon as its sweep is done.

    The settings whose models have one shape (the three two-task ones) share each stack: one per gate and
    phase. Returns the validation scores per learning rate, the chosen ``(lr, edge)`` and every job's result.
    """
    sweep_seeds = range(args.sweep_seeds)
    seeds = range(args.sweep_seeds, args.sweep_seeds + args.seeds)  # disjoint from the sweep's seeds
    groups: dict = {}  # (gate, (experts, tasks)) -> the settings trained in one stack
    for setting in setting_list:
        for gate in args.gates:
            groups.setdefault((gate, (setting.experts, setting.tasks)), []).append(setting)
    scores: dict = {(s, g): {} for s in setting_list for g in args.gates}
    chosen, widenings, results = {}, dict.fromkeys(scores, 0), []
    progress.total = 2 * len(groups)

    def sweep(gate: str, lrs: dict[Setting, list[float]]) -> Job:
        return Job(gate, tuple((s, lr, seed) for s in lrs for lr in lrs[s] for seed in sweep_seeds), "validation")

    def submit(job: Job) -> None:
        waiting.append(job)

    def start() -> None:
        """Keep one stack per worker: the sweeps first (the seeds wait for them), then the largest."""
        waiting.sort(key=lambda job: (job.split == "test", -sum(s.experts for s, _, _ in job.runs)))
        while waiting and len(pending) < args.workers:
            job = waiting.pop(0)
            pending[pool.submit(_run_job, job, args)] = job

    pending: dict[Future, Job] = {}
    waiting: list[Job] = []
    for (gate, _), members in groups.items():
        submit(sweep(gate, {s: args.lr_grid for s in members}))
    start()
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            job = pending.pop(future)
            result = future.result()
            results.append(result)
            names = ", ".join(dict.fromkeys(s.name for s, _, _ in job.runs))
            progress.step(f"{job.gate} {job.split[:4]} {names}"[:40])
            if job.split == "test":
                continue
            widen = {}
            for setting in dict.fromkeys(s for s, _, _ in job.runs):
                pair = (setting, job.gate)
                for lr in dict.fromkeys(lr for s, lr, _ in job.runs if s == setting):
                    scores[pair][lr] = sweep_score([o for o in result.outcomes if (o.setting, o.lr) == (setting, lr)])
                lr, edge = choose_lr(scores[pair])
                if edge and widenings[pair] < MAX_WIDENINGS:
                    widenings[pair] += 1
                    widen[setting] = [_neighbour_lr(lr, edge)]
                else:
                    chosen[pair] = (lr, edge)
            if widen:
                progress.total += 1
                submit(sweep(job.gate, widen))
            members = groups[(job.gate, (job.runs[0][0].experts, job.runs[0][0].tasks))]
            if not widen and all((s, job.gate) in chosen for s in members):  # the group's last sweep: its seeds start
                runs = tuple((s, chosen[(s, job.gate)][0], seed) for s in members for seed in seeds)
                submit(Job(job.gate, runs, "test"))
        start()
    return scores, chosen, results


def _finals(results: list[JobResult]) -> dict:
    """``(setting, gate) -> test runs``, in seed order."""
    finals: dict = {}
    for result in results:
        for o in result.outcomes:
            if o.split == "test":
                finals.setdefault((o.setting, o.gate), []).append(o)
    return {pair: sorted(runs, key=lambda o: o.seed) for pair, runs in finals.items()}


def _mean_std(values: list[float], digits: int = 3) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _lr_text(lr: float, edge: int) -> str:
    return f"{lr:.0e}" + (" (grid edge)" if edge else "")


def results_table(setting_list, gates, finals) -> str:
    """Markdown: test MSE per setting, task and gate (mean ± std over the seeds)."""
    lines = ["| setting | task | " + " | ".join(gates) + " |", "| --- | --- |" + " --- |" * len(gates)]
    for setting in setting_list:
        for task in range(setting.tasks):
            cells = [_mean_std([o.test_mse[task] for o in finals[(setting, g)]]) for g in gates]
            lines.append(f"| {setting.name} | {task + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(setting_list, gates, chosen, finals, patience: int) -> str:
    """Markdown: per setting and gate, the chosen rate, the steps to the best validation MSE and what ended the runs."""
    lines = [
        "| setting | gate | lr | steps to best | runs ended by early stopping | longest run (steps) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting in setting_list:
        for g in gates:
            runs = finals[(setting, g)]
            best = [o.history.best_step for o in runs]
            stopped = sum(o.history.stalled(patience) for o in runs)
            longest = max(o.history.steps[-1] for o in runs)
            lines.append(
                f"| {setting.name} | {g} | {_lr_text(*chosen[(setting, g)])} | {_mean_std(best, 0)} "
                f"| {stopped} of {len(runs)} | {longest} |"
            )
    return "\n".join(lines)


def comparison_rows(setting_list, gates, finals) -> list[dict]:
    """Every verdict, per setting, task and comparison of :data:`COMPARISONS` among ``gates``."""
    rows = []
    for setting in setting_list:
        for task in range(setting.tasks):
            for a, b in COMPARISONS:
                if a not in gates or b not in gates:
                    continue
                mse_a = [o.test_mse[task] for o in finals[(setting, a)]]
                mse_b = [o.test_mse[task] for o in finals[(setting, b)]]
                unpaired, paired = verdict(mse_a, mse_b), paired_verdict(mse_a, mse_b)
                row = {"setting": setting.name, "task": task + 1, "gate": a, "against": b}
                row |= {"difference": unpaired[0], "se": unpaired[1], "verdict": unpaired[2]}  # d is the same paired
                row |= {"paired_se": paired[1], "paired_verdict": paired[2]}
                if len(mse_a) >= 4:  # two halves of two seeds or more
                    (a1, a2), (b1, b2) = halves(mse_a), halves(mse_b)
                    row["half_verdicts"] = [paired_verdict(a1, b1)[2], paired_verdict(a2, b2)[2]]
                row |= {f"{a}_test_mse": mse_a, f"{b}_test_mse": mse_b}
                rows.append(row)
    return rows


def comparison_table(rows: list[dict], seeds: int) -> str:
    """Markdown of :func:`comparison_rows`: the difference of means with its unpaired and paired standard errors and
    verdicts, and the paired verdict on each half of the seeds."""
    half = seeds // 2
    lines = [
        "| setting | task | gate - against | d | unpaired se | verdict | paired se | verdict "
        f"| paired, seeds 1 to {half} | paired, seeds {seeds - half + 1} to {seeds} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        split = r.get("half_verdicts", ["-", "-"])
        lines.append(
            f"| {r['setting']} | {r['task']} | {r['gate']} - {r['against']} | {r['difference']:+.3f} | {r['se']:.3f} "
            f"| {r['verdict']} | {r['paired_se']:.3f} | {r['paired_verdict']} | {split[0]} | {split[1]} |"
        )
    return "\n".join(lines)


def verdict_summary(rows: list[dict]) -> str:
    """Markdown: per comparison, how many cells each verdict got, and how the two halves' paired verdicts compare:
    the same word, or opposite verdicts (better in one half, worse in the other)."""
    lines = [
        "| gate - against | unpaired: better / tie / worse | paired: better / tie / worse "
        "| halves: same verdict | halves: opposite verdicts |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a, b in dict.fromkeys((r["gate"], r["against"]) for r in rows):
        mine = [r for r in rows if (r["gate"], r["against"]) == (a, b)]
        counts = [" / ".join(str(sum(r[key] == w for r in mine)) for w in ("better", "tie", "worse")) for key in
                  ("verdict", "paired_verdict")]  # fmt: skip
        split = [r["half_verdicts"] for r in mine if "half_verdicts" in r]
        same = f"{sum(h[0] == h[1] for h in split)} of {len(split)}" if split else "-"
        opposite = f"{sum(set(h) == {'better', 'worse'} for h in split)} of {len(split)}" if split else "-"
        lines.append(f"| {a} - {b} | {counts[0]} | {counts[1]} | {same} | {opposite} |")
    return "\n".join(lines)


def sweep_table(setting_list, gates, scores, chosen) -> str:
    """Markdown: validation MSE (mean over tasks, best step) per setting, gate and learning rate."""
    lrs = sorted({lr for per_lr in scores.values() for lr in per_lr})
    lines = [
        "| setting | gate | " + " | ".join(f"{lr:.0e}" for lr in lrs) + " |",
        "| --- | --- |" + " --- |" * len(lrs),
    ]
    for setting in setting_list:
        for g in gates:
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


COLORS = {"softmax": "tab:blue", "attention": "tab:orange", "attention_input_query": "tab:green"}


def _label(ax, title: str, ylabel: str, xlabel: str = "training step") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _save(plt, fig, title: str, path: Path) -> None:
    """Title, one legend for every panel (below them, off the data) and the PNG."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=len(entries), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(plt, setting_list, gates, finals, path: Path) -> None:
    """One panel per setting and task: each seed's validation MSE over training, a dot at its best step."""
    columns = max(s.tasks for s in setting_list)
    from matplotlib import ticker

    size = (max(3.6 * columns, 8.0), 2.9 * len(setting_list) + 0.5)
    fig, axes = plt.subplots(len(setting_list), columns, figsize=size, squeeze=False, layout="constrained")
    for row, setting in zip(axes, setting_list, strict=True):
        for task, ax in enumerate(row):
            if task >= setting.tasks:
                ax.axis("off")
                continue
            for g in gates:
                for i, o in enumerate(finals[(setting, g)]):
                    h = o.history
                    label = g if i == 0 else None
                    ax.plot(h.steps, [m[task] for m in h.mse], color=COLORS[g], alpha=0.4, lw=0.8, label=label)
                    ax.plot(h.best_step, h.best_mse[task], "o", color=COLORS[g], ms=2.5)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            _label(ax, f"{setting.name}: task {task + 1}", "validation MSE")
    title = "Validation MSE per task, one line per seed; dot: the best step, whose weights are tested"
    _save(plt, fig, title, path)


def plot_gate_entropy(plt, setting_list, gates, finals, path: Path) -> None:
    """One panel per setting: each seed's gate-weight entropy (mean over tasks, / log E) over training."""
    size = (max(3.8 * len(setting_list), 7.0), 3.6)
    fig, axes = plt.subplots(1, len(setting_list), figsize=size, squeeze=False, layout="constrained")
    for ax, setting in zip(axes[0], setting_list, strict=True):
        for g in gates:
            for i, o in enumerate(finals[(setting, g)]):
                entropy = [statistics.fmean(e) for e in o.history.entropy]
                ax.plot(o.history.steps, entropy, color=COLORS[g], alpha=0.4, lw=0.8, label=g if i == 0 else None)
        ax.set_ylim(0, 1.02)
        _label(ax, setting.name, "gate entropy / log E")
    _save(plt, fig, "Gate entropy on the validation rows, one line per seed (1: uniform, 0: one expert)", path)


def plot_paired_differences(plt, setting_list, rows: list[dict], path: Path) -> None:
    """One panel per setting: each seed's test-MSE difference per task and comparison, the mean ± 2 se bar."""
    size = (max(4.2 * len(setting_list), 7.0), 4.0)
    fig, axes = plt.subplots(1, len(setting_list), figsize=size, squeeze=False, layout="constrained")
    for ax, setting in zip(axes[0], setting_list, strict=True):
        mine = [r for r in rows if r["setting"] == setting.name]
        comparisons = list(dict.fromkeys((r["gate"], r["against"]) for r in mine))
        width = 0.8 / len(comparisons)
        for k, (a, b) in enumerate(comparisons):
            for r in (r for r in mine if (r["gate"], r["against"]) == (a, b)):
                x = r["task"] - 0.4 + width * (k + 0.5)
                differences = [p - q for p, q in zip(r[f"{a}_test_mse"], r[f"{b}_test_mse"], strict=True)]
                style = dict(color=COLORS[a], alpha=0.6, ms=3, mfc=COLORS[a] if b == "softmax" else "none")
                label = f"{a} - {b}" if r["task"] == 1 else None
                ax.plot([x - 0.2 * width] * len(differences), differences, "o", label=label, **style)
                yerr = VERDICT_SE * r["paired_se"]
                ax.errorbar(x + 0.2 * width, r["difference"], yerr=yerr, fmt="_", color="black", ms=8, capsize=2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(1, setting.tasks + 1))
        _label(ax, setting.name, "test MSE difference", "task")
    title = f"Per-seed test-MSE differences (same seed, same data); bar: mean ± {VERDICT_SE:g} paired se"
    _save(plt, fig, title, path)


def _run_record(o: Outcome) -> dict:
    fields = {"setting": o.setting.name, "gate": o.gate, "lr": o.lr, "seed": o.seed, "split": o.split}
    return fields | {"history": asdict(o.history), "test_mse": o.test_mse}


def run(args: argparse.Namespace) -> dict:
    """Sweep, train the seeds, write the tables, the JSON and the figures; returns the results."""
    setting_list = settings(args)
    gates = args.gates
    print(
        f"fused_gate study: {', '.join(gates)} gates on {', '.join(s.name for s in setting_list)}; "
        f"lr grid {', '.join(f'{lr:.0e}' for lr in args.lr_grid)} on {args.sweep_seeds} seed(s), then "
        f"{args.seeds} seeds; <= {args.steps} steps of {args.batch_size}, patience {args.patience} x "
        f"{args.eval_every} steps; {args.workers} worker(s) on {args.device}, torch {torch.__version__}"
    )
    progress = Progress(0)  # _study counts the stacks
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        pool = _Inline()
        if args.workers > 1:  # spawn: a fresh interpreter per worker, no forked torch state
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(args.workers, mp_context=context))
        scores, chosen, results = _study(args, setting_list, progress, pool)
    wall = time.perf_counter() - start
    finals = _finals(results)

    every_run = [o for r in results for o in r.outcomes]
    steps = sum(r.steps for r in results)
    ms_per_step = 1e3 * sum(r.seconds for r in results) / steps
    rows = comparison_rows(setting_list, gates, finals)
    runtime = (
        f"{len(every_run)} runs in {len(results)} stacks, {steps} training steps in all; {wall:.0f} s wall time on "
        f"{args.workers} worker(s) ({sum(r.cpu_seconds for r in results):.0f} s of CPU time in the stacks), "
        f"{ms_per_step:.2f} ms per run and step (validation included) on {args.device}."
    )
    markdown = "\n\n".join(
        [
            "# MMoE's gates: " + ", ".join(gates),
            f"Test MSE over {args.seeds} seeds (mean ± std) at each gate's chosen learning rate.",
            results_table(setting_list, gates, finals),
            f"Training: the chosen learning rate, steps to the best validation MSE (mean ± std over the seeds), "
            f"how many runs early stopping ended before the {args.steps}-step cap, and the longest run.",
            training_table(setting_list, gates, chosen, finals, args.patience),
            f"Verdicts on the test MSE, gate against gate: d = mean difference (negative: the gate is better), a "
            f"verdict beyond ±{VERDICT_SE:g} standard errors, else a tie; the unpaired se from the two spreads, the "
            "paired se from the per-seed differences (same seed, same data), and the paired verdict on each half "
            "of the seeds.",
            comparison_table(rows, args.seeds),
            verdict_summary(rows),
            f"Learning-rate sweep: best validation MSE (mean over tasks, {args.sweep_seeds} seed(s)); bold = chosen.",
            sweep_table(setting_list, gates, scores, chosen),
            runtime,
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown + "\n")
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "comparisons": rows,
        "chosen_lr": [{"setting": s.name, "gate": g, "lr": lr, "edge": edge} for (s, g), (lr, edge) in chosen.items()],
        "runs": [_run_record(o) for o in every_run],
        "wall_seconds": wall,
        "ms_per_step": ms_per_step,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    plt = _pyplot()
    if plt is not None:
        plot_learning_curves(plt, setting_list, gates, finals, args.out / "learning_curves.png")
        plot_gate_entropy(plt, setting_list, gates, finals, args.out / "gate_entropy.png")
        plot_paired_differences(plt, setting_list, rows, args.out / "paired_differences.png")
    print("\n" + markdown + f"\n\nWritten to {args.out}/")
    return {"comparisons": rows, "chosen": chosen, "scores": scores, "finals": finals, "wall_seconds": wall}


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
