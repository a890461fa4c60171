"""Scores job: beam search over `samples_train` in Spark -> s[v,c] (top-S per item) -> a `path_scores` version.

Batch mode sums p(c|x) over every training pair of an item (DESIGN.md §2); given the
item_paths version the model was trained against, every pair also scores its target's own
J paths (DRModel.beam_and_own), so the lists hold S + J paths per item. Streaming
mode (nightly increments) merges the new sums into a previous `path_scores` version with
decay eta = incremental.decay_per_day ** days (the days of data between the two versions) and
min_score seeding; with item_paths, the previous version's items outside it (aged out) are dropped. Either way the job makes ONE commit at
the end (mode overwrite: every version is a full snapshot), so a failed run leaves
`path_scores` at its previous version. Nothing per item reaches the driver.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dr_model.config import DRConfig
from jobs.tables import CommitMeta, CommitResult, Warehouse
from spark_udfs.beam_udf import PAIR_DDL, pair_batches, top_s_batches
from spark_udfs.model_source import ModelSource

JOB = "scores"
_OUT_DDL = "item_id long, path long, score double, n_v double"


def _log(msg: str) -> None:
    print(f"[scores] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ScoresOptions:
    """Knobs of the Spark plan (not of the model): partitions of the per-item step (None: shuffle default)."""

    partitions: int | None = None


def own_paths(item_paths: DataFrame) -> DataFrame:
    """item_paths rows -> (item_id, own: array of its paths in slot order)."""
    return (item_paths.groupBy("item_id")
            .agg(F.sort_array(F.collect_list(F.struct("slot", "path"))).alias("sp"))
            .select("item_id", F.col("sp.path").alias("own")))


def item_buckets(spark: SparkSession, opts: ScoresOptions) -> int:
    """Partitions of the top-S stage: each writes the items of one Spark hash bucket of item_id
    (recorded with the version: the M-step then reads a bucket's files directly, jobs.mstep)."""
    return opts.partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))


def path_scores_frame(spark: SparkSession, samples: DataFrame, model: ModelSource, cfg: DRConfig,
                      previous: DataFrame | None = None, opts: ScoresOptions = ScoresOptions(),
                      item_paths: DataFrame | None = None, decay: float | None = None) -> DataFrame:
    """The s[v,c] rows (item_id, path, score, n_v), top-S (+ J with item_paths) per item; merged into
    `previous` when given, with decay eta (required then).

    One scan of the samples, one shuffle: one row per pair (its beam outputs as lists,
    n_v = 1) goes straight to its item's partition, where dr_model sums them per (item,
    path) exactly and keeps the top S (beam_udf module doc). With item_paths, the samples
    are joined to their target's paths first (a broadcast join while the table is small). The
    executors read the model from its checkpoint file themselves (spark_udfs.model_source).
    """
    S, bs = cfg.search.score_paths, cfg.search.batch_size
    src = samples.select("hist", "target")
    width = S
    if item_paths is not None:
        own = own_paths(item_paths).withColumnRenamed("item_id", "target")
        src = src.join(own, "target", "left").select("hist", "target", "own")
        width = S + cfg.model.J
    rows = src.mapInArrow(lambda it: pair_batches(it, model, S, bs), PAIR_DDL)
    if previous is not None:
        if decay is None:
            raise ValueError("a streaming merge needs its decay (incremental.decay(days))")
        if item_paths is not None:
            previous = previous.join(item_paths.select("item_id").distinct(), "item_id", "left_semi")
        rows = rows.unionByName(previous.select("item_id", F.array("path").alias("paths"), F.array("score").alias("scores"),
                                                "n_v", F.lit(1).alias("src")))
    n = item_buckets(spark, opts)
    decay = decay if previous is not None else None
    # every row of an item lands in one partition: dr_model keeps its top S (and merges) there
    return rows.repartition(n, "item_id").mapInArrow(lambda it: top_s_batches(it, width, decay), _OUT_DDL)


def compute_path_scores(spark: SparkSession, warehouse: Warehouse, model: ModelSource, cfg: DRConfig,
                        samples_version: int | None, run_id: str, round: int | None = None,
                        previous_version: int | None = None, opts: ScoresOptions = ScoresOptions(),
                        item_paths_version: int | None = None, days: float = 1.0,
                        log: Callable[[str], None] = _log) -> CommitResult:
    """Score `samples_train@samples_version` with `model`, commit s[v,c] as ONE `path_scores` version.

    previous_version None: batch mode. Otherwise streaming: merge with `path_scores@previous_version`,
    whose scores are `days` days of data older (decay incremental.decay_per_day ** days).
    item_paths_version: the paths the model was trained against; their exact scores join the lists.
    """
    t0 = time.perf_counter()
    samples = warehouse.read_spark(spark, "samples_train", samples_version)
    previous = warehouse.read_spark(spark, "path_scores", previous_version) if previous_version is not None else None
    ip = warehouse.read_spark(spark, "item_paths", item_paths_version) if item_paths_version is not None else None
    decay = cfg.incremental.decay(days)
    mode = "batch" if previous is None else f"streaming (decay {decay:.4f} = {cfg.incremental.decay_per_day} ** {days:.2f} days, previous version {previous_version})"
    log(f"beam S={cfg.search.score_paths}" + (f" + own paths of item_paths@{item_paths_version}" if ip is not None else "")
        + f", batch {cfg.search.batch_size}, samples_train@{samples_version}, {mode}")
    df = path_scores_frame(spark, samples, model, cfg, previous, opts, ip, decay)
    # watermark = the round: a rerun after a crash between this commit and the M-step's reuses it
    meta = CommitMeta(JOB, run_id, round, cfg.hash(), watermark=round if round is not None else 1, extra={
        "samples_version": samples_version, "previous_version": previous_version, "model_key": model.key,
        "item_paths_version": item_paths_version, "width": cfg.search.score_paths + (cfg.model.J if ip is not None else 0),
        "mode": "batch" if previous is None else "streaming", "decay": decay if previous is not None else None,
        "item_buckets": item_buckets(spark, opts)})
    res = warehouse.write_spark("path_scores", df, meta, mode="overwrite")
    log(f"path_scores v{res.version} already committed by run {run_id} round {round}: reused" if res.skipped else
        f"committed path_scores v{res.version}: {res.rows} rows in {res.files} files [{time.perf_counter() - t0:.1f}s]")
    return res


__all__ = ["ScoresOptions", "item_buckets", "path_scores_frame", "compute_path_scores", "JOB"]
