"""MAML module: meta-gradients (vmap = loop = hand-written autograd), FO-MAML, ANIL, Meta-SGD, iMAML (IFT),
task weights, the training-step channel for callbacks, the Adam preconditioner, configuration errors, and
two short real runs (sinusoid MSE, digits 5-way 1-shot accuracy; the latter is marked slow)."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.tasks import Task, TaskBatch
from lightning_metaif.meta.backbones import MLP, ConvNet
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.pools import collate_tasks

TRAINER_KW = dict(
    accelerator="cpu",
    enable_progress_bar=False,
    logger=False,
    enable_checkpointing=False,
    enable_model_summary=False,
)


def classification_tasks(num_tasks=4, support=5, query=7, dim=6, ways=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(num_tasks, support, dim, generator=g, dtype=dtype),
        torch.randint(0, ways, (num_tasks, support), generator=g),
        torch.randn(num_tasks, query, dim, generator=g, dtype=dtype),
        torch.randint(0, ways, (num_tasks, query), generator=g),
        torch.arange(num_tasks) + 10,
    )


def small_maml(algorithm="maml", dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("inner_steps", 2)
    kwargs.setdefault("inner_lr", 0.3)
    return MAML(MLP(6, 3, hidden=(8,)), algorithm=algorithm, **kwargs).to(dtype)


def manual_maml_gradient(model: MAML, params: dict, task: Task, first_order=False, adapted_names=None):
    """The MAML gradient as a user writes it: autograd.grad with create_graph through the inner steps."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    theta = {k[len("backbone.") :]: v for k, v in leaves.items()}
    adapted_names = adapted_names or list(theta)
    fast = dict(theta)
    for _ in range(model.inner_steps):
        out = torch.func.functional_call(model.backbone, fast, (task.support_x,))
        loss = F.cross_entropy(out, task.support_y)
        grads = torch.autograd.grad(loss, [fast[n] for n in adapted_names], create_graph=not first_order)
        fast = {**fast, **{n: fast[n] - model.inner_lr * g for n, g in zip(adapted_names, grads)}}
    out = torch.func.functional_call(model.backbone, fast, (task.query_x,))
    loss = F.cross_entropy(out, task.query_y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return torch.cat([g.reshape(-1) for g in grads]), loss.detach()


@pytest.mark.parametrize(
    "algorithm, kwargs",
    [
        ("maml", {}),
        ("fomaml", {}),
        ("anil", {}),
        ("imaml", {"imaml_cg_steps": 4}),
        ("maml", {"learn_inner_lr": True}),
        ("anil", {"learn_inner_lr": True}),
    ],
)
def test_vmap_and_loop_meta_gradients_agree(algorithm, kwargs):
    model = small_maml(algorithm, **kwargs)
    tasks = classification_tasks()
    params = model.meta_parameters()
    g_vmap, l_vmap = per_task_gradients(model, params, tasks, vectorize="vmap", chunk_size=3)
    g_loop, l_loop = per_task_gradients(model, params, tasks, vectorize="loop")
    assert g_vmap.shape == (len(tasks), ParamLayout.of(params).numel)
    assert g_vmap.abs().sum() > 0
    torch.testing.assert_close(g_vmap, g_loop, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(l_vmap, l_loop, rtol=1e-12, atol=1e-12)


def test_second_order_gradient_equals_hand_written_maml():
    model = small_maml("maml")
    tasks = classification_tasks()
    params = model.meta_parameters()
    grads, losses = per_task_gradients(model, params, tasks)
    for k in range(len(tasks)):
        expected, loss = manual_maml_gradient(model, params, tasks[k])
        torch.testing.assert_close(grads[k], expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(losses[k], loss)
    # and second order really differs from first order here
    first, _ = manual_maml_gradient(model, params, tasks[0], first_order=True)
    assert (grads[0] - first).abs().max() > 1e-4


def test_fomaml_gradient_is_outer_gradient_at_adapted_params():
    model = small_maml("fomaml", inner_steps=3)
    tasks = classification_tasks()
    params = model.meta_parameters()
    grads, _ = per_task_gradients(model, params, tasks)
    for k in range(len(tasks)):
        adapted = model.adapt({n: p.detach() for n, p in params.items()}, tasks[k])
        adapted = {n: v.detach().requires_grad_(True) for n, v in adapted.items()}
        outer = model.outer_loss(adapted, params, tasks[k])
        expected = torch.autograd.grad(outer, list(adapted.values()))
        torch.testing.assert_close(
            grads[k], torch.cat([g.reshape(-1) for g in expected]), rtol=1e-10, atol=1e-12
        )
        manual, _ = manual_maml_gradient(model, params, tasks[k], first_order=True)
        torch.testing.assert_close(grads[k], manual, rtol=1e-9, atol=1e-12)


def test_anil_adapts_only_the_head():
    model = small_maml("anil")
    assert model.adapted_names == ["head.weight", "head.bias"]
    params = {n: p.detach() for n, p in model.meta_parameters().items()}
    task = classification_tasks()[0]
    adapted = model.adapt(params, task)
    for name, value in params.items():
        if name.startswith("backbone.head."):
            assert not torch.equal(adapted[name], value), name
        else:
            assert torch.equal(adapted[name], value), name
    # the gradient still reaches the body (through the features), and equals the hand-written ANIL gradient
    grads, _ = per_task_gradients(model, model.meta_parameters(), classification_tasks())
    expected, _ = manual_maml_gradient(
        model, model.meta_parameters(), task, adapted_names=model.adapted_names
    )
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-12)
    body = ParamLayout.of(params).unflatten(grads[0])["backbone.body.0.weight"]
    assert body.abs().sum() > 0
    # an explicit head prefix works too, and a wrong one fails clearly
    assert MAML(MLP(6, 3, hidden=(8,)), algorithm="anil", head="body.0").adapted_names == [
        "body.0.weight",
        "body.0.bias",
    ]
    with pytest.raises(ValueError, match="matches no trainable"):
        MAML(MLP(6, 3), algorithm="anil", head="nothing")


def test_meta_sgd_learns_per_element_inner_lrs():
    model = small_maml("maml", learn_inner_lr=True, inner_steps=1)
    names = list(model.meta_parameters())
    assert "inner_lrs.head__weight" in names and "backbone.head.weight" in names
    assert model.inner_lrs["head__weight"].shape == model.backbone.head.weight.shape
    grads, _ = per_task_gradients(model, model.meta_parameters(), classification_tasks())
    lr_grad = ParamLayout.of(model.meta_parameters()).unflatten(grads[0])["inner_lrs.head__weight"]
    assert lr_grad.abs().sum() > 0
    # d loss / d lr for one step is -∇L_I · ∇L_O(θ') elementwise: check against autograd with a scalar lr
    task = classification_tasks()[0]
    params = {n: p.detach() for n, p in model.meta_parameters().items()}
    theta = {n[len("backbone.") :]: v for n, v in params.items() if n.startswith("backbone.")}
    inner = torch.func.grad(
        lambda t: F.cross_entropy(
            torch.func.functional_call(model.backbone, t, (task.support_x,)), task.support_y
        )
    )(theta)
    lrs = {n: model.inner_lrs[n.replace(".", "__")].detach() for n in theta}  # 0.3 rounded to float32
    adapted = {n: theta[n] - lrs[n] * inner[n] for n in theta}
    outer = torch.func.grad(
        lambda t: F.cross_entropy(
            torch.func.functional_call(model.backbone, t, (task.query_x,)), task.query_y
        )
    )(adapted)
    torch.testing.assert_close(lr_grad, -inner["head.weight"] * outer["head.weight"], rtol=1e-9, atol=1e-12)


def test_imaml_gradient_is_the_implicit_gradient():
    gamma = 2.0
    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))  # ReLU kinks stall the inner solver
    model = MAML(
        smooth, algorithm="imaml", inner_steps=40, inner_lr=0.3, imaml_lambda=gamma, imaml_cg_steps=50
    ).double()
    tasks = classification_tasks(num_tasks=2)
    params = {n: p.detach() for n, p in model.meta_parameters().items()}
    grads, losses = per_task_gradients(model, model.meta_parameters(), tasks)
    layout = ParamLayout.of(params)
    for k in range(len(tasks)):
        task = tasks[k]
        adapted = layout.flatten(model.adapt(params, task))

        def as_theta(vector):
            return {n[len("backbone.") :]: v for n, v in layout.unflatten(vector).items()}

        def inner(vector, task=task):
            out = torch.func.functional_call(model.backbone, as_theta(vector), (task.support_x,))
            return F.cross_entropy(out, task.support_y)

        def outer(vector, task=task):
            out = torch.func.functional_call(model.backbone, as_theta(vector), (task.query_x,))
            return F.cross_entropy(out, task.query_y)

        # θ* is (nearly) stationary for the proximal problem
        anchor = layout.flatten(params)
        stationarity = torch.func.grad(inner)(adapted) + gamma * (adapted - anchor)
        assert stationarity.norm() < 1e-6
        hessian = torch.autograd.functional.hessian(inner, adapted)
        expected = gamma * torch.linalg.solve(
            hessian + gamma * torch.eye(layout.numel, dtype=torch.float64), torch.func.grad(outer)(adapted)
        )
        torch.testing.assert_close(grads[k], expected, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(losses[k], outer(adapted))
        # documented second-order behaviour: the task_loss Hessian is ∇²L_O(θ*) (identity Jacobian)
        vector = torch.randn(layout.numel, dtype=torch.float64)
        hvp = torch.func.jvp(
            torch.func.grad(lambda v, task=task: model.task_loss(layout.unflatten(v), task)),
            (anchor,),
            (vector,),
        )[1]
        torch.testing.assert_close(
            hvp, torch.autograd.functional.hessian(outer, adapted) @ vector, rtol=1e-7, atol=1e-9
        )


def test_sample_weights_follow_the_engine_rule():
    model = small_maml("maml")
    task = classification_tasks()[0]
    params = model.meta_parameters()
    ones_s, ones_q = (
        torch.ones(task.num_support, dtype=torch.float64),
        torch.ones(task.num_query, dtype=torch.float64),
    )
    torch.testing.assert_close(model.task_loss(params, task, ones_s, ones_q), model.task_loss(params, task))
    query_weights = ones_q.clone()
    query_weights[0] = 0.0
    dropped = Task(task.support_x, task.support_y, task.query_x[1:], task.query_y[1:])
    n = task.num_query
    torch.testing.assert_close(
        model.task_loss(params, task, query_weights=query_weights),
        model.task_loss(params, dropped) * (n - 1) / n,
    )


class _Capture(pl.Callback):
    """Records the parameters before the step, the gradient the optimiser sees, and the step outputs."""

    def __init__(self):
        self.before, self.grads, self.outputs, self.preconditioner = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append({n: p.detach().clone() for n, p in pl_module.meta_parameters().items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.meta_parameters().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(
            {
                **outputs,
                "last_task_gradients": pl_module.last_task_gradients.clone(),
                "last_task_ids": pl_module.last_task_ids.clone(),
                "last_learning_rate": pl_module.last_learning_rate,
            }
        )
        self.preconditioner.append(pl_module.adam_preconditioner())


def _one_batch_loader(tasks: TaskBatch):
    return DataLoader([tasks], batch_size=None)


def _fit(model, tasks, steps=1):
    capture = _Capture()
    trainer = pl.Trainer(max_steps=steps, callbacks=[capture], **TRAINER_KW)
    trainer.fit(model, _one_batch_loader(tasks))
    return capture, trainer


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_training_step_records_gradients_before_the_step_and_applies_weights(algorithm):
    tasks = classification_tasks(num_tasks=4)
    model = small_maml(algorithm, optimizer="sgd", outer_lr=0.5)
    dropped_id, half_id = int(tasks.task_ids[1]), int(tasks.task_ids[2])
    model.task_weight_table = {dropped_id: 0.0, half_id: 0.5}
    capture, trainer = _fit(model, tasks)
    assert trainer.global_step == 1
    before = capture.before[0]
    out = capture.outputs[0]
    # independent per-task gradients (hand-written autograd) at the parameters before the step
    independent = torch.stack(
        [manual_maml_gradient(model, before, tasks[k], algorithm == "fomaml")[0] for k in range(4)]
    )
    losses = torch.stack([manual_maml_gradient(model, before, tasks[k])[1] for k in range(4)])
    torch.testing.assert_close(out["last_task_gradients"], independent, rtol=1e-9, atol=1e-12)
    assert (
        out["last_task_ids"].dtype == torch.long and out["last_task_ids"].tolist() == tasks.task_ids.tolist()
    )
    torch.testing.assert_close(out["task_losses"], losses)
    assert out["last_learning_rate"] == 0.5
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(out["loss"], (weights * losses).sum() / 4)
    # the optimiser saw Σ w_k g_k / B: weight 0 removes task 1's contribution exactly
    expected = (independent[0] + 0.5 * independent[2] + independent[3]) / 4
    layout = ParamLayout.of(before)
    torch.testing.assert_close(layout.flatten(capture.grads[0]), expected, rtol=1e-9, atol=1e-12)
    after = layout.flatten({n: p.detach() for n, p in model.meta_parameters().items()})
    torch.testing.assert_close(after, layout.flatten(before) - 0.5 * expected, rtol=1e-9, atol=1e-12)
    assert capture.preconditioner[0] is None  # SGD has no preconditioner


def test_adam_preconditioner_after_first_step():
    tasks = classification_tasks(num_tasks=3)
    model = small_maml("maml", optimizer="adam", outer_lr=1e-3)
    capture, _ = _fit(model, tasks)
    grad = ParamLayout.of(capture.before[0]).flatten(capture.grads[0])
    # after one Adam step v̂ = g², so 1/(sqrt(v̂)+eps) = 1/(|g|+eps)
    torch.testing.assert_close(capture.preconditioner[0], 1.0 / (grad.abs() + 1e-8), rtol=1e-6, atol=0.0)


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="Unknown algorithm"):
        MAML(MLP(2, 2), algorithm="reptile")
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1"):
        MAML(MLP(2, 2), inner_steps=0)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        MAML(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="vectorize='loop'"):
        MAML(nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 2)))
    MAML(nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 2)), vectorize="loop")
    MAML(ConvNet(1, 5, hidden=4, image_size=8, norm="batch"))  # batch statistics only: accepted
    with pytest.raises(ValueError, match="Unknown optimizer"):
        MAML(MLP(2, 2), optimizer="lbfgs")
    with pytest.raises(ValueError, match="Unknown loss"):
        MAML(MLP(2, 2), loss="hinge")
    with pytest.raises(ValueError, match="Meta-SGD"):
        MAML(MLP(2, 2), algorithm="imaml", learn_inner_lr=True)
    with pytest.raises(ValueError, match="head"):
        MAML(MLP(2, 2), algorithm="maml", head="head")
    with pytest.raises(ValueError, match="TaskBatch"):
        MAML._as_batch({"x": torch.zeros(1)})


