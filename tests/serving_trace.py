"""What AOTInductor compiles from the fused ops on CUDA, traced without a GPU.

    python -m tests.serving_trace        (without TRITON_INTERPRET: the kernels must be compiled ones)

The ops (``attention_mix`` with a shared and a per-row context, ``softmax_mix`` with top-k and the
weights, ``experts_mix`` with both gates) run on fake CUDA tensors whose batch size is symbolic, under
``aot_export_module`` as AOTInductor runs it (``V.aot_compilation`` on, inference). Prints one JSON
object: the graph's call targets, and for each kernel launch the kernel's name, whether its grid is
symbolic, and its launch options. On a GPU the same graph goes on to Inductor, which compiles the
kernels; here triton has no driver to find which arguments a kernel writes, so torch assumes all (a
warning on stderr).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._inductor.virtualized import V
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import fused_gate as fg


class Ops(nn.Module):
    def forward(self, h: Tensor, context: Tensor, logits: Tensor, mask: Tensor, x: Tensor, w: Tensor, b: Tensor):
        return (
            fg.attention_mix(h, context, mask=mask),
            fg.attention_mix(h, logits @ h),  # per-row queries [B, T, D], as the input-query gate gives
            *fg.softmax_mix(logits, h, top_k=2, return_weights=True),
            fg.experts_mix(x, w, b, context=context),
            fg.experts_mix(x, w, b, gate="softmax", logits=logits, top_k=2),
        )


def fake_cuda_inputs(mode: FakeTensorMode) -> list[Tensor]:
    """``h [B, 4, 8]``, ``context [2, 8]``, ``logits [B, 2, 4]``, ``mask [B, 2, 4]``, ``x [B, 6]``,
    ``w [4, 6, 8]``, ``b [4, 8]`` on CUDA, with a symbolic ``B``."""
    batch = mode.from_tensor(
        torch.empty(5), symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC])
    ).shape[0]
    shapes = [(batch, 4, 8), (2, 8), (batch, 2, 4), (batch, 2, 4), (batch, 6), (4, 6, 8), (4, 8)]
    with mode:
        tensors = [torch.empty(shape, device="cuda") for shape in shapes]
        tensors[3] = torch.empty(shapes[3], device="cuda", dtype=torch.bool)
    return tensors


def main() -> None:
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    inputs = fake_cuda_inputs(mode)
    with mode, V.set_aot_compilation(True), torch.no_grad():
        graph, _ = aot_export_module(Ops(), inputs, trace_joint=False)
    launches = []
    for node in graph.graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            configs = getattr(kernel, "configs", [])
            launches.append(
                {
                    "kernel": getattr(kernel, "fn", kernel).__name__,
                    "symbolic_grid": not all(isinstance(n, int) for n in node.kwargs["grid"][0]),
                    "options": [{"num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs],
                    "arguments": sorted(node.kwargs["kwargs"]),
                }
            )
    targets = sorted({str(n.target) for n in graph.graph.nodes if n.op == "call_function"})
    print(json.dumps({"targets": targets, "launches": launches}))


if __name__ == "__main__":
    main()
