"""MMoE inference, the experts' last layer and the gate: four implementations timed on the same inputs.

    python -m bench.experts_mix [--shapes mmoe|smoke] [--gates softmax,attention] [--dtype bf16]
                                [--impls one-kernel,two-step,eager,compile] [--rounds N] [--out DIR]

Each case is an MMoE layer's inference forward ``Y = gate(relu(X W_e + b_e))`` at one shape
``(B, K, E, D, T)`` (``K`` the input width, ``D`` the experts' width), under ``torch.no_grad()``:

- ``one-kernel``: ``fused_gate.experts_mix`` (``H`` is never written);
- ``two-step``: the experts as one batched matmul (``einsum`` + bias + ReLU, ``H [B, E, D]`` in
  memory), then the fused gate ``fused_gate.attention_mix`` / ``softmax_mix`` on it;
- ``eager``: the whole layer as eager PyTorch code writes it (the gate as in ``bench/cases.py``);
- ``compile``: that eager layer under ``torch.compile`` (default mode).

The softmax gate's logits ``Z [B, T, E]`` are an input of every implementation (the gate's own Linear
runs outside). ``GB/s`` is the one kernel's byte floor ``|X| + |W| + |b| + |C or Z| + |Y|`` over each
implementation's median time, so GB/s compare as speeds do; ``ratio`` is an implementation's time over
the one kernel's. ``two-step`` also moves ``2 |H|`` (written, then read back), a column of the table.
Output: ``experts_mix_<dtype>.md`` and ``.json`` in DIR (default ``bench/results/<date>_<device>/``),
the Markdown printed too. Without a GPU the kernels run through the Triton interpreter: a smoke
check of the command, whose times mean nothing (the table says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

import fused_gate as fg
from bench.cases import DTYPES, EAGER
from bench.interpreter import use_interpreter
from bench.report import results_dir
from bench.timing import ON_CUDA, device_clock, device_label, iterations_for
from fused_gate._validation import GATES
from fused_gate.apps.arguments import comma_list, integer

IMPLS = ("one-kernel", "two-step", "eager", "compile")


@dataclass(frozen=True)
class MMoEShape:
    B: int
    K: int
    E: int
    D: int
    T: int

    @property
    def id(self) -> str:
        return f"B{self.B}-K{self.K}-E{self.E}-D{self.D}-T{self.T}"


SHAPES: dict[str, list[MMoEShape]] = {
    # The bench's gate shapes (bench/cases.py "small": (E, T, D) in (8, 4, 256), (4, 2, 128),
    # (16, 8, 512), (64, 1, 64)) and the MMoE of (8, 2, 256), behind an input of K = 512, at the
    # largest batch; that MMoE also at B = 4096.
    "mmoe": [
        MMoEShape(4096, 512, 8, 256, 2),
        *(
            MMoEShape(65536, 512, e, d, t)
            for e, t, d in ((8, 2, 256), (8, 4, 256), (4, 2, 128), (16, 8, 512), (64, 1, 64))
        ),
    ],
    # CPU smoke check through the interpreter: proves the command works, times nothing.
    "smoke": [MMoEShape(32, 16, 3, 8, 2)],
}


def floor_bytes(gate: str, shape: MMoEShape, dtype: torch.dtype) -> int:
    """Bytes the one kernel must move at the least: ``|X| + |W| + |b| + |C or Z| + |Y|``."""
    B, K, E, D, T = shape.B, shape.K, shape.E, shape.D, shape.T
    scores = T * D if gate == "attention" else B * T * E
    return (B * K + E * K * D + E * D + scores + B * T * D) * dtype.itemsize


def expert_bytes(shape: MMoEShape, dtype: torch.dtype) -> int:
    """``|H|``: what the two-step path writes and reads back on top of the floor."""
    return shape.B * shape.E * shape.D * dtype.itemsize


def make_inputs(gate: str, shape: MMoEShape, dtype: torch.dtype, device: str) -> dict[str, Tensor]:
    """``x [B, K]``, ``weight [E, K, D]``, ``bias [E, D]`` and ``context [T, D]`` or ``logits [B, T, E]``."""
    gen = torch.Generator(device=device).manual_seed(0)
    B, K, E, D, T = shape.B, shape.K, shape.E, shape.D, shape.T

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    inputs = {"x": randn(B, K), "weight": randn(E, K, D, scale=K**-0.5), "bias": randn(E, D, scale=0.1)}
    inputs.update({"context": randn(T, D)} if gate == "attention" else {"logits": randn(B, T, E)})
    return inputs


def _experts(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return torch.relu(torch.einsum("bk,ekd->bed", x, weight) + bias)


def _eager_layer(gate: str) -> Callable[..., Tensor]:
    mix = EAGER["attention_mix" if gate == "attention" else "softmax_mix"]
    if gate == "attention":
        return lambda x, weight, bias, context: mix(_experts(x, weight, bias), context)
    return lambda x, weight, bias, logits: mix(logits, _experts(x, weight, bias))


def layer_function(gate: str, impl: str) -> Callable[..., Tensor]:
    """The layer's forward as ``impl`` computes it, taking :func:`make_inputs`' tensors by name."""
    if impl == "one-kernel":
        return lambda **kw: fg.experts_mix(**kw, gate=gate)
    if impl == "two-step":
        if gate == "attention":
            return lambda x, weight, bias, context: fg.attention_mix(_experts(x, weight, bias), context)
        return lambda x, weight, bias, logits: fg.softmax_mix(logits, _experts(x, weight, bias))
    if impl == "eager":
        return _eager_layer(gate)
    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(_eager_layer(gate), dynamic=False, fullgraph=True)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


@dataclass
class Measurement:
    gate: str
    impl: str
    dtype: str
    shape: MMoEShape
    seconds: float
    floor_bytes: int
    h_bytes: int

    @property
    def gbps(self) -> float:
        return self.floor_bytes / self.seconds / 1e9


def median_seconds(call: Callable[[], object], rounds: int, round_s: float = 0.005) -> float:
    """Median over ``rounds`` of the time per call on the device's clock (``bench/timing.py``), after a
    warm-up call (compilation, autotuning, allocator)."""
    call()
    iterations = iterations_for(call, round_s) if ON_CUDA else 1
    times = []
    for _ in range(rounds):
        start = device_clock()
        for _ in range(iterations):
            call()
        times.append((device_clock() - start) / iterations)
    return statistics.median(times)


def measure(gate: str, impl: str, shape: MMoEShape, dtype: str, rounds: int) -> Measurement:
    torch_dtype = DTYPES[dtype]
    inputs = make_inputs(gate, shape, torch_dtype, "cuda" if ON_CUDA else "cpu")
    fn = layer_function(gate, impl)

    def call() -> Tensor:
        with torch.no_grad():
            return fn(**inputs)

    seconds = median_seconds(call, rounds)
    return Measurement(
        gate, impl, dtype, shape, seconds, floor_bytes(gate, shape, torch_dtype), expert_bytes(shape, torch_dtype)
    )


def markdown(results: list[Measurement], command: str) -> str:
    impls = [i for i in IMPLS if any(r.impl == i for r in results)]
    head = ["gate", "shape", "floor MB", "two-step's extra 2 x H MB"]
    head += [f"{i} GB/s" for i in impls] + [f"{i} / one-kernel time" for i in impls if i != "one-kernel"]
    stamp = f"`{command}`, {datetime.date.today()}, {device_label()}, torch {torch.__version__}"
    lines = [f"# MMoE inference: experts' last layer + gate, {results[0].dtype}", "", stamp, ""]
    if not ON_CUDA:
        lines += ["**CPU smoke run through the Triton interpreter: these times are not kernel speeds.**", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups: dict[tuple, dict[str, Measurement]] = {}
    for r in results:
        groups.setdefault((r.gate, r.shape), {})[r.impl] = r
    for (gate, shape), by_impl in groups.items():
        first = next(iter(by_impl.values()))
        cells = [gate, shape.id, f"{first.floor_bytes / 1e6:.4g}", f"{2 * first.h_bytes / 1e6:.4g}"]
        cells += [f"{by_impl[i].gbps:.4g}" if i in by_impl else "-" for i in impls]
        one = by_impl.get("one-kernel")
        for i in impls:
            if i != "one-kernel":
                ok = one is not None and i in by_impl
                cells.append(f"{by_impl[i].seconds / one.seconds:.2f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    use_interpreter()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.experts_mix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="mmoe" if ON_CUDA else "smoke")
    parser.add_argument("--gates", type=comma_list(GATES), default=list(GATES), help="comma list of " + ",".join(GATES))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if ON_CUDA else "fp32")
    parser.add_argument("--impls", type=comma_list(IMPLS), default=list(IMPLS), help="comma list of " + ",".join(IMPLS))
    parser.add_argument("--rounds", type=integer(1), default=10 if ON_CUDA else 1, help="timed rounds per case")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<date>_<device>/)")
    args = parser.parse_args(argv)
    results = []
    for gate in args.gates:
        for shape in SHAPES[args.shapes]:
            for impl in args.impls:
                try:
                    results.append(measure(gate, impl, shape, args.dtype, args.rounds))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{impl} {gate} {shape.id}: out of device memory, skipped", file=sys.stderr)
    out = args.out or results_dir(device_label(), datetime.datetime.now(datetime.timezone.utc).isoformat())
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"experts_mix_{args.dtype}"
    text = markdown(results, " ".join(["python -m bench.experts_mix", *argv]))
    stem.with_suffix(".md").write_text(text)
    records = [{**asdict(r), "gbps": r.gbps} for r in results]
    stem.with_suffix(".json").write_text(json.dumps(records, indent=1))
    print(text)
    return out


if __name__ == "__main__":
    main()
