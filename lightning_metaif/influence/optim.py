"""What an optimiser step did to each coordinate: learning rates and Adam's preconditioner, read after the step.

TracIn along a real training path needs, for each step ``t``, the map from the (mean) gradient to the update:
``λ_{t+1} = λ_t − D_t ḡ_t`` with a diagonal ``D_t``. For SGD, ``D_t`` is each parameter group's learning rate; for
Adam / AdamW it is ``η_group / (√v̂_t + ε)`` (LESS, Xia et al. 2024, preconditions per-example gradients this way),
where ``v̂_t`` already includes the step's gradient, so it must be read *after* ``optimizer.step()``. Momentum
(Adam's ``m̂``, SGD's momentum buffer) and weight decay are not part of ``D_t``: TracIn attributes each step's
*gradient*, as in Pruthi et al. and LESS.

This is the one implementation of that map in the package: the callback's estimators and
:meth:`lightning_metaif.MAML.adam_preconditioner` both call it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["adam_preconditioner", "learning_rates", "update_scaling"]


def _unwrap(optimizer: object) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the real one


def _is_adam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def adam_preconditioner(optimizer: object, params: Mapping[str, Tensor]) -> Tensor | None:
    """Flat ``1 / (√v̂ + ε)`` of Adam / AdamW for ``params`` (in their order), read after a step.

    Every parameter group's own ``β₂`` and ``ε`` are used, and with ``amsgrad`` the running maximum of ``v``.
    Returns ``None`` when the optimiser is not Adam / AdamW or has not stepped yet on any parameter; a parameter
    it holds no state for (not in its groups, or never given a gradient) gets 1 (no preconditioning).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([w], lr=0.1, eps=1e-8)
        >>> w.grad = torch.tensor([2.0, -4.0]); opt.step()
        >>> adam_preconditioner(opt, {"w": w})  # after one step v̂ = g², so 1/(|g| + ε)
        tensor([0.5000, 0.2500])
    """
    optimizer = _unwrap(optimizer)
    if not _is_adam(optimizer):
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    entries = []  # (param, v, beta2, eps, step) or (param, None, ...) without state
    for param in params.values():
        state = optimizer.state.get(param)
        group = group_of.get(id(param))
        if not state or "exp_avg_sq" not in state or group is None:
            entries.append((param, None, 0.0, 0.0, 0.0))
            continue
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        entries.append((param, v, group["betas"][1], group["eps"], float(state["step"])))
    if all(v is None for _, v, *_ in entries):
        return None
    if len({(b, e, t) for _, v, b, e, t in entries if v is not None}) == 1 and all(
        v is not None for _, v, *_ in entries
    ):
        # one (β₂, ε, step) for all (the usual case): the same elementwise formula on one flat vector
        _, _, beta2, eps, step = entries[0]
        v = torch.cat([v.reshape(-1) for _, v, *_ in entries])
        return 1.0 / ((v / (1.0 - beta2**step)).sqrt() + eps)
    parts = []
    for param, v, beta2, eps, step in entries:
        if v is None:
            parts.append(torch.ones(param.numel(), dtype=param.dtype, device=param.device))
        else:
            parts.append((1.0 / ((v / (1.0 - beta2**step)).sqrt() + eps)).reshape(-1))
    return torch.cat(parts)


def learning_rates(optimizer: object) -> list[float]:
    """Each parameter group's current learning rate: snapshot it *before* the step (a scheduler may move it
    before the hooks that run after the step)."""
    return [float(g["lr"]) for g in _unwrap(optimizer).param_groups]


def update_scaling(
    optimizer: object, params: Mapping[str, Tensor], rates: list[float] | None = None
) -> Tensor:
    """Flat ``D_t`` of the step just taken: each coordinate's learning rate times Adam's preconditioner.

    ``rates``: the groups' learning rates the step used (from :func:`learning_rates` before the step; default:
    the current ones). Parameters that no group of ``optimizer`` holds get 0 (the step did not move them).
    Read it after ``optimizer.step()``.

    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.5}])
        >>> update_scaling(opt, {"a": a, "b": b}).tolist()
        [0.1, 0.1, 0.5]
    """
    optimizer = _unwrap(optimizer)
    rates = learning_rates(optimizer) if rates is None else list(rates)
    if len(rates) != len(optimizer.param_groups):
        raise ValueError(
            f"rates has {len(rates)} entries for {len(optimizer.param_groups)} parameter groups."
        )
    group_index = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    per_param = [
        0.0 if group_index.get(id(p)) is None else rates[group_index[id(p)]] for p in params.values()
    ]
    numel = sum(p.numel() for p in params.values())
    preconditioner = adam_preconditioner(optimizer, params)
    if len(set(per_param)) == 1:  # one rate for all (the usual case): a scalar, no per-parameter pieces
        if preconditioner is None:
            return torch.full((numel,), per_param[0], dtype=torch.float64)
        return per_param[0] * preconditioner.detach().to("cpu", torch.float64)
    parts = [
        torch.full((p.numel(),), rate, dtype=torch.float64) for p, rate in zip(params.values(), per_param)
    ]
    scaling = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if preconditioner is not None:
        scaling = scaling * preconditioner.detach().to("cpu", torch.float64)
    return scaling
