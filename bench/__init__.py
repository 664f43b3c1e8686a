"""fused_gate's benchmark suite (``pytest bench``), its report, and the tuning sweep.

Importing ``bench`` or any of its modules leaves the environment as it is and loads no kernel: each
command sets ``TRITON_INTERPRET=1`` itself where it needs the interpreter (``bench/interpreter.py``).
"""
