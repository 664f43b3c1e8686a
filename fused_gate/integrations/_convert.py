"""Building a ``fused_gate.MMoE`` / ``PLE`` from a library model's layers: the shared part of the converters.

A library model holds one MLP per expert, gate and tower. The converters describe each as a list of
:class:`Dense` layers (``Linear -> BatchNorm -> activation -> dropout``), validate that the MLPs batched into
one fused module have the same structure (:func:`batched_options`), build the fused layer and copy every
weight and BatchNorm buffer into the groups of its batched modules (:func:`load_mlp`, :func:`load_linear`).

A CGC level's fused experts are ordered ``[S shared, task 0's K, ..., task T-1's K]`` and every gate
has a logit per expert (masked where the gate may not read the expert). A library gate scores only its
own experts, in its own order, so its weights are copied into the columns :func:`cgc_gate_columns` gives;
the other columns stay zero, and the mask keeps them out of the output and their gradients at zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fused_gate.activations import ACTIVATIONS
from fused_gate.experts import BatchedLinear, BatchedMLP, TaskTowers
from fused_gate.gates import SoftmaxGate


def _default_form(module: nn.Module) -> bool:
    """Whether ``module`` computes its activation's function as registered: ``LeakyReLU``'s slope 0.01,
    ``GELU``'s exact (erf) form."""
    return getattr(module, "negative_slope", 0.01) == 0.01 and getattr(module, "approximate", "none") == "none"


def activation_name(module: nn.Module, where: str) -> str:
    """The fused name of a library activation module (:data:`fused_gate.activations.ACTIVATIONS`);
    ``ValueError`` naming ``where`` if it has none."""
    for name, activation in ACTIVATIONS.items():
        if type(module) is activation.module and _default_form(module):
            return name
    if type(module).__name__ == "Identity" and not any(True for _ in module.parameters()):
        return "identity"  # DeepCTR-Torch's "linear" activation
    supported = ", ".join(a.module.__name__ for a in ACTIVATIONS.values())
    raise ValueError(
        f"{where}: activation {module!r} cannot be converted; the batched layers support {supported} "
        "(LeakyReLU with slope 0.01, GELU exact; activations with learned parameters, such as PReLU or Dice, "
        "are not batched)"
    )


@dataclass(frozen=True)
class Dense:
    """One hidden layer of a library MLP, ``where`` naming it in messages."""

    linear: nn.Linear
    batch_norm: nn.BatchNorm1d | None
    activation: str
    dropout: float
    where: str


def _structure(mlp: Sequence[Dense]) -> tuple:
    return tuple(
        (d.linear.in_features, d.linear.out_features, d.batch_norm is not None, d.activation, d.dropout) for d in mlp
    )


def batched_options(mlps: Sequence[Sequence[Dense]], names: Sequence[str]) -> dict:
    """``hidden``, ``activation``, ``dropout``, ``batch_norm`` shared by the MLPs batched into one module.

    The MLPs (named ``names``) must have the same widths, activation, dropout and BatchNorm in every
    layer, biased Linears and affine BatchNorms with running statistics; ``ValueError`` names the first
    that does not.
    """
    first = _structure(mlps[0])
    for mlp, name in zip(mlps, names, strict=True):
        if _structure(mlp) != first:
            raise ValueError(
                f"{name} differs from {names[0]} in its widths, activation, dropout or BatchNorm; "
                "the converted layer evaluates them as one batched MLP"
            )
    layers = [d for mlp in mlps for d in mlp]
    for d in layers:
        if d.linear.bias is None:
            raise ValueError(f"{d.where}: a hidden Linear without bias cannot be converted")
        if d.batch_norm is not None and not (d.batch_norm.affine and d.batch_norm.track_running_stats):
            raise ValueError(f"{d.where}: a BatchNorm needs affine=True and track_running_stats=True to be converted")
    for what, values in (
        ("activation", {d.activation for d in layers}),
        ("dropout probability", {d.dropout for d in layers}),
        ("BatchNorm setting", {d.batch_norm is not None for d in layers}),
    ):
        if len(values) > 1:
            raise ValueError(f"{names[0]}: its layers must share one {what} to be converted, got {sorted(values)}")
    if not first:
        return dict(hidden=(), activation=None, dropout=None, batch_norm=None)
    return dict(
        hidden=tuple(d.linear.out_features for d in mlps[0]),
        activation=mlps[0][0].activation,
        dropout=mlps[0][0].dropout,
        batch_norm=mlps[0][0].batch_norm is not None,
    )


@torch.no_grad()
def load_linear(target: BatchedLinear, linears: Sequence[nn.Linear], columns: Sequence[Sequence[int]] | None = None):
    """Copy ``linears[g]`` into group g of ``target``, into output ``columns[g]`` (default: all, in order);
    the columns no Linear writes are zero."""
    target.weight.zero_()
    if target.bias is not None:
        target.bias.zero_()
    for g, linear in enumerate(linears):
        cols = list(range(target.out_features)) if columns is None else list(columns[g])
        target.weight[g, :, cols] = linear.weight.T
        if target.bias is not None:
            target.bias[g, cols] = linear.bias


