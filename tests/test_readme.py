"""The documentation runs as written and its links resolve.

Every ```python block of README.md and of every Markdown page under ``docs/`` runs in a fresh
interpreter, each as its own test id ``<page>:<heading>-<n>`` (the page's path, the slug of the
heading above the block, a count). A page or block added later is picked up without touching this file.

Without a GPU the blocks run on the CPU, with the kernels interpreted (``TRITON_INTERPRET=1`` comes
from conftest through the environment), after the substitutions in ``CPU_SUBSTITUTIONS``: the device
becomes the CPU, and every integer literal of 1024 or more (the pages' batch sizes) becomes 64,
because the interpreter runs a ``[4096, 8, 256]`` gate in minutes. Each literal maps to the same
value everywhere in a block, so shapes that must agree still agree. On a GPU the blocks run unchanged.

Every relative link of these pages (``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``,
images included) must name a file of the repository and, with an anchor, a heading of that page.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

CPU_SUBSTITUTIONS: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (r"""(["'])cuda(:\d+)?\1""", '"cpu"'),  # device="cuda", torch.device("cuda:0")
    (r"\.cuda\(\)", ".cpu()"),  # module.cuda()
    (r"(?<![\w.])\d{4,}(?![\w.])", lambda m: "64" if int(m.group()) >= 1024 else m.group()),  # batch sizes
]

# A heading outside code, or a fenced block (any language); fences are matched whole so that a
# "# comment" inside code is not taken for a heading.
HEADING_OR_FENCE = re.compile(r"^(#{1,6}) ([^\n]+)$|^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The short slug of a heading, for test ids: lower case, runs of other characters become ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every ```python fenced block; the id is the section heading's slug and a count."""
    blocks, counts, heading = [], {}, "top"
    for match in HEADING_OR_FENCE.finditer(text):
        if match.group(1):
            heading = slug(match.group(2))
        elif match.group(3) == "python":
            counts[heading] = counts.get(heading, 0) + 1
            blocks.append((f"{heading}-{counts[heading]}", match.group(4)))
    return blocks


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to ``-``,
    a repeated anchor numbered ``-1``, ``-2``, ..."""
    found, counts = set(), {}
    for match in HEADING_OR_FENCE.finditer(text):
        if match.group(1):
            anchor = re.sub(r"[^\w\- ]", "", match.group(2).strip().lower()).replace(" ", "-")
            found.add(anchor if anchor not in counts else f"{anchor}-{counts[anchor]}")
            counts[anchor] = counts.get(anchor, 0) + 1
    return found


def relative_links(text: str) -> list[str]:
    """Every link target outside code that is not a URL."""
    prose = HEADING_OR_FENCE.sub(lambda m: m.group(0) if m.group(1) else "", text)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return [target for target in LINK.findall(prose) if not re.match(r"[a-z]+:", target)]


def for_cpu(code: str) -> str:
    for pattern, replacement in CPU_SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


BLOCKS = [
    (f"{page.relative_to(ROOT).as_posix()}:{block_id}", code)
    for page in PAGES
    for block_id, code in python_blocks(page.read_text(encoding="utf-8"))
]


def test_readme_has_python_blocks():
    assert any(block_id.startswith("README.md:") for block_id, _ in BLOCKS), "no ```python block in README.md"


def test_python_blocks_skip_headings_inside_code():
    text = "# A\n```python\n# a comment, not a heading\nx = 1\n```\n## B c\n```python\ny = 2\n```\n```python\nz\n```\n"
    text += "```bash\n# not a heading either\n```\n```python\nw\n```\n"
    want = [("a-1", "# a comment, not a heading\nx = 1\n"), ("b-c-1", "y = 2\n"), ("b-c-2", "z\n"), ("b-c-3", "w\n")]
    assert python_blocks(text) == want


def test_anchors_and_links():
    text = "# Swap into `to_fused`: it\n## Forward-mode AD\n## A\n## A\n```bash\n# no\n```\n"
    text += "see [x](docs/a.md#b), ![i](s/p.png), `[no](code.md)`, [web](https://x.org)\n```\n[no](c.md)\n```\n"
    assert anchors(text) == {"swap-into-to_fused-it", "forward-mode-ad", "a", "a-1"}
    assert relative_links(text) == ["docs/a.md#b", "s/p.png"]


def test_cpu_substitutions():
    code = 'h = torch.randn(4096, 8, 256, device="cuda")\nm = M().cuda()\nd = torch.device("cuda:0")\nx = 2e4096, 999'
    want = 'h = torch.randn(64, 8, 256, device="cpu")\nm = M().cpu()\nd = torch.device("cpu")\nx = 2e4096, 999'
    assert for_cpu(code) == want


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and anchor not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_readme_python_block_runs(code, tmp_path):
    source = for_cpu(code) if DEVICE == "cpu" else code
    done = subprocess.run(
        [sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"documentation block failed:\n{source}\n--- stderr ---\n{done.stderr[-4000:]}"
