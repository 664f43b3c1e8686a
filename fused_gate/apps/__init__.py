"""Applications built on the library: the demo, the gate study, their training loops and synthetic tasks,
and the self-test command. Each runs as ``python -m fused_gate.apps.<name>``; none is imported by
``import fused_gate``.
"""
