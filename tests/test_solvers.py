"""CG, LiSSA and Lanczos/Arnoldi against the exact dense solve, and their failure modes.

Accuracy assertions use the standard bound ``‖s − s*‖/‖s*‖ ≤ κ(H + δI) · ‖r‖/‖b‖`` (relative error from relative
residual) rather than magic numbers, where a residual is available.

Heavier tests (several seconds on a loaded 2-core machine, each operator product of the real ``TotalHessian``
costs 20-200 ms): the ``real_*`` ones share one module fixture (training to the minimum + the dense Hessian).
"""

from __future__ import annotations

import pytest
import torch
from problems import LinearMAML, regression_tasks

from lightning_metaif.influence.gradients import batched_task_loss, task_tensors
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.solvers import DenseMatrix, SolverError, solve
from lightning_metaif.influence.solvers.arnoldi import LowRankInverse, arnoldi_solve, lanczos_eigenpairs
from lightning_metaif.influence.solvers.cg import cg_solve
from lightning_metaif.influence.solvers.lissa import estimate_spectral_radius, lissa_solve

DTYPE = torch.float64


def spd_matrix(dim: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DTYPE))
    return (q * eigenvalues) @ q.T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def condition(eigenvalues: torch.Tensor, damping: float) -> float:
    shifted = eigenvalues + damping
    return float(shifted.max() / shifted.min())


@pytest.fixture(scope="module")
def spd():
    """40 x 40 SPD matrix with eigenvalues 1e-2 .. 1e1 (κ = 1e3)."""
    eigenvalues = torch.logspace(-2, 1, 40, dtype=DTYPE)
    matrix = spd_matrix(40, eigenvalues)
    rhs = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    return DenseMatrix(matrix), eigenvalues, rhs


class TaskMeanMatrix:
    """Mean of per-task PSD matrices plus ``l2·I``, with task mini-batches: the shape of ``TotalHessian``."""

    def __init__(self, matrices: torch.Tensor, l2: float) -> None:
        self.matrices, self.l2 = matrices, l2
        self.dim = matrices.shape[1]
        self.dtype, self.device = matrices.dtype, matrices.device
        self.subsample_calls = 0

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return (self.matrices @ vector).mean(0) + self.l2 * vector

    def dense(self) -> torch.Tensor:
        return self.matrices.mean(0) + self.l2 * torch.eye(self.dim, dtype=self.dtype)

    def subsample(self, batch_size: int, generator: torch.Generator | None = None) -> TaskMeanMatrix:
        self.subsample_calls += 1
        index = torch.randperm(self.matrices.shape[0], generator=generator)[:batch_size]
        return TaskMeanMatrix(self.matrices[index], self.l2)


# --- random SPD matrix -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_cg_matches_dense_on_spd(spd, damping):
    operator, eigenvalues, rhs = spd
    exact = solve(operator, rhs, method="dense", damping=damping).solution
    result = solve(operator, rhs, method="cg", damping=damping, max_iterations=200, tolerance=1e-10)
    assert result.converged and result.solver == "cg"
    assert result.residual <= 1e-10
    assert rel_err(result.solution, exact) <= condition(eigenvalues, damping) * result.residual * 1.01
    history = result.extra["residual_history"]
    assert history[0] == pytest.approx(1.0) and len(history) >= result.iterations + 1
    assert result.iterations <= 200


def test_cg_warm_start_and_iteration_limit(spd):
    operator, _, rhs = spd
    exact = solve(operator, rhs, method="dense").solution
    warm = cg_solve(operator, rhs, x0=exact)
    assert warm.converged and warm.iterations == 0
    short = cg_solve(operator, rhs, max_iterations=3)
    assert not short.converged and short.iterations == 3 and short.residual > 1e-8
    with pytest.raises(SolverError, match="raise max_iterations"):
        cg_solve(operator, rhs, max_iterations=3, strict=True)
    zero = cg_solve(operator, torch.zeros_like(rhs))
    assert zero.converged and zero.solution.abs().max() == 0


