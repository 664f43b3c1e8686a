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
