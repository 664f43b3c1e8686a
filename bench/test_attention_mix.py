"""attention_mix: the fused kernels against eager, torch.compile, SDPA and a copy of the same bytes."""

OP = "attention_mix"


def test_attention_mix(run_case, pass_, impl, shape, dtype):
    run_case(OP, pass_, impl, shape, dtype)
