"""Low-rank inverse from the top eigenpairs of ``H`` (Schioppa et al. 2022, "Scaling up influence functions").

For a symmetric ``H``, Arnoldi reduces to Lanczos: ``k`` products build an orthonormal Krylov basis ``Q`` and the
tridiagonal ``T = Qᵀ H Q``; the eigenpairs of ``T`` give Ritz pairs ``(θ_i, Q y_i)`` whose extreme values
converge first. Full reorthogonalisation (classical Gram-Schmidt, twice) keeps ``Q`` orthonormal to rounding, so
no spurious copies of converged eigenvalues appear. The ``rank`` Ritz pairs of largest ``|θ|`` (or largest ``θ``)
are kept and

    s = V diag(1 / (λ_i + δ)) Vᵀ rhs                         (complement="zero", the default; Schioppa et al.)
    s = V diag(1 / (λ_i + δ)) Vᵀ rhs + (rhs − V Vᵀ rhs) / δ   (complement="damping": H ≈ 0 off the subspace)

The factorisation does not depend on ``δ`` or on ``rhs``: build one :class:`LowRankInverse` and apply it to many
right-hand sides (e.g. one per reference query), or re-damp it with :meth:`LowRankInverse.with_damping`.
Memory: the basis holds ``iterations x p`` numbers (e.g. 60 x 10⁶ float32 = 240 MB).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_metaif.influence.checks import check_number
from lightning_metaif.influence.solvers.base import (
    LinearOperator,
    SolverError,
    SolveResult,
    relative_residual,
)

Which = Literal["magnitude", "largest"]
Complement = Literal["zero", "damping"]


class LowRankInverse:
    """``(H + δI)^{-1}`` restricted to the span of ``rank`` eigenvectors of ``H``; reusable for many right-hand sides.

    Args:
        eigenvalues: ``[r]`` Ritz values of ``H`` (descending by the selection criterion).
        eigenvectors: ``[p, r]`` orthonormal Ritz vectors.
        damping: ``δ ≥ 0``.
        complement: ``"zero"`` (no contribution outside the subspace) or ``"damping"`` (``1/δ`` there; needs
            ``δ > 0``).
        ritz_residuals: ``‖H v_i − λ_i v_i‖`` estimates from Lanczos (diagnostics).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)))
        >>> inverse = LowRankInverse.fit(H, rank=3, damping=1.0)
        >>> [round(v, 6) for v in inverse.apply(torch.ones(3, dtype=torch.float64)).tolist()]
        [0.2, 0.333333, 0.5]
    """

    def __init__(
        self,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        *,
        damping: float = 0.0,
        complement: Complement = "zero",
        ritz_residuals: Tensor | None = None,
    ) -> None:
        if eigenvectors.dim() != 2 or eigenvalues.shape != (eigenvectors.shape[1],):
            raise ValueError(
                f"Expected eigenvalues [r] and eigenvectors [p, r], got {tuple(eigenvalues.shape)} and "
                f"{tuple(eigenvectors.shape)}."
            )
        damping = check_number(damping, "damping", minimum=0.0)
        if complement not in ("zero", "damping"):
            raise ValueError(f"complement must be 'zero' or 'damping', got {complement!r}.")
        if complement == "damping" and damping <= 0:
            raise ValueError("complement='damping' applies 1/δ outside the subspace: it needs damping > 0.")
        shifted = eigenvalues + damping
        if eigenvalues.numel() and float(shifted.min()) <= 0:
            worst = float(eigenvalues.min())
            raise SolverError(
                f"A kept eigenvalue of H is {worst:.3e}, so H + δI is not positive definite on the subspace "
                f"(δ={damping:g}): raise the damping above {-worst:.3e}, add an L2 term to the training objective, "
                "or keep only the largest eigenvalues (which='largest')."
            )
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.damping = float(damping)
        self.complement = complement
        self.ritz_residuals = ritz_residuals

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def dim(self) -> int:
        return int(self.eigenvectors.shape[0])

    @classmethod
    def fit(
        cls,
        operator: LinearOperator,
        *,
        rank: int = 20,
        iterations: int | None = None,
        damping: float = 0.0,
        seed: int = 0,
        which: Which = "magnitude",
        complement: Complement = "zero",
    ) -> LowRankInverse:
        """Run Lanczos on ``operator`` and keep ``rank`` Ritz pairs (see :func:`lanczos_eigenpairs`)."""
        values, vectors, residuals = lanczos_eigenpairs(
            operator, rank=rank, iterations=iterations, seed=seed, which=which
        )
        return cls(values, vectors, damping=damping, complement=complement, ritz_residuals=residuals)

    def with_damping(self, damping: float, complement: Complement | None = None) -> LowRankInverse:
        """The same eigenpairs with another damping (no operator products)."""
        return LowRankInverse(
            self.eigenvalues,
            self.eigenvectors,
            damping=damping,
            complement=complement or self.complement,
            ritz_residuals=self.ritz_residuals,
        )

    def apply(self, rhs: Tensor) -> Tensor:
        """``s`` for a flat ``rhs [p]`` or a batch of rows ``[n, p]`` (one row per right-hand side)."""
        if rhs.shape[-1] != self.dim or rhs.dim() not in (1, 2):
            raise ValueError(f"rhs must have shape [{self.dim}] or [n, {self.dim}], got {tuple(rhs.shape)}.")
        vectors = self.eigenvectors.to(device=rhs.device, dtype=rhs.dtype)
        values = (self.eigenvalues + self.damping).to(device=rhs.device, dtype=rhs.dtype)
        coefficients = rhs @ vectors  # [r] or [n, r]
        solution = (coefficients / values) @ vectors.T
        if self.complement == "damping":
            solution = solution + (rhs - coefficients @ vectors.T) / self.damping
        return solution

    __call__ = apply


def lanczos_eigenpairs(
    operator: LinearOperator,
    *,
    rank: int = 20,
    iterations: int | None = None,
    seed: int = 0,
    which: Which = "magnitude",
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` Ritz pairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        operator: symmetric operator (``matvec``, ``dim``, ``dtype``, ``device``).
        rank: eigenpairs kept (clamped to ``operator.dim``).
        iterations: Krylov dimension = operator products (default ``min(dim, max(2·rank, rank + 20))``;
            extreme eigenvalues converge first, so a margin above ``rank`` sharpens the kept ones).
        seed: seeds the random start vector (CPU generator).
        which: keep the largest ``|λ|`` (``"magnitude"``, Schioppa et al.) or the largest ``λ`` (``"largest"``).

    Returns:
        ``(eigenvalues [r], eigenvectors [p, r], ritz_residuals [r])``, ordered by the selection criterion.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.diag(torch.tensor([1.0, -5.0, 3.0], dtype=torch.float64)))
        >>> values, vectors, _ = lanczos_eigenpairs(H, rank=2)
        >>> [round(v, 6) for v in values.tolist()]
        [-5.0, 3.0]
    """
    dim = operator.dim
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    if which not in ("magnitude", "largest"):
        raise ValueError(f"which must be 'magnitude' or 'largest', got {which!r}.")
    rank = min(rank, dim)
    if iterations is None:
        iterations = min(dim, max(2 * rank, rank + 20))
    if iterations < rank:
        raise ValueError(f"iterations (Krylov dimension) must be >= rank={rank}, got {iterations}.")
    iterations = min(iterations, dim)

    dtype, device = operator.dtype, operator.device
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(iterations, dim, dtype=dtype, device=device)
    alphas = torch.zeros(iterations, dtype=torch.float64)
    betas = torch.zeros(iterations, dtype=torch.float64)  # betas[j] couples q_j and q_{j+1}
    tiny = 1e3 * torch.finfo(dtype).eps

    def random_unit(count: int) -> Tensor:
        """A random unit vector orthogonal to the first ``count`` basis vectors."""
        for _ in range(3):
            q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(2):
                q = q - basis[:count].T @ (basis[:count] @ q)
            norm = float(q.norm())
            if norm > tiny:
                return q / norm
        raise SolverError("Lanczos could not find a new direction (the basis spans the space).")

    q = random_unit(0)
    scale = 0.0
    for j in range(iterations):
        basis[j] = q
        w = operator.matvec(q)
        if not torch.isfinite(w).all():
            raise SolverError(
                f"Lanczos met non-finite operator products at step {j}: check the model/loss for overflow or "
                "run in float64."
            )
        alpha = float(q @ w)
        alphas[j] = alpha
        w = w - alpha * q
        if j > 0:
            w = w - betas[j - 1].item() * basis[j - 1]
        for _ in range(2):  # full reorthogonalisation against the whole basis
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alpha) + beta)
        if j == iterations - 1:
            betas[j] = beta
            break
        if beta <= tiny * scale:
            # Invariant subspace found: restart with a fresh direction (T becomes block diagonal, exactly).
            betas[j] = 0.0
            q = random_unit(j + 1)
        else:
            betas[j] = beta
            q = w / beta

    tridiagonal = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    theta, y = torch.linalg.eigh(tridiagonal)
    key = theta.abs() if which == "magnitude" else theta
    order = torch.argsort(key, descending=True)[:rank]
    theta, y = theta[order], y[:, order]
    ritz_residuals = (betas[-1] * y[-1]).abs()  # ‖H v − θ v‖ = |β_k e_kᵀ y| for the Krylov residual
    if iterations == dim:
        ritz_residuals = torch.zeros_like(ritz_residuals)  # the basis spans everything: T is exact
    vectors = basis.T @ y.to(device=device, dtype=dtype)
    return theta.to(device=device, dtype=dtype), vectors, ritz_residuals


