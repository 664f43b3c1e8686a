"""Memory traffic of the fused ops against their byte floors, counted through the Triton interpreter.

    python -m bench.traffic [--grid small] [--dtype bf16] [--ops attention_mix,softmax_mix] [--out DIR]

For each op, pass (``fwd``: the inference forward; ``bwd``: the backward of a recorded forward) and
shape of the grid, every kernel launch of the pass is counted (``bench/memory_traffic.py``):
**total** bytes (every unmasked lane of every load and store: what L2 must serve) and **unique**
bytes (distinct addresses: the least DRAM traffic), both as a ratio to the pass's floor
(``bench/cases.py``), with the launches and their programs. These are counts of bytes, not timings.

Counts are linear in B plus a per-program term, so each (op, pass, E, T, D) is interpreted at two
small batches only, ``B1`` and ``2 * B1``, and the grid's batches are extrapolated on the line through
them. ``B1`` is the smallest of 16, 32, ... whose launch grids (planned, not run) extrapolate exactly
to the grids planned at the grid's batches, so the per-program terms follow the same line. Persistent
kernels size their grid by the device: these counts use the CPU tensors' (interpreter's) grid.
Output: ``traffic_<dtype>.md`` and ``.json`` in DIR (default ``bench/results/<date>_<device>/``); the
Markdown is printed too.

``--experts-mix`` adds ``traffic_experts_mix_<dtype>.md``: ``fused_gate.experts_mix`` (the experts'
last layer and the gate in one kernel) at ``bench/experts_mix.py``'s MMoE shapes with B = 65536 and
T = 2, both gates, counted the same way at B = ROWS and 2 * ROWS (whole programs, so the line is exact), next
to the two-step path's bytes ``floor + 2 |H|`` (``H`` written by the experts' matmul, read by the gate).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import fused_gate as fg
from bench import experts_mix
from bench.cases import DTYPES, GRIDS, OPS, Shape, floor_bytes, make_inputs
from bench.interpreter import use_interpreter
from bench.memory_traffic import LaunchTraffic, Traffic, count_traffic
from bench.report import results_dir
from bench.timing import device_label

PASSES = ("fwd", "bwd")
COUNTS = tuple(f.name for f in fields(Traffic))


def _inputs(op: str, shape: Shape, dtype: torch.dtype, execute: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    if execute:
        return make_inputs(op, shape, dtype, "cpu")
    # Planned launches read nothing: uninitialised tensors keep a large batch's pages unallocated.
    B, E, T, D = shape.B, shape.E, shape.T, shape.D
    first = torch.empty(T, D, dtype=dtype) if op == "attention_mix" else torch.empty(B, T, E, dtype=dtype)
    h = torch.empty(B, E, D, dtype=dtype)
    inputs = [h, first] if op == "attention_mix" else [first, h]
    return [x.requires_grad_() for x in inputs], torch.empty(B, T, D, dtype=dtype)


def pass_launches(op: str, pass_: str, shape: Shape, dtype: torch.dtype, execute: bool = True) -> list[LaunchTraffic]:
    """The kernel launches of one pass on CPU tensors, counted (``execute=False``: planned only)."""
    inputs, grad_y = _inputs(op, shape, dtype, execute)
    fn = getattr(fg, op)
    if pass_ == "fwd":
        with torch.no_grad(), count_traffic(execute) as launches:
            fn(*inputs)
        return launches
    with count_traffic(execute):  # the recorded forward is not part of the backward's traffic
        y = fn(*inputs)
    with count_traffic(execute) as launches:
        torch.autograd.grad(y, inputs, grad_y)
    return launches


def _line(b: int, b1: int, v1: float, b2: int, v2: float) -> int:
    return round(v2 + (v2 - v1) * (b - b2) / (b2 - b1))


def extrapolate(first: LaunchTraffic, second: LaunchTraffic, b1: int, b2: int, batch: int) -> LaunchTraffic:
    """The counts of a launch at ``batch``, on the line through its counts at ``b1`` and ``b2``."""
    if first.kernel != second.kernel:
        raise ValueError(f"launch sequence differs between B = {b1} and B = {b2}: {first.kernel} vs {second.kernel}")
    values = {n: _line(batch, b1, getattr(first, n), b2, getattr(second, n)) for n in COUNTS}
    by_operand = {}
    for name in first.by_operand.keys() | second.by_operand.keys():
        one, two = first.by_operand.get(name, Traffic()), second.by_operand.get(name, Traffic())
        by_operand[name] = Traffic(**{n: _line(batch, b1, getattr(one, n), b2, getattr(two, n)) for n in COUNTS})
    programs = _line(batch, b1, first.programs, b2, second.programs)
    return LaunchTraffic(**values, kernel=first.kernel, programs=programs, by_operand=by_operand)


@dataclass
class PassTraffic:
    """One (op, pass, dtype, shape): its launches and the floor bytes of the pass."""

    op: str
    pass_: str
    dtype: str
    shape: Shape
    floor: int
    interpreted_at: tuple[int, int]
    launches: list[LaunchTraffic]

    @property
    def total(self) -> float:
        return sum(launch.total for launch in self.launches) / self.floor

    @property
    def unique(self) -> float:
        return sum(launch.unique for launch in self.launches) / self.floor

    def reread(self) -> dict[str, float]:
        """Operands served more than once (total / unique bytes over all launches), largest first."""
        total: dict[str, int] = {}
        unique: dict[str, int] = {}
        for launch in self.launches:
            for name, part in launch.by_operand.items():
                total[name] = total.get(name, 0) + part.total
                unique[name] = unique.get(name, 0) + part.unique
        ratios = {name: total[name] / unique[name] for name in total if unique[name]}
        return dict(sorted(ratios.items(), key=lambda kv: -kv[1]))


def _programs(op: str, pass_: str, shape: Shape, dtype: torch.dtype) -> list[int]:
    return [launch.programs for launch in pass_launches(op, pass_, shape, dtype, execute=False)]


def interpreted_batches(op: str, pass_: str, dims: tuple[int, int, int], dtype: torch.dtype, batches) -> tuple:
    """The smallest ``(B1, 2 * B1)`` (B1 = 16, 32, ...) whose launch grids extrapolate exactly to the
    grids planned at every one of ``batches``: then the counts there follow the same line."""
    E, T, D = dims
    planned = {b: _programs(op, pass_, Shape(b, E, T, D), dtype) for b in batches}
    b1 = 16
    while b1 <= max(batches):
        one, two = (_programs(op, pass_, Shape(b, E, T, D), dtype) for b in (b1, 2 * b1))
        if len(one) == len(two) and all(
            [_line(b, b1, x, 2 * b1, y) for x, y in zip(one, two, strict=True)] == planned[b] for b in batches
        ):
            return b1, 2 * b1
        b1 *= 2
    raise ValueError(f"{op} {pass_} E={E} T={T} D={D}: no batch pair extrapolates the launch grids to {batches}")


def measure(op: str, pass_: str, dims: tuple[int, int, int], batches: list[int], dtype: str) -> list[PassTraffic]:
    """:class:`PassTraffic` at each of ``batches``, extrapolated from the two :func:`interpreted_batches`."""
    E, T, D = dims
    torch_dtype = DTYPES[dtype]
    b1, b2 = interpreted_batches(op, pass_, dims, torch_dtype, batches)
    first, second = (pass_launches(op, pass_, Shape(b, E, T, D), torch_dtype) for b in (b1, b2))
    results = []
    for b in batches:
        shape = Shape(b, E, T, D)
        launches = [extrapolate(x, y, b1, b2, b) for x, y in zip(first, second, strict=True)]
        floor = floor_bytes(op, pass_, shape, torch_dtype)
        results.append(PassTraffic(op, pass_, dtype, shape, floor, (b1, b2), launches))
    return results


def traffic_table(grid: list[Shape], dtype: str, ops=OPS) -> list[PassTraffic]:
    """Every (op, pass, shape) of ``grid``; see :func:`measure`."""
    batches = sorted({s.B for s in grid})
    dims = sorted({(s.E, s.T, s.D) for s in grid}, key=lambda d: (d[2], d[0], d[1]))
    return [r for op in ops for pass_ in PASSES for d in dims for r in measure(op, pass_, d, batches, dtype)]


def markdown(results: list[PassTraffic], command: str) -> str:
    batches = sorted({r.shape.B for r in results})
    interpreted = sorted({b for r in results for b in r.interpreted_at})
    largest = batches[-1]
    head = ["op", "pass", "E", "T", "D", "launches", f"programs (B = {largest})"]
    head += [f"{kind} B = {b}" for b in batches for kind in ("total", "unique")]
    head.append(f"re-read at B = {largest} (total / unique)")
    lines = [
        f"# Memory traffic: bytes moved / floor bytes, {results[0].dtype}",
        "",
        f"Counted through the Triton interpreter (a count of bytes, not a timing); `{command}`, "
        f"{datetime.date.today()}, torch {torch.__version__}. "
        f"Interpreted at B in {{{', '.join(map(str, interpreted))}}} (two per row), the batches shown "
        "extrapolated linearly. total = every load and store; unique = distinct addresses; re-read = an "
        "operand's total / unique bytes (operands named by the kernel's parameters).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    groups: dict[tuple, dict[int, PassTraffic]] = {}
    for r in results:
        groups.setdefault((r.op, r.pass_, r.shape.E, r.shape.T, r.shape.D), {})[r.shape.B] = r
    for (op, pass_, e, t, d), by_b in groups.items():
        last = by_b[largest]
        cells = [op, pass_, e, t, d, len(last.launches), "+".join(str(x.programs) for x in last.launches)]
        cells += [f"{getattr(by_b[b], kind):.3f}" for b in batches for kind in ("total", "unique")]
        reread = [f"{name.split('=')[0]} {x:.2f}x" for name, x in last.reread().items() if x > 1.005]
        cells.append(", ".join(reread) or "-")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def to_json(results: list[PassTraffic]) -> list[dict]:
    return [
        {
            "op": r.op,
            "pass": r.pass_,
            "dtype": r.dtype,
            **vars(r.shape),
            "interpreted_at": list(r.interpreted_at),
            "floor": r.floor,
            "total_ratio": r.total,
            "unique_ratio": r.unique,
            "launches": [asdict(launch) for launch in r.launches],
        }
        for r in results
    ]


@dataclass
class ExpertsMixTraffic:
    """One experts_mix launch (counted, extrapolated to ``shape.B``) and the bytes around it."""

    gate: str
    dtype: str
    shape: experts_mix.MMoEShape
    floor: int  # the one kernel's: |X| + |W| + |b| + |C or Z| + |Y|
    expert_bytes: int  # |H|
    output_bytes: int  # |Y|
    interpreted_at: tuple[int, int]
    launches: list[LaunchTraffic]

    @property
    def two_step(self) -> int:
        """The two-step path's least bytes: the same floor, plus ``H`` written and read back."""
        return self.floor + 2 * self.expert_bytes


