"""Estimators on small float64 problems: exact formulas, solver agreement, paths, TracIn, errors (CPU, seconds)."""

import json

import pytest
import torch
from problems import LinearMAML, classification_tasks

from lightning_metaif.influence.estimators import (
    DEFAULT_DAMPING,
    Checkpoint,
    DirectProblem,
    InfluenceResult,
    parameter_change,
    task_influence,
    tracin_scores,
)
from lightning_metaif.influence.gradients import per_task_gradients, reference_gradient
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.instance import instance_influence
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.retraining import train_to_convergence
from lightning_metaif.influence.tasks import Task, TaskBatch
from lightning_metaif.influence.tracin import TracInAccumulator

L2 = 0.1


@pytest.fixture(scope="module")
def setup():
    """A 2-step MAML MLP classifier trained to convergence (total Hessian PD thanks to the L2 term)."""
    torch.manual_seed(0)
    problem = LinearMAML(inner_lr=0.5, steps=2, kind="classification", hidden=3)
    train = classification_tasks(8, seed=1, corrupt=(0,), corrupt_mode="shift", shots=2, queries=3)
    ref = classification_tasks(4, seed=2, id_offset=1000, shots=2, queries=3)
    fit = train_to_convergence(problem, problem.init_params(4, 3, seed=0), train, l2=L2)
    assert fit.converged and fit.min_eigenvalue > 0
    return problem, train, ref, fit.params


def explicit_scores(problem, params, train, ref, damping, l2=L2, weights=None):
    grads, _ = per_task_gradients(problem, params, train)
    ref_grad, _ = reference_gradient(problem, params, ref)
    hessian = TotalHessian(problem, params, train, l2=l2, task_weights=weights).dense()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    solution = torch.linalg.solve(hessian + damping * eye, ref_grad)
    w = torch.ones(len(train), dtype=grads.dtype) if weights is None else weights
    return w * (grads @ solution) / len(train), grads, ref_grad, hessian + damping * eye


def test_task_if_matches_explicit_formula_and_sign(setup):
    problem, train, ref, params = setup
    result = task_influence(
        problem, params, train, ref, solver="dense", damping=0.01, l2=L2, curvature="exact"
    )
    expected, *_ = explicit_scores(problem, params, train, ref, 0.01)
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-12)
    assert result.task_ids.tolist() == train.task_ids.tolist() and len(result) == 8
    assert result.estimator == "task_if" and result.self_influence is None
    d = result.diagnostics
    assert d["num_params"] == ParamLayout.of(params).numel and d["num_tasks"] == 8
    assert d["solver"] == "dense" and d["damping"] == 0.01 and d["residual"] < 1e-10 and d["seconds"] > 0
    assert abs(d["reference_value"] - reference_gradient(problem, params, ref)[1].item()) < 1e-12
    json.dumps(result.to_dict())
    # the corrupted task (shuffled query labels, id 0) harms the clean reference tasks
    assert result.scores[0] < 0 and result.ranking()[0].item() == 0


def test_task_weights_scale_scores_and_hessian(setup):
    problem, train, ref, params = setup
    weights = torch.linspace(0.5, 1.5, len(train), dtype=torch.float64)
    result = task_influence(
        problem,
        params,
        train,
        ref,
        solver="dense",
        damping=0.01,
        l2=L2,
        task_weights=weights,
        curvature="exact",
    )
    expected, *_ = explicit_scores(problem, params, train, ref, 0.01, weights=weights)
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "solver, options, damping, tol",
    [
        ("cg", {"tolerance": 1e-12, "max_iterations": 200}, 0.1, 1e-6),
        ("lissa", {"iterations": 2000, "tolerance": 1e-8}, 1.0, 1e-4),  # large δ: fast Neumann convergence
        ("arnoldi", {"rank": 200}, 0.1, 1e-6),
    ],
)
def test_every_solver_matches_dense(setup, solver, options, damping, tol):
    problem, train, ref, params = setup
    dense = task_influence(problem, params, train, ref, solver="dense", damping=damping, l2=L2)
    other = task_influence(
        problem, params, train, ref, solver=solver, damping=damping, l2=L2, solver_options=options
    )
    scale = dense.scores.abs().max()
    assert (other.scores - dense.scores).abs().max() <= tol * scale, (solver, other.diagnostics["residual"])
    assert other.diagnostics["solver"] == solver and other.diagnostics["iterations"] > 0


