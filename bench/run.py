"""One command from nothing to a benchmark report: run the suite, then write the report.

    python -m bench.run [--out DIR] [pytest and bench options, e.g. --grid full --dtypes bf16,fp16 -k fwd]

Runs ``pytest bench`` with ``--benchmark-json=DIR/run-<UTC time>.json`` and then ``bench.report`` on
every ``run-*.json`` in DIR, so runs split over several calls on the same device and day (default DIR:
``bench/results/<date>_<device>/``) merge into one report; a later run's measurement of a case wins.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

from bench import report
from bench.timing import device_label

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<date>_<device>/)")
    args, pytest_args = parser.parse_known_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    env = dict(os.environ, FUSED_GATE_BENCH_COMMAND=shlex.join(["python", "-m", "bench.run", *argv]))
    out = (args.out or report.results_dir(device_label(), now.isoformat())).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / f"run-{now:%Y%m%dT%H%M%SZ}.json"
    command = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider"]
    command += ["-W", "ignore::DeprecationWarning", f"--benchmark-json={run_json}", *pytest_args]
    done = subprocess.run(command, cwd=ROOT, env=env)
    if done.returncode != 0 or not run_json.exists():
        sys.exit(f"bench: pytest exited with {done.returncode}; no report written")
    report.main([*map(str, sorted(out.glob("run-*.json"))), "--out", str(out)])
    return out


if __name__ == "__main__":
    main()
