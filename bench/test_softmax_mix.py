"""softmax_mix: the fused kernels against eager, torch.compile and a copy of the same bytes."""

OP = "softmax_mix"


def test_softmax_mix(run_case, pass_, impl, shape, dtype):
    run_case(OP, pass_, impl, shape, dtype)
