"""The Gauss–Newton total curvature ``G = (1/M) Σ_k w_k J_kᵀ H_ℓ,k J_k + l2·I`` as a linear operator.

``J_k`` is the Jacobian of the *adapted* network's query outputs with respect to the meta-parameters ``λ``
(through the inner loop), ``H_ℓ,k`` the Hessian of the query loss in those outputs. For cross-entropy and
squared error ``H_ℓ`` is positive semi-definite, so ``G`` is too, wherever ``λ`` is (the exact total Hessian is
indefinite away from a regularised optimum). ``G`` drops from the exact Hessian only the term that multiplies
the loss's output gradient by the outputs' second derivative, which is small where the model fits its query
sets.

One product ``G v`` = one forward-mode JVP of the outputs through the adaptation (``J v``), a product with
the small ``H_ℓ`` in output space, and one VJP (``Jᵀ u``):

* ``vmap`` path (TaskBatch): a chunk of tasks per call, the chunk's weighted sum taken by the VJP itself;
* ``loop`` path (any task sequence, e.g. ``higher``): ``torch.autograd`` per task (``J v`` by the
  double-backward trick).

The problem must expose ``query_outputs(params, task, support_weights=None)`` (the adapted network's outputs
on the query inputs) and ``output_loss(outputs, task, query_weights=None)`` (the query loss from those
outputs), with ``output_loss(query_outputs(λ, task), task) == task_loss(λ, task)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from lightning_metaif.influence.gradients import Vectorize, task_tensors, use_vmap
from lightning_metaif.influence.operators import TaskSetOperator
from lightning_metaif.influence.problem import Params, check_problem, detached
from lightning_metaif.influence.tasks import Task, Tasks, iter_chunks

GAUSS_NEWTON_METHODS = ("query_outputs", "output_loss")


def check_gauss_newton_problem(problem: Any) -> None:
    """Raise a ``ValueError`` naming the methods the Gauss–Newton curvature needs and ``problem`` lacks.

    Example:
        >>> class OnlyLoss:
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None): ...
        >>> check_gauss_newton_problem(OnlyLoss())
        Traceback (most recent call last):
        ...
        ValueError: curvature='gauss_newton' needs `query_outputs(params, task, support_weights=None)` and ...
    """
    check_problem(problem)
    missing = [name for name in GAUSS_NEWTON_METHODS if not callable(getattr(problem, name, None))]
    if missing:
        raise ValueError(
            "curvature='gauss_newton' needs `query_outputs(params, task, support_weights=None)` and "
            "`output_loss(outputs, task, query_weights=None)` on the problem (the adapted network's query "
            f"outputs and the query loss from them); {type(problem).__name__} lacks "
            f"{', '.join('`' + m + '`' for m in missing)}. Implement them (the `MAML` module and `HigherProblem` "
            "have them), or pass curvature='exact'."
        )


def has_gauss_newton(problem: Any) -> bool:
    """Whether ``problem`` exposes what the Gauss–Newton curvature needs."""
    return all(callable(getattr(problem, name, None)) for name in GAUSS_NEWTON_METHODS)


class GaussNewton(TaskSetOperator):
    """The Gauss–Newton total curvature of ``F(λ) = (1/M) Σ_k w_k ℓ_k(λ) + (l2/2)‖λ‖²`` as an operator.

    Same interface as :class:`~lightning_metaif.influence.hessian.TotalHessian` (``dim``, ``matvec``,
    ``subsample``, ``dense``); PSD, so CG on ``G + δI`` never meets negative curvature.

    Args:
        problem: object with ``task_loss``, ``query_outputs`` and ``output_loss``.
        params: meta-parameters at which ``G`` is taken (those requiring grad).
        tasks: the training tasks (a TaskBatch is vmapped in chunks; a sequence is looped).
        task_weights: ``w_k`` (default ones).
        l2: coefficient of ``(l2/2)‖λ‖²`` in ``F`` (its exact curvature ``l2·I`` is added).
        chunk_size: tasks per vmapped call.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Linear:  # no adaptation, squared error: G = mean_k x_kᵀ x_k / Q · 2
        ...     def query_outputs(self, params, task, support_weights=None):
        ...         return task.query_x @ params["w"]
        ...     def output_loss(self, outputs, task, query_weights=None):
        ...         return ((outputs - task.query_y) ** 2).mean()
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return self.output_loss(self.query_outputs(params, task), task)
        >>> tasks = TaskBatch(torch.zeros(1, 1, 2), torch.zeros(1, 1), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]),
        ...                   torch.zeros(1, 2), torch.arange(1))
        >>> G = GaussNewton(Linear(), {"w": torch.zeros(2, requires_grad=True)}, tasks)
        >>> G.dense().tolist()
        [[1.0, 0.0], [0.0, 4.0]]
    """

    def __init__(
        self,
        problem: Any,
        params: Params,
        tasks: Tasks,
        *,
        task_weights: Tensor | Sequence[float] | None = None,
        l2: float = 0.0,
        chunk_size: int = 16,
        vectorize: Vectorize = "auto",
    ) -> None:
        check_gauss_newton_problem(problem)
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}.")
        self.problem = problem
        self._set_tasks(params, tasks, task_weights, "Gauss–Newton curvature")
        self.l2 = float(l2)
        self.curvature = "gauss_newton"
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self._vmap = use_vmap(tasks, vectorize)

    def matvec(self, vector: Tensor) -> Tensor:
        """``G v`` for a flat vector ``v`` of length :attr:`dim`."""
        if vector.shape != (self.dim,):
            raise ValueError(f"Expected a flat vector of shape ({self.dim},), got {tuple(vector.shape)}.")
        tangent = self.layout.unflatten(vector.to(self.dtype))
        total = self._vmap_matvec(tangent) if self._vmap else self._loop_matvec(tangent)
        return total / len(self.tasks) + self.l2 * vector

    __call__ = matvec

    def dense(self, chunk: int = 64) -> Tensor:
        """Materialise ``G`` as a ``[p, p]`` matrix (symmetrised); meant for small ``p`` (≲ 5,000)."""
        if self.dim > 20_000:
            raise ValueError(
                f"Refusing to materialise a {self.dim}x{self.dim} matrix; use solver='cg', 'lissa' or 'arnoldi'."
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        products = vmap(self.matvec) if self._vmap else (lambda vs: torch.stack([self.matvec(v) for v in vs]))
        matrix = torch.cat([products(eye[i : i + chunk]) for i in range(0, self.dim, chunk)]).T
        return 0.5 * (matrix + matrix.T)

    def _vmap_matvec(self, tangent: Params) -> Tensor:
        problem = self.problem

        def outputs_of(params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return problem.query_outputs(params, Task(sx, sy, qx, qy))

        def loss_of(outputs: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return problem.output_loss(outputs, Task(sx, sy, qx, qy))

        def output_hvp(outputs: Tensor, direction: Tensor, *task: Tensor) -> Tensor:
            return jvp(lambda o: grad(loss_of)(o, *task), (outputs,), (direction,))[1]

        batched_outputs = vmap(outputs_of, in_dims=(None, 0, 0, 0, 0))
        batched_hvp = vmap(output_hvp)
        base = detached(self.params)
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for start, chunk in iter_chunks(self.tasks, self.chunk_size):
            tensors = task_tensors(chunk)
            weights = self.task_weights[start : start + len(chunk)]

            def chunk_outputs(params: Params, tensors: tuple = tensors) -> Tensor:
                return batched_outputs(params, *tensors)

            outputs, pullback = vjp(chunk_outputs, base)
            _, directional = jvp(chunk_outputs, (base,), (tangent,))
            curved = batched_hvp(outputs, directional, *tensors)
            curved = curved * weights.reshape((-1,) + (1,) * (curved.dim() - 1)).to(curved)
            (product,) = pullback(curved)
            total = total + self.layout.flatten(product).detach()
        return total

    def _loop_matvec(self, tangent: Params) -> Tensor:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        names = list(leaves)
        tangent_list = [tangent[k] for k in names]
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for position, task in enumerate(self.tasks):
            outputs = self.problem.query_outputs(leaves, task)
            # J v by the double-backward trick: d/du ⟨Jᵀu, v⟩ = J v.
            dummy = torch.zeros_like(outputs, requires_grad=True)
            pulled = torch.autograd.grad(
                outputs, list(leaves.values()), grad_outputs=dummy, create_graph=True, allow_unused=True
            )
            dot = sum((p * t).sum() for p, t in zip(pulled, tangent_list) if p is not None)
            if not isinstance(dot, Tensor) or not dot.requires_grad:
                continue
            (directional,) = torch.autograd.grad(dot, dummy, retain_graph=True)
            free = outputs.detach().requires_grad_(True)
            loss_grad = torch.autograd.grad(self.problem.output_loss(free, task), free, create_graph=True)[0]
            (curved,) = torch.autograd.grad(loss_grad, free, grad_outputs=directional)
            product = torch.autograd.grad(
                outputs, list(leaves.values()), grad_outputs=curved.detach(), allow_unused=True
            )
            product = {k: torch.zeros_like(leaves[k]) if p is None else p for k, p in zip(names, product)}
            total = total + self.task_weights[position] * self.layout.flatten(product).detach()
        return total


__all__ = ["GAUSS_NEWTON_METHODS", "GaussNewton", "check_gauss_newton_problem", "has_gauss_newton"]
