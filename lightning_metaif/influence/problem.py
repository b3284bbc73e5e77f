"""The one contract between a meta-learning problem and the engine, and parameter utilities.

A *problem* is any object with a ``task_loss(params, task, support_weights=None, query_weights=None)``
method returning a scalar tensor: adapt from the meta-parameters ``params`` (``dict[str, Tensor]``) on the
task's support set and return the (weighted mean) query loss. Every estimator is a derivative of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Params = dict[str, Tensor]


@runtime_checkable
class MetaProblem(Protocol):
    """What the engine needs from a meta-learning problem.

    ``task_loss`` must be a pure function of ``params`` (no in-place updates of module state) so that
    ``torch.func`` transforms apply. ``support_weights`` (shape ``[S]``) and ``query_weights`` (shape
    ``[Q]``) multiply each sample's loss in the inner and the outer loss; ``None`` means all ones.

    Optional methods (used only by the features that need them):

    * ``adapt(params, task, support_weights=None) -> Params`` and
      ``outer_loss(adapted_params, params, task, query_weights=None) -> Tensor``: the two halves of
      ``task_loss``; needed by the Γ-surrogate Hessian and by direct-IF.
    * ``query_outputs(params, task, support_weights=None) -> Tensor`` (the adapted network's outputs on the
      query inputs, e.g. logits ``[Q, C]``) and ``output_loss(outputs, task, query_weights=None) -> Tensor``
      (the query loss from those outputs, convex in them: cross-entropy, squared error), with
      ``output_loss(query_outputs(params, task), task) == task_loss(params, task)``; needed by the
      Gauss–Newton curvature (``curvature="gauss_newton"``, the default where available).
    """

    def task_loss(
        self,
        params: Params,
        task: Any,
        support_weights: Tensor | None = None,
        query_weights: Tensor | None = None,
    ) -> Tensor: ...


def weighted_mean(losses: Tensor, weights: Tensor | None = None) -> Tensor:
    """The contract's reduction of per-sample losses: ``losses.mean()``, or ``(weights * losses).sum() / n``.

    Dividing by ``n`` (not by ``weights.sum()``) keeps every sample's loss linear in its weight, which is what
    instance influence differentiates (weight 0 removes the sample, the normaliser stays).

    Example:
        >>> import torch
        >>> weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0])).item()
        0.5
    """
    if weights is None:
        return losses.mean()
    return (weights * losses).sum() / losses.shape[0]


def check_problem(problem: Any) -> None:
    """Raise a ``ValueError`` that says what is missing when ``problem`` breaks the contract."""
    task_loss = getattr(problem, "task_loss", None)
    if not callable(task_loss):
        raise ValueError(
            f"{type(problem).__name__} has no callable `task_loss(params, task, support_weights=None, "
            "query_weights=None)`: implement it (adapt on the support set, return the query loss) or wrap your "
            "model with `lightning_metaif.MAML` / `lightning_metaif.meta.HigherProblem`."
        )


def check_params(params: Mapping[str, Tensor]) -> Params:
    """Validate meta-parameters: a non-empty mapping of floating tensors."""
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ValueError(
            "`params` must be a non-empty dict of name -> tensor, e.g. `dict(model.named_parameters())`."
        )
    out = {}
    for name, value in params.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ValueError(
                f"Parameter {name!r} must be a floating-point tensor, got {type(value).__name__}."
            )
        out[name] = value
    return out


def trainable(params: Mapping[str, Tensor]) -> Params:
    """Keep the parameters that require grad, as fresh leaves (detached from any outer graph).

    Idempotent: the returned tensors still require grad, so passing them in again keeps them all.

    Raises ``ValueError`` when none requires grad, because no influence can flow through frozen weights.
    """
    params = check_params(params)
    kept = {k: v.detach().requires_grad_(True) for k, v in params.items() if v.requires_grad}
    if not kept:
        raise ValueError(
            "None of the parameters requires grad, so there is nothing to attribute: pass the meta-parameters "
            "the outer optimiser updates (e.g. `{k: v for k, v in model.named_parameters() if v.requires_grad}`)."
        )
    return kept


def detached(params: Mapping[str, Tensor]) -> Params:
    """The same tensors without autograd history or ``requires_grad`` (inputs for ``torch.func``)."""
    return {k: v.detach() for k, v in params.items()}


@dataclass(frozen=True)
class ParamLayout:
    """How a parameter dict maps onto one flat vector (in dict order).

    Example:
        >>> import torch
        >>> layout = ParamLayout.of({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
        >>> layout.numel
        9
        >>> layout.unflatten(torch.arange(9.0))["b"].tolist()
        [6.0, 7.0, 8.0]
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @staticmethod
    def of(params: Mapping[str, Tensor]) -> ParamLayout:
        return ParamLayout(tuple(params), tuple(v.shape for v in params.values()))

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    def flatten(self, tree: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``tree`` (same names, any leading batch dims allowed) into ``[..., numel]``."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            value = tree[name]
            batch_shape = value.shape[: value.dim() - len(shape)]
            parts.append(value.reshape(*batch_shape, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: Tensor) -> Params:
        """Split ``[..., numel]`` back into a dict of ``[..., *shape]`` tensors."""
        out, start = {}, 0
        batch_shape = vector.shape[:-1]
        for name, shape in zip(self.names, self.shapes):
            size = int(torch.Size(shape).numel())
            out[name] = vector[..., start : start + size].reshape(tuple(batch_shape) + tuple(shape))
            start += size
        return out
