"""Train S models of one structure at once: their parameters stacked on a leading axis, the forward vmapped.

``train_stacked`` trains every member as :func:`fused_gate.apps.training.train` would train it alone:
the same Adam update (each member with its own learning rate), the same batches (drawn from the
member's own seeded generator), the same evaluations and early stopping, the best weights kept. It
gets there in one vmapped forward and backward per step for all members (``torch.func.functional_call``
on the model itself, so each member is exactly that model), which on a CPU costs far less than S
separate steps: these small models are dominated by the per-op overhead. Under ``torch.func.vmap`` the
fused gate ops run :mod:`fused_gate.reference`. A member that stops leaves the stack, so the others
do not pay for it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from fused_gate.apps.training import History, mse_and_entropy, predict_with_gate_weights

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which train() uses


class _WithGateWeights(nn.Module):
    """``forward(x)`` is :func:`predict_with_gate_weights` of the wrapped model, for ``functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return predict_with_gate_weights(self.model, x)


class _Stack:
    """The active members' stacked parameters and buffers ``{name: [S, ...]}``, Adam moments, learning rates,
    data and batch orders."""

    def __init__(self, models: Sequence[nn.Module], lrs: Tensor, data: tuple[Tensor, ...], seeds: Sequence[int]):
        params, self.buffers = stack_module_state(list(models))
        self.params = {name: p.detach().requires_grad_() for name, p in params.items()}
        self.exp_avg = [torch.zeros_like(p) for p in self.params.values()]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params.values()]
        self.lrs, self.data = lrs, data
        self.members = list(range(len(models)))
        self.orders = [torch.Generator().manual_seed(seed) for seed in seeds]

    def keep(self, rows: list[int]) -> None:
        """Keep only the members at ``rows`` (positions in the current stack)."""
        index = torch.tensor(rows, device=self.lrs.device)
        self.params = {name: p.detach()[index].requires_grad_() for name, p in self.params.items()}
        self.buffers = {name: b[index] for name, b in self.buffers.items()}
        self.exp_avg = [m[index] for m in self.exp_avg]
        self.exp_avg_sq = [v[index] for v in self.exp_avg_sq]
        self.lrs, self.data = self.lrs[index], tuple(t[index] for t in self.data)
        self.members = [self.members[r] for r in rows]
        self.orders = [self.orders[r] for r in rows]

    @torch.no_grad()
    def adam_step(self, step: int) -> None:
        """``torch.optim.Adam``'s update with each member's own learning rate (``lr [S]`` broadcast)."""
        params = list(self.params.values())
        grads = [p.grad for p in params]
        torch._foreach_lerp_(self.exp_avg, grads, 1 - BETAS[0])
        torch._foreach_mul_(self.exp_avg_sq, BETAS[1])
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - BETAS[1])
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - BETAS[1] ** step))
        torch._foreach_add_(denom, EPS)
        step_size = self.lrs / (1 - BETAS[0] ** step)
        for p, m, d in zip(params, self.exp_avg, denom, strict=True):
            p.addcdiv_(m * step_size.view(-1, *[1] * (m.dim() - 1)), d, value=-1.0)
            p.grad = None


def train_stacked(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    x_eval: Tensor,
    y_eval: Tensor,
    *,
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    batch_size: int,
    eval_every: int,
    patience: int,
) -> list[History]:
    """Train ``models[s]`` on ``(x[s], y[s])`` with learning rate ``lrs[s]`` and batch order ``seeds[s]``, all at once.

    Args:
        models: S models of one structure (the same parameter names and shapes), e.g. ``fg.MMoE`` built
            with the same arguments and different seeds, with towers and without BatchNorm or dropout
            (their batch statistics and random masks would not be per member); each gets its best
            evaluation's weights back.
        x, y: the training rows ``[S, N, in]`` and labels ``[S, N, T]``, one data set per member.
        x_eval, y_eval: the evaluation rows ``[S, M, in]`` and labels ``[S, M, T]``.
        lrs: Adam's learning rate per member.
        seeds: seed of each member's batch order (``train``'s ``seed``).
        steps, batch_size, eval_every, patience: as in :func:`fused_gate.apps.training.train`; a member stops
            after ``patience`` evaluations without improvement or at its first MSE that is not finite.

    Returns:
        One :class:`History` per member; its ``seconds`` is the stack's wall time until that member stopped.
    """
    if not len(models) == len(lrs) == len(seeds) == x.shape[0] == y.shape[0] == x_eval.shape[0] == y_eval.shape[0]:
        raise ValueError(
            f"one model, lr, seed and data set per member: {len(models)} models, {len(lrs)} lrs, {len(seeds)} seeds, "
            f"data for {[t.shape[0] for t in (x, y, x_eval, y_eval)]}"
        )
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules()):
        raise ValueError("train_stacked takes models without BatchNorm: its batch statistics would mix the members")
    base = copy.deepcopy(models[0]).to("meta")
    with_weights = _WithGateWeights(base)

    def loss(state: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return nn.functional.mse_loss(functional_call(base, state, (xb,)), yb)

    def predict(state: dict[str, Tensor], xe: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(with_weights, {f"model.{k}": v for k, v in state.items()}, (xe,))

    stack = _Stack(models, torch.tensor(lrs, dtype=x.dtype, device=x.device), (x, y, x_eval, y_eval), seeds)
    histories = [History() for _ in models]
    best: list[dict[str, Tensor]] = [{} for _ in models]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x_all, y_all, x_val, y_val = stack.data
        idx = torch.stack([torch.randint(0, x.shape[1], (batch_size,), generator=g) for g in stack.orders])
        rows = torch.arange(len(stack.members))[:, None]
        idx = idx.to(x.device)
        vmap(loss)(stack.params | stack.buffers, x_all[rows, idx], y_all[rows, idx]).sum().backward()
        stack.adam_step(step)
        if step % eval_every and step != steps:
            continue
        with torch.no_grad():
            mse, entropy = mse_and_entropy(*vmap(predict)(stack.params | stack.buffers, x_val), y_val)
        staying = []
        for row, (member, m, e) in enumerate(zip(stack.members, mse.tolist(), entropy.tolist(), strict=True)):
            history = histories[member]
            if history.record(step, m, e) or not best[member]:  # a first MSE that is NaN: kept as train() keeps it
                best[member] = {name: p[row].detach().clone() for name, p in stack.params.items()}
            history.seconds = time.perf_counter() - start
            if not history.stalled(patience):
                staying.append(row)
        if not staying:
            break
        if len(staying) < len(stack.members):
            stack.keep(staying)
    with torch.no_grad():
        for model, weights in zip(models, best, strict=True):
            for name, value in weights.items():
                model.get_parameter(name).copy_(value)
    return histories
