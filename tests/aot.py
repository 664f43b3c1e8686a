"""Ahead-of-time compilation of the planned kernel launches for CUDA targets, with no GPU needed.

Run as ``python -m tests.aot`` (without ``TRITON_INTERPRET``: interpreted kernels cannot be compiled);
prints one JSON record per compiled kernel. ``compile_launch`` reproduces what ``JITFunction.run``
does on a GPU (the same binder and specialisation of integers and pointers into constexprs and
divisibility attributes, the same options) and hands it to ``triton.compile`` with an explicit
``GPUTarget``; registers, stack and local memory are read off the cubin with the ``cuobjdump``
shipped in the triton wheel.

Configurations (``ci_cases``, what ``tests/test_compile.py`` checks): the distinct ones the launch
heuristic emits for the ``full`` benchmark grid (``bench/cases.py``: E in {4, 8, 16, 64},
D in {64..1024}, with its largest T = 8) and the
extremes of the supported range (E = 1 and 256, D = 1 and 4096, T = 1 and 16), each with every option
on (per-row mask, top-k, weights out, weight gradients in) on sm_80 and sm_90; every T from 1 to 16
at the widest tiles, every option combination, and the softmax gate, on sm_90. ``--full`` compiles every T from 1 to 16
for every (E, D) above with every option combination of both ops (thousands of kernels: a many-core
machine's job); ``--occupancy`` the bench's full grid as the bench runs it (no option), for
``bench/occupancy.py``. ``experts_mix_cases`` (checked too, and compiled by every run but
``--occupancy``): the one-kernel experts + gate at the bench's MMoE shapes and the extremes of its range,
both gates, sm_80 and sm_90, with every option on, and with a per-row context, one input per expert
and float32 operands; and the backward kernel (with ``dL/dp`` and a shared context, and in the other layouts).
"""

from __future__ import annotations

import argparse
import itertools
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
# Options change the compiled kernel (each is a constexpr): mask kind, top-k, weights returned in the
# forward and their gradient fed to the backward, and (attention) a per-row context [B, T, D].
MASKS = ((), ("shared_mask",), ("per_row_mask",))
# The register-heaviest variant: a shared context (the backward keeps its dC partial), a per-row mask,
# top-k and weights in and out.
HEAVIEST = ("per_row_mask", "top_k", "weights")
# The widest tiles of each pass: where registers run out first.
WIDEST = ((8, 1024), (16, 512))

# experts_mix, as (E, K, D, T): bench/experts_mix.py's shapes, then the extremes (E = 1 and 256, K and
# D = 1 and 4096, T = 16, the largest gate tile E * T = 512).
EXPERTS_MIX = "experts_mix"
EXPERTS_MIX_SHAPES = [
    (8, 512, 256, 2),
    (4, 128, 128, 2),
    (16, 512, 512, 8),
    (64, 256, 64, 1),
    (1, 1, 1, 1),
    (256, 64, 64, 2),
    (64, 512, 256, 8),
    (4, 64, 4096, 16),
    (16, 4096, 1024, 8),
]


def option_sets(attention: bool) -> list[tuple[str, ...]]:
    """Every combination of options the launcher can meet for one op."""
    contexts = ((), ("per_row_context",)) if attention else ((),)
    flags = [(), ("top_k",)], [(), ("weights",)]
    return [c + m + k + w for c, m, k, w in itertools.product(contexts, MASKS, *flags)]


def _distinct(shapes, capabilities, option_lists) -> list[tuple]:
    """(capability, E, D, T, attention, options) for each distinct pair of forward/backward configs."""
    from fused_gate.kernels.config import tile_config

    seen: dict = {}
    for e, d, t in shapes:
        seen.setdefault((tile_config(e, d, t, False), tile_config(e, d, t, True), t), (e, d, t))
    return [
        (cc, *shape, attention, options)
        for cc in capabilities
        for shape in sorted(seen.values())
        for attention in (True, False)
        for options in option_lists(attention)
    ]


def _heaviest(attention: bool) -> list[tuple[str, ...]]:
    return [HEAVIEST]


def ci_cases() -> list[tuple]:
    """What ``tests/test_compile.py`` checks (see the module docstring)."""
    every_t = [(e, d, t) for e, d in WIDEST for t in range(1, 17)]
    cases = [c for c in _distinct(GRID + EXTREMES, CAPABILITIES, _heaviest) if c[4] or c[0] == 90]
    cases += [c for c in _distinct(every_t, (90,), _heaviest) if c not in cases]
    return cases + [c for c in _distinct([(8, 1024, 8)], (90,), option_sets) if c not in cases]


def experts_mix_cases() -> list[tuple]:
    """(EXPERTS_MIX, capability, E, K, D, T, attention, options) of the experts_mix kernels: the forward, and
    with ``"training"`` the backward (GELU, whose derivative takes the most registers; the forward it follows
    is the one of ``"weights"``, its weights stored in float32), with ``dL/dp`` (``"weights"``) and a shared
    context, or in the other layouts."""

    def options(attention: bool) -> list[tuple[str, ...]]:
        layouts = ("per_row_context",) * attention + ("per_expert_input", "float32")
        # Without top-k the attention gate runs its one-pass variant where D fits the tile.
        inference = [HEAVIEST, layouts] + [("per_row_mask", "weights")] * attention
        return [*inference, ("training", "weights"), ("training", *layouts)]

    return [
        (EXPERTS_MIX, cc, *shape, attention, opts)
        for cc in CAPABILITIES
        for shape in EXPERTS_MIX_SHAPES
        for attention in (True, False)
        for opts in options(attention)
    ]


