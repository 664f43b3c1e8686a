"""fused_gate's benchmark suite (``pytest bench``) and its report (``python -m bench.report``)."""
