"""Reference objectives other than the mean query loss (Yang et al.): fairness and adversarial robustness.

Each function returns a *utility*: a differentiable ``params -> scalar`` for ``utility=`` of
:func:`~lightning_metaif.influence.estimators.task_influence` (and of the callback). Scores keep the project's
one convention, the predicted increase of the utility if a task were removed; both utilities here are
losses to make smaller, so the tasks with the lowest scores are the ones that make the model less fair or
less robust.

* :func:`fairness_gap`: the adapted query loss of one group of reference tasks minus another's.
* :func:`class_fairness_gap`: the same between two groups of classes within the same reference tasks (each
  group's share of the query loss, through the contract's ``query_weights``).
* :func:`adversarial_loss`: the adapted query loss with the query inputs perturbed by FGSM (one step) or PGD
  (several projected steps) within an ``L∞`` ball. The perturbation is found at the current parameters and
  then held fixed, so the gradient is that of the loss at the worst case found (Danskin's theorem).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.influence.gradients import Utility
from lightning_metaif.influence.problem import Params, check_problem
from lightning_metaif.influence.tasks import Task, Tasks


def _tasks(tasks: Tasks, name: str) -> list[Any]:
    items = list(tasks)
    if not items:
        raise ValueError(f"`{name}` is empty: give at least one reference task.")
    return items


def _mean_loss(problem: Any, params: Params, tasks: Sequence[Any], weights_of: Any = None) -> Tensor:
    losses = [
        problem.task_loss(params, task, query_weights=None if weights_of is None else weights_of(task))
        for task in tasks
    ]
    return torch.stack(losses).mean()


def fairness_gap(problem: Any, group_a: Tasks, group_b: Tasks) -> Utility:
    """``f(λ) = mean loss over group_a − mean loss over group_b`` (each task adapted from ``λ``).

    Put the disadvantaged group first: ``f > 0`` is the gap to close, and a task with a negative score widens
    it (removing the task would lower ``f``).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import Task
        >>> class Mean:  # no adaptation: the loss is ‖w − mean(query_x)‖²
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> def task(x):
        ...     return Task(torch.zeros(1, 1), torch.zeros(1), torch.tensor([[x]]), torch.zeros(1))
        >>> gap = fairness_gap(Mean(), [task(2.0)], [task(0.0)])
        >>> float(gap({"w": torch.zeros(1)}))  # group a is 4 - 0 worse off
        4.0
    """
    check_problem(problem)
    a, b = _tasks(group_a, "group_a"), _tasks(group_b, "group_b")

    def utility(params: Params) -> Tensor:
        return _mean_loss(problem, params, a) - _mean_loss(problem, params, b)

    return utility


def class_fairness_gap(
    problem: Any, tasks: Tasks, classes_a: Sequence[int], classes_b: Sequence[int]
) -> Utility:
    """Per-class gap within the same tasks: the query loss on ``classes_a`` minus that on ``classes_b``.

    Each group's loss is its mean per-sample query loss, through ``query_weights`` (``Q / |group|`` on the
    group's query samples, zero elsewhere), averaged over the tasks that have query samples of both groups.
    Labels are the query targets ``query_y`` (class indices, as the task sees them).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.problem import weighted_mean
        >>> class PerSample:  # per-sample loss (w − x_i)², no adaptation
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return weighted_mean((params["w"] - task.query_x[:, 0]) ** 2, query_weights)
        >>> task = Task(torch.zeros(1, 1), torch.zeros(1).long(), torch.tensor([[1.0], [3.0]]), torch.tensor([0, 1]))
        >>> float(class_fairness_gap(PerSample(), [task], [1], [0])({"w": torch.zeros(1)}))  # 9 - 1
        8.0
    """
    check_problem(problem)
    items = _tasks(tasks, "tasks")
    group_a, group_b = set(int(c) for c in classes_a), set(int(c) for c in classes_b)
    if not group_a or not group_b or group_a & group_b:
        raise ValueError(
            f"classes_a={sorted(group_a)} and classes_b={sorted(group_b)} must be non-empty and disjoint."
        )

    def mask(task: Any, group: set[int]) -> Tensor:
        labels = torch.as_tensor(task.query_y).reshape(-1)
        return torch.tensor(
            [int(y) in group for y in labels.tolist()], dtype=torch.bool, device=labels.device
        )

    usable = [t for t in items if mask(t, group_a).any() and mask(t, group_b).any()]
    if not usable:
        raise ValueError(
            "No reference task has query samples of both class groups; check classes_a / classes_b."
        )

    def weights(task: Any, group: set[int], like: Tensor) -> Tensor:
        chosen = mask(task, group)
        return chosen.to(like.dtype) * (chosen.numel() / chosen.sum())

    def utility(params: Params) -> Tensor:
        like = next(iter(params.values()))
        a = _mean_loss(problem, params, usable, lambda t: weights(t, group_a, like))
        b = _mean_loss(problem, params, usable, lambda t: weights(t, group_b, like))
        return a - b

    return utility


def adversarial_loss(
    problem: Any,
    tasks: Tasks,
    *,
    epsilon: float,
    steps: int = 1,
    step_size: float | None = None,
) -> Utility:
    """Mean adapted query loss with each task's query inputs moved within ``‖δ‖∞ ≤ epsilon`` to raise it.

    ``steps=1`` is FGSM (``δ = ε · sign(∇_x loss)``); ``steps > 1`` is PGD with step ``step_size`` (default
    ``2.5 ε / steps``) and projection onto the ball, started from zero (deterministic). The support set is
    left clean: this measures the robustness of the adapted model to test-time perturbations.

    Example:
        >>> import torch
        >>> class Mean:
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> task = Task(torch.zeros(1, 1), torch.zeros(1), torch.tensor([[1.0]]), torch.zeros(1))
        >>> float(adversarial_loss(Mean(), [task], epsilon=0.5)({"w": torch.zeros(1)}))  # x moved to 1.5
        2.25
    """
    check_problem(problem)
    items = _tasks(tasks, "tasks")
    if not (isinstance(epsilon, (int, float)) and epsilon > 0 and epsilon < float("inf")):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (1 = FGSM), got {steps!r}.")
    size = epsilon if steps == 1 else (2.5 * epsilon / steps if step_size is None else float(step_size))
    if not size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}.")

    def perturb(params: Params, task: Any) -> Any:
        fixed = {k: v.detach() for k, v in params.items()}
        clean = task.query_x.detach()
        delta = torch.zeros_like(clean)
        with torch.enable_grad():
            for _ in range(steps):
                delta.requires_grad_(True)
                moved = Task(task.support_x, task.support_y, clean + delta, task.query_y)
                (direction,) = torch.autograd.grad(problem.task_loss(fixed, moved), delta)
                delta = (delta.detach() + size * direction.sign()).clamp(-epsilon, epsilon)
        return Task(task.support_x, task.support_y, clean + delta.detach(), task.query_y)

    def utility(params: Params) -> Tensor:
        return _mean_loss(problem, params, [perturb(params, task) for task in items])

    return utility


__all__ = ["adversarial_loss", "class_fairness_gap", "fairness_gap"]
