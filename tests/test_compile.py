"""Every kernel configuration compiles for sm_80 and sm_90 without register spills (no GPU needed).

The compilation runs once, in a child process without ``TRITON_INTERPRET`` (see ``tests/aot.py``
for the configurations and the method); these tests check its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .aot import ci_cases

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> dict[tuple, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.aot"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, f"AOT compilation failed:\n{run.stderr[-5000:]}"
    by_case: dict[tuple, list[dict]] = {}
    for record in json.loads(run.stdout):
        *shape, options = record["case"]
        by_case.setdefault((*shape, tuple(options)), []).append(record)
    return by_case


@pytest.mark.parametrize(("capability", "experts", "dim", "tasks", "attention", "options"), ci_cases())
def test_compiles_without_spills(report, capability, experts, dim, tasks, attention, options):
    records = report[(capability, experts, dim, tasks, attention, options)]
    names = {r["kernel"] for r in records}
    assert {"gate_mix_fwd_kernel", "gate_mix_bwd_kernel"} <= names
    for r in records:
        assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['kernel']} spills on sm_{capability}: {r}"


def test_addresses_are_64_bit(report):
    """``B * E * D > 2**31`` must not overflow: expert-tile addresses are widened to 64 bits."""
    gate_kernels = [
        r
        for records in report.values()
        for r in records
        if r["kernel"].startswith("gate_mix") and r["case"][1] > 1 and r["case"][2] > 1
    ]
    assert gate_kernels and all(r["wide_addresses"] for r in gate_kernels)
