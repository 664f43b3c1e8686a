"""Clocks and measurement helpers for pytest-benchmark on a GPU (or the CPU smoke run).

pytest-benchmark reads its timer before and after a round of ``iterations`` calls. On CUDA the timer
below records a CUDA event and waits for it, so a round's time is the GPU time between two events
(launches queued back to back, as in a training loop; the host's launch cost shows when it is the
bottleneck, as it is at small B). Event deltas are accumulated in a Python float so precision does not
degrade over a long run (``elapsed_time`` is a float32 of milliseconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

ON_CUDA = torch.cuda.is_available()
_last_event: torch.cuda.Event | None = None
_elapsed_s = 0.0


def device_label() -> str:
    """The device the suite times, as the report names it."""
    return torch.cuda.get_device_name() if ON_CUDA else "cpu (Triton interpreter; timings meaningless)"


def device_clock() -> float:
    """Seconds on the device's clock: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    global _last_event, _elapsed_s
    if not ON_CUDA:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _last_event is not None:
        _elapsed_s += _last_event.elapsed_time(event) / 1e3
    _last_event = event
    return _elapsed_s


def iterations_for(call: Callable[[], object], round_s: float, max_iterations: int = 10_000) -> int:
    """Calls per round so that one round lasts about ``round_s`` (calls ``call`` a few times)."""
    call()
    start = device_clock()
    call()
    per_call = max(device_clock() - start, 1e-7)
    return max(1, min(max_iterations, round(round_s / per_call)))


def peak_memory_bytes(call: Callable[[], object]) -> int | None:
    """Device memory one call allocates above what was allocated before it (None on the CPU)."""
    if not ON_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
