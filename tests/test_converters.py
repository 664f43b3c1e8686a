"""``to_fused`` on the real torch-rechub and DeepCTR-Torch models: same outputs, gradients and buffers.

Each comparison runs one seeded training step (BatchNorm on batch statistics, dropout 0: the batched
experts draw their dropout masks in another order than the library's per-expert loop) or an eval step
(with the builders' dropout 0.25, inactive), on the library model and on its conversion. Gradients of
the converted layer are compared through the converter itself: converting a copy of the library model
whose parameters hold its gradients puts each gradient where the converted layer's gradient must be
(zero where a CGC gate's logit of an expert it may not read lives).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import io

import pytest
import torch
from torch import nn

import fused_gate.dispatch
from fused_gate.integrations._convert import FusedMultiTask

from .conftest import assert_matches
from .library_models import MODELS, import_offline, training_step

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(library) is None for library in ("torch_rechub", "deepctr_torch")),
    reason="the integrations extra (torch-rechub, DeepCTR-Torch) is not installed",
)


def converter(name: str):
    return importlib.import_module(MODELS[name][1]).to_fused


def deepctr_library_default(class_name: str):
    """A DeepCTR-Torch model with the library's default sizes (experts (256, 128), gate DNN (64,), towers (64,))."""
    import_offline("deepctr_torch")
    from deepctr_torch.models import multitask

    from .library_models import _deepctr_features, _deepctr_inputs

    model = getattr(multitask, class_name)(_deepctr_features(), seed=0)
    return model, _deepctr_inputs(16, 0)


# case -> (builder name, builder options); "library_default" cases use the library's own defaults.
CASES = {
    "rechub_mmoe_deep": ("rechub_mmoe", dict(hidden=(16, 8))),
    "rechub_mmoe_one_layer": ("rechub_mmoe", dict(hidden=(8,))),
    "rechub_ple_deep": ("rechub_ple", dict(hidden=(16, 8))),
    "rechub_ple_one_layer": ("rechub_ple", dict(hidden=(8,), per_task=1, shared=2)),
    "deepctr_mmoe_deep_gate_dnn": ("deepctr_mmoe", dict(hidden=(16, 8), gate_hidden=(8,))),
    "deepctr_mmoe_one_layer": ("deepctr_mmoe", dict(hidden=(8,))),
    "deepctr_ple_deep": ("deepctr_ple", dict(hidden=(16, 8))),
    "deepctr_ple_one_layer": ("deepctr_ple", dict(hidden=(8,), per_task=1, shared=1)),
    "deepctr_mmoe_library_default": ("deepctr_mmoe", None),
    "deepctr_ple_library_default": ("deepctr_ple", None),
}


def build(case: str, seed: int = 0):
    name, options = CASES[case]
    if options is None:
        model, inputs = deepctr_library_default(name.split("_")[1].upper())
    else:
        model, inputs = MODELS[name][0](**options, seed=seed)
    return model, inputs, converter(name)


def _without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _gradients_as_parameters(model: nn.Module, grads: dict) -> nn.Module:
    """A copy of ``model`` whose parameters hold ``grads`` (zero where None)."""
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(grads[name] if grads[name] is not None else torch.zeros_like(p))
    return holder


@pytest.fixture(params=["kernels", "reference"])
def gate_path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
    return request.param


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_step_matches_original(case, train, gate_path):
    model, inputs, to_fused = build(case)
    if train:
        _without_dropout(model)
    converted = to_fused(model)
    assert isinstance(converted, FusedMultiTask)
    model.train(train)
    converted.train(train)
    before = copy.deepcopy(model)

    out, grads, _ = training_step(model, inputs)
    out_c, grads_c, buffers_c = training_step(converted, inputs)
    assert_matches(out_c, out, torch.float32, "output")

    # the embeddings and prediction layers are copies of the library's: the same names below embed / predict
    prefix = {"embedding": "embed.embedding", "embedding_dict": "embed.embedding_dict", "predict_layers": "predict"}
    prefix["out"] = "predict"
    for name, grad in grads.items():
        head, _, rest = name.partition(".")
        if head in prefix:
            assert_matches(grads_c[f"{prefix[head]}.{rest}"], grad, torch.float32, f"grad {name}")

    expected_grads = to_fused(_gradients_as_parameters(before, grads)).layer
    for name, want in expected_grads.named_parameters():
        assert_matches(grads_c[f"layer.{name}"], want, torch.float32, f"grad layer.{name}")
    expected_buffers = to_fused(model).layer  # the library's BatchNorm statistics after its step
    for name, want in expected_buffers.named_buffers():
        if want.is_floating_point():
            assert_matches(buffers_c[f"layer.{name}"], want, torch.float32, f"buffer layer.{name}")
        else:  # masks, expert groups, BatchNorm step counters
            assert torch.equal(buffers_c[f"layer.{name}"], want), name


