"""Input validation: of the fused ops and the reference, and of the modules' and layers' options.

Every rejection is a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value or
device) that names the argument and what was expected, raised before any kernel is launched. The rules
are the same on every dispatch path (the kernels, the reference fallback, float64 inputs): the
kernels' limits (``E <= 256``, ``T <= 16``, the ``experts_mix`` gate tile, ``x`` and ``weight`` of one
dtype) hold for the reference too, so an input accepted on a CPU is accepted on a GPU. This module also
holds what the ops accept (the gate kinds, the kernels' sizes); it imports neither triton nor the
kernels, so the plain-PyTorch reference does not either.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from fused_gate.activations import ACTIVATIONS

# The gate kinds: the classic MMoE/PLE gate (softmax of the gate's logits) and the attention gate.
GATES = ("softmax", "attention")
# What the kernels hold in registers (kernels/config.py sizes its tiles for these).
MAX_EXPERTS = 256
MAX_TASKS = 16
MIX_MAX_GATE = 512  # experts_mix: BLOCK_T * BLOCK_E (at 16 rows, an 8192-element gate tile over 16 warps)
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_MIN = torch.finfo(torch.float32).tiny  # the smallest normal float32


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _validate_float_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _validate_same_device(**tensors: Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must be on the same device"
            )


def _validate_h(h: object) -> tuple[int, int, int]:
    _validate_float_tensor("h", h)
    if h.dim() != 3:
        raise ValueError(f"h must be 3-D [B, E, D] (rows, experts, dim), got shape {tuple(h.shape)}")
    batch, experts, dim = h.shape
    if experts < 1 or dim < 1:
        raise ValueError(f"h [B, E, D] needs E >= 1 and D >= 1, got shape {tuple(h.shape)}")
    _validate_experts(experts, "h")
    return batch, experts, dim


def _validate_experts(experts: int, what: str) -> None:
    if experts > MAX_EXPERTS:
        raise ValueError(f"{what} has E = {experts} experts; the fused kernels support E <= {MAX_EXPERTS}")


def _validate_tasks(tasks: int, what: str) -> None:
    if tasks < 1:
        raise ValueError(f"{what} needs at least one task (T >= 1)")
    if tasks > MAX_TASKS:
        raise ValueError(f"{what} has T = {tasks} tasks; the fused kernels support T <= {MAX_TASKS}")


def validate_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else ``TypeError`` naming ``name`` (``"no"`` is not taken as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def validate_count(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as a Python int (numpy integers accepted) in ``low..high``, else ``TypeError`` / ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def _validate_mask(mask: object, batch: int, tasks: int, experts: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    # Only shapes of one length are compared: a traced batch size compared with T would become a guard.
    expected = (tasks, experts) if mask.dim() == 2 else (batch, tasks, experts)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have shape [T, E] = {[tasks, experts]} or [B, T, E] = "
            f"{[batch, tasks, experts]}, got {list(mask.shape)}"
        )


def validate_gate(gate: object) -> str:
    """``gate``, one of :data:`GATES`."""
    if not isinstance(gate, str) or gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    return gate


def validate_activation(activation: object, name: str = "activation") -> str:
    """``activation``, a name of :data:`fused_gate.activations.ACTIVATIONS`; errors name it ``name``."""
    if not isinstance(activation, str):
        raise TypeError(f"{name} must be a name, one of {sorted(ACTIVATIONS)}, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def validate_dropout(dropout: object, name: str = "dropout") -> float:
    """``dropout``, a probability in ``[0, 1)``, as a float; errors name it ``name``."""
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise TypeError(f"{name} must be a probability in [0, 1), got {type(dropout).__name__}")
    if not 0 <= dropout < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def _is_int(w: object) -> bool:
    return isinstance(w, int) and not isinstance(w, bool)


def validate_widths(name: str, widths: int | Sequence[int], *, allow_empty: bool = False) -> tuple[int, ...]:
    """An int or a sequence of ints >= 1 as a tuple; ``allow_empty`` accepts ``()``."""
    widths = (widths,) if _is_int(widths) else widths
    expected = "an int >= 1 or a sequence of them" + (" (may be empty)" if allow_empty else "")
    if isinstance(widths, str) or not isinstance(widths, Sequence) or not all(_is_int(w) for w in widths):
        raise TypeError(f"{name} must be {expected}, got {widths!r}")
    if not all(w >= 1 for w in widths) or (not widths and not allow_empty):
        raise ValueError(f"{name} must be {expected}, got {widths!r}")
    return tuple(widths)


def validate_module_mask(mask: object, num_tasks: int) -> None:
    """A gate module's mask: one bool ``[T, E]`` for every row (the ops also take ``[B, T, E]`` per call)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must have dtype torch.bool (a bool [T, E] tensor or None), got {got}")
    if mask.dim() != 2 or mask.shape[0] != num_tasks:
        raise ValueError(f"mask must have shape [T, E] with T = num_tasks = {num_tasks}, got {list(mask.shape)}")


