"""MMoE's experts' last layer and gate, in inference and in a training step: four implementations timed.

    python -m bench.experts_mix [--shapes mmoe|smoke] [--gates softmax,attention] [--dtype bf16]
                                [--impls one-kernel,two-step,eager,compile] [--passes inference,training]
                                [--rounds N] [--out DIR]

Each case is an MMoE layer's ``Y = gate(relu(X W_e + b_e))`` at one shape ``(B, K, E, D, T)`` (``K`` the
input width, ``D`` the experts' width): its forward under ``torch.no_grad()`` (``inference``), or its forward
and the backward of ``<G, Y>`` for ``X``, ``W``, ``b`` and ``C`` or ``Z`` (``training``, at the shapes of
:data:`STEP_SHAPES`: each compiles a backward too):

- ``one-kernel``: ``fused_gate.experts_mix`` (``H`` is never written; in training its backward kernel
  recomputes ``H`` and writes ``dL/dpre`` for cuBLAS's ``dW`` and ``dX``);
- ``two-step``: the experts as one batched matmul (``einsum`` + bias + ReLU, ``H [B, E, D]`` in
  memory, kept by autograd in training), then the fused gate ``fused_gate.attention_mix`` / ``softmax_mix``;
- ``eager``: the whole layer as eager PyTorch code writes it (the gate as in ``bench/cases.py``);
- ``compile``: that eager layer under ``torch.compile`` (default mode).

The softmax gate's logits ``Z [B, T, E]`` are an input of every implementation (the gate's own Linear
runs outside). ``GB/s`` is the one kernel's byte floor over each implementation's median time, so GB/s
compare as speeds do: in inference ``|X| + |W| + |b| + |C or Z| + |Y|``; in training that, plus the
backward's ``|G| + |X| + |W| + |b| + |C or Z|`` read and ``|dX| + |dW| + |db| + |dC or dZ|`` written. ``ratio``
is an implementation's time over the one kernel's; ``peak MB`` the device memory a call allocates above
its inputs (CUDA only). ``two-step`` also moves ``2 |H|`` in inference (written, then read back), a column
of the table. Output: ``experts_mix_<dtype>.md`` and ``.json`` in DIR (default
``bench/results/<date>_<device>/``), the Markdown printed too. Without a GPU the kernels run through the
Triton interpreter: a smoke check of the command, whose times mean nothing (the table says so).
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
from bench.timing import ON_CUDA, device_clock, device_label, iterations_for, peak_memory_bytes
from fused_gate._validation import GATES
from fused_gate.apps.arguments import comma_list, integer

IMPLS = ("one-kernel", "two-step", "eager", "compile")
PASSES = ("inference", "training")


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
# The training step's shapes: the MMoE of (8, 2, 256) at the largest batch (each case compiles a backward too,
# within the GPU campaign's time limit), the shape of docs/experts_mix.md's memory table.
STEP_SHAPES: dict[str, list[MMoEShape]] = {"mmoe": [SHAPES["mmoe"][1]], "smoke": SHAPES["smoke"]}


def floor_bytes(gate: str, shape: MMoEShape, dtype: torch.dtype, training: bool = False) -> int:
    """Bytes the one kernel must move at the least: ``|X| + |W| + |b| + |C or Z| + |Y|``; with ``training`` also
    the backward's, which reads ``G`` (``|Y|``) and the inputs again and writes a gradient of each input."""
    B, K, E, D, T = shape.B, shape.K, shape.E, shape.D, shape.T
    scores = T * D if gate == "attention" else B * T * E
    inputs = B * K + E * K * D + E * D + scores
    return ((3 if training else 1) * inputs + (2 if training else 1) * B * T * D) * dtype.itemsize


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


