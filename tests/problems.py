"""Small bilevel problems the engine tests share: exact, float64-friendly, with per-sample weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_metaif.influence.problem import weighted_mean
from lightning_metaif.influence.tasks import TaskBatch


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
        return self.output_sample_losses(self.forward(params, x), y)

    def output_sample_losses(self, out: Tensor, y: Tensor) -> Tensor:
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

    def query_outputs(self, params, task, support_weights=None):
        return self.forward(self.adapt(params, task, support_weights), task.query_x)

    def output_loss(self, outputs, task, query_weights=None):
        return weighted_mean(self.output_sample_losses(outputs, task.query_y), query_weights)

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


def classification_tasks(
    num_tasks: int,
    ways: int = 3,
    in_dim: int = 4,
    shots: int = 2,
    queries: int = 4,
    seed: int = 0,
    spread: float = 0.6,
    noise: float = 0.8,
    corrupt: tuple[int, ...] = (),
    corrupt_mode: str = "shuffle",
    id_offset: int = 0,
    prototype_seed: int = 0,
    dtype=torch.float64,
) -> TaskBatch:
    """Gaussian-blob few-shot classification tasks around shared class prototypes (labels 0..ways-1).

    The shared prototypes depend on ``prototype_seed`` only, so pools drawn with different ``seed`` s come from
    the same task distribution. Each task perturbs the shared prototypes by ``spread``; samples add ``noise``. Tasks at the positions in
    ``corrupt`` get randomly permuted query labels (``corrupt_mode="shuffle"``) or every query label shifted to
    the next class (``"shift"``, systematically wrong): harmful tasks, for detection and sign checks.
    """
    shared = 1.5 * torch.randn(
        ways, in_dim, generator=torch.Generator().manual_seed(prototype_seed), dtype=dtype
    )
    g = torch.Generator().manual_seed(seed)
    protos = shared + spread * torch.randn(num_tasks, ways, in_dim, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).expand(num_tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(queries).expand(num_tasks, -1).clone()
    sx = protos.gather(1, sy[..., None].expand(-1, -1, in_dim)) + noise * torch.randn(
        num_tasks, ways * shots, in_dim, generator=g, dtype=dtype
    )
    qx = protos.gather(1, qy[..., None].expand(-1, -1, in_dim)) + noise * torch.randn(
        num_tasks, ways * queries, in_dim, generator=g, dtype=dtype
    )
    for position in corrupt:
        if corrupt_mode == "shift":
            qy[position] = (qy[position] + 1) % ways
        else:
            qy[position] = qy[position][torch.randperm(ways * queries, generator=g)]
    return TaskBatch(sx, sy, qx, qy, torch.arange(num_tasks) + id_offset)


class ProximalMAML(LinearMAML):
    """iMAML-style proximal adaptation approximated by many unrolled steps.

    ``θ_k(λ) ≈ argmin_θ L_I(θ; S_k) + (γ/2)‖θ − λ‖²``, reached by ``steps`` of gradient descent from ``λ``.
    """

    def __init__(
        self, inner_lr: float = 0.2, steps: int = 30, gamma: float = 1.0, kind="classification", hidden=0
    ):
        super().__init__(inner_lr=inner_lr, steps=steps, kind=kind, hidden=hidden)
        self.gamma = gamma

    def adapt(self, params, task, support_weights=None):
        def inner_loss(theta):
            data = weighted_mean(self.sample_losses(theta, task.support_x, task.support_y), support_weights)
            prox = sum(((theta[k] - params[k]) ** 2).sum() for k in theta)
            return data + 0.5 * self.gamma * prox

        theta = dict(params)
        for _ in range(self.steps):
            grads = torch.func.grad(inner_loss)(theta)
            theta = {k: theta[k] - self.inner_lr * grads[k] for k in theta}
        return theta
