"""Item->path scores s[v,c]: top-S paths per item, batch aggregation and streaming merge.

Layout (`PathScores`): one row per item, S slots sorted by score descending; an empty
slot has path -1 and score 0. Fixed width keeps the M-step fully vectorized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMPTY = -1


@dataclass(frozen=True)
class PathScores:
    """s[v,c] for a set of items.

    items [V] int64 (sorted, unique), paths [V, S] int64 (-1 = empty), scores [V, S]
    float64 (descending per row, 0 where empty), n_v [V] float64 (training pairs of v).
    """

    items: np.ndarray
    paths: np.ndarray
    scores: np.ndarray
    n_v: np.ndarray

    def __post_init__(self) -> None:
        V = self.items.shape[0]
        if self.paths.ndim != 2 or self.paths.shape[0] != V or self.scores.shape != self.paths.shape:
            raise ValueError(f"PathScores shapes disagree: items {self.items.shape}, paths {self.paths.shape}, scores {self.scores.shape}")
        if self.n_v.shape != (V,):
            raise ValueError(f"PathScores.n_v must be [{V}], got {self.n_v.shape}")

    @property
    def S(self) -> int:
        return self.paths.shape[1]

    def __len__(self) -> int:
        return self.items.shape[0]

    def padded(self, S: int) -> "PathScores":
        """The same lists in S >= self.S columns (empty slots appended); self when already S wide."""
        if self.S == S:
            return self
        paths, scores = np.full((len(self), S), EMPTY, dtype=np.int64), np.zeros((len(self), S))
        paths[:, :self.S], scores[:, :self.S] = self.paths, self.scores
        return PathScores(self.items, paths, scores, self.n_v)

    def to_long(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Non-empty entries as flat columns (item_id, path, score, n_v), for tables."""
        mask = self.paths != EMPTY
        rows = np.nonzero(mask)[0]
        return self.items[rows], self.paths[mask], self.scores[mask], self.n_v[rows]

    @classmethod
    def from_long(cls, item_id: np.ndarray, path: np.ndarray, score: np.ndarray, n_v: np.ndarray, S: int,
                  pad: bool = True) -> "PathScores":
        """Flat (item, path, score, n_v) rows -> fixed-width top-S layout (sums duplicate pairs).

        pad False: lists as written may come back narrower than S (their longest), saving a copy.
        """
        fast = _grouped_lists(item_id, path, score, n_v, S, pad)
        return fast if fast is not None else aggregate_pairs(item_id, path, score, S, n_v=n_v, n_v_is_per_item=True)


CHECK_ROWS = 1 << 16       # rows checked at a time: the temporaries stay small and are reused


def _row_chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _grouped_lists(item: np.ndarray, path: np.ndarray, score: np.ndarray, n_v: np.ndarray, S: int,
                   pad: bool = True) -> "PathScores | None":
    """The rows of a `path_scores` table as written (each item's rows together, at most S, distinct paths)
    -> the same layout as aggregate_pairs, in O(rows) + a sort of the items; None when the rows are not so.

    Full lists already in order (what the scores job writes) come back as views of the inputs.
    """
    item = np.asarray(item, dtype=np.int64)
    path = np.asarray(path, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    n = item.shape[0]
    if n == 0:
        return None
    flat = _row_chunks(n, CHECK_ROWS * 16)
    if any((path[a:b] < 0).any() or not (np.isfinite(score[a:b]).all() and (score[a:b] >= 0).all()) for a, b in flat):
        return None
    starts = np.concatenate([[0]] + [np.flatnonzero(item[max(a, 1):b] != item[max(a, 1) - 1:b - 1]) + max(a, 1)
                                     for a, b in flat])
    counts = np.diff(np.r_[starts, n])
    width, m = int(counts.max()), starts.shape[0]
    if width > S:
        return None
    runs = item[starts]
    # the files' items in order -> no sort; else the sort that orders them also finds a repeated item
    by_item = None if (runs[1:] > runs[:-1]).all() else np.argsort(runs, kind="stable")
    if by_item is not None:
        runs = runs[by_item]
        if (runs[1:] == runs[:-1]).any():                     # an item's rows are not together
            return None
    if (counts == width).all():                               # every item holds the same number of rows
        paths, scores = path.reshape(m, width), score.reshape(m, width)
    else:
        rank = np.arange(n) - np.repeat(starts, counts)
        row = np.repeat(np.arange(m), counts)
        paths = np.full((m, width), EMPTY, dtype=np.int64)
        scores = np.zeros((m, width))
        paths[row, rank] = path
        scores[row, rank] = score
    rows = _row_chunks(m, CHECK_ROWS)
    if any(_repeats_a_path(paths[a:b]) for a, b in rows):    # a path twice: sum them
        return None
    # per item: score descending, ties by path, empty slots last (aggregate_pairs' order); the
    # scores job writes them so, then nothing moves
    if not all(_in_order(paths[a:b], scores[a:b]) for a, b in rows):
        o = np.lexsort((paths, -scores, paths == EMPTY), axis=-1)
        paths, scores = np.take_along_axis(paths, o, 1), np.take_along_axis(scores, o, 1)
    nv = np.asarray(n_v, dtype=np.float64)[starts]
    if by_item is not None:                                   # runs is already in item order
        paths, scores, nv = paths[by_item], scores[by_item], nv[by_item]
    got = PathScores(runs, paths, scores, nv)
    return got.padded(S) if pad else got


def _repeats_a_path(paths: np.ndarray) -> bool:
    """Does a row of paths [r, w] hold a (non-empty) path twice?"""
    ordered = np.sort(paths, axis=1)
    return bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != EMPTY)).any())


