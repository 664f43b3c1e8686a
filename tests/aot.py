"""Ahead-of-time compilation of the planned kernel launches for CUDA targets, with no GPU needed.

Run as ``python -m tests.aot`` (without ``TRITON_INTERPRET``: interpreted kernels cannot be compiled);
prints one JSON record per compiled kernel. ``compile_launch`` reproduces what ``JITFunction.run``
does on a GPU (the same binder and specialisation of integers and pointers into constexprs and
divisibility attributes, the same options) and hands it to ``triton.compile`` with an explicit
``GPUTarget``; registers, stack and local memory are read off the cubin with the ``cuobjdump``
shipped in the triton wheel.

Configurations: the distinct ones the launch heuristic emits for the ``full`` benchmark grid
(``bench/cases.py``: E in {4, 8, 16, 64}, D in {64..1024}, with its largest T = 8) and the extremes
of the supported range (E = 1 and 256, D = 1 and 4096, T = 1 and 16), each with every option on
(per-row mask, top-k, weights out, weight gradients in): the register-heaviest variant of each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .address_width import narrow_address_arithmetic, probe_launches

GRID = [(e, d, 8) for e in (4, 8, 16, 64) for d in (64, 128, 256, 512, 1024)]
EXTREMES = [
    (1, 1, 1),
    (1, 4096, 16),
    (256, 1, 16),
    (256, 4096, 16),
    (64, 4096, 16),
    (4, 64, 16),
    (16, 512, 16),
]
CAPABILITIES = (80, 90)
BATCH = 1000  # not 1 and not a multiple of 16, like real batches: no extra specialisation


def distinct_cases() -> list[tuple[int, int, int, int, bool]]:
    """(capability, E, D, T, attention) for each distinct pair of forward/backward configs."""
    from fused_gate.kernels.config import tile_config

    seen: dict = {}
    for e, d, t in GRID + EXTREMES:
        seen.setdefault((tile_config(e, d, t, False), tile_config(e, d, t, True), t), (e, d, t))
    shapes = sorted(seen.values())
    cases = [(cc, *shape, True) for cc in CAPABILITIES for shape in shapes]
    return cases + [(cc, 16, 512, 16, False) for cc in CAPABILITIES]


def compile_launch(launch, capability: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict[str, int]:
    import triton.backends.nvidia as nvidia_backend

    cuobjdump = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups()), strict=True))


def planned_launches(experts: int, dim: int, tasks: int, attention: bool):
    import torch

    from fused_gate.kernels.gate_mix_bwd import plan_backward
    from fused_gate.kernels.gate_mix_fwd import plan_forward

    dt = torch.bfloat16
    h = torch.empty(BATCH, experts, dim, dtype=dt)
    q = torch.empty(tasks, dim, dtype=dt) if attention else torch.empty(BATCH, tasks, experts, dtype=dt)
    mask = torch.ones(BATCH, tasks, experts, dtype=torch.bool)
    top_k = max(1, experts // 2)
    kept = torch.empty(BATCH, tasks, experts, dtype=torch.bool)
    _, _, fwd = plan_forward(h, q, mask, 0.125, top_k, attention=attention, return_weights=True, kept=kept)
    grad_y = torch.empty(BATCH, tasks, dim, dtype=dt)
    grad_p = torch.empty(BATCH, tasks, experts, dtype=dt)
    _, _, bwd = plan_backward(grad_y, grad_p, h, q, kept, 0.125, attention=attention)
    return fwd + bwd


def compile_record(launch, capability: int, case: list) -> dict:
    compiled = compile_launch(launch, capability)
    return dict(
        case=case,
        kernel=launch.kernel.fn.__name__,
        num_warps=launch.meta.get("num_warps"),
        narrow_address_arithmetic=narrow_address_arithmetic(compiled.asm["ttir"]),
        **resource_usage(compiled.asm["cubin"]),
    )


def compile_case(case) -> list[dict]:
    capability, experts, dim, tasks, attention = case
    return [
        compile_record(launch, capability, list(case)) for launch in planned_launches(experts, dim, tasks, attention)
    ]


def compile_probes(capability: int) -> list[dict]:
    return [compile_record(launch, capability, ["probe"]) for launch in probe_launches()]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: interpreted kernels cannot be compiled")
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = [r for records in pool.map(compile_case, distinct_cases()) for r in records]
    results += compile_probes(CAPABILITIES[-1])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