def validate_top_k(top_k: object, experts: int | None = None) -> int | None:
    """``top_k`` as a Python int (numpy integers accepted), in ``1..E`` when ``E`` is known."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
    top_k = int(top_k)
    if top_k < 1 or (experts is not None and top_k > experts):
        raise ValueError(f"top_k must be in 1..E{'' if experts is None else f' = 1..{experts}'}, got {top_k}")
    return top_k


def validate_positive_float(name: str, value: object, *, reciprocal: bool = False) -> float:
    """``value`` as a Python float (numpy scalars accepted) that the kernels' float32 represents.

    The kernels compute in float32, so ``value`` must lie in float32's normal range
    ``[FLOAT32_MIN, FLOAT32_MAX]``; with ``reciprocal`` (a temperature, used as ``1 / temperature``)
    its reciprocal must too. Anything outside would overflow to inf or flush to 0 on the GPU.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} = {value} is too large for float32 (at most {FLOAT32_MAX:.4g})") from None
    # Comparisons rather than math.isfinite: torch.compile traces them on a symbolic float.
    if not -math.inf < value < math.inf or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    low, high = (FLOAT32_MIN, 1 / FLOAT32_MIN) if reciprocal else (FLOAT32_MIN, FLOAT32_MAX)
    if not low <= value <= high:
        raise ValueError(
            f"{name} = {value:.4g} cannot be represented in the kernels' float32 "
            f"(it must lie in [{low:.4g}, {high:.4g}])"
        )
    return value


def _validate_context(context: object, batch: int, dim: int, source: str = "h [B, E, D]") -> int:
    """Validate a context ``[T, D]`` or ``[B, T, D]`` against ``B`` and ``D`` of ``source``; returns ``T``."""
    _validate_float_tensor("context", context)
    if context.dim() == 2:
        tasks, cdim = context.shape
    elif context.dim() == 3:
        cbatch, tasks, cdim = context.shape
        if cbatch != batch:
            raise ValueError(
                f"context [B, T, D] has B = {cbatch} rows but {source} has B = {batch}; "
                "a per-row context needs one row per input row"
            )
    else:
        raise ValueError(
            f"context must be [T, D] (one vector per task) or [B, T, D] (per row), got shape {tuple(context.shape)}"
        )
    if cdim != dim:
        raise ValueError(f"context has D = {cdim} but {source} has D = {dim} (context [T, D])")
    _validate_tasks(tasks, "context")
    return tasks


def _validate_logits(logits: object, batch: int, experts: int, source: str = "h [B, E, D]") -> int:
    """Validate gate logits ``[B, T, E]`` against ``B`` and ``E`` of ``source``; returns ``T``."""
    _validate_float_tensor("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D [B, T, E], got shape {tuple(logits.shape)}")
    lbatch, tasks, lexperts = logits.shape
    if lbatch != batch or lexperts != experts:
        raise ValueError(
            f"logits must be [B, T, E] with B = {batch} and E = {experts} from {source}, "
            f"got shape {tuple(logits.shape)}"
        )
    _validate_tasks(tasks, "logits")
    return tasks


def validate_attention_mix(
    h: object, context: object, scale: object, mask: object, top_k: object, return_weights: object
) -> tuple[float, int | None]:
    """Validate ``attention_mix`` inputs; returns ``(scale, top_k)`` as Python numbers (the default
    scale ``1 / sqrt(D)`` filled in)."""
    batch, experts, dim = _validate_h(h)
    tasks = _validate_context(context, batch, dim)
    scale = dim**-0.5 if scale is None else validate_positive_float("scale", scale)
    _validate_mask(mask, batch, tasks, experts)
    top_k = validate_top_k(top_k, experts)
    validate_flag("return_weights", return_weights)
    _validate_same_device(h=h, context=context, mask=mask)
    return scale, top_k


