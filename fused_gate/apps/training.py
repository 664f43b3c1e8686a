"""Training loop shared by the demo and the gate study: MMoE regression with Adam and per-task MSE.

``train`` draws mini-batches from its own seeded generator, so two models trained with the same seed
see the same batches. Every ``eval_every`` steps it records, on the evaluation split, each task's MSE
and the entropy of each task's gate weights; with ``patience`` it stops early on the mean MSE and
restores the best weights.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import fused_gate as fg


class Progress:
    """A one-line progress bar on stderr (no dependency); ``total`` may grow while it runs."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label:<28} {elapsed:5.0f}s elapsed, ~{eta:4.0f}s left")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def print(self, line: str) -> None:
        """Print ``line`` on stdout on a line of its own; the next ``step`` draws the bar again below it."""
        if 0 < self.done < self.total:
            sys.stderr.write("\r\033[K" if sys.stderr.isatty() else "\n")
            sys.stderr.flush()
        print(line, flush=True)


@dataclass
class History:
    """What ``train`` recorded at each evaluation: ``mse[i][t]`` and ``entropy[i][t]`` at ``steps[i]``.

    ``entropy`` is the gate weights' entropy ``-sum_e p_e log p_e`` averaged over the evaluation rows and
    divided by ``log E``: 1 is a uniform gate, 0 a gate that puts all weight on one expert.
    ``best`` indexes the evaluation with the lowest mean MSE over tasks; ``seconds`` is the loop's wall time.
    """

    steps: list[int] = field(default_factory=list)
    mse: list[list[float]] = field(default_factory=list)
    entropy: list[list[float]] = field(default_factory=list)
    best: int = 0
    seconds: float = 0.0

    @property
    def best_step(self) -> int:
        return self.steps[self.best]

    @property
    def best_mse(self) -> list[float]:
        return self.mse[self.best]

    def record(self, step: int, mse: list[float], entropy: list[float]) -> bool:
        """Append one evaluation; True when its mean MSE is the lowest so far (``best`` then points at it)."""
        lowest = statistics.fmean(self.best_mse) if self.steps else math.inf
        improved = statistics.fmean(mse) < (lowest if lowest < math.inf else math.inf)  # a NaN best counts as inf
        self.steps.append(step)
        self.mse.append(mse)
        self.entropy.append(entropy)
        if improved:
            self.best = len(self.steps) - 1
        return improved

    def stalled(self, patience: int) -> bool:
        """Early stopping: ``patience`` evaluations in a row without a new best, or a mean MSE that is not finite."""
        return len(self.steps) - 1 - self.best >= patience or not math.isfinite(statistics.fmean(self.mse[-1]))


def predict_with_gate_weights(model: fg.MMoE, x: Tensor) -> tuple[Tensor, Tensor]:
    """An MMoE's output ``[B, T]`` (towers required) and its gate weights ``p [B, T, E]``."""
    mixed, weights = model.gate.mix(x, model.experts(x), return_weights=True)
    return model.towers(mixed), weights


def mse_and_entropy(prediction: Tensor, weights: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task MSE ``[..., T]`` of ``prediction [..., N, T]`` against ``y`` and the gate weights' (``[..., N, T, E]``)
    normalised entropy ``[..., T]`` (see ``History``), each a mean over the N rows."""
    mse = ((prediction - y) ** 2).mean(-2)
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean(-2)
    return mse, entropy / math.log(max(weights.shape[-1], 2))


@torch.no_grad()
def evaluate(model: fg.MMoE, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
    """Per-task MSE on ``(x [N, in], y [N, T])`` and per-task normalised gate entropy (see ``History``)."""
    mse, entropy = mse_and_entropy(*predict_with_gate_weights(model, x), y)
    return mse.tolist(), entropy.tolist()


def train(
    model: fg.MMoE,
    x: Tensor,
    y: Tensor,
    x_eval: Tensor,
    y_eval: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    eval_every: int,
    seed: int,
    patience: int | None = None,
) -> History:
    """Adam on the mean over tasks of the MSE, batches of ``batch_size`` rows of ``(x, y)`` drawn with ``seed``.

    Evaluates on ``(x_eval, y_eval)`` every ``eval_every`` steps and after the last one. With ``patience``,
    stops once ``patience`` evaluations in a row have not improved the best mean MSE, or at the first
    evaluation whose MSE is not finite (diverged), and loads the best evaluation's weights back into ``model``.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    history = History()
    best_state = None
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=order).to(x.device)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every and step != steps:
            continue
        if history.record(step, *evaluate(model, x_eval, y_eval)) and patience is not None:
            best_state = copy.deepcopy(model.state_dict())
        if patience is not None and history.stalled(patience):
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    history.seconds = time.perf_counter() - start
    return history