def test_cg_raises_on_indefinite_matrix_with_small_damping():
    eigenvalues = torch.linspace(-1.0, 5.0, 30, dtype=DTYPE)
    operator = DenseMatrix(spd_matrix(30, eigenvalues, seed=2))
    rhs = torch.randn(30, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    with pytest.raises(SolverError, match="raise the damping above") as info:
        cg_solve(operator, rhs, damping=0.1)
    # The curvature CG reports is a Rayleigh quotient of H: between λ_min and 0, so the damping it names is a
    # lower bound of what is needed.
    needed = float(str(info.value).split("raise the damping above ")[1].split(" ")[0])
    assert 0.1 <= needed <= 1.0 + 1e-9
    # Damping above |λ_min| makes it positive definite and CG succeeds.
    assert cg_solve(operator, rhs, damping=1.5, max_iterations=200).converged


def test_lissa_matches_dense_on_spd(spd):
    operator, eigenvalues, rhs = spd
    damping, tolerance = 0.5, 1e-9
    exact = solve(operator, rhs, method="dense", damping=damping).solution
    result = lissa_solve(operator, rhs, damping=damping, iterations=5000, tolerance=tolerance)
    scale = result.extra["scale"]
    # Estimated scale: 0.6 (ρ̂ + δ) with the Lanczos estimate ρ̂ ≤ λ_max = 10 and close to it.
    assert 0.6 * 0.98 * (10 + damping) <= scale <= 0.6 * (10 + damping) + 1e-9
    assert result.extra["scale_estimated"] and result.converged and result.extra["rescales"] == 0
    # It stops on the relative residual (CG's criterion): ‖x − x*‖/‖x*‖ ≤ tol · κ(H + δI).
    kappa = (float(eigenvalues.max()) + damping) / (float(eigenvalues.min()) + damping)
    assert rel_err(result.solution, exact) <= tolerance * kappa
    # The reported residual is a bound on the true one, and within the tolerance.
    true_residual = float(
        (operator.matvec(result.solution) + damping * result.solution - rhs).norm() / rhs.norm()
    )
    assert true_residual <= result.residual <= tolerance


def test_lissa_defaults_stop_on_the_residual_and_back_off_from_a_too_low_scale(spd):
    operator, eigenvalues, rhs = spd
    damping = 0.5
    exact = solve(operator, rhs, method="dense", damping=damping).solution
    result = lissa_solve(operator, rhs, damping=damping)  # defaults: tolerance 1e-3 on the relative residual
    true_residual = float(
        (operator.matvec(result.solution) + damping * result.solution - rhs).norm() / rhs.norm()
    )
    assert result.converged and true_residual <= 1e-3
    kappa = (float(eigenvalues.max()) + damping) / (float(eigenvalues.min()) + damping)
    assert rel_err(result.solution, exact) <= 1e-3 * kappa
    # One Lanczos product badly under-estimates λ_max: the series diverges, the scale doubles, the solve
    # still converges to the same solution (products of the failed attempts counted).
    backed_off = lissa_solve(operator, rhs, damping=damping, power_iterations=1)
    assert backed_off.extra["rescales"] >= 1 and backed_off.converged
    assert rel_err(backed_off.solution, exact) <= 1e-3 * kappa
    assert backed_off.extra["products"] > backed_off.iterations


def test_lissa_raises_when_scale_too_small_or_curvature_negative(spd):
    operator, _, rhs = spd
    with pytest.raises(SolverError, match="raise `scale`"):
        lissa_solve(operator, rhs, damping=0.1, scale=2.0, iterations=500)  # λ_max + δ > 2·scale
    indefinite = DenseMatrix(spd_matrix(20, torch.linspace(-2.0, 3.0, 20, dtype=DTYPE), seed=4))
    with pytest.raises(SolverError, match="raise the damping"):
        lissa_solve(indefinite, rhs[:20], damping=0.5, iterations=2000)


def test_lissa_minibatches_converge_approximately():
    g = torch.Generator().manual_seed(5)
    factors = torch.randn(16, 12, 20, generator=g, dtype=DTYPE)
    operator = TaskMeanMatrix(factors.transpose(1, 2) @ factors / 12, l2=0.1)
    rhs = torch.randn(20, generator=g, dtype=DTYPE)
    damping = 0.2
    exact = solve(operator, rhs, method="dense", damping=damping).solution
    errors = {}
    for repeats in (1, 8):
        result = lissa_solve(
            operator, rhs, damping=damping, batch_size=8, repeats=repeats, iterations=50, seed=0
        )
        assert result.extra["batch_size"] == 8 and result.extra["repeats"] == repeats
        errors[repeats] = rel_err(result.solution, exact)
    assert operator.subsample_calls == 50 * 9
    # Unbiased but noisy: the iterate keeps a noise floor (measured: 0.22 for one run, 0.05 for 8, flat from 50
    # to 400 steps since the contraction here is ≈ 0.6 per step); averaging repeats shrinks it (≈ 1/√8).
    assert errors[8] < 0.1 and errors[8] < errors[1]
    # Without `subsample` the same call falls back to the full operator and is exact.
    full = lissa_solve(
        DenseMatrix(operator.dense()), rhs, damping=damping, batch_size=8, iterations=2000, tolerance=1e-8
    )
    assert full.extra["batch_size"] is None and rel_err(full.solution, exact) < 1e-5


def test_arnoldi_full_rank_equals_dense(spd):
    operator, eigenvalues, rhs = spd
    exact = solve(operator, rhs, method="dense", damping=0.05).solution
    result = arnoldi_solve(operator, rhs, damping=0.05, rank=40)
    assert result.converged and result.extra["rank"] == 40
    assert rel_err(result.solution, exact) <= 1e-10
    assert result.residual <= 1e-10
    torch.testing.assert_close(
        torch.tensor(sorted(result.extra["eigenvalues"]), dtype=DTYPE), eigenvalues, rtol=1e-10, atol=1e-12
    )


def test_arnoldi_low_rank_is_the_subspace_solve_and_reusable():
    # Top 5 eigenvalues 6..10, the rest in [0.01, 1]: a clear gap, so Ritz pairs converge in 2·rank+ steps.
    eigenvalues = torch.cat(
        [torch.linspace(0.01, 1.0, 55, dtype=DTYPE), torch.linspace(6, 10, 5, dtype=DTYPE)]
    )
    matrix = spd_matrix(60, eigenvalues, seed=6)
    operator = DenseMatrix(matrix)
    values, vectors = torch.linalg.eigh(matrix)
    top = vectors[:, -5:]
    rhs = torch.randn(3, 60, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    inverse = LowRankInverse.fit(operator, rank=5, iterations=25, damping=0.1)
    expected = (rhs @ top / (values[-5:] + 0.1)) @ top.T
    assert rel_err(inverse.apply(rhs), expected) < 1e-8  # many right-hand sides at once
    for row, want in zip(rhs, expected):
        result = arnoldi_solve(operator, row, damping=0.1, inverse=inverse)
        assert result.extra["products"] == 1 and rel_err(result.solution, want) < 1e-8
    redamped = inverse.with_damping(1.0)
    assert rel_err(redamped.apply(rhs[0]), (rhs[0] @ top / (values[-5:] + 1.0)) @ top.T) < 1e-8


def test_arnoldi_damping_complement_is_exact_for_low_rank_plus_zero():
    eigenvalues = torch.cat([torch.zeros(25, dtype=DTYPE), torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE)])
    operator = DenseMatrix(spd_matrix(28, eigenvalues, seed=8))
    rhs = torch.randn(28, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    exact = solve(operator, rhs, method="dense", damping=0.3).solution
    result = arnoldi_solve(operator, rhs, damping=0.3, rank=3, complement="damping")
    assert rel_err(result.solution, exact) < 1e-8 and result.residual < 1e-8
    truncated = arnoldi_solve(operator, rhs, damping=0.3, rank=3)
    assert truncated.residual > 0.5  # "zero" complement drops the 25-dim null space


def test_arnoldi_raises_on_kept_negative_eigenvalue():
    operator = DenseMatrix(spd_matrix(20, torch.linspace(-3.0, 2.0, 20, dtype=DTYPE), seed=10))
    rhs = torch.ones(20, dtype=DTYPE)
    with pytest.raises(SolverError, match="raise the damping above 3.000e"):
        arnoldi_solve(operator, rhs, damping=0.5, rank=4)
    values, _, _ = lanczos_eigenpairs(operator, rank=4, which="largest")
    assert float(values.min()) > 0  # keeping the largest (not the largest |λ|) avoids them
    arnoldi_solve(operator, rhs, damping=0.5, rank=4, which="largest")


def test_lanczos_survives_invariant_subspace():
    # rank-2 operator: the Krylov space of a random start closes after 3 steps; Lanczos must restart.
    vectors = torch.linalg.qr(torch.randn(10, 2, generator=torch.Generator().manual_seed(11), dtype=DTYPE))[0]
    operator = DenseMatrix(vectors @ torch.diag(torch.tensor([3.0, 1.0], dtype=DTYPE)) @ vectors.T)
    values, eigvecs, _ = lanczos_eigenpairs(operator, rank=10)
    assert sorted(round(v, 10) for v in values.tolist())[-2:] == [1.0, 3.0]
    torch.testing.assert_close(eigvecs.T @ eigvecs, torch.eye(10, dtype=DTYPE), atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["cg", "lissa", "arnoldi"])
def test_non_finite_values_raise(spd, method):
    operator, _, rhs = spd
    broken = operator.matrix.clone()
    broken[3, 5] = broken[5, 3] = float("nan")
    with pytest.raises(SolverError, match="non-finite"):
        solve(
            DenseMatrix(broken),
            rhs,
            method=method,
            damping=0.1,
            **({"scale": 20.0} if method == "lissa" else {}),
        )
    if method != "arnoldi":
        bad_rhs = rhs.clone()
        bad_rhs[0] = float("inf")
        with pytest.raises(SolverError, match="non-finite"):
            solve(operator, bad_rhs, method=method, damping=0.1)


def test_bad_arguments_raise_value_errors(spd):
    operator, _, rhs = spd
    with pytest.raises(ValueError, match="max_iterations"):
        cg_solve(operator, rhs, max_iterations=0)
    with pytest.raises(ValueError, match="scale"):
        lissa_solve(operator, rhs, scale=-1.0)
    with pytest.raises(ValueError, match="rank"):
        arnoldi_solve(operator, rhs, rank=0)
    with pytest.raises(ValueError, match="rhs"):
        cg_solve(operator, rhs[:-1])
    assert estimate_spectral_radius(operator, iterations=100) == pytest.approx(10.0, rel=1e-3)


# --- the real total Hessian of a small MAML problem ------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    """``LinearMAML(hidden=4, steps=2)`` on 8 regression tasks, trained (L-BFGS, float64) to the minimum of
    ``F = mean task loss + (0.1/2)‖λ‖²``, where the total Hessian is SPD (eigenvalues ≈ 0.012 .. 11.2)."""
    problem = LinearMAML(inner_lr=0.1, steps=2, hidden=4)
    tasks = regression_tasks(8)
    params = problem.init_params(3, 1, seed=0)
    layout = ParamLayout.of(params)
    flat = layout.flatten({k: v.detach() for k, v in params.items()}).clone().requires_grad_(True)
    loss_fn = torch.func.vmap(batched_task_loss(problem), in_dims=(None, 0, 0, 0, 0))
    tensors = task_tensors(tasks)
    optimizer = torch.optim.LBFGS(
        [flat],
        lr=1,
        max_iter=300,
        tolerance_grad=1e-10,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(layout.unflatten(flat), *tensors).mean() + 0.05 * (flat**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    trained = {k: v.detach().requires_grad_(True) for k, v in layout.unflatten(flat.detach()).items()}
    operator = TotalHessian(problem, trained, tasks, l2=0.1)
    matrix = operator.dense()
    eigenvalues = torch.linalg.eigvalsh(matrix)
    rhs = torch.randn(operator.dim, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    return problem, tasks, params, operator, DenseMatrix(matrix), eigenvalues, rhs


def test_real_hessian_is_spd_at_the_minimum(real):
    *_, eigenvalues, _ = real
    assert float(eigenvalues.min()) > 1e-3 and float(eigenvalues.max()) < 100


def test_real_cg_matches_dense(real):
    _, _, _, operator, dense, eigenvalues, rhs = real
    exact = solve(dense, rhs, method="dense").solution
    result = solve(operator, rhs, method="cg", tolerance=1e-9)
    assert result.converged and result.residual <= 1e-9
    # κ ≈ 1e3 here: relative error ≤ κ · relative residual.
    assert rel_err(result.solution, exact) <= condition(eigenvalues, 0.0) * result.residual * 1.01


def test_real_cg_raises_on_indefinite_hessian_away_from_the_minimum(real):
    problem, tasks, params, *_ = real
    # At initialisation the total Hessian has eigenvalues down to ≈ −7.
    operator = TotalHessian(problem, params, tasks, l2=0.1)
    rhs = torch.randn(operator.dim, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    with pytest.raises(SolverError, match="not positive definite"):
        cg_solve(operator, rhs, damping=0.01)


def test_real_lissa_matches_dense(real):
    _, _, _, operator, dense, eigenvalues, rhs = real
    damping, tolerance = 3.0, 1e-6  # δ = 3 keeps the series short (ρ ≈ 0.81, ~70 products)
    exact = solve(dense, rhs, method="dense", damping=damping).solution
    result = lissa_solve(operator, rhs, damping=damping, tolerance=tolerance, power_iterations=10)
    assert result.converged
    tail = tolerance * result.extra["scale"] / (float(eigenvalues.min()) + damping)
    assert rel_err(result.solution, exact) <= 2 * tail
    # Mini-batches of 4 of the 8 tasks through TotalHessian.subsample: unbiased, so roughly right.
    stochastic = lissa_solve(
        operator, rhs, damping=damping, scale=result.extra["scale"], batch_size=4, iterations=20, seed=1
    )
    assert stochastic.extra["batch_size"] == 4
    assert rel_err(stochastic.solution, exact) < 0.2


def test_real_arnoldi_matches_dense(real):
    _, _, _, operator, dense, eigenvalues, rhs = real
    damping = 0.01
    exact = solve(dense, rhs, method="dense", damping=damping).solution
    result = solve(operator, rhs, method="arnoldi", damping=damping, rank=operator.dim)
    assert rel_err(result.solution, exact) <= 1e-9 and result.residual <= 1e-9
    torch.testing.assert_close(
        torch.tensor(sorted(result.extra["eigenvalues"]), dtype=DTYPE), eigenvalues, rtol=1e-8, atol=1e-10
    )
