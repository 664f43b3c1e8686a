"""What Triton's interpreter (the kernels on a CPU) needs beyond torch and triton, checked up front.

triton 3.6's interpreter imports numpy, which neither torch nor triton installs, and converts
1-element arrays with ``int()``, which numpy 2.4 rejects. Without this check a missing numpy fails at
the first kernel definition and numpy 2.4 fails inside the first launch; with it, the entry points
stop at once and say what to install. The ``test`` extra pins the same requirement.

Importing this module (``fused_gate/__init__.py`` does, before anything defines a kernel) raises
``ImportError`` with that message when ``TRITON_INTERPRET`` is on and the interpreter cannot run.
"""

from __future__ import annotations

import importlib.metadata

import triton

NUMPY_REQUIREMENT = "numpy<2.4"


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
        f"{triton.__version__}, but {found}: pip install '{NUMPY_REQUIREMENT}'"
    )


if triton.knobs.runtime.interpret and (_problem := interpreter_problem()) is not None:
    raise ImportError(_problem)
