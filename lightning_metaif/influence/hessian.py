"""Total-Hessian-vector products of the training objective through the adaptation (docs/maths.md §2).

``F(λ) = (1/M) Σ_k w_k ℓ_k(λ) + (l2/2)‖λ‖²``. :class:`TotalHessian` is a linear operator ``v ↦ ∇²F v``:

Products are exact (third-order terms of the inner loss included) and reverse-over-reverse: for each chunk of
tasks the gradient ``G(λ) = ∇ Σ_chunk w_k ℓ_k`` is built once with ``create_graph=True`` and *kept*; every
product is then one backward of ``G·v`` through that graph (one autograd call per chunk and product, instead
of re-running the forward, the inner gradient and the double backward each time), and a block of vectors
``V [n, p]`` is one batched backward (``is_grads_batched``), which builds dense Hessians and serves block
solves. The chunk's forward is either one ``vmap`` over a :class:`TaskBatch` (or an equal-shape list of
:class:`Task` objects) or a loop over the tasks; with ``vectorize="auto"`` both are timed on the first chunk
and the faster is kept (:mod:`~lightning_metaif.influence.paths`).

Memory: the kept graphs hold every chunk's activations (through the inner loop). When the first chunk's graph
times the number of chunks would exceed ``graph_memory`` bytes, the graphs are rebuilt for every product
instead (same numbers, the old cost).

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
    batch_for,
    batch_signature,
    batched_task_loss,
    check_loss,
    task_tensors,
)
from lightning_metaif.influence.operators import TaskSetOperator
from lightning_metaif.influence.paths import choose_path
from lightning_metaif.influence.problem import Params, check_problem, detached
from lightning_metaif.influence.tasks import (
    Task,
    TaskBatch,
    Tasks,
    resolve_task_ids,
)

Curvature = Literal["exact", "gamma"]


class TotalHessian(TaskSetOperator):
    """The total Hessian ``∇²F(λ)`` of the weighted mean task loss plus an optional L2 term, as an operator.

    Args:
        problem: object with ``task_loss`` (and ``adapt`` / ``outer_loss`` for ``curvature="gamma"``).
        params: meta-parameters at which the Hessian is taken (those requiring grad).
        tasks: the training tasks defining ``F`` (a TaskBatch or a sequence).
        task_weights: ``w_k`` (default ones), aligned with ``tasks``.
        l2: coefficient of ``(l2/2)‖λ‖²`` in ``F``.
        curvature: ``"exact"`` (default) or ``"gamma"``: Ren et al.'s surrogate, the Gauss-Newton-like part
            ``Jᵀ ∇²_θ L_O J`` plus ``Γ·I`` in place of the third-order term (needs ``adapt``/``outer_loss``).
        chunk_size: tasks per chunk (one kept graph per chunk).
        vectorize: ``"auto"`` (measure ``vmap`` against the loop on the first chunk), ``"vmap"`` or ``"loop"``.
        graph_memory: the most bytes of kept graphs (estimated from the first chunk's saved tensors); above
            it the graphs are rebuilt at every product. ``0`` never keeps them.

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
        graph_memory: int = 1 << 30,
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
        self._set_tasks(params, tasks, task_weights, "Hessian")
        self.task_ids = resolve_task_ids(tasks) if isinstance(tasks, TaskBatch) else torch.arange(len(tasks))
        self.l2 = float(l2)
        self.curvature = curvature
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.graph_memory = int(graph_memory)
        self._batch = batch_for(tasks, vectorize, self.task_ids) if curvature == "exact" else None
        self._path: str | None = "loop" if self._batch is None else ("vmap" if vectorize == "vmap" else None)
        self._graphs: list[tuple[Params, list[Tensor]]] | None = None
        self._keep_graphs = self.graph_memory > 0
        self._gamma: float | None = None

    def _subsampled(self, index: Tensor) -> None:
        self._batch = None if self._batch is None else self._batch[index]
        self._graphs = None
        self._gamma = None

    def matvec(self, vector: Tensor) -> Tensor:
        """``∇²F v`` for a flat vector ``v`` of length :attr:`dim`."""
        if vector.shape != (self.dim,):
            raise ValueError(f"Expected a flat vector of shape ({self.dim},), got {tuple(vector.shape)}.")
        if self.curvature == "gamma":  # Γ is already a mean over tasks
            tangent = self.layout.unflatten(vector.to(self.dtype))
            return self._gauss_newton_matvec(tangent) / len(self.tasks) + (self.gamma + self.l2) * vector
        return self.matmat(vector[None])[0]

    __call__ = matvec

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[∇²F v_1, ..., ∇²F v_n]`` as rows ``[n, p]`` for rows ``vectors [n, p]`` (one batched backward)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"Expected vectors of shape [n, {self.dim}], got {tuple(vectors.shape)}.")
        if self.curvature == "gamma":
            return torch.stack([self.matvec(v) for v in vectors])
        vectors = vectors.to(self.dtype)
        total = torch.zeros_like(vectors)
        for index in range(self._num_chunks()):
            total = total + self._chunk_products(index, vectors)
        if not self._keep_graphs:
            self._graphs = None
        return total / len(self.tasks) + self.l2 * vectors

    def dense(self, chunk: int = 64) -> Tensor:
        """Materialise ``∇²F`` as a ``[p, p]`` matrix (symmetrised); meant for small ``p`` (≲ 5,000).

        Built from batched products of ``chunk`` basis vectors at a time.
        """
        if self.dim > 20_000:
            raise ValueError(
                f"Refusing to materialise a {self.dim}x{self.dim} Hessian; use solver='cg', 'lissa' or 'arnoldi'."
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        matrix = torch.cat([self.matmat(eye[i : i + chunk]) for i in range(0, self.dim, chunk)])
        return 0.5 * (matrix + matrix.T)

    # --- kept graphs ----------------------------------------------------------------------------------------

    def _num_chunks(self) -> int:
        return -(-len(self.tasks) // self.chunk_size)

    def _chunk_graph(self, index: int, path: str) -> tuple[Params, list[Tensor]]:
        """Leaves and ``∇ Σ_chunk w_k ℓ_k`` (with its graph) for chunk ``index`` by ``path``."""
        start = index * self.chunk_size
        stop = min(start + self.chunk_size, len(self.tasks))
        weights = self.task_weights[start:stop]
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        if path == "vmap":
            chunk = self._batch[start:stop]
            losses = vmap(batched_task_loss(self.problem), in_dims=(None, 0, 0, 0, 0))(
                leaves, *task_tensors(chunk)
            )
            if not torch.isfinite(losses).all():
                bad = chunk.task_ids[~torch.isfinite(losses.detach().cpu())].tolist()
                raise ValueError(
                    f"task_loss is not finite for tasks {bad[:10]}: check the tasks' data, lower the inner "
                    "learning rate or the number of inner steps."
                )
            total = (weights * losses).sum()
        else:
            tasks = self._batch[start:stop] if self._batch is not None else self.tasks[start:stop]
            total = sum(
                weights[offset]
                * check_loss(self.problem.task_loss(leaves, task), int(self.task_ids[start + offset]))
                for offset, task in enumerate(tasks)
            )
        grads = torch.autograd.grad(total, list(leaves.values()), create_graph=True, allow_unused=True)
        kept = [g if g is not None and g.requires_grad else None for g in grads]
        return leaves, kept

    def _backward(self, graph: tuple[Params, list[Tensor]], vectors: Tensor) -> Tensor:
        """Rows ``Σ_chunk w_k ∇²ℓ_k v_i`` of one chunk's kept graph, for rows ``vectors [n, p]``."""
        leaves, grads = graph
        tangents = self.layout.unflatten(vectors)
        pairs = [(g, tangents[k]) for k, g in zip(leaves, grads) if g is not None]
        if not pairs:
            return torch.zeros_like(vectors)
        outputs, inputs = [g for g, _ in pairs], list(leaves.values())
        if vectors.shape[0] == 1:
            products = torch.autograd.grad(
                outputs, inputs, [t[0] for _, t in pairs], retain_graph=True, allow_unused=True
            )
            products = [None if p is None else p[None] for p in products]
        else:
            try:
                products = torch.autograd.grad(
                    outputs,
                    inputs,
                    [t for _, t in pairs],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            except RuntimeError:  # an op without a batching rule: one backward per vector
                return torch.cat([self._backward(graph, v[None]) for v in vectors])
        flat = {
            k: torch.zeros(vectors.shape[0], *v.shape, dtype=v.dtype, device=v.device) if p is None else p
            for (k, v), p in zip(leaves.items(), products)
        }
        return self.layout.flatten(flat).detach()

    def _chunk_products(self, index: int, vectors: Tensor) -> Tensor:
        if self._graphs is None:
            self._graphs = [None] * self._num_chunks()  # type: ignore[list-item]
        graph = self._graphs[index]
        if graph is None:
            if self._path is None:  # measure both paths on this chunk (build + one batched product)
                results: dict[str, Any] = {}

                def run(path: str) -> Tensor:
                    results[path] = self._measured_graph(index, path)
                    return self._backward(results[path], vectors)

                key = ("hessian", self.chunk_size, batch_signature(self._batch), self.layout.shapes)
                self._path, products = choose_path(
                    self.problem,
                    key,
                    {"vmap": lambda: run("vmap"), "loop": lambda: run("loop")},
                    what=f"Hessian products of {type(self.problem).__name__} ({self.chunk_size}-task chunks)",
                    device=self.device,
                )
                self._graphs[index] = results[self._path]
                return products
            graph = self._measured_graph(index, self._path)
            self._graphs[index] = graph
        return self._backward(graph, vectors)

    def _measured_graph(self, index: int, path: str) -> tuple[Params, list[Tensor]]:
        """Build chunk ``index``'s graph; the first one decides, from its saved bytes, whether graphs are kept."""
        graph = self._chunk_graph(index, path)
        if index == 0 and self._keep_graphs:
            self.graph_bytes = _saved_bytes(graph[1]) * self._num_chunks()
            self._keep_graphs = self.graph_bytes <= self.graph_memory
        return graph

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


def _num_query(task: Any) -> int:
    if isinstance(task, Task):
        return task.num_query
    return int(task.query_x.shape[0])


def _saved_bytes(outputs: Sequence[Tensor | None]) -> int:
    """Bytes of the distinct tensors saved by the autograd graph behind ``outputs`` (a memory estimate)."""
    seen_nodes, seen_storage, total = set(), set(), 0
    stack = [t.grad_fn for t in outputs if t is not None and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # already freed
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, Tensor) and tensor.layout == torch.strided:
                    key = (tensor.untyped_storage().data_ptr(), tensor.device)
                    if key not in seen_storage:
                        seen_storage.add(key)
                        total += tensor.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return total
