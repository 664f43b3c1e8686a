"""Time one training step of torch-rechub / DeepCTR-Torch MMOE and PLE, original vs ``fused_gate.swap_in``.

    TRITON_INTERPRET=0 python -m bench.swap_in_step [--batch 1024] [--experts 8] [--hidden 64] [--tasks 3] [--threads N]

A step is forward, a weighted sum of the outputs, backward and an SGD update, in train mode (dropout
and BatchNorm active). PLE has 2 levels of ``--experts`` experts each (2 shared, the rest split over the
tasks). Each model is timed in alternating rounds with its swapped copy, and the table gives the median
per step and ``original / swapped``.

On a CPU with ``TRITON_INTERPRET=0`` the swapped models run ``fused_gate``'s reference fallback, so the
ratio measures only the per-gate Python loop and the extra ops the swap removes, not the kernels.
Importing ``bench`` sets ``TRITON_INTERPRET=1`` on a machine without a GPU: then the Triton interpreter
runs and the times mean nothing, which the output says.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

import fused_gate
from bench.swap_models import MODELS, inputs_to
from fused_gate._validation import MAX_TASKS
from fused_gate.apps.arguments import comma_list, integer, widths
from fused_gate.apps.arguments import device as device_name
from fused_gate.kernels import INTERPRETED

PLE_SHARED = 2  # shared experts per PLE level; the rest are split over the tasks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(model: torch.nn.Module, inputs):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = model(inputs)
    weights = torch.randn(probe.shape, generator=torch.Generator().manual_seed(0)).to(probe.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        (model(inputs) * weights).sum().backward()
        optimizer.step()

    return step


def time_pair(original, swapped, inputs, device, *, steps: int, rounds: int, warmup: int) -> tuple[float, float]:
    """Median seconds per step of each model, timed in alternating rounds of ``steps`` steps."""
    calls = [_step_fn(original, inputs), _step_fn(swapped, inputs)]
    times: list[list[float]] = [[], []]
    for call in calls:
        for _ in range(warmup):
            call()
    for _ in range(rounds):
        for call, sink in zip(calls, times, strict=True):
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                call()
            _sync(device)
            sink.append((time.perf_counter() - start) / steps)
    return statistics.median(times[0]), statistics.median(times[1])


def _sizes(name: str, experts: int, hidden: tuple[int, ...], tasks: int) -> dict:
    if name.endswith("mmoe"):
        return dict(num_experts=experts, hidden=hidden, num_tasks=tasks)
    return dict(per_task=(experts - PLE_SHARED) // tasks, shared=PLE_SHARED, hidden=hidden, num_tasks=tasks)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def dispatch_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"Triton kernels on {torch.cuda.get_device_name(device)}"
    if INTERPRETED:
        return "Triton interpreter on the CPU: times mean nothing (run with TRITON_INTERPRET=0)"
    return "reference fallback on the CPU (plain PyTorch)"


def step_table(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    compared: str,
    make_compared: Callable[[str, torch.nn.Module], torch.nn.Module],
    default_hidden: str,
) -> None:
    """Parse the command line, then print one row per model: the original's and the compared model's time per step.

    ``make_compared(name, model)`` builds the compared model (``compared`` names it in the table) from a library
    model in train mode; ``--hidden`` takes the experts' widths, comma-separated.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--batch", type=integer(1), default=1024)
    parser.add_argument("--experts", type=integer(1), default=8, help="experts per level")
    parser.add_argument("--hidden", type=widths, default=default_hidden, help="the experts' widths, comma-separated")
    parser.add_argument("--tasks", type=integer(2, MAX_TASKS - 1), default=3, help="the libraries need 2 or more")
    parser.add_argument("--steps", type=integer(1), default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=integer(1), default=20)
    parser.add_argument("--warmup", type=integer(0), default=3, help="untimed steps per model first")
    parser.add_argument(
        "--models", type=comma_list(list(MODELS)), default=list(MODELS), help=f"comma list of {','.join(MODELS)}"
    )
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=integer(1), help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    per_task, left = divmod(args.experts - PLE_SHARED, args.tasks)
    if any(name.endswith("ple") for name in args.models) and (per_task < 1 or left):
        parser.error(
            f"--experts: a PLE level has {PLE_SHARED} shared experts and the rest split evenly over the "
            f"{args.tasks} tasks, at least one each; got {args.experts}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hidden = args.hidden

    print(f"# One training step, original vs {compared} ({dispatch_label(device)})")
    print(
        f"B = {args.batch}, {args.experts} experts per level, expert widths {hidden}, {args.tasks} tasks; "
        f"median of {args.rounds} rounds of {args.steps} steps; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} cores, {cpu_name()}\n"
    )
    print(f"| model | original ms/step | {compared} ms/step | original / {compared} |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.models:
        model, inputs = MODELS[name][0](args.batch, **_sizes(name, args.experts, hidden, args.tasks))
        model.to(device).train()
        other = make_compared(name, model)
        original_s, other_s = time_pair(
            model, other, inputs_to(inputs, device), device, steps=args.steps, rounds=args.rounds, warmup=args.warmup
        )
        print(f"| {name} | {original_s * 1e3:.2f} | {other_s * 1e3:.2f} | {original_s / other_s:.2f} |")


def _swapped(name: str, model: torch.nn.Module) -> torch.nn.Module:
    swapped = copy.deepcopy(model)
    fused_gate.swap_in(swapped)
    return swapped


def main(argv: list[str] | None = None) -> None:
    step_table(
        argv,
        prog="python -m bench.swap_in_step",
        description=__doc__.split("\n\n")[0],
        compared="swapped",
        make_compared=_swapped,
        default_hidden="64",
    )


if __name__ == "__main__":
    main()
