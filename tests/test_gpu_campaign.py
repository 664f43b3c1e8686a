"""``bash scripts/dev.sh gpu --dry-run``: the GPU campaign's steps, reduced, on the CPU through the interpreter.

Checks that every step runs and that OUTDIR receives at most six files (a remote GPU run returns only a
few): the results tarball, the report, the plots and the summary. Nothing here looks at a speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from bench.campaign import MAX_FILES, step_numbers, steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run rehearses the campaign on a machine without a GPU")
def test_dry_run_runs_every_step_and_writes_a_few_files(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    done = subprocess.run(
        ["bash", "scripts/dev.sh", "gpu", str(out), "--dry-run", "--results", str(results)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # as in a fresh shell
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (
        done.stdout[-3000:] + done.stderr[-3000:] + (results / "campaign.log").read_text()[-3000:]
    )
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES
    assert {"summary.md", "results.tar.gz", "report.md"} <= set(files)
    assert any(name.startswith("gbps_") and name.endswith(".png") for name in files)
    summary = (out / "summary.md").read_text()
    assert "Dry run" in summary and summary.count("| ok |") == 6 and "| target | measured | met |" in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    produced_files = ("tests.xml", "README.md", "tune_attention_mix_fp32.md", "traffic_bf16.md", "experts_mix_fp32.md")
    for produced in (*produced_files, "campaign.log"):
        assert f"results/{produced}" in names, names


def test_steps_option_selects_steps():
    assert step_numbers("1", 6) == [1]
    assert step_numbers("2-6", 6) == [2, 3, 4, 5, 6]
    assert step_numbers("4,1-2", 6) == [1, 2, 4]
    for bad in ("0", "7", "3-2", "a", "1-x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--steps"):
            step_numbers(bad, 6)


def test_step_limits_fit_25_minutes_and_each_split_call_10():
    limits = [step.limit_s for step in steps(Path("results"), dry_run=False)]
    assert sum(limits) <= 25 * 60
    for split in ("1", "2", "3-6"):
        assert sum(limits[n - 1] for n in step_numbers(split, 6)) <= 10 * 60, split