@pytest.mark.parametrize(
    "case", ["rechub_mmoe_deep", "rechub_ple_deep", "deepctr_mmoe_deep_gate_dnn", "deepctr_ple_deep"]
)
def test_state_dict_round_trip(case):
    model, inputs, to_fused = build(case)
    converted = to_fused(model).eval()
    want = converted(inputs)
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    fresh = to_fused(build(case, seed=1)[0]).eval()
    assert not torch.equal(fresh(inputs), want)
    fresh.load_state_dict(torch.load(buffer), strict=True)
    assert_matches(fresh(inputs), want, torch.float32, "state_dict round trip")
    buffer = io.BytesIO()
    torch.save(converted, buffer)  # the whole module, its input layer's feature list included
    buffer.seek(0)
    assert_matches(torch.load(buffer, weights_only=False)(inputs), want, torch.float32, "whole module")


def test_converted_layer_is_the_fused_layer_with_towers():
    import fused_gate as fg

    model, inputs, to_fused = build("rechub_ple_deep")
    converted = to_fused(model)
    assert isinstance(converted.layer, fg.PLE) and len(converted.layer.levels) == 2
    assert converted.layer.levels[0].experts.layers[-1].weight.shape == (7, 16, 8)  # 1 shared + 3 tasks x 2
    assert converted.layer(converted.embed(inputs)).shape == (16, 3)


def _rechub(**changes):
    models = import_offline("torch_rechub.models.multi_task")
    from .library_models import _rechub_features

    params = dict(expert_params={"dims": [8]}, tower_params_list=[{"dims": [4]}] * 2) | changes
    return models.MMOE(_rechub_features(), ["classification", "regression"], n_expert=3, **params)


def _deepctr(class_name, **changes):
    import_offline("deepctr_torch")
    from deepctr_torch.models import multitask

    from .library_models import _deepctr_features

    return getattr(multitask, class_name)(_deepctr_features(), **changes)


UNCONVERTIBLE = {
    "rechub prelu experts": (
        "torch_rechub",
        lambda: _rechub(expert_params={"dims": [8], "activation": "prelu"}),
        r"experts\.0\.mlp\.2: activation PReLU",
    ),
    "rechub towers differ": (
        "torch_rechub",
        lambda: _rechub(tower_params_list=[{"dims": [4]}, {"dims": [5]}]),
        r"towers\.1 differs from towers\.0",
    ),
    "rechub gate dropout": (
        "torch_rechub",
        lambda: _set(_rechub(), "gates.1.mlp.3", "p", 0.1),
        r"gates\.1 applies Dropout\(p=0\.1\)",
    ),
    "deepctr dice": (
        "deepctr_torch",
        lambda: _deepctr("MMOE", dnn_activation="dice"),
        r"expert_dnn\.0\.activation_layers\.0: activation Dice",
    ),
    "deepctr prelu": (
        "deepctr_torch",
        lambda: _deepctr("PLE", dnn_activation="prelu"),
        r"shared_experts\.0\.0\.0\.activation_layers\.0: activation PReLU",
    ),
    "deepctr missing shared experts": (
        "deepctr_torch",
        lambda: _deepctr("PLE", shared_expert_num=2, specific_expert_num=1),
        r"shared_experts\.0\.0 holds 1 experts, fewer than shared_expert_num = 2",
    ),
}


def _set(model, module_name, attribute, value):
    setattr(model.get_submodule(module_name), attribute, value)
    return model


@pytest.mark.parametrize("case", sorted(UNCONVERTIBLE))
def test_unconvertible_configuration_names_the_part(case):
    library, make, message = UNCONVERTIBLE[case]
    to_fused = importlib.import_module(f"fused_gate.integrations.{library}").to_fused
    with pytest.raises(ValueError, match=message):
        to_fused(make())


def test_rejects_other_models():
    for library in ("torch_rechub", "deepctr_torch"):
        to_fused = importlib.import_module(f"fused_gate.integrations.{library}").to_fused
        with pytest.raises(TypeError, match="model must be a"):
            to_fused(nn.Linear(3, 3))


def test_step_timing_script_runs(capsys):
    """bench.convert_step, tiny: one table row per model, batch size and mode, times and a ratio each."""
    from bench import convert_step

    argv = ["--batch", "8", "--hidden", "8,4", "--rounds", "2", "--round-ms", "1", "--warmup", "0"]
    convert_step.main(argv)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    cells = [[cell.strip() for cell in row.strip("| ").split(" | ")] for row in rows]
    assert [(c[0], c[2]) for c in cells] == [(name, mode) for name in MODELS for mode in ("train", "infer")]
    assert all(float(c[3]) > 0 and float(c[4]) > 0 and float(c[5].split()[0]) > 0 for c in cells)
