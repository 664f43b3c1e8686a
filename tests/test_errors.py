"""Every rejected input raises ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import fused_gate as fg
from fused_gate._validation import MAX_EXPERTS, MAX_TASKS
from fused_gate.kernels import gate_mix_fwd

B, E, D, T = 4, 3, 8, 2


def _h(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


ATTENTION_CASES = [
    # (h, context, kwargs, exception, message fragment)
    (_h(B, D), _h(T, D), {}, ValueError, "h must be 3-D"),
    (_h(B, E, D), _h(D), {}, ValueError, "context must be"),
    (_h(B, E, D), _h(T, D + 1), {}, ValueError, "context has D"),
    (_h(B, E, D), _h(B + 1, T, D), {}, ValueError, "per-row context"),
    (_h(B, 0, D), _h(T, D), {}, ValueError, "E >= 1"),
    (_h(B, E, D), _h(0, D), {}, ValueError, "at least one task"),
    (torch.ones(B, E, D, dtype=torch.int32), _h(T, D), {}, TypeError, "h must be a floating-point"),
    (_h(B, E, D), torch.ones(T, D, dtype=torch.int64), {}, TypeError, "context must be a floating-point"),
    ([1.0], _h(T, D), {}, TypeError, "h must be a torch.Tensor"),
    (_h(B, E, D), _h(T, D), {"mask": torch.ones(T, E)}, TypeError, "mask must have dtype torch.bool"),
    (_h(B, E, D), _h(T, D), {"mask": torch.ones(T, E + 1, dtype=torch.bool)}, ValueError, "mask must have shape"),
    (_h(B, E, D), _h(T, D), {"mask": [[True]]}, TypeError, "mask must be a bool torch.Tensor"),
    (_h(B, E, D), _h(T, D), {"top_k": 0}, ValueError, "top_k must be in 1..E"),
    (_h(B, E, D), _h(T, D), {"top_k": E + 1}, ValueError, "top_k must be in 1..E"),
    (_h(B, E, D), _h(T, D), {"top_k": 1.5}, TypeError, "top_k must be an int"),
    (_h(B, E, D), _h(T, D), {"scale": -1.0}, ValueError, "scale must be a finite positive"),
    (_h(B, E, D), _h(T, D), {"scale": "big"}, TypeError, "scale must be a float"),
    (_h(B, E, D), _h(T, D), {"return_weights": "yes"}, TypeError, "return_weights must be a bool"),
    (_h(B, E, D), [[1.0] * D] * T, {}, TypeError, "context must be a torch.Tensor"),
    (_h(B, MAX_EXPERTS + 1, 2), _h(T, 2), {}, ValueError, f"E <= {MAX_EXPERTS}"),
    (_h(B, E, D), _h(MAX_TASKS + 1, D), {}, ValueError, f"T <= {MAX_TASKS}"),
    (_h(B, E, D), _h(T, D), {"mask": torch.ones(T, E, dtype=torch.bool, device="meta")}, ValueError, "same device"),
]


def test_experts_mix_float64_bias_runs_the_reference(dispatch_path, device):
    x, weight, context = _h(B, 6).to(device), _h(E, 6, D).to(device), _h(T, D).to(device)
    bias = _h(E, D, dtype=torch.float64).to(device)
    with torch.no_grad():
        y = fg.experts_mix(x, weight, bias, context=context)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, fg.reference.experts_mix(x, weight, bias, context=context), rtol=0, atol=0)


def _to(device, x):
    """Move test inputs to the device under test (the kernel path), leaving meta tensors be."""
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(device, v) for k, v in x.items()}
    return x


@pytest.mark.parametrize(("h", "context", "kwargs", "exc", "message"), ATTENTION_CASES)
def test_attention_mix_rejects(h, context, kwargs, exc, message, device):
    h, context, kwargs = _to(device, h), _to(device, context), _to(device, kwargs)
    with pytest.raises(exc, match=message.replace("[", r"\[").replace(".", r"\.")):
        fg.attention_mix(h, context, **kwargs)


def test_reference_accepts_float64():
    y = fg.reference.attention_mix(_h(B, E, D, dtype=torch.float64), _h(T, D, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.parametrize("float64", ["h", "context", "both"], ids=["h-float64", "context-float64", "both-float64"])
def test_float64_runs_the_reference_on_every_path(float64, dispatch_path, monkeypatch, device):
    """The kernels compute in float32: a float64 input runs the reference, on the kernel path too (no launch)."""
    monkeypatch.setattr(gate_mix_fwd, "plan_forward", None)  # a launch would fail
    h, context = _h(B, E, D).to(device), _h(T, D).to(device)
    h = h.double() if float64 != "context" else h
    context = context.double() if float64 != "h" else context
    h.requires_grad_()
    y = fg.attention_mix(h, context, top_k=2)
    y.sum().backward()
    expected = fg.reference.attention_mix(h.detach().double(), context.double(), top_k=2)
    assert y.dtype == h.dtype
    torch.testing.assert_close(y.double(), expected, rtol=1e-6 if h.dtype == torch.float32 else 1e-12, atol=1e-6)
    logits = _h(B, T, E, dtype=torch.float64).to(device)
    torch.testing.assert_close(fg.softmax_mix(logits, h), fg.reference.softmax_mix(logits, h))


# Inputs the fallback used to accept and the kernels rejected (or the reverse): one rule on every path now.
SAME_ON_EVERY_PATH = {
    "experts beyond 256": (lambda d: fg.attention_mix(_h(2, 257, 2).to(d), _h(T, 2).to(d)), ValueError, "E <= 256"),
    "tasks beyond 16": (lambda d: fg.softmax_mix(_h(2, 17, E).to(d), _h(2, E, D).to(d)), ValueError, "T <= 16"),
    "x bf16, weight fp32": (
        lambda d: fg.experts_mix(_h(B, 6).to(d, torch.bfloat16), _h(E, 6, D).to(d), context=_h(T, D).to(d)),
        TypeError,
        "must have the same dtype",
    ),
    "experts_mix over 256 experts": (
        lambda d: fg.experts_mix(_h(B, 6).to(d), _h(300, 6, 2).to(d), context=_h(1, 2).to(d)),
        ValueError,
        "E <= 256",
    ),
    "experts_mix gate tile": (
        lambda d: fg.experts_mix(_h(B, 6).to(d), _h(64, 6, 2).to(d), context=_h(16, 2).to(d)),
        ValueError,
        "<= 512",
    ),
    "return_weights not a bool": (
        lambda d: fg.experts_mix(_h(B, 6).to(d), _h(E, 6, D).to(d), context=_h(T, D).to(d), return_weights="yes"),
        TypeError,
        "return_weights must be a bool",
    ),
}


@pytest.mark.parametrize("case", sorted(SAME_ON_EVERY_PATH))
def test_same_rejections_on_every_path(case, dispatch_path, device):
    call, exc, message = SAME_ON_EVERY_PATH[case]
    with torch.no_grad(), pytest.raises(exc, match=message):
        call(device)


REFERENCE_CALLS = {
    "attention_mix": lambda **kw: fg.reference.attention_mix(_h(B, E, D), _h(T, D), **kw),
    "softmax_mix": lambda **kw: fg.reference.softmax_mix(_h(B, T, E), _h(B, E, D), **kw),
    "experts_mix": lambda **kw: fg.reference.experts_mix(_h(B, 6), _h(E, 6, D), context=_h(T, D), **kw),
}


@pytest.mark.parametrize("op", sorted(REFERENCE_CALLS))
def test_reference_checks_the_kernels_rules(op):
    """``fused_gate.reference`` (the CPU fallback) rejects what the kernel path rejects."""
    with pytest.raises(TypeError, match="return_weights must be a bool"):
        REFERENCE_CALLS[op](return_weights="yes")
    too_many = {
        "attention_mix": lambda: fg.reference.attention_mix(_h(2, 257, 2), _h(T, 2)),
        "softmax_mix": lambda: fg.reference.softmax_mix(_h(2, 17, E), _h(2, E, D)),
        "experts_mix": lambda: fg.reference.experts_mix(_h(B, 6), _h(300, 6, 2), context=_h(1, 2)),
    }[op]
    with pytest.raises(ValueError, match=r"E <= 256|T <= 16"):
        too_many()


@pytest.mark.parametrize("arg", ["x", "context", "logits"])
def test_experts_mix_names_a_list_argument_before_the_gradient_check(arg, dispatch_path, device):
    """A list instead of a tensor is a TypeError naming it, in grad mode too (no AttributeError)."""
    weight = _h(E, 6, D).to(device).requires_grad_()
    inputs = {"x": _h(B, 6).to(device), "context": _h(T, D).to(device)}
    if arg == "logits":
        inputs = {"x": inputs["x"], "gate": "softmax", "logits": _h(B, T, E).to(device)}
    inputs[arg] = inputs[arg].tolist()
    with pytest.raises(TypeError, match=f"{arg} must be a torch.Tensor, got list"):
        fg.experts_mix(weight=weight, **inputs)
    with pytest.raises(TypeError, match=f"{arg} must be a torch.Tensor, got list"):
        fg.reference.experts_mix(weight=weight.detach(), **inputs)


SOFTMAX_CASES = [
    (_h(B, T), _h(B, E, D), {}, ValueError, "logits must be 3-D"),
    (_h(B, T, E + 1), _h(B, E, D), {}, ValueError, "logits must be \\[B, T, E\\]"),
    (_h(B + 1, T, E), _h(B, E, D), {}, ValueError, "logits must be \\[B, T, E\\]"),
    (_h(B, T, E), _h(B, E, D), {"temperature": 0.0}, ValueError, "temperature must be a finite positive"),
    (_h(B, T, E), _h(B, E, D), {"top_k": E + 1}, ValueError, "top_k must be in 1..E"),
    (torch.ones(B, T, E, dtype=torch.int32), _h(B, E, D), {}, TypeError, "logits must be a floating-point"),
]


@pytest.mark.parametrize(("logits", "h", "kwargs", "exc", "message"), SOFTMAX_CASES)
def test_softmax_mix_rejects(logits, h, kwargs, exc, message, device):
    with pytest.raises(exc, match=message):
        fg.softmax_mix(_to(device, logits), _to(device, h), **kwargs)


def test_module_rejects_bad_list():
    gate = fg.AttentionMix(T, D)
    with pytest.raises(ValueError, match="same shape"):
        gate([_h(B, D), _h(B, D + 1)])
    with pytest.raises(TypeError, match="non-empty list"):
        gate([])


@pytest.mark.parametrize(
    ("mask", "exc", "message"),
    [
        (torch.ones(T, E), TypeError, r"mask must have dtype torch.bool .*, got torch.float32"),
        ([[True] * E] * T, TypeError, r"mask must have dtype torch.bool .*, got list"),
        (torch.ones(T + 1, E, dtype=torch.bool), ValueError, r"mask must have shape \[T, E\] with T = num_tasks = 2"),
        (torch.ones(B, T, E, dtype=torch.bool), ValueError, r"mask must have shape \[T, E\]"),
    ],
    ids=["float", "list", "wrong-T", "per-row"],
)
def test_module_rejects_bad_mask(mask, exc, message):
    with pytest.raises(exc, match=message):
        fg.AttentionMix(T, D, mask=mask)


@pytest.mark.parametrize("from_list", [False, True], ids=["tensor", "list"])
def test_module_names_h_last_dimension(from_list, device):
    """A transposed h ([B, D, E] for dim = D) is reported as h's last dimension, not as the context's."""
    gate = fg.AttentionMix(T, D, device=device)
    h = _h(B, E, D).to(device).transpose(1, 2)
    with pytest.raises(ValueError, match=r"h's last dimension must be dim = 8 .* h\.transpose\(0, 1\)") as error:
        gate(list(h.unbind(1)) if from_list else h)
    assert "context" not in str(error.value)


def test_module_takes_a_transposed_buffer_as_its_message_says(device):
    gate = fg.AttentionMix(T, D, device=device)
    buffer = _h(E, B, D).to(device)  # [E, B, D], as a loop over experts fills it
    torch.testing.assert_close(gate(buffer.transpose(0, 1)), gate(buffer.transpose(0, 1).contiguous()))
