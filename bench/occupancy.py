"""Occupancy on an H100 of every kernel configuration the launch heuristic picks on the bench's full grid.

    python -m bench.occupancy [--out DIR]

Compiles the planned launches for sm_90 ahead of time (``python -m tests.aot --occupancy``, in a child
process without ``TRITON_INTERPRET``; no GPU needed), reads registers per thread and shared memory off
each cubin, and computes with the H100's per-SM limits (65536 registers allocated per warp in units of
256, 64 warps, 32 programs, 228 KB of shared memory with 1 KB reserved per program) how many programs
and warps are resident per SM, and the bytes of the expert tile (``ROWS x BLOCK_E x BLOCK_D``, bf16)
that the resident programs load in one wave. A configuration with fewer than ``MIN_WARPS`` resident
warps is listed with the limit that binds. Output: ``occupancy_h100.md`` and ``.json`` in DIR (default
``bench/results/occupancy/``); the Markdown is printed too.

Both record the :func:`fingerprint` of what the table is computed from (``SOURCES`` and the grid), so
``tests/test_compile.py`` can tell, without compiling, that the committed table is still current.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.cases import GRIDS

ROOT = Path(__file__).resolve().parent.parent
# The bench's full grid as (E, D, T): B does not change the configuration.
SHAPES = sorted({(s.E, s.D, s.T) for s in GRIDS["full"]})
# What the compiled registers and this table's text depend on, besides the grid and triton's version.
SOURCES = ("kernels/*.py", "tests/aot.py", "bench/occupancy.py")
MIN_WARPS = 16
BF16_BYTES = 2


@dataclass(frozen=True)
class SM:
    """Per-SM limits of a GPU (sm_90: H100)."""

    name: str = "H100"
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    warps: int = 64
    programs: int = 32
    shared_bytes: int = 228 * 1024
    shared_reserved: int = 1024  # per program


H100 = SM()


def fingerprint() -> str:
    """A SHA-256 prefix of the ``SOURCES`` files (paths and text, line endings normalised) and the grid's
    shapes: it changes whenever a change there can change the table."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in SOURCES for p in ROOT.glob(pattern)):
        text = path.read_bytes().replace(b"\r\n", b"\n")
        digest.update(f"{path.relative_to(ROOT).as_posix()}\0{len(text)}\0".encode() + text)
    digest.update(repr(SHAPES).encode())
    return digest.hexdigest()[:16]


