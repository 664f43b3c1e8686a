"""Self-test of an install: the fused attention gate against the plain-PyTorch reference, errors and timings.

    python -m fused_gate.apps.selftest [--batch B --experts E --dim D --tasks T --dtype bf16 --repeats N]

For each shape it runs forward + backward of ``fused_gate.attention_mix`` (the Triton kernels) and of
``fused_gate.reference.attention_mix`` (eager PyTorch), reports the largest error of each against a
float64 run, and the median time per forward+backward of each on the same device. Without a GPU it
restarts itself with ``TRITON_INTERPRET=1`` so the real kernels run, interpreted on the CPU: the
comparison with float64 is the real one, while the CPU timings only show that interpretation is slow
(speed is measured on a GPU by ``bench/``). The interpreter needs ``numpy<2.4``; without it the
command stops at once and says so.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

import fused_gate as fg
from fused_gate._interpreter import interpreter_problem
from fused_gate._validation import MAX_EXPERTS, MAX_TASKS
from fused_gate.apps.arguments import device, integer
from fused_gate.kernels import INTERPRETED

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fused_gate.apps.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=integer(1), nargs="+", help="batch sizes (default: by device)")
    parser.add_argument("--experts", type=integer(1, MAX_EXPERTS), default=8)
    parser.add_argument("--dim", type=integer(1), default=None, help="expert width D (default: by device)")
    parser.add_argument("--tasks", type=integer(1, MAX_TASKS), default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--repeats", type=integer(1), default=None, help="timed calls per shape (default: by device)")
    args = parser.parse_args(argv)
    gpu = _on_gpu(args.device)
    args.batch = [256, 4096, 65536] if gpu and args.batch is None else args.batch or [64, 512]
    args.dim = (256 if gpu else 64) if args.dim is None else args.dim
    args.dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.repeats = (50 if gpu else 5) if args.repeats is None else args.repeats
    return args


def _on_gpu(device_name: str) -> bool:
    return torch.device(device_name).type == "cuda"


def _step(fn, h, context, grad_y):
    h.grad = context.grad = None
    fn(h, context).backward(grad_y)
    return h.grad, context.grad


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (compiles the kernels on first use)
    times = []
    for _ in range(repeats):
        if _on_gpu(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _max_error(outputs, exact) -> float:
    return max((a.double() - b).abs().max().item() for a, b in zip(outputs, exact, strict=True))


def run(args: argparse.Namespace) -> dict[int, dict[str, tuple[float, float]]]:
    """Print the table; returns ``{B: {"fused" | "eager": (max error, median ms)}}``."""
    if _on_gpu(args.device):
        mode = "Triton kernels"
    elif fg.uses_kernels(torch.empty(0, device=args.device)):
        mode = "Triton kernels, interpreted on CPU"
    else:  # run() called without main()'s restart: the fused op is the reference
        mode = "no kernels (TRITON_INTERPRET=1 was not set before import): fused_gate's reference fallback"
    print(f"fused_gate self-test: attention gate, {mode}; torch {torch.__version__}, device {args.device}")
    print(f"E={args.experts} experts, D={args.dim}, T={args.tasks} tasks, dtype={args.dtype}\n")
    header = f"{'B':>7} {'max err fused':>14} {'max err eager':>14} {'fused ms':>10} {'eager ms':>10} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    table = {}
    for batch in args.batch:
        h = torch.randn(batch, args.experts, args.dim, generator=gen).to(args.device, args.dtype)
        context = torch.randn(args.tasks, args.dim, generator=gen).to(args.device, args.dtype)
        grad_y = torch.randn(batch, args.tasks, args.dim, generator=gen).to(args.device, args.dtype)
        h.requires_grad_()
        context.requires_grad_()

        hd, cd = h.detach().double().requires_grad_(), context.detach().double().requires_grad_()
        y_exact = fg.reference.attention_mix(hd, cd)
        y_exact.backward(grad_y.double())
        exact = (y_exact, hd.grad, cd.grad)

        results = {}
        for name, fn in (("fused", fg.attention_mix), ("eager", fg.reference.attention_mix)):
            y = fn(h, context)
            grads = _step(fn, h, context, grad_y)
            err = _max_error((y, *grads), exact)
            ms = _median_ms(functools.partial(_step, fn, h, context, grad_y), args.repeats, args.device)
            results[name] = (err, ms)
        table[batch] = results
        (err_f, ms_f), (err_e, ms_e) = results["fused"], results["eager"]
        print(f"{batch:>7} {err_f:>14.2e} {err_e:>14.2e} {ms_f:>10.3f} {ms_e:>10.3f} {ms_e / ms_f:>7.2f}x")
    print("\nErrors are the largest absolute difference of Y, dH and dC from a float64 run.")
    if not _on_gpu(args.device):
        print("CPU timings measure Triton's interpreter, not the kernels' speed: run on a GPU for real numbers.")
    return table


def main(argv: list[str] | None = None) -> dict[int, dict[str, tuple[float, float]]]:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if not _on_gpu(args.device) and not INTERPRETED:
        # The kernels only run on CPU through Triton's interpreter, which must be chosen before
        # triton is imported: restart with it switched on, unless it cannot run here.
        problem = interpreter_problem()
        if problem is not None:
            sys.exit(f"python -m fused_gate.apps.selftest on a CPU: {problem}")
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "fused_gate.apps.selftest", *argv], env)
    return run(args)


if __name__ == "__main__":
    main()
