"""Memory traffic of the kernels, counted through the Triton interpreter (``bench/traffic.py``).

The counter is checked on a kernel whose traffic is known exactly; the linear model in B on a measured
third batch; then the fused ops against their byte floors on the bench's ``small`` grid in bf16. These
are counts of bytes, not timings. Where today's kernels miss a bound, the shape is listed with the
reason and marked ``xfail(strict=True)``, so the test fails once the kernels meet it.
"""

from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.language as tl

from fused_gate.kernels import INTERPRETED

if not INTERPRETED:
    pytest.skip("memory traffic is counted through the Triton interpreter", allow_module_level=True)

from bench import traffic
from bench.cases import GRIDS, Shape
from bench.memory_traffic import count_traffic

SMALL = GRIDS["small"]
DIMS = sorted({(s.E, s.T, s.D) for s in SMALL})
LARGEST_B = max(s.B for s in SMALL)

# attention_mix's forward loads the shared context C [T, D] once per program (ROWS rows): T / (ROWS * (E + T))
# more bytes than the floor, served by L2 (unique bytes stay at the floor). A program of many rows, or C
# kept across rows, would remove it.
CONTEXT_PER_PROGRAM = "attention forward reloads the context C in every program (L2 hits)"
FORWARD_TOTAL_EXCEPTIONS = {
    ("attention_mix", 8, 4, 256): CONTEXT_PER_PROGRAM,  # 4 rows per program: 1.08x
    ("attention_mix", 16, 8, 512): CONTEXT_PER_PROGRAM,  # 1 row per program: 1.33x
}


