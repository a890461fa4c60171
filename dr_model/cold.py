"""Cold items (catalog items without training pairs): paths, a reranker vector and a neighbour from their category.

Pure NumPy, the per-partition pieces; jobs/cold_items.py runs them on Spark (spark_udfs.cold_udf)
and does the aggregations between them. Categories are integer codes, -1 = none.

* `assign_cold`: J paths per cold item by the M-step's own coordinate descent
  (dr_model.mstep_kernel.sweep) over its category's candidate paths, against the live path
  sizes plus the cold items placed so far, so a category's cold items spread once its best
  paths are crowded. A partition of the cold items counts its placements `scale` times (the
  M-step's extrapolated local deltas).
* `code_sums`: per-category sums of reranker vectors over a chunk of assigned items (their means
  are the cold items' vectors).
* `cosine`: items' cosine to their category's mean (the neighbour is the most similar item).
"""
from __future__ import annotations

import numpy as np

from dr_model.config import MStepConfig
from dr_model.mstep import effective_block
from dr_model.mstep_kernel import _fill_least_loaded, prepare_blocks, size_table, sweep
from dr_model.scores import EMPTY


def assign_cold(cand_paths: np.ndarray, cand_scores: np.ndarray, live_sizes: np.ndarray, J: int, alpha: float,
                cfg: MStepConfig, n_v: float = 1.0, scale: int = 1, fill_offset: int = 0) -> np.ndarray:
    """J paths per cold item: cand_paths / cand_scores [C, S] (PathScores layout), live_sizes [P] -> paths [C, J] int64.

    Start: each item on its first min(J, usable) candidates (its category's best paths), the
    rest filled least-loaded (the M-step's fill rule); those starts are added to the live sizes.
    Then cfg.rounds sweeps of the M-step kernel (same gain, blocks, damping, improving-only test)
    move each item with a candidate against the live sizes plus every other cold item. n_v is a
    cold item's weight in the log-likelihood: 1, one training pair, so against a calibrated alpha
    the penalty dominates and the items fill their category's lighter paths before its crowded
    ones. Items with no candidate keep the least-loaded paths of the start. live_sizes is not
    modified. A partition of the cold items passes scale (each placement and move counts `scale`
    times: one of `scale` alike partitions) and its own fill_offset (the fill rule's ties start
    there, so partitions do not all fill the same empty paths).
    """
    C = cand_paths.shape[0]
    sizes = size_table(live_sizes)
    if C == 0:
        return np.zeros((0, J), dtype=np.int64)
    top = min(J, cand_paths.shape[1])
    start = np.full((C, J), EMPTY, dtype=np.int64)
    start[:, :top] = np.where(cand_scores[:, :top] > 0, cand_paths[:, :top], EMPTY)
    np.add.at(sizes, start[start != EMPTY], scale)
    _fill_least_loaded(start, sizes, step=scale, offset=fill_offset)
    moving = np.flatnonzero(((cand_paths != EMPTY) & (cand_scores > 0)).any(1))
    if not len(moving):
        return start
    # float64: the start may crowd a path far beyond the sizes the run calibrated alpha on
    blocks = prepare_blocks(cand_paths[moving], cand_scores[moving], np.full(len(moving), float(n_v)),
                            effective_block(cfg.block_size, len(moving)), np.float64)
    assign = start[moving]
    for _ in range(cfg.rounds):
        assign = sweep(blocks, assign, sizes, alpha, cfg.penalty_power, damping=cfg.damping,
                       improving_only=cfg.improving_only, scale=scale)
    start[moving] = assign
    return start


def code_sums(codes: np.ndarray, emb: np.ndarray, bias: np.ndarray,
              items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sums per category code: codes [n], emb [n, d], bias [n] -> (codes [g] sorted, items [g] int64,
    bias sums [g] float64, embedding sums [g, d] float64). items [n]: each row's item count when the
    rows are sums themselves (merging partial sums), else 1."""
    c = np.asarray(codes, dtype=np.int64)
    order = np.argsort(c, kind="stable")
    c = c[order]
    if not len(c):
        return c, c, np.zeros(0), np.zeros((0, emb.shape[1]))
    start = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    n = np.ones(len(c), dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)[order]
    return (c[start], np.add.reduceat(n, start), np.add.reduceat(np.asarray(bias, dtype=np.float64)[order], start),
            np.add.reduceat(np.asarray(emb, dtype=np.float64)[order], start, axis=0))


def cosine(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine of each row to its centroid: emb [n, d], centroids [n, d] -> [n] float64."""
    unit_c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)
    return (emb * unit_c).sum(1) / np.linalg.norm(emb, axis=1).clip(min=1e-12)


__all__ = ["assign_cold", "code_sums", "cosine"]