def validate_softmax_mix(
    logits: object, h: object, temperature: object, mask: object, top_k: object, return_weights: object
) -> tuple[float, int | None]:
    """Validate ``softmax_mix`` inputs; returns ``(temperature, top_k)`` as Python numbers."""
    batch, experts, _ = _validate_h(h)
    tasks = _validate_logits(logits, batch, experts)
    temperature = validate_positive_float("temperature", temperature, reciprocal=True)
    _validate_mask(mask, batch, tasks, experts)
    top_k = validate_top_k(top_k, experts)
    validate_flag("return_weights", return_weights)
    _validate_same_device(logits=logits, h=h, mask=mask)
    return temperature, top_k


def _validate_experts_layer(x: object, weight: object, bias: object, activation: object):
    """Validate the experts' last layer; returns ``(B, E, K, D)``."""
    _validate_float_tensor("weight", weight)
    if weight.dim() != 3 or 0 in weight.shape:
        raise ValueError(
            f"weight must be 3-D [E, K, D] (experts, inputs, outputs), non-empty, got {tuple(weight.shape)}"
        )
    experts, in_features, dim = weight.shape
    _validate_experts(experts, "weight")
    _validate_float_tensor("x", x)
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[1] != experts) or x.shape[-1] != in_features:
        raise ValueError(
            f"x must be [B, K] (one input for every expert) or [B, E, K] (one per expert) with E = {experts} "
            f"and K = {in_features} from weight [E, K, D], got shape {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype (one tl.dot of both)")
    if bias is not None:
        _validate_float_tensor("bias", bias)
        if tuple(bias.shape) != (experts, dim):
            raise ValueError(f"bias must be None or [E, D] = {[experts, dim]}, got {list(bias.shape)}")
    validate_activation(activation)
    return x.shape[0], experts, in_features, dim


def fits_one_kernel(num_tasks: int, num_experts: int) -> bool:
    """Whether the ``experts_mix`` kernel takes ``T`` tasks over ``E`` experts: its gate tile holds
    ``next_power_of_2(T) * next_power_of_2(E) <= 512`` (e.g. E = 64 with T <= 8)."""
    return _next_power_of_2(num_tasks) * _next_power_of_2(num_experts) <= MIX_MAX_GATE


def validate_experts_mix(
    x: object,
    weight: object,
    bias: object,
    gate: object,
    context: object,
    logits: object,
    activation: object,
    mask: object,
    top_k: object,
    scale: object,
    temperature: object,
    return_weights: object,
) -> tuple[float, int | None]:
    """Validate ``experts_mix`` inputs; returns ``(score scale, top_k)`` as Python numbers: ``scale``
    (default ``1 / sqrt(D)``) for the attention gate, ``1 / temperature`` for the softmax gate."""
    batch, experts, _, dim = _validate_experts_layer(x, weight, bias, activation)
    source = "x and weight"
    validate_gate(gate)
    if gate == "attention":
        if logits is not None or temperature != 1.0:
            raise ValueError("logits and temperature belong to gate='softmax'; the attention gate takes context, scale")
        if context is None:
            raise ValueError("gate='attention' needs context, the task vectors [T, D] or [B, T, D]")
        tasks = _validate_context(context, batch, dim, source)
        score_scale = dim**-0.5 if scale is None else validate_positive_float("scale", scale)
    else:
        if context is not None or scale is not None:
            raise ValueError("context and scale belong to gate='attention'; the softmax gate takes logits, temperature")
        if logits is None:
            raise ValueError("gate='softmax' needs logits, the gate's scores [B, T, E]")
        tasks = _validate_logits(logits, batch, experts, source)
        score_scale = 1.0 / validate_positive_float("temperature", temperature, reciprocal=True)
    if not fits_one_kernel(tasks, experts):
        raise ValueError(
            f"experts_mix keeps every (task, expert) weight of its rows in registers: it supports "
            f"next_power_of_2(T) * next_power_of_2(E) <= {MIX_MAX_GATE}, got T = {tasks}, E = {experts}"
        )
    _validate_mask(mask, batch, tasks, experts)
    top_k = validate_top_k(top_k, experts)
    validate_flag("return_weights", return_weights)
    _validate_same_device(x=x, weight=weight, bias=bias, context=context, logits=logits, mask=mask)
    return score_scale, top_k
