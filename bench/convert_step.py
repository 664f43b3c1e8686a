"""Time torch-rechub / DeepCTR-Torch MMOE and PLE, original against ``to_fused``: training step and inference.

    TRITON_INTERPRET=0 python -m bench.convert_step [--batch 256,1024,8192] [--modes train,infer] [--hidden 64,32]

The step (forward, a weighted mean of the outputs, backward, SGD update, in train mode), inference (eval
mode, ``torch.no_grad()``), the models and the interleaved rounds are those of ``bench.swap_in_step``;
``--hidden`` takes the experts' widths, comma-separated. The converted model evaluates each level's
experts as one batched matmul per layer, its gates and towers likewise, and mixes with
``fused_gate.softmax_mix``.

On a CPU with ``TRITON_INTERPRET=0`` the mix runs ``fused_gate``'s CPU fallback, so the ratio measures
the batched experts, gates and towers and that fallback against the libraries' per-module loops, not the
kernels.
"""

from __future__ import annotations

import importlib

import torch

from bench.interpreter import use_interpreter
from bench.swap_in_step import step_table
from tests.library_models import MODELS


def _converted(name: str, model: torch.nn.Module) -> torch.nn.Module:
    return importlib.import_module(MODELS[name][1]).to_fused(model).train()


def main(argv: list[str] | None = None) -> None:
    use_interpreter()
    step_table(
        argv,
        prog="python -m bench.convert_step",
        description=__doc__.split("\n\n")[0],
        compared="converted",
        make_compared=_converted,
        default_hidden="64,32",
    )


if __name__ == "__main__":
    main()
