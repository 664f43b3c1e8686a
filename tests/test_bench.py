"""The benchmark suite as a smoke check: it runs end to end and its report holds every case.

On the CPU the suite runs the ``smoke`` grid through the Triton interpreter; nothing here looks at a
speed. The byte floors and the target logic of the report are checked on hand-made numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_gate as fg
from bench.cases import GRIDS, OPS, PASSES, Shape, floor_bytes, impls_for, make_inputs, op_function
from bench.report import NOT_MEASURED, Case, results_dir, target_rows

ROOT = Path(__file__).resolve().parent.parent


def test_floor_bytes_match_the_stated_formulas():
    shape = Shape(B=10, E=3, T=2, D=5)
    h, y, c, z = 10 * 3 * 5 * 2, 10 * 2 * 5 * 2, 2 * 5 * 2, 10 * 2 * 3 * 2  # bf16: 2 bytes each
    assert floor_bytes("attention_mix", "fwd", shape, torch.bfloat16) == h + y + c
    assert floor_bytes("attention_mix", "bwd", shape, torch.bfloat16) == 2 * h + y + c
    assert floor_bytes("softmax_mix", "fwd", shape, torch.bfloat16) == h + z + y
    assert floor_bytes("softmax_mix", "bwd", shape, torch.bfloat16) == 2 * h + y + 2 * z
    assert floor_bytes("softmax_mix", "fwd+bwd", shape, torch.float32) == 2 * (h + z + y + 2 * h + y + 2 * z)


def test_full_grid_is_every_stated_shape():
    grid = GRIDS["full"]
    assert len(grid) == len(set(grid)) == 4 * 4 * 5 * 3
    assert {s.E for s in grid} == {4, 8, 16, 64} and {s.T for s in grid} == {1, 2, 4, 8}
    assert {s.D for s in grid} == {64, 128, 256, 512, 1024} and {s.B for s in grid} == {256, 4096, 65536}
    assert "sdpa" in impls_for("attention_mix") and "sdpa" not in impls_for("softmax_mix")


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_every_peer_computes_the_same_gate(op, device):
    """The comparison is fair: each implementation returns the reference's Y on the same inputs."""
    inputs, _ = make_inputs(op, Shape(6, 3, 2, 16), torch.float32, device)
    want = getattr(fg.reference, op)(*inputs)
    for impl in impls_for(op):
        if impl != "copy":
            torch.testing.assert_close(op_function(op, impl)(*inputs), want, msg=lambda m, impl=impl: f"{impl}: {m}")


def _case(pass_: str, B: int, fused: float, **peers: float) -> Case:
    return Case("attention_mix", pass_, "bf16", B, 8, 4, 256, bytes=1000, seconds={"fused": fused, **peers})


def test_report_targets_say_met_only_when_every_shape_meets_them():
    cases = [
        _case("fwd", 65536, 1.0, copy=0.95),  # 95% of copy
        _case("fwd", 65536, 1.0, copy=0.85),  # 85% of copy: below 90%
        _case("bwd", 65536, 1.0, copy=0.9),
        _case("fwd+bwd", 65536, 1.0, eager=3.0, **{"compile-max": 1.6, "sdpa": 1.9}),
        _case("fwd", 256, 8e-6),
    ]
    rows = target_rows(cases)

    def met(target: str) -> str:
        (answer,) = [ok for text, _, ok in rows if text == target]
        return answer

    assert len(rows) == 6
    assert met("attention_mix fwd ≥ 90% of copy bandwidth (B = 65536)") == "no"
    assert met("attention_mix bwd ≥ 80% of copy bandwidth (B = 65536)") == "yes"
    assert met("attention_mix fwd+bwd ≥ 2x eager") == "yes"
    assert met("attention_mix fwd+bwd ≥ 1.5x compile max-autotune") == "yes"
    assert met("attention_mix fwd+bwd ≥ 2x SDPA") == "no"
    assert met("attention_mix fwd at B = 256 ≤ ~10 µs") == "yes"
    assert {ok for _, _, ok in target_rows(cases, interpreted=True)} == {NOT_MEASURED}


def test_results_folder_keeps_whole_words():
    assert results_dir("NVIDIA H100 80GB HBM3", "2026-01-02T03:04").name == "2026-01-02_nvidia-h100-80gb-hbm3"
    name = results_dir("cpu (Triton interpreter; timings meaningless)", "2026-01-02", max_slug=28).name
    assert name == "2026-01-02_cpu-triton-interpreter"
    assert results_dir("x" * 60, "2026-01-02", max_slug=30).name == "2026-01-02_" + "x" * 30


IMPORT_EVERY_BENCH_MODULE = """
import importlib, json, os, pkgutil, sys
before = dict(os.environ)
import bench
names = ["bench"] + [f"bench.{module.name}" for module in pkgutil.iter_modules(bench.__path__)]
changed = {}
for name in names:
    importlib.import_module(name)
    changed[name] = sorted(k for k in os.environ.keys() | before.keys() if os.environ.get(k) != before.get(k))
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "triton" or name.startswith("fused_gate.kernels"))
print(json.dumps({"modules": names, "changed": {k: v for k, v in changed.items() if v}, "loaded": loaded}))
"""


