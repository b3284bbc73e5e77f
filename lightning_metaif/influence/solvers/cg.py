"""Conjugate gradient on the damped Hessian ``H + δI`` (docs/maths.md §6).

CG needs ``H + δI`` to be positive definite. It meets the curvature of the operator along each search direction
``p`` (``pᵀ(H + δI)p``); a non-positive value proves ``H + δI`` is not positive definite, and the solve fails
loudly with the damping that would have been needed *at least*. (CG can miss negative curvature orthogonal to the
Krylov space of ``rhs``; the dense solver checks the whole spectrum.)

Stopping uses the recursively updated residual; before declaring convergence the true residual
``‖b − (H + δI)x‖`` is recomputed with one extra product, and if rounding made the two drift apart CG restarts
from ``x`` with the true residual ("residual replacement"), within the same ``max_iterations`` budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_metaif.influence.solvers.base import LinearOperator, SolverError, SolveResult

_NOT_PD_REMEDY = (
    "raise the damping above {needed:.3e} (the magnitude of the curvature found; the most negative eigenvalue "
    "of H may be lower still, `method='dense'` or `method='arnoldi'` measures it), or add an L2 term to the "
    "training objective (TotalHessian(l2=...)), or solve with method='lissa' / 'arnoldi' which do not need CG."
)


def cg_solve(
    operator: LinearOperator,
    rhs: Tensor,
    *,
    damping: float = 0.0,
    max_iterations: int = 100,
    tolerance: float = 1e-8,
    x0: Tensor | None = None,
    strict: bool = False,
) -> SolveResult:
    """Solve ``(H + δI) s = rhs`` by conjugate gradient.

    Args:
        operator: symmetric operator with ``matvec``, ``dim``, ``dtype``, ``device`` (e.g. ``TotalHessian``).
        rhs: flat right-hand side of length ``operator.dim``.
        damping: ``δ ≥ 0`` added to the diagonal.
        max_iterations: the most CG steps (operator products, not counting the residual checks).
        tolerance: target relative residual ``‖(H + δI)s − rhs‖ / ‖rhs‖``. In float32, values below ~1e-6 are
            usually out of reach and CG will run all ``max_iterations``.
        x0: starting point (default zeros), e.g. the solution of a previous, nearby solve.
        strict: raise :class:`SolverError` instead of returning ``converged=False`` when the tolerance is not
            reached within ``max_iterations``.

    Returns:
        :class:`SolveResult` with ``iterations`` (CG steps), ``residual`` (true relative residual),
        ``converged`` and ``extra = {"residual_history": [...], "products": ..., "restarts": ...}`` where the
        history holds the recursive relative residual after each step (index 0: the starting residual).

    Raises:
        SolverError: non-positive curvature ``pᵀ(H + δI)p ≤ 0`` (message gives the damping needed), non-finite
            values, or (``strict=True``) no convergence.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> result = cg_solve(H, torch.tensor([1.0, 0.0], dtype=torch.float64), damping=1.0)
        >>> [round(v, 6) for v in result.solution.tolist()], result.converged, result.iterations
        ([0.272727, -0.090909], True, 2)
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}.")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}.")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (a relative residual), got {tolerance}.")
    if rhs.shape != (operator.dim,):
        raise ValueError(f"rhs must be a flat vector of length {operator.dim}, got shape {tuple(rhs.shape)}.")
    if not torch.isfinite(rhs).all():
        raise SolverError("The right-hand side of the CG solve has non-finite values: check the gradients.")

    def apply(vector: Tensor) -> Tensor:
        product = operator.matvec(vector)
        return product + damping * vector if damping else product

    b = rhs
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return SolveResult(
            torch.zeros_like(b), "cg", damping, 0, 0.0, True, {"residual_history": [0.0], "products": 0}
        )

    products = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have shape {tuple(b.shape)}, got {tuple(x0.shape)}.")
        x = x0.to(dtype=b.dtype, device=b.device).clone()
        r = b - apply(x)
        products += 1
    p = r.clone()
    rr = float(r @ r)
    history = [rr**0.5 / b_norm]
    iterations = 0
    restarts = 0
    converged = False
    true_residual = history[0] if x0 is not None else 1.0

    while True:
        if history[-1] <= tolerance:
            # Confirm with the true residual; restart from x if rounding made the recursion drift.
            r = b - apply(x)
            products += 1
            rr = float(r @ r)
            true_residual = rr**0.5 / b_norm
            if true_residual <= tolerance:
                converged = True
                break
            if iterations >= max_iterations:
                break
            p = r.clone()
            restarts += 1
            history.append(true_residual)
            if restarts > 5:  # the tolerance is below what this precision can deliver
                break
        if iterations >= max_iterations:
            r_true = b - apply(x)
            products += 1
            true_residual = float(r_true.norm()) / b_norm
            converged = true_residual <= tolerance
            break

        ap = apply(p)
        products += 1
        iterations += 1
        curvature = float(p @ ap)
        p_norm_sq = float(p @ p)
        if not (torch.isfinite(ap).all() and curvature == curvature and abs(curvature) != float("inf")):
            raise SolverError(
                f"The CG solve met non-finite values at step {iterations} (operator product of a finite "
                "vector): check the model/loss for overflow, run in float64, or raise the damping."
            )
        if curvature <= 0:
            rayleigh = curvature / p_norm_sq - damping  # curvature of H itself along p
            raise SolverError(
                f"H + δI is not positive definite: CG found curvature pᵀ(H+δI)p/pᵀp = "
                f"{curvature / p_norm_sq:.3e} <= 0 at step {iterations} (curvature of H along p: {rayleigh:.3e}, "
                f"δ={damping:g}). Remedy: " + _NOT_PD_REMEDY.format(needed=max(-rayleigh, 0.0))
            )
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = float(r @ r)
        if not (torch.isfinite(x).all() and rr_new == rr_new and rr_new != float("inf")):
            raise SolverError(
                f"The CG solve produced non-finite values at step {iterations}: raise the damping (the system "
                "is too ill-conditioned for this precision) or run in float64."
            )
        history.append(rr_new**0.5 / b_norm)
        p = r + (rr_new / rr) * p
        rr = rr_new

    if not converged and strict:
        raise SolverError(
            f"CG did not reach the relative residual {tolerance:g} in {iterations} iterations (reached "
            f"{true_residual:.3e}): raise max_iterations, raise the damping (better conditioning), loosen the "
            "tolerance, or pass strict=False to accept the approximate solution."
        )
    return SolveResult(
        x,
        "cg",
        damping,
        iterations=iterations,
        residual=true_residual,
        converged=converged,
        extra={
            "residual_history": history,
            "products": products,
            "restarts": restarts,
            "tolerance": tolerance,
        },
    )