def _in_order(paths: np.ndarray, scores: np.ndarray) -> bool:
    """Are rows [r, w] sorted by score descending, ties by path, empty slots last?"""
    nxt_empty, cur_empty = paths[:, 1:] == EMPTY, paths[:, :-1] == EMPTY
    return bool((nxt_empty | (~cur_empty & ((scores[:, 1:] < scores[:, :-1])
                                            | ((scores[:, 1:] == scores[:, :-1]) & (paths[:, 1:] > paths[:, :-1]))))).all())


def _pair_order(item: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Stable order of rows by (item, path): one int64 radix-sortable key when the id ranges allow it."""
    if item.size and path.min() >= 0:
        lo, hi, top = int(item.min()), int(item.max()), int(path.max()) + 1
        if (hi - lo + 1) * top < 2 ** 63:
            return np.argsort((item - lo) * top + path, kind="stable")
    return np.lexsort((path, item))


def _top_s_per_item(item: np.ndarray, path: np.ndarray, score: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (item, path) rows sorted by (item, path) -> items [V], paths [V,S], scores [V,S], the S largest per item.

    Order within an item: score descending, ties by path. Items holding a few rows each (the
    path_scores case) are ranked in a [V, widest] matrix, row by row; otherwise one global sort.
    """
    n = item.shape[0]
    starts = np.flatnonzero(np.r_[True, item[1:] != item[:-1]]) if n else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, n])
    items = item[starts]
    out_p = np.full((items.shape[0], S), EMPTY, dtype=np.int64)
    out_s = np.zeros((items.shape[0], S), dtype=np.float64)
    rank = np.arange(n) - np.repeat(starts, counts)
    row = np.repeat(np.arange(items.shape[0]), counts)
    widest = int(counts.max()) if n else 0
    if items.shape[0] * widest <= 4 * n:
        neg = np.full((items.shape[0], widest), np.inf)
        neg[row, rank] = -score
        by_score = np.argsort(neg, axis=1, kind="stable")[:, :S]      # stable: ties stay in path order
        w = by_score.shape[1]
        keep = by_score < counts[:, None]
        src = np.minimum(starts[:, None] + by_score, max(n - 1, 0))
        out_p[:, :w] = np.where(keep, path[src], EMPTY)
        out_s[:, :w] = np.where(keep, score[src], 0.0)
        return items, out_p, out_s
    order = np.lexsort((path, -score, item))
    path, score = path[order], score[order]
    keep = rank < S
    out_p[row[keep], rank[keep]] = path[keep]
    out_s[row[keep], rank[keep]] = score[keep]
    return items, out_p, out_s


