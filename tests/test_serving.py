"""Exported and AOTInductor-compiled models run where fused_gate is not installed.

Every served model (``served_models``: MMoE and PLE with every gate kind, in training and eval mode, the
eval ones exported under ``torch.no_grad()`` so that they take the one-kernel ``experts_mix`` path where
the kernels run; the swapped torch-rechub and DeepCTR-Torch models; the ops on special values) is one
entry of a :class:`Served` module, exported once with a dynamic batch size. On a CPU the exported graph
holds ATen ops only. The program is saved (``torch.export.save``) and a few of its models (``PACKAGED``:
every gate kind, training and eval, the one-kernel path, a swapped model, the special values) are
compiled into one AOTInductor package, the only C++ compilation of the file (about 45 s with Inductor's
caches off on 2 cores at a load of 5 to 7; the whole file takes about 185 s at a load of 7.5). The same few models
are exported as on CUDA (``export_keeping_ops``: the program keeps the fused ops), retraced within
``fused_gate.export_as_reference`` and saved. ``tests/serving_child.py`` loads the package and both
programs in a Python that cannot import fused_gate and runs them at two batch sizes; every output equals
eager mode's.

On a GPU, ``test_gpu_package_runs_without_fused_gate`` builds the same package from CUDA models: the
exported program keeps the fused ops (one node each, the kernels' path), AOTInductor compiles their
Triton kernels into the package, and the child runs it and the program retraced as the reference.
"""

from __future__ import annotations

import importlib.util
import json
import operator
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import fused_gate as fg
import fused_gate.dispatch
from fused_gate.layers import LAYER_GATES

from .conftest import assert_matches
from .library_models import MODELS

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (6, 9)  # exported at the first; the package and the program run at both
PACKAGED = (
    "mmoe_attention_eval",
    "mmoe_softmax_train",
    "ple_attention_input_query_eval",
    "rechub_mmoe_eval",
    "special_values",
)
# The swapped library models and their mode; their dropout is turned off so that training mode is deterministic.
# find_spec, not an import: importing deepctr_torch outside library_models.import_offline would query PyPI.
LIBRARIES = all(importlib.util.find_spec(library) for library in ("torch_rechub", "deepctr_torch"))
SWAPPED = {"rechub_mmoe": False, "rechub_ple": True, "deepctr_mmoe": True, "deepctr_ple": False} if LIBRARIES else {}


class Served(nn.Module):
    """Several models in one module, so that one export (and one package) holds them all:
    ``forward({name: args})`` returns ``{name: models[name](*args)}``."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)

    def forward(self, inputs: dict[str, tuple]) -> dict[str, Tensor | tuple[Tensor, ...]]:
        return {name: model(*inputs[name]) for name, model in self.models.items()}


class SpecialValues(nn.Module):
    """Both gates on the inputs of :func:`special_inputs`: the attention gate with a per-row mask, the
    softmax gate with the mask, top-k and the weights returned."""

    def __init__(self) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.randn(2, 8, generator=torch.Generator().manual_seed(3)))

    def forward(self, h: Tensor, logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = fg.attention_mix(h, self.context, mask=mask)
        return y, *fg.softmax_mix(logits, h, mask=mask, top_k=2, return_weights=True)


def special_inputs(batch: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """``h [B, 4, 8]`` with a NaN (row 0) and an inf (row 1) expert output, logits ``[B, 2, 4]`` all -inf for
    row 2's first task and -inf for one expert of row 3, a mask that excludes every expert of row 4's second
    task and two of row 5's first."""
    gen = torch.Generator().manual_seed(batch)
    h, logits = torch.randn(batch, 4, 8, generator=gen), torch.randn(batch, 2, 4, generator=gen)
    h[0, 1, 2], h[1, 2, 0] = float("nan"), float("inf")
    logits[2, 0, :], logits[3, 1, 1] = float("-inf"), float("-inf")
    mask = torch.ones(batch, 2, 4, dtype=torch.bool)
    mask[4, 1], mask[5, 0, :2] = False, False
    return h.to(device), logits.to(device), mask.to(device)


