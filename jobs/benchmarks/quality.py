"""`dr bench quality`: the default config on synthetic planted-cluster catalogs nobody tuned for.

For each catalog size (10^5 items; `--quick`: 10^4) a planted-cluster dataset (dr_model.synthetic:
users with two interest clusters of 100 items, power-law popularity inside a cluster, 5% of the
events drawn uniformly) goes through the paper's split and the single-process EM trainer with
the DEFAULT config (nothing set but the split's held-out sizes), then the evaluation report of
the test users. Printed per size, as lists aligned with `items`: `dr_recall_over_brute_force`,
`fraction_of_catalog_scored`, `largest_path`, `alpha_used`, the budget, the retrieval beam and
the recall of every method. Targets (issue #10): DR recall >= 0.95 x brute force at <= 5% of
the catalog scored.
"""
from __future__ import annotations

import sys
import time

import torch

from dr_model.config import DRConfig
from dr_model.evaluation import EvalUsers
from dr_model.split import paper_split
from dr_model.synthetic import SyntheticSpec, generate
from dr_model.trainer import evaluate, train_em

SIZES = (100_000,)
QUICK_SIZES = (10_000,)


def spec_for(items: int) -> SyntheticSpec:
    """Clusters of 100 items; 1/4 as many users as items (at least 4,000), 30 events each."""
    return SyntheticSpec(num_users=max(items // 4, 4000), num_items=items, num_clusters=max(items // 100, 2),
                         events_per_user=30, interests=2, zipf_a=1.1, noise=0.05, seed=0)


def measure(items: int, log=lambda m: print(m, file=sys.stderr, flush=True), overrides: tuple[str, ...] = ()) -> dict:
    """Train and evaluate the default config (+ `section.field=value` overrides) on one synthetic catalog -> its figures."""
    spec = spec_for(items)
    # synthetic events have no ratings
    cfg = DRConfig.from_dict({"split": {"rating_threshold": 0.0}}).with_overrides(list(overrides))
    t0 = time.perf_counter()
    split = paper_split(generate(spec), cfg.split, cfg.model.seq_len)
    valid = EvalUsers.of(split, 1)
    res = train_em(split.train_hist, split.train_target, cfg, train_next=split.train_next(cfg.train.rerank_targets),
                   log=log, valid=valid)
    report = evaluate(res, EvalUsers.of(split, 2), cfg, train=(split.train_user, split.train_target), valid=valid)
    return {"report": report, "alpha": res.alpha, "beam": res.beam, "seconds": time.perf_counter() - t0,
            "train_samples": int(len(split.train_target)), "users": spec.num_users}


def run(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    sizes = QUICK_SIZES if quick else SIZES
    got = [measure(n) for n in sizes]
    rep = [g["report"] for g in got]
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "config": "defaults (split.rating_threshold = 0: synthetic events carry no rating)",
        "items": list(sizes),
        "catalog_size": [r["catalog_size"] for r in rep],
        "users": [g["users"] for g in got],
        "train_samples": [g["train_samples"] for g in got],
        "dr_recall_over_brute_force": [round(r["dr_recall_over_brute_force"], 4) for r in rep],
        "fraction_of_catalog_scored": [round(r["fraction_of_catalog_scored"], 5) for r in rep],
        "items_scored_per_user": [round(r["items_scored_per_user"], 1) for r in rep],
        "largest_path": [r["path_sizes"]["max"] for r in rep],
        "nonempty_paths": [r["path_sizes"]["nonempty_paths"] for r in rep],
        "alpha_used": [g["alpha"] for g in got],
        "beam": [g["beam"] for g in got],
        "recall_at_10": {m: [round(r["methods"][m]["recall"], 4) if m in r["methods"] else None for r in rep]
                         for m in ("dr", "brute_force", "item_cf", "ease", "popularity")},
        "seconds": [round(g["seconds"], 1) for g in got],
    }
    out["meets_targets"] = all(r >= 0.95 and f <= 0.05 for r, f in
                               zip(out["dr_recall_over_brute_force"], out["fraction_of_catalog_scored"]))
    return out
