"""`dr backfill cold-items`: paths and reranker vectors for catalog items that have no paths yet.

A cold item (in `items`, not in the run's item_paths version: no training interactions) takes
its category's statistics over the run's assigned items (dr_model.cold):
* paths: candidates are the category's top S (= search.score_paths) paths by the share of its
  items on them; the J paths come from the M-step's penalized coordinate descent against the
  LIVE path sizes (the run's assignment) with the run's calibrated alpha, so a category's cold
  items spread over its paths as they fill up. No category, or a category with no assigned
  item: the least-loaded paths (the M-step's fill rule). `method` says which (category |
  least_loaded); `neighbor_item_id` is the category's assigned item nearest (cosine) its mean
  embedding (-1 without one): the item whose users the cold item is meant to reach.
* reranker vector: the mean embedding and bias of the category's assigned items, else of all.

Outputs: `cold_item_paths` and `cold_item_vectors` (both overwritten, rows tagged with the
item_paths version), and a new `path_index` version for that item_paths version holding the
learned rows plus the cold ones (score NULL), so find_path_index(item_paths version) returns it.
`item_paths` is not changed: it stays the assignment the model was trained against. Idempotent
per (train run, item_paths version, items version): a rerun on the same catalog commits nothing.

Driver memory, V assigned items, C cold ones, G categories, d = model.rerank_dim: the run's model
and assignment (load_run_model: O(V d) floats, O(V J) ints); O(V + C) int64 ids and category codes
(Spark joins items with item_paths and turns categories into codes: no category string reaches
the driver); O(G (S + d)) per-category statistics, computed vectorized, the embedding ones in
passes of CHUNK items; O(C (S + J + d)) for the cold items' candidates, paths and vectors.
DESIGN.md section 8 asks O(1): this job stays O(V) because it averages the reranker's item table,
which it loads whole (as `dr evaluate` does); nothing else is catalog-sized.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from dr_model.cold import assign_cold, category_means, category_neighbors, category_paths
from dr_model.config import DRConfig
from dr_model.mstep import path_sizes
from dr_model.scores import EMPTY
from dr_model.vocab import Vocab

from . import runs
from .tables import CommitMeta, Warehouse, list_array

JOB = "cold_items"
CHUNK = 1 << 16                 # assigned items per pass over the reranker tables


def _log(msg: str) -> None:
    print(f"[cold-items] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ColdResult:
    train_run_id: str
    item_paths_version: int
    cold_items: int
    by_category: int
    by_least_loaded: int
    paths_used: int             # distinct paths the cold items landed on
    versions: dict[str, int]
    skipped: bool               # every output was already committed for this run and catalog


def run_alpha(run: runs.RunRecord, cfg: DRConfig, log=_log) -> float:
    """The penalty weight of the run's last M-step (metrics.alpha), else a fixed mstep.alpha, else 0 (logged)."""
    alpha = run.metrics.get("alpha")
    if alpha is not None:
        return float(alpha)
    if not cfg.mstep.auto_alpha:
        return float(cfg.mstep.alpha)
    log(f"train run {run.run_id} records no calibrated alpha (no M-step ran): cold items take their category's "
        f"best paths without a size penalty")
    return 0.0