def training_step(fn: Callable[..., Tensor], inputs: dict[str, Tensor], grad: Tensor) -> Callable[[], object]:
    """One forward of ``fn`` and the backward of ``<grad, Y>`` for every input (no ``.grad`` accumulated)."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}

    def call() -> tuple[Tensor, ...]:
        return torch.autograd.grad(fn(**leaves), list(leaves.values()), grad)

    return call


@dataclass
class Measurement:
    gate: str
    impl: str
    dtype: str
    shape: MMoEShape
    seconds: float
    floor_bytes: int
    h_bytes: int
    pass_: str = "inference"
    peak_bytes: int | None = None

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


def measure(gate: str, impl: str, shape: MMoEShape, dtype: str, rounds: int, pass_: str = "inference") -> Measurement:
    torch_dtype = DTYPES[dtype]
    inputs = make_inputs(gate, shape, torch_dtype, "cuda" if ON_CUDA else "cpu")
    fn = layer_function(gate, impl)
    training = pass_ == "training"
    if training:
        gen = torch.Generator(device=inputs["x"].device).manual_seed(1)
        grad = torch.randn(shape.B, shape.T, shape.D, generator=gen, device=inputs["x"].device).to(torch_dtype)
        call = training_step(fn, inputs, grad)
    else:

        def call() -> Tensor:
            with torch.no_grad():
                return fn(**inputs)

    seconds = median_seconds(call, rounds)
    return Measurement(
        gate, impl, dtype, shape, seconds, floor_bytes(gate, shape, torch_dtype, training),
        expert_bytes(shape, torch_dtype), pass_, peak_memory_bytes(call),
    )  # fmt: skip


def _table(results: list[Measurement], impls: list[str]) -> list[str]:
    """One pass's rows: GB/s, time ratios over the one kernel, peak memory."""
    head = ["gate", "shape", "floor MB", "two-step's extra 2 x H MB" if results[0].pass_ == "inference" else "H MB"]
    head += [f"{i} GB/s" for i in impls] + [f"{i} / one-kernel time" for i in impls if i != "one-kernel"]
    head += [f"{i} peak MB" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups: dict[tuple, dict[str, Measurement]] = {}
    for r in results:
        groups.setdefault((r.gate, r.shape), {})[r.impl] = r
    for (gate, shape), by_impl in groups.items():
        first = next(iter(by_impl.values()))
        h = (2 if first.pass_ == "inference" else 1) * first.h_bytes
        cells = [gate, shape.id, f"{first.floor_bytes / 1e6:.4g}", f"{h / 1e6:.4g}"]
        cells += [f"{by_impl[i].gbps:.4g}" if i in by_impl else "-" for i in impls]
        one = by_impl.get("one-kernel")
        for i in impls:
            if i != "one-kernel":
                ok = one is not None and i in by_impl
                cells.append(f"{by_impl[i].seconds / one.seconds:.2f}" if ok else "-")
        for i in impls:
            peak = by_impl[i].peak_bytes if i in by_impl else None
            cells.append("-" if peak is None else f"{peak / 1e6:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


TITLES = {
    "inference": "MMoE inference: experts' last layer + gate",
    "training": "MMoE training step: experts' last layer + gate, forward and backward",
}


def markdown(results: list[Measurement], command: str) -> str:
    impls = [i for i in IMPLS if any(r.impl == i for r in results)]
    stamp = f"`{command}`, {datetime.date.today()}, {device_label()}, torch {torch.__version__}"
    lines = [f"# MMoE's experts' last layer + gate, {results[0].dtype}", "", stamp, ""]
    if not ON_CUDA:
        lines += ["**CPU smoke run through the Triton interpreter: these times are not kernel speeds.**", ""]
    for pass_ in PASSES:
        rows = [r for r in results if r.pass_ == pass_]
        if rows:
            lines += [f"## {TITLES[pass_]}", "", *_table(rows, impls), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    use_interpreter()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.experts_mix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="mmoe" if ON_CUDA else "smoke")
    parser.add_argument("--gates", type=comma_list(GATES), default=list(GATES), help="comma list of " + ",".join(GATES))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if ON_CUDA else "fp32")
    parser.add_argument("--impls", type=comma_list(IMPLS), default=list(IMPLS), help="comma list of " + ",".join(IMPLS))
    parser.add_argument(
        "--passes", type=comma_list(PASSES), default=list(PASSES), help="comma list of " + ",".join(PASSES)
    )
    parser.add_argument("--rounds", type=integer(1), default=10 if ON_CUDA else 1, help="timed rounds per case")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<date>_<device>/)")
    args = parser.parse_args(argv)
    results = []
    for pass_ in args.passes:
        for gate in args.gates:
            for shape in (SHAPES if pass_ == "inference" else STEP_SHAPES)[args.shapes]:
                for impl in args.impls:
                    try:
                        results.append(measure(gate, impl, shape, args.dtype, args.rounds, pass_))
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"{pass_} {impl} {gate} {shape.id}: out of device memory, skipped", file=sys.stderr)
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