def _experts_mix_launches(gate: str, shape: experts_mix.MMoEShape, dtype: torch.dtype) -> list[LaunchTraffic]:
    inputs = experts_mix.make_inputs(gate, shape, dtype, "cpu")
    with torch.no_grad(), count_traffic() as launches:
        fg.experts_mix(**inputs, gate=gate)
    return launches


def measure_experts_mix(gate: str, shape: experts_mix.MMoEShape, dtype: str) -> ExpertsMixTraffic:
    """The launch at ``shape``, on the line through B = ROWS and 2 * ROWS (``shape.B`` a multiple of ROWS)."""
    from fused_gate.kernels.config import experts_mix_config

    torch_dtype = DTYPES[dtype]
    rows = experts_mix_config(shape.E, shape.K, shape.D, shape.T, torch_dtype.itemsize).rows
    if shape.B % rows:
        raise ValueError(f"B = {shape.B} is not a multiple of the {rows} rows per program: no exact line")
    b1, b2 = rows, 2 * rows
    first, second = (_experts_mix_launches(gate, replace(shape, B=b), torch_dtype) for b in (b1, b2))
    launches = [extrapolate(x, y, b1, b2, shape.B) for x, y in zip(first, second, strict=True)]
    out = shape.B * shape.T * shape.D * torch_dtype.itemsize
    floor = experts_mix.floor_bytes(gate, shape, torch_dtype)
    h = experts_mix.expert_bytes(shape, torch_dtype)
    return ExpertsMixTraffic(gate, dtype, shape, floor, h, out, (b1, b2), launches)


