"""What one training step of an MMoE or PLE layer keeps for the backward and moves, fused against two steps.

    python -m bench.training_memory [--batch 65536] [--dtype bf16] [--gates attention,softmax] [--out DIR]

The layers at the bench's MMoE shape, ``K = 512`` inputs, ``E = 8`` one-layer experts of width ``D = 256``,
``T = 2`` tasks: ``MMoE(K, E, D, T)`` and a one-level ``PLE(K, T, E / 2, E / (2 T), D)`` (``E / 2`` shared
experts, ``E / (2 T)`` per task), no towers, each built with ``fused_experts=True`` (``fused``: one
``experts_mix`` kernel forward and one backward) and ``False`` (``two-step``: the experts' batched matmul,
then the fused gate). One step is the forward and the backward of ``<G, layer(x)>``.

- **saved**: the bytes autograd keeps for the backward (``torch.autograd.graph.saved_tensors_hooks``),
  distinct storages, the layer's parameters left out, and the largest of them. Measured at the full batch
  on fake tensors (``FakeTensorMode``: shapes and dtypes, no memory, no kernel).
- **moved**: the bytes of one step: every Triton kernel's loads and stores at distinct addresses
  (``bench/memory_traffic.py``, through the Triton interpreter) plus every other op's floor
  (``count_op_floors``: the matmuls, activations and copies, each input read and each output written
  once). Counted at ``B = 128`` and ``256`` rows (whole programs; every persistent grid full on the CPU)
  and extrapolated on the line through them (``measure(check=True)`` checks the line at ``384`` rows;
  ``tests/test_traffic.py`` does so at a small shape). Counts of bytes, not timings.

Output: ``training_memory_<dtype>.md`` and ``.json`` in DIR (default ``bench/results/<date>_<device>/``),
the Markdown printed too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

import fused_gate as fg
from bench.cases import DTYPES
from bench.interpreter import use_interpreter
from bench.memory_traffic import count_op_floors, count_traffic
from bench.report import results_dir
from bench.timing import device_label
from fused_gate._validation import GATES
from fused_gate.apps.arguments import comma_list, integer

LAYERS = ("mmoe", "ple")
PATHS = {"fused": True, "two-step": False}
# The batches counted through the interpreter, and the one that can check the line through them.
COUNTED = (128, 256)
CHECK = 384


@dataclass(frozen=True)
class LayerShape:
    B: int
    K: int
    E: int
    D: int
    T: int


def build(layer: str, gate: str, shape: LayerShape, fused: bool, dtype: torch.dtype) -> nn.Module:
    """The layer in train mode: ``MMoE(K, E, D, T)`` or the one-level ``PLE`` with ``E / 2`` shared experts."""
    torch.manual_seed(0)
    if layer == "mmoe":
        model = fg.MMoE(shape.K, shape.E, shape.D, shape.T, gate=gate, fused_experts=fused)
    else:
        shared = shape.E // 2
        model = fg.PLE(shape.K, shape.T, shared, (shape.E - shared) // shape.T, shape.D, gate=gate, fused_experts=fused)
    return model.to(dtype).train()


def saved_bytes(model: nn.Module, shape: LayerShape, dtype: torch.dtype) -> tuple[int, int]:
    """``(bytes, largest)``: the distinct storages autograd saves in one forward at ``shape.B`` rows, the
    parameters left out, measured on fake tensors."""
    with FakeTensorMode() as mode:
        state = {name: mode.from_tensor(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
        parameters = {StorageWeakRef(state[name].untyped_storage()) for name, _ in model.named_parameters()}
        storages: dict[StorageWeakRef, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in parameters:
                storages[ref] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.func.functional_call(model, state, (torch.empty(shape.B, shape.K, dtype=dtype),))
    return sum(storages.values()), max(storages.values())


def moved_bytes(model: nn.Module, shape: LayerShape, dtype: torch.dtype, batch: int) -> tuple[int, int, int]:
    """``(Triton kernels' distinct bytes, other ops' floor bytes, kernel launches)`` of one step at ``batch`` rows."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, shape.K, generator=gen).to(dtype)
    grad = torch.randn(batch, shape.T, shape.D, generator=gen).to(dtype)
    model.zero_grad(set_to_none=True)
    with count_traffic() as launches, count_op_floors() as ops:
        model(x).backward(grad)
    return sum(launch.unique for launch in launches), sum(op.total for op in ops), len(launches)