def products_of(operator: LinearOperator, vectors: Tensor) -> Tensor:
    """Rows ``H v_i`` for rows ``vectors [n, p]``: one batched call when the operator has ``matmat``."""
    matmat = getattr(operator, "matmat", None)
    if callable(matmat):
        return matmat(vectors)
    return torch.stack([operator.matvec(v) for v in vectors])


def block_cg_solve(
    operator: LinearOperator,
    rhs: Tensor,
    *,
    damping: float = 0.0,
    max_iterations: int = 100,
    tolerance: float = 1e-8,
    strict: bool = False,
) -> SolveResult:
    """Solve ``(H + δI) S = B`` for every row of ``rhs [n, p]`` at once: ``n`` independent CG recursions
    whose ``n`` products per step are one batched call (:meth:`TotalHessian.matmat`: one backward through the
    kept graphs for all rows). Rows that converged stop taking products.

    Returns:
        :class:`SolveResult` with ``solution [n, p]``, ``iterations`` (steps), ``residual`` (largest true
        relative residual over the rows), ``extra = {"products": operator products (vectors), "calls":
        batched calls, "row_residuals": [...]}``.

    Raises:
        SolverError: non-positive curvature along some row's direction (names the damping needed), non-finite
            values, or (``strict=True``) no convergence.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> result = block_cg_solve(H, torch.eye(2, dtype=torch.float64), damping=1.0)
        >>> [[round(v, 6) for v in row] for row in result.solution.tolist()]
        [[0.272727, -0.090909], [-0.090909, 0.363636]]
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}.")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}.")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (a relative residual), got {tolerance}.")
    if rhs.dim() != 2 or rhs.shape[1] != operator.dim:
        raise ValueError(f"rhs must have shape [n, {operator.dim}], got {tuple(rhs.shape)}.")
    if not torch.isfinite(rhs).all():
        raise SolverError("The right-hand sides of the CG solve have non-finite values: check the gradients.")

    def apply(rows: Tensor) -> Tensor:
        return products_of(operator, rows) + damping * rows

    b_norm = rhs.norm(dim=1)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    active = b_norm > 0
    products = calls = iterations = 0
    tiny = torch.finfo(rhs.dtype).tiny
    while iterations < max_iterations:
        active = active & ((rr.sqrt() / b_norm.clamp_min(tiny)) > tolerance)
        index = active.nonzero().reshape(-1)
        if index.numel() == 0:
            break
        ap = apply(p[index])
        products += int(index.numel())
        calls += 1
        iterations += 1
        curvature = (p[index] * ap).sum(1)
        if not (torch.isfinite(ap).all() and torch.isfinite(curvature).all()):
            raise SolverError(
                f"The block CG solve met non-finite values at step {iterations}: check the model/loss for "
                "overflow, run in float64, or raise the damping."
            )
        if (curvature <= 0).any():
            p_norm_sq = (p[index] * p[index]).sum(1)
            rayleigh = float((curvature / p_norm_sq).min()) - damping
            raise SolverError(
                f"H + δI is not positive definite: block CG found curvature pᵀ(H+δI)p/pᵀp <= 0 at step "
                f"{iterations} (curvature of H along p: {rayleigh:.3e}, δ={damping:g}). Remedy: "
                + _NOT_PD_REMEDY.format(needed=max(-rayleigh, 0.0))
            )
        alpha = rr[index] / curvature
        x[index] += alpha[:, None] * p[index]
        r[index] -= alpha[:, None] * ap
        rr_new = (r[index] * r[index]).sum(1)
        p[index] = r[index] + (rr_new / rr[index])[:, None] * p[index]
        rr[index] = rr_new
    true = rhs - apply(x)
    products += int(rhs.shape[0])
    calls += 1
    row_residuals = true.norm(dim=1) / b_norm.clamp_min(tiny)
    row_residuals = torch.where(b_norm > 0, row_residuals, torch.zeros_like(row_residuals))
    if not torch.isfinite(x).all():
        raise SolverError(
            "The block CG solve produced non-finite values: raise the damping or run in float64."
        )
    residual = float(row_residuals.max())
    converged = residual <= tolerance
    if strict and not converged:
        raise SolverError(
            f"Block CG did not reach the relative residual {tolerance:g} in {iterations} iterations (worst row "
            f"{residual:.3e}): raise max_iterations, raise the damping, or loosen the tolerance."
        )
    return SolveResult(
        x,
        "cg",
        damping,
        iterations=iterations,
        residual=residual,
        converged=converged,
        extra={"products": products, "calls": calls, "row_residuals": row_residuals.tolist()},
    )
