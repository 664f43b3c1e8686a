"""``python -m fused_gate.apps.selftest``: its comparison with float64; its early stop when the interpreter cannot run.

An environment with numpy 2.4 is made by putting a ``numpy-2.4.0.dist-info`` first on ``PYTHONPATH``:
``importlib.metadata`` then reports that version, while nothing is imported from it.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from fused_gate import _interpreter
from fused_gate.apps import selftest


def test_selftest_matches_float64(device, capsys):
    args = ["--device", device, "--batch", "3", "17", "--dim", "24", "--dtype", "fp32", "--repeats", "1"]
    table = selftest.main(args)
    assert set(table) == {3, 17}
    for results in table.values():
        for error, ms in results.values():
            assert error < 1e-4 and ms > 0
    assert "max err fused" in capsys.readouterr().out


def _with_numpy_2_4(tmp_path, interpret: bool) -> dict[str, str]:
    dist_info = tmp_path / "numpy-2.4.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 2.4.0\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return {**env, "TRITON_INTERPRET": "1"} if interpret else env


def test_selftest_on_cpu_stops_at_once_naming_numpy(tmp_path):
    command = [sys.executable, "-m", "fused_gate.apps.selftest", "--device", "cpu"]
    done = subprocess.run(command, env=_with_numpy_2_4(tmp_path, interpret=False), capture_output=True, text=True)
    assert done.returncode == 1
    assert "numpy 2.4.0 is installed: pip install 'numpy<2.4'" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_import_with_interpreter_on_names_numpy(tmp_path):
    command = [sys.executable, "-c", "import fused_gate"]
    done = subprocess.run(command, env=_with_numpy_2_4(tmp_path, interpret=True), capture_output=True, text=True)
    assert done.returncode == 1
    assert "ImportError: Triton's interpreter" in done.stderr and "pip install 'numpy<2.4'" in done.stderr


def test_missing_numpy_is_named(monkeypatch):
    version = importlib.metadata.version

    def numpy_not_installed(name: str) -> str:
        if name == "numpy":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", numpy_not_installed)
    assert "numpy is not installed: pip install 'numpy<2.4'" in _interpreter.interpreter_problem()


@pytest.mark.parametrize(("version", "ok"), [("2.3.5", True), ("1.26.4", True), ("2.4.0", False), ("2.10.1", False)])
def test_numpy_versions(monkeypatch, version, ok):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "numpy" else "3.6.0")
    assert (_interpreter.interpreter_problem() is None) == ok


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_interpret_requested_reads_the_variable_as_triton_does(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _interpreter.interpret_requested() == on
