"""EK-FAC for the meta-learning Gauss–Newton total curvature (``solver="ekfac"``).

The Gauss–Newton total curvature is ``G = (1/M) Σ_k w_k J_kᵀ H_ℓ,k J_k + l2·I`` (see
:mod:`~lightning_metaif.influence.gauss_newton`). Writing ``H_ℓ,k = E_ε[u uᵀ]`` with ``u = H_ℓ,k^{1/2} ε``,
``ε ~ N(0, I)`` in output space, gives ``G = (1/M) Σ_k w_k E[g̃_k g̃_kᵀ] + l2·I`` with *pseudo meta-gradients*
``g̃_k = J_kᵀ u``: one backward of the adapted network's query outputs through the inner loop (the meta-gradient
path), with a random cotangent of the right covariance.

For each ``nn.Linear`` / ``nn.Conv2d`` layer, a pseudo meta-gradient is a matrix ``Γ`` (``out × in`` with the
bias as one more column; a conv kernel flattened to ``out × in·kh·kw``). Through the adaptation it is not an
outer product of one activation and one output gradient (which is what hooks on the inner steps see, and why
per-sample K-FAC factors do not describe the meta-gradient), so the Kronecker factors are taken from the
pseudo meta-gradient matrices themselves: ``S = E[Γ Γᵀ]`` and ``A = E[Γᵀ Γ]``, with eigenbases ``Q_S``, ``Q_A``.
The eigenvalue correction then fits the diagonal of ``G`` in the Kronecker eigenbasis from the same samples,
``Λ = E[(Q_Sᵀ Γ Q_A)²]``, so that ``(G + δI)^{-1} v ≈ Q_S ((Q_Sᵀ V Q_A) / (Λ + l2 + δ)) Q_Aᵀ`` per layer
(George et al. 2018's EK-FAC, on the meta-gradient). Fitted once (two passes over a seeded subset of tasks),
then every solve is a few small matrix products: one fit serves every reference and every task.

Needs ``query_outputs`` / ``output_loss`` on the problem (as the Gauss–Newton curvature) and the network as an
``nn.Module``: the problem itself (the ``MAML`` module) or its ``model`` attribute (``HigherProblem``), whose
parameter names match the meta-parameters'.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd, vjp, vmap

from lightning_metaif.influence.gauss_newton import check_gauss_newton_problem
from lightning_metaif.influence.gradients import Vectorize, task_tensors, use_vmap
from lightning_metaif.influence.problem import ParamLayout, Params, detached, trainable
from lightning_metaif.influence.tasks import Task, Tasks, iter_chunks, select_tasks

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
CACHE_BYTES = 1 << 30
"""Pseudo meta-gradients of the first pass are kept for the second while they fit in this many bytes;
beyond, the second pass recomputes them (same seeds, same samples)."""
EXACT_OUTPUTS = 64
"""Tasks with at most this many query outputs (samples × outputs) use the exact expectation over ``ε`` (one
pseudo meta-gradient per column of ``H_ℓ^{1/2}``) instead of ``draws`` random cotangents."""


@dataclass(frozen=True)
class KroneckerLayer:
    """One layer's meta-parameters: the weight's name, the bias's name (or ``None``) and the matrix shape."""

    module: str
    weight: str
    bias: str | None
    rows: int
    columns: int  # weight columns (in or in·kh·kw), without the bias column

    @property
    def width(self) -> int:
        """Columns of the layer's matrix: the weight's, plus one for the bias."""
        return self.columns + (self.bias is not None)


