"""Path sizes from a retrieval budget: alpha calibrated on the round's own scores, and exploration paths.

A user reranks the items on the B paths its beam returns, so the cost of a user is about
B x the size of the paths its traffic lands on. The statistic the M-step steers is that
size, weighted the way the structure model routes training pairs after it learns the
assignment: a pair (x, v) lands on v's J paths in proportion to their scores, so

    traffic-weighted path size = sum_c W(c) |c| / sum_c W(c),
    W(c) = sum_v N_v * s[v, c] / sum_j s[v, pi_j(v)]   over the items v holding c

(an item whose paths have no score spreads its N_v evenly). W and |c| are sums over items,
so partitions compute their parts and the sums meet wherever the size table does.

Alpha is searched before the M-step's sweeps (`AlphaSearch`): each trial is one sweep from
the starting assignment, discarded afterwards (the kernel does millions of item-rounds per
second, so ten trials cost about ten sweeps); the size falls as alpha grows, so a log-scale
bracket then a bisection finds the alpha whose sweep lands on the target. The sweeps that
count then run at that fixed alpha, so the objective still never decreases within an
M-step. The search starts from the previous EM round's alpha, or from the alpha that puts
the marginal cost of an item on a target-size path at a typical item's gain from doubling
its score (N_mean * log 2), and it stays within `CAP` of that start both ways: a target
that only a penalty-dominated objective could reach (every item placed for balance alone,
its scores ignored) is not worth reaching, and the retrieval beam is fitted to the
budget at the end of training anyway.

Exploration: the M-step can only move an item onto paths in its candidate list, and s[v,c]
only holds paths the beam emits, so once the structure model sends everybody to a few
hundred paths no penalty can spread the items again (a collapse locks itself in). Every item
therefore also gets `explore` paths near its best candidate in code space, scored
`explore_score` x its best score: alternately a sibling (same first D-1 codes, the last
from a hash of the item) and a cousin (same first D-2 codes, the last two hashed: K^2
choices, so even a whole catalog collapsed onto one path can spread). The penalty can
now move items off a crowded path, and the next E-step teaches the structure model the
new paths, which share a prefix its beam already finds.
"""
from __future__ import annotations

import math

import numpy as np

from .kernels import compiled, merge_siblings, traffic_rows
from .mstep_kernel import penalty_delta
from .scores import EMPTY, PathScores

CAP = 1e3               # the alpha search stays within this factor of its start


