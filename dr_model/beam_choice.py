"""The retrieval beam: the cheapest beam within the budget that keeps brute force's recall.

The budget (search.items_per_user) caps the items a user may cost: the largest beam whose mean
distinct items per validation user fits it is the ceiling. Below it, the beam is the smallest
whose reranked validation recall@k (k = search.top_n, the depth `dr candidates` serves) reaches
search.recall_target x brute force's (the same reranker over every item): a bigger beam spends
items for recall the reranker cannot add.
"Reaches" is judged with a margin for the validation sample (search.recall_confidence): the
users' paired differences d_u = recall_u(b) - target x brute_force_u must have a lower
confidence bound mean(d) - z sd(d) / sqrt(n) >= 0. The smallest beam whose point estimate crosses
the floor is the one the sample's noise favours most, so on a few hundred validation users it
undershoots on users it never saw; the bound makes the rule climb there, and narrows as 1/sqrt(n)
on large validation sets. When nothing can be measured (no truth items, brute force finds nothing, recall_target 0) or
even the ceiling misses the target, the ceiling is the beam. The rule is written against two
callables, so the in-process trainer and the Spark job (jobs/retrieval_beam.py, over the
memory-mapped serving bundle) take the same decisions; dr_model.evaluation.choose_beam is the
in-process caller.
"""
from __future__ import annotations

import functools
from statistics import NormalDist
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .index import PathIndex, row_blocks
from .model import DRModel


def search_beam(cost: Callable[[int], float], budget: float, max_beam: int) -> tuple[int, float]:
    """The largest beam b <= max_beam with cost(b) <= budget (cost grows with b) -> (b, cost(b)); at least 1.

    A doubling search then a bisection: O(log beam) calls of cost, each evaluated once.
    """
    c = functools.cache(cost)
    lo, hi = 1, 1
    while hi < max_beam and c(hi) <= budget:
        lo, hi = hi, min(2 * hi, max_beam)
    if c(hi) <= budget:
        return hi, c(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if c(mid) <= budget else (lo, mid)
    return lo, c(lo)


def smallest_beam(ok: Callable[[int], bool], hi: int) -> int:
    """The smallest b in 1..hi with ok(b), given ok(hi) (ok grows with b): doubling from 1, then a bisection,
    so a small answer costs few calls."""
    lo, b = 0, 1
    while b < hi and not ok(b):
        lo, b = b, 2 * b
    hi = min(b, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class BeamChoice:
    """The chosen beam and why: its items per validation user, the budget's ceiling beam, its recall and the floor."""

    beam: int
    items: float
    budget_beam: int
    recall: float | None = None                 # validation recall@k at `beam` (None: not measured)
    brute_force_recall: float | None = None     # the reference the floor is a share of
    floor: float | None = None                  # recall_target x brute_force_recall
    lower: float | None = None                  # lower confidence bound of recall - floor at `beam`

    def metrics(self) -> dict[str, Any]:
        """The run's metrics: retrieval_beam, items_scored_per_validation_user and the rest of the choice."""
        return {"retrieval_beam": self.beam, "items_scored_per_validation_user": self.items,
                "budget_beam": self.budget_beam, "validation_recall": self.recall,
                "validation_brute_force_recall": self.brute_force_recall, "validation_recall_floor": self.floor,
                "validation_recall_margin_lower_bound": self.lower}

    def line(self, budget: float, num_items: int) -> str:
        why = ("the budget's beam (no recall measured)" if self.floor is None else
               f"validation recall {self.recall:.4f} against a floor of {self.floor:.4f} (brute force "
               f"{self.brute_force_recall:.4f}; lower confidence bound of the difference {self.lower:+.4f}); "
               f"the budget allowed beam {self.budget_beam}")
        return (f"retrieval beam {self.beam}: {self.items:.1f} items scored per validation user (budget {budget:g} of "
                f"{num_items} items), {why}")


def margin_lower_bound(recall: np.ndarray, brute_force: np.ndarray, target: float, z: float) -> float:
    """Lower confidence bound of mean(recall - target x brute_force) over users: recall, brute_force [N] (paired)."""
    d = np.atleast_1d(np.asarray(recall, dtype=np.float64)) - target * np.atleast_1d(np.asarray(brute_force,
                                                                                                  dtype=np.float64))
    n = d.shape[0]
    se = float(d.std(ddof=1)) / np.sqrt(n) if n > 1 else 0.0
    return float(d.mean() - z * se)


def confidence_z(confidence: float) -> float:
    """One-sided normal quantile of a confidence level in [0, 1) (0 -> 0: the point estimate)."""
    return NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0


def pick_beam(cost: Callable[[int], float], recall: Callable[[int], np.ndarray | float],
              brute_force_recall: np.ndarray | float, budget: float, max_beam: int, target: float,
              confidence: float = 0.0) -> BeamChoice:
    """cost(b): mean distinct items per validation user at beam b; recall(b): their DR recall@k at beam b, per
    user [N] (or their mean); brute_force_recall: the same users' brute force recall@k [N] (or its mean)."""
    # each beam's cost and recall are measured once, the chosen beam's cost included
    cost, r = functools.cache(cost), functools.cache(recall)
    top, items = search_beam(cost, budget, max_beam)
    bf = float(np.mean(brute_force_recall))
    if target <= 0 or bf <= 0:
        return BeamChoice(top, items, top)
    z, floor = confidence_z(confidence), target * bf

    def lower(b: int) -> float:
        return margin_lower_bound(r(b), brute_force_recall, target, z)

    def choice(b: int) -> BeamChoice:
        return BeamChoice(b, cost(b), top, float(np.mean(r(b))), bf, floor, lower(b))

    if lower(top) < 0:
        return choice(top)
    return choice(smallest_beam(lambda b: lower(b) >= 0, top))


def distinct_items(model: DRModel, seq: torch.Tensor, index: PathIndex, beam: int) -> np.ndarray:
    """Distinct items on each user's `beam` paths [N]: seq [N, L]. The budget's measure (an item on
    several of a user's paths counts once; DRModel.retrieve reports the vectors it scored, copies included)."""
    return distinct_on_paths(model.beam(seq, beam)[0].numpy(), index)


def distinct_on_paths(paths: np.ndarray, index: PathIndex) -> np.ndarray:
    """paths [N, B] -> distinct items on each row's paths [N], in blocks of rows (memory follows the block)."""
    out = np.zeros(len(paths), dtype=np.int64)
    for lo, hi in row_blocks(index.counts(paths)):
        row, _ = index.lookup(paths[lo:hi])
        out[lo:hi] = np.bincount(row, minlength=hi - lo)
    return out


__all__ = ["search_beam", "smallest_beam", "BeamChoice", "margin_lower_bound", "confidence_z", "pick_beam", "distinct_items", "distinct_on_paths"]
