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
        key = np.unique(row * m + item)
        return key // m, key % m


def top_k_per_row(row: np.ndarray, item: np.ndarray, score: np.ndarray, n_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (row, item, score) -> items [n_rows, k] (-1 pad) and scores [n_rows, k] (-inf pad), descending."""
    order = np.lexsort((item, -score, row))
    row, item, score = row[order], item[order], score[order]
    counts = np.bincount(row, minlength=n_rows)
    start = np.cumsum(counts) - counts
    rank = np.arange(len(row)) - np.repeat(start, counts)
    keep = rank < k
    out_i = np.full((n_rows, k), -1, dtype=np.int64)
    out_s = np.full((n_rows, k), -np.inf, dtype=np.float64)
    out_i[row[keep], rank[keep]] = item[keep]
    out_s[row[keep], rank[keep]] = score[keep]
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


def rerank(w: torch.Tensor, vectors: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], num_items: int,
           row: np.ndarray, item: np.ndarray, k: int,
           exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score candidate (row, item) pairs with the reranker and keep the top k per row.

    w [N, dim] user vectors, vectors(items [n]) -> (embeddings [n, dim], biases [n]) (Reranker.vectors)
    -> (items [N, k], scores [N, k]); pairs in `exclude` (row [X], item [X]: e.g. the users' own
    history) are never returned.
    """
    row, item = drop_pairs(row, item, exclude, num_items)
    r = torch.from_numpy(row)
    with torch.inference_mode():
        e, b = vectors(torch.from_numpy(item))
        s = ((w[r] * e).sum(1) + b).double().numpy()
    return top_k_per_row(row, item, s, w.shape[0], k)
