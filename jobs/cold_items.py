"""`dr backfill cold-items`: paths for catalog items that have none yet (no training interactions).

A cold item has no reranker embedding of its own, so it borrows one: the mean reranker
embedding of the assigned items of its category. It takes the J paths of the assigned item
of that category nearest to that point (cosine); an item with no category, or whose
category has no assigned item, takes the J least-loaded paths. Results go to
`cold_item_paths` (marked with the method and the neighbour) and into a new `path_index`
version for the run's item_paths version, with score NULL. `item_paths` itself is not
changed: it stays the assignment the model was trained against.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dr_model.vocab import Vocab

from . import runs
from .tables import CommitMeta, Warehouse

JOB = "cold_items"


def _log(msg: str) -> None:
    print(f"[cold-items] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ColdResult:
    train_run_id: str
    cold_items: int
    by_neighbor: int
    by_least_loaded: int
    versions: dict[str, int]


def assign_cold(emb: np.ndarray, assign: np.ndarray, item_cat: np.ndarray, cold_cat: np.ndarray,
                num_paths: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paths for cold items.

    emb [V, d] reranker embeddings of assigned items, assign [V, J], item_cat [V] and cold_cat
    [C] category codes (-1 = unknown) -> (paths [C, J], neighbour row [C] (-1: none), method [C]
    with 1 = neighbour, 2 = least-loaded).
    """
    C, J = len(cold_cat), assign.shape[1]
    paths = np.full((C, J), -1, dtype=np.int64)
    neighbor = np.full(C, -1, dtype=np.int64)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    for cat in np.unique(cold_cat[cold_cat >= 0]):       # one vectorized step per category
        members = np.nonzero(item_cat == cat)[0]
        if len(members) == 0:
            continue
        centroid = unit[members].mean(0)
        nearest = members[np.argmax(unit[members] @ centroid)]
        rows = np.nonzero(cold_cat == cat)[0]
        neighbor[rows] = nearest
        paths[rows] = assign[nearest]
    method = np.where(neighbor >= 0, 1, 2).astype(np.int8)
    rest = np.nonzero(neighbor < 0)[0]
    if len(rest):
        sizes = np.bincount(np.concatenate([assign.ravel(), paths[paths >= 0]]), minlength=num_paths)
        # least-loaded paths, spread round-robin so the cold items do not pile onto one path
        order = np.argsort(sizes, kind="stable")[: max(J * len(rest), J)]
        paths[rest] = order[(np.arange(len(rest) * J) % len(order))].reshape(len(rest), J)
    return paths, neighbor, method


def run_cold_items(spark: Any, wh: Warehouse, train_run_id: str | None = None, log=_log) -> ColdResult:
    """Give paths to the catalog's items without any, for one succeeded train run (latest by default)."""
    from .evaluate import load_run_model
    from .path_index import build_path_index

    t0 = time.perf_counter()
    run = runs.latest(wh, "train", train_run_id, status="succeeded")
    if run is None:
        raise LookupError(f"no succeeded train run {train_run_id or ''} in {wh.root}: run `dr train` first")
    if not wh.exists("items"):
        raise FileNotFoundError(f"no `items` catalog in {wh.root}: load one with `dr data` first")
    model, item_ids, assign, cfg = load_run_model(wh, run)
    ip_v = run.table_versions["item_paths"]
    catalog = wh.read_arrow("items", columns=["item_id", "category"])
    cat_ids = catalog.column("item_id").to_numpy()
    # category -> integer code; missing or empty category -> -1
    enc = pc.dictionary_encode(pc.fill_null(catalog.column("category"), "")).combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    empty = np.flatnonzero(np.asarray(enc.dictionary.to_pylist(), dtype=object) == "")
    codes[np.isin(codes, empty)] = -1
    cold_mask = ~np.isin(cat_ids, item_ids)
    cold_ids = cat_ids[cold_mask]
    order = np.argsort(cat_ids)
    pos = np.minimum(np.searchsorted(cat_ids[order], item_ids), len(order) - 1)
    item_cat = np.where(cat_ids[order][pos] == item_ids, codes[order][pos], -1)
    emb = model.reranker.item_vectors().detach().numpy()
    paths, neighbor, method = assign_cold(emb, assign, item_cat, codes[cold_mask], cfg.model.num_paths)
    log(f"train run {run.run_id} (item_paths v{ip_v}): {len(cold_ids)} catalog items without paths; "
        f"{int((method == 1).sum())} by nearest neighbour in their category, {int((method == 2).sum())} least-loaded")
    J = cfg.model.J
    rows = pa.table({
        "item_id": np.repeat(cold_ids, J), "slot": np.tile(np.arange(J, dtype=np.int32), len(cold_ids)),
        "path": paths.ravel(), "method": np.repeat(np.where(method == 1, "neighbor", "least_loaded"), J),
        "neighbor_item_id": np.repeat(Vocab(item_ids).raw(neighbor), J),
        "item_paths_version": np.full(len(cold_ids) * J, ip_v, dtype=np.int64),
        "run_id": [run.run_id] * (len(cold_ids) * J),
    })
    meta = CommitMeta(JOB, f"{run.run_id}@{ip_v}", watermark=1, extra={"cold_items": len(cold_ids)})
    cv = wh.write_arrow("cold_item_paths", rows, meta, mode="overwrite")
    # the index for this item_paths version, learned items plus the cold ones (score NULL)
    learned = wh.read_spark(spark, "item_paths", ip_v).select("item_id", "slot", "path", "score")
    cold = spark.createDataFrame(rows.select(["item_id", "slot", "path"]).to_pandas()).selectExpr(
        "item_id", "cast(slot as int) slot", "path", "cast(null as double) score")
    pi = build_path_index(spark, wh, None, f"cold-{run.run_id}", frame=learned.unionByName(cold), log=log)
    log(f"committed cold_item_paths v{cv.version} and path_index v{pi.version} [{time.perf_counter() - t0:.1f}s]")
    return ColdResult(run.run_id, len(cold_ids), int((method == 1).sum()), int((method == 2).sum()),
                      {"cold_item_paths": cv.version, "path_index": pi.version})
