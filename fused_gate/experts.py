"""G independent MLPs evaluated as one batched matmul per layer: the experts, the gate DNNs and the task towers.

Every layer holds ``weight [G, in, out]`` and ``bias [G, out]`` and computes all G groups with one
``einsum``, never a Python loop over groups. A layer is ``Linear -> BatchNorm -> activation -> dropout``,
the order of torch-rechub's ``MLP`` and DeepCTR-Torch's ``DNN``. The per-group BatchNorm is one
``nn.BatchNorm1d(G * out)`` over the flattened ``[B, G * out]`` output, which normalises every
(group, unit) channel on its own: G independent BatchNorms.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_gate._validation import validate_activation, validate_dropout, validate_widths
from fused_gate.activations import ACTIVATIONS


def _grouped_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The storage of :func:`grouped_linear`'s result, in the layout its matmul writes: ``[B, G * out]`` for
    ``x [B, in]`` (one matmul with the groups' weights side by side, ``[in, G * out]``), ``[G, B, out]`` for
    ``x [B, G, in]`` (one matmul per group on its own input, read in place)."""
    if x.dim() == 2:
        flat = weight.transpose(0, 1).reshape(weight.shape[1], -1)
        return x @ flat if bias is None else torch.addmm(bias.flatten(), x, flat)
    xg = x.transpose(0, 1)
    return torch.bmm(xg, weight) if bias is None else torch.baddbmm(bias[:, None], xg, weight)


def _as_groups(z: Tensor, groups: int) -> Tensor:
    """``[B, G, out]`` view of a :func:`_grouped_matmul` result (``[B, G * out]`` or ``[G, B, out]``)."""
    return z.unflatten(1, (groups, -1)) if z.dim() == 2 else z.transpose(0, 1)


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``y[b, g] = x[b, (g)] @ weight[g] + bias[g]``: ``x [B, in]`` or ``[B, G, in]``, ``weight [G, in, out]``,
    ``bias [G, out]`` or None; returns ``[B, G, out]`` (for a 3-D ``x`` a transposed view of ``[G, B, out]``,
    which the next grouped matmul reads in place)."""
    return _as_groups(_grouped_matmul(x, weight, bias), weight.shape[0])


def _dropout(z: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(z, p, training)``: in training every entry is zeroed with probability ``p`` and the rest
    scaled by ``1 / (1 - p)``. For float32 on a CPU the mask comes from uniform draws (kept where ``u >= p``),
    twice as fast there as torch's Bernoulli sampling; elsewhere torch's own (fused on a GPU)."""
    if not training or p == 0:
        return z
    if z.device.type != "cpu" or z.dtype != torch.float32:
        return F.dropout(z, p, True)
    return z * torch.rand_like(z).ge_(p).mul_(1 / (1 - p))


def _folds(batch_norm: nn.BatchNorm1d) -> bool:
    """Whether the BatchNorm is an affine map of running statistics (eval mode), with no hook to call."""
    return (
        not batch_norm.training
        and batch_norm.running_mean is not None
        and not batch_norm._forward_hooks
        and not batch_norm._forward_pre_hooks
    )


