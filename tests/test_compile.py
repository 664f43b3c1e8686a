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

from bench.occupancy import fingerprint, resident

from .aot import ci_cases, experts_mix_cases

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
        assert_launchable(r)


def assert_launchable(record: dict) -> None:
    """One program's registers must fit an SM's 65536, or the launch fails ("out of resources")."""
    assert record["REG"] * 32 * record["num_warps"] <= 65536, f"{record['kernel']} cannot launch: {record}"


@pytest.mark.parametrize("case", experts_mix_cases(), ids=lambda c: "-".join(map(str, c[1:-1])) + "-" + "+".join(c[-1]))
def test_experts_mix_compiles_without_spills(report, case):
    (record,) = report[(*case[:-1], case[-1])]
    assert record["kernel"] in ("experts_mix_one_pass_kernel", "experts_mix_two_pass_kernel")
    assert record["STACK"] == 0 and record["LOCAL"] == 0, f"experts_mix spills on sm_{case[1]}: {record}"
    assert_launchable(record)


def test_addresses_are_64_bit(report):
    """``B * E * D > 2**31``, or a small operand in a transposed layout, must not overflow: no load
    or store offset of any kernel comes from 32-bit arithmetic on a caller's value."""
    kernels = [r for case, records in report.items() if case != ("probe", ()) for r in records]
    assert kernels
    for r in kernels:
        assert not r["narrow_address_arithmetic"], f"{r['kernel']} {r['case']}: {r['narrow_address_arithmetic']}"


def test_address_analysis_flags_32_bit_offsets(report):
    """The analysis itself (``tests/address_width.py``): ``t * stride`` in 32 bits is flagged, the
    widened form is not."""
    probes = {r["kernel"]: r["narrow_address_arithmetic"] for r in report[("probe", ())]}
    assert any("arith.muli" in line for line in probes["probe_narrow"])
    assert probes["probe_wide"] == []


def test_h100_occupancy_model_on_hand_numbers():
    # 223 registers round up to 7168 per warp: one 8-warp program fits 65536 registers.
    assert resident(223, 8, 0) == (1, "registers")
    # 64 registers: 2048 per warp, 4 programs of 8 warps; 40 KiB of shared memory would allow 5.
    assert resident(64, 8, 40 * 1024) == (4, "registers")
    assert resident(32, 1, 0) == (32, "programs")
    assert resident(32, 4, 100 * 1024) == (2, "shared")


OCCUPANCY = ROOT / "bench" / "results" / "occupancy"
REGENERATE = "regenerate it with `python -m bench.occupancy` (an sm_90 compile, no GPU) and commit the result"


def test_occupancy_table_is_current():
    """The committed occupancy table records the fingerprint of the sources and grid it was computed from
    (``bench.occupancy.fingerprint``); a change there makes it stale. Checked without compiling."""
    recorded = json.loads((OCCUPANCY / "occupancy_h100.json").read_text())["fingerprint"]
    assert recorded == fingerprint(), f"bench/results/occupancy/ was computed from other sources: {REGENERATE}"
    assert f"sources fingerprint `{recorded}`" in (OCCUPANCY / "occupancy_h100.md").read_text(), REGENERATE


def test_benchmarks_page_shows_the_occupancy_summary():
    """docs/benchmarks.md copies the table's summary (its first Markdown table)."""
    lines = (OCCUPANCY / "occupancy_h100.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| op |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    summary = "\n".join(lines[start:end])
    assert summary in (ROOT / "docs" / "benchmarks.md").read_text(), (
        f"docs/benchmarks.md's occupancy summary differs from bench/results/occupancy/occupancy_h100.md's:\n{summary}"
    )
