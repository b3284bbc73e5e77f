"""Speed of the engine's paths against the floor that ``torch.func`` (or a hand-written loop) reaches on the same
products, each measured as a ratio in one run (1 thread, methods interleaved, medians).

Rows (the table of issue 12):

(1) task-IF with the dense solver, 321 parameters (MAML, 1-16-16-1 tanh MLP on sinusoids, float64, one inner
    step) x 32 tasks, tasks passed as a *list* of equal-shape ``Task`` objects, vs the same tasks as a
    ``TaskBatch``, vs a ``torch.func`` floor (``vmap(grad)`` per-task gradients, the dense Hessian from
    ``vmap`` over basis vectors of ``jvp(grad)``, ``eigh``).
(2) one total-Hessian-vector product on the same problem: list path, ``TaskBatch`` path, ``torch.func``
    ``jvp(grad)`` of the vmapped weighted loss (the floor).
(3) LiSSA at its defaults vs CG at its defaults on the faithfulness problems (``bench_faithfulness.py``
    (a)-(c), at λ* of the L2-regularised objective): operator products and agreement (Spearman, relative
    error) with the exact dense-solve scores.
(4) self-influence ``g_kᵀ(H + δI)⁻¹g_k`` of every task with CG: time vs one CG solve of the task-IF
    reference direction (before: one solve per task).
(5) the ``MAML`` module's meta-step computation (``per_task_gradients`` as in ``training_step``, its
    default ``vectorize="auto"``) on a 4-block ConvNet, 16 tasks 5-way 1-shot 28x28, vs a hand-written
    ``torch.autograd`` MAML loop (one backward of the summed loss).

Rows not here: store scoring (``bench_store.py``), tracing overhead (``bench_overhead.py``).

Run it against another checkout (e.g. the code before a change) with ``PYTHONPATH=<checkout>``: the script only
uses public functions that exist in both.

Usage::

    python benchmarks/bench_speed.py                    # ~3 min on 1 CPU thread
    python benchmarks/bench_speed.py --only 1 2         # some rows
    python benchmarks/bench_speed.py --device cuda      # rows 1, 2, 5 on a GPU (see gpu.sh)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.func import functional_call, grad, jvp, vmap

import lightning_metaif
from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.gradients import batched_task_loss, per_task_gradients, task_tensors
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.problem import ParamLayout, detached, trainable
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.pools import SinusoidTaskPool

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sinusoid_problem(device: str, tasks: int = 32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    )
    problem = MAML(net, loss="mse", inner_lr=0.01, inner_steps=1).double().to(device)
    train = SinusoidTaskPool(tasks, shots=10, queries=10, seed=1, dtype=torch.float64).batch().to(device)
    ref = SinusoidTaskPool(8, shots=10, queries=10, seed=2, id_offset=10_000, dtype=torch.float64).batch()
    params = trainable(problem.meta_parameters())
    return problem, params, train, ref.to(device)


def func_task_if_dense(problem, params, train, ref, damping: float, l2: float) -> torch.Tensor:
    """The torch.func floor of row (1): same gradients, same dense Hessian products, same solve."""
    layout = ParamLayout.of(params)
    base = detached(params)
    loss_fn = vmap(batched_task_loss(problem), in_dims=(None, 0, 0, 0, 0))
    grads = layout.flatten(
        vmap(grad(batched_task_loss(problem)), in_dims=(None, 0, 0, 0, 0))(base, *task_tensors(train))
    )
    ref_grad = layout.flatten(grad(lambda p: loss_fn(p, *task_tensors(ref)).mean())(base))

    def product(vector):
        tangent = layout.unflatten(vector)
        _, out = jvp(grad(lambda p: loss_fn(p, *task_tensors(train)).mean()), (base,), (tangent,))
        return layout.flatten(out)

    eye = torch.eye(layout.numel, dtype=grads.dtype, device=grads.device)
    hessian = torch.cat([vmap(product)(eye[i : i + 64]) for i in range(0, layout.numel, 64)])
    hessian = 0.5 * (hessian + hessian.T) + l2 * eye
    values, vectors = torch.linalg.eigh(hessian)
    solution = vectors @ ((vectors.T @ ref_grad) / (values + damping))
    return grads @ solution / len(train)


def row_1(args) -> dict:
    problem, params, train, ref = sinusoid_problem(args.device)
    tasks = list(train)
    cfg = dict(solver="dense", damping=1e-3, l2=2.5, curvature="exact")
    fns = {
        "list of Task": lambda: task_influence(problem, params, tasks, ref, **cfg).scores,
        "TaskBatch": lambda: task_influence(problem, params, train, ref, **cfg).scores,
        "torch.func floor": lambda: func_task_if_dense(problem, params, train, ref, 1e-3, 2.5),
    }
    outs = {k: f().cpu() for k, f in fns.items()}
    errors = {
        k: float((v - outs["torch.func floor"]).abs().max() / outs["torch.func floor"].abs().max())
        for k, v in outs.items()
    }
    times = C.interleaved(fns, repeats=args.repeats_slow, warmup=0)
    return summarize("(1) task-IF, dense solver, 321 params x 32 tasks", times, "torch.func floor", errors)


def row_2(args) -> dict:
    problem, params, train, _ = sinusoid_problem(args.device)
    layout = ParamLayout.of(params)
    vector = torch.randn(layout.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(
        args.device
    )
    listed = TotalHessian(problem, params, list(train))
    batched = TotalHessian(problem, params, train)
    loss_fn = vmap(batched_task_loss(problem), in_dims=(None, 0, 0, 0, 0))
    base = detached(params)

    def floor():
        _, out = jvp(
            grad(lambda p: loss_fn(p, *task_tensors(train)).mean()), (base,), (layout.unflatten(vector),)
        )
        return layout.flatten(out)

    fns = {
        "list of Task": lambda: listed.matvec(vector),
        "TaskBatch": lambda: batched.matvec(vector),
        "torch.func jvp(grad)": floor,
    }
    outs = {k: f().cpu() for k, f in fns.items()}  # also the warm-up (the first product builds the graphs)
    ref = outs["torch.func jvp(grad)"]
    errors = {k: float((v - ref).abs().max() / ref.abs().max()) for k, v in outs.items()}
    times = C.interleaved(fns, repeats=args.repeats, warmup=1)
    return summarize(
        "(2) one total-Hessian-vector product, 321 params x 32 tasks", times, "torch.func jvp(grad)", errors
    )


def faithfulness_problems():
    import bench_faithfulness as BF

    from lightning_metaif.influence.retraining import train_to_convergence

    out = {}
    for name, build in (
        ("a", lambda: BF.problem_a(30)),
        ("b", lambda: BF.problem_b(30)),
        ("c", lambda: BF.problem_c(20)),
    ):
        problem, params, train, ref = build()
        fit = train_to_convergence(problem, params, train, l2=BF.L2, max_iter=200)
        out[name] = (problem, fit.params, train, ref, BF.L2)
    return out


def row_3(args) -> dict:
    rows = []
    for name, (problem, params, train, ref, l2) in faithfulness_problems().items():
        same = dict(l2=l2, damping=1e-3, curvature="exact")  # the defaults of the code before this change
        exact = task_influence(problem, params, train, ref, solver="dense", **same).scores
        line = {"problem": name}
        for solver in ("cg", "lissa"):
            start = time.perf_counter()
            try:
                result = task_influence(problem, params, train, ref, solver=solver, **same)
            except Exception as error:  # noqa: BLE001 - a failing solver is a result
                line[f"{solver}_error"] = f"{type(error).__name__}: {error}"[:160]
                continue
            line[f"{solver}_products"] = result.diagnostics["hessian_products"]
            line[f"{solver}_seconds"] = time.perf_counter() - start
            line[f"{solver}_spearman_vs_exact"] = float(spearmanr(result.scores, exact)[0])
            line[f"{solver}_rel_error"] = float((result.scores - exact).norm() / exact.norm())
        if "lissa_products" in line and "cg_products" in line:
            line["lissa/cg products"] = line["lissa_products"] / max(line["cg_products"], 1)
        rows.append(line)
        print(line, flush=True)
    return {"title": "(3) LiSSA vs CG at their defaults, faithfulness problems", "rows": rows}


def row_4(args) -> dict:
    problem, params, train, ref = sinusoid_problem("cpu")
    cfg = dict(solver="cg", damping=1e-3, l2=2.5, curvature="exact")
    fns = {
        "self-influence, every task (CG)": lambda: task_influence(
            problem, params, train, estimator="self", **cfg
        ),
        "one CG solve (task-IF)": lambda: task_influence(problem, params, train, ref, **cfg),
        "self-influence, dense": lambda: task_influence(
            problem, params, train, estimator="self", solver="dense", damping=1e-3, l2=2.5, curvature="exact"
        ),
    }
    outs = {k: f() for k, f in fns.items()}
    exact = outs["self-influence, dense"].self_influence
    errors = {
        k: float((v.self_influence - exact).abs().max() / exact.abs().max())
        if v.self_influence is not None
        else float("nan")
        for k, v in outs.items()
    }
    products = {k: v.diagnostics.get("hessian_products") for k, v in outs.items()}
    times = C.interleaved(fns, repeats=args.repeats_slow, warmup=0)
    out = summarize(
        "(4) self-influence of 32 tasks with CG vs one CG solve", times, "one CG solve (task-IF)", errors
    )
    out["products"] = products
    return out


def row_5(args) -> dict:
    from bench_gradients import synthetic_images

    from lightning_metaif.meta.backbones import ConvNet

    torch.manual_seed(0)
    maml = MAML(ConvNet(1, 5, hidden=args.hidden, layers=4, image_size=28), inner_steps=1, inner_lr=0.4).to(
        args.device
    )
    params = trainable(maml.meta_parameters())
    batch = synthetic_images(16).to(args.device)
    names = list(maml.backbone.state_dict().keys())
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    def module_step():  # what MAML.training_step computes before the optimiser step
        grads, losses = per_task_gradients(
            maml, params, batch, chunk_size=maml.chunk_size, vectorize=maml.vectorize
        )
        return grads.mean(0)

    def hand_loop():
        total = 0.0
        plain = {n: leaves["backbone." + n] for n in names}
        for i in range(len(batch)):
            inner = F.cross_entropy(
                functional_call(maml.backbone, plain, (batch.support_x[i],)), batch.support_y[i]
            )
            g = torch.autograd.grad(inner, list(plain.values()), create_graph=True)
            fast = {n: w - 0.4 * gi for (n, w), gi in zip(plain.items(), g)}
            total = total + F.cross_entropy(
                functional_call(maml.backbone, fast, (batch.query_x[i],)), batch.query_y[i]
            )
        g = torch.autograd.grad(total / len(batch), list(leaves.values()))
        return torch.cat([x.reshape(-1) for x in g])

    fns = {"MAML module meta-step": module_step, "hand-written autograd loop": hand_loop}
    outs = {k: f().cpu() for k, f in fns.items()}
    ref = outs["hand-written autograd loop"]
    errors = {k: float((v - ref).abs().max() / ref.abs().max()) for k, v in outs.items()}
    cpu: dict[str, list[float]] = {}
    times = C.interleaved(fns, repeats=args.repeats, warmup=1, cpu_times=cpu)
    title = f"(5) MAML meta-step, ConvNet (hidden {args.hidden}), 16 tasks 5-way 1-shot"
    out = summarize(title, times, "hand-written autograd loop", errors)
    # CPU seconds of the process: robust to the share of a core a loaded machine gives it
    floor = C.median(cpu["hand-written autograd loop"])
    out["cpu_s"] = cpu
    out["cpu_ratio_vs_floor"] = {k: C.median(v) / floor for k, v in cpu.items()}
    out["cpu_ratio_paired"] = {
        k: C.median([a / b for a, b in zip(v, cpu["hand-written autograd loop"])]) for k, v in cpu.items()
    }
    print(
        "CPU-time ratios (medians; paired):", out["cpu_ratio_vs_floor"], out["cpu_ratio_paired"], flush=True
    )
    return out


def summarize(title: str, times: dict, floor: str, errors: dict) -> dict:
    med = {k: C.median(v) for k, v in times.items()}
    rows = [
        {
            "method": k,
            "median_s": med[k],
            "ratio_vs_floor": med[k] / med[floor],
            "max_rel_error": errors.get(k, float("nan")),
        }
        for k in times
    ]
    print(title)
    print(C.table(rows), flush=True)
    return {"title": title, "floor": floor, "times_s": times, "median_s": med, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", type=int, default=None, help="rows to run (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repeats-slow", type=int, default=3, help="repeats of rows (1) and (4)")
    parser.add_argument("--hidden", type=int, default=32, help="ConvNet channels of row (5)")
    parser.add_argument("--name", default="bench_speed", help="results file name")
    args = parser.parse_args()
    C.set_threads(args.threads)
    env = C.environment()
    env["package"] = str(Path(lightning_metaif.__file__).resolve().parent)
    env["device"] = args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    rows = {1: row_1, 2: row_2, 3: row_3, 4: row_4, 5: row_5}
    if args.device != "cpu":
        rows = {k: v for k, v in rows.items() if k in (1, 2, 5)}
    results = {}
    for number, run in rows.items():
        if args.only and number not in args.only:
            continue
        results[number] = run(args)
    C.save(args.name, {"environment": env, "results": results})


if __name__ == "__main__":
    main()
