"""Baselines for the paper's protocol: popularity and item-based collaborative filtering.

Both score items from the training samples only (the evaluation users are disjoint from
training users); both take the same histories as Deep Retrieval and return top-k raw ids.
"""
from __future__ import annotations

import numpy as np

from .metrics import exclude_seen, pad_to


def exclude_mask_rows(hist: np.ndarray, vocab_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histories [U, L] raw ids (-1 pad) -> (row [M], item index [M]) of known history items."""
    pos = np.minimum(np.searchsorted(vocab_ids, hist), len(vocab_ids) - 1)
    known = (hist >= 0) & (vocab_ids[pos] == hist)
    row = np.nonzero(known)[0]
    return row, pos[known]


def popularity_topk(train_target: np.ndarray, hist: np.ndarray, k: int, exclude_history: bool = True) -> np.ndarray:
    """Most frequent training targets, per user minus their history: -> [U, k] raw ids (-1 pad)."""
    ids, counts = np.unique(train_target, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    # Enough candidates that k survive any user's history (at most L of them are removed).
    top = ids[order[: k + (hist.shape[1] if exclude_history else 0)]]
    cand = np.broadcast_to(top, (hist.shape[0], len(top)))
    return exclude_seen(cand, hist, k) if exclude_history else pad_to(cand[:, :k], k)


def item_cf_topk(train_user: np.ndarray, train_target: np.ndarray, hist: np.ndarray, k: int,
                 exclude_history: bool = True, max_items: int = 50_000, chunk: int = 512) -> np.ndarray:
    """Item-based CF (cosine over users who interacted with both items) -> [U, k] raw ids (-1 pad).

    Score of item j for a user = sum over the user's history items i of cos(i, j). Dense
    co-occurrence: an evaluation baseline for catalogs up to `max_items`, not a serving path.
    """
    ids = np.unique(train_target)
    V = len(ids)
    if V > max_items:
        raise ValueError(f"item-CF baseline builds a dense {V}x{V} matrix; catalog above max_items={max_items}")
    users, u_idx = np.unique(train_user, return_inverse=True)
    i_idx = np.searchsorted(ids, train_target)
    X = np.zeros((len(users), V), dtype=np.float32)
    X[u_idx, i_idx] = 1.0
    C = X.T @ X                                          # co-occurrence [V, V]
    n = np.sqrt(np.diag(C)).clip(min=1e-12)
    sim = C / n[:, None] / n[None, :]
    np.fill_diagonal(sim, 0.0)
    row, item = exclude_mask_rows(hist, ids)
    U = hist.shape[0]
    out = np.full((U, k), -1, dtype=np.int64)
    for lo in range(0, U, chunk):
        hi = min(lo + chunk, U)
        H = np.zeros((hi - lo, V), dtype=np.float32)
        sel = (row >= lo) & (row < hi)
        H[row[sel] - lo, item[sel]] = 1.0
        score = H @ sim
        if exclude_history:
            score[H > 0] = -np.inf
        kk = min(k, V)
        top = np.argpartition(-score, kk - 1, axis=1)[:, :kk]
        top_s = np.take_along_axis(score, top, 1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        out[lo:hi, :kk] = np.where(np.isfinite(np.take_along_axis(top_s, order, 1)), ids[top], -1)
    return out
