"""The layers' option groups (``fused_gate/options.py``): ``ExpertOptions``, ``GateOptions`` and ``TowerOptions``
build the same layer as the keywords of the same names, and reject bad values with the same messages.

Construction only: no forward pass (the layers' numerics are ``tests/test_layers.py``'s).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fused_gate as fg
from fused_gate._validation import GATES
from fused_gate.layers import CGCLevel
from fused_gate.options import LAYER_GATES, OPTION_GROUPS

# The libraries' configurations (tests/test_layers.py's), one per gate kind, every field away from its default.
KEYWORDS = {
    "softmax": dict(gate="softmax", top_k=3, gate_hidden=[4], gate_bias=False, gate_batch_norm=True)
    | dict(activation="gelu", dropout=0.25, batch_norm=True)
    | dict(tower_hidden=(3,), tower_activation="sigmoid", tower_dropout=0.5, tower_batch_norm=False, tower_bias=False),
    "attention": dict(gate="attention", top_k=2, activation="silu", dropout=0.1, tower_hidden=()),
    "attention_input_query": dict(gate="attention_input_query", gate_bias=False, batch_norm=True, tower_hidden=2),
}
BUILD = {
    "MMoE": lambda **options: fg.MMoE(6, 4, (5, 3), 2, **options),
    "PLE": lambda **options: fg.PLE(6, 2, 1, 1, (5, 3), num_levels=2, **options),
}


def grouped(keywords: dict) -> dict:
    """The same options as the three dataclasses."""
    groups = {}
    for group, kind in OPTION_GROUPS.items():
        names = {field.name for field in dataclasses.fields(kind)}
        groups[group] = kind(**{k: v for k, v in keywords.items() if k in names})
    return groups


def assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("layer", sorted(BUILD))
@pytest.mark.parametrize("gate", LAYER_GATES)
def test_dataclasses_and_keywords_build_the_same_layer(layer, gate):
    torch.manual_seed(0)
    by_keywords = BUILD[layer](**KEYWORDS[gate])
    torch.manual_seed(0)
    by_groups = BUILD[layer](**grouped(KEYWORDS[gate]))
    assert_same_module(by_keywords, by_groups)
    # A group as a dataclass, the others as keywords.
    towers = {k: v for k, v in KEYWORDS[gate].items() if k.startswith("tower_")}
    others = {k: v for k, v in KEYWORDS[gate].items() if k not in towers}
    torch.manual_seed(0)
    assert_same_module(by_keywords, BUILD[layer](tower_options=fg.TowerOptions(**towers), **others))


def test_cgc_level_takes_both_spellings():
    keywords = {k: v for k, v in KEYWORDS["softmax"].items() if not k.startswith("tower_")}
    groups = grouped(keywords)
    del groups["tower_options"]
    torch.manual_seed(0)
    a = CGCLevel(6, 2, 1, 1, 3, shared_gate=True, **keywords)
    torch.manual_seed(0)
    assert_same_module(a, CGCLevel(6, 2, 1, 1, 3, shared_gate=True, **groups))


def test_defaults_are_the_layers_defaults():
    torch.manual_seed(0)
    a = fg.MMoE(6, 4, 3, 2)
    torch.manual_seed(0)
    assert_same_module(a, fg.MMoE(6, 4, 3, 2, **{group: kind() for group, kind in OPTION_GROUPS.items()}))
    assert fg.GateOptions().gate == "attention" and fg.TowerOptions().tower_hidden is None


def test_options_are_frozen_normalised_values():
    assert fg.ExpertOptions(dropout=0) == fg.ExpertOptions()
    assert fg.GateOptions(gate="softmax", gate_hidden=[4, 2]).gate_hidden == (4, 2)
    assert fg.TowerOptions(tower_hidden=3).tower_hidden == (3,)
    assert len({fg.GateOptions(top_k=2), fg.GateOptions(top_k=2)}) == 1  # hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        fg.GateOptions().gate = "softmax"


def test_layer_gates_include_the_ops_gates():
    assert set(GATES) <= set(LAYER_GATES)
    assert (*GATES, "attention_input_query") == LAYER_GATES


# (options, exception, message): each bad value, named, from the dataclass and from the layer's keyword.
BAD = [
    (dict(activation="softplus"), ValueError, "activation must be one of"),
    (dict(activation=None), TypeError, "activation must be a name"),
    (dict(dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
    (dict(batch_norm=1), TypeError, "batch_norm must be a bool, got int"),
    (dict(gate="linear"), ValueError, "gate must be one of"),
    (dict(top_k=0), ValueError, r"top_k must be in 1\.\.E"),
    (dict(top_k=2.0), TypeError, "top_k must be an int or None"),
    (dict(gate="softmax", gate_hidden=(2.5,)), TypeError, "gate_hidden must be"),
    (dict(gate="softmax", gate_bias="False"), TypeError, "gate_bias must be a bool"),
    (dict(gate="attention", gate_batch_norm=True), ValueError, "attention gate has none"),
    (dict(gate="attention_input_query", gate_hidden=(4,)), ValueError, "query Linear per task"),
    (dict(tower_hidden="4"), TypeError, "tower_hidden must be"),
    (dict(tower_activation="softplus"), ValueError, "tower_activation must be one of"),
    (dict(tower_dropout=-0.1), ValueError, r"tower_dropout must be a probability in \[0, 1\)"),
    (dict(tower_batch_norm="yes"), TypeError, "tower_batch_norm must be a bool"),
    (dict(tower_bias=None), TypeError, "tower_bias must be a bool"),
]


@pytest.mark.parametrize(("options", "exc", "match"), BAD, ids=[next(reversed(o)) for o, _, _ in BAD])
def test_bad_values_are_named_in_both_spellings(options, exc, match):
    (kind,) = {kind for kind in OPTION_GROUPS.values() if set(options) <= {f.name for f in dataclasses.fields(kind)}}
    with pytest.raises(exc, match=match):
        kind(**options)
    for build in BUILD.values():
        with pytest.raises(exc, match=match):
            build(**options)


MISPLACED = [
    (dict(gate_options=fg.GateOptions(top_k=5)), ValueError, r"top_k must be in 1\.\.E = 1\.\.4"),
    (dict(gate_options=fg.GateOptions(), gate="softmax"), TypeError, "gate given in gate_options and as a keyword"),
    (dict(expert_options=fg.ExpertOptions(), dropout=0.1), TypeError, "dropout given in expert_options"),
    (dict(gate_options="softmax"), TypeError, "gate_options must be a GateOptions or None, got str"),
    (dict(tower_options=fg.GateOptions()), TypeError, "tower_options must be a TowerOptions"),
    (dict(gate_dnn=(4,)), TypeError, r"MMoE.__init__\(\) got an unexpected keyword argument 'gate_dnn'"),
]


@pytest.mark.parametrize(("options", "exc", "match"), MISPLACED)
def test_layers_reject_misplaced_options(options, exc, match):
    with pytest.raises(exc, match=match):
        fg.MMoE(5, 4, 3, 2, **options)


def test_cgc_level_takes_no_tower_option():
    with pytest.raises(TypeError, match=r"CGCLevel.__init__\(\) got an unexpected keyword argument 'tower_hidden'"):
        CGCLevel(5, 2, 1, 1, 3, shared_gate=False, tower_hidden=2)
