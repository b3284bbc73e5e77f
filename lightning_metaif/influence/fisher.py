"""The influence direction with the empirical-Fisher curvature of gradients already computed: a direct solve.

``F = (1/n) Σ_k w_k g_k g_kᵀ`` over ``n`` task meta-gradients (for example the ones training computed and the
callback traced) is positive semi-definite, and ``(F + δI)^{-1} ∇f`` is solved *exactly* with no curvature
products: by the Woodbury identity when ``n ≤ p``

    ``(AᵀA + δI)^{-1} b = (b − Aᵀ (δI_n + AAᵀ)^{-1} A b) / δ``,  ``A = diag(√(w_k / n)) G``,

(an ``n × n`` Cholesky factorisation), or by a ``p × p`` Cholesky factorisation when ``p < n``. With
``damping="auto"``, ``δ`` is the same fraction of the curvature's mean eigenvalue as for the other curvatures
(:data:`~lightning_metaif.influence.curvature.AUTO_DAMPING_FRACTION`), taken over the eigenvalues ``F`` can have
that are not zero: ``F`` has rank at most ``r = min(n, p)``, so the mean is ``trace(F) / r = Σ_k w_k ‖g_k‖² / (n
r)``, computed exactly (``trace / p`` would shrink ``δ`` with every dimension the rows do not span).

This is the curvature TRAK's ``(ΦᵀΦ)^{-1}`` and LoGra use (on projected gradients); it is *not* the total
Hessian of the bilevel objective (the empirical Fisher is a known approximation of it, Kunstner et al. 2019), so
it trades fidelity for a solve that costs one matrix product of the gradients. ``docs/maths.md`` compares them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.influence.curvature import AUTO_DAMPING_FRACTION
from lightning_metaif.influence.solvers.base import SolverError

__all__ = ["MAX_REDUCED_DIMENSION", "fisher_direction"]

MAX_REDUCED_DIMENSION = 4096
"""The largest ``p`` whose ``p × p`` Fisher is summed over processes (128 MiB in float64)."""


def fisher_direction(
    rows: Tensor,
    gradient: Tensor,
    *,
    weights: Tensor | None = None,
    damping: float | str = "auto",
    sum_over_processes: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """``s = (F + δI)^{-1} ∇f`` with ``F = (1/n) Σ_k w_k g_k g_kᵀ`` the empirical Fisher of ``rows``.

    Args:
        rows: ``[n, p]`` task meta-gradients ``g_k`` (or their projections, with ``gradient`` projected alike).
        gradient: ``[p]`` the reference gradient ``∇f``.
        weights: ``[n]`` task weights ``w_k >= 0`` (default 1).
        damping: ``δ >= 0``, or ``"auto"``: :data:`AUTO_DAMPING_FRACTION` × ``trace(F) / min(n, p)``.
        sum_over_processes: when the rows are split over processes, an all-reduce sum (the same on every
            process); ``F`` is then the mean over every process's rows, summed as a ``p × p`` matrix, so ``p``
            must be at most :data:`MAX_REDUCED_DIMENSION` (project the gradients first).

    Returns:
        ``(s, diagnostics)``: ``s`` in ``gradient``'s dtype, and the solve's diagnostics (``solver``
        ``"woodbury"`` or ``"cholesky"``, ``damping``, ``damping_rule``, ``mean_eigenvalue``, ``residual`` (the
        relative residual ``‖(F + δI)s − ∇f‖ / ‖∇f‖``, computed), ``converged``, ``iterations`` = 0).

    Raises:
        SolverError: ``F + δI`` is singular (``δ = 0`` with fewer independent rows than ``p``) or not finite.

    Example:
        >>> rows = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> s, info = fisher_direction(rows, torch.tensor([1.0, 1.0]), damping=0.5)
        >>> [round(v, 4) for v in s.tolist()], info["solver"]   # F = diag(2, 0.5), so s = (1/2.5, 1/1)
        ([0.4, 1.0], 'woodbury')
    """
    rows = torch.as_tensor(rows)
    gradient = torch.as_tensor(gradient)
    if rows.dim() != 2 or gradient.dim() != 1 or rows.shape[1] != gradient.shape[0]:
        raise ValueError(
            f"rows must be [n, p] and gradient [p] with the same p, got {tuple(rows.shape)} and "
            f"{tuple(gradient.shape)}."
        )
    n, p = rows.shape
    if sum_over_processes is not None and p > MAX_REDUCED_DIMENSION:
        raise ValueError(
            f"the empirical Fisher is summed over processes as a {p} x {p} matrix; project the gradients to at most "
            f"{MAX_REDUCED_DIMENSION} dimensions (e.g. TraceTaskIF(curvature='fisher', projection_dim=1024))."
        )
    total = n if sum_over_processes is None else int(sum_over_processes(torch.tensor([float(n)]))[0].round())
    if total == 0:
        raise ValueError("fisher_direction needs at least one gradient row (no task has been traced yet).")
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double().cpu()
    if w.shape != (n,) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be [n] = [{n}] finite values >= 0, got shape {tuple(w.shape)}.")
    a = rows.detach().to("cpu", torch.float64) * (w / total).sqrt()[:, None]
    b = gradient.detach().to("cpu", torch.float64)
    fisher = None
    if sum_over_processes is not None:
        fisher = sum_over_processes(a.T @ a).to(torch.float64)
        mean_eigenvalue = float(fisher.diagonal().sum()) / min(total, p)
    else:
        mean_eigenvalue = float((a * a).sum()) / min(total, p)
    if damping == "auto":
        delta, rule = AUTO_DAMPING_FRACTION * mean_eigenvalue, "auto"
    elif isinstance(damping, (int, float)) and not isinstance(damping, bool) and math.isfinite(damping):
        if damping < 0:
            raise ValueError(f"damping must be >= 0 or 'auto', got {damping}.")
        delta, rule = float(damping), "fixed"
    else:
        raise ValueError(f"damping must be a finite number >= 0 or 'auto', got {damping!r}.")
    if not math.isfinite(mean_eigenvalue):
        raise SolverError(f"the gradient rows are not finite (mean eigenvalue {mean_eigenvalue}).")
    try:
        if fisher is None and n <= p and delta > 0:
            solver = "woodbury"
            gram = a @ a.T
            gram.diagonal().add_(delta)
            inner = torch.cholesky_solve((a @ b)[:, None], torch.linalg.cholesky(gram))[:, 0]
            s = (b - a.T @ inner) / delta
        else:
            solver = "cholesky"
            damped = (a.T @ a if fisher is None else fisher).clone()
            damped.diagonal().add_(delta)
            s = torch.cholesky_solve(b[:, None], torch.linalg.cholesky(damped))[:, 0]
    except torch.linalg.LinAlgError as error:
        raise SolverError(
            f"the empirical Fisher of {total} gradient rows in {p} dimensions plus damping {delta:.3e} is singular "
            f"({error}); use damping='auto' or a damping > 0."
        ) from error
    applied = a.T @ (a @ s) if fisher is None else fisher @ s
    residual_vector = applied + delta * s - b
    residual = float(residual_vector.norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))
    if not math.isfinite(residual):
        raise SolverError(f"the empirical-Fisher solve produced non-finite values (residual {residual}).")
    diagnostics = {
        "solver": solver,
        "damping": delta,
        "damping_rule": rule,
        "mean_eigenvalue": mean_eigenvalue,
        "iterations": 0,
        "residual": residual,
        "converged": residual <= 1e-6,
        "rows": total,
    }
    return s.to(gradient.dtype), diagnostics