def assigned_scores(scores: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """s[v, pi_j(v)] of each assigned path: scores [m, S], slots [m, J] (-1: not a candidate, score 0) -> [m, J]."""
    if not len(slots):
        return np.zeros(slots.shape)
    return np.where(slots >= 0, np.take_along_axis(scores, np.maximum(slots, 0), 1), 0.0)


def assigned_weights(scores: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Share of each assigned path in its item's assigned score: scores [m, S], slots [m, J] (-1: none) -> [m, J]."""
    J = slots.shape[1]
    s = assigned_scores(scores, slots)
    tot = s.sum(1, keepdims=True)
    return np.where(tot > 0, s / np.where(tot > 0, tot, 1.0), 1.0 / J)


def path_traffic(n_v: np.ndarray, weights: np.ndarray, assign: np.ndarray, num_paths: int) -> np.ndarray:
    """W(c) = sum_v N_v w[v, j] over the slots holding c: n_v [m], weights / assign [m, J] -> [num_paths] float64."""
    return np.bincount(assign.ravel(), weights=(weights * np.asarray(n_v, np.float64)[:, None]).ravel(),
                       minlength=num_paths)


def assigned_traffic(n_v: np.ndarray, scores: np.ndarray, slots: np.ndarray, assign: np.ndarray,
                     num_paths: int) -> np.ndarray:
    """path_traffic(n_v, assigned_weights(scores, slots), assign, num_paths) in one compiled pass
    (no [m, J] temporaries; the M-step computes it every round): -> [num_paths] float64."""
    out = np.zeros(num_paths)
    if len(assign):
        if assign.min() < 0 or assign.max() >= num_paths:
            raise ValueError(f"assignment holds a path outside [0, {num_paths})")
        compiled(traffic_rows)(np.asarray(n_v, np.float64), np.asarray(scores, np.float64), slots, assign, out)
    return out


def traffic_size(traffic: np.ndarray, sizes: np.ndarray) -> float:
    """Traffic-weighted path size sum_c W(c) |c| / sum_c W(c) (0 without traffic)."""
    tot = float(traffic.sum())
    return float(traffic @ sizes.astype(np.float64)) / tot if tot > 0 else 0.0


def start_path_size(n_v: np.ndarray, assign: np.ndarray, num_paths: int) -> float:
    """Traffic-weighted path size of an assignment before any score: n_v [V], assign [V, J] (J slots equal)."""
    J = assign.shape[1]
    sizes = np.bincount(assign.ravel(), minlength=num_paths)
    return traffic_size(path_traffic(n_v, np.full(assign.shape, 1.0 / J), assign, num_paths), sizes)


def is_collapsed(size: float, target: float, factor: float) -> bool:
    """A structure whose traffic-weighted path size is above factor x the target (factor 0: never)."""
    return factor > 0 and size > factor * target


def initial_alpha(mean_nv: float, target: float, power: float) -> float:
    """Alpha at which adding an item to a path of the target size costs N_mean * log 2."""
    return max(mean_nv, 1e-12) * math.log(2.0) / float(penalty_delta(float(target), power))


class AlphaSearch:
    """Find alpha with size(alpha) ~ target, size decreasing in alpha: x10 bracketing, then log bisection.

    Drive it with `propose()` (the next alpha to try, None when done) and `observe(alpha, size)`;
    `result` is the smallest alpha seen whose size is <= target (within `tol`); when raising alpha
    tenfold lowers the size by less than `plateau` (relative) the target is out of reach and the
    alpha before that step is the result; else the cap. Deterministic, so every task of a
    distributed M-step runs the same search.
    """

    def __init__(self, alpha0: float, target: float, max_trials: int = 10, tol: float = 0.05,
                 plateau: float = 0.02) -> None:
        self.alpha0, self.target, self.max_trials, self.tol, self.plateau = alpha0, target, max_trials, tol, plateau
        self.lo: float | None = None          # an alpha whose paths are too large
        self.hi: float | None = None          # an alpha whose paths fit
        self.trials: list[tuple[float, float]] = []
        self._done = False

    def propose(self) -> float | None:
        if self._done or len(self.trials) >= self.max_trials:
            return None
        if not self.trials:
            return self.alpha0
        if self.hi is None:
            nxt = self.lo * 10
            if nxt > self.alpha0 * CAP:
                self._done = True
                return None
            return nxt
        if self.lo is None:
            nxt = self.hi / 10
            if nxt < self.alpha0 / CAP:
                self._done = True
                return None
            return nxt
        return math.sqrt(self.lo * self.hi)

    def observe(self, alpha: float, size: float) -> None:
        if self.hi is None and self.lo is not None and self.trials and alpha > self.lo:
            prev = dict(self.trials)[self.lo]
            if size > prev * (1 - self.plateau):
                # ten times the penalty bought (almost) nothing: the target is out of reach of
                # these candidates, and a stronger penalty would only trade scores for balance
                self.trials.append((alpha, size))
                self.hi, self._done = self.lo, True
                return
        self.trials.append((alpha, size))
        if size > self.target * (1 + self.tol):
            self.lo = alpha if self.lo is None else max(self.lo, alpha)
        else:
            self.hi = alpha if self.hi is None else min(self.hi, alpha)
            if size >= self.target * (1 - self.tol):
                self._done = True             # close enough

    @property
    def result(self) -> float:
        if self.hi is not None:
            return self.hi
        return min(self.alpha0 * CAP, max(a for a, _ in self.trials)) if self.trials else self.alpha0


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of int64 values (splitmix64 finaliser), as uint64."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def exploration_paths(items: np.ndarray, best: np.ndarray, K: int, D: int, n: int, seed: int = 0) -> np.ndarray:
    """n paths near each item's best path: items [m], best [m] -> [m, n] (EMPTY: none).

    Even slots are siblings (the last code re-drawn), odd ones cousins (the last two re-drawn;
    a sibling when D = 1), from a hash of (item, slot, seed).
    """
    m = len(items)
    out = np.full((m, n), EMPTY, dtype=np.int64)
    ok = best != EMPTY
    base = np.where(ok, best, 0)
    with np.errstate(over="ignore"):
        for j in range(n):
            depth = 1 if j % 2 == 0 or D < 2 else 2          # codes re-drawn at the end of the path
            span = K ** depth
            h = _mix(np.asarray(items, np.int64) * (n + 1) + j + seed * 1_000_003)
            out[:, j] = np.where(ok, base // span * span + (h % np.uint64(span)).astype(np.int64), EMPTY)
    return out


EXPLORE_ROWS = 1 << 14      # rows placed at a time: the temporaries stay small and are reused, not first-touched


def with_exploration(ps: PathScores, K: int, D: int, n: int, score_frac: float, seed: int = 0,
                     out: tuple[np.ndarray, np.ndarray] | None = None) -> PathScores:
    """ps with `n` exploration paths per item (module doc) -> width S + n, rows sorted by score descending.

    A sibling that is already a candidate (or the same as another sibling) is dropped. out:
    (paths, scores) [m, >= S + n] to fill (e.g. rows of a larger array; columns past S + n are
    padded with empty slots) instead of new arrays.
    """
    if n <= 0 or len(ps) == 0:
        return ps
    m, S = ps.paths.shape
    paths, scores = out if out is not None else (np.empty((m, S + n), dtype=ps.paths.dtype),
                                                 np.empty((m, S + n), dtype=ps.scores.dtype))
    if paths.shape[1] > S + n:
        paths[:, S + n:], scores[:, S + n:] = EMPTY, 0.0
    for lo in range(0, m, EXPLORE_ROWS):
        hi = min(m, lo + EXPLORE_ROWS)
        _explore_rows(ps.items[lo:hi], ps.paths[lo:hi], ps.scores[lo:hi], K, D, n, score_frac, seed,
                      paths[lo:hi, :S + n], scores[lo:hi, :S + n])
    return PathScores(ps.items, paths, scores, ps.n_v)


def _explore_rows(items: np.ndarray, real_p: np.ndarray, real_s: np.ndarray, K: int, D: int, n: int,
                  score_frac: float, seed: int, out_p: np.ndarray, out_s: np.ndarray) -> None:
    """with_exploration on a block of rows: items [r], real_p/real_s [r, S] -> out_p/out_s [r, S + n] filled."""
    sib = exploration_paths(items, real_p[:, 0], K, D, n, seed)
    # one compiled pass per row: a vectorised merge made ~10 passes over [r, S + n] temporaries
    compiled(merge_siblings)(real_p, real_s, sib, float(score_frac), out_p, out_s)


__all__ = ["assigned_scores", "assigned_weights", "assigned_traffic", "path_traffic", "traffic_size", "start_path_size", "is_collapsed", "initial_alpha",
           "AlphaSearch", "exploration_paths", "with_exploration"]