def test_identity_solver_is_inner_product_and_tracin(setup):
    problem, train, ref, params = setup
    grads, _ = per_task_gradients(problem, params, train)
    ref_grad, _ = reference_gradient(problem, params, ref)
    ip = task_influence(problem, params, train, ref, solver="identity")
    torch.testing.assert_close(ip.scores, grads @ ref_grad / len(train))
    tracin = task_influence(problem, params, train, ref, estimator="tracin")
    torch.testing.assert_close(tracin.scores, grads @ ref_grad)  # η = 1, no 1/M (TracInCP convention)
    one = task_influence(
        problem, params, train, ref, estimator="tracin", checkpoints=[Checkpoint(params, 0.3)]
    )
    torch.testing.assert_close(one.scores, 0.3 * grads @ ref_grad)
    ensemble = task_influence(
        problem, params, train, ref, estimator="ensemble", checkpoints=[Checkpoint(params, 0.3)]
    )
    torch.testing.assert_close(ensemble.scores, grads @ ref_grad)  # ensemble: plain IP average, η ignored
    assert ensemble.diagnostics["num_members"] == 1 and ensemble.diagnostics["mean_member_std"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracin_on_a_maml_module_matches_an_independent_autograd_loop(seed):
    """TracIn of the ``MAML`` module (tanh MLP on sinusoids, MSE, 2 inner steps: the meta-gradient runs through
    the adaptation) equals ``⟨∇f, g_k⟩`` computed independently: one ``torch.autograd.grad`` of ``task_loss``
    per task and per reference task, ``f`` the mean reference loss (the same numbers dattri's TracIn computes
    without its random projection, ``benchmarks/bench_peers.py --tracin-audit``)."""
    from lightning_metaif.meta.maml import MAML
    from lightning_metaif.meta.pools import SinusoidTaskPool

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    problem = MAML(net, loss="mse", inner_lr=0.05, inner_steps=2).double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in problem.meta_parameters().items()}
    train = SinusoidTaskPool(6, shots=5, queries=5, seed=seed, dtype=torch.float64).batch()
    ref = SinusoidTaskPool(3, shots=5, queries=5, seed=50 + seed, id_offset=100, dtype=torch.float64).batch()

    def autograd_rows(tasks):
        rows = []
        for i in range(len(tasks)):
            task = Task(tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i])
            grads = torch.autograd.grad(problem.task_loss(params, task), list(params.values()))
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return torch.stack(rows)

    expected = autograd_rows(train) @ autograd_rows(ref).mean(0)
    result = task_influence(problem, params, train, ref, estimator="tracin")
    torch.testing.assert_close(result.scores, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 0


def test_tracin_checkpoints_and_preconditioner(setup):
    problem, train, ref, params = setup
    other = {k: (v + 0.05).detach().requires_grad_(True) for k, v in params.items()}
    p = ParamLayout.of(params).numel
    pre = torch.linspace(0.1, 2.0, p, dtype=torch.float64)
    checkpoints = [Checkpoint(other, 0.2, preconditioner=pre), Checkpoint(params, 0.1)]
    result = task_influence(
        problem, params, train, ref, estimator="tracin", checkpoints=checkpoints, with_self_influence=True
    )
    expected, expected_self = 0, 0
    for point, lr, precond in ((other, 0.2, pre), (params, 0.1, torch.ones(p, dtype=torch.float64))):
        grads, _ = per_task_gradients(problem, point, train)
        ref_grad, _ = reference_gradient(problem, point, ref)
        expected = expected + lr * (grads * precond) @ ref_grad
        expected_self = expected_self + lr * (grads * precond * grads).sum(1)
    torch.testing.assert_close(result.scores, expected)
    torch.testing.assert_close(result.self_influence, expected_self)
    torch.testing.assert_close(tracin_scores(problem, checkpoints, train, ref).scores, expected)
    with pytest.raises(ValueError, match="preconditioner has 3 entries"):
        task_influence(
            problem,
            params,
            train,
            ref,
            estimator="tracin",
            checkpoints=[Checkpoint(params, 1.0, torch.ones(3))],
        )


def test_ensemble_noise_copies_are_seeded_and_report_spread(setup):
    problem, train, ref, params = setup
    kwargs = {"estimator": "ensemble", "noise_copies": 3, "noise_std": 0.01}
    a = task_influence(problem, params, train, ref, seed=1, **kwargs)
    b = task_influence(problem, params, train, ref, seed=1, **kwargs)
    c = task_influence(problem, params, train, ref, seed=2, **kwargs)
    ip = task_influence(problem, params, train, ref, estimator="tracin")
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    assert not torch.allclose(a.scores, c.scores)
    assert a.diagnostics["num_members"] == 4 and a.diagnostics["member_std"].shape == (8,)
    assert a.diagnostics["mean_member_std"] > 0
    # small noise: close to, but not equal to, the inner product at λ
    assert (a.scores - ip.scores).abs().max() < 0.5 * ip.scores.abs().max()
    zero = task_influence(
        problem, params, train, ref, seed=1, estimator="ensemble", noise_copies=2, noise_std=0.0
    )
    torch.testing.assert_close(zero.scores, ip.scores)
    assert zero.diagnostics["mean_member_std"] < 1e-12


def test_self_influence(setup):
    problem, train, ref, params = setup
    grads, _ = per_task_gradients(problem, params, train)
    identity = task_influence(problem, params, train, estimator="self", solver="identity")
    torch.testing.assert_close(identity.self_influence, (grads**2).sum(1))
    torch.testing.assert_close(identity.scores, -(grads**2).sum(1))  # lowest score = most unusual
    _, _, _, damped = explicit_scores(problem, params, train, ref, 0.01)
    exact = torch.einsum("kp,pq,kq->k", grads, torch.linalg.inv(damped), grads)
    dense = task_influence(
        problem, params, train, estimator="self", solver="dense", damping=0.01, l2=L2, curvature="exact"
    )
    torch.testing.assert_close(dense.self_influence, exact)
    kwargs = {
        "estimator": "self",
        "damping": 0.1,
        "l2": L2,
        "curvature": "exact",
    }  # three tasks alone: λ_min(H) < 0 here
    cg = task_influence(
        problem,
        params,
        train[:3],
        solver="cg",
        solver_options={"tolerance": 1e-12, "max_iterations": 200},
        **kwargs,
    )  # one CG solve per task
    dense_three = task_influence(problem, params, train[:3], solver="dense", **kwargs)
    torch.testing.assert_close(cg.self_influence, dense_three.self_influence, rtol=1e-6, atol=1e-10)
    beside = task_influence(
        problem,
        params,
        train,
        ref,
        solver="dense",
        damping=0.01,
        l2=L2,
        with_self_influence=True,
        curvature="exact",
    )
    torch.testing.assert_close(beside.self_influence, exact)
    # the corrupted task is the most self-influential one
    assert int(dense.self_influence.argmax()) == 0 and dense.ranking()[0].item() == 0


def test_projection_applies_to_both_gradients(setup):
    problem, train, ref, params = setup
    p = ParamLayout.of(params).numel
    matrix = torch.randn(6, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def projection(rows):
        return rows @ matrix.T

    grads, _ = per_task_gradients(problem, params, train)
    ref_grad, _ = reference_gradient(problem, params, ref)
    result = task_influence(
        problem, params, train, ref, estimator="tracin", projection=projection, with_self_influence=True
    )
    torch.testing.assert_close(result.scores, (grads @ matrix.T) @ (matrix @ ref_grad))
    torch.testing.assert_close(result.self_influence, ((grads @ matrix.T) ** 2).sum(1))
    identity = task_influence(problem, params, train, ref, solver="identity", projection=projection)
    torch.testing.assert_close(identity.scores, result.scores / len(train))
    self_proj = task_influence(
        problem, params, train, estimator="self", solver="identity", projection=projection
    )
    torch.testing.assert_close(self_proj.self_influence, result.self_influence)


def test_random_projection_preserves_inner_products(setup):
    projection_module = pytest.importorskip("lightning_metaif.influence.projection")
    problem, train, ref, params = setup
    p = ParamLayout.of(params).numel
    exact = task_influence(problem, params, train, ref, estimator="tracin")
    projected = task_influence(
        problem, params, train, ref, estimator="tracin",
        projection=projection_module.RandomProjection(p, 4096, seed=0, dtype=torch.float64),
    )  # fmt: skip
    from scipy.stats import spearmanr

    assert spearmanr(exact.scores, projected.scores)[0] > 0.9


def test_utility_path_matches_reference_path(setup):
    problem, train, ref, params = setup

    def utility(p):
        return torch.stack([problem.task_loss(p, task) for task in ref]).mean()

    for estimator in ("task_if", "tracin"):
        a = task_influence(problem, params, train, ref, estimator=estimator, solver="dense", l2=L2)
        b = task_influence(
            problem, params, train, utility=utility, estimator=estimator, solver="dense", l2=L2
        )
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-9, atol=1e-12)
        assert abs(a.diagnostics["reference_value"] - b.diagnostics["reference_value"]) < 1e-12


def test_direct_if_is_first_order_view(setup):
    problem, train, ref, params = setup
    direct = DirectProblem(problem)
    task = train[1]
    value = direct.task_loss(params, task)
    torch.testing.assert_close(value, problem.task_loss(params, task))
    grad_direct = torch.autograd.grad(value, list(params.values()))
    adapted = {k: v.detach().requires_grad_(True) for k, v in problem.adapt(params, task).items()}
    fomaml = torch.autograd.grad(problem.outer_loss(adapted, params, task), list(adapted.values()))
    for a, b in zip(grad_direct, fomaml):
        torch.testing.assert_close(a, b)
    exact = {"solver": "dense", "l2": L2, "curvature": "exact"}
    r_direct = task_influence(problem, params, train, ref, estimator="direct_if", **exact)
    r_total = task_influence(problem, params, train, ref, estimator="task_if", **exact)
    assert not torch.allclose(r_direct.scores, r_total.scores, rtol=0.05)
    # without adaptation steps the two coincide
    plain = LinearMAML(inner_lr=0.5, steps=0, kind="classification", hidden=3)
    a = task_influence(plain, params, train, ref, estimator="direct_if", damping=0.5, **exact)
    b = task_influence(plain, params, train, ref, estimator="task_if", damping=0.5, **exact)
    torch.testing.assert_close(a.scores, b.scores)


def test_vmap_and_loop_paths_agree(setup):
    problem, train, ref, params = setup
    train = train[:5]  # the loop path is slower; damping keeps the 5-task Hessian PD
    kwargs = {"damping": 0.5, "l2": L2}
    for estimator, solver in (("task_if", "dense"), ("direct_if", "cg"), ("tracin", "identity")):
        a = task_influence(
            problem, params, train, ref, estimator=estimator, solver=solver, chunk_size=3, **kwargs
        )
        b = task_influence(
            problem, params, list(train), list(ref), estimator=estimator, solver=solver, **kwargs
        )
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-7, atol=1e-12)
        assert a.task_ids.tolist() == b.task_ids.tolist()
    ia = instance_influence(problem, params, train, ref, solver="dense", chunk_size=3, **kwargs)
    ib = instance_influence(
        problem, params, list(train), list(ref), solver="dense", vectorize="loop", **kwargs
    )
    torch.testing.assert_close(ia.support_scores, ib.support_scores, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(ia.query_scores, ib.query_scores, rtol=1e-9, atol=1e-13)


def test_instance_scores_are_consistent_with_task_scores(setup):
    problem, train, ref, params = setup
    kwargs = {"solver": "dense", "damping": 0.01, "l2": L2, "curvature": "exact"}
    inst = instance_influence(problem, params, train, ref, **kwargs)
    task = task_influence(problem, params, train, ref, **kwargs)
    assert inst.support_scores.shape == (8, 6) and inst.query_scores.shape == (8, 9)
    # query weights enter the loss linearly, so a task's query scores add up to its task score
    torch.testing.assert_close(inst.task_scores(), task.scores, rtol=1e-9, atol=1e-13)
    # finite-difference check of one support and one query score (u_z: 1 -> 1 - ε)
    _, _, _, damped = explicit_scores(problem, params, train, ref, 0.01)
    ref_grad, _ = reference_gradient(problem, params, ref)
    s = torch.linalg.solve(damped, ref_grad)
    layout = ParamLayout.of(params)
    k, eps = 2, 1e-6
    for part, index in (("support", 4), ("query", 7)):
        weights = torch.ones(6 if part == "support" else 9, dtype=torch.float64)

        def dot(w, part=part):
            kwargs = {"support_weights" if part == "support" else "query_weights": w}
            g = torch.autograd.grad(problem.task_loss(params, train[k], **kwargs), list(params.values()))
            return float(layout.flatten(dict(zip(params, g))) @ s)

        minus = weights.clone()
        minus[index] -= eps
        fd = (dot(weights) - dot(minus)) / eps / len(train)
        got = (inst.support_scores if part == "support" else inst.query_scores)[k, index]
        assert abs(float(got) - fd) < 1e-5 * max(1e-3, abs(fd)), (part, float(got), fd)
    ranking = inst.ranking()
    assert len(ranking) == 8 * 15 and ranking[0][1] in ("support", "query")
    json.dumps(inst.to_dict())


def test_instance_influence_ragged_tasks():
    problem = LinearMAML(inner_lr=0.3, steps=1, kind="classification", hidden=0)
    params = problem.init_params(4, 3, seed=0)
    big = classification_tasks(2, shots=2, queries=3, seed=3)
    small = classification_tasks(2, shots=1, queries=2, seed=4, id_offset=10)
    tasks = [big[0], small[0], big[1], small[1]]
    ref = classification_tasks(2, seed=5, id_offset=100)
    out = instance_influence(problem, params, tasks, ref, solver="dense", damping=1.0, l2=L2)
    assert isinstance(out.support_scores, list) and [len(r) for r in out.support_scores] == [6, 3, 6, 3]
    assert [len(r) for r in out.query_scores] == [9, 6, 9, 6]
    task = task_influence(problem, params, tasks, ref, solver="dense", damping=1.0, l2=L2)
    torch.testing.assert_close(out.task_scores(), task.scores, rtol=1e-9, atol=1e-13)


def test_parameter_change_formula(setup):
    problem, train, ref, params = setup
    grads, _ = per_task_gradients(problem, params, train)
    _, _, _, damped = explicit_scores(problem, params, train, ref, 0.01)
    change = parameter_change(
        problem, params, train, [1, 3], solver="dense", damping=0.01, l2=L2, curvature="exact"
    )
    expected = torch.linalg.solve(damped, grads[1] + grads[3]) / len(train)
    torch.testing.assert_close(ParamLayout.of(params).flatten(change), expected)
    assert set(change) == set(params)
    with pytest.raises(ValueError, match="unknown or empty"):
        parameter_change(problem, params, train, [99], solver="dense")


def test_tracin_accumulator_completeness_along_sgd():
    """Σ_k TracIn score ≈ f(λ_0) − f(λ_T) along a real mini-batch SGD trajectory (small steps)."""
    problem = LinearMAML(inner_lr=0.3, steps=2, kind="classification", hidden=0)
    train = classification_tasks(12, seed=1, corrupt=(0, 4))
    ref = classification_tasks(4, seed=2, id_offset=100)
    params = problem.init_params(4, 3, seed=0)
    layout = ParamLayout.of(params)
    flat = layout.flatten({k: v.detach() for k, v in params.items()})
    acc = TracInAccumulator()
    generator = torch.Generator().manual_seed(0)
    lr, batch = 0.05, 4
    _, f0 = reference_gradient(problem, layout.unflatten(flat.requires_grad_(True)), ref)
    for step in range(80):
        point = {k: v.requires_grad_(True) for k, v in layout.unflatten(flat.detach().clone()).items()}
        index = torch.randperm(len(train), generator=generator)[:batch]
        grads, _ = per_task_gradients(problem, point, train[index])
        ref_grad, _ = reference_gradient(problem, point, ref)
        acc.update(step, lr, train.task_ids[index], grads, ref_grad)
        flat = flat.detach() - lr * grads.mean(0)
    _, f_end = reference_gradient(
        problem, {k: v.requires_grad_(True) for k, v in layout.unflatten(flat).items()}, ref
    )
    result = acc.scores()
    decrease = float(f0 - f_end)
    total = float(result.scores.sum())
    error = abs(total - decrease) / abs(decrease)
    print(f"\nTracIn completeness: sum of scores {total:.5f}, f(λ0)−f(λT) {decrease:.5f}, error {error:.2%}")
    assert decrease > 0 and error < 0.10
    assert int(result.diagnostics["counts"].sum()) == 80 * batch and result.diagnostics["steps"] == 80
    assert set(result.task_ids.tolist()) <= set(train.task_ids.tolist())
    # the corrupted tasks are among the least helpful
    order = result.ranking().tolist()
    assert {0, 4} & set(order[:4])
    # state round trip
    clone = TracInAccumulator()
    clone.load_state_dict(acc.state_dict())
    torch.testing.assert_close(clone.scores().scores, result.scores)


def test_full_batch_trajectory_equals_tracincp_over_every_step():
    problem = LinearMAML(inner_lr=0.3, steps=1, kind="classification", hidden=0)
    train = classification_tasks(5, seed=1)
    ref = classification_tasks(2, seed=2, id_offset=100)
    params = problem.init_params(4, 3, seed=0)
    acc, checkpoints = TracInAccumulator(), []
    for step in range(3):
        grads, _ = per_task_gradients(problem, params, train)
        ref_grad, _ = reference_gradient(problem, params, ref)
        acc.update(step, 0.1, train.task_ids, grads, ref_grad)
        checkpoints.append(Checkpoint(params, 0.1, step=step))
        layout = ParamLayout.of(params)
        flat = layout.flatten({k: v.detach() for k, v in params.items()}) - 0.1 * grads.mean(0)
        params = {k: v.requires_grad_(True) for k, v in layout.unflatten(flat).items()}
    cp = task_influence(problem, params, train, ref, estimator="tracin", checkpoints=checkpoints)
    torch.testing.assert_close(acc.scores().scores, cp.scores / len(train))


def test_accumulator_handles_repeats_and_errors():
    acc = TracInAccumulator()
    contributions = acc.update(
        0, 1.0, [5, 5, 6], torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.ones(2)
    )
    torch.testing.assert_close(contributions, torch.tensor([1 / 3, 1 / 3, 2 / 3], dtype=torch.float64))
    assert acc.scores().as_dict() == pytest.approx({5: 2 / 3, 6: 2 / 3})
    assert acc.update(1, 1.0, [7], torch.ones(1, 2)) is None  # no reference: self-influence only
    assert acc.scores().self_influence.tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="one id per row"):
        acc.update(2, 1.0, [1, 2], torch.ones(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="same projection"):
        acc.update(2, 1.0, [1], torch.ones(1, 2), torch.ones(3))


def test_influence_result_container():
    result = InfluenceResult(
        [3, 1, 2], torch.tensor([0.0, -2.0, 1.0]), estimator="x", diagnostics={"t": torch.ones(2)}
    )
    assert result.ranking().tolist() == [1, 3, 2] and len(result) == 3
    assert result.to_dict()["diagnostics"] == {"t": [1.0, 1.0]}
    with pytest.raises(ValueError, match="align"):
        InfluenceResult([1, 2], torch.zeros(3))


def test_bad_inputs(setup):
    problem, train, ref, params = setup
    with pytest.raises(ValueError, match="task_if"):
        task_influence(problem, params, train, ref, estimator="magic")
    with pytest.raises(ValueError, match="'cg'"):
        task_influence(problem, params, train, ref, solver="magic")
    with pytest.raises(ValueError, match="damping"):
        task_influence(problem, params, train, ref, damping=-1.0)
    with pytest.raises(ValueError, match="exactly one reference"):
        task_influence(problem, params, train)
    with pytest.raises(ValueError, match="exactly one reference"):
        task_influence(problem, params, train, ref, utility=lambda p: p["w"].sum())
    with pytest.raises(ValueError, match="no reference"):
        task_influence(problem, params, train, ref, estimator="self")
    with pytest.raises(ValueError, match="projection"):
        task_influence(problem, params, train, ref, solver="cg", projection=lambda x: x)
    with pytest.raises(ValueError, match="one id per task"):
        task_influence(problem, params, list(train), ref, task_ids=[1, 2])
    with pytest.raises(ValueError, match="noise_copies"):
        task_influence(problem, params, train, ref, noise_copies=2)
    with pytest.raises(ValueError, match="empty"):
        task_influence(problem, params, train, ref, estimator="tracin", checkpoints=[])
    with pytest.raises(ValueError, match="task_weights"):
        task_influence(problem, params, train, ref, task_weights=[1.0, 2.0])

    class OnlyTaskLoss:
        def task_loss(self, params, task, support_weights=None, query_weights=None):
            return problem.task_loss(params, task)

    with pytest.raises(ValueError, match="adapt"):
        task_influence(OnlyTaskLoss(), params, train, ref, estimator="direct_if")
    with pytest.raises(ValueError, match="ignores support_weights"):
        instance_influence(OnlyTaskLoss(), params, list(train), ref, solver="dense", l2=L2)
    assert DEFAULT_DAMPING == 1e-3


def test_cg_default_on_indefinite_problem_fails_loudly():
    """At a random init without L2 the total Hessian is indefinite: CG must say so, not return garbage."""
    from lightning_metaif.influence.solvers import SolverError

    problem = LinearMAML(inner_lr=1.0, steps=2, kind="classification", hidden=2)
    train = classification_tasks(4, seed=1, corrupt=(0, 1))
    ref = classification_tasks(2, seed=2, id_offset=100)
    params = problem.init_params(4, 3, seed=3)
    hessian = TotalHessian(problem, params, train).dense()
    smallest = float(torch.linalg.eigvalsh(hessian).min())
    if smallest >= 0:
        pytest.skip(f"this init happens to be PD (λ_min={smallest:.2e})")
    with pytest.raises(SolverError):
        task_influence(problem, params, train, ref, solver="dense", damping=0.0, curvature="exact")
    fine = task_influence(
        problem, params, train, ref, solver="dense", damping=-smallest + 0.1, curvature="exact"
    )
    assert torch.isfinite(fine.scores).all()


def test_task_objects_without_ids_use_given_ids(setup):
    problem, train, ref, params = setup
    plain = [Task(t.support_x, t.support_y, t.query_x, t.query_y) for t in train]
    result = task_influence(problem, params, plain, ref, task_ids=list(range(50, 58)), solver="dense", l2=L2)
    assert result.task_ids.tolist() == list(range(50, 58))
    batch = task_influence(problem, params, train, ref, solver="dense", l2=L2)
    torch.testing.assert_close(result.scores, batch.scores)
    assert isinstance(train, TaskBatch)
