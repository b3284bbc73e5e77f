"""Use an existing ``higher`` inner loop as an influence-engine problem.

:class:`HigherProblem` wraps the ``higher.innerloop_ctx`` pattern (a monkey-patched functional model plus a
differentiable optimiser) so that ``task_loss(params, task, ...)`` starts the inner loop from the given
``params`` tensors instead of the module's own weights. ``higher`` works through ordinary autograd on
Python-side state, so ``torch.func.vmap`` cannot transform it: use the engine's loop path
(``vectorize="loop"``, or pass tasks as a plain list).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metaif.influence.problem import Params, weighted_mean

LossFn = Callable[..., Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _import_higher():
    try:
        import higher
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "HigherProblem needs the `higher` package: `pip install lightning-metaif[higher]`."
        ) from error
    return higher


def _weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    if losses.dim() != 1:
        raise ValueError(
            f"loss_fn must return one loss per sample (shape [n]) when called with reduction='none', got shape "
            f"{tuple(losses.shape)}; pass e.g. `loss_fn=torch.nn.functional.cross_entropy`."
        )
    return weighted_mean(losses, weights)


class HigherProblem:
    """An influence-engine problem driven by ``higher`` (loop path only; not ``vmap``-able).

    Args:
        model: the network. Its own weights are *not* used by ``task_loss``: the inner loop starts from the
            ``params`` dict given to it (names as in ``model.named_parameters()``; missing names fall back to
            the module's own weights, detached).
        inner_optimizer: a factory ``params -> torch.optim.Optimizer`` (e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.4)``) or an optimiser instance over ``model.parameters()``.
            It only supplies hyper-parameters (and initial state) to ``higher.optim.get_diff_optim``.
        inner_steps: differentiable optimiser steps on the support set (≥ 1).
        loss_fn: ``loss_fn(outputs, targets, reduction="none") -> [n]`` per-sample losses.
        first_order: detach the inner gradients (first-order MAML); otherwise the full second-order
            derivative through the unrolled steps.

    ``task_loss`` is differentiable w.r.t. ``params`` with ordinary autograd; use it with
    ``per_task_gradients(..., vectorize="loop")`` (a ``TaskBatch`` with ``vectorize="auto"`` would try
    ``vmap`` and fail inside ``higher``).

    Example:
        >>> from lightning_metaif.influence.tasks import Task
        >>> model = torch.nn.Linear(3, 2)
        >>> problem = HigherProblem(model, lambda p: torch.optim.SGD(p, lr=0.1), inner_steps=1)
        >>> task = Task(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(6, 3), torch.zeros(6).long())
        >>> problem.task_loss(problem.meta_parameters(), task).shape
        torch.Size([])
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: OptimizerFactory | torch.optim.Optimizer,
        inner_steps: int = 1,
        loss_fn: LossFn = F.cross_entropy,
        first_order: bool = False,
    ) -> None:
        _import_higher()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}.")
        if not (isinstance(inner_optimizer, torch.optim.Optimizer) or callable(inner_optimizer)):
            raise ValueError(
                "inner_optimizer must be a torch.optim.Optimizer over model.parameters() or a factory "
                "`params -> Optimizer`, e.g. `lambda p: torch.optim.SGD(p, lr=0.4)`."
            )
        if isinstance(inner_optimizer, torch.optim.Optimizer):
            own = {id(p) for p in model.parameters()}
            if any(id(p) not in own for g in inner_optimizer.param_groups for p in g["params"]):
                raise ValueError("The inner optimizer must be built over `model.parameters()`.")
        self.model, self.inner_optimizer, self.inner_steps = model, inner_optimizer, inner_steps
        self.loss_fn, self.first_order = loss_fn, first_order

    def meta_parameters(self) -> dict[str, Tensor]:
        """``model.named_parameters()`` that require grad (the outer-optimised weights)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _reference_optimizer(self) -> torch.optim.Optimizer:
        if isinstance(self.inner_optimizer, torch.optim.Optimizer):
            return self.inner_optimizer
        optimizer = self.inner_optimizer(self.model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"inner_optimizer factory returned {type(optimizer).__name__}, not an Optimizer."
            )
        return optimizer

    def adapt(self, params: Mapping[str, Tensor], task: Any, support_weights: Tensor | None = None) -> Params:
        """Fast weights after ``inner_steps`` differentiable optimiser steps, keyed like ``params``."""
        fmodel = self._adapted_model(params, task, support_weights)
        return dict(zip([n for n, _ in self.model.named_parameters()], fmodel.fast_params))

    def _adapted_model(self, params: Mapping[str, Tensor], task: Any, support_weights: Tensor | None):
        higher = _import_higher()
        # Given tensors are adapted (made differentiable leaves if they are plain tensors, so that higher
        # can take inner gradients); names missing from ``params`` keep the module's weights, frozen.
        initial = []
        for name, own in self.model.named_parameters():
            if name in params:
                value = params[name]
                initial.append(value if value.requires_grad else value.detach().requires_grad_(True))
            else:
                initial.append(own.detach())
        fmodel = higher.monkeypatch(self.model, copy_initial_weights=True, track_higher_grads=True)
        fmodel.update_params(initial)
        diffopt = higher.optim.get_diff_optim(
            self._reference_optimizer(),
            self.model.parameters(),
            fmodel=fmodel,
            track_higher_grads=True,
        )
        callback = None
        if self.first_order:

            def callback(grads):
                return [None if g is None else g.detach() for g in grads]

        for _ in range(self.inner_steps):
            losses = self.loss_fn(fmodel(task.support_x), task.support_y, reduction="none")
            diffopt.step(_weighted_mean(losses, support_weights), grad_callback=callback)
        return fmodel

    def outer_loss(
        self,
        adapted: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        task: Any,
        query_weights: Tensor | None = None,
    ) -> Tensor:
        """Weighted mean query loss of the model with the ``adapted`` weights."""
        weights = {**{n: p.detach() for n, p in self.model.named_parameters()}, **params, **adapted}
        out = torch.func.functional_call(self.model, weights, (task.query_x,))
        return _weighted_mean(self.loss_fn(out, task.query_y, reduction="none"), query_weights)

    def query_outputs(
        self, params: Mapping[str, Tensor], task: Any, support_weights: Tensor | None = None
    ) -> Tensor:
        """Outputs of the adapted model on the query inputs (for the Gauss–Newton curvature)."""
        return self._adapted_model(params, task, support_weights)(task.query_x)

    def output_loss(self, outputs: Tensor, task: Any, query_weights: Tensor | None = None) -> Tensor:
        """Weighted mean query loss of ``outputs`` (from :meth:`query_outputs`)."""
        return _weighted_mean(self.loss_fn(outputs, task.query_y, reduction="none"), query_weights)

    def task_loss(
        self,
        params: Mapping[str, Tensor],
        task: Any,
        support_weights: Tensor | None = None,
        query_weights: Tensor | None = None,
    ) -> Tensor:
        """Run the ``higher`` inner loop from ``params`` on the support set; weighted mean query loss."""
        fmodel = self._adapted_model(params, task, support_weights)
        losses = self.loss_fn(fmodel(task.query_x), task.query_y, reduction="none")
        return _weighted_mean(losses, query_weights)
