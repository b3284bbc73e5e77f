"""Cost and accuracy of the sparse SJLT projection against the dense Rademacher and Gaussian ones.

For ``p`` parameters projected to ``d = 1024``: the time to project a chunk of 16 gradients (what the store
does per training step; medians of interleaved repeats after a warm-up, 1 thread), and the accuracy over 10
seeds: the spread of ``‖Pa‖²/‖a‖² − 1`` and of the inner-product error ``(⟨Pa, Pb⟩ − ⟨a, b⟩) / (‖a‖‖b‖)`` for
correlated gradient-like vectors (heavy-tailed coordinates, so sparsity is not flattered), and the Spearman
correlation of 200 projected inner products with the exact ones (a TracIn ranking).

Usage::

    python benchmarks/bench_projection.py            # p = 10^5 and 10^6, ~1 min
"""

from __future__ import annotations

import argparse

import _common as C
import torch
from scipy.stats import spearmanr

from lightning_metaif.influence.projection import RandomProjection

KINDS = ("sjlt", "rademacher", "gaussian")


def accuracy(p: int, d: int, seeds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    # Heavy-tailed coordinates (Student-t like): a few large entries, as in real gradients.
    scale = torch.randn(p, generator=g).abs() ** 3
    a = torch.randn(p, generator=g) * scale
    b = 0.5 * a + torch.randn(p, generator=g) * scale
    queries = torch.randn(200, p, generator=g) * scale
    exact_rank = (queries @ a).numpy()
    out = {}
    for kind in KINDS:
        norm_err, inner_err, rank = [], [], []
        for seed in range(seeds):
            projection = RandomProjection(p, d, seed=seed, kind=kind)
            pa, pb = projection(torch.stack([a, b]))
            norm_err.append(float(pa @ pa / (a @ a)) - 1)
            inner_err.append(float((pa @ pb - a @ b) / (a.norm() * b.norm())))
            if seed < 3:
                rank.append(float(spearmanr((projection(queries) @ pa).numpy(), exact_rank)[0]))
        out[kind] = {
            "norm_error_std": float(torch.tensor(norm_err).std()),
            "inner_error_std": float(torch.tensor(inner_err).std()),
            "tracin_spearman": sum(rank) / len(rank),
        }
    out["jl_sigma_sqrt_2_over_d"] = (2 / d) ** 0.5
    return out


def timing(p: int, d: int, rows: int, repeats: int, kinds=KINDS) -> dict:
    x = torch.randn(rows, p)
    projections = {kind: RandomProjection(p, d, seed=0, kind=kind) for kind in kinds}
    times = C.interleaved({k: (lambda pr=pr: pr(x)) for k, pr in projections.items()}, repeats=repeats)
    med = {k: C.median(v) for k, v in times.items()}
    return {
        "times_s": times,
        "median_s": med,
        "ratio_vs_rademacher": {k: med[k] / med["rademacher"] for k in med},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10, help="projections per kind for the accuracy")
    args = parser.parse_args()
    C.set_threads(args.threads)
    env = C.environment()
    results, rows = {}, []
    for p in (100_000, 1_000_000):
        kinds = (
            KINDS if p < 1_000_000 else ("sjlt", "rademacher")
        )  # a dense Gaussian P of 10^9 entries: minutes
        t = timing(p, args.dim, 16, args.repeats if p < 1_000_000 else 2, kinds)
        acc = results[100_000]["accuracy"] if p > 100_000 else accuracy(p, args.dim, args.seeds)
        results[p] = {"timing": t, "accuracy": acc}
        for kind in kinds:
            rows.append(
                {
                    "p": p,
                    "kind": kind,
                    "project 16 rows, median s": t["median_s"][kind],
                    "vs rademacher": t["ratio_vs_rademacher"][kind],
                    "norm err std": acc[kind]["norm_error_std"],
                    "inner err std": acc[kind]["inner_error_std"],
                    "TracIn Spearman": acc[kind]["tracin_spearman"],
                }
            )
    print(f"d = {args.dim}; √(2/d) = {(2 / args.dim) ** 0.5:.4f} (accuracy measured at p = 100,000)")
    print(C.table(rows))
    C.save("bench_projection", {"environment": env, "dim": args.dim, "results": results, "rows": rows})


if __name__ == "__main__":
    main()
