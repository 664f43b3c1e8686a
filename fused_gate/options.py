"""The options of the layers' experts, gate and towers, defined and validated once for ``MMoE``, ``CGCLevel``
and ``PLE``: :class:`ExpertOptions`, :class:`GateOptions` and :class:`TowerOptions`.

A layer takes each group either as one frozen dataclass (``expert_options=``, ``gate_options=``,
``tower_options=``) or as keywords named like its fields, ``MMoE(..., gate="softmax", dropout=0.1)``;
both spellings build the same module. :func:`layer_options` turns a layer's keywords into the groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from fused_gate._validation import validate_activation, validate_dropout, validate_flag, validate_top_k, validate_widths

LOGIT_OPTIONS = ("gate_hidden", "gate_bias", "gate_batch_norm")
# Each layer gate kind: the options of LOGIT_OPTIONS it takes, and why it rejects the others.
_GATE_KINDS = {
    "softmax": (LOGIT_OPTIONS, ""),
    "attention": ((), "the attention gate has none, use gate='softmax'"),
    "attention_input_query": (
        ("gate_bias",),
        "gate='attention_input_query' has a query Linear per task (gate_bias is its bias)",
    ),
}
LAYER_GATES = tuple(_GATE_KINDS)
"""The layers' gate kinds: the ops' two (``GATES``), and the attention gate whose per-task queries are computed
from the input (:class:`~fused_gate.gates.InputQueryAttentionMix`)."""


def _set(options: object, name: str, value: object) -> None:
    """Store a validated (normalised) field of a frozen dataclass."""
    object.__setattr__(options, name, value)


@dataclass(frozen=True)
class ExpertOptions:
    """The options of every expert's hidden layers (``Linear -> BatchNorm -> activation -> dropout``), which
    the softmax gate's DNN shares and the towers take unless :class:`TowerOptions` overrides them.

    Args:
        activation: the activation of every hidden layer: one of ``fused_gate.activations.ACTIVATIONS``.
        dropout: dropout probability after every hidden layer's activation, in ``[0, 1)``.
        batch_norm: a BatchNorm after every hidden layer's Linear, one per expert / gate / tower.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range, named in the message.
    """

    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        validate_activation(self.activation)
        _set(self, "dropout", validate_dropout(self.dropout))
        validate_flag("batch_norm", self.batch_norm)


@dataclass(frozen=True)
class GateOptions:
    """The options of a layer's gate (of every level's gates in PLE).

    Args:
        gate: the gate kind, one of ``LAYER_GATES``: ``"attention"`` (one learned query vector per task over
            the expert outputs: :class:`~fused_gate.AttentionMix`), ``"softmax"`` (``softmax(W_t x)``, the
            paper's gate: :class:`~fused_gate.SoftmaxGate`) or ``"attention_input_query"`` (attention over the
            expert outputs with each task's query computed from the input, ``x W_t + b_t``:
            :class:`~fused_gate.InputQueryAttentionMix`).
        top_k: sparse gate, keep the ``top_k`` best (allowed) experts per row and gate (default: all E);
            the layer checks it against its E.
        gate_hidden: the softmax gate's DNN widths before its final Linear (default: none).
        gate_bias: whether the softmax gate's final Linear (or ``"attention_input_query"``'s query Linear)
            has a bias.
        gate_batch_norm: a BatchNorm on the softmax gate's logits, before the softmax.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range, named in the message; a
            ``gate_*`` option that the gate kind does not take and that differs from its default.
    """

    gate: str = "attention"
    top_k: int | None = None
    gate_hidden: Sequence[int] = ()
    gate_bias: bool = True
    gate_batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.gate not in LAYER_GATES:
            raise ValueError(f"gate must be one of {LAYER_GATES}, got {self.gate!r}")
        _set(self, "top_k", validate_top_k(self.top_k))
        _set(self, "gate_hidden", validate_widths("gate_hidden", self.gate_hidden, allow_empty=True))
        validate_flag("gate_bias", self.gate_bias)
        validate_flag("gate_batch_norm", self.gate_batch_norm)
        takes, why = _GATE_KINDS[self.gate]
        rejected = [name for name in LOGIT_OPTIONS if name not in takes]
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        if any(getattr(self, name) != defaults[name] for name in rejected):
            names = ", ".join(rejected[:-1]) + " and " + rejected[-1] if len(rejected) > 1 else rejected[0]
            raise ValueError(f"{names} configure the softmax gate's logits; {why}")


@dataclass(frozen=True)
class TowerOptions:
    """The options of the layer's towers: one MLP per task on its mixed features, giving ``[B, T]``.

    Args:
        tower_hidden: add one MLP tower per task, ``D -> tower_hidden... -> 1`` (an int for one hidden
            layer, ``()`` for a single Linear); ``None`` (the default): no towers, the layer returns
            ``[B, T, D]``.
        tower_activation, tower_dropout, tower_batch_norm: the towers' hidden layers' options (``None``, the
            default: the experts', :class:`ExpertOptions`).
        tower_bias: whether the towers' output Linear has a bias.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range, named in the message.
    """

    tower_hidden: int | Sequence[int] | None = None
    tower_activation: str | None = None
    tower_dropout: float | None = None
    tower_batch_norm: bool | None = None
    tower_bias: bool = True

    def __post_init__(self) -> None:
        if self.tower_hidden is not None:
            _set(self, "tower_hidden", validate_widths("tower_hidden", self.tower_hidden, allow_empty=True))
        if self.tower_activation is not None:
            validate_activation(self.tower_activation, "tower_activation")
        if self.tower_dropout is not None:
            _set(self, "tower_dropout", validate_dropout(self.tower_dropout, "tower_dropout"))
        if self.tower_batch_norm is not None:
            validate_flag("tower_batch_norm", self.tower_batch_norm)
        validate_flag("tower_bias", self.tower_bias)


OPTION_GROUPS = {"expert_options": ExpertOptions, "gate_options": GateOptions, "tower_options": TowerOptions}


def layer_options(layer: str, keywords: dict[str, object], **groups: object) -> list:
    """The option groups a layer takes (``groups``: some of ``OPTION_GROUPS`` by name, each a dataclass or None),
    in the order given; a group given as None is built from the keywords named like its fields.

    Raises:
        TypeError: a group that is not its dataclass, an option given both in its group and as a keyword, or
            a keyword that is no field of the layer's groups (as Python words an unexpected keyword).
    """
    keywords = dict(keywords)
    found = []
    for group, value in groups.items():
        kind = OPTION_GROUPS[group]
        given = [field.name for field in dataclasses.fields(kind) if field.name in keywords]
        if value is None:
            found.append(kind(**{name: keywords.pop(name) for name in given}))
            continue
        if not isinstance(value, kind):
            raise TypeError(f"{group} must be a {kind.__name__} or None, got {type(value).__name__}")
        if given:
            raise TypeError(f"{layer}: {', '.join(given)} given in {group} and as a keyword; give each option once")
        found.append(value)
    if keywords:
        raise TypeError(f"{layer}.__init__() got an unexpected keyword argument {next(iter(keywords))!r}")
    return found
