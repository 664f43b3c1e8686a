"""Time the ops' CPU fallback against the plainest eager formulation: softmax, then a batched matmul.

    TRITON_INTERPRET=0 python -m bench.cpu_fallback [--batch 256,1024,8192] [--experts 8] [--dim 64] [--tasks 3]

On a CPU without ``TRITON_INTERPRET`` ``fused_gate.attention_mix`` and ``softmax_mix`` run the reference
(``fused_gate/reference.py``), which keeps every special-value rule (masks, ``-inf``, NaN, fully
masked rows) that the eager code ignores. For each op, batch size and pass (``fwd``: a forward under
``torch.no_grad()``; ``fwd+bwd``: a forward and the backward of every input, as in training) the table
gives the median time of each and the median per-round ratio ``fallback / eager`` with its quartiles,
from interleaved rounds (``bench.interleaved``). The eager peer is ``bench.cases.EAGER``: the scores
(attention), ``torch.softmax`` and the batched matmul, as a user's own PyTorch code writes the gate.
The default shapes are those of ``bench.swap_in_step``: 8 experts of width 64, 3 tasks. ``--clock cpu``
as in ``bench.swap_in_step``.
"""

from __future__ import annotations

import argparse

import torch

import fused_gate as fg
from bench.cases import EAGER, OPS, Shape, make_inputs
from bench.interleaved import CLOCKS, compare, load_average, machine_line, ratio_cell
from bench.interpreter import use_interpreter
from bench.swap_in_step import dispatch_label
from fused_gate._validation import MAX_EXPERTS, MAX_TASKS
from fused_gate.apps.arguments import integer, integer_list, real

PASSES = ("fwd", "fwd+bwd")


def _call(fn, inputs: list[torch.Tensor], grad_y: torch.Tensor, pass_: str):
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                fn(*inputs)

        return forward
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_y)


def main(argv: list[str] | None = None) -> None:
    use_interpreter()
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_fallback", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch", type=integer_list(1, "batch sizes"), default="256,1024,8192", help="batch sizes, comma-separated"
    )
    parser.add_argument("--experts", type=integer(1, MAX_EXPERTS), default=8)
    parser.add_argument("--dim", type=integer(1), default=64)
    parser.add_argument("--tasks", type=integer(1, MAX_TASKS), default=3)
    parser.add_argument("--rounds", type=integer(1), default=20, help="interleaved rounds per row")
    parser.add_argument(
        "--round-ms", type=real(0, low_open=True), default=50.0, help="about how long one side runs in a round"
    )
    parser.add_argument("--warmup", type=integer(0), default=3, help="untimed calls per side first")
    parser.add_argument("--threads", type=integer(1), help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="cpu: process CPU time, steadier under load (1 thread)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# The ops' {dispatch_label(torch.device('cpu'))} vs eager PyTorch (softmax + batched matmul)")
    print(
        f"E = {args.experts} experts, D = {args.dim}, T = {args.tasks} tasks, float32; {args.rounds} interleaved "
        f"rounds of about {args.round_ms:g} ms per side and row ({args.clock} clock); {machine_line()}\n"
    )
    print("| op | B | pass | fallback ms | eager ms | fallback / eager: median (quartiles) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for op in OPS:
        for batch in args.batch:
            inputs, grad_y = make_inputs(op, Shape(batch, args.experts, args.tasks, args.dim), torch.float32, "cpu")
            for pass_ in PASSES:
                comparison = compare(
                    _call(getattr(fg, op), inputs, grad_y, pass_),
                    _call(EAGER[op], inputs, grad_y, pass_),
                    rounds=args.rounds,
                    round_s=args.round_ms / 1e3,
                    warmup=args.warmup,
                    clock=args.clock,
                )
                fallback_ms, eager_ms = comparison.median_ms()
                print(f"| {op} | {batch} | {pass_} | {fallback_ms:.3f} | {eager_ms:.3f} | {ratio_cell(comparison)} |")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
