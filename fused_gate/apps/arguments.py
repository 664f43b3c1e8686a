"""Argument types of the command-line tools: a bad value stops ``argparse`` with exit code 2 and a message
naming the option, before any work starts.

Each factory returns a function for ``add_argument(type=...)``; ``argparse`` turns its
``ArgumentTypeError`` into ``prog: error: argument --name: <message>``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An int in ``low..high`` (no upper bound when ``high`` is None)."""
    allowed = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an int {allowed}, got {value}")
        return value

    return parse


def real(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    allowed = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {allowed}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number in {allowed}, got {text}")
        return value

    return parse


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A non-empty comma-separated list of some of ``choices``, e.g. ``a,b``."""

    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(choices)}, got {text!r}")
        if unknown := [v for v in values if v not in choices]:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; expected some of {','.join(choices)}")
        return values

    return parse


def integer_list(low: int, what: str = "ints") -> Callable[[str], tuple[int, ...]]:
    """A non-empty comma-separated list of ints, each ``>= low``, e.g. ``256,1024``; ``what`` names them."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, each an int >= {low}, got {text!r}")
        return values

    return parse


def widths(text: str) -> tuple[int, ...]:
    """Comma-separated layer widths, each an int >= 1, e.g. ``64,32``."""
    return integer_list(1, "widths")(text)


def device(text: str) -> str:
    """A torch device the kernels run on: ``cuda`` (when a GPU is present) or ``cpu``, with an optional index."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu or cuda, got {text!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected a cpu or cuda device, got {text!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees no CUDA GPU here")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return text