def test_convnet_shapes_and_vmap_with_batch_statistics():
    for size, blocks in ((8, 3), (28, 4), (84, 4)):
        net = ConvNet(3 if size == 84 else 1, 5, hidden=4, image_size=size)
        assert net.num_blocks == blocks
        assert net(torch.randn(2, 3 if size == 84 else 1, size, size)).shape == (2, 5)
    model = MAML(ConvNet(1, 5, hidden=4, image_size=8), inner_lr=0.1)
    tasks = TaskBatch(
        torch.randn(3, 5, 1, 8, 8),
        torch.arange(5).repeat(3, 1),
        torch.randn(3, 10, 1, 8, 8),
        torch.arange(10).repeat(3, 1) % 5,
        torch.arange(3),
    )
    g_vmap, _ = per_task_gradients(model, model.meta_parameters(), tasks, vectorize="vmap")
    g_loop, _ = per_task_gradients(model, model.meta_parameters(), tasks, vectorize="loop")
    torch.testing.assert_close(g_vmap, g_loop, rtol=1e-4, atol=1e-6)


def _sinusoid_mse(model, pool):
    with torch.no_grad():  # as Lightning's evaluation loop; _evaluate re-enables grad itself
        return float(model._evaluate(pool.batch(), "test")["loss"])


