"""`dr backfill cold-items`: paths and reranker vectors for catalog items that have no paths yet.

A cold item (in `items`, not in the run's item_paths version: no training interactions) takes
its category's statistics over the run's assigned items (dr_model.cold), all computed on Spark:
* paths: candidates are the category's top S (= search.score_paths) paths by the share of its
  items on them (a group-by and a window per category); the J paths come from the M-step's
  penalized coordinate descent against the LIVE path sizes (the run's assignment) with the run's
  calibrated alpha, so a category's cold items spread over its paths as they fill up. The cold
  items are hash-partitioned by id; each partition counts its placements as the M-step's
  partitions do (extrapolated local deltas), so one partition is the sequential descent. No
  category, or a category with no assigned item: the least-loaded paths (the M-step's fill
  rule). `method` says which (category | least_loaded); `neighbor_item_id` is the category's
  assigned item nearest (cosine) its mean embedding (-1 without one): the item whose users the
  cold item is meant to reach.
* reranker vector: the mean embedding and bias of the category's assigned items, else of all.
  Executors look the assigned items' vectors up in the run's checkpoint (spark_udfs.cold_udf).

Outputs: `cold_item_paths` and `cold_item_vectors` (both overwritten, rows tagged with the
item_paths version, written by the executors), and a new `path_index` version for that
item_paths version holding the learned rows plus the cold ones (score NULL), so
find_path_index(item_paths version) returns it. `item_paths` is not changed: it stays the
assignment the model was trained against. Idempotent per (train run, item_paths version, items
version): a rerun on the same catalog commits nothing.

Driver memory: the live path-size table and the cold items' per-path counts, O(P) (the M-step
driver's bound; DESIGN.md section 8 asks O(1) of this stage, the size table is what the partitions
must share), the checkpoint's meta.json and a few counts. Per task: one batch of assigned items
(their vectors looked up in the memory-mapped checkpoint), a partition's category sums, or one
partition of cold items with their candidates [C_p, S] and the size table. Categories are
grouped by Spark (a category's (path, count) rows meet in one task: at most P of them).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dr_model.config import DRConfig
from dr_model.state_file import checkpoint_state

from . import runs
from .tables import CommitMeta, Warehouse

JOB = "cold_items"


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


@dataclass(frozen=True)
class _Frames:
    """The job's Spark inputs: item_paths rows and assigned and cold items, with their category (null: none)."""

    paths: Any          # item_id, slot, path, category of item_paths@v (persisted by _frames)
    assigned: Any       # item_id, category: every item with paths
    cold: Any           # item_id, category: catalog items without paths


def _frames(spark: Any, wh: Warehouse, ip_v: int) -> _Frames:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    items = wh.read_spark(spark, "items").select(
        "item_id", F.when(F.col("category") != "", F.col("category")).alias("category"))
    # one join of item_paths with the catalog, read by every statistic (an assigned item missing from it: no category)
    paths = (wh.read_spark(spark, "item_paths", ip_v).select("item_id", "slot", "path")
             .join(items, "item_id", "left").persist(StorageLevel.MEMORY_AND_DISK))
    assigned = paths.where(F.col("slot") == 0).select("item_id", "category")
    return _Frames(paths, assigned, items.join(assigned.select("item_id"), "item_id", "left_anti"))


