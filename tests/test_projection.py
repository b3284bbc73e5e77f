"""Seeded block-generated random projections: determinism, Johnson-Lindenstrauss statistics, bounded memory.

Heaviest test: ``test_two_million_coordinates_in_bounded_blocks`` (generates 128 M Rademacher entries, a few
seconds of CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import LinearMAML, regression_tasks

from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.projection import RandomProjection, chunk_seed


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_same_seed_same_projection_across_calls_block_sizes_and_dtypes(kind):
    x = torch.randn(5, 3001, dtype=torch.float64)
    reference = RandomProjection(3001, 40, seed=11, kind=kind, dtype=torch.float64, cache_elements=0)
    matrix = reference.matrix()
    assert matrix.shape == (40, 3001)
    for block_size in (1, 7, 1000, 3001, 10**6):
        other = RandomProjection(3001, 40, seed=11, kind=kind, block_size=block_size, cache_elements=0)
        assert torch.equal(other.matrix().double(), matrix)  # P itself is bitwise identical
        torch.testing.assert_close(other(x.float()).double(), x @ matrix.T, rtol=1e-5, atol=1e-5)
    cached = RandomProjection(3001, 40, seed=11, kind=kind, dtype=torch.float64)
    first, second = cached(x), cached(x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, x @ matrix.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference(x), x @ matrix.T, rtol=1e-12, atol=1e-12)
    # Rows are projected independently of how they are batched; a flat vector works too.
    torch.testing.assert_close(reference(x[2]), reference(x)[2], rtol=1e-12, atol=1e-12)
    assert not torch.equal(RandomProjection(3001, 40, seed=12, kind=kind).matrix(), matrix.float())


def test_pinned_values_guard_cross_machine_and_version_determinism():
    """The first entries for seed 0: if these change, stored projected gradients become incomparable."""
    gaussian = RandomProjection(100, 8, seed=0).chunk(0)
    expected = [-0.3403577506542206, 0.13728328049182892, -0.0780065730214119, 0.392150342464447]
    torch.testing.assert_close(gaussian[0, :4], torch.tensor(expected), rtol=0, atol=1e-7)
    expected_tail = [-0.6797756552696228, -0.2318745106458664, -0.23283575475215912, 0.17875303328037262]
    torch.testing.assert_close(gaussian[99, 4:], torch.tensor(expected_tail), rtol=0, atol=1e-7)
    signs = torch.sign(RandomProjection(100, 8, seed=0, kind="rademacher").chunk(0)[0]).tolist()
    assert signs == [-1, -1, 1, 1, -1, 1, -1, -1]
    assert chunk_seed(0, 0) == 6017775124710473527 and chunk_seed(7, 0) == 6654738377353848610


def test_entry_distribution():
    d = 32
    gaussian = RandomProjection(20_000, d, seed=1).matrix().double()
    n = gaussian.numel()
    # Mean 0 and variance 1/d, within 5 standard errors.
    assert abs(float(gaussian.mean())) < 5 / math.sqrt(n * d)
    assert abs(float(gaussian.var()) * d - 1) < 5 * math.sqrt(2 / n)
    kurtosis = float((gaussian**4).mean()) * d**2
    assert abs(kurtosis - 3) < 5 * math.sqrt(96 / n)  # Gaussian: E z⁴ = 3, Var z⁴ = 96
    rademacher = RandomProjection(2000, d, seed=1, kind="rademacher").matrix()
    torch.testing.assert_close(rademacher.abs(), torch.full_like(rademacher, 1 / math.sqrt(d)))
    assert abs(float(torch.sign(rademacher).mean())) < 5 / math.sqrt(rademacher.numel())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_johnson_lindenstrauss_norms_and_inner_products(kind):
    """Over projections with different seeds, ‖Pa‖²/‖a‖² − 1 has standard deviation ≤ √(2/d) (Gaussian: exactly;
    Rademacher: smaller), and ⟨Pa, Pb⟩ − ⟨a, b⟩ has variance ≤ (‖a‖²‖b‖² + ⟨a,b⟩²)/d. Bounds: 5 sigma per trial,
    and the mean over trials within 5 sigma/√trials (unbiasedness)."""
    p, d, trials = 1000, 128, 60
    g = torch.Generator().manual_seed(0)
    a = torch.randn(p, generator=g, dtype=torch.float64)
    b = 0.6 * a + torch.randn(p, generator=g, dtype=torch.float64)  # correlated: ⟨a, b⟩ ≠ 0
    x = torch.stack([a, b])
    ratios, errors = [], []
    for seed in range(trials):
        pa, pb = RandomProjection(p, d, seed=seed, kind=kind, dtype=torch.float64)(x)
        ratios.append(float(pa @ pa / (a @ a)) - 1)
        errors.append(float(pa @ pb - a @ b))
    ratios, errors = torch.tensor(ratios), torch.tensor(errors)
    sigma_norm = math.sqrt(2 / d)
    sigma_inner = math.sqrt((float(a @ a) * float(b @ b) + float(a @ b) ** 2) / d)
    assert ratios.abs().max() < 5 * sigma_norm
    assert errors.abs().max() < 5 * sigma_inner
    assert abs(float(ratios.mean())) < 5 * sigma_norm / math.sqrt(trials)
    assert abs(float(errors.mean())) < 5 * sigma_inner / math.sqrt(trials)
    # The spread is really of order 1/√d (the test would notice a projection that is too good or too bad).
    assert 0.4 * sigma_norm < float(ratios.std()) < 1.5 * sigma_norm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sjlt_keeps_every_pairwise_inner_product_of_a_gradient_set_within_the_jl_tolerance(seed):
    """The Johnson-Lindenstrauss statement for a *set*: one SJLT (the store's default, d = 1024) keeps all
    pairwise inner products of 40 vectors at once within ε·‖a‖‖b‖, ε = √(2/d)·√(2 ln(2N/0.01)) for the
    N = 820 pairs (a Gaussian tail bound per pair with std ≤ √(2/d), union bound, 1% failure). The vectors
    are gradient-like: heavy-tailed coordinates (a few dominate, where sparse projections are weakest) and
    correlated. The errors' spread must also be of order √(1/d) (a broken projection that returned its input
    scaled would fail the lower bound)."""
    p, d, n = 5000, 1024, 40
    g = torch.Generator().manual_seed(100 + seed)
    scale = torch.randn(p, generator=g, dtype=torch.float64).abs() ** 3
    common = torch.randn(p, generator=g, dtype=torch.float64) * scale
    x = 0.5 * common + torch.randn(n, p, generator=g, dtype=torch.float64) * scale
    px = RandomProjection(p, d, seed=seed, kind="sjlt", dtype=torch.float64)(x)
    norms = x.norm(dim=1)
    errors = (px @ px.T - x @ x.T) / (norms[:, None] * norms[None, :])
    pairs = errors[
        torch.triu_indices(n, n)[0], torch.triu_indices(n, n)[1]
    ]  # i <= j: norms and inner products
    epsilon = math.sqrt(2 / d) * math.sqrt(2 * math.log(2 * len(pairs) / 0.01))
    assert float(pairs.abs().max()) < epsilon
    rms = float(pairs.pow(2).mean().sqrt())
    assert 0.5 * math.sqrt(1 / d) < rms < 1.2 * math.sqrt(2 / d)


def test_two_million_coordinates_in_bounded_blocks():
    p, d = 2_000_000, 64
    projection = RandomProjection(p, d, seed=5, kind="rademacher", block_size=65536)
    bound = max(projection.block_size, projection.chunk_rows) * d
    # The generator layout alone shows that no block holds the whole p x d matrix.
    sizes = [(stop - start) * d for start, stop, _ in _block_ranges(projection)]
    assert sum(sizes) == p * d and max(sizes) <= bound < p * d // 20
    # Project two one-hot rows (coordinates in different blocks): the output is that row of Pᵀ.
    coords = [123_457, p - 1]
    x = torch.zeros(2, p)
    x[0, coords[0]] = 1.0
    x[1, coords[1]] = 1.0
    out = projection(x)
    assert out.shape == (2, d)
    assert projection._cache is None and 0 < projection.peak_block_elements <= bound
    for row, coord in zip(out, coords):
        chunk = projection.chunk(coord // projection.chunk_rows)
        torch.testing.assert_close(row, chunk[coord % projection.chunk_rows], rtol=0, atol=0)


def _block_ranges(projection):
    """(start, stop) of each block without generating it: the same arithmetic as ``blocks``."""
    per_block = max(1, projection.block_size // projection.chunk_rows)
    for first in range(0, projection.num_chunks, per_block):
        last = min(first + per_block, projection.num_chunks)
        yield first * projection.chunk_rows, min(last * projection.chunk_rows, projection.in_dim), None


def test_blocks_generator_matches_block_ranges():
    projection = RandomProjection(20_000, 300, seed=2, kind="rademacher", block_size=7000, cache_elements=0)
    produced = [(start, stop, block.shape) for start, stop, block in projection.blocks()]
    assert [(s, e) for s, e, _ in produced] == [(s, e) for s, e, _ in _block_ranges(projection)]
    assert all(shape == (e - s, 300) for s, e, shape in produced)
    projection(torch.randn(3, 20_000))
    assert projection.peak_block_elements == max((e - s) * 300 for s, e, _ in produced)


def test_in_dim_smaller_than_out_dim_still_projects():
    projection = RandomProjection(3, 10, seed=0)
    x = torch.eye(3)
    out = projection(x)
    assert out.shape == (3, 10) and not torch.allclose(out[:, :3], x)


def test_state_dict_round_trip_and_validation():
    projection = RandomProjection(500, 16, seed=9, kind="rademacher", block_size=128, dtype=torch.float64)
    state = projection.state_dict()
    assert state["dtype"] == "float64" and state["version"] == 1
    again = RandomProjection.from_state_dict(state)
    assert torch.equal(again.matrix(), projection.matrix()) and again.dtype == torch.float64
    bad_inputs = [
        (dict(in_dim=0, out_dim=4), "in_dim"),
        (dict(in_dim=10, out_dim=2.5), "out_dim"),
        (dict(in_dim=10, out_dim=True), "out_dim"),
        (dict(in_dim=10, out_dim=4, seed=-1), "seed"),
        (dict(in_dim=10, out_dim=4, kind="sparse"), "kind"),
        (dict(in_dim=10, out_dim=4, block_size=0), "block_size"),
        (dict(in_dim=10, out_dim=4, dtype=torch.int64), "dtype"),
    ]
    for kwargs, word in bad_inputs:
        with pytest.raises(ValueError, match=word):
            RandomProjection(kwargs.pop("in_dim"), kwargs.pop("out_dim"), **kwargs)
    with pytest.raises(ValueError, match=r"\[n, 500\]"):
        projection(torch.zeros(2, 499))
    with pytest.raises(ValueError, match="version"):
        RandomProjection.from_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="missing"):
        RandomProjection.from_state_dict({"version": 1, "in_dim": 3})


def test_as_transform_of_per_task_gradients():
    problem = LinearMAML(inner_lr=0.1, steps=1)
    params = problem.init_params(3, 1)
    tasks = regression_tasks(5)
    full, _ = per_task_gradients(problem, params, tasks)
    projection = RandomProjection(full.shape[1], 3, seed=4, dtype=torch.float64)
    projected, _ = per_task_gradients(problem, params, tasks, chunk_size=2, transform=projection)
    torch.testing.assert_close(projected, projection(full))


@pytest.mark.parametrize("nonzeros", [1, 4])
def test_sjlt_is_sparse_one_entry_per_block_and_never_dense(nonzeros):
    p, d = 5000, 64
    projection = RandomProjection(p, d, seed=3, kind="sjlt", nonzeros=nonzeros, dtype=torch.float64)
    x = torch.randn(3, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = projection(x)
    # Applied by scatter-adds: no dense block of P was ever generated for the call.
    assert projection._cache is None and projection.peak_block_elements == 0
    matrix = RandomProjection(p, d, seed=3, kind="sjlt", nonzeros=nonzeros, dtype=torch.float64).matrix()
    torch.testing.assert_close(out, x @ matrix.T, rtol=1e-12, atol=1e-12)
    # Every input coordinate has exactly one entry ±1/√s in each of the s blocks of d/s output rows.
    assert torch.all((matrix != 0).sum(0) == nonzeros)
    torch.testing.assert_close(
        matrix[matrix != 0].abs(), torch.full(((matrix != 0).sum(),), nonzeros**-0.5, dtype=torch.float64)
    )
    for block in range(nonzeros):
        rows = matrix[block * d // nonzeros : (block + 1) * d // nonzeros]
        assert torch.all((rows != 0).sum(0) == 1)
    state = projection.state_dict()
    assert state["kind"] == "sjlt" and state["nonzeros"] == nonzeros
    torch.testing.assert_close(RandomProjection.from_state_dict(state)(x), out, rtol=0, atol=0)


def test_sjlt_sparse_product_equals_its_scatter_adds():
    """The SJLT is applied as one CSR product; the scatter-add fallback (devices without one) gives the same
    numbers."""
    projection = RandomProjection(3000, 256, seed=5, kind="sjlt", block_size=700)
    x = torch.randn(7, 3000, generator=torch.Generator().manual_seed(0))
    fast = projection(x)
    projection._sparse_matrix = lambda device: None  # force the fallback
    torch.testing.assert_close(fast, projection(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast, x @ projection.matrix().T, rtol=1e-5, atol=1e-5)


def test_sjlt_on_a_device_dtype_without_csr_product_falls_back_once():
    """float16 on a CPU has no CSR product: the projection uses the scatter-adds with the same numbers as float32
    and does not rebuild the sparse matrix on every call to find that out again."""
    x = torch.randn(5, 600, generator=torch.Generator().manual_seed(1))
    half = RandomProjection(600, 64, seed=2, kind="sjlt", dtype=torch.float16)
    reference = RandomProjection(600, 64, seed=2, kind="sjlt")(x)
    for _ in range(2):
        torch.testing.assert_close(half(x).float(), reference, rtol=0.02, atol=0.02)
        assert half._no_csr == {torch.device("cpu")} and half._csr is None
