"""Small bilevel problems the engine tests share: exact, float64-friendly, with per-sample weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_metaif.influence.tasks import TaskBatch


def weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return losses.mean()
    return (weights * losses).sum() / losses.shape[0]


class LinearMAML:
    """Unrolled MAML on a linear (or small MLP) model: ``steps`` of inner GD, then the query loss.

    ``kind="regression"``: squared error on a linear map; ``kind="classification"``: softmax regression.
    """

    def __init__(self, inner_lr: float = 0.1, steps: int = 1, kind: str = "regression", hidden: int = 0):
        self.inner_lr, self.steps, self.kind, self.hidden = inner_lr, steps, kind, hidden

    def forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self.hidden:
            x = torch.tanh(x @ params["w1"] + params["b1"])
        return x @ params["w"] + params["b"]

    def sample_losses(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = self.forward(params, x)
        if self.kind == "regression":
            return ((out - y) ** 2).sum(-1) if out.dim() > 1 and y.dim() > 1 else ((out.squeeze(-1) - y) ** 2)
        return F.cross_entropy(out, y, reduction="none")

    def adapt(self, params, task, support_weights=None):
        def inner_loss(theta):
            return weighted_mean(self.sample_losses(theta, task.support_x, task.support_y), support_weights)

        theta = dict(params)
        for _ in range(self.steps):
            grads = torch.func.grad(inner_loss)(theta)
            theta = {k: theta[k] - self.inner_lr * grads[k] for k in theta}
        return theta

    def outer_loss(self, adapted, params, task, query_weights=None):
        return weighted_mean(self.sample_losses(adapted, task.query_x, task.query_y), query_weights)

    def task_loss(self, params, task, support_weights=None, query_weights=None):
        return self.outer_loss(self.adapt(params, task, support_weights), params, task, query_weights)

    def init_params(self, in_dim: int, out_dim: int, seed: int = 0, dtype=torch.float64) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        params = {}
        if self.hidden:
            params["w1"] = torch.randn(in_dim, self.hidden, generator=g, dtype=dtype) / in_dim**0.5
            params["b1"] = torch.zeros(self.hidden, dtype=dtype)
            in_dim = self.hidden
        params["w"] = torch.randn(in_dim, out_dim, generator=g, dtype=dtype) * 0.1
        params["b"] = torch.zeros(out_dim, dtype=dtype)
        return {k: v.requires_grad_(True) for k, v in params.items()}


def regression_tasks(
    num_tasks: int,
    in_dim: int = 3,
    support: int = 6,
    query: int = 8,
    seed: int = 0,
    noise: float = 0.1,
    dtype=torch.float64,
) -> TaskBatch:
    """Linear-regression tasks around a shared weight vector (so meta-learning has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(in_dim, generator=g, dtype=dtype)
    w = shared + 0.5 * torch.randn(num_tasks, in_dim, generator=g, dtype=dtype)
    sx = torch.randn(num_tasks, support, in_dim, generator=g, dtype=dtype)
    qx = torch.randn(num_tasks, query, in_dim, generator=g, dtype=dtype)
    sy = torch.einsum("tsd,td->ts", sx, w) + noise * torch.randn(num_tasks, support, generator=g, dtype=dtype)
    qy = torch.einsum("tsd,td->ts", qx, w) + noise * torch.randn(num_tasks, query, generator=g, dtype=dtype)
    return TaskBatch(sx, sy[..., None], qx, qy[..., None], torch.arange(num_tasks) + 100 * seed)