def kronecker_layers(problem: Any, params: Params) -> list[KroneckerLayer]:
    """Group the meta-parameters by their ``nn.Linear`` / ``nn.Conv2d`` layer; refuse anything else by name.

    Example:
        >>> class Problem(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        >>> problem = Problem()
        >>> kronecker_layers(problem, {"net.0.weight": problem.net[0].weight, "net.0.bias": problem.net[0].bias})
        [KroneckerLayer(module='net.0', weight='net.0.weight', bias='net.0.bias', rows=4, columns=3)]
        >>> kronecker_layers(problem, {"net.1.weight": problem.net[1].weight})
        Traceback (most recent call last):
        ...
        ValueError: solver='ekfac' supports nn.Linear and nn.Conv2d layers; meta-parameter 'net.1.weight' belongs to a LayerNorm ...
    """
    root = problem if isinstance(problem, nn.Module) else getattr(problem, "model", None)
    if not isinstance(root, nn.Module):
        raise ValueError(
            f"solver='ekfac' needs the network as an nn.Module to find its layers: {type(problem).__name__} is "
            "not one and has no `model` attribute. Use the `MAML` module or `HigherProblem`, or solver='cg'."
        )
    modules = dict(root.named_modules())
    grouped: dict[str, dict[str, str]] = {}
    for name in params:
        prefix, _, leaf = name.rpartition(".")
        module = modules.get(prefix)
        if not isinstance(module, SUPPORTED_LAYERS) or leaf not in ("weight", "bias"):
            kind = "no module" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"solver='ekfac' supports nn.Linear and nn.Conv2d layers; meta-parameter {name!r} belongs to {kind} "
                "(EK-FAC has no Kronecker factors for it). Freeze it (requires_grad=False), or use solver='cg' with "
                "the Gauss–Newton curvature."
            )
        grouped.setdefault(prefix, {})[leaf] = name
    layers = []
    for prefix, names in grouped.items():
        if "weight" not in names:
            raise ValueError(
                f"solver='ekfac': layer {prefix!r} has its bias but not its weight among the meta-parameters; "
                "meta-learn both or freeze both."
            )
        weight = params[names["weight"]]
        layers.append(
            KroneckerLayer(
                prefix, names["weight"], names.get("bias"), int(weight.shape[0]), int(weight[0].numel())
            )
        )
    return layers


