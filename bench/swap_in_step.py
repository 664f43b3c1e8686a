"""Time torch-rechub / DeepCTR-Torch MMOE and PLE, original against ``swap_in``: training step and inference.

    TRITON_INTERPRET=0 python -m bench.swap_in_step [--batch 256,1024,8192] [--modes train,infer] [--threads N]

A training step is forward, a weighted mean of the outputs, backward and an SGD update, in train mode
(dropout and BatchNorm active; a mean, not a sum, so that the rounds' few hundred steps leave the weights
near where they started, and inference, timed after them, meets no values where ``exp`` leaves its
vectorized loop); inference is a forward in eval mode under ``torch.no_grad()``. PLE has 2
levels of ``--experts`` experts each (2 shared, the rest split over the tasks). Each model is timed
against its swapped copy in interleaved rounds (``bench.interleaved``): the table gives the median time
of each and the median per-round ratio ``original / swapped`` with its quartiles, so load from other
processes shows as spread rather than as a bias. ``--clock cpu`` times the process's CPU time instead of
the wall clock: steadier on a loaded machine, with ``--threads 1``.

On a CPU with ``TRITON_INTERPRET=0`` the swapped models run ``fused_gate``'s CPU fallback (the reference,
plain PyTorch), so the ratio measures that fallback against the libraries' per-task loops, not the
kernels. Without ``TRITON_INTERPRET`` on a machine without a GPU the command sets it to 1 (as every bench
command does): then the Triton interpreter runs and the times mean nothing, which the output says.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch

import fused_gate
from bench.interleaved import CLOCKS, compare, load_average, machine_line, ratio_cell
from bench.interpreter import use_interpreter
from fused_gate._validation import MAX_TASKS
from fused_gate.apps.arguments import comma_list, integer, integer_list, real, widths
from fused_gate.apps.arguments import device as device_name
from tests.library_models import MODELS, inputs_to

PLE_SHARED = 2  # shared experts per PLE level; the rest are split over the tasks

MODES = ("train", "infer")


def _step_fn(model: torch.nn.Module, inputs) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = model(inputs)
    weights = torch.randn(probe.shape, generator=torch.Generator().manual_seed(0)).to(probe.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        (model(inputs) * weights).mean().backward()
        optimizer.step()

    return step


def _inference_fn(model: torch.nn.Module, inputs) -> Callable[[], None]:
    def forward():
        with torch.no_grad():
            model(inputs)

    return forward


def _sizes(name: str, experts: int, hidden: tuple[int, ...], tasks: int) -> dict:
    if name.endswith("mmoe"):
        return dict(num_experts=experts, hidden=hidden, num_tasks=tasks)
    return dict(per_task=(experts - PLE_SHARED) // tasks, shared=PLE_SHARED, hidden=hidden, num_tasks=tasks)


def dispatch_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"Triton kernels on {torch.cuda.get_device_name(device)}"
    if fused_gate.uses_kernels(torch.empty(0)):  # a CPU tensor runs the kernels: interpreted
        return "Triton interpreter on the CPU: times mean nothing (run with TRITON_INTERPRET=0)"
    return "CPU fallback (the reference, plain PyTorch)"


def step_table(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    compared: str,
    make_compared: Callable[[str, torch.nn.Module], torch.nn.Module],
    default_hidden: str,
) -> None:
    """Parse the command line, then print one row per model, batch size and mode: the original's and the
    compared model's time and the per-round ratio.

    ``make_compared(name, model)`` builds the compared model (``compared`` names it in the table) from a library
    model in train mode; ``--hidden`` takes the experts' widths, comma-separated.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--batch", type=integer_list(1, "batch sizes"), default="256,1024,8192", help="batch sizes, comma-separated"
    )
    parser.add_argument("--modes", type=comma_list(MODES), default=list(MODES), help="train (a training step), infer")
    parser.add_argument("--experts", type=integer(1), default=8, help="experts per level")
    parser.add_argument("--hidden", type=widths, default=default_hidden, help="the experts' widths, comma-separated")
    parser.add_argument("--tasks", type=integer(2, MAX_TASKS - 1), default=3, help="the libraries need 2 or more")
    parser.add_argument("--rounds", type=integer(1), default=20, help="interleaved rounds per row")
    parser.add_argument(
        "--round-ms", type=real(0, low_open=True), default=100.0, help="about how long one model runs in a round"
    )
    parser.add_argument("--warmup", type=integer(0), default=3, help="untimed calls per model first")
    parser.add_argument(
        "--models", type=comma_list(list(MODELS)), default=list(MODELS), help=f"comma list of {','.join(MODELS)}"
    )
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=integer(1), help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="cpu: process CPU time, steadier under load (1 thread)"
    )
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
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    print(f"# Original vs {compared} ({dispatch_label(device)})")
    print(
        f"{args.experts} experts per level, expert widths {args.hidden}, {args.tasks} tasks; {args.rounds} "
        f"interleaved rounds of about {args.round_ms:g} ms per model and row ({args.clock} clock); {machine_line()}\n"
    )
    print(f"| model | B | mode | original ms | {compared} ms | original / {compared}: median (quartiles) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in args.models:
        for batch in args.batch:
            model, inputs = MODELS[name][0](batch, **_sizes(name, args.experts, args.hidden, args.tasks))
            model.to(device).train()
            other = make_compared(name, model)
            inputs = inputs_to(inputs, device)
            for mode in args.modes:
                if mode == "infer":
                    model.eval(), other.eval()
                make = _step_fn if mode == "train" else _inference_fn
                comparison = compare(
                    make(model, inputs),
                    make(other, inputs),
                    rounds=args.rounds,
                    round_s=args.round_ms / 1e3,
                    warmup=args.warmup,
                    sync=sync,
                    clock=args.clock,
                )
                original_ms, other_ms = comparison.median_ms()
                print(f"| {name} | {batch} | {mode} | {original_ms:.2f} | {other_ms:.2f} | {ratio_cell(comparison)} |")
    print(f"\nload average at the end: {load_average()}")


def _swapped(name: str, model: torch.nn.Module) -> torch.nn.Module:
    swapped = copy.deepcopy(model)
    fused_gate.swap_in(swapped)
    return swapped


def main(argv: list[str] | None = None) -> None:
    use_interpreter()
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