class BatchedLinear(nn.Module):
    """G independent ``Linear(in_features, out_features)`` as one batched matmul.

    ``forward(x)`` takes ``[B, in]`` (every group reads the same input) or ``[B, G, in]`` (one input per
    group) and returns ``y[b, g] = x[b, (g)] @ weight[g] + bias[g]``, shape ``[B, G, out]``. The
    initialisation is ``nn.Linear``'s: uniform in ``+-1/sqrt(in)``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, *, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        for parameter in (self.weight, self.bias):
            if parameter is not None:
                nn.init.uniform_(parameter, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return grouped_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


class BatchedDense(BatchedLinear):
    """One hidden layer of G MLPs: ``dropout(activation(batch_norm(x W_g + b_g)))``, shape ``[B, G, out]``.

    ``activation`` is a name of :data:`fused_gate.activations.ACTIVATIONS`, ``dropout`` the drop probability and
    ``batch_norm`` an ``nn.BatchNorm1d(G * out)`` (or None) over the flattened output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, groups)
        self.activation = validate_activation(activation)
        self.dropout = validate_dropout(dropout)
        self.batch_norm = nn.BatchNorm1d(groups * out_features) if batch_norm else None

    def _folded(self) -> tuple[Tensor, Tensor]:
        """The weight and bias of the matmul followed by the eval-mode BatchNorm ``y * scale + shift``."""
        bn = self.batch_norm
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        scale, shift = scale.view(self.groups, self.out_features), shift.view(self.groups, self.out_features)
        return self.weight * scale[:, None], shift if self.bias is None else torch.addcmul(shift, self.bias, scale)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.batch_norm
        if bn is not None and _folds(bn):
            # In eval mode the BatchNorm is affine: folded into the matmul, it costs no pass over y.
            z, bn = _grouped_matmul(x, *self._folded()), None
        else:
            z = _grouped_matmul(x, self.weight, self.bias)
        if bn is not None:
            z = bn(z if z.dim() == 2 else z.transpose(0, 1).flatten(1))
        # The activation runs in place on the matmul's or BatchNorm's own output, never on a view of it
        # (autograd would undo an in-place op on a view with copies in the backward).
        z = ACTIVATIONS[self.activation].in_place(z)
        return _as_groups(_dropout(z, self.dropout, self.training), self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, dropout={self.dropout}"


class BatchedMLP(nn.Module):
    """G MLPs of the same widths, ``in_features -> hidden[0] -> ... -> hidden[-1]``, batched per layer.

    ``forward(x [B, in] or [B, G, in])`` returns ``[B, G, hidden[-1]]``; ``layers`` holds one
    :class:`BatchedDense` per width, each with the same activation, dropout and BatchNorm option.
    """

    def __init__(
        self,
        in_features: int,
        groups: int,
        hidden: int | Sequence[int],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        widths = (in_features, *validate_widths("hidden", hidden))
        self.out_features = widths[-1]
        self.layers = nn.ModuleList(
            BatchedDense(a, b, groups, activation=activation, dropout=dropout, batch_norm=batch_norm)
            for a, b in itertools.pairwise(widths)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Experts(BatchedMLP):
    """E expert MLPs ``in_features -> hidden[0] -> ... -> hidden[-1]``, one batched matmul per layer.

    ``forward(x)`` takes ``[B, in]`` (every expert sees the same input) or ``[B, E, in]`` (one input per
    expert) and returns ``[B, E, hidden[-1]]``, the layout the gate kernels read in place. Each layer
    is ``Linear -> BatchNorm (per expert, optional) -> activation -> dropout``; the last one,
    ``layers[-1]``, holds ``weight [E, K, D]``, ``bias [E, D]`` and the activation's name.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        hidden: int | Sequence[int],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(
            in_features, num_experts, hidden, activation=activation, dropout=dropout, batch_norm=batch_norm
        )

    def last_layer_input(self, x: Tensor) -> Tensor:
        """The input of ``layers[-1]``: ``x`` through every layer but the last (``x`` itself for one layer)."""
        for layer in self.layers[:-1]:
            x = layer(x)
        return x


class TaskTowers(nn.Module):
    """One MLP tower per task, ``D -> hidden... -> 1``, batched: ``[B, T, D] -> [B, T]``.

    ``hidden`` may be empty (each tower is then a single ``Linear(D, 1)``). The hidden layers are
    :class:`BatchedDense` (``Linear -> BatchNorm -> activation -> dropout``); the output layer
    ``output`` is a plain :class:`BatchedLinear` with ``weight [T, K, 1]`` and, when ``bias``, ``bias [T, 1]``.
    """

    def __init__(
        self,
        num_tasks: int,
        in_features: int,
        hidden: int | Sequence[int],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden = validate_widths("tower_hidden", hidden, allow_empty=True)
        options = dict(activation=validate_activation(activation), dropout=validate_dropout(dropout))
        options["batch_norm"] = batch_norm
        self.hidden = BatchedMLP(in_features, num_tasks, hidden, **options) if hidden else None
        self.output = BatchedLinear(hidden[-1] if hidden else in_features, 1, num_tasks, bias=bias)

    def forward(self, y: Tensor) -> Tensor:
        z = self.hidden(y) if self.hidden is not None else y
        return self.output(z).squeeze(-1)
