"""Total-Hessian-vector products of the training objective through the adaptation (docs/maths.md §2).

``F(λ) = (1/M) Σ_k w_k ℓ_k(λ) + (l2/2)‖λ‖²``. :class:`TotalHessian` is a linear operator ``v ↦ ∇²F v``:

* ``vmap`` path (TaskBatch): forward-over-reverse, ``jvp(grad(Σ_chunk w_k ℓ_k), λ, v)``: the exact product,
  third-order terms of the inner loss included, one call per chunk of tasks;
* ``loop`` path (any task sequence): reverse-over-reverse double backward per task with ``torch.autograd``.

Damping is not part of the operator: the solvers add ``δ v`` explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from lightning_metaif.influence.checks import check_number
from lightning_metaif.influence.gradients import (
    Vectorize,
    batched_task_loss,
    check_loss,
    task_tensors,
    use_vmap,
)
from lightning_metaif.influence.problem import ParamLayout, Params, check_problem, detached, trainable
from lightning_metaif.influence.tasks import (
    Task,
    TaskBatch,
    Tasks,
    iter_chunks,
    resolve_task_ids,
    select_tasks,
)

Curvature = Literal["exact", "gamma"]


class TotalHessian:
    """The total Hessian ``∇²F(λ)`` of the weighted mean task loss plus an optional L2 term, as an operator.

    Args:
        problem: object with ``task_loss`` (and ``adapt`` / ``outer_loss`` for ``curvature="gamma"``).
        params: meta-parameters at which the Hessian is taken (those requiring grad).
        tasks: the training tasks defining ``F`` (a TaskBatch or a sequence).
        task_weights: ``w_k`` (default ones), aligned with ``tasks``.
        l2: coefficient of ``(l2/2)‖λ‖²`` in ``F``.
        curvature: ``"exact"`` (default) or ``"gamma"``: Ren et al.'s surrogate, the Gauss-Newton-like part
            ``Jᵀ ∇²_θ L_O J`` plus ``Γ·I`` in place of the third-order term (needs ``adapt``/``outer_loss``).
        chunk_size: tasks per vmapped HVP call.

    Example:
        >>> import torch
        >>> class Quadratic:
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return 0.5 * ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> tasks = TaskBatch(torch.zeros(2, 1, 2), torch.zeros(2, 1), torch.ones(2, 1, 2),
        ...                   torch.zeros(2, 1), torch.arange(2))
        >>> H = TotalHessian(Quadratic(), {"w": torch.zeros(2, requires_grad=True)}, tasks, l2=0.5)
        >>> H.matvec(torch.tensor([1.0, 2.0])).tolist()
        [1.5, 3.0]
    """

    def __init__(
        self,
        problem: Any,
        params: Params,
        tasks: Tasks,
        *,
        task_weights: Tensor | Sequence[float] | None = None,
        l2: float = 0.0,
        curvature: Curvature = "exact",
        chunk_size: int = 16,
        vectorize: Vectorize = "auto",
    ) -> None:
        check_problem(problem)
        l2 = check_number(l2, "l2", minimum=0.0)
        if curvature not in ("exact", "gamma"):
            raise ValueError(f"curvature must be 'exact' or 'gamma', got {curvature!r}.")
        if curvature == "gamma" and not (hasattr(problem, "adapt") and hasattr(problem, "outer_loss")):
            raise ValueError(
                "curvature='gamma' needs the problem to expose `adapt(params, task)` and "
                "`outer_loss(adapted, params, task)`; use curvature='exact' (the default) otherwise."
            )
        self.problem = problem
        self.params = trainable(params)
        self.layout = ParamLayout.of(self.params)
        self.tasks = tasks
        self.task_ids = resolve_task_ids(tasks) if isinstance(tasks, TaskBatch) else torch.arange(len(tasks))
        if len(tasks) == 0:
            raise ValueError("The Hessian needs at least one training task.")
        reference = next(iter(self.params.values()))
        if task_weights is None:
            self.task_weights = torch.ones(len(tasks), dtype=reference.dtype, device=reference.device)
        else:
            self.task_weights = torch.as_tensor(task_weights, dtype=reference.dtype, device=reference.device)
            if self.task_weights.shape != (len(tasks),):
                raise ValueError(
                    f"task_weights has shape {tuple(self.task_weights.shape)}, expected ({len(tasks)},): one per task."
                )
        self.l2 = float(l2)
        self.curvature = curvature
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self._vmap = use_vmap(tasks, vectorize)
        self._gamma: float | None = None

    @property
    def dim(self) -> int:
        return self.layout.numel

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def subsample(self, batch_size: int, generator: torch.Generator | None = None) -> TotalHessian:
        """The same operator over a random mini-batch of tasks (an unbiased estimate, for LiSSA)."""
        index = torch.randperm(len(self.tasks), generator=generator)[
            : max(1, min(batch_size, len(self.tasks)))
        ]
        sub = TotalHessian.__new__(TotalHessian)
        sub.__dict__.update(self.__dict__)
        sub.tasks = select_tasks(self.tasks, index)
        sub.task_ids = self.task_ids[index]
        sub.task_weights = self.task_weights[index.to(self.task_weights.device)]
        sub._gamma = None
        return sub

    def matvec(self, vector: Tensor) -> Tensor:
        """``∇²F v`` for a flat vector ``v`` of length :attr:`dim`."""
        if vector.shape != (self.dim,):
            raise ValueError(f"Expected a flat vector of shape ({self.dim},), got {tuple(vector.shape)}.")
        tangent = self.layout.unflatten(vector.to(self.dtype))
        if self.curvature == "gamma":  # Γ is already a mean over tasks
            return self._gauss_newton_matvec(tangent) / len(self.tasks) + (self.gamma + self.l2) * vector
        total = self._vmap_matvec(tangent) if self._vmap else self._loop_matvec(tangent)
        return total / len(self.tasks) + self.l2 * vector

    __call__ = matvec

    def dense(self, chunk: int = 64) -> Tensor:
        """Materialise ``∇²F`` as a ``[p, p]`` matrix (symmetrised); meant for small ``p`` (≲ 5,000)."""
        if self.dim > 20_000:
            raise ValueError(
                f"Refusing to materialise a {self.dim}x{self.dim} Hessian; use solver='cg', 'lissa' or 'arnoldi'."
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        # On the vmap path the products of a chunk of basis vectors are one batched call (about 50x faster
        # than one product at a time on a small MAML problem); the loop path goes column by column.
        products = vmap(self.matvec) if self._vmap and self.curvature == "exact" else _stack_of(self.matvec)
        matrix = torch.cat([products(eye[i : i + chunk]) for i in range(0, self.dim, chunk)]).T
        return 0.5 * (matrix + matrix.T)

    def _vmap_matvec(self, tangent: Params) -> Tensor:
        loss_fn = vmap(batched_task_loss(self.problem), in_dims=(None, 0, 0, 0, 0))
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for start, chunk in iter_chunks(self.tasks, self.chunk_size):
            weights = self.task_weights[start : start + len(chunk)]

            def weighted_sum(params: Params, chunk: TaskBatch = chunk, weights: Tensor = weights) -> Tensor:
                return (weights * loss_fn(params, *task_tensors(chunk))).sum()

            _, product = jvp(grad(weighted_sum), (detached(self.params),), (tangent,))
            total = total + self.layout.flatten(product).detach()
        return total

    def _loop_matvec(self, tangent: Params) -> Tensor:
        leaves = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for position, task in enumerate(self.tasks):
            loss = check_loss(self.problem.task_loss(leaves, task), int(self.task_ids[position]))
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
            dot = sum((g * tangent[k]).sum() for (k, g) in zip(leaves, grads) if g is not None)
            if not isinstance(dot, Tensor) or not dot.requires_grad:
                continue
            product = torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
            product = {
                k: torch.zeros_like(v) if p is None else p for (k, v), p in zip(leaves.items(), product)
            }
            total = total + self.task_weights[position] * self.layout.flatten(product).detach()
        return total

    # --- Ren et al.'s Γ surrogate -------------------------------------------------------------------------

    @property
    def gamma(self) -> float:
        """``Γ``: weighted mean over tasks of ``Σ_i ‖∂_θ L_O^i‖₁`` (``L_O^i``: query sample i's share of ``L_O``)."""
        if self._gamma is None:
            values = []
            for position, task in enumerate(self._single_tasks()):
                adapted = {k: v.detach() for k, v in self.problem.adapt(detached(self.params), task).items()}

                def outer(theta: Params, weights: Tensor, task: Any = task) -> Tensor:
                    return self.problem.outer_loss(theta, self.params, task, query_weights=weights)

                num_query = _num_query(task)
                weights = torch.ones(num_query, dtype=self.dtype, device=self.device)
                per_sample = torch.func.jacrev(grad(outer), argnums=1)(adapted, weights)
                l1 = sum(v.reshape(-1, num_query).abs().sum() for v in per_sample.values())
                values.append(self.task_weights[position] * l1)
            self._gamma = float(torch.stack(values).sum() / len(values))
        return self._gamma

    def _single_tasks(self):
        return list(self.tasks)

    def _gauss_newton_matvec(self, tangent: Params) -> Tensor:
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for position, task in enumerate(self._single_tasks()):

            def adapt(params: Params, task: Any = task) -> Params:
                return self.problem.adapt(params, task)

            adapted, adapted_tangent = jvp(adapt, (detached(self.params),), (tangent,))

            def outer_grad(theta: Params, task: Any = task) -> Params:
                return grad(lambda t: self.problem.outer_loss(t, self.params, task))(theta)

            _, curvature_tangent = jvp(outer_grad, (adapted,), (adapted_tangent,))
            _, pullback = torch.func.vjp(adapt, detached(self.params))
            (product,) = pullback(curvature_tangent)
            total = total + self.task_weights[position] * self.layout.flatten(product).detach()
        return total


def _stack_of(matvec: Any) -> Any:
    return lambda vectors: torch.stack([matvec(v) for v in vectors])


def _num_query(task: Any) -> int:
    if isinstance(task, Task):
        return task.num_query
    return int(task.query_x.shape[0])