def _without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _layer(kind: str, gate: str, train: bool) -> nn.Module:
    """Training mode with BatchNorm in every hidden layer (batch statistics); eval mode with top-k (MMoE's
    softmax gate) or a gate DNN (PLE's)."""
    options = {"batch_norm": True} if train else {}
    if kind == "mmoe":
        if gate == "softmax" and not train:
            options["top_k"] = 2
        return fg.MMoE(10, 4, 8, 2, gate=gate, tower_hidden=4, **options).train(train)
    if gate == "softmax" and not train:
        options["gate_hidden"] = (4,)
    return fg.PLE(10, 2, 2, 1, 8, num_levels=2, gate=gate, **options).train(train)


def served_models(device: str) -> dict[str, nn.Module]:
    """MMoE and PLE with every gate kind in training and eval mode, the swapped library models (``SWAPPED``, where
    the integrations extra is installed) and :class:`SpecialValues`, on ``device``."""
    torch.manual_seed(0)
    models = {}
    for kind in ("mmoe", "ple"):
        for gate in LAYER_GATES:
            for train in (False, True):
                models[f"{kind}_{gate}_{'train' if train else 'eval'}"] = _layer(kind, gate, train)
    for name, train in SWAPPED.items():
        model = MODELS[name][0]()[0]
        fg.swap_in(model)
        models[f"{name}_{'train' if train else 'eval'}"] = _without_dropout(model).train(train)
    models["special_values"] = SpecialValues()
    return {name: model.to(device) for name, model in models.items()}


def served_inputs(names: list[str], batch: int, device: str) -> dict[str, tuple]:
    """Each model's arguments for a batch of ``batch`` rows."""
    x = torch.randn(batch, 10, generator=torch.Generator().manual_seed(batch)).to(device)
    inputs = {}
    for name in names:
        library = name.rpartition("_")[0]
        if library in SWAPPED:
            library_inputs = MODELS[library][0](batch=batch)[1]
            inputs[name] = (library_inputs.to(device) if isinstance(library_inputs, Tensor) else
                            {k: v.to(device) for k, v in library_inputs.items()},)  # fmt: skip
        elif name == "special_values":
            inputs[name] = special_inputs(batch, device)
        else:
            inputs[name] = (x,)
    return inputs


