"""Shared test helpers: random inputs and the forward+backward comparison against float64."""

from __future__ import annotations

import torch

import fused_gate as fg

from .conftest import assert_matches


def make_inputs(batch, experts, dim, tasks, *, dtype=torch.float32, device="cpu", per_row=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, experts, dim, generator=gen).to(device=device, dtype=dtype)
    shape = (batch, tasks, dim) if per_row else (tasks, dim)
    context = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    grad_y = torch.randn(batch, tasks, dim, generator=gen).to(device=device, dtype=dtype)
    return h, context, grad_y


def check_attention_mix(h, context, grad_y, *, dtype, grad_p=None, **kwargs):
    """Fused forward and every gradient against the float64 reference on the same inputs."""
    hk = h.detach().clone().requires_grad_()
    ck = context.detach().clone().requires_grad_()
    want_p = grad_p is not None or kwargs.get("return_weights", False)
    out = fg.attention_mix(hk, ck, return_weights=want_p, **{k: v for k, v in kwargs.items() if k != "return_weights"})
    y, p = out if want_p else (out, None)
    loss = (y.double() * grad_y.double()).sum()
    if grad_p is not None:
        loss = loss + (p.double() * grad_p.double()).sum()
    loss.backward()

    hr = h.detach().double().requires_grad_()
    cr = context.detach().double().requires_grad_()
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "return_weights"}
    yr, pr = fg.reference.attention_mix(hr, cr, return_weights=True, **ref_kwargs)
    loss_r = (yr * grad_y.double()).sum()
    if grad_p is not None:
        loss_r = loss_r + (pr * grad_p.double()).sum()
    loss_r.backward()

    assert y.dtype == h.dtype and y.shape == yr.shape
    assert_matches(y, yr, dtype, "Y")
    if p is not None:
        assert_matches(p, pr, dtype, "p")
    assert hk.grad.dtype == h.dtype and ck.grad.dtype == context.dtype
    assert_matches(hk.grad, hr.grad, dtype, "dH")
    assert_matches(ck.grad, cr.grad, dtype, "dC")
