"""The ANN peer: faiss HNSW / IVF indexes over the reranker's own item vectors (the paper's two-step baseline).

The reranker scores w·e_v + b_v. Folding the bias in as one more dimension (items [e_v, b_v],
users [w, 1]) makes an inner-product search return exactly the reranker's top-k, so the only
difference from brute force is what the index leaves unvisited: recall against brute force and
items scored per user compare with DR's beam on equal terms.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

# faiss's loader logs six INFO lines per process while it probes CPU features (Ray workers log INFO)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402
import numpy as np
import torch

from .index import member, pair_keys, top_k_per_row
from .reranker import Reranker


@dataclass(frozen=True)
class AnnConfig:
    """Index shapes (from eval.ann_* fields)."""

    hnsw_m: int = 32                # graph degree (2M links per node at level 0)
    ef_construction: int = 128      # build-time beam of HNSW
    nlist: int = 0                  # IVF lists; 0 = ivf_nlist(V)
    train_per_list: int = 64        # IVF k-means sample: this many items per list (faiss caps it at 256)
    seed: int = 0


def use_torch_threads() -> int:
    """faiss runs on as many OpenMP threads as torch (a shared machine gets one budget) -> threads."""
    n = torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    return n


@torch.inference_mode()
def reranker_items(reranker: Reranker, chunk: int = 65536) -> np.ndarray:
    """[V, dim + 1] float32 rows [e_v, b_v], read chunk by chunk (composed tables are never whole in torch)."""
    out = np.empty((reranker.num_items, reranker.item_emb.embedding_dim + 1), dtype=np.float32)
    for lo, emb, bias in reranker.chunks(chunk):
        out[lo:lo + len(bias), :-1] = emb.float().numpy()
        out[lo:lo + len(bias), -1] = bias.float().numpy()
    return out


def user_queries(w: torch.Tensor) -> np.ndarray:
    """w [N, dim] reranker user vectors -> [N, dim + 1] float32 queries [w, 1]."""
    w = w.detach().float().numpy()
    return np.ascontiguousarray(np.concatenate([w, np.ones((w.shape[0], 1), np.float32)], 1))


def ivf_nlist(num_items: int) -> int:
    """4 sqrt(V) lists (the usual faiss guidance), at least 39 items per list for k-means, in [1, 65536]."""
    return int(max(1, min(round(4 * math.sqrt(num_items)), num_items // 39, 65536)))


def build_hnsw(items: np.ndarray, cfg: AnnConfig) -> faiss.IndexHNSWFlat:
    """items [V, d] float32 -> HNSW graph under inner product."""
    use_torch_threads()
    index = faiss.IndexHNSWFlat(items.shape[1], cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.ef_construction
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    return index


def build_ivf(items: np.ndarray, cfg: AnnConfig) -> faiss.IndexIVFFlat:
    """items [V, d] float32 -> IVF (flat lists, inner product), k-means on a seeded sample."""
    use_torch_threads()
    V, d = items.shape
    nlist = min(cfg.nlist or ivf_nlist(V), V)
    n_train = min(V, max(nlist * cfg.train_per_list, nlist))
    sample = items if n_train == V else items[np.sort(np.random.default_rng(cfg.seed).choice(V, n_train, replace=False))]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = cfg.seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    return index


def setting_name(index: faiss.Index) -> str:
    """The knob a sweep turns: "ef" (HNSW efSearch) or "nprobe" (IVF)."""
    return "ef" if isinstance(index, faiss.IndexHNSW) else "nprobe"


def _set(index: faiss.Index, value: int) -> None:
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(value)
    else:
        index.nprobe = int(min(value, index.nlist))


def _stats(index: faiss.Index):
    return faiss.cvar.hnsw_stats if isinstance(index, faiss.IndexHNSW) else faiss.cvar.indexIVF_stats


def search(index: faiss.Index, queries: np.ndarray, k: int, setting: int,
           exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """queries [N, d] -> (items [N, k] (-1 pad), scores [N, k] (-inf pad), items scored per user).

    exclude = (row [X], item [X]) pairs never returned: a user is searched for k + the excluded
    items of the longest list in its group, then they are dropped (as DR drops them from its
    candidates). Items scored = distance computations (HNSW: graph nodes visited; IVF: sizes of
    the probed lists). faiss's HNSW keeps max(efSearch, k asked) candidates but expands at most
    efSearch of them, so a long history widens its user's heap, not the walk.
    """
    N = queries.shape[0]
    n_excl = np.bincount(exclude[0], minlength=N)[:N] if exclude is not None and len(exclude[0]) else np.zeros(N, np.int64)
    # faiss takes one k per call: users grouped by the power of two of their history length, so one
    # long history widens only its group's search (results and heap), in O(log longest) calls
    group = np.ceil(np.log2(n_excl + 1)).astype(np.int64)
    use_torch_threads()
    _set(index, setting)
    stats = _stats(index)
    stats.reset()
    rows, items, scores = [], [], []
    for g in np.unique(group):
        sel = np.flatnonzero(group == g)
        k_g = min(k + int(n_excl[sel].max()), index.ntotal)
        s, i = index.search(np.ascontiguousarray(queries[sel], dtype=np.float32), k_g)
        rows.append(np.repeat(sel, k_g))
        items.append(i.ravel().astype(np.int64))
        scores.append(s.ravel().astype(np.float64))
    scored = stats.ndis / max(N, 1)
    row, item, score = (np.concatenate(x) if x else np.zeros(0, t) for x, t in
                        ((rows, np.int64), (items, np.int64), (scores, np.float64)))
    found = item >= 0
    row, item, score = row[found], item[found], score[found]
    if exclude is not None and len(exclude[0]):
        keep = ~member(pair_keys(row, item, index.ntotal), pair_keys(*exclude, index.ntotal))
        row, item, score = row[keep], item[keep], score[keep]
    out_i, out_s = top_k_per_row(row, item, score, N, k)
    return out_i, out_s, float(scored)


def sweep(index: faiss.Index, encode: Callable[[], np.ndarray], settings: tuple[int, ...], k: int,
          exclude: tuple[np.ndarray, np.ndarray] | None,
          judge: Callable[[np.ndarray], dict]) -> list[dict]:
    """One point per setting: {ef|nprobe, **judge(items [N, k]), items_scored_per_user, users_per_s}.

    encode() -> queries [N, d] runs inside the timer: users/s counts the user encoder as DR's does.
    IVF settings above nlist collapse to nlist (one point each).
    """
    name = setting_name(index)
    if name == "nprobe":
        settings = tuple(dict.fromkeys(min(int(s), index.nlist) for s in settings))
    points = []
    for s in settings:
        t0 = time.perf_counter()
        q = encode()
        items, _, scored = search(index, q, k, s, exclude)
        dt = time.perf_counter() - t0
        points.append({name: int(s), **judge(items), "items_scored_per_user": scored,
                       "users_per_s": q.shape[0] / max(dt, 1e-9)})
    return points


def at_recall(points: list[dict], target: float) -> dict:
    """The cheapest point (first of an increasing sweep) whose recall reaches `target`, else the last."""
    return next((p for p in points if p["recall"] >= target), points[-1])
