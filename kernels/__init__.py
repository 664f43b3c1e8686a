"""Triton kernels of fused_gate (shipped as ``fused_gate.kernels``).

``INTERPRETED`` records whether ``TRITON_INTERPRET=1`` was set when the kernels were defined: then
``@triton.jit`` functions run on CPU tensors through Triton's interpreter, which is how the test
suite exercises the real kernels without a GPU.
"""

import triton

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