@torch.no_grad()
def load_batch_norm(
    target: nn.BatchNorm1d,
    sources: Sequence[nn.BatchNorm1d],
    width: int,
    columns: Sequence[Sequence[int]] | None = None,
):
    """Copy BatchNorm g (``width`` channels) into channels ``g * width + columns[g]`` of ``target``.

    Channels no source writes (masked logits) get weight, bias, running mean and variance 0: their input
    is a constant 0, so training leaves them at 0 and they output 0 in both modes.
    """
    target.eps, target.momentum = sources[0].eps, sources[0].momentum
    for tensor in (target.weight, target.bias, target.running_mean, target.running_var):
        tensor.zero_()
    target.num_batches_tracked.copy_(sources[0].num_batches_tracked)
    for g, bn in enumerate(sources):
        cols = torch.tensor(list(range(bn.num_features)) if columns is None else list(columns[g])) + g * width
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(target, name)[cols] = getattr(bn, name)


def load_mlp(target: BatchedMLP, mlps: Sequence[Sequence[Dense]]) -> None:
    """Copy MLP g's layers (Linear and BatchNorm) into group g of ``target``'s batched layers."""
    for i, layer in enumerate(target.layers):
        load_linear(layer, [mlp[i].linear for mlp in mlps])
        if layer.batch_norm is not None:
            load_batch_norm(layer.batch_norm, [mlp[i].batch_norm for mlp in mlps], layer.out_features)


def load_gate(
    gate: SoftmaxGate,
    dnns: Sequence[Sequence[Dense]],
    finals: Sequence[nn.Linear],
    logits_batch_norms: Sequence[nn.BatchNorm1d] | None,
    columns: Sequence[Sequence[int]] | None = None,
) -> None:
    """Copy G library gates (DNN, final Linear, logits BatchNorm) into ``gate``, logits into ``columns``."""
    if gate.dnn is not None:
        load_mlp(gate.dnn, dnns)
    load_linear(gate.linear, finals, columns)
    if gate.batch_norm is not None:
        load_batch_norm(gate.batch_norm, logits_batch_norms, gate.num_experts, columns)


def load_towers(towers: TaskTowers, hidden: Sequence[Sequence[Dense]], outputs: Sequence[nn.Linear]) -> None:
    if towers.hidden is not None:
        load_mlp(towers.hidden, hidden)
    load_linear(towers.output, outputs)


def tower_options(hidden: Sequence[Sequence[Dense]], outputs: Sequence[nn.Linear], names: Sequence[str]) -> dict:
    """The fused layer's tower keyword arguments for T library towers (hidden layers, output Linear)."""
    if len({o.bias is not None for o in outputs}) > 1 or any(o.out_features != 1 for o in outputs):
        raise ValueError(f"{names[0]}: every tower must end in a Linear(., 1), all with or all without bias")
    options = batched_options(hidden, names)
    return dict(
        tower_hidden=options["hidden"],
        tower_activation=options["activation"],
        tower_dropout=options["dropout"],
        tower_batch_norm=options["batch_norm"],
        tower_bias=outputs[0].bias is not None,
    )


def cgc_gate_columns(num_tasks: int, per_task: int, shared: int, *, shared_gate: bool) -> list[list[int]]:
    """Each library gate's logit columns as fused expert indices.

    The libraries order a task gate's experts ``[that task's K, then the S shared]`` and the shared gate's
    ``[all T * K task experts, then the S shared]``; the fused level orders them ``[S shared, task 0's K, ...]``.
    """
    gates = [[shared + t * per_task + k for k in range(per_task)] + list(range(shared)) for t in range(num_tasks)]
    if shared_gate:
        gates.append([shared + j for j in range(num_tasks * per_task)] + list(range(shared)))
    return gates


class FusedMultiTask(nn.Module):
    """A converted library model: its input layer, the fused ``MMoE`` / ``PLE`` with towers, its prediction layers.

    ``forward(x)`` takes what the library model takes and returns what it returns, ``[B, T]``:
    ``predict[t](layer(embed(x))[:, t])`` for every task t. ``embed`` maps the library's input to the
    ``[B, in_features]`` features its experts read; ``layer`` is the fused layer (towers included, so
    its output is each task's logit); ``predict`` holds the library's own prediction layers.
    """

    def __init__(self, embed: nn.Module, layer: nn.Module, predict: nn.ModuleList) -> None:
        super().__init__()
        self.embed, self.layer, self.predict = embed, layer, predict

    def forward(self, x) -> Tensor:
        logits = self.layer(self.embed(x))
        return torch.cat([predict(logits[:, t : t + 1]) for t, predict in enumerate(self.predict)], dim=1)