def category_candidates(fr: _Frames, S: int) -> Any:
    """(category, cand_paths [<= S], cand_shares): each category's top S paths by the share of its assigned
    items on them, descending (ties: smaller path id); categories without assigned items absent."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    sizes = fr.assigned.where(F.col("category").isNotNull()).groupBy("category").agg(F.count("*").alias("members"))
    on = fr.paths.where(F.col("category").isNotNull()).groupBy("category", "path").agg(F.count("*").alias("n"))
    w = Window.partitionBy("category").orderBy(F.desc("n"), F.asc("path"))
    top = (on.withColumn("rank", F.row_number().over(w) - 1).where(F.col("rank") < S).join(sizes, "category")
           .select("category", F.struct("rank", "path", (F.col("n") / F.col("members")).alias("share")).alias("c")))
    got = top.groupBy("category").agg(F.sort_array(F.collect_list("c")).alias("c"))
    return got.select("category", F.col("c.path").alias("cand_paths"), F.col("c.share").alias("cand_shares"))


def category_vectors(fr: _Frames, state_file: str, cfg: DRConfig) -> tuple[Any, Any, Any]:
    """(per category with assigned items: category, items, emb [d] mean, bias mean; the same over all items,
    1 row; the persisted sums both read, for the caller to unpersist)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from spark_udfs.cold_udf import SUMS_DDL, category_sum_batches

    model = asdict(cfg.model)
    d = cfg.model.rerank_dim
    vsum = lambda c: F.aggregate(F.collect_list(c), F.array_repeat(F.lit(0.0), d),  # noqa: E731
                                 lambda acc, x: F.zip_with(acc, x, lambda a, b: a + b))
    sums = lambda df: df.agg(F.sum("items").alias("items"), F.sum("bias").alias("bias"),  # noqa: E731
                             vsum("emb").alias("emb"))
    partial = fr.assigned.mapInArrow(lambda it: category_sum_batches(it, state_file, model), SUMS_DDL)
    # the null group: uncategorised items, counted in the global mean only
    by_cat = sums(partial.groupBy("category")).persist(StorageLevel.MEMORY_AND_DISK)
    mean = lambda df: df.select(  # noqa: E731
        *[c for c in ("category",) if c in df.columns], "items",
        F.transform("emb", lambda x: x / F.col("items")).alias("emb"), (F.col("bias") / F.col("items")).alias("bias"))
    return mean(by_cat.where(F.col("category").isNotNull())), mean(sums(by_cat)), by_cat


def category_neighbors(fr: _Frames, means: Any, state_file: str, cfg: DRConfig) -> Any:
    """(category, neighbor_item_id): per category, its assigned item nearest (cosine) the mean, ties to the smaller id."""
    from pyspark.sql import functions as F

    from spark_udfs.cold_udf import NEAR_DDL, nearest_batches

    model = asdict(cfg.model)
    rows = fr.assigned.where(F.col("category").isNotNull()).join(
        means.select("category", F.col("emb").alias("centroid")), "category")
    best = rows.mapInArrow(lambda it: nearest_batches(it, state_file, model), NEAR_DDL)
    top = best.groupBy("category").agg(F.max(F.struct("sim", (-F.col("item_id")).alias("neg"))).alias("m"))
    return top.select("category", (-F.col("m.neg")).alias("neighbor_item_id"))


