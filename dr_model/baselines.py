"""The peers DR is judged against: popularity, item-based CF and EASE (Steck 2019).

All score items from the training users' events only (evaluation users are disjoint from
training users) and read each evaluation user's WHOLE input half (CSR), not the last L
items the neural models see. Items of the input half are never recommended. Every method
returns top-k model indices [U, k] (-1 pad) over the catalog `ids` it is given.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from .metrics import prf_at_k


def user_item_matrix(rows: np.ndarray, items: np.ndarray, n_rows: int, n_items: int) -> sparse.csr_matrix:
    """Binary [n_rows, n_items] CSR from (row [M], item index [M]) pairs (-1 items ignored, duplicates once)."""
    ok = items >= 0
    m = sparse.csr_matrix((np.ones(int(ok.sum()), np.float32), (rows[ok], items[ok])), shape=(n_rows, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def topk_excluding(score: np.ndarray, seen: sparse.csr_matrix | None, k: int) -> np.ndarray:
    """score [U, V] (modified in place), seen [U, V] binary -> top-k indices [U, k] (-1 where nothing is left)."""
    if seen is not None:
        r, c = seen.nonzero()
        score[r, c] = -np.inf
    kk = min(k, score.shape[1])
    top = np.argpartition(-score, kk - 1, axis=1)[:, :kk]
    top_s = np.take_along_axis(score, top, 1)
    order = np.argsort(-top_s, axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    out = np.full((score.shape[0], k), -1, dtype=np.int64)
    out[:, :kk] = np.where(np.isfinite(np.take_along_axis(top_s, order, 1)), top, -1)
    return out


def popular_topk(top: np.ndarray, count: np.ndarray, seen: sparse.csr_matrix, k: int) -> np.ndarray:
    """The popular items top [m] (falling counts [m]; m >= k + longest input), minus each user's input -> [U, k]."""
    score = np.broadcast_to(count.astype(np.float64), (seen.shape[0], len(top))).copy()
    got = topk_excluding(score, seen[:, top], k)
    return np.where(got >= 0, top[np.maximum(got, 0)], -1)


def item_cf_topk(train: sparse.csr_matrix, inputs: sparse.csr_matrix, k: int, chunk: int = 256) -> np.ndarray:
    """Item-based CF, cosine over training users: score(u, j) = sum_{i in input(u)} cos(i, j) -> [U, k].

    Computed as ((H / n) X^T) X / n per chunk of evaluation users (H their inputs [U, V], X the
    training users [T, V], n_i = sqrt(count_i)), so the V x V similarity is never built: memory
    is O(chunk x (T + V)) and the work O(nnz), which is what lets it run at 10^6+ items.
    """
    n = np.sqrt(np.asarray(train.sum(0)).ravel()).clip(min=1e-12).astype(np.float32)
    inv_n = sparse.diags(1.0 / n)
    Xt = train.T.tocsr()
    out = np.empty((inputs.shape[0], k), dtype=np.int64)
    for lo in range(0, inputs.shape[0], chunk):
        H = inputs[lo: lo + chunk]
        score = np.asarray(((H @ inv_n) @ Xt @ train).todense(), dtype=np.float64) / n[None, :]
        out[lo: lo + chunk] = topk_excluding(score, H, k)
    return out


@dataclass(frozen=True)
class EASE:
    """EASE's closed form for every lambda from one eigendecomposition of the Gram matrix G = X^T X.

    P = (G + lambda I)^-1 = Q diag(1 / (w + lambda)) Q^T, B = I - P / diag(P) (zero diagonal), and
    scores H B = H - (H P) / diag(P): O(V^3) once, then O(U V^2) per lambda. Dense V x V: only
    for catalogs up to eval.ease_max_items.
    """

    Q: np.ndarray          # [V, V] eigenvectors of G
    w: np.ndarray          # [V] eigenvalues

    @classmethod
    def fit(cls, train: sparse.csr_matrix) -> "EASE":
        return cls.from_gram((train.T @ train).toarray())

    @classmethod
    def from_gram(cls, G: np.ndarray) -> "EASE":
        """G [V, V] = X^T X (computed anywhere: in process or by Spark, jobs/peers.py)."""
        w, Q = np.linalg.eigh(np.asarray(G, dtype=np.float64))
        return cls(Q, w)

    def scores(self, inputs: sparse.csr_matrix, lam: float) -> np.ndarray:
        """inputs [U, V] binary -> scores [U, V] of EASE with regularisation lam."""
        inv = 1.0 / (self.w + lam)
        diag_p = (self.Q ** 2) @ inv                                     # [V]
        HQ = np.asarray(inputs @ self.Q)                                 # [U, V]
        HP = (HQ * inv[None, :]) @ self.Q.T
        return np.asarray(inputs.todense(), dtype=np.float64) - HP / diag_p[None, :]

    def topk(self, inputs: sparse.csr_matrix, lam: float, k: int) -> np.ndarray:
        return topk_excluding(self.scores(inputs, lam), inputs, k)


def ease_lambda_grid(ones: float, num_items: int) -> list[float]:
    """Lambdas to try: a log grid (factor sqrt(10)) around the mean item count (ones of X / V), 1/30x to 300x of it."""
    mean_count = max(float(ones) / max(num_items, 1), 1.0)
    return [float(mean_count * 10 ** (e / 2)) for e in range(-3, 6)]


def to_raw(ids: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Model indices [...] (-1 = nothing) -> raw ids [...] (-1 kept)."""
    return np.where(idx >= 0, ids[np.maximum(idx, 0)], -1)


def choose_ease_lambda(ease: EASE, ids: np.ndarray, valid_inputs: sparse.csr_matrix,
                       valid_truth: tuple[np.ndarray, np.ndarray], k: int,
                       grid: list[float]) -> tuple[float, dict[str, float]]:
    """The lambda of `grid` with the best F@k on the validation users (truth CSR of raw ids) -> (lambda, {lambda: F@k})."""
    offs, items = valid_truth
    f1 = {lam: prf_at_k(to_raw(ids, ease.topk(valid_inputs, lam, k)), offs, items, k).f1 for lam in grid}
    best = max(grid, key=lambda lam: (f1[lam], -lam))
    return best, {f"{lam:.6g}": v for lam, v in f1.items()}


__all__ = ["user_item_matrix", "topk_excluding", "popular_topk", "item_cf_topk", "EASE", "ease_lambda_grid",
           "choose_ease_lambda", "to_raw"]
