"""fused_gate."""
