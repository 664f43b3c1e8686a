"""fused_gate's benchmark suite (``pytest bench``), its report, and the tuning sweep.

Without a GPU every entry point runs the Triton kernels through the interpreter: ``TRITON_INTERPRET=1``
must be set before the kernels are defined, so it is set here, before any bench module imports them
(importing torch does not import triton).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
