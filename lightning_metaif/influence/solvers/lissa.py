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

Choice of ``scale`` when not given: ``ρ̂`` = spectral-radius estimate of the *full* operator from
``power_iterations`` products (``‖H u‖`` for the power-iterated unit vector ``u``, a lower bound of ``ρ``), and
``scale = 1.1 · (ρ̂ + δ)``. Convergence only needs ``λ_max(H_b) + δ < 2·scale``, so this leaves a factor ≈2.2 of
headroom for the under-estimate of power iteration and for mini-batches whose curvature exceeds the full one.
The price is speed: the slowest mode contracts by ``1 − (λ_min + δ)/scale`` per step, so about
``scale / (λ_min + δ) · ln(1/tolerance)`` steps are needed; raise ``δ`` if that is too many.

Divergence: when every factor ``I − (H_b + δI)/scale`` has spectral norm ≤ 1, ``‖s_j‖ ≤ (j + 1)‖v‖``. A partial
sum beyond twice that bound, a non-finite value, or a final residual above 1 (worse than returning zero) means
the series diverged, and :class:`SolverError` is raised naming the remedies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_metaif.influence.solvers.base import (
    LinearOperator,
    SolverError,
    SolveResult,
    relative_residual,
)

_DIVERGED_REMEDY = (
    "raise `scale` (it must exceed (λ_max(H_b) + δ)/2 for every mini-batch; leave scale=None to estimate it), "
    "raise the damping δ (λ_min(H) + δ must be > 0: negative curvature makes the series diverge), use a larger "
    "batch_size, or fewer iterations."
)


def estimate_spectral_radius(
    operator: LinearOperator, *, iterations: int = 20, generator: torch.Generator | None = None
) -> float:
    """Power-iteration estimate of ``ρ(H) = max |λ_i(H)|`` (a lower bound, tight when the top gap is large).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.diag(torch.tensor([1.0, -5.0, 2.0], dtype=torch.float64)))
        >>> round(estimate_spectral_radius(H, iterations=60), 4)
        5.0
    """
    if iterations < 1:
        raise ValueError(f"power iterations must be >= 1, got {iterations}.")
    u = torch.randn(operator.dim, generator=generator, dtype=torch.float64).to(operator.dtype)
    u = u.to(operator.device)
    u = u / u.norm()
    radius = 0.0
    for _ in range(iterations):
        w = operator.matvec(u)
        radius = float(w.norm())
        if not math.isfinite(radius):
            raise SolverError(
                "Power iteration for the LiSSA scale produced non-finite values: check the operator "
                "(model/loss overflow) or pass `scale` explicitly."
            )
        if radius == 0.0:
            return 0.0
        u = w / radius
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
    tolerance: float = 1e-7,
    power_iterations: int = 20,
    strict: bool = False,
) -> SolveResult:
    """Approximate ``(H + δI)^{-1} rhs`` by the scaled (stochastic) Neumann series.

    Args:
        operator: symmetric operator; with ``batch_size`` it must offer ``subsample(batch_size, generator)``
            (``TotalHessian`` does), otherwise the full operator is used at every step.
        rhs: flat right-hand side of length ``operator.dim``.
        damping: ``δ ≥ 0``; the solution approximates ``(H + δI)^{-1} rhs`` (see the module note).
        scale: Neumann scale; ``None`` estimates it as ``1.1 · (ρ̂(H) + δ)`` by power iteration.
        iterations: the most recursion steps per repeat.
        batch_size: tasks per mini-batch ``H_b`` (``None``: the full operator, deterministic).
        repeats: independent runs averaged (variance reduction for mini-batches).
        seed: seeds the mini-batch sampling and the power iteration (CPU generator).
        tolerance: stop a repeat early when the last Neumann term is below ``tolerance · ‖s‖``.
        power_iterations: products spent estimating the scale when ``scale`` is None.
        strict: raise :class:`SolverError` when ``converged`` is False.

    Returns:
        :class:`SolveResult`: ``iterations`` = recursion steps over all repeats, ``residual`` = relative residual
        of the averaged solution (one extra full product), ``extra = {"scale", "scale_estimated",
        "spectral_radius", "steps_per_repeat", "batch_size", "repeats", "products"}``. For a full-batch run
        ``converged`` means every repeat stopped early (last Neumann term below ``tolerance · ‖s‖``); mini-batch
        runs are noisy estimates whose steps never vanish, so there ``converged`` is ``residual <= tolerance``
        (rarely true: read ``residual``).

    Raises:
        SolverError: divergence (partial sums beyond the non-divergence bound, non-finite values, final residual
            above 1), naming the remedy.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> result = lissa_solve(H, torch.tensor([1.0, 0.0], dtype=torch.float64), damping=1.0, scale=5.0)
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
    if rhs.shape != (operator.dim,):
        raise ValueError(f"rhs must be a flat vector of length {operator.dim}, got shape {tuple(rhs.shape)}.")
    if not torch.isfinite(rhs).all():
        raise SolverError(
            "The right-hand side of the LiSSA solve has non-finite values: check the gradients."
        )

    generator = torch.Generator().manual_seed(seed)
    stochastic = batch_size is not None and hasattr(operator, "subsample")
    products = 0
    radius = None
    if scale is None:
        radius = estimate_spectral_radius(operator, iterations=power_iterations, generator=generator)
        products += power_iterations
        scale = 1.1 * (radius + damping)
        if scale <= 0:
            raise SolverError(
                "The operator looks like zero (power iteration found no curvature) and δ=0: raise the damping."
            )
    scale = float(scale)

    v = rhs
    v_norm = float(v.norm())
    if v_norm == 0.0:
        return SolveResult(torch.zeros_like(v), "lissa", damping, 0, 0.0, True, {"scale": scale})

    total = torch.zeros_like(v)
    steps_per_repeat = []
    all_converged = True
    for repeat in range(repeats):
        s = v.clone()
        step = 0
        series_converged = False
        for step in range(1, iterations + 1):
            hessian = operator.subsample(batch_size, generator) if stochastic else operator
            product = hessian.matvec(s)
            products += 1
            # Full batch: s_{j+1} − s_j = (I − A)^{j+1} v, the newest Neumann term. Mini-batches: a noisy
            # difference that does not vanish, so the early stop below practically never fires there.
            update = v - (product + damping * s) / scale
            s = s + update
            s_norm = float(s.norm())
            if not math.isfinite(s_norm):
                raise SolverError(
                    f"The LiSSA series produced non-finite values at step {step} of repeat {repeat} "
                    f"(scale={scale:.4g}, δ={damping:g}): " + _DIVERGED_REMEDY
                )
            if s_norm > 2.0 * (step + 1) * v_norm:
                raise SolverError(
                    f"The LiSSA series diverged at step {step} of repeat {repeat}: ‖s_j‖ = {s_norm:.3e} exceeds "
                    f"2(j+1)‖v‖ = {2.0 * (step + 1) * v_norm:.3e}, impossible for a convergent series "
                    f"(scale={scale:.4g}, δ={damping:g}): " + _DIVERGED_REMEDY
                )
            if float(update.norm()) <= tolerance * s_norm:
                series_converged = True
                break
        all_converged = all_converged and series_converged
        steps_per_repeat.append(step)
        total = total + s
    solution = total / (repeats * scale)

    residual = relative_residual(operator, damping, solution, rhs)
    products += 1
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
        },
    )
