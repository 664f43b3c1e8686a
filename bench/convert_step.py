"""Time one training step of torch-rechub / DeepCTR-Torch MMOE and PLE, original vs converted by ``to_fused``.

    TRITON_INTERPRET=0 python -m bench.convert_step [--batch 1024] [--experts 8] [--hidden 64,32] [--threads N]

The step (forward, a weighted sum of the outputs, backward, SGD update, in train mode), the models and
the alternating timing rounds are those of ``bench.swap_in_step``; ``--hidden`` takes the experts' widths,
comma-separated. The converted model evaluates each level's experts as one batched matmul per layer, its
gates and towers likewise, and mixes with ``fused_gate.softmax_mix``.

On a CPU with ``TRITON_INTERPRET=0`` the mix runs ``fused_gate``'s reference fallback, so the ratio
measures the batched experts, gates and towers against the libraries' per-module loops, not the kernels.
"""

from __future__ import annotations

import argparse
import importlib
import os

import torch

from bench.swap_in_step import _sizes, cpu_name, dispatch_label, time_pair
from bench.swap_models import MODELS, inputs_to


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.convert_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", default="64,32", help="the experts' widths, comma-separated")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hidden = tuple(int(width) for width in args.hidden.split(","))

    print(f"# One training step, original vs to_fused ({dispatch_label(device)})")
    print(
        f"B = {args.batch}, {args.experts} experts per level, expert widths {hidden}, {args.tasks} tasks; "
        f"median of {args.rounds} rounds of {args.steps} steps; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} cores, {cpu_name()}\n"
    )
    print("| model | original ms/step | converted ms/step | original / converted |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        sizes = _sizes(name, args.experts, hidden[0], args.tasks) | {"hidden": hidden}
        model, inputs = MODELS[name][0](args.batch, **sizes)
        model.to(device).train()
        converted = importlib.import_module(MODELS[name][1]).to_fused(model).train()
        original_s, converted_s = time_pair(
            model,
            converted,
            inputs_to(inputs, device),
            device,
            steps=args.steps,
            rounds=args.rounds,
            warmup=args.warmup,
        )
        print(f"| {name} | {original_s * 1e3:.2f} | {converted_s * 1e3:.2f} | {original_s / converted_s:.2f} |")


if __name__ == "__main__":
    main()
