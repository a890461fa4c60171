"""Initial item paths from item embeddings: balanced hierarchical k-means (LED / DESIGN.md §5).

The first M-step must not run on scores of a structure model trained against random paths
(it cannot learn them, and the M-step then locks in whatever few paths its beam emits).
Instead the items are placed by the reranker's item embeddings, trained first:

* level d splits every group of level d-1 into b_d clusters of (nearly) equal size, by
  spherical k-means whose assignment step is a Sinkhorn-balanced transport: the dual
  potential of each cluster is a price, and an item joins argmax_c (cos(x, c) / eps + logv_c).
  The centroids and prices of a group are fitted on a bounded sample of it (`sample_per_cluster`
  items per cluster), then every item is assigned by that rule: a map over items in chunks,
  with memory O(chunk x b x dim) whatever the catalog size.
* branching: b_d = ceil(m ** (1/D)) (at most K) with m = J * V / target_size leaves, so the
  paths start at about the size the M-step will hold them to; the codes b_d..K-1 of each
  level stay free for the M-step's exploration.
* an item's J paths are its J best leaves by a width-J beam over the levels, scoring a leaf
  by the sum of its levels' (similarity / eps + log price): the item's own leaf and its
  nearest neighbours, which share most of the path prefix.
* the tree is fitted on at most SAMPLE_MAX items (all of a smaller catalog), so the fit's memory
  is bounded whatever the catalog; assigning the items is a map over chunks (`assign_paths`),
  in one process or in Spark tasks (jobs/embedding_paths.py) with the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .codec import encode

SAMPLE_MAX = 1 << 18        # items the tree is fitted on (a catalog this small is fitted whole)


@dataclass(frozen=True)
class TreeLevel:
    """One level of the clustering tree: per group g (a prefix) its b centroids and log prices."""

    centroids: np.ndarray       # [G, b, dim] float32, unit rows
    log_price: np.ndarray       # [G, b] float32 (Sinkhorn log dual, scaled: added to cos / eps)


def branching(num_items: int, J: int, target_size: float, K: int, D: int) -> list[int]:
    """Clusters per level [D]: about J * V / target_size leaves in total, at most K per level."""
    leaves = max(J * num_items / max(target_size, 1.0), 1.0)
    b = min(K, max(1, math.ceil(leaves ** (1.0 / D) - 1e-9)))
    return [b] * D


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def sinkhorn_log_v(sim: np.ndarray, eps: float, iters: int = 30) -> np.ndarray:
    """Balanced transport of n points to b clusters (uniform marginals): sim [n, b] -> log v [b].

    Sinkhorn on the kernel exp(sim / eps); a point's hard assignment is argmax_c (sim[c] / eps
    + log_v[c]): balanced on the sample, and a rule any other point can use. Cosine
    similarities span at most 2 / eps in the exponent (40 at eps 0.05), far from float64's
    range, so the plain (not log-domain) iteration is exact enough and ~20x faster.
    """
    n, b = sim.shape
    kern = np.exp((sim.astype(np.float64) - sim.max()) / eps)          # [n, b]
    v = np.ones(b)
    for _ in range(iters):
        u = (1.0 / n) / np.maximum(kern @ v, 1e-300)
        v = (1.0 / b) / np.maximum(kern.T @ u, 1e-300)
    log_v = np.log(v)
    return (log_v - log_v.max()).astype(np.float32)


def balanced_kmeans(x: np.ndarray, b: int, rng: np.random.Generator, iters: int = 8,
                    eps: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Spherical balanced k-means of unit rows x [n, dim] into b clusters -> (centroids [b, dim], log_v [b])."""
    n = x.shape[0]
    if n == 0:
        return np.zeros((b, x.shape[1]), np.float32), np.zeros(b, np.float32)
    cent = x[rng.choice(n, size=b, replace=n < b)].copy()
    log_v = np.zeros(b, np.float32)
    for _ in range(iters):
        sim = x @ cent.T
        log_v = sinkhorn_log_v(sim, eps)
        lab = np.argmax(sim / eps + log_v[None, :], axis=1)
        sums = np.zeros_like(cent)
        np.add.at(sums, lab, x)
        empty = np.bincount(lab, minlength=b) == 0
        sums[empty] = x[rng.choice(n, size=int(empty.sum()))]
        cent = _normalize(sums)
    return cent, sinkhorn_log_v(x @ cent.T, eps)