def _batch_dims(inputs, batch: torch.export.Dim):
    """``dynamic_shapes`` for ``inputs``: dimension 0 of every tensor is the batch."""
    if isinstance(inputs, dict):
        return {k: _batch_dims(v, batch) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(_batch_dims(v, batch) for v in inputs)
    return {0: batch}


def export(models: dict[str, nn.Module], inputs: dict[str, tuple]) -> torch.export.ExportedProgram:
    """``Served(models)`` exported under ``torch.no_grad()`` with a dynamic batch size."""
    batch = torch.export.Dim("batch", min=2, max=4096)
    with torch.no_grad():
        return torch.export.export(Served(models), (inputs,), dynamic_shapes=(_batch_dims(inputs, batch),))


def export_keeping_ops(models: dict[str, nn.Module], inputs: dict[str, tuple]) -> torch.export.ExportedProgram:
    """:func:`export` as on CUDA's compiled kernels, whose program keeps the fused ops (one node each, run
    here by the interpreted kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_gate.dispatch, "compiled_kernels", lambda x: True)
        return export(models, inputs)


def fused_targets(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if "fused_gate" in str(node.target)}


def foreign_targets(program: torch.export.ExportedProgram) -> set[str]:
    """The graph's call targets other than ATen operators and Python's ``operator`` functions (``getitem``
    and the batch size's arithmetic)."""
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    aten = {t for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace == "aten"}
    return {str(t) for t in targets - aten if getattr(operator, getattr(t, "__name__", ""), None) is not t}


def run_without_fused_gate(folder: Path, inputs: dict[str, dict[int, dict]]) -> dict:
    """Run ``tests/serving_child.py`` on ``folder`` (from a temporary working directory, with a clean
    ``PYTHONPATH``) and return its outputs."""
    torch.save(inputs, folder / "inputs.pt")
    site_dirs = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    command = [sys.executable, "-I", "-S", str(ROOT / "tests" / "serving_child.py"), str(folder), *site_dirs]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return torch.load(folder / "outputs.pt")


def eager(models: dict[str, nn.Module], inputs: dict[str, tuple]) -> dict:
    with torch.no_grad():
        return Served(models)(inputs)


def assert_outputs_match(got, want, what: str) -> None:
    """Every tensor of ``got`` matches ``want``'s (NaN where it has NaN), by name."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for name in want:
            assert_outputs_match(got[name], want[name], f"{what} {name}")
    elif isinstance(want, tuple | list):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_outputs_match(g, w, f"{what}[{i}]")
    else:
        assert_matches(got, want, torch.float32, what)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Export every served model (the program, saved) and ``PACKAGED`` (one AOTInductor package, and a
    program that keeps the ops as on CUDA, then saved as traced by :func:`fused_gate.export_as_reference`)
    on the CPU, run them in the child and compute eager mode's outputs."""
    folder = tmp_path_factory.mktemp("served")
    models = served_models("cpu")
    packaged = {name: model for name, model in models.items() if name in PACKAGED}
    inputs = {batch: served_inputs(list(models), batch, "cpu") for batch in BATCHES}
    program = export(models, inputs[BATCHES[0]])
    torch.export.save(program, folder / "program.pt2")
    package_inputs = {batch: {name: inputs[batch][name] for name in packaged} for batch in BATCHES}
    torch._inductor.aoti_compile_and_package(
        export(packaged, package_inputs[BATCHES[0]]), package_path=str(folder / "package.pt2")
    )
    kept = export_keeping_ops(packaged, package_inputs[BATCHES[0]])
    with fg.export_as_reference():
        portable = kept.run_decompositions()
    torch.export.save(portable, folder / "portable.pt2")
    runs = {"program": inputs, "package": package_inputs, "portable": package_inputs}
    outputs = run_without_fused_gate(folder, runs)
    want = {batch: eager(models, inputs[batch]) for batch in BATCHES}
    return dict(
        program=program, kept=kept, portable=portable, outputs=outputs, want=want, package=folder / "package.pt2"
    )


def test_cpu_program_holds_aten_ops_only(served):
    """No fused_gate operator, higher-order op or data-dependent value (``.item()``, ``nonzero``) in the graph."""
    assert not foreign_targets(served["program"])
    targets = {node.target for node in served["program"].graph.nodes if node.op == "call_function"}
    data_dependent = {str(t) for t in targets if t.__name__.split(".")[0] in ("_local_scalar_dense", "item", "nonzero")}
    assert not data_dependent


def test_cpu_program_runs_without_fused_gate(served):
    for batch in BATCHES:
        assert_outputs_match(served["outputs"]["program"][batch], served["want"][batch], f"program B={batch}")


def test_cpu_package_runs_without_fused_gate(served):
    with zipfile.ZipFile(served["package"]) as package:
        assert any(name.endswith(".so") for name in package.namelist())
    for batch in BATCHES:
        got = served["outputs"]["package"][batch]
        assert_outputs_match(got, {name: served["want"][batch][name] for name in got}, f"package B={batch}")


def test_special_values_through_the_package(served):
    """NaN and inf expert outputs, -inf logits and fully masked rows keep their rules in the package."""
    y, y_softmax, p = served["outputs"]["package"][BATCHES[1]]["special_values"]
    assert y[0].isnan().all() and not y[2:].isnan().any(), "a NaN expert output makes its row's mix NaN"
    assert (y[4, 1] == 0).all(), "a (row, task) with no allowed expert mixes to 0"
    assert (p[2, 0] == 0).all() and (y_softmax[2, 0] == 0).all(), "all -inf logits: p = 0 and Y = 0"
    assert p[3, 1, 1] == 0 and (p[5, 0, :2] == 0).all(), "-inf and masked experts get weight 0"
    want = served["want"][BATCHES[1]]["special_values"]
    assert_outputs_match((y, y_softmax, p), want, "special values")


def test_program_keeping_the_ops_runs_without_fused_gate_as_reference(served):
    """A program that keeps the fused ops (as on CUDA) retraced within ``export_as_reference`` holds ATen ops
    only, and runs in the child equal to eager mode."""
    assert any("experts_mix" in name for name in fused_targets(served["kept"])), fused_targets(served["kept"])
    assert not foreign_targets(served["portable"])
    for batch in BATCHES:
        got = served["outputs"]["portable"][batch]
        assert_outputs_match(got, {name: served["want"][batch][name] for name in got}, f"portable B={batch}")


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_as_reference_traces_the_reference(strict):
    """Within ``export_as_reference``, ``torch.export`` (its Dynamo front end too: ``strict=True``) traces the
    reference where it would keep the op; after it, the op again."""
    model = fg.MMoE(10, 4, 8, 2, gate="softmax", tower_hidden=4).eval()
    x = torch.randn(5, 10)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(fused_gate.dispatch, "compiled_kernels", lambda x: True)
        with fg.export_as_reference():
            program = torch.export.export(model, (x,), strict=strict)
        assert fused_targets(torch.export.export(model, (x,), strict=strict))
        torch.testing.assert_close(program.module()(x), model(x))
    assert not foreign_targets(program)


def test_eval_export_traces_the_one_kernel_path(monkeypatch):
    """Exported in eval mode under ``torch.no_grad()``, the layers take ``experts_mix`` where it applies (the
    kernels' device), and its exported graph holds ATen ops only."""
    if not fg.uses_kernels(torch.empty(0)):
        pytest.skip("the one-kernel path runs on the kernels' devices; the CPU is one only with TRITON_INTERPRET=1")
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return fg.experts_mix(*args, **kwargs)

    monkeypatch.setattr(fg.gates, "experts_mix", counted)
    model = fg.MMoE(10, 4, 8, 2, gate="softmax", tower_hidden=4).eval()
    x = torch.randn(5, 10)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x))
    assert len(calls) == 2, "export and eager mode each call experts_mix once"
    assert not any("fused_gate" in str(node.target) for node in program.graph.nodes)