@triton.jit
def _known_traffic_kernel(x_ptr, flag_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(x_ptr + offs, mask=inside)
    b = tl.load(x_ptr + offs, mask=inside & (offs % 2 == 0), other=0.0)  # even lanes only
    keep = tl.load(flag_ptr + offs, mask=inside, other=0)
    tl.store(y_ptr + offs, tl.where(keep != 0, a + b, a), mask=inside)
    tl.atomic_add(y_ptr + offs, 1.0, mask=inside)


def test_counter_counts_a_known_kernel_exactly():
    n, block = 100, 32  # 4 programs, 128 lanes, 28 masked off
    x, y, flag = torch.ones(n), torch.empty(n), torch.ones(n, dtype=torch.bool)
    with count_traffic() as launches:
        _known_traffic_kernel[(triton.cdiv(n, block),)](x, flag, y, n, BLOCK=block)
    (launch,) = launches
    assert (launch.kernel, launch.programs) == ("_known_traffic_kernel", 4)
    xs, flags, ys = (launch.by_operand[name] for name in ("x_ptr", "flag_ptr", "y_ptr"))
    assert (xs.loaded, xs.unique_loaded, xs.stored) == (4 * (n + n // 2), 4 * n, 0)
    assert (flags.loaded, flags.unique_loaded) == (n, n)  # bool: one byte per lane
    # The store, then the atomic's read-modify-write: y is read once and written twice.
    assert (ys.loaded, ys.stored, ys.unique_loaded, ys.unique_stored) == (4 * n, 8 * n, 4 * n, 4 * n)
    assert launch.total == xs.total + flags.total + ys.total and launch.unique == 4 * n + n + 8 * n
    assert torch.equal(y, _expected_y(n))


def _expected_y(n: int) -> torch.Tensor:
    # x + x on even lanes, x + 0 on odd ones, then the atomic's + 1.
    return torch.where(torch.arange(n) % 2 == 0, 3.0, 2.0)


def test_counter_names_aliased_operands_and_plans_without_running():
    n = 40
    x, y = torch.ones(n), torch.zeros(n)
    with count_traffic() as launches:
        _known_traffic_kernel[(2,)](x, x, y, n, BLOCK=32)  # x also read as the flags (as float32)
    assert set(launches[0].by_operand) == {"x_ptr=flag_ptr", "y_ptr"}
    with count_traffic(execute=False) as planned:
        _known_traffic_kernel[(5,)](x, x, y, n, BLOCK=32)
    assert [(p.kernel, p.programs, p.total) for p in planned] == [("_known_traffic_kernel", 5, 0)]
    assert torch.equal(y, _expected_y(n))  # the planned launch did not run


@pytest.mark.parametrize(
    ("op", "pass_", "dims"), [("attention_mix", "bwd", (4, 2, 128)), ("softmax_mix", "fwd", (8, 4, 256))]
)
def test_counts_are_linear_in_the_batch(op, pass_, dims):
    """The extrapolation reproduces a third, interpreted batch exactly."""
    b1, _ = traffic.interpreted_batches(op, pass_, dims, torch.bfloat16, [LARGEST_B])
    check = 3 * b1
    (predicted,) = traffic.measure(op, pass_, dims, [check], "bf16")
    counted = traffic.pass_launches(op, pass_, Shape(check, *dims), torch.bfloat16)
    assert [(x.kernel, x.programs, x.total, x.unique) for x in predicted.launches] == [
        (x.kernel, x.programs, x.total, x.unique) for x in counted
    ]


@pytest.fixture(scope="module")
def small_grid() -> dict[tuple, traffic.PassTraffic]:
    return {(r.op, r.pass_, r.shape): r for r in traffic.traffic_table(SMALL, "bf16")}


def _cases(pass_: str, exceptions: dict | None = None, batches=None) -> list:
    cases = []
    for op in ("attention_mix", "softmax_mix"):
        for shape in SMALL:
            if batches is not None and shape.B not in batches:
                continue
            reason = (exceptions or {}).get((op, shape.E, shape.T, shape.D))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(op, pass_, shape, marks=marks, id=f"{op}-{pass_}-{shape.id}"))
    return cases


@pytest.mark.parametrize(("op", "pass_", "shape"), _cases("fwd"))
def test_forward_unique_bytes_are_the_floor(small_grid, op, pass_, shape):
    assert small_grid[op, pass_, shape].unique <= 1.02


@pytest.mark.parametrize(("op", "pass_", "shape"), _cases("fwd", FORWARD_TOTAL_EXCEPTIONS))
def test_forward_total_bytes_are_the_floor_when_the_row_fits_the_tile(small_grid, op, pass_, shape):
    # Every shape of the small grid has E * D within the forward tile: H is read once.
    assert small_grid[op, pass_, shape].total <= 1.05


@pytest.mark.parametrize(("op", "pass_", "shape"), _cases("bwd", batches={LARGEST_B}))
def test_backward_unique_bytes_at_the_largest_batch(small_grid, op, pass_, shape):
    assert small_grid[op, pass_, shape].unique <= 1.10


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
def test_launches_per_pass(small_grid, pass_):
    most = {"fwd": 1, "bwd": 2}[pass_]
    counts = {key: len(r.launches) for key, r in small_grid.items() if key[1] == pass_}
    assert counts and all(1 <= c <= most for c in counts.values()), counts


def test_cli_writes_the_table(tmp_path):
    traffic.main(["--grid", "smoke", "--ops", "softmax_mix", "--out", str(tmp_path)])
    text = (tmp_path / "traffic_bf16.md").read_text()
    assert text.count("\n| softmax_mix |") == 2 and "a count of bytes, not a timing" in text
    records = json.loads((tmp_path / "traffic_bf16.json").read_text())
    assert len(records) == 4 and all(r["total_ratio"] >= r["unique_ratio"] > 0 for r in records)


def test_experts_mix_writes_nothing_of_size_h_in_one_launch():
    """The experts' last layer + gate in one kernel: one launch at an MMoE shape of B = 65536, whose
    stores are Y alone and whose distinct bytes are the floor |X| + |W| + |b| + |C or Z| + |Y| exactly."""
    from bench.experts_mix import MMoEShape

    shape = MMoEShape(B=65536, K=512, E=4, D=128, T=2)
    for gate in ("attention", "softmax"):
        r = traffic.measure_experts_mix(gate, shape, "bf16")
        (launch,) = r.launches
        assert launch.kernel == (
            "experts_mix_one_pass_kernel" if gate == "attention" else "experts_mix_two_pass_kernel"
        )
        assert launch.stored == launch.unique_stored == r.output_bytes < r.expert_bytes
        assert launch.unique == r.floor
        assert launch.unique / r.two_step < 0.45  # 2 |H| = 134 MB of the two-step's 235 MB never moves


def test_experts_mix_counts_are_linear_in_the_batch():
    from dataclasses import replace

    from bench.experts_mix import MMoEShape
    from fused_gate.kernels.config import experts_mix_config

    shape = MMoEShape(B=0, K=40, E=3, D=24, T=2)
    rows = experts_mix_config(3, 40, 24, 2, 2).rows
    predicted = traffic.measure_experts_mix("attention", replace(shape, B=3 * rows), "bf16").launches
    counted = traffic._experts_mix_launches("attention", replace(shape, B=3 * rows), torch.bfloat16)
    assert [(x.programs, x.total, x.unique) for x in predicted] == [(x.programs, x.total, x.unique) for x in counted]


def test_op_floors_count_inputs_read_and_outputs_written_once():
    """``count_op_floors``: a matmul reads its operands and writes its result; a view moves nothing; an in-place
    op reads the tensor it writes; a fill writes only; broadcast (stride 0) axes count once."""
    from bench.memory_traffic import count_op_floors

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with count_op_floors() as ops:
        c = a @ b
        c.t()
        c.add_(torch.ones(3).expand(4, 3))
    assert [(op.read, op.written) for op in ops] == [
        ((32 + 24) * 4, 12 * 4),  # mm
        (0, 3 * 4),  # ones: written only
        ((12 + 3) * 4, 12 * 4),  # add_: c and the expanded ones (3 distinct values) read, c written
    ]


def test_training_memory_fused_saves_and_moves_less_than_two_steps():
    """``python -m bench.training_memory`` at a small shape (MMoE with the attention gate, PLE with the softmax
    gate): the fused path keeps nothing of size B * E * D for the backward and moves fewer bytes per step than
    the two steps; every count lies on the line through the first two batches."""
    from bench import training_memory

    shape = training_memory.LayerShape(B=4096, K=24, E=4, D=40, T=2)
    h_bytes = shape.B * shape.E * shape.D * 2
    for layer, gate in (("mmoe", "attention"), ("ple", "softmax")):
        fused, two_steps = (
            training_memory.measure(layer, gate, path, shape, "bf16", check=True) for path in ("fused", "two-step")
        )
        assert two_steps.largest_saved >= h_bytes > fused.largest_saved, (layer, gate)
        assert fused.saved < two_steps.saved and fused.moved < two_steps.moved, (layer, gate)
