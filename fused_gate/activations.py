"""The activations of the experts' layers, by name: one registry for the layers, the reference, the
converters and the ``experts_mix`` kernel.

Each name maps to an :class:`Activation`: the torch function the reference applies, the same function in
place where torch has one (what a layer applies to its own fresh matmul or BatchNorm output), the library
module it converts from (``fused_gate/integrations``), and the name the kernel's ``_activate`` branches on
(``kernels/experts_mix.py``). Every one has a kernel implementation, so every activation a layer accepts
also runs in the one-kernel inference path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Activation(NamedTuple):
    """One activation: ``function`` (elementwise, torch), ``in_place`` (the same, overwriting its input
    where torch can; its result is the one to use), ``module`` (the ``nn`` class a converter maps to this
    name) and ``kernel`` (its name in the kernel)."""

    function: Callable[[Tensor], Tensor]
    in_place: Callable[[Tensor], Tensor]
    module: type[nn.Module]
    kernel: str


def _identity(x: Tensor) -> Tensor:
    return x


def _relu_limits(act: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``act`` (GELU, SiLU) with its limits at the infinities: ``act(+inf) = +inf`` and ``act(-inf) = 0``, where
    torch's formulas give NaN (``-inf * 0``; float32 GELU also at ``+inf``)."""

    def limited(h: Tensor) -> Tensor:
        return torch.where(h.isinf(), h.clamp(min=0), act(h))

    return limited


# Every function maps +-inf to its limit and NaN to NaN, as the kernel's _activate does.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(torch.relu, torch.relu_, nn.ReLU, "relu"),
    # negative slope 0.01, as nn.LeakyReLU()
    "leaky_relu": Activation(F.leaky_relu, F.leaky_relu_, nn.LeakyReLU, "leaky_relu"),
    # the exact (erf) form, as nn.GELU()
    "gelu": Activation(_relu_limits(F.gelu), _relu_limits(F.gelu), nn.GELU, "gelu"),
    "silu": Activation(_relu_limits(F.silu), _relu_limits(F.silu), nn.SiLU, "silu"),
    "sigmoid": Activation(torch.sigmoid, torch.sigmoid_, nn.Sigmoid, "sigmoid"),
    "tanh": Activation(torch.tanh, torch.tanh_, nn.Tanh, "tanh"),
    "identity": Activation(_identity, _identity, nn.Identity, "identity"),
}
