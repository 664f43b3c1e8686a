"""fused_gate.swap_in on the real torch-rechub and DeepCTR-Torch models: same outputs, gradients and buffers.

Every comparison runs one seeded training step (dropout active, BatchNorm on batch statistics) or an
eval step on the unswapped model and on a swapped deep copy, through the Triton kernels
(interpreted without a GPU) and through the reference fallback.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import io
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import fused_gate
import fused_gate.dispatch
from fused_gate.integrations import _gates
from fused_gate.kernels import gate_mix_bwd, gate_mix_fwd
from fused_gate.op_names import SCHEMA_VERSION

from .conftest import assert_matches
from .library_models import MODELS, VERSION_CHECK_CALLS, import_offline, inputs_to, training_step

# find_spec, not an import: importing deepctr_torch outside import_offline would query PyPI.
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(library) is None for library in ("torch_rechub", "deepctr_torch")),
    reason="the integrations extra (torch-rechub, DeepCTR-Torch) is not installed",
)


class OpRecorder(TorchDispatchMode):
    """Counts every op that reaches the dispatcher by name (``fused_gate::softmax_mix_v1``, ``aten::_softmax``)
    and keeps the outputs of ``aten::_softmax`` (the gate weights of an unswapped model)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.softmax_outputs: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        self.counts[name] += 1
        if name == "aten::_softmax":
            self.softmax_outputs.append(out.detach().clone())
        return out


def build(name, device, **kwargs):
    """The original model, a swapped deep copy (with the names swap_in returned) and inputs, on ``device``."""
    model, inputs = MODELS[name][0](**kwargs)
    model.to(device)
    swapped = copy.deepcopy(model)
    names = fused_gate.swap_in(swapped)
    return model, swapped, names, inputs_to(inputs, device)


def assert_same_step(original, swapped, inputs, what=""):
    """The seeded training step gives the same output, every gradient (or None) and every buffer."""
    out, grads, buffers = training_step(original, inputs)
    out_s, grads_s, buffers_s = training_step(swapped, inputs)
    assert_matches(out_s, out, torch.float32, f"{what} output")
    assert grads_s.keys() == grads.keys() and buffers_s.keys() == buffers.keys()
    for name, grad in grads.items():
        if grad is None:
            assert grads_s[name] is None, f"{what} {name}: the original has no gradient"
        else:
            assert_matches(grads_s[name], grad, torch.float32, f"{what} grad {name}")
    for name, buffer in buffers.items():
        assert_matches(buffers_s[name], buffer, torch.float32, f"{what} buffer {name}")


