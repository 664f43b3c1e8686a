"""fused_gate: fused Triton kernels for the gates of multi-task mixture-of-experts models.

``attention_mix`` (attention gate: learned per-task context vectors as queries over the expert
outputs) and ``softmax_mix`` (classic MMoE/PLE gate) compute scores, the masked softmax over experts
and the weighted sum of expert outputs in one pass, forward and backward; ``experts_mix`` (inference)
also computes the experts' last layer in the same kernel, so their outputs are never written.
``fused_gate.reference`` holds the plain-PyTorch reference of each op (the tests' oracle and the CPU
fallback).

The names that need the kernels are imported on first use, so ``import fused_gate.reference`` (plain
PyTorch) does not import triton.
"""

import importlib

from fused_gate import _interpreter, reference  # noqa: F401  (_interpreter first: checks before triton is imported)

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first use
_LAZY = {
    "AttentionMix": "fused_gate.gates",
    "MMoE": "fused_gate.layers",
    "PLE": "fused_gate.layers",
    "SoftmaxGate": "fused_gate.gates",
    "attention_mix": "fused_gate.ops",
    "experts_mix": "fused_gate.fused_experts",
    "softmax_mix": "fused_gate.ops",
    "swap_in": "fused_gate.integrations",
    "uses_kernels": "fused_gate.dispatch",
}

__all__ = [
    "PLE",
    "AttentionMix",
    "MMoE",
    "SoftmaxGate",
    "attention_mix",
    "experts_mix",
    "reference",
    "softmax_mix",
    "swap_in",
    "uses_kernels",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        try:  # a submodule, as ``fused_gate.layers`` after a plain ``import fused_gate``
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
