"""The command-line tools reject bad arguments at parse time: exit code 2, one ``prog: error:`` line naming
the option, before any work; ``--help`` prints at once (``scripts/dev.sh --help`` creates no venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _main(module: str):
    if module == "selftest":
        from fused_gate.apps import selftest as tool
    elif module == "demo":
        from fused_gate.apps import demo as tool
    elif module == "experts_mix":
        from bench import experts_mix as tool
    elif module == "swap_in_step":
        from bench import swap_in_step as tool
    else:
        from bench import convert_step as tool
    return tool.main


BAD_ARGUMENTS = [
    # (tool, arguments, what the error line says)
    ("selftest", ["--batch", "0"], "argument --batch: expected an int >= 1, got 0"),
    ("selftest", ["--repeats", "-3"], "argument --repeats: expected an int >= 1, got -3"),
    ("selftest", ["--repeats", "0"], "argument --repeats: expected an int >= 1, got 0"),
    ("selftest", ["--dim", "0"], "argument --dim: expected an int >= 1, got 0"),
    ("selftest", ["--experts", "300"], r"argument --experts: expected an int in 1\.\.256, got 300"),
    ("selftest", ["--device", "mps"], "argument --device: expected a cpu or cuda device, got 'mps'"),
    ("selftest", ["--device", "gpu"], "argument --device: expected a device such as cpu or cuda, got 'gpu'"),
    ("experts_mix", ["--gates", ","], "argument --gates: expected a comma-separated list of softmax,attention"),
    ("experts_mix", ["--impls", ""], "argument --impls: expected a comma-separated list of one-kernel"),
    ("experts_mix", ["--impls", "fast"], r"argument --impls: unknown \['fast'\]"),
    ("experts_mix", ["--rounds", "0"], "argument --rounds: expected an int >= 1, got 0"),
    ("swap_in_step", ["--models", "foo"], r"argument --models: unknown \['foo'\]"),
    ("swap_in_step", ["--hidden", "abc"], "argument --hidden: expected comma-separated widths, each an int >= 1"),
    ("swap_in_step", ["--batch", "256,0"], "argument --batch: expected comma-separated batch sizes, each an int >= 1"),
    ("swap_in_step", ["--tasks", "1"], r"argument --tasks: expected an int in 2\.\.15, got 1"),
    ("swap_in_step", ["--experts", "3"], "--experts: a PLE level has 2 shared experts and the rest split evenly"),
    ("convert_step", ["--hidden", "8,0"], "argument --hidden: expected comma-separated widths"),
    ("demo", ["--steps", "0"], "argument --steps: expected an int >= 1, got 0"),
    ("demo", ["--seeds", "0"], "argument --seeds: expected an int >= 1, got 0"),
    ("demo", ["--eval-every", "0"], "argument --eval-every: expected an int >= 1, got 0"),
    ("demo", ["--batch-size", "0"], "argument --batch-size: expected an int >= 1, got 0"),
    ("demo", ["--lr", "nan"], r"argument --lr: expected a finite number in \(0, inf\], got nan"),
    ("demo", ["--correlations", "0.5", "2"], r"argument --correlations: expected a finite number in \[-1, 1\], got 2"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS += [
        ("selftest", ["--device", "cuda"], "argument --device: 'cuda' asked for, but torch sees no CUDA GPU"),
        ("demo", ["--device", "cuda:0"], "argument --device: 'cuda:0' asked for, but torch sees no CUDA GPU"),
    ]


@pytest.mark.parametrize(
    ("tool", "argv", "message"), BAD_ARGUMENTS, ids=[f"{t} {' '.join(a)}" for t, a, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_exit_2_naming_the_option(tool, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _main(tool)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert err[-1].startswith("python -m ") and ": error: " in err[-1], err
    assert re.search(message, err[-1]), err[-1]


@pytest.mark.parametrize("tool", ["selftest", "demo", "experts_mix", "swap_in_step", "convert_step"])
def test_help_exits_0(tool, capsys):
    with pytest.raises(SystemExit) as stop:
        _main(tool)(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out


def test_dev_script_answers_help_and_unknown_commands_before_any_install(tmp_path):
    """On a fresh clone ``dev.sh --help`` prints its usage without creating ``.venv`` (nor installing torch)."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    script = tmp_path / "scripts" / "dev.sh"
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: bash scripts/dev.sh")
    unknown = subprocess.run(["bash", str(script), "tset"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown command 'tset'" in unknown.stderr
    assert not (tmp_path / ".venv").exists()


def test_dev_script_test_runs_the_files_given_alone(tmp_path):
    """``dev.sh test FILE -k ...`` hands pytest that file alone; with options alone, the whole ``tests``. A
    stand-in ``.venv/bin/python`` prints what it is asked to run."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_one.py").touch()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("include-system-site-packages = true\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text('#!/bin/sh\n[ "$1" = -c ] || echo "$@"\n')
    python.chmod(0o755)

    def pytest_args(*args: str) -> str:
        done = subprocess.run(["bash", "scripts/dev.sh", "test", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    options = "-m pytest -q -W ignore::DeprecationWarning"
    assert pytest_args("tests/test_one.py::test_a", "-k", "mask") == f"{options} tests/test_one.py::test_a -k mask"
    assert pytest_args("-k", "mask") == f"{options} tests -k mask"
    assert pytest_args() == f"{options} tests"


def test_selftest_on_cpu_device_with_an_index_runs_the_kernels():
    """``--device cpu:0`` restarts with the interpreter as ``--device cpu`` does: the fused column is the kernels'
    (its error differs from the reference's), not the reference under the kernels' name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--device", "cpu:0", "--batch", "5", "--experts", "3", "--dim", "8", "--tasks", "2", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "fused_gate.apps.selftest", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Triton kernels, interpreted on CPU" in done.stdout
    (row,) = [line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["5"]]
    assert row[1] != row[2], "the fused and eager errors are identical: the fused op ran the reference"
