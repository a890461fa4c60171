"""Cold items (catalog items without training pairs): paths, a reranker vector and a neighbour from their category.

Pure NumPy; jobs/cold_items.py does the I/O. Categories are integer codes 0..G-1, -1 = none.

* `category_paths`: a category's candidate paths are the S paths most of its assigned items use,
  scored by that share (items on the path / items of the category, in (0, 1]).
* `assign_cold`: J paths per cold item by the M-step's own coordinate descent
  (dr_model.mstep_kernel.sweep) over those candidates, against the live path sizes plus the
  cold items placed so far, so a category's cold items spread once its best paths are crowded.
* `category_means`: the mean reranker embedding and bias of a category's assigned items (row G:
  all items, for cold items without a category or whose category has no assigned item).
* `category_neighbors`: per category, the assigned item nearest (cosine) its mean embedding.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from dr_model.config import MStepConfig
from dr_model.mstep import effective_block
from dr_model.mstep_kernel import _fill_least_loaded, prepare_blocks, size_table, sweep
from dr_model.scores import EMPTY


def category_paths(item_cat: np.ndarray, assign: np.ndarray, num_cats: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Each category's top S paths by the share of its assigned items on them.

    item_cat [V] int64 (-1: none), assign [V, J] -> (paths [G, S] int64 EMPTY-padded, shares [G, S]
    float64 descending, 0-padded); ties go to the smaller path id. Memory O(V J).
    """
    J = assign.shape[1]
    has = item_cat >= 0
    cat, path = np.repeat(item_cat[has], J), np.asarray(assign[has], dtype=np.int64).ravel()
    order = np.lexsort((path, cat))
    cat, path = cat[order], path[order]
    start = np.ones(cat.size, dtype=bool)
    start[1:] = (cat[1:] != cat[:-1]) | (path[1:] != path[:-1])
    at = np.flatnonzero(start)
    g_cat, g_path, g_n = cat[at], path[at], np.diff(np.append(at, cat.size))
    o = np.lexsort((g_path, -g_n, g_cat))                     # per category: most items first
    g_cat, g_path, g_n = g_cat[o], g_path[o], g_n[o]
    rank = np.arange(g_cat.size) - np.searchsorted(g_cat, g_cat)
    keep = rank < S
    members = np.bincount(item_cat[has], minlength=num_cats)
    paths = np.full((num_cats, S), EMPTY, dtype=np.int64)
    shares = np.zeros((num_cats, S), dtype=np.float64)
    paths[g_cat[keep], rank[keep]] = g_path[keep]
    shares[g_cat[keep], rank[keep]] = g_n[keep] / members[g_cat[keep]]
    return paths, shares


def assign_cold(cand_paths: np.ndarray, cand_scores: np.ndarray, live_sizes: np.ndarray, J: int, alpha: float,
                cfg: MStepConfig, n_v: float = 1.0) -> np.ndarray:
    """J paths per cold item: cand_paths / cand_scores [C, S] (PathScores layout), live_sizes [P] -> paths [C, J] int64.

    Start: each item on its first min(J, usable) candidates (its category's best paths), the
    rest filled least-loaded (the M-step's fill rule); those starts are added to the live sizes.
    Then cfg.rounds sweeps of the M-step kernel (same gain, blocks, damping, improving-only test)
    move each item against the live sizes plus every other cold item. n_v is a cold item's
    weight in the log-likelihood: 1, one training pair, so against a calibrated alpha the
    penalty dominates and the items fill their category's lighter paths before its crowded ones.
    Items with no candidate take the least-loaded paths (fill rule). live_sizes is not modified.
    """
    C = cand_paths.shape[0]
    sizes = size_table(live_sizes)
    if C == 0:
        return np.zeros((0, J), dtype=np.int64)
    top = min(J, cand_paths.shape[1])
    start = np.full((C, J), EMPTY, dtype=np.int64)
    start[:, :top] = np.where(cand_scores[:, :top] > 0, cand_paths[:, :top], EMPTY)
    np.add.at(sizes, start[start != EMPTY], 1)
    _fill_least_loaded(start, sizes)
    # float64: the start may crowd a path far beyond the sizes the run calibrated alpha on
    blocks = prepare_blocks(cand_paths, cand_scores, np.full(C, float(n_v)), effective_block(cfg.block_size, C),
                            np.float64)
    assign = start
    for _ in range(cfg.rounds):
        assign = sweep(blocks, assign, sizes, alpha, cfg.penalty_power, damping=cfg.damping,
                       improving_only=cfg.improving_only)
    return assign


def category_means(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_cats: int,
                   dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean reranker vector per category, streamed over chunks of assigned items.

    chunks yield (cat [n] int64 (-1: none), emb [n, dim], bias [n]) -> (emb [G + 1, dim] float64,
    bias [G + 1] float64, items [G + 1] int64); row G is the mean over ALL items, and so is a
    category without items (its count stays 0). Memory O(G dim) plus one chunk.
    """
    emb_sum = np.zeros((num_cats + 1, dim), dtype=np.float64)
    bias_sum = np.zeros(num_cats + 1, dtype=np.float64)
    count = np.zeros(num_cats + 1, dtype=np.int64)
    for cat, emb, bias in chunks:
        rows = np.where(cat >= 0, cat, num_cats)
        np.add.at(emb_sum, rows, emb)
        bias_sum += np.bincount(rows, weights=bias, minlength=num_cats + 1)
        count += np.bincount(rows, minlength=num_cats + 1)
    # the "no category" row so far holds the uncategorised items: make it the global mean
    emb_sum[num_cats], bias_sum[num_cats], count[num_cats] = emb_sum.sum(0), bias_sum.sum(), count.sum()
    n = np.maximum(count, 1)
    emb_mean, bias_mean = emb_sum / n[:, None], bias_sum / n
    empty = count == 0
    emb_mean[empty], bias_mean[empty] = emb_mean[num_cats], bias_mean[num_cats]
    return emb_mean, bias_mean, count


def category_neighbors(chunks: Callable[[], Iterable[tuple[int, np.ndarray, np.ndarray]]],
                       centroids: np.ndarray) -> np.ndarray:
    """Per category, the row of the assigned item nearest (cosine) its centroid.

    chunks() yields (first row, cat [n] int64, emb [n, dim]); centroids [G, dim] -> rows [G] int64
    (-1: no item); ties keep the earlier row. Memory O(G) plus one chunk.
    """
    G = centroids.shape[0]
    unit_c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)
    best_sim = np.full(G, -np.inf)
    best_row = np.full(G, -1, dtype=np.int64)
    for lo, cat, emb in chunks():
        has = np.flatnonzero(cat >= 0)
        c = cat[has]
        e = emb[has]
        sim = (e * unit_c[c]).sum(1) / np.linalg.norm(e, axis=1).clip(min=1e-12)
        o = np.lexsort((has, -sim, c))                        # per category: most similar, then earliest
        first = o[np.r_[True, c[o][1:] != c[o][:-1]]]
        win = sim[first] > best_sim[c[first]]
        best_sim[c[first][win]] = sim[first][win]
        best_row[c[first][win]] = lo + has[first][win]
    return best_row


__all__ = ["category_paths", "assign_cold", "category_means", "category_neighbors"]