def _sum_duplicates(item: np.ndarray, path: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows -> unique (item, path) sorted by (item, path), scores summed in input order; + first input row of each."""
    order = _pair_order(item, path)
    item, path = item[order], path[order]
    new = np.ones(item.shape[0], dtype=bool)
    new[1:] = (item[1:] != item[:-1]) | (path[1:] != path[:-1])
    sums = np.bincount(np.cumsum(new) - 1, weights=score[order], minlength=int(new.sum()))
    return item[new], path[new], sums, order[new]


def aggregate_pairs(item: np.ndarray, path: np.ndarray, prob: np.ndarray, S: int,
                    n_v: np.ndarray | None = None, n_v_is_per_item: bool = False) -> PathScores:
    """Batch mode: per training pair top-S beam outputs -> s[v,c] summed exactly, top-S per item.

    item [P] int64 (the pair's item, repeated per beam output) or [P] with path/prob [P, S'];
    path/prob are flattened alongside. n_v defaults to the number of training pairs per item
    (rows of a 2-D input), or is taken from per-row counts when `n_v_is_per_item`.
    """
    item = np.asarray(item, dtype=np.int64)
    path = np.asarray(path, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    if path.ndim == 2:
        pair_items = item
        item = np.repeat(item, path.shape[1])
        path, prob = path.ravel(), prob.ravel()
    else:
        pair_items = None
    valid = path != EMPTY
    if np.any(prob[valid] < 0) or not np.all(np.isfinite(prob[valid])):
        raise ValueError("path scores must be finite and >= 0")
    u_item, u_path, u_score, first = _sum_duplicates(item[valid], path[valid], prob[valid])
    items, paths, scores = _top_s_per_item(u_item, u_path, u_score, S)
    if n_v_is_per_item:
        # one n_v per input row, the same for every row of an item: take its first pair's
        item_first = np.r_[True, u_item[1:] != u_item[:-1]] if u_item.size else np.zeros(0, bool)
        nv = np.asarray(n_v, dtype=np.float64)[valid][first[item_first]]
    elif pair_items is not None:
        nv = np.bincount(np.searchsorted(items, pair_items[np.isin(pair_items, items)]), minlength=items.shape[0]).astype(np.float64)
    else:
        raise ValueError("pass path/prob as [P, S'] so n_v can be counted per training pair")
    return PathScores(items, paths, scores, nv)


def streaming_merge(old: PathScores, new: PathScores, decay: float) -> PathScores:
    """Paper's streaming update with decay eta and min_score seeding, vectorized over items.

    For each item: in both -> eta*s + s'; only new -> eta*min_score + s'; only old -> eta*s;
    keep the S largest. min_score is the smallest recorded score of the item's stored list
    (0 for an item never seen before). n_v -> eta*n_v + n_v'.
    """
    S = old.S
    if new.S != S:
        raise ValueError(f"cannot merge s[v,c] lists of different widths S={old.S} and S={new.S}")
    old_valid = old.paths != EMPTY
    # min over recorded (non-empty) slots; an empty stored list seeds with 0
    min_old = np.where(old_valid, old.scores, np.inf).min(axis=1)
    min_old = np.where(np.isfinite(min_old), min_old, 0.0)
    # Seed of a path that is new for item v: eta*min_score(v) (0 when v has no stored list).
    new_pos = np.searchsorted(old.items, new.items)
    new_pos_c = np.minimum(new_pos, max(len(old) - 1, 0))
    has_old = (len(old) > 0) & (old.items[new_pos_c] == new.items) if len(old) else np.zeros(len(new), bool)
    seed = np.where(has_old, min_old[new_pos_c] if len(old) else 0.0, 0.0) * decay

    o_mask = old_valid.ravel()
    n_mask = (new.paths != EMPTY).ravel()
    o_item = np.repeat(old.items, S)[o_mask]
    o_path = old.paths.ravel()[o_mask]
    o_score = decay * old.scores.ravel()[o_mask]
    n_item = np.repeat(new.items, S)[n_mask]
    n_path = new.paths.ravel()[n_mask]
    n_score = new.scores.ravel()[n_mask]
    n_seed = np.repeat(seed, S)[n_mask]

    # A new-list path that is already stored gets eta*s + s' (its seed is dropped);
    # otherwise eta*min_score + s'.
    o_keys = np.stack([o_item, o_path], 1)
    n_keys = np.stack([n_item, n_path], 1)
    in_old = _rows_in(n_keys, o_keys)
    n_score = n_score + np.where(in_old, 0.0, n_seed)

    item = np.concatenate([o_item, n_item])
    path = np.concatenate([o_path, n_path])
    score = np.concatenate([o_score, n_score])
    u_item, u_path, u_score, _ = _sum_duplicates(item, path, score)
    items, paths, scores = _top_s_per_item(u_item, u_path, u_score, S)

    nv = np.zeros(items.shape[0])
    nv[np.searchsorted(items, old.items[np.isin(old.items, items)])] += decay * old.n_v[np.isin(old.items, items)]
    nv[np.searchsorted(items, new.items[np.isin(new.items, items)])] += new.n_v[np.isin(new.items, items)]
    return PathScores(items, paths, scores, nv)


def _rows_in(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of a [n, 2] int64 (item, path >= 0): is it a row of b [m, 2]?"""
    if b.shape[0] == 0 or a.shape[0] == 0:
        return np.zeros(a.shape[0], dtype=bool)
    both = np.concatenate([b, a])
    lo, hi, top = int(both[:, 0].min()), int(both[:, 0].max()), int(both[:, 1].max()) + 1
    if both[:, 1].min() >= 0 and (hi - lo + 1) * top < 2 ** 63:
        kb = np.sort((b[:, 0] - lo) * top + b[:, 1])
        ka = (a[:, 0] - lo) * top + a[:, 1]
        pos = np.minimum(np.searchsorted(kb, ka), kb.shape[0] - 1)
        return kb[pos] == ka
    _, inv = np.unique(both, axis=0, return_inverse=True)
    inv = inv.ravel()
    present = np.zeros(inv.max() + 1, dtype=bool)
    present[inv[: b.shape[0]]] = True
    return present[inv[b.shape[0]:]]
