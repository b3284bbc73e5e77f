"""Scalar summaries of a scoring round (what goes to ``metrics.csv`` and to the W&B history)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.retrieval import retrieval_precision, retrieval_recall

from lightning_metaif.records import ScoreRound

__all__ = ["QUANTILES", "round_metrics", "top_k_count", "k_label"]

QUANTILES: tuple[tuple[str, float], ...] = (
    ("min", 0.0),
    ("q10", 0.1),
    ("q25", 0.25),
    ("median", 0.5),
    ("q75", 0.75),
    ("q90", 0.9),
    ("max", 1.0),
)


def top_k_count(fraction: float, num_tasks: int) -> int:
    """Number of tasks in the lowest-scoring ``fraction`` of ``num_tasks``: ``ceil(fraction * M)``, at least 1.

    Example:
        >>> top_k_count(0.1, 30), top_k_count(0.2, 7), top_k_count(0.01, 5)
        (3, 2, 1)
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"k fractions must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * num_tasks - 1e-9))


def k_label(fraction: float) -> str:
    """``0.2 -> "20%"``, ``0.125 -> "12.5%"`` (the suffix of ``influence/recall@...``)."""
    return f"{fraction * 100:.6g}%"


def round_metrics(
    round: ScoreRound, *, ks: Sequence[float] = (0.1, 0.2, 0.4), prefix: str = "influence"
) -> dict[str, float]:
    """Scalar statistics of one round, keys namespaced ``{prefix}/...``.

    Only tasks with a score (``round.scored``) count: a task never scored is in no statistic.

    Always: ``step``, ``epoch``, ``num_tasks``, ``num_scored``, ``score_{min,q10,q25,median,q75,q90,max}`` (over
    *finite* scores; NaN if none), ``fraction_harmful`` (share of finite scores < 0), ``num_nonfinite`` (scored
    tasks whose score is NaN or infinite), ``num_pruned`` (total
    pruned mask), ``num_pruned_new`` (ids named by this round's ``"prune"`` decisions that are pruned now),
    ``weight_{min,mean,max}``, ``seconds``; ``self_influence_median`` when self-influence is given.

    When ``round.corrupted`` is given (ground truth of corrupted tasks), detection quality of the harmfulness
    ranking over the scored tasks (harmfulness = -score; non-finite scores count as the least harmful, i.e. never
    detected):
    ``auroc`` (torchmetrics ``binary_auroc``; NaN if only one class is present) and, for each k in ``ks``,
    ``recall@k%`` = share of *all* corrupted tasks that are among the ``ceil(k*M)`` lowest-scoring tasks
    (torchmetrics ``retrieval_recall`` with ``top_k``) and ``precision@k%`` = share of those lowest-scoring
    tasks that are corrupted (``retrieval_precision``). Both NaN when no task is corrupted. Once tasks are
    pruned, ``pruning_precision`` = share of the pruned tasks that are corrupted.

    Example:
        >>> r = ScoreRound(step=5, epoch=0, estimator="tracin", task_ids=torch.arange(4),
        ...                scores=torch.tensor([-2.0, 1.0, -1.0, 3.0]), corrupted=torch.tensor([1, 0, 1, 0]))
        >>> m = round_metrics(r, ks=(0.5,))
        >>> m["influence/auroc"], m["influence/recall@50%"], m["influence/fraction_harmful"]
        (1.0, 1.0, 0.5)
    """
    p = f"{prefix}/"
    scored = round.scored
    scores = round.scores.to(torch.float64)[scored]
    finite = torch.isfinite(scores)
    good = scores[finite]
    num_scored = int(scored.sum())
    out: dict[str, float] = {
        p + "step": float(round.step),
        p + "epoch": float(round.epoch),
        p + "num_tasks": float(round.num_tasks),
        p + "num_scored": float(num_scored),
    }
    if good.numel():
        qs = torch.quantile(good, torch.tensor([q for _, q in QUANTILES], dtype=torch.float64))
        for (name, _), value in zip(QUANTILES, qs.tolist()):
            out[p + f"score_{name}"] = value
        out[p + "fraction_harmful"] = float((good < 0).double().mean())
    else:
        for name, _ in QUANTILES:
            out[p + f"score_{name}"] = math.nan
        out[p + "fraction_harmful"] = math.nan
    out[p + "num_nonfinite"] = float((~finite).sum())
    out[p + "num_pruned"] = float(round.pruned.sum())
    proposed = {t for d in round.decisions if d.action == "prune" for t in d.task_ids}
    pruned_ids = set(round.task_ids[round.pruned].tolist())
    out[p + "num_pruned_new"] = float(len(proposed & pruned_ids))
    w = round.weights
    if w.numel():
        out[p + "weight_min"], out[p + "weight_mean"], out[p + "weight_max"] = (
            float(w.min()),
            float(w.mean()),
            float(w.max()),
        )
    else:
        out[p + "weight_min"] = out[p + "weight_mean"] = out[p + "weight_max"] = math.nan
    out[p + "seconds"] = float(round.seconds)
    if round.self_influence is not None:
        si = round.self_influence[scored]
        si = si[torch.isfinite(si)]
        out[p + "self_influence_median"] = float(si.median()) if si.numel() else math.nan

    if round.corrupted is not None and bool(round.pruned.any()):
        out[p + "pruning_precision"] = float(round.corrupted[round.pruned].double().mean())
    if round.corrupted is not None and num_scored:
        target = round.corrupted[scored].long()
        harm = -scores
        floor = float(harm[finite].min()) - 1.0 if bool(finite.any()) else 0.0
        harm = torch.where(finite, harm, torch.full_like(harm, floor))  # unranked = least suspicious
        positives = int(target.sum())
        both = 0 < positives < num_scored
        out[p + "auroc"] = float(binary_auroc(harm, target)) if both else math.nan
        for k in ks:
            top_k = top_k_count(k, num_scored)
            label = k_label(k)
            if positives:
                out[p + f"recall@{label}"] = float(retrieval_recall(harm, target, top_k=top_k))
                out[p + f"precision@{label}"] = float(retrieval_precision(harm, target, top_k=top_k))
            else:
                out[p + f"recall@{label}"] = out[p + f"precision@{label}"] = math.nan
    return out
