"""Every ```python block of README.md runs as written, each in a fresh interpreter (its own test id).

Without a GPU the blocks run on the CPU, with the kernels interpreted (``TRITON_INTERPRET=1`` comes
from conftest through the environment), after the substitutions in ``CPU_SUBSTITUTIONS``: the device
becomes the CPU, and every integer literal of 1024 or more (the README's batch sizes) becomes 64,
because the interpreter runs a ``[4096, 8, 256]`` gate in minutes. Each literal maps to the same
value everywhere in a block, so shapes that must agree still agree. On a GPU the blocks run unchanged.
A block added to the README is picked up without touching this file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import DEVICE

README = Path(__file__).resolve().parent.parent / "README.md"

CPU_SUBSTITUTIONS: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (r"""(["'])cuda(:\d+)?\1""", '"cpu"'),  # device="cuda", torch.device("cuda:0")
    (r"\.cuda\(\)", ".cpu()"),  # module.cuda()
    (r"(?<![\w.])\d{4,}(?![\w.])", lambda m: "64" if int(m.group()) >= 1024 else m.group()),  # batch sizes
]


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every ```python fenced block; the id is the section heading's slug and a count."""
    blocks, counts, heading = [], {}, "top"
    for match in re.finditer(r"^(#{1,6}) ([^\n]+)$|^```python[^\n]*\n(.*?)^```", text, re.M | re.S):
        if match.group(1):
            heading = re.sub(r"[^a-z0-9]+", "-", match.group(2).lower()).strip("-")
        else:
            counts[heading] = counts.get(heading, 0) + 1
            blocks.append((f"{heading}-{counts[heading]}", match.group(3)))
    return blocks


def for_cpu(code: str) -> str:
    for pattern, replacement in CPU_SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert BLOCKS, "no ```python block found in README.md"


def test_python_blocks_skip_headings_inside_code():
    text = "# A\n```python\n# a comment, not a heading\nx = 1\n```\n## B c\n```python\ny = 2\n```\n```python\nz\n```\n"
    want = [("a-1", "# a comment, not a heading\nx = 1\n"), ("b-c-1", "y = 2\n"), ("b-c-2", "z\n")]
    assert python_blocks(text) == want


def test_cpu_substitutions():
    code = 'h = torch.randn(4096, 8, 256, device="cuda")\nm = M().cuda()\nd = torch.device("cuda:0")\nx = 2e4096, 999'
    want = 'h = torch.randn(64, 8, 256, device="cpu")\nm = M().cpu()\nd = torch.device("cpu")\nx = 2e4096, 999'
    assert for_cpu(code) == want


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_readme_python_block_runs(code, tmp_path):
    source = for_cpu(code) if DEVICE == "cpu" else code
    done = subprocess.run(
        [sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"README block failed:\n{source}\n--- stderr ---\n{done.stderr[-4000:]}"
