"""Timing one callable against another on a shared machine: interleaved rounds, one ratio per round.

A round times a few calls of A, then as many of B, the order alternating from round to round, so load
from other processes that comes and goes hits both alike. The ratio of the two times of one round is
then a fair comparison even while the machine's speed drifts; the spread of those per-round ratios
(quartiles) shows how much the load still moved it. The clock is the wall clock, or with ``clock="cpu"``
the process's CPU time, which leaves out the time other processes hold the cores (steadier on a loaded
machine; for CPU work only, and it counts every thread's time, so use it with one thread).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Comparison:
    """Seconds per call of A and of B in each round (``a_s[r]`` and ``b_s[r]`` timed back to back)."""

    a_s: tuple[float, ...]
    b_s: tuple[float, ...]

    @property
    def ratios(self) -> list[float]:
        """``A / B`` per round: above 1 when B is the faster."""
        return [a / b for a, b in zip(self.a_s, self.b_s, strict=True)]

    def median_ms(self) -> tuple[float, float]:
        return statistics.median(self.a_s) * 1e3, statistics.median(self.b_s) * 1e3

    def ratio(self) -> tuple[float, float, float]:
        """The median per-round ratio and its quartiles ``(median, q1, q3)``."""
        ratios = self.ratios
        if len(ratios) < 2:
            return ratios[0], ratios[0], ratios[0]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return median, q1, q3


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def calls_per_round(call: Callable[[], object], round_s: float, sync: Callable[[], None]) -> int:
    """How many calls make a round of about ``round_s`` seconds of wall time (times one call after a warm one)."""
    call()
    sync()
    start = time.perf_counter()
    call()
    sync()
    return max(1, round(round_s / max(time.perf_counter() - start, 1e-6)))


def compare(
    a: Callable[[], object],
    b: Callable[[], object],
    *,
    rounds: int,
    round_s: float,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
    clock: str = "wall",
) -> Comparison:
    """Time ``a`` against ``b`` in ``rounds`` interleaved rounds of about ``round_s`` seconds each.

    Both get ``warmup`` untimed calls first and the same number of calls per round (sized on the slower
    one); ``sync`` waits for queued device work before ``clock`` (a key of ``CLOCKS``) is read.
    """
    now = CLOCKS[clock]
    for call in (a, b):
        for _ in range(warmup):
            call()
    steps = min(calls_per_round(a, round_s, sync), calls_per_round(b, round_s, sync))
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            call = (a, b)[which]
            sync()
            start = now()
            for _ in range(steps):
                call()
            sync()
            times[which].append((now() - start) / steps)
    return Comparison(tuple(times[0]), tuple(times[1]))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average, as ``uptime`` prints it ("n/a" where the OS has none)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def machine_line() -> str:
    """torch's version and threads, the cores and the CPU, and the load average now."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores, "
        f"{cpu_name()}, load average {load_average()}"
    )


def ratio_cell(comparison: Comparison) -> str:
    """``median (q1 to q3)`` of the per-round ratios."""
    median, q1, q3 = comparison.ratio()
    return f"{median:.2f} ({q1:.2f} to {q3:.2f})"