def _line(b: int, counts: dict[int, int]) -> int:
    (b1, v1), (b2, v2) = sorted(counts.items())
    return round(v1 + (v2 - v1) * (b - b1) / (b2 - b1))


@dataclass
class StepMemory:
    """One layer, gate and path: what the step saves and moves at ``shape.B`` rows."""

    layer: str
    gate: str
    path: str
    dtype: str
    shape: LayerShape
    saved: int
    largest_saved: int
    kernel_bytes: int
    op_bytes: int
    launches: int

    @property
    def moved(self) -> int:
        return self.kernel_bytes + self.op_bytes


def measure(layer: str, gate: str, path: str, shape: LayerShape, dtype: str, check: bool = False) -> StepMemory:
    """One layer, gate and path at ``shape``; ``check``: count a third batch, which must lie on the line."""
    torch_dtype = DTYPES[dtype]
    model = build(layer, gate, shape, PATHS[path], torch_dtype)
    saved, largest = saved_bytes(model, shape, torch_dtype)
    counts = {b: moved_bytes(model, shape, torch_dtype, b) for b in (*COUNTED, *(CHECK,) * check)}
    lines = [{b: counts[b][i] for b in COUNTED} for i in range(2)]
    for i, what in enumerate(("kernel", "op")):
        if check and _line(CHECK, lines[i]) != counts[CHECK][i]:
            raise RuntimeError(f"{layer} {gate} {path}: {what} bytes are not linear in B: {counts}")
    kernel_bytes, op_bytes = (_line(shape.B, line) for line in lines)
    launches = counts[COUNTED[-1]][2]
    return StepMemory(layer, gate, path, dtype, shape, saved, largest, kernel_bytes, op_bytes, launches)


def markdown(results: list[StepMemory], command: str) -> str:
    shape = results[0].shape
    h_bytes = shape.B * shape.E * shape.D * DTYPES[results[0].dtype].itemsize
    head = ["layer", "gate", "path", "saved MB", "largest saved MB", "saved / two-step's", "moved MB"]
    head += ["Triton kernels MB", "other ops MB", "moved / two-step's", "launches"]
    lines = [
        f"# One training step of a layer: saved for the backward and moved, {results[0].dtype}",
        "",
        f"`{command}`, {datetime.date.today()}, torch {torch.__version__}. B = {shape.B}, K = {shape.K}, "
        f"E = {shape.E}, D = {shape.D}, T = {shape.T}; |H| = B E D = {h_bytes / 1e6:.1f} MB. saved: distinct "
        "storages autograd keeps (parameters left out), on fake tensors. moved: the Triton kernels' distinct "
        "bytes (interpreted) + the other ops' floors (inputs read and outputs written once), counted at B = "
        f"{COUNTED[0]} and {COUNTED[1]}, extrapolated on the line. Counts, not timings.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    two_step = {(r.layer, r.gate): r for r in results if r.path == "two-step"}
    for r in results:
        base = two_step.get((r.layer, r.gate))
        cells = [r.layer, r.gate, r.path]
        cells += [f"{b / 1e6:.1f}" for b in (r.saved, r.largest_saved)]
        cells.append(f"{r.saved / base.saved:.2f}" if base else "-")
        cells += [f"{b / 1e6:.1f}" for b in (r.moved, r.kernel_bytes, r.op_bytes)]
        cells += [f"{r.moved / base.moved:.2f}" if base else "-", str(r.launches)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    # The layers take the kernels' path on CPU tensors only with the interpreter, set before the kernels load.
    use_interpreter(on_gpu=True)
    from fused_gate.kernels import INTERPRETED

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.training_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=integer(1), default=65536, help="B of the table (default 65536)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--gates", type=comma_list(GATES), default=list(GATES), help="comma list of " + ",".join(GATES))
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<date>_<device>/)")
    args = parser.parse_args(argv)
    if not INTERPRETED:
        parser.error("the kernels were defined before TRITON_INTERPRET=1 was set; run python -m bench.training_memory")
    shape = LayerShape(args.batch, 512, 8, 256, 2)
    results = [
        measure(layer, gate, path, shape, args.dtype) for layer in LAYERS for gate in args.gates for path in PATHS
    ]
    out = args.out or results_dir(device_label(), datetime.datetime.now(datetime.timezone.utc).isoformat())
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"training_memory_{args.dtype}"
    text = markdown(results, " ".join(["python -m bench.training_memory", *argv]))
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps([{**asdict(r), "moved": r.moved} for r in results], indent=1))
    print(text)
    return out


if __name__ == "__main__":
    main()
