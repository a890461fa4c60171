"""`dr bench item-rows`: does a row budget below the catalog cost the reranker quality, do exact rows
for the frequent items win it back, and does sharing one item table cost quality?

Each variant trains the reranker alone as EM round 0 does (early-stopped on the validation users;
jobs/benchmarks/encoders.reranker_figures) and reports the test users' recall@10 of brute force
over it (what the structure's recall is measured against). On the quality bench's synthetic
catalog (jobs/benchmarks/quality.py, 10^4 items) with the sampled softmax and sparse item tables of
large catalogs (`train.full_softmax_max_items` 0, the regime a row budget is for): every item its
own row; a budget of a fifth of the catalog, half of it exact rows for the most frequent items
(the default split); the same budget with no exact rows (every item composed from
quotient-remainder rows, Shi et al. 2019); every item its own row with the reranker's output table
tied to its encoder's input table (model.tie_item_tables: one item table less). On MovieLens-1M
(the default config as is: exact softmax) separate vs tied tables. `--quick`: the two budget
variants only.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from dr_model.config import DRConfig
from dr_model.split import paper_split
from dr_model.synthetic import generate

from .encoders import reranker_figures
from .quality import QUICK_SIZES, spec_for

ITEMS = QUICK_SIZES[0]
BUDGET = ITEMS // 5
SYNTHETIC = {
    "exact": (),
    "budget_half_exact": (f"model.item_rows={BUDGET}", "model.item_exact_share=0.5"),
    "budget_all_composed": (f"model.item_rows={BUDGET}", "model.item_exact_share=0.0"),
    "tied": ("model.tie_item_tables=true",),
}
MOVIELENS = {"exact": (), "tied": ("model.tie_item_tables=true",)}


def _variants(split, base: DRConfig, variants: dict[str, tuple[str, ...]]) -> dict:
    got = {}
    for name, overrides in variants.items():
        print(f"[bench] variant {name}: {' '.join(overrides) or 'defaults'}", file=sys.stderr, flush=True)
        got[name] = reranker_figures(split, base.with_overrides(list(overrides)))
    return {"variants": list(variants), "overrides": [list(v) for v in variants.values()],
            "brute_force_recall_at_10": [got[n]["recall"] for n in variants],
            "brute_force_f1_at_10": [got[n]["f1"] for n in variants],
            "reranker_epochs": [got[n]["epochs"] for n in variants],
            "train_seconds": [got[n]["train_seconds"] for n in variants]}


def run(quick: bool = False) -> dict:
    from jobs.movielens import load_movielens

    torch.set_num_threads(2)
    synth = DRConfig.from_dict({"split": {"rating_threshold": 0.0}, "train": {"full_softmax_max_items": 0}})
    split = paper_split(generate(spec_for(ITEMS)), synth.split, synth.model.seq_len)
    out = {"date": time.strftime("%Y-%m-%d"), "items": ITEMS, "item_rows_budget": BUDGET,
           "catalog_size": int(len(np.unique(split.train_target))),
           "synthetic": _variants(split, synth, {n: v for n, v in SYNTHETIC.items()
                                                 if not quick or n.startswith("budget")})}
    if not quick:
        ml = DRConfig()
        inter, _ = load_movielens("ml-1m")
        out["movielens_1m"] = _variants(paper_split(inter, ml.split, ml.model.seq_len), ml, MOVIELENS)
    return out
