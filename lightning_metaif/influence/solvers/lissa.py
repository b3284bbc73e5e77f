"""LiSSA: the scaled, stochastic Neumann series for ``(H + δI)^{-1} v`` (Agarwal et al. 2017; Koh & Liang 2017).

With ``A = (H + δI) / scale`` the Neumann series ``A^{-1} = Σ_j (I − A)^j`` converges when every eigenvalue of
``H + δI`` lies in ``(0, 2·scale)``. The recursion

    s_0 = v,    s_{j+1} = v + s_j − (H_b s_j + δ s_j) / scale,

has the fixed point ``s* = scale · (H + δI)^{-1} v``; the solver returns ``s / scale``. ``H_b`` is the operator on
a fresh random task mini-batch at every step (``operator.subsample(batch_size, generator)``), an unbiased estimate
of ``H``; the partial sums are then unbiased estimates of the truncated series (the factors are independent), and
``repeats`` independent runs are averaged to reduce the variance.

Note on the damping: Koh & Liang's form ``s_{j+1} = v + (1 − δ) s_j − H_b s_j / scale`` (the form most code copies, docs/maths.md §6)
solves ``(H + δ·scale·I) s = v``: its effective damping is ``δ·scale``. Here ``δ`` means the same as in every
other solver: the solution is ``(H + δI)^{-1} v``.

Choice of ``scale`` when not given: ``ρ̂`` = the largest Ritz value from ``power_iterations`` Lanczos products
(a lower bound of ``ρ(H)``, usually within a few percent after 8 products), and ``scale = 0.6 · (ρ̂ + δ)`` with
the full operator (near Richardson's optimum ``(λ_max + λ_min)/2 + δ``, which contracts twice as fast as
``scale ≈ λ_max``) or ``1.1 · (ρ̂ + δ)`` with mini-batches (whose curvature can exceed the full one). Should the
estimate be too low, the series diverges, is detected, and the scale is doubled and the solve restarted (at most
three times; ``extra["rescales"]``).

Stopping: with the full operator ``update = v − A s_j`` is exactly ``‖v‖`` times the relative residual
``‖(H + δI)x_j − b‖ / ‖b‖`` of ``x_j = s_j / scale``, so the series stops on CG's criterion (``tolerance``,
default 1e-3: enough for rankings; the measured products against CG are in BENCHMARKS.md). The slowest mode
contracts by ``1 − (λ_min + δ)/scale`` per step, so about ``κ/2 · ln(1/tolerance)`` steps are needed
(``κ = (λ_max + δ)/(λ_min + δ)``) against CG's ``√κ``: on badly conditioned problems use CG, or raise ``δ``.

Rows: ``rhs [n, p]`` runs ``n`` series together, one batched product per step (self-influence of every task).

Divergence: when every factor ``I − (H_b + δI)/scale`` has spectral norm ≤ 1, ``‖s_j‖ ≤ (j + 1)‖v‖``. A partial
sum beyond twice that bound, a non-finite value, or a final residual above 1 (worse than returning zero) means
the series diverged, and :class:`SolverError` is raised naming the remedies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_metaif.influence.solvers.arnoldi import lanczos_eigenpairs
from lightning_metaif.influence.solvers.base import (
    LinearOperator,
    SolverError,
    SolveResult,
)
from lightning_metaif.influence.solvers.cg import products_of

FULL_BATCH_SCALE = 0.6
"""Default ``scale / (ρ̂ + δ)`` with the full operator: near Richardson's optimum ``(λ_max + λ_min)/2 + δ``
(twice as fast as ``scale ≈ λ_max``), 20% above the divergence limit ``(λ_max + δ)/2`` for the Lanczos lower
bound ``ρ̂``; a divergence doubles the scale and restarts (at most three times)."""

STOCHASTIC_SCALE = 1.1
"""Default ``scale / (ρ̂ + δ)`` with mini-batches, whose curvature can exceed the full operator's."""

_DIVERGED_REMEDY = (
    "raise `scale` (it must exceed (λ_max(H_b) + δ)/2 for every mini-batch; leave scale=None to estimate it), "
    "raise the damping δ (λ_min(H) + δ must be > 0: negative curvature makes the series diverge), use a larger "
    "batch_size, or fewer iterations."
)


