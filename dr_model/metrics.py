"""Precision / recall / F-measure @k per user, averaged without weights (the paper's metrics)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    users: int

    def as_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1}


def per_user_prf(pred: np.ndarray, truth_offsets: np.ndarray, truth_items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pred [U, >=k] item ids (-1 = nothing), truth CSR ([U+1], [T]) -> precision, recall, F [U] each.

    Precision = hits / k, recall = hits / |truth| (truth as a set), F = 2PR/(P+R), 0 when both are 0.
    Duplicate predictions count once.
    """
    U = pred.shape[0]
    pred = np.asarray(pred[:, :k], dtype=np.int64)
    t_len = np.diff(truth_offsets)
    t_row = np.repeat(np.arange(U), t_len)
    truth = np.unique(np.stack([t_row, truth_items.astype(np.int64)], 1), axis=0)
    n_truth = np.bincount(truth[:, 0], minlength=U)
    p_row = np.repeat(np.arange(U), pred.shape[1])
    pk = np.stack([p_row, pred.ravel()], 1)
    pk = np.unique(pk[pk[:, 1] >= 0], axis=0)
    # hit = a (user, item) prediction that is also a (user, item) truth row
    both = np.concatenate([truth, pk])
    _, inv, cnt = np.unique(both, axis=0, return_inverse=True, return_counts=True)
    hit_rows = pk[cnt[inv.ravel()[len(truth):]] == 2]
    hits = np.bincount(hit_rows[:, 0], minlength=U).astype(np.float64)
    precision = hits / k
    recall = np.divide(hits, n_truth, out=np.zeros(U), where=n_truth > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(U), where=denom > 0)
    return precision, recall, f1


def prf_at_k(pred: np.ndarray, truth_offsets: np.ndarray, truth_items: np.ndarray, k: int) -> PRF:
    """Averages of per_user_prf over users."""
    p, r, f = per_user_prf(pred, truth_offsets, truth_items, k)
    return PRF(float(p.mean()) if len(p) else 0.0, float(r.mean()) if len(r) else 0.0,
               float(f.mean()) if len(f) else 0.0, int(len(p)))


def pad_to(pred: np.ndarray, k: int) -> np.ndarray:
    """pred [U, m] -> [U, k], cut or padded with -1."""
    out = np.full((pred.shape[0], k), -1, dtype=np.int64)
    m = min(k, pred.shape[1])
    out[:, :m] = pred[:, :m]
    return out


def exclude_seen(pred: np.ndarray, hist: np.ndarray, k: int, scores: np.ndarray | None = None):
    """Drop each user's history items from a ranked list, keep order: pred [U, m], hist [U, L] -> [U, k].

    Ask for m >= k + L predictions so k remain after at most L are removed. With scores
    [U, m] given, returns (items [U, k], scores [U, k]) with -inf for padding.
    """
    pred = np.asarray(pred, dtype=np.int64)
    seen = (pred[:, :, None] == hist[:, None, :]).any(-1) & (pred >= 0)
    keep = ~seen & (pred >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")          # kept entries first, in rank order
    kept = np.take_along_axis(keep, order, 1)
    ranked = np.where(kept, np.take_along_axis(pred, order, 1), -1)
    if scores is None:
        return pad_to(ranked, k)
    s = np.where(kept, np.take_along_axis(np.asarray(scores, dtype=np.float64), order, 1), -np.inf)
    out_s = np.full((pred.shape[0], k), -np.inf)
    out_s[:, : min(k, s.shape[1])] = s[:, :k]
    return pad_to(ranked, k), out_s
