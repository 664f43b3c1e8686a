"""pytest glue of the benchmark suite: options, the case grid, the run's stamp, and one case's measurement.

    pytest bench --benchmark-json=run.json [--grid small|full|smoke] [--dtypes bf16,fp16]
                 [--impls fused,eager,...] [--passes fwd,bwd,fwd+bwd] [--rounds N] [--round-ms MS]

On a GPU the default grid is ``small`` in bf16. Without one the suite is a smoke check: ``smoke``
shapes in fp32, the Triton kernels run through the interpreter (``pytest_configure`` sets
``TRITON_INTERPRET=1`` before any kernel is defined), and the timings mean nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest
import torch

from bench.cases import DTYPES, GRIDS, IMPLS, PASSES, Shape, copy_call, floor_bytes, make_inputs, timed_call
from bench.interpreter import use_interpreter
from bench.timing import ON_CUDA, device_clock, device_label, iterations_for, peak_memory_bytes

DEVICE = "cuda" if ON_CUDA else "cpu"


def pytest_addoption(parser):
    group = parser.getgroup("fused_gate bench")
    group.addoption(
        "--grid",
        choices=sorted(GRIDS),
        default="small" if ON_CUDA else "smoke",
        help="shape grid (bench/cases.py): smoke (2 tiny shapes, for the CPU), small (12 shapes), full (240 shapes)",
    )
    group.addoption("--dtypes", default="bf16" if ON_CUDA else "fp32", help="comma list of fp32,fp16,bf16")
    group.addoption("--impls", default=",".join(IMPLS), help=f"comma list of {','.join(IMPLS)}")
    group.addoption("--passes", default=",".join(PASSES), help=f"comma list of {','.join(PASSES)}")
    group.addoption("--rounds", type=int, default=10 if ON_CUDA else 2, help="timed rounds per case")
    group.addoption("--round-ms", type=float, default=5.0, help="target length of one round on a GPU, in ms")


def _choices(config, name: str, allowed) -> list[str]:
    values = [v for v in config.getoption(name).split(",") if v]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise pytest.UsageError(f"--{name.lstrip('-')}: unknown {unknown}; expected some of {sorted(allowed)}")
    return values


def pytest_configure(config):
    use_interpreter()
    from fused_gate.kernels import INTERPRETED

    if not ON_CUDA and not INTERPRETED:
        raise pytest.UsageError("no GPU: run the benchmarks with TRITON_INTERPRET=1 so the Triton kernels execute")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    params = {
        "shape": (GRIDS[config.getoption("--grid")], lambda s: s.id),
        "dtype": (_choices(config, "--dtypes", DTYPES), str),
        "pass_": (_choices(config, "--passes", PASSES), str),
        "impl": (_choices(config, "--impls", IMPLS), str),
    }
    for name, (values, ids) in params.items():
        if name in metafunc.fixturenames:
            if name == "impl" and "sdpa" in values and metafunc.module.OP != "attention_mix":
                values = [v for v in values if v != "sdpa"]
            metafunc.parametrize(name, values, ids=[ids(v) for v in values])


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.benchmark(timer=device_clock))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stamp the run: device, versions and the command that produced it (read by bench/report.py)."""
    from fused_gate.kernels import INTERPRETED

    machine_info["fused_gate"] = {
        "device": device_label(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "cuda": torch.version.cuda,
        "interpreted": INTERPRETED,
        "command": os.environ.get("FUSED_GATE_BENCH_COMMAND") or " ".join(["python -m pytest", *sys.argv[1:]]),
    }


@pytest.fixture
def run_case(benchmark, request):
    """Time one case with pytest-benchmark and record its bytes, GB/s and peak memory in ``extra_info``."""
    config = request.config
    rounds = config.getoption("--rounds")

    def measure(op: str, pass_: str, impl: str, shape: Shape, dtype: str) -> None:
        nbytes = floor_bytes(op, pass_, shape, DTYPES[dtype])
        if impl == "copy":
            nbytes -= nbytes % 2
            call = copy_call(nbytes, DEVICE)
        else:
            inputs, grad_y = make_inputs(op, shape, DTYPES[dtype], DEVICE)
            call = timed_call(op, pass_, impl, inputs, grad_y)
        iterations = iterations_for(call, config.getoption("--round-ms") / 1e3) if ON_CUDA else 1
        peak = peak_memory_bytes(call)
        benchmark.group = f"{op} {pass_} {dtype} {shape.id}"
        benchmark.extra_info.update(
            {"op": op, "pass": pass_, "impl": impl, "dtype": dtype, "bytes": nbytes, **vars(shape)}
        )
        benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1)
        if benchmark.stats is not None:  # None under --benchmark-disable, which runs each case once untimed
            median = benchmark.stats.stats.median
            benchmark.extra_info.update(peak_memory_bytes=peak, gbps=nbytes / median / 1e9, iterations=iterations)

    def run(op: str, pass_: str, impl: str, shape: Shape, dtype: str) -> None:
        try:
            measure(op, pass_, impl, shape, dtype)
            return
        except torch.OutOfMemoryError:
            pass
        # Outside the handler, so the failed case's tensors are already released.
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} {op} {pass_} {dtype} {shape.id}: out of device memory")

    return run
