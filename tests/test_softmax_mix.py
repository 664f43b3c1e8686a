"""softmax_mix (classic gate, fused): kernels against the float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

import fused_gate as fg

from .conftest import assert_matches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(batch, experts, dim, tasks, dtype, device, *, grad_p=False, **kwargs):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, tasks, experts, generator=gen).to(device=device, dtype=dtype)
    h = torch.randn(batch, experts, dim, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(batch, tasks, dim, generator=gen).to(device=device, dtype=dtype)
    gp = torch.randn(batch, tasks, experts, generator=gen).to(device=device, dtype=dtype)

    def run(fn, z, x):
        z = z.detach().clone().requires_grad_()
        x = x.detach().clone().requires_grad_()
        y, p = fn(z, x, return_weights=True, **kwargs)
        loss = (y.double() * g.double()).sum() + ((p.double() * gp.double()).sum() if grad_p else 0)
        loss.backward()
        return y, p, z.grad, x.grad

    got = run(fg.softmax_mix, logits, h)
    want = run(fg.reference.softmax_mix, logits.double(), h.double())
    for name, a, b in zip(("Y", "p", "dZ", "dH"), got, want, strict=True):
        assert_matches(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (9, 5, 33, 3), (4, 16, 600, 2), (3, 64, 10, 4)], ids=str)
def test_matches_reference(shape, dtype, device):
    _check(*shape, dtype, device)


@pytest.mark.parametrize("top_k", [None, 1, 3, 6])
def test_temperature_mask_top_k_and_weight_gradient(top_k, device):
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[1] = False
    _check(10, 6, 20, 3, torch.float32, device, grad_p=True, temperature=0.7, mask=mask.to(device), top_k=top_k)


def test_strided_inputs(device):
    """Transposed [E, B, D] experts and logits produced as a [T, B, E] buffer, read in place."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(6, 11, 24, generator=gen).to(device).transpose(0, 1)  # [B, E, D] view of [E, B, D]
    logits = torch.randn(3, 11, 6, generator=gen).to(device).transpose(0, 1)  # [B, T, E] view
    grad_y = torch.randn(11, 3, 24, generator=gen).to(device)
    assert not h.is_contiguous() and not logits.is_contiguous()
    z, x = logits.clone().requires_grad_(), h.clone().requires_grad_()
    fg.softmax_mix(z, x, temperature=1.3).backward(grad_y)
    zr, xr = logits.double().requires_grad_(), h.double().requires_grad_()
    fg.reference.softmax_mix(zr, xr, temperature=1.3).backward(grad_y.double())
    y = fg.softmax_mix(logits, h, temperature=1.3)
    assert_matches(y, fg.reference.softmax_mix(logits.double(), h.double(), temperature=1.3), torch.float32, "Y")
    assert_matches(z.grad, zr.grad, torch.float32, "dZ")
    assert_matches(x.grad, xr.grad, torch.float32, "dH")