def full_cases() -> list[tuple]:
    shapes = [(e, d, t) for e, d, _ in GRID for t in range(1, 17)] + EXTREMES
    return _distinct(shapes, CAPABILITIES, option_sets)


def occupancy_cases(shapes) -> list[tuple]:
    """sm_90, no option, every (E, D, T) of ``shapes`` (one case per shape, not deduplicated)."""
    return [(90, e, d, t, attention, ()) for e, d, t in shapes for attention in (True, False)]


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


def planned_launches(experts: int, dim: int, tasks: int, attention: bool, options: tuple[str, ...] = ()):
    import torch

    from fused_gate.kernels.gate_mix_bwd import plan_backward
    from fused_gate.kernels.gate_mix_fwd import plan_forward

    dt = torch.bfloat16
    h = torch.empty(BATCH, experts, dim, dtype=dt)
    if attention:
        q = torch.empty(*(BATCH,) * ("per_row_context" in options), tasks, dim, dtype=dt)
    else:
        q = torch.empty(BATCH, tasks, experts, dtype=dt)
    mask = None
    if "shared_mask" in options or "per_row_mask" in options:
        mask = torch.ones(*(BATCH,) * ("per_row_mask" in options), tasks, experts, dtype=torch.bool)
    top_k = max(1, experts // 2) if "top_k" in options else None
    # With top-k the forward records the experts it kept, and the backward takes them as its mask.
    kept = torch.empty(BATCH, tasks, experts, dtype=torch.bool) if top_k is not None else None
    weights = "weights" in options
    gate = "attention" if attention else "softmax"
    fwd = plan_forward(h, q, mask, 0.125, top_k, gate=gate, return_weights=weights, kept=kept)
    grad_y = torch.empty(BATCH, tasks, dim, dtype=dt)
    grad_p = torch.empty(BATCH, tasks, experts, dtype=dt) if weights else None
    bwd = plan_backward(grad_y, grad_p, h, q, kept if kept is not None else mask, 0.125, gate=gate)
    return [*fwd.launches, *bwd.launches]


def planned_experts_mix(
    experts: int, in_features: int, dim: int, tasks: int, attention: bool, options: tuple[str, ...] = ()
):
    import torch

    from fused_gate.kernels.experts_mix import plan_experts_mix
    from fused_gate.kernels.experts_mix_bwd import plan_experts_mix_backward

    dt = torch.float32 if "float32" in options else torch.bfloat16
    x = torch.empty(BATCH, *(experts,) * ("per_expert_input" in options), in_features, dtype=dt)
    weight, bias = torch.empty(experts, in_features, dim, dtype=dt), torch.empty(experts, dim, dtype=dt)
    if attention:
        cz = torch.empty(*(BATCH,) * ("per_row_context" in options), tasks, dim, dtype=dt)
    else:
        cz = torch.empty(BATCH, tasks, experts, dtype=dt)
    mask = torch.ones(BATCH, tasks, experts, dtype=torch.bool) if "per_row_mask" in options else None
    top_k = max(1, experts // 2) if "top_k" in options else None
    gate = "attention" if attention else "softmax"
    if "training" not in options:
        plan = plan_experts_mix(
            x, weight, bias, cz, mask, 0.125, top_k, gate=gate, activation="relu", return_weights="weights" in options
        )
        return list(plan.launches)
    y, p = torch.empty(BATCH, tasks, dim, dtype=dt), torch.empty(BATCH, tasks, experts)  # the forward's Y, float32 p
    grad_p = torch.empty(BATCH, tasks, experts) if "weights" in options else None
    backward = plan_experts_mix_backward(y, grad_p, x, weight, bias, cz, p, y, 0.125, gate=gate, activation="gelu")
    return list(backward.launches)


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
    if case[0] == EXPERTS_MIX:
        capability, *shape = case[1:]
        launches = planned_experts_mix(*shape)
    else:
        capability, experts, dim, tasks, attention, options = case
        launches = planned_launches(experts, dim, tasks, attention, options)
    return [compile_record(launch, capability, list(case)) for launch in launches]


def compile_probes(capability: int) -> list[dict]:
    return [compile_record(launch, capability, ["probe", []]) for launch in probe_launches()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.aot", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", help="every T and option combination (see above)")
    which.add_argument("--occupancy", metavar="E,D,T;...", help="no-option cases for these shapes, sm_90")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if args.occupancy:
        cases = occupancy_cases([tuple(map(int, s.split(","))) for s in args.occupancy.split(";")])
    else:
        cases = (full_cases() if args.full else ci_cases()) + experts_mix_cases()
    workers = max(1, min(16 if args.full else 4, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = [r for records in pool.map(compile_case, cases) for r in records]
    if not args.occupancy:
        results += compile_probes(CAPABILITIES[-1])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
