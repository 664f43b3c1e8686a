"""fused_gate: fused Triton kernels for the gates of multi-task mixture-of-experts models.

``attention_mix`` (attention gate: learned per-task context vectors as queries over the expert
outputs) and ``softmax_mix`` (classic MMoE/PLE gate) compute scores, the masked softmax over experts
and the weighted sum of expert outputs in one pass, forward and backward; ``experts_mix`` (inference)
also computes the experts' last layer in the same kernel, so their outputs are never written.
``fused_gate.reference`` holds the plain-PyTorch reference of each op (the tests' oracle and the CPU
fallback).

Importing the package registers the ops with ``torch.library`` but imports neither triton nor the
kernels: they load at the first op call (``fused_gate/dispatch.py``).
"""

from fused_gate import _interpreter, reference  # noqa: F401  (_interpreter first: checks before triton is imported)
from fused_gate.dispatch import export_as_reference, uses_kernels
from fused_gate.fused_experts import experts_mix
from fused_gate.gates import AttentionMix, InputQueryAttentionMix, SoftmaxGate
from fused_gate.integrations import swap_in
from fused_gate.layers import PLE, MMoE
from fused_gate.ops import attention_mix, softmax_mix
from fused_gate.options import ExpertOptions, GateOptions, TowerOptions

__version__ = "0.1.0"

__all__ = [
    "PLE",
    "AttentionMix",
    "ExpertOptions",
    "GateOptions",
    "InputQueryAttentionMix",
    "MMoE",
    "SoftmaxGate",
    "TowerOptions",
    "attention_mix",
    "experts_mix",
    "export_as_reference",
    "reference",
    "softmax_mix",
    "swap_in",
    "uses_kernels",
]
