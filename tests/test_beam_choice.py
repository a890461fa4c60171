"""The retrieval beam's rule (dr_model.beam_choice): the cheapest beam in the budget that keeps brute force's recall."""
from __future__ import annotations

import pytest

import numpy as np

from dr_model.beam_choice import confidence_z, margin_lower_bound, pick_beam, search_beam, smallest_beam
from dr_model.config import ConfigError, DRConfig


def cost(b: int) -> float:
    return 100.0 * b                                    # items per user grow with the beam


def saturating(b: int) -> float:
    return {1: 0.50, 2: 0.80, 3: 0.95, 4: 0.99, 5: 1.00}.get(b, 1.00)


@pytest.mark.parametrize("hi", [1, 2, 3, 7, 8, 33])
def test_smallest_beam_finds_the_first_true_beam_with_few_calls(hi):
    for first in range(1, hi + 1):
        calls: list[int] = []

        def ok(b: int) -> bool:
            calls.append(b)
            return b >= first

        assert smallest_beam(ok, hi) == first
        assert len(calls) <= 2 * hi.bit_length() + 1, calls


def test_pick_beam_takes_the_cheapest_beam_reaching_the_floor():
    probed: list[int] = []

    def recall(b: int) -> float:
        probed.append(b)
        return saturating(b)

    c = pick_beam(cost, recall, brute_force_recall=1.0, budget=1_000, max_beam=64, target=0.98)
    assert (c.budget_beam, c.beam, c.items, c.recall, c.floor) == (10, 4, 400.0, 0.99, 0.98)
    assert len(probed) == len(set(probed)) <= 6                # each beam's recall measured once
    assert search_beam(cost, 1_000, 64) == (10, 1_000.0)


def test_pick_beam_keeps_the_budgets_beam_when_nothing_is_measured_or_the_target_is_missed():
    assert pick_beam(cost, saturating, 0.0, 1_000, 64, 0.98).beam == 10            # brute force found nothing
    assert pick_beam(cost, saturating, 1.0, 1_000, 64, 0.0).beam == 10             # recall_target 0: the ceiling
    missed = pick_beam(cost, lambda b: 0.5 * saturating(b), 1.0, 1_000, 64, 0.98)
    assert (missed.beam, missed.recall, missed.floor) == (10, 0.5, 0.98)
    assert pick_beam(cost, saturating, 0.5, 250, 64, 0.98).beam == 1               # a floor beam 1 reaches
    assert pick_beam(cost, saturating, 1.0, 50, 64, 0.98).beam == 1                # the budget fits beam 1 only


def per_user(mean: float, users: int, rng: np.random.Generator) -> np.ndarray:
    """Users' recalls in {0, 1} with this mean (a hit or a miss each, the noisiest case)."""
    r = np.zeros(users)
    r[rng.permutation(users)[:round(mean * users)]] = 1.0
    return r


def test_a_small_validation_set_needs_a_margin_a_large_one_keeps_the_point_estimates_beam():
    rng = np.random.default_rng(0)
    curve = {1: 0.30, 2: 0.40, 3: 0.493, 4: 0.497, 5: 0.50, 6: 0.50}
    for users, want_point, want_margin in ((200, 3, 5), (20_000, 3, 3)):
        bf = per_user(0.50, users, rng)
        # DR hits a subset of brute force's hits: paired, as on real users
        hits = np.flatnonzero(bf)
        recalls = {}
        for b, m in curve.items():
            r = np.zeros(users)
            r[hits[:round(m * users)]] = 1.0
            recalls[b] = r
        point = pick_beam(cost, recalls.__getitem__, bf, 600, 64, 0.98)
        margin = pick_beam(cost, recalls.__getitem__, bf, 600, 64, 0.98, confidence=0.95)
        assert point.beam == want_point and point.lower >= 0, (users, point)
        assert margin.beam == want_margin, (users, margin)
        assert margin.recall == float(recalls[margin.beam].mean()) and margin.brute_force_recall == 0.5
        # the margin is mean(d) - z se(d): it holds at the chosen beam, not at the one below
        assert margin.lower == margin_lower_bound(recalls[margin.beam], bf, 0.98, confidence_z(0.95)) >= 0
        if margin.beam > 1:
            assert margin_lower_bound(recalls[margin.beam - 1], bf, 0.98, confidence_z(0.95)) < 0


def test_margin_lower_bound_is_the_paired_one_sided_bound():
    r, bf = np.array([0.5, 1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0])
    d = r - 0.9 * bf
    assert margin_lower_bound(r, bf, 0.9, 1.645) == pytest.approx(d.mean() - 1.645 * d.std(ddof=1) / 2)
    assert margin_lower_bound(0.95, 1.0, 0.9, 1.645) == pytest.approx(0.05)        # means only: no spread
    assert confidence_z(0.0) == 0.0 and confidence_z(0.95) == pytest.approx(1.6449, abs=1e-4)


@pytest.mark.parametrize("bad", [-0.1, 1.0, "0.9", True])
def test_recall_confidence_is_validated(bad):
    with pytest.raises(ConfigError, match="search.recall_confidence"):
        DRConfig.from_dict({"search": {"recall_confidence": bad}})


@pytest.mark.parametrize("bad", [-0.1, 2.5, "0.9", True])
def test_recall_target_is_validated(bad):
    with pytest.raises(ConfigError, match="search.recall_target"):
        DRConfig.from_dict({"search": {"recall_target": bad}})