@pytest.fixture(params=["kernels", "reference"])
def gate_path(request, monkeypatch):
    """Route softmax_mix to the Triton kernels or to the reference; yields the kernel launch counts."""
    if request.param == "reference":
        monkeypatch.setattr(fused_gate.dispatch, "uses_kernels", lambda x: False)
    launches = {"forward": 0, "backward": 0}

    def counted(kind, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            launches[kind] += 1
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(gate_mix_fwd, "plan_forward", counted("forward", gate_mix_fwd.plan_forward))
    monkeypatch.setattr(gate_mix_bwd, "plan_backward", counted("backward", gate_mix_bwd.plan_backward))
    return request.param, launches


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_swapped_step_matches_original(name, train, gate_path, device):
    path, launches = gate_path
    model, swapped, names, inputs = build(name, device)
    model.train(train)
    swapped.train(train)
    integration, levels = MODELS[name][1], MODELS[name][2]
    assert names and all(type(swapped.get_submodule(n)).__module__ == integration for n in names)
    assert swapped.state_dict().keys() == model.state_dict().keys()

    recorded = OpRecorder()
    with recorded:
        training_step(copy.deepcopy(model), inputs)
    for p in recorded.softmax_outputs:  # the original's gates are far from uniform: the top expert's weight
        assert p.max(dim=1).values.mean() >= 1 / p.shape[1] + 0.2, "gate weights too close to uniform to test"

    fused = OpRecorder()
    with fused:
        training_step(copy.deepcopy(swapped), inputs)
    assert fused.counts[f"fused_gate::softmax_mix_v{SCHEMA_VERSION}"] == levels, fused.counts
    assert fused.counts[f"fused_gate::softmax_mix_backward_v{SCHEMA_VERSION}"] == levels
    assert fused.counts["aten::_softmax"] == 0
    assert launches == ({"forward": levels, "backward": levels} if path == "kernels" else {"forward": 0, "backward": 0})

    assert_same_step(model, swapped, inputs, f"{name} {path}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrong_temperature_is_detected(name, monkeypatch, device):
    """The comparison above catches a mix that is off by a temperature of 1.001."""
    model, swapped, _, inputs = build(name, device)
    monkeypatch.setattr(_gates, "softmax_mix", functools.partial(fused_gate.softmax_mix, temperature=1.001))
    with pytest.raises(AssertionError):
        assert_same_step(model, swapped, inputs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_fullgraph(name, device):
    """The swapped model compiles into one graph and trains like the compiled original.

    Compared with the compiled original, not the eager one: DeepCTR-Torch's PLE computes a shared gate
    on its last level and discards it, and compilation drops that gate's dropout, which shifts the
    random stream of the later dropouts (the compiled original differs from the eager one the same way).
    """
    small = dict(num_tasks=2, hidden=(8,), **({"per_task": 1} if name.endswith("ple") else {"num_experts": 3}))
    model, swapped, _, inputs = build(name, device, **small)
    torch._dynamo.reset()
    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_swapped = torch.compile(swapped, backend=counter, fullgraph=True)
    assert_same_step(compiled_model, compiled_swapped, inputs, f"{name} compiled")
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deepcopy_and_checkpoints(name, device):
    model, swapped, _, inputs = build(name, device)
    model.eval()
    swapped.eval()
    want = model(inputs)

    copied = copy.deepcopy(swapped)
    assert type(copied) is type(swapped)
    assert_matches(copied(inputs), want, torch.float32, "deepcopy")

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # the original's checkpoint into a fresh swapped model
    buf.seek(0)
    fresh, _, _, _ = build(name, device, seed=1)
    fused_gate.swap_in(fresh)
    fresh.load_state_dict(torch.load(buf), strict=True)
    fresh.eval()
    assert_matches(fresh(inputs), want, torch.float32, "original checkpoint into swapped")

    buf = io.BytesIO()
    torch.save(swapped, buf)  # the whole swapped module: its class pickles by reference
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(swapped)
    assert_matches(loaded(inputs), want, torch.float32, "whole module save/load")


def test_gate_layouts_follow_the_module_device():
    """The masks live outside the state_dict and move with .to() and to_empty(), meta included."""
    _, swapped, names, _ = build("rechub_ple", "cpu")
    level = swapped.get_submodule(names[0])
    swapped.to("meta")
    assert level.gate_layouts["gates"].mask.device.type == "meta"
    swapped.to_empty(device="cpu")
    layout = level.gate_layouts["gates"]
    assert layout.mask.device.type == "cpu" and layout.index.device.type == "cpu"
    assert layout.mask.sum().item() == sum(len(g) for g in layout.gate_experts)


def test_a_masked_layout_refuses_stacked_logits():
    """Stacked ``[B, G, E]`` logits are for a layout without a mask; a CGC layout needs each gate's own columns."""
    layout = _gates.cgc_layout(2, 1, 1, shared_gate=True)
    with pytest.raises(ValueError, match="gate_logits: a layout with a mask"):
        layout.mix(torch.zeros(4, 3, 3), torch.zeros(4, 3, 2))


def test_submodules_of_a_bigger_model_from_both_libraries(device):
    rechub, _, _, rechub_inputs = build("rechub_ple", device)
    deepctr, _, _, deepctr_inputs = build("deepctr_mmoe", device)
    both = nn.ModuleDict({"ranker": copy.deepcopy(rechub), "scorer": copy.deepcopy(deepctr)})
    assert fused_gate.swap_in(both) == ["ranker.cgc_layers.0", "ranker.cgc_layers.1", "scorer"]
    assert_same_step(rechub, both["ranker"], rechub_inputs, "ranker")
    assert_same_step(deepctr, both["scorer"], deepctr_inputs, "scorer")


UNSUPPORTED = {
    "gate dropout": ("rechub_mmoe", lambda m: setattr(m.gates[1].mlp[-1], "p", 0.1), "gates.1", "Dropout(p=0.1)"),
    "softmax dim": ("rechub_mmoe", lambda m: setattr(m.gates[0].mlp[-2], "dim", 0), "gates.0", "dim 0"),
    "too many gates": ("deepctr_mmoe", None, "the model itself", "17 gates"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_configuration_warns_and_stays_unchanged(case, device):
    name, change, where, why = UNSUPPORTED[case]
    model, _ = MODELS[name][0](num_tasks=17) if change is None else MODELS[name][0]()
    if change is not None:
        change(model)
    original_class, original = type(model), copy.deepcopy(model)
    with pytest.warns(UserWarning) as caught:
        assert fused_gate.swap_in(model) == []
    messages = [str(w.message) for w in caught]
    assert any(where in m and why in m and "left unchanged" in m for m in messages), messages
    assert any("nothing swapped" in m for m in messages), messages
    assert type(model) is original_class
    assert all(type(a) is type(b) for a, b in zip(model.modules(), original.modules(), strict=True))


def test_one_unsupported_level_leaves_the_others_swapped(device):
    model, inputs = MODELS["rechub_ple"][0]()
    model.cgc_layers[1].gates_specific[0].mlp[-1].p = 0.5
    model.to(device)
    model.eval()  # the gate dropout is inactive in eval, so the partly swapped model must still match
    swapped = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"CGC at 'cgc_layers\.1' left unchanged: gates_specific\.0 applies Dropout"):
        assert fused_gate.swap_in(swapped) == ["cgc_layers.0"]
    assert_same_step(model, swapped, inputs_to(inputs, device), "partly swapped")


def test_nothing_to_swap_returns_empty_and_warns():
    with pytest.warns(UserWarning, match="nothing swapped"):
        assert fused_gate.swap_in(nn.Sequential(nn.Linear(3, 3))) == []
    deepctr, _ = MODELS["deepctr_mmoe"][0]()
    from fused_gate.integrations import torch_rechub

    with pytest.warns(UserWarning, match="no supported torch-rechub"):
        assert torch_rechub.swap_in(deepctr) == []
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        fused_gate.swap_in("model")


@pytest.mark.parametrize("name", ["deepctr_ple", "rechub_ple"])
def test_swap_in_twice_says_the_layers_are_already_swapped(name):
    _, swapped, names, _ = build(name, "cpu")
    where = ", ".join(f"'{n}'" if n else "the model itself" for n in names)
    with pytest.warns(UserWarning, match=f"nothing swapped, the layers it supports are already swapped: {where}$"):
        assert fused_gate.swap_in(swapped) == []


def _subclass(name: str, base: type, **methods) -> type:
    """A user's subclass of a library class, reachable by pickle as ``tests.test_swap_in.<name>``."""
    cls = type(name, (base,), {"__module__": __name__, "__qualname__": name, **methods})
    globals()[name] = cls
    return cls


def _library_class(name: str) -> type:
    model, _ = MODELS[name][0]()
    return type(model)


def _as_subclass(name: str, subclass_of, **methods):
    """A builder's model, its class replaced by a subclass (named after the test) of the library class."""
    model, inputs = MODELS[name][0]()
    model.__class__ = subclass_of(type(model), **methods)
    return model, inputs


def _keeps_forward(base: type) -> type:
    return _subclass(f"Scored{base.__name__}", base, score=lambda self, x: self(x).sum(dim=1))


def _overrides(base: type, method: str) -> type:
    original = getattr(base, method)
    return _subclass(f"Tweaked{base.__name__}", base, **{method: lambda self, *args: original(self, *args) * 0.5})


@pytest.mark.parametrize("name", ["rechub_mmoe", "deepctr_mmoe", "deepctr_ple"])
def test_a_subclass_that_keeps_the_forward_is_swapped_and_keeps_its_methods(name, device):
    model, inputs = _as_subclass(name, _keeps_forward)
    model.to(device).eval()
    inputs = inputs_to(inputs, device)
    swapped = copy.deepcopy(model)
    assert fused_gate.swap_in(swapped) == [""]
    assert isinstance(swapped, type(model)) and type(swapped).__name__ == f"Fused{type(model).__name__}"
    assert_matches(swapped.score(inputs), model.score(inputs), torch.float32, "the subclass's own method")
    buf = io.BytesIO()
    torch.save(swapped, buf)  # the subclass's twin pickles as (library twin, subclass)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(swapped)
    assert_matches(loaded(inputs), model(inputs), torch.float32, "saved and loaded")
    to_fused = importlib.import_module(MODELS[name][1]).to_fused
    assert_matches(to_fused(model).eval()(inputs), model(inputs), torch.float32, "to_fused of the subclass")


OVERRIDES = {"rechub_mmoe": "forward", "deepctr_mmoe": "forward", "deepctr_ple": "cgc_net"}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_a_subclass_that_overrides_the_forward_is_refused_by_both(name):
    method = OVERRIDES[name]
    model, _ = _as_subclass(name, functools.partial(_overrides, method=method))
    cls, library = type(model), "torch-rechub" if name.startswith("rechub") else "DeepCTR-Torch"
    why = f"{cls.__name__} is a subclass of {library} {cls.__mro__[1].__name__} that overrides {method}"
    with pytest.warns(UserWarning) as caught:
        assert fused_gate.swap_in(model) == []
    messages = [str(w.message) for w in caught]
    assert any(f"at the model itself left unchanged: {why}" in m for m in messages), messages
    assert any("nothing swapped, every MMoE / PLE layer" in m for m in messages), messages
    assert type(model) is cls
    with pytest.raises(TypeError, match=f"cannot convert model: {why}"):
        importlib.import_module(MODELS[name][1]).to_fused(model)


@pytest.mark.parametrize("name", ["rechub_mmoe", "rechub_ple"])
def test_hooks_on_the_gates_fire_as_in_the_original(name, gate_path, device):
    """torch-rechub twins: a hook on a gate MLP, or one on its Softmax that changes the weights, fires and acts as
    in the original (the twin runs the library's forward while such hooks are registered)."""
    model, swapped, _, inputs = build(name, device)
    results = []
    for m in (model, swapped):
        m.eval()
        gates = [g for n, g in m.named_modules() if "gate" in n and type(g).__name__ == "MLP"]
        calls = Counter()
        handles = [g.register_forward_hook(lambda *args, calls=calls: calls.update(["mlp"])) for g in gates]
        handles += [g.mlp[-2].register_forward_hook(lambda mod, args, out: out.flip(1)) for g in gates]
        with torch.no_grad():
            out = m(inputs)
        results.append((out, calls["mlp"]))
        for handle in handles:
            handle.remove()
        assert calls["mlp"] == len(gates) > 0
    (out, calls), (out_s, calls_s) = results
    assert calls_s == calls
    assert_matches(out_s, out, torch.float32, f"{name} with hooks")
    with torch.no_grad():  # hooks removed: the fused mix again
        recorded = OpRecorder()
        with recorded:
            swapped(inputs)
    assert recorded.counts[f"fused_gate::softmax_mix_v{SCHEMA_VERSION}"] == MODELS[name][2]


@pytest.mark.parametrize("case", ["one matmul", "hooked", "gate DNN"])
def test_deepctr_mmoe_gate_logits(case, device):
    """The DeepCTR-Torch MMOE twin computes its gates' logits in one matmul, the same values as the T Linears;
    a hook on one of those Linears (here one that changes its output), or a gate DNN, makes it call them."""
    model, swapped, _, inputs = build("deepctr_mmoe", device, gate_hidden=(5,) if case == "gate DNN" else ())
    calls = Counter()
    for m in (model, swapped):
        if case == "hooked":
            m.gate_dnn_final_layer[1].register_forward_hook(
                lambda mod, args, out, m=m: calls.update([id(m)]) or 2 * out
            )
    assert_same_step(model, swapped, inputs, case)
    assert calls[id(model)] == calls[id(swapped)] == (case == "hooked")
    dnn_input = torch.randn(4, model.input_dim, device=device)
    logits = swapped._gate_logits(dnn_input)
    if case == "one matmul":
        assert torch.equal(logits, torch.stack([f(dnn_input) for f in model.gate_dnn_final_layer], 1))
    else:
        assert isinstance(logits, list) and len(logits) == model.num_tasks


@pytest.mark.parametrize("name", ["deepctr_mmoe", "deepctr_ple", "rechub_mmoe"])
def test_swapped_model_runs_in_float64(name, gate_path, device):
    """``model.double()`` works swapped as it does unswapped: float64 runs the reference, on every device."""
    model, swapped, _, inputs = build(name, device)
    model.double().eval()
    swapped.double().eval()
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.double()
    with torch.no_grad():
        out, out_s = model(inputs), swapped(inputs)
    assert out_s.dtype == torch.float64
    torch.testing.assert_close(out_s, out)


def test_swap_warns_about_a_model_the_library_cannot_run():
    """DeepCTR-Torch's PLE builds specific_expert_num shared experts: with more shared ones it cannot run."""
    model, inputs = MODELS["deepctr_ple"][0](per_task=1, shared=2)
    with pytest.warns(UserWarning, match=r"PLE at the model itself swapped, but the library cannot run it: "):
        assert fused_gate.swap_in(model) == [""]
    with pytest.raises(IndexError):
        model(inputs)


def test_import_fused_gate_imports_neither_library():
    code = (
        "import sys, fused_gate; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch_rechub', 'deepctr_torch')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_deepctr_version_check_stays_offline():
    """DeepCTR-Torch's import-time PyPI query reached only the in-process stub of import_offline."""
    import_offline("deepctr_torch")
    assert VERSION_CHECK_CALLS == ["https://pypi.python.org/pypi/deepctr-torch/json"]


def test_step_timing_script_runs(capsys):
    """bench.swap_in_step, tiny: one table row per model, batch size and mode, times and a ratio each."""
    from bench import swap_in_step

    argv = ["--batch", "8,16", "--hidden", "8", "--rounds", "2", "--round-ms", "1", "--warmup", "0"]
    swap_in_step.main(argv)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    cells = [[cell.strip() for cell in row.strip("| ").split(" | ")] for row in rows]
    assert [(c[0], c[1], c[2]) for c in cells] == [
        (name, batch, mode) for name in MODELS for batch in ("8", "16") for mode in ("train", "infer")
    ]
    assert all(float(c[3]) > 0 and float(c[4]) > 0 and float(c[5].split()[0]) > 0 for c in cells)