def test_importing_bench_changes_no_environment_and_imports_no_triton():
    """Importing ``bench`` and each of its modules leaves ``os.environ`` as it was and imports neither triton
    nor the kernels, so each command's ``main()`` (``bench/conftest.py`` for ``pytest bench``) still decides
    how they run: ``TRITON_INTERPRET`` counts when ``triton.language`` and the kernels are defined."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_BENCH_MODULE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert {"bench.conftest", "bench.traffic", "bench.tune", "bench.swap_in_step"} <= set(found["modules"])
    assert found["changed"] == {}, f"importing these changed the environment: {found['changed']}"
    assert found["loaded"] == [], f"importing bench imported {found['loaded']}"


@pytest.mark.slow
def test_bench_suite_runs_and_reports(tmp_path):
    """``python -m bench.run`` (the command of docs/benchmarks.md) times every case and writes the report.

    It starts from an environment without ``TRITON_INTERPRET``, as a fresh shell does: without a GPU
    ``bench/conftest.py`` sets it, so the kernels run interpreted.
    """
    args = ["--out", str(tmp_path), "--grid", "smoke", "--dtypes", "fp32"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_json,) = tmp_path.glob("run-*.json")
    run = json.loads(run_json.read_text())
    assert run["machine_info"]["fused_gate"]["command"] == " ".join(["python -m bench.run", *args])
    expected = {
        (op, pass_, impl, shape.id)
        for op in ("attention_mix", "softmax_mix")
        for pass_ in PASSES
        for impl in impls_for(op)
        for shape in GRIDS["smoke"]
    }
    seen = set()
    for bench in run["benchmarks"]:
        x = bench["extra_info"]
        seen.add((x["op"], x["pass"], x["impl"], Shape(x["B"], x["E"], x["T"], x["D"]).id))
        assert x["bytes"] > 0 and x["gbps"] > 0
    assert seen == expected

    text = (tmp_path / "README.md").read_text()
    assert "CPU smoke run" in text and "## Performance targets" in text
    assert f"| {NOT_MEASURED} |" in text and "| no |" not in text and "| yes |" not in text
    for op in ("attention_mix", "softmax_mix"):
        for pass_ in PASSES:
            assert f"## {op} {pass_}\n" in text
        for figure in ("gbps", "speedup"):
            image = tmp_path / f"{figure}_{op}_fp32.png"
            assert image.stat().st_size > 10_000
            assert f"]({image.name})" in text


def test_experts_mix_floor_is_the_stated_bytes():
    """B = 65536, K = 512, E = 8, D = 256, T = 2 in bf16: about 670 MB in two steps, 130 MB in one kernel."""
    from bench.experts_mix import MMoEShape, expert_bytes, floor_bytes

    shape = MMoEShape(B=65536, K=512, E=8, D=256, T=2)
    one = floor_bytes("attention", shape, torch.bfloat16)
    assert one == 2 * (65536 * 512 + 8 * 512 * 256 + 8 * 256 + 2 * 256 + 65536 * 2 * 256)
    assert round(one / 1e6) == 136 and round((one + 2 * expert_bytes(shape, torch.bfloat16)) / 1e6) == 673


def test_experts_mix_bench_runs_end_to_end(tmp_path):
    from bench import experts_mix

    experts_mix.main(["--shapes", "smoke", "--impls", "one-kernel,two-step,eager", "--out", str(tmp_path)])
    text = (tmp_path / "experts_mix_fp32.md").read_text()
    assert text.count("\n| attention |") == 1 and text.count("\n| softmax |") == 1
    assert "two-step / one-kernel time" in text and "not kernel speeds" in text
    records = json.loads((tmp_path / "experts_mix_fp32.json").read_text())
    assert {(r["gate"], r["impl"]) for r in records} == {
        (g, i) for g in ("attention", "softmax") for i in ("one-kernel", "two-step", "eager")
    }
    assert all(r["seconds"] > 0 and r["gbps"] > 0 for r in records)


def test_interleaved_rounds_alternate_and_give_a_ratio_each():
    """A then B, B then A, ...: the same calls per round for both, one ratio per round."""
    from bench.interleaved import compare

    log: list[str] = []
    comparison = compare(lambda: log.append("a"), lambda: log.append("b"), rounds=4, round_s=0.0, warmup=1)
    # A warm-up call of each, two of each to size a round (one call per round here), then the rounds.
    assert "".join(log) == "ab" + "aabb" + "ab" + "ba" + "ab" + "ba"
    assert len(comparison.ratios) == 4 and all(r > 0 for r in comparison.ratios)
    median, q1, q3 = comparison.ratio()
    assert q1 <= median <= q3


def test_cpu_fallback_table_runs(capsys):
    """bench.cpu_fallback, tiny: one row per op, batch size and pass, times and a ratio each."""
    from bench import cpu_fallback

    argv = ["--batch", "4", "--experts", "3", "--dim", "5", "--tasks", "2", "--rounds", "2", "--round-ms", "1"]
    cpu_fallback.main([*argv, "--warmup", "0", "--clock", "cpu"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    cells = [[cell.strip() for cell in row.strip("| ").split(" | ")] for row in rows]
    assert [(c[0], c[2]) for c in cells] == [(op, p) for op in OPS for p in ("fwd", "fwd+bwd")]
    assert all(float(c[3]) > 0 and float(c[4]) > 0 and float(c[5].split()[0]) > 0 for c in cells)