def test_sinusoid_trainer_run_lowers_meta_test_mse(monkeypatch):
    from lightning_metaif.meta.datasets import sinusoid_splits

    pl.seed_everything(0)
    splits = sinusoid_splits(
        shots=10, queries=10, num_train_tasks=1600, num_val_tasks=8, num_test_tasks=50, seed=0
    )
    model = MAML(MLP(1, 1), loss="mse", inner_lr=0.01, inner_steps=1, eval_inner_steps=5, outer_lr=1e-2)
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    before = _sinusoid_mse(model, splits.test)
    loader = DataLoader(splits.train, batch_size=8, shuffle=True, collate_fn=collate_tasks, drop_last=True)
    trainer = pl.Trainer(max_epochs=1, **TRAINER_KW)
    start = time.perf_counter()
    trainer.fit(model, loader)
    after = _sinusoid_mse(model, splits.test)
    print(f"sinusoid meta-test MSE {before:.3f} -> {after:.3f} in {time.perf_counter() - start:.1f}s")
    assert after < 0.5 * before


@pytest.mark.slow
def test_digits_five_way_one_shot_accuracy(tmp_path):
    """5-way 1-shot on 8x8 digits (test classes never seen in training): accuracy ≥ 0.6 (chance 0.2)."""
    from lightning_metaif.meta.datasets import digits_splits

    pl.seed_everything(0)
    start = time.perf_counter()
    train = digits_splits(
        ways=5, shots=1, queries=5, num_train_tasks=480, num_val_tasks=8, num_test_tasks=8, seed=0
    )
    evaluation = digits_splits(
        ways=5, shots=1, queries=15, num_train_tasks=8, num_val_tasks=20, num_test_tasks=100, seed=0
    )
    assert set(train.classes["train"]).isdisjoint(evaluation.classes["test"])
    model = MAML(
        ConvNet(1, 5, hidden=16, image_size=8), inner_lr=0.4, inner_steps=1, eval_inner_steps=3, outer_lr=3e-3
    )
    trainer = pl.Trainer(max_steps=60, default_root_dir=tmp_path, **{**TRAINER_KW, "logger": False})
    trainer.fit(
        model,
        DataLoader(train.train, batch_size=8, shuffle=True, collate_fn=collate_tasks, drop_last=True),
        DataLoader(evaluation.val, batch_size=20, collate_fn=collate_tasks),
    )
    assert "val/accuracy" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    result = trainer.test(
        model, DataLoader(evaluation.test, batch_size=50, collate_fn=collate_tasks), verbose=False
    )
    accuracy = result[0]["test/accuracy"]
    print(f"digits 5-way 1-shot meta-test accuracy {accuracy:.3f} in {time.perf_counter() - start:.1f}s")
    assert accuracy >= 0.6


