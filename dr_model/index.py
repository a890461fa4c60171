"""Path index (path -> items) and retrieval: beam search -> items on the paths -> rerank -> top-k."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def drop_pairs(row: np.ndarray, item: np.ndarray, exclude: tuple[np.ndarray, np.ndarray] | None,
               num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (row [M], item [M]) minus the pairs in `exclude` (rows [X], items [X])."""
    if exclude is None or len(exclude[0]) == 0 or len(row) == 0:
        return row, item
    keep = ~np.isin(pair_keys(row, item, num_items), pair_keys(*exclude, num_items))
    return row[keep], item[keep]


MAX_PAIRS = 1 << 18      # candidate pairs scored at once: bounds the gathered vectors (~100 MB at d = 64)
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


def rerank(w: torch.Tensor, vectors: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], num_items: int,
           row: np.ndarray, item: np.ndarray, k: int,
           exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score candidate (row, item) pairs with the reranker and keep the top k per row.

    w [N, dim] user vectors, vectors(items [n]) -> (embeddings [n, dim], biases [n]) (Reranker.vectors)
    -> (items [N, k], scores [N, k]); pairs in `exclude` (row [X], item [X]: e.g. the users' own
    history) are never returned. Rows are scored in blocks of about MAX_PAIRS pairs, so memory
    follows the block, not the batch of users.
    """
    row, item = drop_pairs(row, item, exclude, num_items)
    N = w.shape[0]
    if (np.diff(row) < 0).any():
        order = np.argsort(row, kind="stable")
        row, item = row[order], item[order]
    if len(row) <= MAX_PAIRS:
        return _rerank_block(w, vectors, row, item, k)
    ends = np.searchsorted(row, np.arange(N + 1), side="left")          # pairs of rows < r end at ends[r]
    cuts = np.unique(np.searchsorted(ends, np.arange(0, len(row), MAX_PAIRS), side="right") - 1)
    cuts = np.unique(np.r_[cuts[cuts > 0], N])
    out_i = np.empty((N, k), dtype=np.int64)
    out_s = np.empty((N, k), dtype=np.float64)
    lo = 0
    for hi in cuts:                        # a few blocks per batch, each many rows
        a, b = ends[lo], ends[hi]
        out_i[lo:hi], out_s[lo:hi] = _rerank_block(w[lo:hi], vectors, row[a:b] - lo, item[a:b], k)
        lo = hi
    return out_i, out_s


def _rerank_block(w: torch.Tensor, vectors: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  row: np.ndarray, item: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """rerank on pairs sorted by row, history already dropped: w [N, dim] -> (items [N, k], scores [N, k])."""
    N = w.shape[0]
    counts = np.bincount(row, minlength=N)
    width = int(counts.max(initial=0))
    if len(row) == 0 or N * width > 4 * len(row) + (1 << 20):   # empty, or a padded layout would be mostly padding
        r = torch.from_numpy(row)
        with torch.inference_mode():
            e, b = vectors(torch.from_numpy(item))
            s = ((w[r] * e).sum(1) + b).double().numpy()
        return top_k_per_row(row, item, s, N, k)
    # Each row's candidates padded to the longest row: one batched matmul scores them (7x faster
    # than gathering a user vector per pair), and torch.topk cuts each row without sorting pairs.
    pos = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    pad = np.zeros((N, width), dtype=np.int64)
    valid = np.zeros((N, width), dtype=bool)
    pad[row, pos], valid[row, pos] = item, True
    with torch.inference_mode():
        e, b = vectors(torch.from_numpy(pad.ravel()))
        s = (torch.bmm(e.view(N, width, -1), w.unsqueeze(2)).squeeze(2) + b.view(N, width)).double()
        s.masked_fill_(torch.from_numpy(~valid), float("-inf"))
        kk = min(k, width)
        top_s, top_p = torch.topk(s, kk, dim=1)
    top_p = top_p.numpy()
    ok = np.take_along_axis(valid, top_p, 1)
    out_i = np.full((N, k), -1, dtype=np.int64)
    out_s = np.full((N, k), -np.inf, dtype=np.float64)
    out_i[:, :kk] = np.where(ok, np.take_along_axis(pad, top_p, 1), -1)
    out_s[:, :kk] = np.where(ok, top_s.numpy(), -np.inf)
    return out_i, out_s