def test_aot_compilation_records_the_kernel_launches():
    """What AOTInductor compiles from the ops on CUDA (``tests/serving_trace.py``, traced without a GPU): the
    kernels' launches with a grid that follows the batch size and their warps, no fused_gate operator."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tests.serving_trace"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert not [target for target in report["targets"] if "fused_gate" in target], report["targets"]
    kernels = ["gate_mix_fwd_kernel"] * 3 + ["experts_mix_one_pass_kernel", "experts_mix_two_pass_kernel"]
    assert [launch["kernel"] for launch in report["launches"]] == kernels
    for launch in report["launches"]:
        assert launch["symbolic_grid"] and launch["options"], launch
        assert "maxnreg" not in launch["arguments"], "a launch option Inductor does not take reached the kernel"


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a GPU with compiled kernels (the package's Triton kernels compile for CUDA only)",
)
def test_gpu_package_runs_without_fused_gate(tmp_path):
    """The program keeps the fused ops (the kernels' path, saved and loaded where fused_gate is installed);
    AOTInductor compiles their Triton kernels into the package, which runs without fused_gate, and so does
    the program retraced within ``export_as_reference``, saved and loaded."""
    models = {name: model for name, model in served_models("cuda").items() if name in PACKAGED}
    inputs = {batch: served_inputs(list(models), batch, "cuda") for batch in BATCHES}
    program = export(models, inputs[BATCHES[0]])
    fused = fused_targets(program)
    assert any("experts_mix" in name for name in fused) and any("softmax_mix" in name for name in fused), fused
    torch.export.save(program, tmp_path / "saved.pt2")
    loaded = torch.export.load(tmp_path / "saved.pt2").module()
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "package.pt2"))
    with zipfile.ZipFile(tmp_path / "package.pt2") as package:
        contents = b"".join(package.read(name) for name in package.namelist())
    for kernel in (b"gate_mix_fwd_kernel", b"experts_mix_one_pass_kernel"):
        assert kernel in contents, f"the package does not hold {kernel.decode()}"
    with fg.export_as_reference():
        portable = program.run_decompositions()
    assert not foreign_targets(portable)
    torch.export.save(portable, tmp_path / "portable.pt2")
    outputs = run_without_fused_gate(tmp_path, {"package": inputs, "portable": inputs})
    for batch in BATCHES:
        want = eager(models, inputs[batch])
        assert_outputs_match(outputs["package"][batch], want, f"GPU package B={batch}")
        assert_outputs_match(outputs["portable"][batch], want, f"GPU program as reference, B={batch}")
        with torch.no_grad():
            assert_outputs_match(loaded(inputs[batch]), want, f"GPU program, saved and loaded, B={batch}")