def resident(registers: int, warps: int, shared: int, sm: SM = H100) -> tuple[int, str]:
    """Programs resident per SM and the limit that binds (``registers``, ``warps``, ``programs``, ``shared``)."""
    per_warp = -(-registers * 32 // sm.register_unit) * sm.register_unit
    limits = {
        "registers": sm.registers // (per_warp * warps),
        "warps": sm.warps // warps,
        "programs": sm.programs,
        "shared": sm.shared_bytes // (shared + sm.shared_reserved),
    }
    binding = min(limits, key=limits.get)
    return limits[binding], binding


@dataclass
class Occupancy:
    op: str
    pass_: str
    kernel: str
    E: int
    T: int
    D: int
    rows: int
    block_e: int
    block_d: int
    registers: int
    warps: int
    shared: int
    programs_per_sm: int
    warps_per_sm: int
    limit: str
    tile_bytes_in_flight: int


def compile_records(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """``tests/aot.py``'s records for the no-option launches of ``shapes`` (E, D, T) on sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = ";".join(f"{e},{d},{t}" for e, d, t in shapes)
    run = subprocess.run(
        [sys.executable, "-m", "tests.aot", "--occupancy", spec], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if run.returncode != 0:
        sys.exit(f"AOT compilation failed:\n{run.stderr[-5000:]}")
    return json.loads(run.stdout)


def occupancy_rows(records: list[dict], sm: SM = H100) -> list[Occupancy]:
    """One row per compiled gate kernel (the small dC reduction is left out: it is not the hot loop)."""
    from fused_gate.kernels.config import tile_config  # here, so importing this module loads no kernel

    rows = []
    for r in records:
        _, e, d, t, attention, _ = r["case"]
        backward = "bwd" in r["kernel"]
        if "gate_mix" not in r["kernel"]:
            continue
        cfg = tile_config(e, d, t, backward)
        programs, limit = resident(r["REG"], r["num_warps"], r["SHARED"], sm)
        rows.append(
            Occupancy(
                op="attention_mix" if attention else "softmax_mix",
                pass_="bwd" if backward else "fwd",
                kernel=r["kernel"],
                E=e,
                T=t,
                D=d,
                rows=cfg.rows,
                block_e=cfg.block_e,
                block_d=cfg.block_d,
                registers=r["REG"],
                warps=r["num_warps"],
                shared=r["SHARED"],
                programs_per_sm=programs,
                warps_per_sm=programs * r["num_warps"],
                limit=limit,
                tile_bytes_in_flight=programs * cfg.rows * cfg.block_e * cfg.block_d * BF16_BYTES,
            )
        )
    return sorted(rows, key=lambda o: (o.op, o.pass_, o.E, o.T, o.D))


def _span(values: list[int], fmt=str) -> str:
    low, high = min(values), max(values)
    return fmt(low) if low == high else f"{fmt(low)}-{fmt(high)}"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def _why(o: Occupancy, sm: SM = H100) -> str:
    if o.limit == "registers":
        return f"{o.registers} registers x {32 * o.warps} threads: {o.programs_per_sm} program(s) in {sm.registers}"
    if o.limit == "shared":
        return f"{o.shared} B of shared memory per program"
    return f"{o.warps} warps per program"


def markdown(rows: list[Occupancy], stamp: str, sm: SM = H100) -> str:
    lines = [
        f"# Occupancy on an {sm.name} (sm_90 compile, no GPU): the bench's full grid, no option",
        "",
        stamp,
        "",
        "Registers per thread from the cubin; resident programs and warps per SM from the per-SM limits; "
        "tile in flight = the resident programs' expert tiles (ROWS x BLOCK_E x BLOCK_D, bf16) in one load wave.",
        "",
        "| op | pass | shapes | registers | warps per program | resident warps per SM | tile in flight per SM "
        f"| below {MIN_WARPS} warps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], list[Occupancy]] = {}
    for o in rows:
        groups.setdefault((o.op, o.pass_), []).append(o)
    for (op, pass_), group in groups.items():
        low = sum(o.warps_per_sm < MIN_WARPS for o in group)
        lines.append(
            f"| {op} | {pass_} | {len(group)} | {_span([o.registers for o in group])} | "
            f"{_span([o.warps for o in group])} | {_span([o.warps_per_sm for o in group])} | "
            f"{_span([o.tile_bytes_in_flight for o in group], _kib)} | {low} |"
        )
    head = "| op | pass | E | T | D | ROWS x BLOCK_E x BLOCK_D | registers | warps | programs per SM | warps per SM "
    head += "| tile in flight | limit |"
    table = [head, "|" + " --- |" * 12]
    for o in rows:
        table.append(
            f"| {o.op} | {o.pass_} | {o.E} | {o.T} | {o.D} | {o.rows} x {o.block_e} x {o.block_d} | {o.registers} "
            f"| {o.warps} | {o.programs_per_sm} | {o.warps_per_sm} | {_kib(o.tile_bytes_in_flight)} | {o.limit} |"
        )
    exceptions = [o for o in rows if o.warps_per_sm < MIN_WARPS]
    lines += ["", f"## Below {MIN_WARPS} resident warps per SM", ""]
    if exceptions:
        lines += ["| op | pass | E | T | D | warps per SM | why |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [
            f"| {o.op} | {o.pass_} | {o.E} | {o.T} | {o.D} | {o.warps_per_sm} | {_why(o, sm)} |" for o in exceptions
        ]
    else:
        lines.append("None.")
    return "\n".join([*lines, "", "## Every configuration", "", *table]) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.occupancy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "occupancy", help="output folder")
    args = parser.parse_args(argv)
    sources, triton = fingerprint(), importlib.metadata.version("triton")
    rows = occupancy_rows(compile_records(SHAPES))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = (
        f"`python -m bench.occupancy`, triton {triton}; sources fingerprint `{sources}` "
        f"({', '.join(f'`{p}`' for p in SOURCES)} and the grid: `tests/test_compile.py` checks it is current)."
    )
    text = markdown(rows, stamp)
    (args.out / "occupancy_h100.md").write_text(text)
    record = {"fingerprint": sources, "triton": triton, "configurations": [asdict(o) for o in rows]}
    (args.out / "occupancy_h100.json").write_text(json.dumps(record, indent=1))
    print(text)
    return args.out


if __name__ == "__main__":
    main()