def catalog_codes(spark: Any, wh: Warehouse, ip_v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Spark scan -> (assigned ids [V] sorted, their category codes [V], cold ids [C] sorted, cold codes [C], G).

    Codes index the catalog's distinct non-empty categories in sorted order (-1: none); a
    category without assigned items still gets a code. Only integers reach the driver: one
    (id, code, assigned) row per catalog or assigned item, never a category string.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    items = wh.read_spark(spark, "items").select(
        "item_id", F.when(F.col("category") != "", F.col("category")).alias("category"))
    cats = items.where(F.col("category").isNotNull()).select("category").distinct()
    # one window over the distinct categories only (G rows), not over the catalog
    cats = cats.withColumn("code", (F.dense_rank().over(Window.orderBy("category")) - 1).cast("long"))
    coded = items.join(F.broadcast(cats), "category", "left").select(
        "item_id", F.coalesce(F.col("code"), F.lit(-1).cast("long")).alias("code"))
    learned = wh.read_spark(spark, "item_paths", ip_v).where(F.col("slot") == 0).select(
        "item_id", F.lit(True).alias("assigned"))
    # one pass: every catalog item and every assigned item (an assigned item missing from the catalog: code -1)
    got = coded.join(learned, "item_id", "full_outer").select(
        "item_id", F.coalesce(F.col("code"), F.lit(-1).cast("long")).alias("code"),
        F.coalesce(F.col("assigned"), F.lit(False)).alias("assigned")).toArrow()
    ids, codes = got.column("item_id").to_numpy(), got.column("code").to_numpy().astype(np.int64)
    assigned = got.column("assigned").to_numpy(zero_copy_only=False)
    del got
    order = np.argsort(ids, kind="stable")                 # on the driver: a Spark sort costs a sampling job
    ids, codes, assigned = ids[order], codes[order], assigned[order]
    # every category code belongs to some item, assigned or cold: the codes seen are all the categories
    G = int(codes.max(initial=-1)) + 1
    return ids[assigned], codes[assigned], ids[~assigned], codes[~assigned], G


def _vector_chunks(model: Any, item_cat: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row, codes [n], reranker embeddings [n, d], biases [n]) over the model's items, CHUNK at a time."""
    for lo, emb, bias in model.reranker.chunks(CHUNK):
        yield lo, item_cat[lo:lo + len(bias)], emb.float().numpy(), bias.double().numpy()


def _watermark(wh: Warehouse, table: str, label: str) -> int:
    """Watermark for this job's write of `table`: the stored one (skip) while its commit is the table's
    latest version, one more (rewrite) once another commit has overwritten it, 1 the first time."""
    stored = wh.watermark(table, JOB, label)
    if stored is None:
        return 1
    return stored if wh.committed_version(table, JOB, label) == wh.version(table) else stored + 1


def _path_index_done(wh: Warehouse, label: str, ip_v: int) -> int | None:
    """The path_index version this job committed under `label`, if it is still item_paths@ip_v's latest index."""
    from .path_index import JOB as PI_JOB, find_path_index

    mine = wh.committed_version("path_index", PI_JOB, label)
    return mine if mine is not None and mine == find_path_index(wh, ip_v) else None


def run_cold_items(spark: Any, wh: Warehouse, train_run_id: str | None = None, log=_log) -> ColdResult:
    """Paths and reranker vectors for the catalog's items without paths, for one succeeded train run (latest by default)."""
    from .evaluate import load_run_model
    from .path_index import build_path_index

    t0 = time.perf_counter()
    run = runs.latest(wh, "train", train_run_id, status="succeeded")
    if run is None:
        raise LookupError(f"no succeeded train run {train_run_id or ''} in {wh.root}: run `dr train` first")
    if not wh.exists("items"):
        raise FileNotFoundError(f"no `items` catalog in {wh.root}: load one with `dr data` first")
    model, item_ids, assign, cfg = load_run_model(wh, run)
    ip_v, items_v = run.table_versions["item_paths"], wh.version("items")
    J, P, S = cfg.model.J, cfg.model.num_paths, cfg.search.score_paths

    known_ids, known_codes, cold_ids, cold_cat, G = catalog_codes(spark, wh, ip_v)
    if not np.array_equal(known_ids, item_ids):
        raise ValueError(f"item_paths v{ip_v} changed under the run's model ({len(known_ids)} vs {len(item_ids)} items)")
    paths_g, shares_g = category_paths(known_codes, assign, G, S)
    emb_g, bias_g, count_g = category_means(((c, e, b) for _, c, e, b in _vector_chunks(model, known_codes)),
                                            G, cfg.model.rerank_dim)
    nearest_g = category_neighbors(lambda: ((lo, c, e) for lo, c, e, _ in _vector_chunks(model, known_codes)),
                                   emb_g[:G])
    by_cat = cold_cat >= 0
    by_cat[by_cat] = count_g[cold_cat[by_cat]] > 0
    g = np.where(by_cat, cold_cat, G)                      # row G: no category -> no candidates, global mean
    cand_p = np.concatenate([paths_g, np.full((1, S), EMPTY, dtype=np.int64)])[g]
    cand_s = np.concatenate([shares_g, np.zeros((1, S))])[g]
    live = path_sizes(assign, P)
    alpha = run_alpha(run, cfg, log)
    paths = assign_cold(cand_p, cand_s, live, J, alpha, cfg.mstep)
    neighbor = Vocab(item_ids).raw(np.append(nearest_g, -1)[g])
    C = len(cold_ids)
    after = live + np.bincount(paths.ravel(), minlength=P)
    log(f"train run {run.run_id} (item_paths v{ip_v}, items v{items_v}): {C} catalog items without paths, "
        f"{int(by_cat.sum())} by category over {len(np.unique(paths[by_cat]))} paths, {int((~by_cat).sum())} "
        f"least-loaded; alpha {alpha:.4g}; largest path {int(live.max(initial=0))} -> {int(after.max(initial=0))}")

    label = f"{run.run_id}@{ip_v}/items@{items_v}"
    extra = {"cold_items": C, "item_paths_version": ip_v, "items_version": items_v, "train_run_id": run.run_id}
    path_rows = pa.table({
        "item_id": np.repeat(cold_ids, J), "slot": np.tile(np.arange(J, dtype=np.int32), C),
        "path": paths.ravel(), "method": np.repeat(np.where(by_cat, "category", "least_loaded"), J),
        "neighbor_item_id": np.repeat(neighbor, J), "item_paths_version": np.full(C * J, ip_v, dtype=np.int64),
        "run_id": pa.array([run.run_id] * (C * J), pa.string()),
    })
    cv = wh.write_arrow("cold_item_paths", path_rows,
                        CommitMeta(JOB, label, watermark=_watermark(wh, "cold_item_paths", label), extra=extra),
                        mode="overwrite")

    def vector_rows() -> Iterator[pa.Table]:
        for lo in range(0, max(C, 1), CHUNK):         # one (maybe empty) table at least: the schema
            rows = g[lo:lo + CHUNK]
            yield pa.table({"item_id": cold_ids[lo:lo + CHUNK], "embedding": list_array(emb_g[rows], dtype=np.float32),
                            "bias": bias_g[rows], "item_paths_version": np.full(len(rows), ip_v, dtype=np.int64),
                            "run_id": pa.array([run.run_id] * len(rows), pa.string())})
    vv = wh.write_arrow("cold_item_vectors", vector_rows(),
                        CommitMeta(JOB, label, watermark=_watermark(wh, "cold_item_vectors", label), extra=extra),
                        mode="overwrite")

    # the index for this item_paths version, learned items plus the cold ones (score NULL)
    pi_label = f"cold-{label}"
    pi_v = _path_index_done(wh, pi_label, ip_v)
    skipped = cv.skipped and vv.skipped and pi_v is not None
    if pi_v is None:
        learned = wh.read_spark(spark, "item_paths", ip_v).select("item_id", "slot", "path", "score")
        cold = wh.read_spark(spark, "cold_item_paths", cv.version).selectExpr(
            "item_id", "slot", "path", "cast(null as double) score")
        pi_v = build_path_index(spark, wh, ip_v, pi_label, frame=learned.unionByName(cold), log=log).version
    log(f"cold_item_paths v{cv.version}, cold_item_vectors v{vv.version}, path_index v{pi_v}"
        f"{' (all already committed)' if skipped else ''} [{time.perf_counter() - t0:.1f}s]")
    return ColdResult(run.run_id, ip_v, C, int(by_cat.sum()), int((~by_cat).sum()), int(len(np.unique(paths))),
                      {"cold_item_paths": cv.version, "cold_item_vectors": vv.version, "path_index": pi_v},
                      skipped)