def fit_tree(emb: np.ndarray, fanout: list[int], seed: int = 0, sample_per_cluster: int = 256,
             eps: float = 0.05, chunk: int = 8192) -> list[TreeLevel]:
    """Fit the levels on emb [V, dim] (any scale; rows are normalised): one balanced k-means per group."""
    rng = np.random.default_rng(seed)
    x = _normalize(emb)
    V, dim = x.shape
    group = np.zeros(V, dtype=np.int64)             # prefix of every item at the current level
    levels: list[TreeLevel] = []
    for b in fanout:
        G = len(levels) and levels[-1].centroids.shape[0] * levels[-1].centroids.shape[1] or 1
        cent = np.zeros((G, b, dim), np.float32)
        logp = np.zeros((G, b), np.float32)
        order = np.argsort(group, kind="stable")
        starts = np.searchsorted(group[order], np.arange(G + 1))
        for g in range(G):
            members = order[starts[g]: starts[g + 1]]
            if len(members) > sample_per_cluster * b:
                members = rng.choice(members, size=sample_per_cluster * b, replace=False)
            cent[g], lv = balanced_kmeans(x[members], b, rng, eps=eps)
            logp[g] = lv
        level = TreeLevel(cent, logp)
        levels.append(level)
        group = group * b + assign_level(x, group, level, eps, chunk)
    return levels


def assign_level(x: np.ndarray, group: np.ndarray, level: TreeLevel, eps: float, chunk: int = 8192) -> np.ndarray:
    """Child index [V] of every unit row x [V, dim] within its group [V] at one level."""
    out = np.empty(x.shape[0], dtype=np.int64)
    for lo in range(0, x.shape[0], chunk):
        g = group[lo: lo + chunk]
        score = np.einsum("nd,nbd->nb", x[lo: lo + chunk], level.centroids[g]) / eps + level.log_price[g]
        out[lo: lo + chunk] = np.argmax(score, axis=1)
    return out


def top_leaves(emb: np.ndarray, levels: list[TreeLevel], J: int, eps: float = 0.05,
               chunk: int = 8192) -> np.ndarray:
    """The J best leaves of every item by a width-J beam over the levels -> codes [V, J, D] int64."""
    x = _normalize(emb)
    V = x.shape[0]
    D = len(levels)
    out = np.empty((V, J, D), dtype=np.int64)
    for lo in range(0, V, chunk):
        xc = x[lo: lo + chunk]
        n = xc.shape[0]
        codes = np.zeros((n, 1, 0), dtype=np.int64)
        group = np.zeros((n, 1), dtype=np.int64)
        score = np.zeros((n, 1), dtype=np.float64)
        for lvl in levels:
            b = lvl.centroids.shape[1]
            s = np.einsum("nd,nwbd->nwb", xc, lvl.centroids[group]) / eps + lvl.log_price[group]   # [n, w, b]
            cand = (score[:, :, None] + s).reshape(n, -1)
            keep = min(J, cand.shape[1])
            top = np.argsort(-cand, axis=1, kind="stable")[:, :keep]
            parent, child = top // b, top % b
            score = np.take_along_axis(cand, top, 1)
            codes = np.concatenate([np.take_along_axis(codes, parent[:, :, None], 1), child[:, :, None]], axis=2)
            group = np.take_along_axis(group, parent, 1) * b + child
        if codes.shape[1] < J:
            raise ValueError(f"the tree has {codes.shape[1]} leaves, fewer than J={J}: raise the fan-out")
        out[lo: lo + n] = codes
    return out


def sample_rows(num_items: int, seed: int = 0, sample_max: int | None = None) -> np.ndarray:
    """The items the tree is fitted on: sorted indices [min(V, sample_max)] (every item of a small catalog);
    sample_max None: SAMPLE_MAX."""
    n = SAMPLE_MAX if sample_max is None else sample_max
    if num_items <= n:
        return np.arange(num_items, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 7]).choice(num_items, n, replace=False))


def fit_paths_tree(sample_emb: np.ndarray, num_items: int, K: int, D: int, J: int, target_size: float,
                   seed: int = 0) -> list[TreeLevel]:
    """The clustering tree of a catalog of num_items, fitted on the embeddings of its sample_rows [n, dim]."""
    fanout = branching(num_items, J, target_size, K, D)
    while math.prod(fanout) < J:                     # tiny catalogs: enough leaves for J distinct paths
        fanout[-1] = min(K, fanout[-1] + 1)
    return fit_tree(sample_emb, fanout, seed)


def assign_paths(emb: np.ndarray, levels: list[TreeLevel], J: int, K: int) -> np.ndarray:
    """Item embeddings [n, dim] (any chunk of the catalog) -> their initial paths [n, J] int64."""
    return encode(top_leaves(emb, levels, J), K)


def paths_from_embeddings(emb: np.ndarray, K: int, D: int, J: int, target_size: float, seed: int = 0) -> np.ndarray:
    """Item embeddings [V, dim] -> balanced initial paths [V, J] int64 (distinct per item)."""
    levels = fit_paths_tree(emb[sample_rows(emb.shape[0], seed)], emb.shape[0], K, D, J, target_size, seed)
    return assign_paths(emb, levels, J, K)


__all__ = ["SAMPLE_MAX", "TreeLevel", "branching", "sinkhorn_log_v", "balanced_kmeans", "fit_tree", "assign_level",
           "top_leaves", "sample_rows", "fit_paths_tree", "assign_paths", "paths_from_embeddings"]
