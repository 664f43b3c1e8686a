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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> elementwise function; the names a layer's ``activation`` may take.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01, as nn.LeakyReLU()
    "identity": lambda y: y,
}


def validate_activation(activation: object) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name, one of {sorted(ACTIVATIONS)}, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def validate_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise TypeError(f"dropout must be a probability in [0, 1), got {type(dropout).__name__}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def _is_int(w: object) -> bool:
    return isinstance(w, int) and not isinstance(w, bool)


def validate_widths(name: str, widths: int | Sequence[int], *, allow_empty: bool = False) -> tuple[int, ...]:
    """An int or a sequence of ints >= 1 as a tuple; ``allow_empty`` accepts ``()``."""
    widths = (widths,) if _is_int(widths) else widths
    expected = "an int >= 1 or a sequence of them" + (" (may be empty)" if allow_empty else "")
    if isinstance(widths, str) or not isinstance(widths, Sequence) or not all(_is_int(w) for w in widths):
        raise TypeError(f"{name} must be {expected}, got {widths!r}")
    if not all(w >= 1 for w in widths) or (not widths and not allow_empty):
        raise ValueError(f"{name} must be {expected}, got {widths!r}")
    return tuple(widths)


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
        y = torch.einsum("bi,gio->bgo" if x.dim() == 2 else "bgi,gio->bgo", x, self.weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


class BatchedDense(BatchedLinear):
    """One hidden layer of G MLPs: ``dropout(activation(batch_norm(x W_g + b_g)))``, shape ``[B, G, out]``.

    ``activation`` is a name from :data:`ACTIVATIONS`, ``dropout`` the drop probability and
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

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.batch_norm is not None:
            y = self.batch_norm(y.flatten(1)).unflatten(1, y.shape[1:])
        y = ACTIVATIONS[self.activation](y)
        return F.dropout(y, self.dropout, self.training) if self.dropout else y

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