def arnoldi_solve(
    operator: LinearOperator,
    rhs: Tensor,
    *,
    damping: float = 0.0,
    rank: int = 20,
    iterations: int | None = None,
    seed: int = 0,
    which: Which = "magnitude",
    complement: Complement = "zero",
    inverse: LowRankInverse | None = None,
    ritz_tolerance: float = 1e-6,
) -> SolveResult:
    """``s ≈ (H + δI)^{-1} rhs`` within the span of the top-``rank`` eigenvectors of ``H``.

    Args:
        operator: symmetric operator.
        rhs: flat right-hand side of length ``operator.dim``.
        damping: ``δ ≥ 0``.
        rank, iterations, seed, which: see :func:`lanczos_eigenpairs`.
        complement: see :class:`LowRankInverse`.
        inverse: a prebuilt :class:`LowRankInverse` to reuse (then no Lanczos run; its damping is replaced by
            ``damping``).
        ritz_tolerance: ``converged`` means every kept Ritz pair has ``‖Hv − λv‖ ≤ ritz_tolerance · max|λ|``.

    Returns:
        :class:`SolveResult`; ``residual`` is the true relative residual (one extra product). It measures the
        truncation to ``rank`` eigenvectors, not an iteration error: it is only small when ``rank`` covers the
        spectrum that ``rhs`` excites. ``extra = {"eigenvalues", "ritz_residuals", "rank", "inverse",
        "products"}`` (``inverse`` is the reusable :class:`LowRankInverse`).

    Raises:
        SolverError: a kept eigenvalue with ``λ + δ ≤ 0`` (raise the damping), non-finite values.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.solvers import DenseMatrix
        >>> H = DenseMatrix(torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> result = arnoldi_solve(H, torch.tensor([1.0, 0.0], dtype=torch.float64), damping=1.0, rank=2)
        >>> [round(v, 6) for v in result.solution.tolist()], result.residual < 1e-12
        ([0.272727, -0.090909], True)
    """
    if rhs.shape != (operator.dim,):
        raise ValueError(f"rhs must be a flat vector of length {operator.dim}, got shape {tuple(rhs.shape)}.")
    products = 0
    if inverse is None:
        inverse = LowRankInverse.fit(
            operator,
            rank=rank,
            iterations=iterations,
            damping=damping,
            seed=seed,
            which=which,
            complement=complement,
        )
        products = min(operator.dim, iterations or min(operator.dim, max(2 * rank, rank + 20)))
    else:
        if inverse.dim != operator.dim:
            raise ValueError(f"The given inverse has dim {inverse.dim}, the operator {operator.dim}.")
        inverse = inverse.with_damping(damping, complement)
    solution = inverse.apply(rhs)
    if not torch.isfinite(solution).all():
        raise SolverError("The Arnoldi solve produced non-finite values: raise the damping.")
    residual = relative_residual(operator, damping, solution, rhs) if float(rhs.norm()) > 0 else 0.0
    products += 1
    if not math.isfinite(residual):
        raise SolverError("The Arnoldi residual is non-finite: check the operator for overflow.")
    top = float(inverse.eigenvalues.abs().max()) if inverse.rank else 0.0
    ritz = inverse.ritz_residuals
    converged = ritz is None or bool((ritz <= ritz_tolerance * max(top, 1e-300)).all())
    return SolveResult(
        solution,
        "arnoldi",
        damping,
        iterations=products,
        residual=residual,
        converged=converged,
        extra={
            "eigenvalues": inverse.eigenvalues.tolist(),
            "ritz_residuals": None if ritz is None else ritz.tolist(),
            "rank": inverse.rank,
            "inverse": inverse,
            "products": products,
        },
    )
