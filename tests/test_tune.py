"""The tuning sweep: its candidates are valid tiles, each is checked against float64, the report is written.

Every candidate runs the real kernels (interpreted without a GPU), so this also checks tile
configurations the heuristic does not pick: fewer/more rows, other warp counts, D walked in chunks.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench import tune
from fused_gate.kernels.config import MAX_ROWS, MAX_WARPS, MIN_BLOCK_D, tile_config


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize(("experts", "dim", "tasks"), [(3, 24, 2), (8, 256, 4), (64, 1024, 8), (4, 4096, 1)])
def test_candidates_are_valid_tiles_around_the_heuristic(experts, dim, tasks, backward):
    found = tune.candidates(experts, dim, tasks, backward)
    assert found[0] == tile_config(experts, dim, tasks, backward)
    assert len(found) == len(set(found)) > 1
    for config in found:
        assert config.block_e >= experts and config.block_t >= tasks
        assert 1 <= config.rows <= MAX_ROWS and 1 <= config.num_warps <= MAX_WARPS
        assert config.block_d >= MIN_BLOCK_D and config.single_chunk == (config.block_d >= dim)
    assert any(not c.single_chunk for c in found)  # D walked in chunks is always among them


def test_best_is_the_fastest_correct_record():
    records = [
        {"seconds": 3.0, "correct": True},
        {"seconds": 1.0, "correct": False},
        {"seconds": 2.0, "correct": True},
    ]
    assert tune.best(records) is records[2]
    assert tune.best([records[1]]) is records[1]


def test_a_wrong_tile_is_reported_wrong(monkeypatch, device):
    # A tile narrower than E drops experts from the softmax and the mix: the check must catch it.
    base = tile_config(6, 16, 2, False)
    monkeypatch.setattr(tune, "candidates", lambda *args, **kwargs: [base, replace(base, block_e=4)])
    records = tune.sweep_shape("attention_mix", tune.Shape(5, 6, 2, 16), "fp32", device)
    fwd = [r for r in records if r["pass"] == "fwd"]
    assert [r["correct"] for r in fwd] == [True, False]


@pytest.mark.parametrize("op", ["attention_mix", "softmax_mix"])
def test_sweep_checks_every_candidate_and_writes_the_report(tmp_path, op):
    args = ["--op", op, "--dtype", "fp32", "--batch", "5", "--shapes", "3,2,24", "5,3,40", "--out", str(tmp_path)]
    tune.main(args)
    records = json.loads((tmp_path / f"tune_{op}_fp32.json").read_text())["records"]
    for pass_, backward in (("fwd", False), ("bwd", True)):
        for e, t, d in ((3, 2, 24), (5, 3, 40)):
            mine = [r for r in records if r["pass"] == pass_ and (r["E"], r["T"], r["D"]) == (e, t, d)]
            assert len(mine) == len(tune.candidates(e, d, t, backward))
            assert mine[0]["heuristic"] and not any(r["heuristic"] for r in mine[1:])
    assert all(r["correct"] for r in records), [r for r in records if not r["correct"]]
    text = (tmp_path / f"tune_{op}_fp32.md").read_text()
    assert text.count("\n| 3 | 2 | 24 |") == 2 and text.count("\n| 5 | 3 | 40 |") == 2
    assert f"`python -m bench.tune {' '.join(args)}`" in text
