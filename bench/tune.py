"""Tuning sweep: time the kernels under tile configurations around the heuristic one.

    python -m bench.tune [--op attention_mix] [--dtype bf16] [--batch 65536] [--shapes E,T,D ...] [--out DIR]

For each shape and pass (forward, backward) it builds the launches of every candidate
``TileConfig`` (``kernels/config.py``): the heuristic's choice and its neighbours (half and double
the rows per program and the warps; half and double the D chunk when D is chunked). It checks each
candidate's result against the float64 reference, times the launches alone (outputs allocated
beforehand; ``triton.testing.do_bench`` on a GPU), and reports the heuristic's time next to the best
candidate's. Output: ``tune_<op>_<dtype>.md`` and ``.json`` in DIR (default
``bench/results/<date>_<device>/``). On the CPU (Triton interpreter) it checks the candidates but its
times mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import fused_gate as fg
from bench.cases import DTYPES, Shape, floor_bytes, make_inputs
from bench.interpreter import use_interpreter
from bench.report import results_dir
from bench.timing import ON_CUDA, device_label

# triton and the kernels are imported where they are used: the kernels, and triton.language's own
# jit functions, are defined for the interpreter only if TRITON_INTERPRET is set first (main() does).
if TYPE_CHECKING:
    from fused_gate.kernels.config import TileConfig
    from fused_gate.kernels.launch import KernelLaunch

# Relative error (to the output's magnitude) beyond which a candidate is reported wrong: the rounding
# of the output dtype, with margin.
WRONG = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}
DEFAULT_SHAPES = {
    "cuda": [(4, 1, 64), (8, 4, 256), (8, 8, 128), (16, 8, 512), (64, 2, 1024)],
    "cpu": [(3, 2, 8), (3, 2, 24)],
}


def candidates(experts: int, dim: int, tasks: int, backward: bool) -> list[TileConfig]:
    """The heuristic's config first, then its neighbours in rows, warps and D chunk."""
    import triton

    from fused_gate.kernels.config import MAX_ROWS, MAX_WARPS, MIN_BLOCK_D, TileConfig, tile_config

    base = tile_config(experts, dim, tasks, backward)
    full_d = triton.next_power_of_2(dim)
    # A smaller D chunk than the heuristic's (walking D twice) trades L2 traffic for registers.
    chunks = {base.block_d, max(MIN_BLOCK_D, base.block_d // 2), min(full_d, 2 * base.block_d)}
    rows = {max(1, base.rows // 2), base.rows, min(MAX_ROWS, 2 * base.rows)}
    warps = {max(1, base.num_warps // 2), base.num_warps, min(MAX_WARPS, 2 * base.num_warps)}
    found = [base]
    for block_d, r, w in itertools.product(sorted(chunks), sorted(rows), sorted(warps)):
        config = TileConfig(base.block_t, base.block_e, block_d, r, w, single_chunk=block_d >= dim)
        if config not in found:
            found.append(config)
    return found


def time_launches(launches: list[KernelLaunch]) -> float:
    """Seconds per run of the launches (median)."""

    def run() -> None:
        for launch in launches:
            launch.launch()

    if ON_CUDA:
        import triton.testing

        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest error over the outputs, each relative to its magnitude (at least 1)."""
    errors = [(g.double() - w).abs().max() / w.abs().max().clamp(min=1.0) for g, w in zip(got, want, strict=True)]
    return float(max(errors))


def sweep_shape(op: str, shape: Shape, dtype: str, device: str) -> list[dict]:
    """One record per (pass, candidate): the config, its seconds, GB/s and error against float64."""
    attention = op == "attention_mix"
    inputs, grad_y = make_inputs(op, shape, DTYPES[dtype], device)
    inputs = [x.detach() for x in inputs]
    exact = [x.double().requires_grad_() for x in inputs]
    y_ref = getattr(fg.reference, op)(*exact)
    grads_ref = torch.autograd.grad(y_ref, exact, grad_y.double())
    h, q = (inputs[0], inputs[1]) if attention else (inputs[1], inputs[0])
    scale = shape.D**-0.5 if attention else 1.0
    gate = "attention" if attention else "softmax"

    plans: dict[str, Callable[[TileConfig], tuple[list[torch.Tensor], list[KernelLaunch]]]] = {
        "fwd": lambda cfg: _forward_plan(h, q, scale, gate, cfg),
        "bwd": lambda cfg: _backward_plan(grad_y, h, q, scale, gate, cfg),
    }
    y_ref = y_ref.detach()
    expected = {"fwd": [y_ref], "bwd": [grads_ref[0], grads_ref[1]] if attention else [grads_ref[1], grads_ref[0]]}
    records = []
    for pass_, plan in plans.items():
        for i, config in enumerate(candidates(shape.E, shape.D, shape.T, backward=pass_ == "bwd")):
            outputs, launches = plan(config)
            for launch in launches:
                launch.launch()
            error = _relative_error(outputs, expected[pass_])
            seconds = time_launches(launches)
            records.append(
                {
                    **vars(shape),
                    "pass": pass_,
                    "heuristic": i == 0,
                    "config": asdict(config),
                    "seconds": seconds,
                    "gbps": floor_bytes(op, pass_, shape, DTYPES[dtype]) / seconds / 1e9,
                    "error": error,
                    "correct": error <= WRONG[dtype],
                }
            )
    return records


def _forward_plan(h, q, scale, gate, config):
    from fused_gate.kernels.gate_mix_fwd import plan_forward

    plan = plan_forward(h, q, None, scale, None, gate=gate, return_weights=False, config=config)
    return [plan.outputs[0]], list(plan.launches)


def _backward_plan(grad_y, h, q, scale, gate, config):
    from fused_gate.kernels.gate_mix_bwd import plan_backward

    plan = plan_backward(grad_y, None, h, q, None, scale, gate=gate, config=config)
    return list(plan.outputs), list(plan.launches)


def best(records: list[dict]) -> dict:
    """The fastest correct record (the heuristic's when none is correct, so the report shows it)."""
    correct = [r for r in records if r["correct"]]
    return min(correct, key=lambda r: r["seconds"]) if correct else records[0]


def _config_text(config: dict) -> str:
    return f"rows {config['rows']}, warps {config['num_warps']}, D chunk {config['block_d']}"


def markdown(op: str, dtype: str, batch: int, records: list[dict], command: str) -> str:
    lines = [
        f"# Tuning sweep: {op} {dtype}, B = {batch}, {device_label()}",
        "",
        f"torch {torch.__version__}, triton {importlib.metadata.version('triton')}, {datetime.date.today()}; "
        f"`{command}`",
        "",
        "Kernel launches only (outputs allocated beforehand). gain = heuristic time / best time.",
        "",
        "| E | T | D | pass | heuristic | µs | GB/s | best | µs | GB/s | gain | wrong candidates |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = itertools.groupby(records, key=lambda r: (r["E"], r["T"], r["D"], r["pass"]))
    for (e, t, d, pass_), group in groups:
        group = list(group)
        base, top = group[0], best(group)
        wrong = sum(not r["correct"] for r in group)
        lines.append(
            f"| {e} | {t} | {d} | {pass_} | {_config_text(base['config'])} | {base['seconds'] * 1e6:.1f} | "
            f"{base['gbps']:.3g} | {_config_text(top['config'])} | {top['seconds'] * 1e6:.1f} | "
            f"{top['gbps']:.3g} | {base['seconds'] / top['seconds']:.2f}x | {wrong} |"
        )
    return "\n".join(lines) + "\n"


def _shape_arg(text: str) -> tuple[int, int, int]:
    try:
        e, t, d = (int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a shape is E,T,D (three integers), got {text!r}") from err
    return e, t, d


def main(argv: list[str] | None = None) -> Path:
    use_interpreter()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=("attention_mix", "softmax_mix"), default="attention_mix")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if ON_CUDA else "fp32")
    parser.add_argument("--batch", type=int, default=65536 if ON_CUDA else 5)
    parser.add_argument("--shapes", type=_shape_arg, nargs="+", help="E,T,D triples (default: by device)")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<date>_<device>/)")
    args = parser.parse_args(argv)
    device = "cuda" if ON_CUDA else "cpu"
    shapes = [Shape(args.batch, e, t, d) for e, t, d in args.shapes or DEFAULT_SHAPES[device]]
    records = [r for shape in shapes for r in sweep_shape(args.op, shape, args.dtype, device)]
    out = args.out or results_dir(device_label(), datetime.datetime.now(datetime.timezone.utc).isoformat())
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tune_{args.op}_{args.dtype}"
    command = " ".join(["python -m bench.tune", *argv])
    stem.with_suffix(".json").write_text(json.dumps({"device": device_label(), "records": records}, indent=1))
    stem.with_suffix(".md").write_text(markdown(args.op, args.dtype, args.batch, records, command))
    print(f"tune: {stem.with_suffix('.md')} ({len(records)} candidates over {len(shapes)} shapes)")
    return out


if __name__ == "__main__":
    main()
