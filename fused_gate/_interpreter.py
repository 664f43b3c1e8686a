"""What Triton's interpreter (the kernels on a CPU) needs beyond torch and triton, checked up front.

triton 3.6's interpreter imports numpy, which neither torch nor triton installs, and converts
1-element arrays with ``int()``, which numpy 2.4 rejects. With ``TRITON_INTERPRET=1`` a missing numpy
already fails inside ``import triton`` and numpy 2.4 fails inside the first launch; this check stops
the entry points at once instead, saying what to install. The ``test`` extra pins the same requirement.

Importing this module (``fused_gate/__init__.py`` does, before anything imports triton) raises
``ImportError`` with that message when ``TRITON_INTERPRET`` is on and the interpreter cannot run. It
reads the variable itself, as triton does (``1``, ``true`` or ``on``), since importing triton is what
would fail.
"""

from __future__ import annotations

import importlib.metadata
import os

NUMPY_REQUIREMENT = "numpy<2.4"


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks triton for its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels in this environment, naming what to install; None if it can."""
    try:
        version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        found = "numpy is not installed"
    else:
        if tuple(int(part) for part in version.split(".")[:2]) < (2, 4):
            return None
        found = f"numpy {version} is installed"
    return (
        f"Triton's interpreter (the fused kernels on a CPU) needs {NUMPY_REQUIREMENT} with triton "
        f"{importlib.metadata.version('triton')}, but {found}: pip install '{NUMPY_REQUIREMENT}'"
    )


if interpret_requested() and (_problem := interpreter_problem()) is not None:
    raise ImportError(_problem)
