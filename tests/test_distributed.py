"""DistributedDataParallel and FSDP2: 2 gloo processes give the gradients of one process on the whole batch.

The ranks run in a child program (``tests/ddp.py``) in a session of its own, killed whole on timeout,
so a stuck collective fails this test instead of hanging the suite. They use CPU tensors with
``TRITON_INTERPRET=1``, so the Triton kernels run (interpreted) on every rank, GPU or not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .models import LAYERS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rank_grads(tmp_path_factory) -> list[dict[str, list[torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ddp") / "grads"
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.ddp", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = child.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        log, _ = child.communicate()
        pytest.fail(f"the DDP ranks did not finish in 600 s:\n{log[-3000:]}")
    assert child.returncode == 0, f"the DDP child failed:\n{log[-5000:]}"
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_ddp_gradients_equal_single_process(rank_grads, name):
    rank0, rank1 = rank_grads
    single = rank0[f"{name}/single"]
    assert len(rank0[name]) == len(rank1[name]) == len(single) > 0
    assert sum(g.abs().sum() for g in single) > 0
    for g0, g1, want in zip(rank0[name], rank1[name], single, strict=True):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # the all-reduce leaves every rank the same
        torch.testing.assert_close(g0, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fsdp2_gradients_equal_single_process(rank_grads, name):
    """``fully_shard`` (parameters sharded over the ranks): the gradients, gathered whole, are the same on both
    ranks and equal the single process's on the whole batch."""
    rank0, rank1 = rank_grads
    single = rank0[f"{name}/single"]
    assert len(rank0[f"{name}/fsdp2"]) == len(single) > 0
    for g0, g1, want in zip(rank0[f"{name}/fsdp2"], rank1[f"{name}/fsdp2"], single, strict=True):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)
        torch.testing.assert_close(g0, want, rtol=1e-5, atol=1e-6)
