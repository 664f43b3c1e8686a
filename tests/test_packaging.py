"""The package: the wheel and what an import loads.

The wheel, built from the package's sources, carries the licence, its SPDX expression and both
packages. The sources (``pyproject.toml``, ``README.md``, ``LICENSE``, ``fused_gate/``, ``kernels/``) are
copied to a temporary folder first, so no ``build/`` folder left in the checkout can add stale files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "fused_gate", "kernels")


def test_wheel_holds_license_and_packages(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["-w", str(tmp_path / "dist"), str(src)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fused_gate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (license_path,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_path) == (ROOT / "LICENSE").read_bytes()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "License-Expression: Apache-2.0" in archive.read(metadata).decode()
    assert "fused_gate/__init__.py" in names and "fused_gate/kernels/gate_mix_fwd.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must ship as fused_gate.kernels only"


def test_reference_does_not_import_triton():
    """``fused_gate.reference`` (plain PyTorch, with the validation and activations it reads) imports no
    triton, nor does the package that registers the ops; the kernels load at the first op call."""
    code = (
        "import sys, torch, fused_gate.reference, fused_gate as fg; "
        "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if m.startswith('fused_gate')); "
        "fg.reference.attention_mix(torch.ones(2, 3, 4), torch.ones(1, 4)); assert 'triton' not in sys.modules; "
        "fg.uses_kernels(torch.ones(1)); assert 'triton' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