def live_sizes(fr: _Frames, P: int) -> np.ndarray:
    """Items per path [P] of the run's assignment (the one O(P) array the driver holds)."""
    got = fr.paths.groupBy("path").count().toArrow()
    out = np.zeros(P, dtype=np.int64)
    out[got.column("path").to_numpy()] = got.column("count").to_numpy()
    return out


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
    from pyspark.sql import functions as F

    from ray_trainers.checkpoint import check_pairing, read_meta
    from spark_udfs.cold_udf import PATHS_DDL, assign_batches

    from .path_index import build_path_index

    t0 = time.perf_counter()
    run = runs.latest(wh, "train", train_run_id, status="succeeded")
    if run is None:
        raise LookupError(f"no succeeded train run {train_run_id or ''} in {wh.root}: run `dr train` first")
    if not wh.exists("items"):
        raise FileNotFoundError(f"no `items` catalog in {wh.root}: load one with `dr data` first")
    ip_v, items_v = run.table_versions["item_paths"], wh.version("items")
    meta = read_meta(run.checkpoint)
    check_pairing(meta, run.checkpoint, ip_v)           # refuses a checkpoint trained against other paths
    cfg = DRConfig.from_dict(meta.config)
    J, P, S = cfg.model.J, cfg.model.num_paths, cfg.search.score_paths
    state_file = checkpoint_state(run.checkpoint)
    label = f"{run.run_id}@{ip_v}/items@{items_v}"
    extra = {"item_paths_version": ip_v, "items_version": items_v, "train_run_id": run.run_id}
    tag = [F.lit(ip_v).cast("long").alias("item_paths_version"), F.lit(run.run_id).alias("run_id")]

    fr = _frames(spark, wh, ip_v)
    cached = None
    try:
        V = fr.assigned.count()
        if V != meta.num_items:
            raise ValueError(f"item_paths v{ip_v} has {V} items, the run's checkpoint {meta.num_items}: they disagree")
        C = fr.cold.count()
        extra["cold_items"] = C
        live = live_sizes(fr, P)
        alpha = run_alpha(run, cfg, log)
        means, overall, cached = category_vectors(fr, state_file, cfg)
        cands = category_candidates(fr, S).join(category_neighbors(fr, means, state_file, cfg), "category", "left")
        cold = fr.cold.join(cands, "category", "left").select(
            "item_id", F.coalesce("cand_paths", F.array().cast("array<long>")).alias("cand_paths"),
            F.coalesce("cand_shares", F.array().cast("array<double>")).alias("cand_shares"),
            F.when(F.col("cand_paths").isNotNull(), "category").otherwise("least_loaded").alias("method"),
            F.coalesce("neighbor_item_id", F.lit(-1).cast("long")).alias("neighbor_item_id"))
        n = int(spark.conf.get("spark.sql.shuffle.partitions"))
        live_bc = spark.sparkContext.broadcast(live)
        placed = (cold.repartition(n, "item_id").sortWithinPartitions("item_id")
                  .mapInArrow(lambda it: assign_batches(it, live_bc, C, n, J, S, alpha, cfg.mstep), PATHS_DDL))
        cv = wh.write_spark("cold_item_paths", placed.select("*", *tag),
                            CommitMeta(JOB, label, watermark=_watermark(wh, "cold_item_paths", label), extra=extra),
                            mode="overwrite")
        glob = overall.select(F.col("emb").alias("g_emb"), F.col("bias").alias("g_bias"))
        vectors = fr.cold.join(means, "category", "left").crossJoin(F.broadcast(glob)).select(
            "item_id", F.coalesce("emb", "g_emb").cast("array<float>").alias("embedding"),
            F.coalesce("bias", "g_bias").alias("bias"), *tag)
        vv = wh.write_spark("cold_item_vectors", vectors,
                            CommitMeta(JOB, label, watermark=_watermark(wh, "cold_item_vectors", label), extra=extra),
                            mode="overwrite")
    finally:
        if cached is not None:
            cached.unpersist()
        fr.paths.unpersist()

    # the index for this item_paths version, learned items plus the cold ones (score NULL)
    pi_label = f"cold-{label}"
    pi_v = _path_index_done(wh, pi_label, ip_v)
    skipped = cv.skipped and vv.skipped and pi_v is not None
    written = wh.read_spark(spark, "cold_item_paths", cv.version)
    if pi_v is None:
        learned = wh.read_spark(spark, "item_paths", ip_v).select("item_id", "slot", "path", "score")
        pi_v = build_path_index(spark, wh, ip_v, pi_label, log=log, frame=learned.unionByName(
            written.selectExpr("item_id", "slot", "path", "cast(null as double) score"))).version
    st = written.agg(F.countDistinct("item_id").alias("c"),
                     F.countDistinct(F.when(F.col("method") == "category", F.col("item_id"))).alias("by_cat"),
                     F.countDistinct("path").alias("used"),
                     F.countDistinct(F.when(F.col("method") == "category", F.col("path"))).alias("cat_paths")).first()
    got = written.groupBy("path").count().toArrow()
    after = live.copy()
    after[got.column("path").to_numpy()] += got.column("count").to_numpy()
    log(f"train run {run.run_id} (item_paths v{ip_v}, items v{items_v}): {st['c']} catalog items without paths, "
        f"{st['by_cat']} by category over {st['cat_paths']} paths, {st['c'] - st['by_cat']} least-loaded; "
        f"alpha {alpha:.4g}; largest path {int(live.max(initial=0))} -> {int(after.max(initial=0))}")
    log(f"cold_item_paths v{cv.version}, cold_item_vectors v{vv.version}, path_index v{pi_v}"
        f"{' (all already committed)' if skipped else ''} [{time.perf_counter() - t0:.1f}s]")
    return ColdResult(run.run_id, ip_v, int(st["c"]), int(st["by_cat"]), int(st["c"] - st["by_cat"]), int(st["used"]),
                      {"cold_item_paths": cv.version, "cold_item_vectors": vv.version, "path_index": pi_v}, skipped)
