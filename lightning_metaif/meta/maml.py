"""MAML, first-order MAML, ANIL, Meta-SGD and iMAML as one ``LightningModule`` with a functional core.

The module is also a *problem* for the influence engine: ``task_loss(params, task, support_weights=None,
query_weights=None)`` is a pure function of the meta-parameters (``torch.func.functional_call`` on the
backbone), so ``per_task_gradients`` / ``TotalHessian`` can ``vmap`` it over a :class:`TaskBatch`.

Meta-parameters (:meth:`MAML.meta_parameters`) are named like ``MAML.named_parameters()``:
``"backbone.<name>"`` for the network weights and, with ``learn_inner_lr=True`` (Meta-SGD),
``"inner_lrs.<name with '.' replaced by '__'>"`` for the learned per-element inner learning rates.

What each algorithm's ``task_loss`` differentiates to (the total gradient ``g_k``, docs/maths.md §2):

* ``"maml"``: second-order MAML, the exact derivative through the unrolled inner steps.
* ``"fomaml"``: the inner gradients are detached (stop-gradient), so ``g_k = ∇_θ L_O(θ_K)`` (plus, with
  Meta-SGD, the exact derivative w.r.t. the inner learning rates). Second-order products of ``task_loss``
  are those of this first-order surrogate.
* ``"anil"``: only the head (default: the last ``nn.Linear``) adapts; exact second-order gradient.
* ``"imaml"``: ``θ* ≈ argmin_θ L_I(θ) + γ/2 ‖θ − λ‖²`` by ``inner_steps`` gradient steps from ``λ``; the
  gradient of ``task_loss`` is the implicit (IFT) meta-gradient ``γ (∇²L_I(θ*) + γI)^{-1} ∇L_O(θ*)``
  from ``imaml_cg_steps`` of conjugate gradients, through a surrogate whose value is ``L_O(θ*)``.
  **Second-order products** of iMAML's ``task_loss`` (``TotalHessian(curvature="exact")``) give
  ``∇²_θ L_O(θ*)``: the curvature of the outer loss with ``dθ*/dλ`` taken as the identity for the
  second derivative (exact for ``γ → ∞``); the change of the IFT Jacobian with ``λ`` is dropped.
  ``adapt`` likewise returns ``θ*`` with an identity Jacobian. Derivatives w.r.t. support sample weights
  flow through the unrolled inner steps (not through the implicit function theorem).

Stateful modules: ``BatchNorm`` / ``InstanceNorm`` with running statistics update buffers in place, which
``vmap`` cannot do and which would make ``task_loss`` impure; use ``track_running_stats=False`` (batch
statistics, as in the original MAML) or ``GroupNorm``. ``Dropout`` with ``p > 0`` needs
``vectorize="loop"`` (``vmap`` refuses random operations by default). Both are rejected with a
``ValueError`` at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.optim import adam_preconditioner
from lightning_metaif.influence.paths import choose_path
from lightning_metaif.influence.problem import ParamLayout, Params, weighted_mean
from lightning_metaif.influence.tasks import Task, TaskBatch

Algorithm = Literal["maml", "fomaml", "anil", "imaml"]
_ALGORITHMS = ("maml", "fomaml", "anil", "imaml")
_OPTIMIZERS = ("adam", "sgd")
_LOSSES = ("cross_entropy", "mse")
_BACKBONE = "backbone."
_LRS = "inner_lrs."


def _num_ways_message(num_ways: int, outputs: int) -> str:
    return (
        f"MAML(num_ways={num_ways}) but the backbone outputs {outputs} logits per input: build the backbone with "
        f"at least {num_ways} outputs (e.g. MLP(in_dim, {num_ways}) or ConvNet(num_classes={num_ways})) or pass "
        f"num_ways <= {outputs}."
    )


def check_backbone(backbone: nn.Module, vectorize: str = "auto") -> None:
    """Raise a ``ValueError`` for modules that break the functional (``vmap``-able) inner loop.

    Example:
        >>> check_backbone(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        Traceback (most recent call last):
        ...
        ValueError: Backbone module '1' (BatchNorm1d) tracks running statistics...
    """
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}.")
    for name, module in backbone.named_modules():
        stateful = isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
        if stateful:
            raise ValueError(
                f"Backbone module {name!r} ({type(module).__name__}) tracks running statistics: its in-place buffer "
                "updates cannot run under torch.func.vmap and would make task_loss impure. Build it with "
                "`track_running_stats=False` (batch statistics, as in the original MAML), use GroupNorm / no "
                "normalisation (e.g. `ConvNet(norm='group')`), or convert a model with "
                "`torch.func.replace_all_batch_norm_modules_(backbone)`."
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and vectorize != "loop":
            raise ValueError(
                f"Backbone module {name!r} ({type(module).__name__}, p={module.p}) is random, and torch.func.vmap "
                "refuses random operations: pass `vectorize='loop'` or remove the dropout."
            )
    if not any(p.requires_grad for p in backbone.parameters()):
        raise ValueError("The backbone has no parameter that requires grad: there is nothing to meta-learn.")


def _inner_gradients(inner: Callable[[Params], Tensor], fast: Params, *, first_order: bool) -> Params:
    """``∇ inner(fast)``, differentiable unless ``first_order``.

    Under a ``torch.func`` transform (the ``vmap`` path, ``jvp``) this is ``torch.func.grad``. On the loop
    path (plain autograd leaves, no transform) it is ``torch.autograd.grad(create_graph=True)``: the same
    numbers without the functional wrappers, which makes the module's meta-step as fast as a hand-written
    autograd MAML loop.
    """
    plain = (
        torch.is_grad_enabled()
        and torch._C._functorch.peek_interpreter_stack() is None
        and all(v.requires_grad for v in fast.values())
    )
    if not plain:
        grads = grad(inner)(fast)
        return {n: g.detach() for n, g in grads.items()} if first_order else grads
    names = list(fast)
    values = torch.autograd.grad(
        inner(fast), [fast[n] for n in names], create_graph=not first_order, allow_unused=True
    )
    return {n: torch.zeros_like(fast[n]) if g is None else g for n, g in zip(names, values)}


def _lr_key(name: str) -> str:
    return name.replace(".", "__")


def _tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


class MAML(LightningModule):
    """Model-agnostic meta-learning (and FO-MAML, ANIL, Meta-SGD, iMAML) with manual optimisation.

    Args:
        backbone: the network; ``backbone(x)`` maps ``[n, ...]`` inputs to ``[n, outputs]``. Must be stateless
            (see the module docstring); :class:`~lightning_metaif.meta.backbones.ConvNet` and
            :class:`~lightning_metaif.meta.backbones.MLP` are.
        algorithm: ``"maml"`` (second order), ``"fomaml"``, ``"anil"`` or ``"imaml"``.
        inner_steps: gradient steps on the support set during training (≥ 1).
        inner_lr: inner step size (initial value of the learned rates with ``learn_inner_lr``).
        learn_inner_lr: Meta-SGD: learn one inner learning rate per adapted weight element (outer-optimised,
            part of :meth:`meta_parameters`). Not available for iMAML.
        outer_lr: learning rate of the outer optimiser.
        optimizer: ``"adam"`` or ``"sgd"`` (outer).
        loss: ``"cross_entropy"`` (labels ``[n]`` long) or ``"mse"`` (mean over output dims per sample).
        head: ANIL only: parameter names or name prefixes of the backbone (without ``"backbone."``) that adapt
            in the inner loop; default: the last ``nn.Linear`` module.
        imaml_lambda: iMAML proximal strength ``γ``.
        imaml_cg_steps: conjugate-gradient iterations for iMAML's implicit gradient (fixed count, vmappable).
        eval_inner_steps: inner steps in validation / test (default: ``inner_steps``).
        vectorize: how per-task gradients are computed: ``"auto"`` / ``"vmap"`` (``torch.func.vmap`` over the
            task batch) or ``"loop"``.
        chunk_size: tasks per ``vmap`` call (bounds memory).
        num_ways: classification only: if given, only the first ``num_ways`` outputs are used as logits.

    Training (``training_step(batch: TaskBatch)``): per-task meta-gradients ``g_k`` from
    :func:`~lightning_metaif.influence.gradients.per_task_gradients`, outer gradient
    ``Σ_k w_k g_k / B`` with ``w_k = task_weight_table.get(task_id, 1.0)``, written into ``.grad`` through
    ``manual_backward`` of a linear surrogate (so DDP averages it over ranks and Lightning's backward hooks
    fire), then ``opt.step()``. ``training_step`` returns ``{"loss", "task_ids", "task_losses",
    "task_gradients", "task_weights"}``: per-task gradients (flat ``[B, p]``, unweighted, this rank's tasks, in
    ``ParamLayout.of(meta_parameters())`` order) and the weights the step applied. This is the module contract
    of :class:`~lightning_metaif.callback.ReportsTaskGradients` (``reports_task_gradients = True``): the
    influence callback reads them instead of recomputing them.

    Example:
        >>> from lightning_metaif.meta.backbones import MLP
        >>> maml = MAML(MLP(1, 1, hidden=(8,)), loss="mse", inner_lr=0.01)
        >>> task = Task(torch.randn(5, 1), torch.randn(5, 1), torch.randn(7, 1), torch.randn(7, 1))
        >>> maml.task_loss(maml.meta_parameters(), task).shape
        torch.Size([])
    """

    reports_task_gradients = True  # training_step returns per-task gradients (see ReportsTaskGradients)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        algorithm: Algorithm = "maml",
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        learn_inner_lr: bool = False,
        outer_lr: float = 1e-3,
        optimizer: str = "adam",
        loss: str = "cross_entropy",
        head: str | Sequence[str] | None = None,
        imaml_lambda: float = 1.0,
        imaml_cg_steps: int = 5,
        eval_inner_steps: int | None = None,
        vectorize: str = "auto",
        chunk_size: int = 16,
        num_ways: int | None = None,
    ) -> None:
        super().__init__()
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"Unknown algorithm {algorithm!r}: choose one of {_ALGORITHMS}.")
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}.")
        if eval_inner_steps is not None and (not isinstance(eval_inner_steps, int) or eval_inner_steps < 1):
            raise ValueError(f"eval_inner_steps must be None or an integer >= 1, got {eval_inner_steps!r}.")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {optimizer!r}: choose one of {_OPTIMIZERS}.")
        if loss not in _LOSSES:
            raise ValueError(f"Unknown loss {loss!r}: choose one of {_LOSSES}.")
        if vectorize not in ("auto", "vmap", "loop"):
            raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop', got {vectorize!r}.")
        for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr), ("imaml_lambda", imaml_lambda)):
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
        if algorithm == "imaml":
            if learn_inner_lr:
                raise ValueError(
                    "learn_inner_lr (Meta-SGD) has no effect on iMAML's implicit gradient (the adapted point does "
                    "not depend on the step size at convergence): use algorithm='maml'/'fomaml'/'anil' with it."
                )
            if not imaml_lambda > 0 or imaml_cg_steps < 1:
                raise ValueError(
                    f"iMAML needs imaml_lambda > 0 and imaml_cg_steps >= 1, got {imaml_lambda} and {imaml_cg_steps}."
                )
        if head is not None and algorithm != "anil":
            raise ValueError(
                f"`head` selects the adapted parameters of ANIL; drop it for algorithm={algorithm!r}."
            )
        if num_ways is not None and (loss != "cross_entropy" or num_ways < 2):
            raise ValueError("num_ways is for classification (loss='cross_entropy') and must be >= 2.")
        outputs = getattr(getattr(backbone, "head", None), "out_features", None)
        if num_ways is not None and isinstance(outputs, int) and outputs < num_ways:
            raise ValueError(_num_ways_message(num_ways, outputs))
        check_backbone(backbone, vectorize)
        self.save_hyperparameters(ignore=["backbone"])
        self.automatic_optimization = False
        self.backbone = backbone
        self.algorithm, self.inner_steps, self.inner_lr = algorithm, inner_steps, float(inner_lr)
        self.learn_inner_lr, self.outer_lr, self.optimizer_name = learn_inner_lr, float(outer_lr), optimizer
        self.loss_name, self.imaml_lambda, self.imaml_cg_steps = (
            loss,
            float(imaml_lambda),
            int(imaml_cg_steps),
        )
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.vectorize, self.chunk_size, self.num_ways = vectorize, int(chunk_size), num_ways
        self._trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
        self.adapted_names = self._resolve_head(head) if algorithm == "anil" else list(self._trainable)
        if learn_inner_lr:
            own = dict(backbone.named_parameters())
            self.inner_lrs = nn.ParameterDict(
                {
                    _lr_key(n): nn.Parameter(torch.full_like(own[n].detach(), float(inner_lr)))
                    for n in self.adapted_names
                }
            )
        self.task_weight_table: dict[int, float] = {}
        self.last_task_ids: Tensor | None = None
        self.last_task_losses: Tensor | None = None
        self.last_task_gradients: Tensor | None = None
        self.last_learning_rate: float | None = None

    # --- configuration ------------------------------------------------------------------------------------

    def _resolve_head(self, head: str | Sequence[str] | None) -> list[str]:
        if head is None:
            linear = [name for name, m in self.backbone.named_modules() if isinstance(m, nn.Linear)]
            if not linear:
                raise ValueError(
                    "ANIL needs a head: the backbone has no nn.Linear; pass head='<parameter prefix>'."
                )
            prefix = linear[-1]
            names = [
                n for n in self._trainable if n.rsplit(".", 1)[0] == prefix or (prefix == "" and "." not in n)
            ]
        else:
            patterns = [head] if isinstance(head, str) else list(head)
            names = [
                n
                for n in self._trainable
                if any(n == p or n.startswith(p.rstrip(".") + ".") for p in patterns)
            ]
            if not names:
                raise ValueError(
                    f"head={head!r} matches no trainable backbone parameter; names are {self._trainable[:12]}."
                )
        return names

    def meta_parameters(self) -> dict[str, Tensor]:
        """The outer-optimised parameters (``named_parameters()`` that require grad), learned inner lrs included."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # --- functional core ----------------------------------------------------------------------------------

    def _unpack(self, params: Mapping[str, Tensor]) -> tuple[Params, Params]:
        """Backbone weights (backbone names) and inner lrs (adapted names); missing entries: own, detached."""
        theta = {}
        for name in self._trainable:
            value = params.get(_BACKBONE + name)
            theta[name] = value if value is not None else self.backbone.get_parameter(name).detach()
        lrs = {}
        if self.learn_inner_lr:
            for name in self.adapted_names:
                value = params.get(_LRS + _lr_key(name))
                lrs[name] = value if value is not None else self.inner_lrs[_lr_key(name)].detach()
        return theta, lrs

    def _forward(self, theta: Mapping[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(self.backbone, dict(theta), (x,))
        if self.num_ways is not None:
            if out.shape[-1] < self.num_ways:
                raise ValueError(_num_ways_message(self.num_ways, out.shape[-1]))
            out = out[..., : self.num_ways]
        return out

    def sample_losses(self, theta: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``[n]`` of the backbone with weights ``theta`` (backbone names)."""
        return self.output_sample_losses(self._forward(theta, x), y)

    def output_sample_losses(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``[n]`` of network outputs ``out`` (logits or predictions) against targets ``y``."""
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(out, y, reduction="none")
        if out.dim() == y.dim() + 1 and out.shape[-1] == 1:
            out = out.squeeze(-1)
        if out.shape != y.shape:
            raise ValueError(
                f"mse loss: prediction shape {tuple(out.shape)} does not match target {tuple(y.shape)}."
            )
        return ((out - y) ** 2).reshape(out.shape[0], -1).mean(-1)

    def _inner_objective(
        self, fixed: Params, task: Any, support_weights: Tensor | None
    ) -> Callable[[Params], Tensor]:
        def inner(fast: Params) -> Tensor:
            return weighted_mean(
                self.sample_losses({**fixed, **fast}, task.support_x, task.support_y), support_weights
            )

        return inner

    def adapt(
        self,
        params: Mapping[str, Tensor],
        task: Any,
        support_weights: Tensor | None = None,
        *,
        steps: int | None = None,
    ) -> Params:
        """Adapted weights ``θ_k`` keyed ``"backbone.<name>"`` (all backbone weights, adapted or not).

        ``steps`` overrides ``inner_steps`` (evaluation uses ``eval_inner_steps``). For iMAML the result is
        ``θ*`` with an identity Jacobian w.r.t. ``params`` (see the module docstring).
        """
        steps = self.inner_steps if steps is None else steps
        theta, lrs = self._unpack(params)
        if self.algorithm == "imaml":
            phi, shift = self._imaml_solve(theta, task, support_weights, steps)
            adapted = {n: phi[n] + shift[n] for n in phi}
            return {_BACKBONE + n: v for n, v in adapted.items()}
        fast = {n: theta[n] for n in self.adapted_names}
        fixed = {n: v for n, v in theta.items() if n not in fast}
        inner = self._inner_objective(fixed, task, support_weights)
        for _ in range(steps):
            grads = _inner_gradients(inner, fast, first_order=self.algorithm == "fomaml")
            fast = {n: fast[n] - (lrs[n] if lrs else self.inner_lr) * grads[n] for n in fast}
        return {_BACKBONE + n: v for n, v in {**fixed, **fast}.items()}

    def outer_loss(
        self,
        adapted: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        task: Any,
        query_weights: Tensor | None = None,
    ) -> Tensor:
        """Weighted mean query loss at the adapted weights (missing entries fall back to ``params``)."""
        theta, _ = self._unpack({**params, **adapted})
        return weighted_mean(self.sample_losses(theta, task.query_x, task.query_y), query_weights)

    def query_outputs(
        self, params: Mapping[str, Tensor], task: Any, support_weights: Tensor | None = None
    ) -> Tensor:
        """Outputs (logits or predictions) of the adapted network on the query inputs, ``[Q, outputs]``.

        With :meth:`output_loss` this is what the Gauss–Newton curvature needs:
        ``output_loss(query_outputs(λ, task), task) == task_loss(λ, task)`` (for iMAML, with the identity
        Jacobian of :meth:`adapt`).
        """
        theta, _ = self._unpack({**params, **self.adapt(params, task, support_weights)})
        return self._forward(theta, task.query_x)

    def output_loss(self, outputs: Tensor, task: Any, query_weights: Tensor | None = None) -> Tensor:
        """Weighted mean query loss of ``outputs`` (from :meth:`query_outputs`) against the query targets."""
        return weighted_mean(self.output_sample_losses(outputs, task.query_y), query_weights)

    def task_loss(
        self,
        params: Mapping[str, Tensor],
        task: Any,
        support_weights: Tensor | None = None,
        query_weights: Tensor | None = None,
    ) -> Tensor:
        """Adapt on the support set, return the weighted mean query loss (the engine contract).

        Its gradient w.r.t. ``params`` is the algorithm's meta-gradient (for iMAML the implicit one).
        """
        if self.algorithm != "imaml":
            return self.outer_loss(self.adapt(params, task, support_weights), params, task, query_weights)
        theta, _ = self._unpack(params)
        phi, shift = self._imaml_solve(theta, task, support_weights, self.inner_steps)

        def outer(t: Params) -> Tensor:
            return weighted_mean(self.sample_losses(t, task.query_x, task.query_y), query_weights)

        outer_grad = grad(outer)(phi)
        implicit = self._imaml_implicit(phi, task, support_weights, outer_grad)
        # value L_O(θ*); gradient γ(H+γI)^{-1}∇L_O; second derivative ∇²L_O(θ*) (identity Jacobian).
        moved = {n: phi[n] + shift[n] for n in phi}
        correction = {n: implicit[n] - outer_grad[n] for n in phi}
        return outer(moved) + _tree_dot(correction, shift)

    # --- iMAML ----------------------------------------------------------------------------------------------

    def _imaml_solve(
        self, theta: Params, task: Any, support_weights: Tensor | None, steps: int
    ) -> tuple[Params, Params]:
        """``θ*`` from ``steps`` of GD on the proximal inner problem started at ``λ̄ = λ.detach()``, and
        ``λ − λ̄`` (zero-valued, carries the gradient w.r.t. ``λ``)."""
        anchor = {n: v.detach() for n, v in theta.items()}
        shift = {n: theta[n] - anchor[n] for n in theta}
        inner = self._inner_objective({}, task, support_weights)
        gamma = self.imaml_lambda

        def proximal(phi: Params) -> Tensor:
            return inner(phi) + 0.5 * gamma * sum(((phi[n] - anchor[n]) ** 2).sum() for n in phi)

        phi = dict(anchor)
        for _ in range(steps):
            grads = grad(proximal)(phi)
            phi = {n: phi[n] - self.inner_lr * grads[n] for n in phi}
        return phi, shift

    def _imaml_implicit(self, phi: Params, task: Any, support_weights: Tensor | None, rhs: Params) -> Params:
        """``γ (∇²L_I(φ) + γI)^{-1} rhs`` by a fixed number of CG iterations (no data-dependent branches)."""
        gamma = self.imaml_lambda
        inner_grad = grad(self._inner_objective({}, task, support_weights))

        def matvec(v: Params) -> Params:
            _, hv = jvp(inner_grad, (phi,), (v,))
            return {n: hv[n] + gamma * v[n] for n in v}

        x = {n: torch.zeros_like(v) for n, v in rhs.items()}
        r = dict(rhs)
        p = dict(rhs)
        rs = _tree_dot(r, r)
        for _ in range(self.imaml_cg_steps):
            ap = matvec(p)
            pap = _tree_dot(p, ap)
            ok = (pap > 0) & (rs > 0)
            alpha = torch.where(ok, rs / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            x = {n: x[n] + alpha * p[n] for n in x}
            r = {n: r[n] - alpha * ap[n] for n in r}
            rs_new = _tree_dot(r, r)
            beta = torch.where(
                rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs)
            )
            p = {n: r[n] + beta * p[n] for n in p}
            rs = rs_new
        return {n: gamma * v for n, v in x.items()}

    # --- Lightning ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """The backbone with the current meta-parameters (no adaptation)."""
        return self._forward(dict(self.backbone.named_parameters()), x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.meta_parameters().values())
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.outer_lr)
        return torch.optim.SGD(params, lr=self.outer_lr)

    @staticmethod
    def _as_batch(batch: Any) -> TaskBatch:
        if isinstance(batch, TaskBatch):
            return batch
        if isinstance(batch, Sequence) and batch and all(isinstance(t, Task) for t in batch):
            return TaskBatch.stack(list(batch))
        raise ValueError(
            f"MAML expects a TaskBatch (or a list of Task objects) per step, got {type(batch).__name__}; use "
            "`collate_fn=lightning_metaif.meta.pools.collate_tasks` in the DataLoader."
        )

    def task_weights_for(self, task_ids: Tensor) -> Tensor:
        """``w_k`` from ``task_weight_table`` (missing id = 1.0), as a float tensor on the module's device."""
        table = self.task_weight_table
        values = [float(table.get(int(i), 1.0)) for i in task_ids.tolist()]
        return torch.tensor(values, dtype=self.dtype, device=self.device)

    def training_step(self, batch: Any, batch_idx: int = 0) -> dict[str, Tensor]:
        batch = self._as_batch(batch)
        params = self.meta_parameters()
        grads, losses = per_task_gradients(
            self, params, batch, chunk_size=self.chunk_size, vectorize=self.vectorize
        )
        weights = self.task_weights_for(batch.task_ids).to(grads.dtype)
        num_tasks = len(batch)
        outer = (weights[:, None] * grads).sum(0) / num_tasks
        loss = (weights * losses).sum() / num_tasks
        opt = self.optimizers()
        self.last_task_ids = batch.task_ids.detach().cpu()
        self.last_task_losses = losses.detach()
        self.last_task_gradients = grads.detach()
        self.last_learning_rate = float(opt.param_groups[0]["lr"])
        opt.zero_grad()
        # Linear surrogate: value = mean weighted loss, gradient = outer. Going through manual_backward lets
        # DDP all-reduce (average) the gradient over ranks and fires on_before/after_backward.
        flat_outer = ParamLayout.of(params).unflatten(outer.detach())
        surrogate = loss.detach() + sum((flat_outer[n] * (p - p.detach())).sum() for n, p in params.items())
        self.manual_backward(surrogate)
        opt.step()
        self.log("train/meta_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=num_tasks)
        return {
            "loss": loss.detach(),
            "task_ids": self.last_task_ids,
            "task_losses": self.last_task_losses,
            "task_gradients": self.last_task_gradients,
            "task_weights": weights.detach(),
        }

    def adam_preconditioner(self, optimizer: torch.optim.Optimizer | None = None) -> Tensor | None:
        """Flat ``1 / (sqrt(v̂) + eps)`` of Adam / AdamW in ``ParamLayout.of(meta_parameters())`` order.

        Read it *after* ``opt.step()`` (e.g. in ``on_train_batch_end``): then ``v̂`` includes the current
        gradient, which is the denominator that step used. ``None`` for other optimisers or before the first
        step. With ``amsgrad`` the running maximum is used (see
        :func:`lightning_metaif.influence.optim.adam_preconditioner`).
        """
        return adam_preconditioner(
            self.optimizers() if optimizer is None else optimizer, self.meta_parameters()
        )

    def _evaluate(self, batch: Any, stage: str) -> dict[str, Tensor]:
        with torch.inference_mode(False), torch.enable_grad():
            batch = self._as_batch(batch)
            tensors = [t.clone() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)]
            params = {n: p.detach().clone() for n, p in self.meta_parameters().items()}
            classify = self.loss_name == "cross_entropy"

            def evaluate(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
                task = Task(sx, sy, qx, qy)
                adapted = self.adapt(params, task, steps=self.eval_inner_steps)
                theta, _ = self._unpack(adapted)
                loss = self.sample_losses(theta, qx, qy).mean()
                if classify:
                    accuracy = (self._forward(theta, qx).argmax(-1) == qy).to(loss.dtype).mean()
                else:
                    accuracy = torch.zeros_like(loss)
                return loss.detach(), accuracy.detach()

            def looped(*chunk: Tensor) -> tuple[Tensor, Tensor]:
                pairs = [evaluate(*(t[i] for t in chunk)) for i in range(chunk[0].shape[0])]
                return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

            paths = {"vmap": vmap(evaluate), "loop": looped}
            if self.vectorize != "auto":
                paths = {self.vectorize: paths[self.vectorize]}
            key = (
                "evaluate",
                self.chunk_size,
                tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in tensors),
            )
            losses, accuracies = [], []
            for start in range(0, len(batch), self.chunk_size):
                chunk = [t[start : start + self.chunk_size] for t in tensors]
                _, (loss, acc) = choose_path(
                    self,
                    key,
                    {name: (lambda run=run, chunk=chunk: run(*chunk)) for name, run in paths.items()},
                    what=f"MAML {stage} adaptation ({len(chunk[0])} tasks)",
                    device=chunk[0].device,
                )
                losses.append(loss)
                accuracies.append(acc)
        loss, accuracy = torch.cat(losses), torch.cat(accuracies)
        num_tasks = len(batch)
        self.log(f"{stage}/loss", loss.mean(), on_step=False, on_epoch=True, batch_size=num_tasks)
        out = {"loss": loss.mean(), "task_losses": loss}
        if classify:
            self.log(f"{stage}/accuracy", accuracy.mean(), on_step=False, on_epoch=True, batch_size=num_tasks)
            out["accuracy"] = accuracy.mean()
        return out

    def validation_step(self, batch: Any, batch_idx: int = 0) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int = 0) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")
