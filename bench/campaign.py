"""One command for a GPU machine: every check and measurement in order, packed into a few files.

    bash scripts/dev.sh gpu [OUTDIR] [--dry-run]        (python -m bench.campaign)

Steps, each a child process with its own time limit (25 minutes in all at most); ``--steps 1`` or
``--steps 2-6`` runs some of them, so that the campaign can run as three calls of at most 10 minutes
each (``--steps 1``, ``--steps 2``, ``--steps 3-6``), each packing its own files:

1. the whole test suite on CUDA (compiled kernels, CUDA-graph and > 2**31-element tests included);
2. the bench ``small`` grid for every implementation in bf16 (``python -m bench.run``, which writes the
   report);
3. the tuning sweep of both ops (``python -m bench.tune``);
4. the memory-traffic table of the same shapes, and of experts_mix (``python -m bench.traffic``,
   interpreted);
5. MMoE's experts' last layer + gate in one kernel against the two-step path, eager and torch.compile, in
   inference and in a training step (``python -m bench.experts_mix``, bf16: GB/s, time ratios, peak memory).

Everything lands in a results folder (``bench/results/<date>_<device>/``, logs included); OUTDIR
(default ``gpu-campaign/``) receives at most six files: ``results.tar.gz`` (the whole folder),
``report.md``, the GB/s plot of each op, and ``summary.md``: each step's outcome and each performance
target of the report (measured, met or not), also printed. ``--dry-run`` runs the same steps on the
CPU through the interpreter, reduced so that it takes a few minutes: one test file, the ``smoke``
grid for fused/eager/copy forwards, the tuning sweep's CPU shapes, the traffic table of ``smoke``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.timing import ON_CUDA, device_label

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 6


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: int
    interpret: bool = False  # the traffic count runs the kernels through the interpreter, also on a GPU


def steps(results: Path, dry_run: bool) -> list[Step]:
    """The campaign's commands, in order (the dry run's are the same tools on tiny inputs)."""
    py = sys.executable
    tests = [py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    tests += [f"--junitxml={results / 'tests.xml'}"]
    bench = [py, "-m", "bench.run", "--out", str(results), "--grid", "small", "--dtypes", "bf16"]
    tune = [[py, "-m", "bench.tune", "--op", op, "--out", str(results)] for op in ("attention_mix", "softmax_mix")]
    traffic = [py, "-m", "bench.traffic", "--grid", "small", "--experts-mix", "--out", str(results)]
    experts = [py, "-m", "bench.experts_mix", "--shapes", "mmoe", "--dtype", "bf16", "--out", str(results)]
    if dry_run:
        tests[3] = "tests/test_gates.py"
        bench[bench.index("small")] = "smoke"
        bench[bench.index("bf16")] = "fp32"
        bench += ["--impls", "fused,eager,copy", "--passes", "fwd"]
        traffic[traffic.index("small")] = "smoke"
        traffic.remove("--experts-mix")
        experts[experts.index("mmoe")] = "smoke"
        experts[experts.index("bf16")] = "fp32"
        experts += ["--impls", "one-kernel,two-step,eager"]
    return [
        Step("test suite", tests, 480),
        Step("bench small grid, every implementation, bf16", bench, 540),
        Step("tuning sweep attention_mix", tune[0], 90),
        Step("tuning sweep softmax_mix", tune[1], 90),
        Step("memory traffic", traffic, 90, interpret=True),
        Step("bench experts_mix, MMoE inference and training step, bf16", experts, 210),
    ]


def step_numbers(text: str, count: int) -> list[int]:
    """``"2-6"``, ``"1,3"`` or ``"4"`` as 1-based step numbers within ``1..count``, in order."""
    numbers = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--steps takes numbers and ranges such as 1,3-6, got {text!r}") from None
        if not 1 <= low <= high <= count:
            raise argparse.ArgumentTypeError(f"--steps must lie within 1..{count}, got {text!r}")
        numbers.update(range(low, high + 1))
    return sorted(numbers)


def run_step(step: Step, log: Path) -> tuple[str, float]:
    """Run one step, its output appended to ``log``; returns its outcome and seconds."""
    env = dict(os.environ)
    if step.interpret:
        env["TRITON_INTERPRET"] = "1"
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(step.command)}\n")
        out.flush()
        try:
            done = subprocess.run(
                step.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=step.limit_s
            )
            outcome = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            outcome = f"stopped at its {step.limit_s} s limit"
    return outcome, time.monotonic() - start


def summary(outcomes: list[tuple[Step, str, float]], results: Path, dry_run: bool) -> str:
    lines = [f"# GPU campaign: {device_label()}", ""]
    if dry_run:
        lines += ["**Dry run on the CPU through the Triton interpreter: no number here is a GPU measurement.**", ""]
    lines += [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; results: `{results.name}`", ""]
    lines += ["| step | outcome | seconds |", "| --- | --- | --- |"]
    lines += [f"| {step.name} | {outcome} | {seconds:.0f} |" for step, outcome, seconds in outcomes]
    runs = sorted(results.glob("run-*.json"))
    if runs:
        _, cases = report.load_runs(runs)
        lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {t} | {m} | {ok} |" for t, m, ok in report.target_rows(cases)]
    return "\n".join(lines) + "\n"


def pack(results: Path, out: Path, text: str) -> list[Path]:
    """Write at most ``MAX_FILES`` files into ``out``: the folder as a tarball, the report, plots, summary."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md"]
    written[0].write_text(text)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(results, arcname=results.name)
    written.append(out / "results.tar.gz")
    if (results / "README.md").exists():
        written.append(Path(shutil.copy(results / "README.md", out / "report.md")))
    for plot in sorted(results.glob("gbps_*.png"))[: MAX_FILES - len(written)]:
        written.append(Path(shutil.copy(plot, out / plot.name)))
    return written


def main(argv: list[str] | None = None) -> bool:
    """Run the campaign; True when every step succeeded."""
    parser = argparse.ArgumentParser(prog="bash scripts/dev.sh gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=ROOT / "gpu-campaign", help="where the files go")
    parser.add_argument("--dry-run", action="store_true", help="the same steps, reduced, on the CPU (interpreter)")
    parser.add_argument("--results", type=Path, help="results folder (default: bench/results/<date>_<device>/)")
    parser.add_argument("--steps", help="which steps to run, e.g. 1 or 2-6 (default: all)")
    args = parser.parse_args(argv)
    if not args.dry_run and not ON_CUDA:
        parser.error("no GPU visible: use --dry-run to rehearse the campaign on the CPU")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    results = (args.results or report.results_dir(device_label(), now)).resolve()
    all_steps = steps(results, args.dry_run)
    try:
        chosen = step_numbers(args.steps or f"1-{len(all_steps)}", len(all_steps))
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    results.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for step in (all_steps[n - 1] for n in chosen):
        print(f"campaign: {step.name} ...", flush=True)
        outcome, seconds = run_step(step, results / "campaign.log")
        outcomes.append((step, outcome, seconds))
        print(f"campaign: {step.name}: {outcome} ({seconds:.0f} s)", flush=True)
    text = summary(outcomes, results, args.dry_run)
    written = pack(results, args.outdir.resolve(), text)
    print(text)
    print("campaign: wrote " + ", ".join(str(p) for p in written))
    return all(outcome == "ok" for _, outcome, _ in outcomes)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