def estimate_spectral_radius(operator: LinearOperator, *, iterations: int = 8, seed: int = 0) -> float:
    """Lanczos estimate of ``ρ(H) = max |λ_i(H)|`` from ``iterations`` products (a lower bound).

    The largest Ritz value of a Krylov space converges to the extreme eigenvalue much faster than power
    iteration on the same products (8 products usually give it to a few percent).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.diag(torch.tensor([1.0, -5.0, 2.0], dtype=torch.float64)))
        >>> round(estimate_spectral_radius(H, iterations=3), 4)
        5.0
    """
    if iterations < 1:
        raise ValueError(f"power iterations must be >= 1, got {iterations}.")
    try:
        values, _, _ = lanczos_eigenpairs(
            operator, rank=1, iterations=min(iterations, operator.dim), seed=seed, which="magnitude"
        )
    except SolverError as error:
        raise SolverError(
            f"Estimating the LiSSA scale failed ({error}): check the operator (model/loss overflow) or pass "
            "`scale` explicitly."
        ) from error
    radius = float(values.abs().max())
    if not math.isfinite(radius):
        raise SolverError(
            "Estimating the LiSSA scale produced non-finite values: check the operator (model/loss overflow) "
            "or pass `scale` explicitly."
        )
    return radius


def lissa_solve(
    operator: LinearOperator,
    rhs: Tensor,
    *,
    damping: float = 0.0,
    scale: float | None = None,
    iterations: int = 1000,
    batch_size: int | None = None,
    repeats: int = 1,
    seed: int = 0,
    tolerance: float = 1e-3,
    power_iterations: int = 8,
    strict: bool = False,
) -> SolveResult:
    """Approximate ``(H + δI)^{-1} rhs`` by the scaled (stochastic) Neumann series.

    Args:
        operator: symmetric operator; with ``batch_size`` it must offer ``subsample(batch_size, generator)``
            (``TotalHessian`` does), otherwise the full operator is used at every step.
        rhs: flat right-hand side of length ``operator.dim``, or rows ``[n, p]`` solved together (one batched
            product per step, e.g. every task's gradient for self-influence).
        damping: ``δ ≥ 0``; the solution approximates ``(H + δI)^{-1} rhs`` (see the module note).
        scale: Neumann scale; ``None`` estimates it from ``power_iterations`` Lanczos products (module note).
        iterations: the most recursion steps per repeat.
        batch_size: tasks per mini-batch ``H_b`` (``None``: the full operator, deterministic).
        repeats: independent runs averaged (variance reduction for mini-batches).
        seed: seeds the mini-batch sampling and the power iteration (CPU generator).
        tolerance: stop a repeat when the relative residual ``‖(H + δI)x − b‖ / ‖b‖`` (tracked exactly by the
            recursion with the full operator) is at most this.
        power_iterations: Lanczos products spent estimating the scale when ``scale`` is None.
        strict: raise :class:`SolverError` when ``converged`` is False.

    Returns:
        :class:`SolveResult`: ``iterations`` = recursion steps over all repeats, ``residual`` = relative residual
        of the solution (the largest over rows; full batch: the last step's, an upper bound of the returned
        iterate's, no extra product; mini-batches: one extra full product), ``extra = {"scale",
        "scale_estimated", "spectral_radius", "steps_per_repeat", "batch_size", "repeats", "products",
        "rescales"}``. For a full-batch run ``converged`` means every repeat reached the tolerance; mini-batch
        runs are noisy estimates whose steps never vanish, so there ``converged`` is ``residual <= tolerance``
        (rarely true: read ``residual``).

    Raises:
        SolverError: divergence (partial sums beyond the non-divergence bound, non-finite values, final residual
            above 1), naming the remedy.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> result = lissa_solve(H, torch.tensor([1.0, 0.0], dtype=torch.float64), damping=1.0, scale=5.0,
        ...                      tolerance=1e-9)
        >>> [round(v, 6) for v in result.solution.tolist()], result.converged
        ([0.272727, -0.090909], True)
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}.")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0 (or None to estimate it), got {scale}.")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (full operator), got {batch_size}.")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}.")
    if rhs.shape[-1:] != (operator.dim,) or rhs.dim() not in (1, 2):
        raise ValueError(
            f"rhs must be a flat vector of length {operator.dim} or rows [n, {operator.dim}], got shape "
            f"{tuple(rhs.shape)}."
        )
    if not torch.isfinite(rhs).all():
        raise SolverError(
            "The right-hand side of the LiSSA solve has non-finite values: check the gradients."
        )

    generator = torch.Generator().manual_seed(seed)
    stochastic = batch_size is not None and hasattr(operator, "subsample")
    products = 0
    radius = None
    if scale is None:
        radius = estimate_spectral_radius(operator, iterations=power_iterations, seed=seed)
        products += min(power_iterations, operator.dim)
        scale = (STOCHASTIC_SCALE if stochastic else FULL_BATCH_SCALE) * (radius + damping)
        if scale <= 0:
            raise SolverError(
                "The operator looks like zero (power iteration found no curvature) and δ=0: raise the damping."
            )
    scale = float(scale)

    v = rhs.reshape(-1, operator.dim)
    v_norm = v.norm(dim=1)
    if float(v_norm.max()) == 0.0:
        return SolveResult(torch.zeros_like(rhs), "lissa", damping, 0, 0.0, True, {"scale": scale})

    rescales = 0
    while True:
        try:
            total, steps_per_repeat, all_converged, last_residual, used = _series(
                operator,
                v,
                v_norm,
                damping,
                scale,
                iterations,
                tolerance,
                repeats,
                batch_size if stochastic else None,
                generator,
            )
            products += used
            break
        except _Diverged as diverged:
            products += diverged.products
            if radius is None or rescales >= 3:
                raise SolverError(str(diverged) + _DIVERGED_REMEDY) from None
            scale, rescales = 2.0 * scale, rescales + 1  # the estimate of λ_max was too low: back off
    solution = (total / (repeats * scale)).reshape(rhs.shape)

    if stochastic:
        rows = solution.reshape(-1, operator.dim)
        residual = float(
            ((products_of(operator, rows) + damping * rows - v).norm(dim=1) / v_norm.clamp_min(1e-300)).max()
        )
        products += rows.shape[0]
    else:
        # ‖v − A s_{j+1}‖ = ‖(I − A)(v − A s_j)‖ ≤ ‖v − A s_j‖ (a contraction): the last step's residual bounds
        # the returned one without another product.
        residual = last_residual
    if not math.isfinite(residual) or residual > 1.0:
        raise SolverError(
            f"The LiSSA solution has relative residual {residual:.3e} (> 1: worse than the zero vector), so the "
            f"series did not converge to (H + δI)^{{-1}} v (scale={scale:.4g}, δ={damping:g}): "
            + _DIVERGED_REMEDY
        )
    converged = all_converged if not stochastic else residual <= tolerance
    if strict and not converged:
        raise SolverError(
            f"LiSSA did not converge: relative residual {residual:.3e} after {max(steps_per_repeat)} steps per "
            f"repeat (tolerance {tolerance:g}): raise `iterations`, raise the damping (faster contraction), lower "
            "`scale` towards λ_max + δ if it is far above, use full batches (batch_size=None), or method='cg'."
        )
    return SolveResult(
        solution,
        "lissa",
        damping,
        iterations=sum(steps_per_repeat),
        residual=residual,
        converged=converged,
        extra={
            "scale": scale,
            "scale_estimated": radius is not None,
            "spectral_radius": radius,
            "steps_per_repeat": steps_per_repeat,
            "batch_size": batch_size if stochastic else None,
            "repeats": repeats,
            "products": products,
            "rescales": rescales,
        },
    )


class _Diverged(Exception):
    def __init__(self, message: str, products: int) -> None:
        super().__init__(message)
        self.products = products


def _series(
    operator: LinearOperator,
    v: Tensor,
    v_norm: Tensor,
    damping: float,
    scale: float,
    iterations: int,
    tolerance: float,
    repeats: int,
    batch_size: int | None,
    generator: torch.Generator,
) -> tuple[Tensor, list[int], bool, float, int]:
    """``repeats`` runs of the recursion: (sum of the iterates, steps per repeat, all stopped early, the last
    relative residual ``‖v − A s_j‖ / ‖v‖``, products)."""
    total = torch.zeros_like(v)
    steps_per_repeat, all_converged, last_residual, products = [], True, float("inf"), 0
    norms = v_norm.clamp_min(torch.finfo(v.dtype).tiny)
    for repeat in range(repeats):
        s = v.clone()
        step = 0
        series_converged = False
        for step in range(1, iterations + 1):
            hessian = operator.subsample(batch_size, generator) if batch_size is not None else operator
            product = products_of(hessian, s)
            products += s.shape[0]
            # Full batch: ``update = v − A s_j`` (the newest Neumann term) is ``‖v‖`` times minus the relative
            # residual of ``x_j = s_j / scale``: ‖(H + δI)x_j − b‖ / ‖b‖ = ‖update‖ / ‖v‖, CG's criterion.
            # Mini-batches: a noisy difference that does not vanish, so the early stop practically never fires.
            update = v - (product + damping * s) / scale
            last_residual = float((update.norm(dim=1) / norms).max())
            s = s + update
            s_norm = s.norm(dim=1)
            if not torch.isfinite(s_norm).all():
                raise _Diverged(
                    f"The LiSSA series produced non-finite values at step {step} of repeat {repeat} "
                    f"(scale={scale:.4g}, δ={damping:g}): ",
                    products,
                )
            if (s_norm > 2.0 * (step + 1) * v_norm).any():
                worst = float((s_norm / norms).max())
                raise _Diverged(
                    f"The LiSSA series diverged at step {step} of repeat {repeat}: ‖s_j‖/‖v‖ = {worst:.3e} exceeds "
                    f"2(j+1) = {2.0 * (step + 1):.3e}, impossible for a convergent series "
                    f"(scale={scale:.4g}, δ={damping:g}): ",
                    products,
                )
            if last_residual <= tolerance:
                series_converged = True
                break
        all_converged = all_converged and series_converged
        steps_per_repeat.append(step)
        total = total + s
    return total, steps_per_repeat, all_converged, last_residual, products