def experts_mix_markdown(results: list[ExpertsMixTraffic], command: str) -> str:
    head = ["gate", "shape", "launches", "programs", "stored MB", "|Y| MB", "|H| MB", "loaded unique MB"]
    head += ["loaded total MB", "one kernel unique / floor", "two-step floor MB", "one kernel / two-step"]
    lines = [
        f"# Memory traffic of experts_mix (experts' last layer + gate, one kernel), {results[0].dtype}",
        "",
        f"Counted through the Triton interpreter (a count of bytes, not a timing); `{command}`, "
        f"{datetime.date.today()}. Interpreted at B = ROWS and 2 * ROWS, extrapolated on the line. stored = "
        "every byte the launch writes: Y only, nothing of size B * E * D. two-step floor = the same floor "
        "+ 2 |H| (the experts' matmul writes H, the gate reads it back).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for r in results:
        stored = sum(x.stored for x in r.launches)
        unique_loaded = sum(x.unique_loaded for x in r.launches)
        loaded = sum(x.loaded for x in r.launches)
        unique = sum(x.unique for x in r.launches)
        cells = [r.gate, r.shape.id, len(r.launches), "+".join(str(x.programs) for x in r.launches)]
        cells += [f"{b / 1e6:.1f}" for b in (stored, r.output_bytes, r.expert_bytes, unique_loaded, loaded)]
        cells += [f"{unique / r.floor:.3f}", f"{r.two_step / 1e6:.1f}", f"{unique / r.two_step:.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def experts_mix_table(dtype: str) -> list[ExpertsMixTraffic]:
    """Both gates at the shapes of ``bench/experts_mix.py``'s ``mmoe`` list with B = 65536 and T = 2
    (the wider ones take minutes to interpret)."""
    shapes = [s for s in experts_mix.SHAPES["mmoe"] if s.B == 65536 and s.T == 2]
    return [measure_experts_mix(gate, shape, dtype) for gate in experts_mix.GATES for shape in shapes]


def main(argv: list[str] | None = None) -> Path:
    use_interpreter(on_gpu=True)  # counting needs the interpreter, also on a GPU machine
    from fused_gate.kernels import INTERPRETED

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small", help="shape grid of bench/cases.py")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ops", default=",".join(OPS), help="comma list of " + ",".join(OPS))
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<date>_<device>/)")
    parser.add_argument("--experts-mix", action="store_true", help="also count experts_mix (see above)")
    args = parser.parse_args(argv)
    if not INTERPRETED:
        parser.error("the kernels were defined before TRITON_INTERPRET=1 was set; run python -m bench.traffic")
    ops = [op for op in args.ops.split(",") if op]
    if unknown := sorted(set(ops) - set(OPS)):
        parser.error(f"--ops: unknown {unknown}; expected some of {list(OPS)}")
    results = traffic_table(GRIDS[args.grid], args.dtype, ops)
    out = args.out or results_dir(device_label(), datetime.datetime.now(datetime.timezone.utc).isoformat())
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"traffic_{args.dtype}"
    text = markdown(results, " ".join(["python -m bench.traffic", *argv]))
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(to_json(results), indent=1))
    print(text)
    if args.experts_mix:
        mixed = experts_mix_markdown(experts_mix_table(args.dtype), " ".join(["python -m bench.traffic", *argv]))
        (out / f"traffic_experts_mix_{args.dtype}.md").write_text(mixed)
        print(mixed)
    return out


if __name__ == "__main__":
    main()
