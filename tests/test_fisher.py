"""The empirical-Fisher influence direction against explicit solves (both factorisations, DDP-style sums)."""

from __future__ import annotations

import pytest
import torch

from lightning_metaif.influence.curvature import AUTO_DAMPING_FRACTION
from lightning_metaif.influence.fisher import fisher_direction
from lightning_metaif.influence.solvers.base import SolverError


def explicit(rows: torch.Tensor, weights: torch.Tensor, b: torch.Tensor, delta: float) -> torch.Tensor:
    fisher = (rows.T * (weights / len(rows))) @ rows
    return torch.linalg.solve(fisher + delta * torch.eye(len(b), dtype=torch.float64), b)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "p"), [(7, 20), (40, 9)])  # Woodbury (n <= p) and p x p Cholesky
def test_matches_an_explicit_solve(seed, n, p):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.rand(
        n, 1, generator=g, dtype=torch.float64
    )
    weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(p, generator=g, dtype=torch.float64)
    s, info = fisher_direction(rows, b, weights=weights, damping=0.3)
    torch.testing.assert_close(s, explicit(rows, weights, b, 0.3), rtol=1e-9, atol=1e-12)
    assert info["solver"] == ("woodbury" if n <= p else "cholesky") and info["residual"] < 1e-10
    s, info = fisher_direction(rows, b, weights=weights)  # auto: a fraction of trace / rank
    delta = AUTO_DAMPING_FRACTION * float((rows.pow(2).sum(1) * weights).sum()) / n / min(n, p)
    assert info["damping"] == pytest.approx(delta, rel=1e-12) and info["damping_rule"] == "auto"
    torch.testing.assert_close(s, explicit(rows, weights, b, delta), rtol=1e-7, atol=1e-10)


def test_rows_split_over_two_processes_solve_like_one():
    """With an all-reduce sum, each process's rows contribute to one Fisher: same direction as all rows at once."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(10, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    first, second = rows[:4], rows[4:]

    def sum_with(other: torch.Tensor):
        calls = []

        def reduce(x: torch.Tensor) -> torch.Tensor:  # what the other process contributes to each all-reduce
            calls.append(x)
            if len(calls) == 1:
                return x + len(other)
            return x + (other.T @ other) / 10

        return reduce

    one, _ = fisher_direction(rows, b, damping=0.2)
    split, info = fisher_direction(first, b, damping=0.2, sum_over_processes=sum_with(second))
    torch.testing.assert_close(split, one, rtol=1e-10, atol=1e-12)
    assert info["rows"] == 10
    with pytest.raises(ValueError, match="projection_dim"):
        fisher_direction(torch.zeros(2, 5000), torch.zeros(5000), sum_over_processes=lambda x: x)


def test_bad_input_and_singular_systems_fail_loudly():
    with pytest.raises(SolverError, match="singular"):
        fisher_direction(
            torch.ones(1, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), damping=0.0
        )
    with pytest.raises(ValueError, match="damping"):
        fisher_direction(torch.ones(2, 3), torch.ones(3), damping=-1.0)
    with pytest.raises(ValueError, match=r"rows must be \[n, p\]"):
        fisher_direction(torch.ones(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="at least one gradient row"):
        fisher_direction(torch.zeros(0, 3), torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        fisher_direction(torch.ones(2, 3), torch.ones(3), weights=torch.tensor([1.0, -1.0]))
