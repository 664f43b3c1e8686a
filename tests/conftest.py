"""Test set-up: run the real Triton kernels, on CUDA when present, else through the interpreter.

Without a GPU, ``TRITON_INTERPRET=1`` must be in the environment before the kernels are defined,
which is why it is set here, at the top of the first module pytest loads (importing torch does not
import triton). On a GPU it is left unset so the tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fused_gate.kernels import INTERPRETED

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"

# Kernel outputs (stored in the input dtype, accumulated in float32) against the float64 reference
# computed from the same rounded inputs: the output rounding of the dtype dominates.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def pytest_sessionstart(session):
    if DEVICE == "cpu" and not INTERPRETED:
        pytest.exit("no GPU: run the tests with TRITON_INTERPRET=1 so the Triton kernels execute", returncode=4)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Relative check with an absolute floor scaled to the tensor's magnitude."""
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.double().cpu(),
        rtol=tol,
        atol=tol * scale,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=["kernels", "fallback"])
def dispatch_path(request, monkeypatch, device) -> str:
    """Run the ops, ``experts_mix`` and the layers through the kernels or through the plain-PyTorch fallback,
    which CPU users get without ``TRITON_INTERPRET`` (the dispatch predicate ``uses_kernels`` forced False)."""
    if request.param == "fallback":
        import fused_gate.dispatch
        import fused_gate.layers

        for module in (fused_gate.dispatch, fused_gate.layers):
            monkeypatch.setattr(module, "uses_kernels", lambda x: False)
    return request.param