class _SaveRankState(pl.Callback):
    """Writes each rank's parameters before/after the step and its per-task gradients to ``root``."""

    def __init__(self, root):
        self.root = root

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in pl_module.meta_parameters().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = {
            "before": self.before,
            "after": {n: p.detach().clone() for n, p in pl_module.meta_parameters().items()},
            "grads": pl_module.last_task_gradients.clone(),
            "ids": pl_module.last_task_ids.clone(),
        }
        torch.save(state, f"{self.root}/rank{trainer.global_rank}.pt")


def _rank_batches():
    batch = classification_tasks(num_tasks=4, dtype=torch.float32)
    return [batch[0:2], batch[2:4]]


@pytest.mark.slow
def test_ddp_averages_the_outer_gradient_over_ranks(tmp_path):
    """Two CPU ranks (gloo), different tasks each: the step uses the mean of both ranks' outer gradients."""
    batches = _rank_batches()
    dataset = [batches[0], batches[1]]
    loader = DataLoader(dataset, batch_size=None, shuffle=False)  # Lightning gives rank r batch r
    model = small_maml("maml", dtype=torch.float32, optimizer="sgd", outer_lr=0.5)
    trainer = pl.Trainer(
        max_steps=1,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[_SaveRankState(str(tmp_path))],
        **TRAINER_KW,
    )
    trainer.fit(model, loader)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert states[0]["ids"].tolist() != states[1]["ids"].tolist()  # the ranks saw different tasks
    layout = ParamLayout.of(states[0]["before"])
    mean_grad = (states[0]["grads"].mean(0) + states[1]["grads"].mean(0)) / 2
    for state in states:
        expected = layout.flatten(state["before"]) - 0.5 * mean_grad
        torch.testing.assert_close(layout.flatten(state["after"]), expected, rtol=1e-5, atol=1e-6)
