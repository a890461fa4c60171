"""Path index (path -> items): the CSR beam paths are looked up in, and per-row top-k of flat (row, item, score) lists."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PathIndex:
    """CSR over sorted unique paths: keys [P], offsets [P+1], items [J*V] (item indices < num_items).

    The arrays may be memory-mapped (dr_model.serving): nothing here reads all of them per call.
    """

    keys: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    num_items: int

    @classmethod
    def build(cls, assign: np.ndarray) -> "PathIndex":
        """assign [V, J] int64 paths of item indices 0..V-1 -> index."""
        V, J = assign.shape
        path = assign.ravel()
        item = np.repeat(np.arange(V, dtype=np.int64), J)
        order = np.lexsort((item, path))
        path, item = path[order], item[order]
        keys, start = np.unique(path, return_index=True)
        return cls(keys, np.append(start, len(path)).astype(np.int64), item, V)

    def sizes(self) -> np.ndarray:
        """Items per non-empty path [P]."""
        return np.diff(self.offsets)

    def counts(self, paths: np.ndarray) -> np.ndarray:
        """paths [N, B] -> items on each row's paths [N] (before duplicates across its paths are removed)."""
        flat = paths.ravel()
        pos = np.minimum(np.searchsorted(self.keys, flat), max(len(self.keys) - 1, 0))
        found = (self.keys[pos] == flat) if len(self.keys) else np.zeros(flat.shape, bool)
        return np.where(found, self.offsets[pos + 1] - self.offsets[pos], 0).reshape(paths.shape).sum(1) \
            if len(self.keys) else np.zeros(paths.shape[0], np.int64)

    def lookup(self, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """paths [N, B] -> unique (row [M], item [M]) pairs, sorted by row then item."""
        N, B = paths.shape
        flat = paths.ravel()
        pos = np.searchsorted(self.keys, flat)
        pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
        found = (len(self.keys) > 0) & (self.keys[pos_c] == flat) if len(self.keys) else np.zeros(flat.shape, bool)
        lo = np.where(found, self.offsets[pos_c], 0)
        n = np.where(found, self.offsets[pos_c + 1] - lo, 0)
        row = np.repeat(np.repeat(np.arange(N, dtype=np.int64), B), n)
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        item = self.items[np.repeat(lo, n) + within]
        if len(item) == 0:
            return row, item.astype(np.int64)
        m = self.num_items + 1
        key = sorted_unique(row * m + item)
        return key // m, key % m


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique for an int array by sort + diff (numpy's hash-based unique is ~50x slower on 10^5+ keys)."""
    a = np.sort(a)
    keep = np.empty(len(a), dtype=bool)
    keep[:1] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def top_k_per_row(row: np.ndarray, item: np.ndarray, score: np.ndarray, n_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (row, item, score) -> items [n_rows, k] (-1 pad) and scores [n_rows, k] (-inf pad), descending.

    Rows are laid out in a padded [n_rows, longest row] matrix and cut by torch.topk (7x faster than
    a lexsort of the pairs); when one row is far longer than the rest, a sort of the pairs instead.
    """
    out_i = np.full((n_rows, k), -1, dtype=np.int64)
    out_s = np.full((n_rows, k), -np.inf, dtype=np.float64)
    if len(row) == 0 or k == 0:
        return out_i, out_s
    if (np.diff(row) < 0).any():
        order = np.argsort(row, kind="stable")
        row, item, score = row[order], item[order], score[order]
    counts = np.bincount(row, minlength=n_rows)
    start = np.cumsum(counts) - counts
    pos = np.arange(len(row)) - np.repeat(start, counts)
    width = int(counts.max())
    if n_rows * width > 4 * len(row) + (1 << 20):          # a padded matrix would be mostly padding
        order = np.lexsort((-score, row))
        rank = np.empty_like(pos)
        rank[order] = pos
        keep = rank < k
        out_i[row[keep], rank[keep]] = item[keep]
        out_s[row[keep], rank[keep]] = score[keep]
        return out_i, out_s
    buf = torch.full((n_rows, width), float("-inf"), dtype=torch.float64)
    buf[torch.from_numpy(row), torch.from_numpy(pos)] = torch.from_numpy(np.asarray(score, dtype=np.float64))
    kk = min(k, width)
    top_s, top_p = torch.topk(buf, kk, dim=1)
    top_p = top_p.numpy()
    ok = top_p < counts[:, None]
    flat = np.minimum(start[:, None] + top_p, len(item) - 1)
    out_i[:, :kk] = np.where(ok, item[flat], -1)
    out_s[:, :kk] = np.where(ok, top_s.numpy(), -np.inf)
    return out_i, out_s


def pair_keys(row: np.ndarray, item: np.ndarray, num_items: int) -> np.ndarray:
    """(row, item index) pairs -> one int64 key each (row-major), for set tests between pair lists."""
    return np.asarray(row, dtype=np.int64) * (num_items + 1) + np.asarray(item, dtype=np.int64)


def member(keys: np.ndarray, of: np.ndarray) -> np.ndarray:
    """keys [n] in `of` [m] -> [n] bool, by a binary search of each key in the sorted `of` (np.isin sorts
    keys and `of` together: slower when the keys are the many)."""
    if len(of) == 0:
        return np.zeros(len(keys), dtype=bool)
    srt = np.sort(of)
    pos = np.minimum(np.searchsorted(srt, keys), len(srt) - 1)
    return srt[pos] == keys


COMPARE_MAX = 48         # excluded items per row up to which one compare per column beats a binary search


def excluded(items: np.ndarray, exclude: tuple[np.ndarray, np.ndarray], num_items: int) -> np.ndarray:
    """items [N, m] (-1 pad) against exclude = (row [X], item [X]) pairs -> [N, m] bool: the pair is excluded.

    Rows holding at most COMPARE_MAX exclusions are compared column by column (N m H compares, no
    sort); longer lists use one binary search per candidate (N m log X).
    """
    N, m = items.shape
    row, item = np.asarray(exclude[0], dtype=np.int64), np.asarray(exclude[1], dtype=np.int64)
    counts = np.bincount(row, minlength=N)[:N] if len(row) else np.zeros(N, np.int64)
    H = int(counts.max(initial=0))
    if H > COMPARE_MAX:
        r = np.repeat(np.arange(N, dtype=np.int64), m)
        return member(pair_keys(r, items.ravel(), num_items), pair_keys(row, item, num_items)).reshape(N, m)
    order = np.argsort(row, kind="stable")
    row, item = row[order], item[order]
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    table = np.full((N, H), -2, dtype=np.int64)                 # -2 matches neither an item nor the -1 pad
    table[row, np.arange(len(row)) - starts[row]] = item
    out = np.zeros((N, m), dtype=bool)
    for j in range(H):
        out |= items == table[:, j:j + 1]
    return out


LOOKUP_PAIRS = 1 << 23   # candidate pairs looked up at once (~0.5 GB of index arrays): rows beyond go in blocks


def row_blocks(counts: np.ndarray, budget: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) row ranges whose counts sum to about `budget` (LOOKUP_PAIRS; a row above it alone): counts [N]."""
    budget = budget or LOOKUP_PAIRS
    N = counts.shape[0]
    if N == 0 or int(counts.sum()) <= budget:
        return [(0, N)]
    ends = np.cumsum(counts)
    cuts = np.unique(np.r_[np.searchsorted(ends, np.arange(budget, int(ends[-1]), budget), side="left"), N])
    cuts = np.unique(np.maximum(cuts, 1))
    out, lo = [], 0
    for hi in cuts:
        if hi > lo:
            out.append((lo, int(hi)))
            lo = int(hi)
    return out
