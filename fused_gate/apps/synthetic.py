"""The synthetic two-task regression data of the MMoE paper (Ma et al., KDD 2018, section 3.2).

Task similarity is controlled by ``correlation`` = the cosine of the tasks' weight vectors::

    u1, u2 orthonormal in R^d;   w1 = c u1;   w2 = c (p u1 + sqrt(1 - p^2) u2)
    x ~ N(0, I_d);   y_k = w_k.x + sum_{i=1..m} sin(alpha_i w_k.x + beta_i) + eps_k,   eps_k ~ N(0, 0.01^2)

with the public generator's choices ``c = 1``, ``m = 10``, ``alpha_i = i``, ``beta_i = (i - 1)^2``. The
sine terms make the label correlation lower than ``p``; ``p`` is what is reported.

More than two tasks take a ``[T, T]`` matrix ``R`` of cosines instead of ``p``: ``W = V sqrt(L) U^T``
with ``R = V L V^T`` and ``U`` a ``[d, T]`` orthonormal basis, so that ``W W^T = R``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def task_weights(dim: int, correlation: float, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    """``[2, dim]``: two weight vectors of norm ``scale`` whose cosine is ``correlation``."""
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    u, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=torch.float64))
    u1, u2 = u[:, 0], u[:, 1]
    w2 = correlation * u1 + (1.0 - correlation**2) ** 0.5 * u2
    return scale * torch.stack([u1, w2])


def cosine_task_weights(dim: int, cosines: Tensor, generator: torch.Generator) -> Tensor:
    """``[T, dim]``: T unit weight vectors whose pairwise cosines are the ``[T, T]`` matrix ``cosines``."""
    cosines = torch.as_tensor(cosines, dtype=torch.float64)
    tasks = cosines.shape[0] if cosines.dim() == 2 else 0
    if cosines.shape != (tasks, tasks) or tasks == 0 or tasks > dim:
        raise ValueError(f"cosines must be a square [T, T] matrix with 1 <= T <= dim={dim}, got {tuple(cosines.shape)}")
    if not torch.equal(cosines, cosines.T) or not torch.allclose(
        cosines.diagonal(), torch.ones(tasks, dtype=torch.float64)
    ):
        raise ValueError("cosines must be symmetric with ones on the diagonal")
    eigenvalues, eigenvectors = torch.linalg.eigh(cosines)
    if eigenvalues.min() < -1e-9:
        raise ValueError(f"cosines must be positive semi-definite, smallest eigenvalue {eigenvalues.min().item():.3g}")
    u, _ = torch.linalg.qr(torch.randn(dim, tasks, generator=generator, dtype=torch.float64))
    return eigenvectors * eigenvalues.clamp(min=0).sqrt() @ u.T


def make_tasks(
    num_samples: int,
    dim: int,
    correlation: float | Tensor,
    generator: torch.Generator,
    *,
    num_sines: int = 10,
    noise: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """``(x [N, dim], y [N, T])`` in float32; the tasks share ``x`` and differ by their weights.

    ``correlation`` is the cosine ``p`` of two tasks' weights (T = 2), or a ``[T, T]`` matrix of cosines.
    """
    if isinstance(correlation, Tensor):
        weights = cosine_task_weights(dim, correlation, generator)
    else:
        weights = task_weights(dim, correlation, generator)
    x = torch.randn(num_samples, dim, generator=generator, dtype=torch.float64)
    z = x @ weights.T  # [N, T]
    i = torch.arange(1, num_sines + 1, dtype=torch.float64)
    alpha, beta = i, (i - 1) ** 2
    y = z + torch.sin(alpha * z[..., None] + beta).sum(-1)
    y = y + noise * torch.randn(y.shape, generator=generator, dtype=torch.float64)
    return x.float(), y.float()