class EKFACFactors:
    """Eigenvalue-corrected Kronecker factors of the Gauss–Newton total curvature, fitted once.

    Args:
        problem: a problem with ``query_outputs`` / ``output_loss`` whose network is an ``nn.Module``
            (see the module docstring).
        params: the meta-parameters (those requiring grad); each must be a weight or bias of an ``nn.Linear`` or
            ``nn.Conv2d``.
        tasks: the training tasks (a TaskBatch is vmapped in chunks; a sequence is looped).
        task_weights: ``w_k`` (default ones).
        l2: coefficient of ``(l2/2)‖λ‖²`` in the training objective (added to the eigenvalues: exact).
        fit_tasks: how many tasks (a seeded random subset) the factors are fitted on; default ``min(M, 256)``.
        draws: output-space random cotangents per fitted task; default enough for ~128 samples in all (≤ 16).
        seed: seeds the subset and the cotangents.
        chunk_size: tasks per vmapped call.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> from lightning_metaif.meta.maml import MAML
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = MAML(torch.nn.Linear(2, 3), inner_lr=0.1).double()
        >>> tasks = TaskBatch(torch.randn(8, 6, 2, dtype=torch.float64), torch.randint(0, 3, (8, 6)),
        ...                   torch.randn(8, 9, 2, dtype=torch.float64), torch.randint(0, 3, (8, 9)), torch.arange(8))
        >>> ekfac = EKFACFactors(model, model.meta_parameters(), tasks, l2=0.1)
        >>> [layer.module for layer in ekfac.layers], ekfac.solve(torch.ones(9), damping=0.0).shape
        (['backbone'], torch.Size([9]))
    """

    def __init__(
        self,
        problem: Any,
        params: Params,
        tasks: Tasks,
        *,
        task_weights: Tensor | Sequence[float] | None = None,
        l2: float = 0.0,
        fit_tasks: int | None = None,
        draws: int | None = None,
        seed: int = 0,
        chunk_size: int = 16,
        vectorize: Vectorize = "auto",
    ) -> None:
        check_gauss_newton_problem(problem)
        if len(tasks) == 0:
            raise ValueError("EK-FAC needs at least one training task to fit its factors.")
        start = time.perf_counter()
        self.problem, self.params = problem, trainable(params)
        self.layout = ParamLayout.of(self.params)
        self.layers = kronecker_layers(problem, self.params)
        like = next(iter(self.params.values()))
        self.dtype, self.device, self.dim = like.dtype, like.device, self.layout.numel
        weights = (
            torch.ones(len(tasks), dtype=like.dtype, device=like.device)
            if task_weights is None
            else torch.as_tensor(task_weights, dtype=like.dtype, device=like.device).reshape(-1)
        )
        self.l2 = float(l2)
        total = len(tasks)
        count = min(total, 256) if fit_tasks is None else int(fit_tasks)
        if not 1 <= count <= total:
            raise ValueError(
                f"fit_tasks must be between 1 and the number of tasks ({total}), got {fit_tasks}."
            )
        self.draws = min(16, max(1, math.ceil(128 / count))) if draws is None else int(draws)
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}.")
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(total, generator=generator)[:count].sort().values
        self.fit_tasks = count
        self._tasks = select_tasks(tasks, index)
        self._weights = weights[index.to(weights.device)]
        self._vmap = use_vmap(self._tasks, vectorize)
        self._chunk_size = chunk_size
        self._seed = seed
        self.exact_expectation = False
        # pass 1: Kronecker factors S = E[Γ Γᵀ], A = E[Γᵀ Γ]; pass 2: Λ = E[(Q_Sᵀ Γ Q_A)²] (same seeded draws)
        left = [torch.zeros(l.rows, l.rows, dtype=self.dtype, device=self.device) for l in self.layers]
        right = [torch.zeros(l.width, l.width, dtype=self.dtype, device=self.device) for l in self.layers]
        samples = float(count)  # G = (1/M) Σ_k w_k E[g̃_k g̃_kᵀ], estimated over the m fitted tasks
        cache: list[tuple[Tensor, Tensor]] | None = []
        cached_bytes = 0
        for weight, grads in self._pseudo_gradients():
            root = weight.clamp_min(0).sqrt().to(grads)
            for i, matrix in enumerate(self._matrices(grads)):
                scaled = matrix * root[:, None, None]  # [n, rows, width]; two plain GEMMs below
                rows_first = scaled.transpose(0, 1).reshape(scaled.shape[1], -1)
                left[i] += rows_first @ rows_first.T
                stacked = scaled.reshape(-1, scaled.shape[-1])
                right[i] += stacked.T @ stacked
            if cache is not None:  # keep the samples for pass 2 while they fit in CACHE_BYTES
                cached_bytes += grads.numel() * grads.element_size()
                cache = cache + [(weight, grads)] if cached_bytes <= CACHE_BYTES else None
        self.recomputed = cache is None
        self.left_vectors = [torch.linalg.eigh(s / samples)[1] for s in left]
        self.right_vectors = [torch.linalg.eigh(a / samples)[1] for a in right]
        eigenvalues = [
            torch.zeros(l.rows, l.width, dtype=self.dtype, device=self.device) for l in self.layers
        ]
        for weight, grads in cache if cache is not None else self._pseudo_gradients():
            for i, matrix in enumerate(self._matrices(grads)):
                rotated = self.left_vectors[i].T @ matrix @ self.right_vectors[i]
                eigenvalues[i] += (weight.to(rotated)[:, None, None] * rotated * rotated).sum(0)
        self.eigenvalues = [e / samples for e in eigenvalues]
        self.fit_seconds = time.perf_counter() - start

    @property
    def mean_eigenvalue(self) -> float:
        """``trace / p`` of the fitted curvature, ``l2`` included."""
        return sum(float(e.sum()) for e in self.eigenvalues) / self.dim + self.l2

    def _pseudo_gradients(self):
        """``(w_k / draws, g̃ [n, p])`` chunks: ``draws`` pseudo meta-gradients per fitted task."""
        generator = torch.Generator().manual_seed(self._seed + 1)
        for start, chunk in iter_chunks(self._tasks, self._chunk_size):
            weights = self._weights[start : start + len(chunk)]
            if self._vmap:
                shape = self._vmap_outputs(chunk).shape[1:]
                n = shape.numel()
                if n <= EXACT_OUTPUTS:  # the n columns of H_ℓ^{1/2}: E[g̃ g̃ᵀ] exactly, no sampling
                    noise = torch.eye(n).reshape(1, n, *shape).expand(len(chunk), n, *shape)
                    per_task = n
                else:
                    noise = torch.randn((len(chunk), self.draws, *shape), generator=generator)
                    per_task = self.draws
                grads = self._vmap_pull(chunk, noise.to(self.dtype).to(self.device))
                scale = 1.0 if n <= EXACT_OUTPUTS else 1.0 / per_task
                self.exact_expectation = n <= EXACT_OUTPUTS
            else:
                grads = torch.stack([self._loop_pull(task, generator) for task in chunk])
                per_task, scale = self.draws, 1.0 / self.draws
            grads = grads.reshape(len(chunk) * per_task, -1)
            yield weights.repeat_interleave(per_task) * scale, grads

    def _vmap_outputs(self, chunk: Any) -> Tensor:
        problem = self.problem

        def outputs_of(params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return problem.query_outputs(params, Task(sx, sy, qx, qy))

        with torch.no_grad():
            return vmap(outputs_of, in_dims=(None, 0, 0, 0, 0))(detached(self.params), *task_tensors(chunk))

    def _vmap_pull(self, chunk: Any, noise: Tensor) -> Tensor:
        problem, layout = self.problem, self.layout

        def one_task(params: Params, eps: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            task = Task(sx, sy, qx, qy)
            outputs, pullback = vjp(lambda p: problem.query_outputs(p, task), params)
            curvature = jacfwd(grad(lambda o: problem.output_loss(o, task)))(outputs)
            n = outputs.numel()
            values, vectors = torch.linalg.eigh(curvature.reshape(n, n))
            root = vectors * values.clamp_min(0).sqrt()  # H_ℓ^{1/2} up to a rotation: root rootᵀ = H_ℓ
            cotangents = (eps.reshape(eps.shape[0], n) @ root.T).reshape(eps.shape)
            grads = vmap(lambda u: pullback(u)[0])(cotangents)
            return layout.flatten(grads)

        return vmap(one_task, in_dims=(None, 0, 0, 0, 0, 0))(
            detached(self.params), noise, *task_tensors(chunk)
        )

    def _loop_pull(self, task: Any, generator: torch.Generator) -> Tensor:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        outputs = self.problem.query_outputs(leaves, task)
        free = outputs.detach().requires_grad_(True)
        n = free.numel()
        curvature = torch.autograd.functional.hessian(
            lambda o: self.problem.output_loss(o.reshape(free.shape), task), free.reshape(-1)
        )
        values, vectors = torch.linalg.eigh(curvature.reshape(n, n))
        root = vectors * values.clamp_min(0).sqrt()
        rows = []
        for _ in range(self.draws):
            eps = torch.randn(n, generator=generator).to(self.dtype).to(self.device)
            cotangent = (root @ eps).reshape(outputs.shape)
            grads = torch.autograd.grad(
                outputs, list(leaves.values()), cotangent, retain_graph=True, allow_unused=True
            )
            grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
            rows.append(self.layout.flatten(grads))
        return torch.stack(rows)

    def _matrices(self, flat: Tensor) -> list[Tensor]:
        """Per layer ``[n, rows, width]``: weight (flattened kernel) with the bias, if any, as the last column."""
        tree = self.layout.unflatten(flat)
        out = []
        for layer in self.layers:
            weight = tree[layer.weight].reshape(*flat.shape[:-1], layer.rows, layer.columns)
            if layer.bias is not None:
                weight = torch.cat(
                    [weight, tree[layer.bias].reshape(*flat.shape[:-1], layer.rows, 1)], dim=-1
                )
            out.append(weight)
        return out

    def _split(
        self, layer: KroneckerLayer, matrix: Tensor, batch: torch.Size, tree: dict[str, Tensor]
    ) -> None:
        weight = matrix[..., : layer.columns]
        tree[layer.weight] = weight.reshape(*batch, *self.params[layer.weight].shape)
        if layer.bias is not None:
            tree[layer.bias] = matrix[..., -1]

    def solve(self, rhs: Tensor, damping: float) -> Tensor:
        """``(G_EKFAC + δI)^{-1} rhs`` for a flat vector (or ``[n, p]`` rows)."""
        if rhs.shape[-1] != self.dim:
            raise ValueError(f"Expected vectors of length {self.dim}, got shape {tuple(rhs.shape)}.")
        tree = {}
        for i, (layer, matrix) in enumerate(zip(self.layers, self._matrices(rhs.to(self.dtype)))):
            left, right = self.left_vectors[i], self.right_vectors[i]
            rotated = left.T @ matrix @ right
            solved = left @ (rotated / (self.eigenvalues[i] + self.l2 + damping)) @ right.T
            self._split(layer, solved, rhs.shape[:-1], tree)
        return self.layout.flatten(tree)

    def matvec(self, vector: Tensor) -> Tensor:
        """``G_EKFAC v`` (the fitted approximation itself; for checks)."""
        tree = {}
        for i, (layer, matrix) in enumerate(zip(self.layers, self._matrices(vector.to(self.dtype)))):
            left, right = self.left_vectors[i], self.right_vectors[i]
            product = left @ ((left.T @ matrix @ right) * (self.eigenvalues[i] + self.l2)) @ right.T
            self._split(layer, product, vector.shape[:-1], tree)
        return self.layout.flatten(tree)

    def memory_bytes(self) -> int:
        """Bytes held by the fitted factors and eigenvalues."""
        tensors = self.left_vectors + self.right_vectors + self.eigenvalues
        return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["EKFACFactors", "KroneckerLayer", "SUPPORTED_LAYERS", "kronecker_layers"]
