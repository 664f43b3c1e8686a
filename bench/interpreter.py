"""The bench's commands without a GPU: the Triton kernels run through Triton's interpreter.

``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a function, so the variable must be set
before triton is imported (``triton.language`` defines jit functions of its own, such as ``tl.zeros``)
and before the kernels are (``import fused_gate`` imports neither: they load at the first op call).
Importing ``bench`` or any of its modules therefore changes nothing and imports neither:
each command's ``main()`` calls :func:`use_interpreter` first, and ``bench/conftest.py``'s
``pytest_configure`` does for ``pytest bench``; the modules import triton and the kernels inside the
functions that use them.
"""

from __future__ import annotations

import os

import torch

from fused_gate._interpreter import interpret_requested, interpreter_problem


def use_interpreter(*, on_gpu: bool = False) -> None:
    """Set ``TRITON_INTERPRET=1`` where there is no GPU, unless the variable is already set (``0`` keeps
    the CPU fallback); with ``on_gpu=True`` set it everywhere (``bench.traffic`` counts bytes through the
    interpreter). Then check, as ``import fused_gate`` does when the variable is set before it, that the
    interpreter can run here (numpy), raising ``ImportError`` naming what to install."""
    if on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if interpret_requested() and (problem := interpreter_problem()) is not None:
        raise ImportError(problem)
