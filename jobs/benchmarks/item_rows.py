"""`dr bench item-rows`: does a row budget below the catalog cost quality, do exact rows for the
frequent items win it back, and does sharing one item table between the reranker's encoder and
its output cost quality?

The quality bench's synthetic catalog (jobs/benchmarks/quality.py; 10^4 items, `--quick`: the
same, fewer variants) trained and evaluated three ways with the default config otherwise:
every item its own row (the default below model.item_rows), a budget of a fifth of the catalog
with half of it exact rows for the most frequent items (the default split), and the same budget
with no exact rows (every item composed from quotient-remainder rows, Shi et al. 2019), and
every item its own row with the reranker's output table tied to its encoder's input table
(model.tie_item_tables: one item table less).
Printed per variant (lists aligned with `variants`): `recall_at_10` of DR and brute force over
the reranker, `dr_recall_over_brute_force`, `fraction_of_catalog_scored`.
"""
from __future__ import annotations

import time

import torch

from .quality import QUICK_SIZES, measure

ITEMS = QUICK_SIZES[0]
BUDGET = ITEMS // 5
VARIANTS = {
    "exact": (),
    "budget_half_exact": (f"model.item_rows={BUDGET}", "model.item_exact_share=0.5"),
    "budget_all_composed": (f"model.item_rows={BUDGET}", "model.item_exact_share=0.0"),
    "tied": ("model.tie_item_tables=true",),
}


def run(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    names = [n for n in VARIANTS if not quick or n not in ("exact", "tied")]
    got = {n: measure(ITEMS, overrides=VARIANTS[n]) for n in names}
    rep = {n: g["report"] for n, g in got.items()}
    return {
        "date": time.strftime("%Y-%m-%d"),
        "items": ITEMS, "item_rows_budget": BUDGET, "variants": names,
        "overrides": [list(VARIANTS[n]) for n in names],
        "dr_recall": [round(rep[n]["methods"]["dr"]["recall"], 4) for n in names],
        "brute_force_recall": [round(rep[n]["methods"]["brute_force"]["recall"], 4) for n in names],
        "dr_recall_over_brute_force": [round(rep[n]["dr_recall_over_brute_force"], 4) for n in names],
        "fraction_of_catalog_scored": [round(rep[n]["fraction_of_catalog_scored"], 5) for n in names],
        "seconds": [round(got[n]["seconds"], 1) for n in names],
    }
