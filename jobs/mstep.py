"""Distributed M-step job: penalized coordinate descent over items partitioned on Spark -> an `item_paths` version.

Per round (DESIGN.md §2 "Distributed form"): every partition re-assigns its items with
dr_model's kernel against the round's global path-size table |c| (spark_udfs.mstep_udf:
extrapolated local deltas, the convergence scheme) and computes its part of the round's
statistics in the same pass. Two ways to run the rounds, same math, same result:

* **barrier** (default whenever the partitions fit the cluster's task slots): ONE barrier
  stage runs all rounds; after each round the tasks sum their count changes and
  statistics with a gloo all-reduce (spark_udfs.exchange), so each starts the next round
  from the exact global table. No job, scheduling or state write per round: the per-round
  cost is the kernel plus one exchange, peer to peer (nothing passes through the driver).
  The same stage builds the state first and writes the item_paths files last
  (spark_udfs.mstep_onestage): the whole M-step is one Spark stage and one commit.
* **jobs** (more partitions than slots, dynamic allocation, or `sync="jobs"`): one Spark
  job per round; the
  driver sums the partitions' count vectors and broadcasts the table (a tree reduction
  above `MStepOptions.driver_merge` partitions).

The state is built without shuffling `path_scores` when the version records the scores job's
`item_buckets`: every task reads its buckets' files itself (state_source). The candidates
never travel after the first pass: they sit in a worker-side cache
(mstep_udf module doc; a miss rebuilds them from the path_scores files). In jobs mode the
Spark state is one row per partition holding the items' assignment as binary blobs,
checkpointed (`localCheckpoint`) so plans stay short. One commit at the end: a failed run leaves
`item_paths` at its previous version.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dr_model.config import DRConfig
from dr_model.mstep import RoundStats
from jobs.mstep_options import SYNC_MODES, MStepOptions, MStepState, checkpoint, log_mstep
from jobs.mstep_rounds import collect_stats, log_rounds, log_start, round_stats, run_rounds, start_plan
from jobs.tables import CommitMeta, CommitResult, Staged, Warehouse
from spark_udfs.mstep_onestage import one_stage_batches
from spark_udfs.mstep_state import build_state, build_state_from_files
from spark_udfs.mstep_udf import INPUT_COLUMNS, STATE_DDL, MStepContext, drop_job, item_paths_batches
from spark_udfs.partitioning import largest_divisor, task_of

JOB = "mstep"


def task_slots(spark: SparkSession) -> int:
    """Tasks the cluster can run at once now (a barrier stage needs one slot per partition); 0 if unknown."""
    sc = spark.sparkContext._jsc.sc()  # type: ignore[union-attr]
    try:
        return int(sc.maxNumConcurrentTasks(sc.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # noqa: BLE001 - a Spark without this (private) method: plan per-round jobs
        return 0


def plan_partitions(spark: SparkSession, opts: MStepOptions, items: int | None = None) -> tuple[int, bool]:
    """(item partitions, run the rounds in one barrier stage?) for these options on this cluster and `items` scored items."""
    if opts.sync not in SYNC_MODES:
        raise ValueError(f"MStepOptions.sync must be one of {SYNC_MODES}, got {opts.sync!r}")
    if opts.partitions is not None and opts.partitions < 1:
        raise ValueError(f"MStepOptions.partitions must be >= 1, got {opts.partitions}")
    # Spark refuses barrier stages under dynamic allocation: plan per-round jobs there
    dynamic = spark.conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true"
    slots = task_slots(spark) if opts.sync != "jobs" and not dynamic else 0
    n = opts.partitions or slots or spark.sparkContext.defaultParallelism
    if opts.partitions is None and items is not None:
        n = max(1, min(n, items // max(opts.min_items_per_partition, 1)))
    barrier = opts.sync != "jobs" and 0 < n <= slots
    if opts.sync == "barrier" and not barrier:
        raise ValueError(f"MStepOptions.sync='barrier' needs partitions ({n}) <= the cluster's concurrent task "
                         f"slots ({slots}): lower the partitions or use sync='auto'/'jobs'")
    return n, barrier


def scores_buckets(warehouse: Warehouse, version: int | None, files: tuple[str, ...]) -> int:
    """Hash buckets of item_id the scores job wrote this path_scores version in (its `item_buckets`),
    0 when unknown or when a file does not name the bucket (task) that wrote it."""
    vs = warehouse.versions("path_scores")
    info = vs[-1] if version is None and vs else next((v for v in vs if v.version == version), None)
    b = int(info.metadata.get("dr.item_buckets") or 0) if info is not None else 0
    tasks = [task_of(u) for u in files]
    return b if b > 0 and all(t is not None and t < b for t in tasks) else 0

@dataclass(frozen=True)
class StateSource:
    """What a partition's state is built from: the rows each build task receives, and how it reads them."""

    df: DataFrame                     # one partition per item partition (mstep_state's input rows)
    ctx: MStepContext
    partitions: int
    barrier: bool
    from_files: bool                  # each task reads its buckets' path_scores files (build_state_from_files)
    seed: int

    @property
    def build(self) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
        """A partition's input rows -> its state row (executor side; the closure holds no DataFrame)."""
        ctx, seed, from_files = self.ctx, self.seed, self.from_files
        return lambda it: build_state_from_files(it, ctx, seed) if from_files else build_state(it, ctx, seed)


def state_source(spark: SparkSession, warehouse: Warehouse, cfg: DRConfig, path_scores_version: int | None,
                 init_item_paths_version: int | None, opts: MStepOptions = MStepOptions()) -> StateSource:
    """The partitions' build input: items hash-partitioned by item_id, and the run's task context."""
    # path_scores lists: the beam's S paths plus the J own paths the scores job adds
    S, J, P, mc = cfg.search.score_paths + cfg.model.J, cfg.model.J, cfg.model.num_paths, cfg.mstep
    # path_scores holds at most S rows per item: rows // S is a lower bound of the scored items
    n, barrier = plan_partitions(spark, opts, warehouse.rows("path_scores", path_scores_version) // S)
    sources = tuple(warehouse.files("path_scores", path_scores_version))
    buckets = scores_buckets(warehouse, path_scores_version, sources) if opts.read_buckets else 0
    if buckets:
        n = largest_divisor(buckets, n)                  # each partition reads whole buckets
    barrier = barrier and P < 2 ** 31                    # the exchange encodes path ids as int32 gaps
    ctx = MStepContext(job=MStepContext.new_job(), S=S, J=J, num_paths=P, alpha=0.0, power=mc.penalty_power,
                       block_size=mc.block_size, extrapolate=opts.extrapolate, partitions=n,
                       sources=sources, cache=opts.worker_cache,
                       improving_only=mc.improving_only, K=cfg.model.K, D=cfg.model.D, explore=mc.explore,
                       explore_score=mc.explore_score, seed=cfg.train.seed, buckets=buckets)
    ip = (warehouse.read_spark(spark, "item_paths", init_item_paths_version)
          .select("item_id", "path", F.col("slot").cast("int").alias("slot"), F.lit(1).alias("src"))
          if init_item_paths_version is not None else None)
    if buckets:
        # the scores job wrote one file set per hash bucket of item_id: every task reads its buckets'
        # files itself (nothing of path_scores is shuffled); only the starting paths (J rows an item)
        # are hash-partitioned to it, with the same partitioner
        src = (ip.repartition(n, "item_id") if ip is not None else
               spark.range(n, numPartitions=n).select(F.col("id").alias("item_id"), F.lit(0).cast("long").alias("path"),
                                                      F.lit(-1).alias("slot"), F.lit(2).alias("src")))
        return StateSource(src, ctx, n, barrier, True, opts.seed)
    rows = (warehouse.read_spark(spark, "path_scores", path_scores_version)
            .select("item_id", "path", "score", "n_v", F.lit(-1).alias("slot"), F.lit(0).alias("src")))
    if ip is not None:
        rows = rows.unionByName(ip.select("item_id", "path", F.lit(0.0).alias("score"), F.lit(0.0).alias("n_v"),
                                          "slot", "src"))
    # sorted by item inside each partition (Spark's external sort spills): the tasks stream their
    # rows into per-item arrays, so a task's memory follows its items, not its S+J rows per item
    return StateSource(rows.repartition(n, "item_id").sortWithinPartitions("item_id"), ctx, n, barrier, False, opts.seed)


def initial_state(spark: SparkSession, warehouse: Warehouse, cfg: DRConfig, path_scores_version: int | None,
                  init_item_paths_version: int | None, opts: MStepOptions = MStepOptions(),
                  source: StateSource | None = None) -> MStepState:
    """The checkpointed starting state: items hash-partitioned by item_id, one state row per partition."""
    src = source or state_source(spark, warehouse, cfg, path_scores_version, init_item_paths_version, opts)
    state = src.df.mapInArrow(src.build, STATE_DDL)
    # built by run_rounds' first statistics job (distributed_mstep drops the job's cache if that fails)
    return MStepState(checkpoint(state, opts.storage), src.ctx, src.partitions, src.barrier)

def distributed_mstep(spark: SparkSession, warehouse: Warehouse, cfg: DRConfig, path_scores_version: int | None,
                      init_item_paths_version: int | None, run_id: str, round: int | None = None,
                      opts: MStepOptions = MStepOptions(),
                      log: Callable[[str], None] = log_mstep) -> tuple[CommitResult, list[RoundStats]]:
    """M-step over `path_scores@path_scores_version` from `item_paths@init` (None: random balanced start).

    Commits the final assignment as ONE `item_paths` version; returns it and the per-round
    statistics (element 0 = the starting assignment). Items of the starting version
    without any score are carried through unchanged (not in the size table, as in
    trainer.train_em).
    """
    t0 = time.perf_counter()
    J = cfg.model.J
    log(f"path_scores@{path_scores_version}, start item_paths@{init_item_paths_version}, K={cfg.model.K} "
        f"D={cfg.model.D} J={J} S={cfg.search.score_paths}+{J} own+{cfg.mstep.explore} exploration, "
        f"alpha={cfg.mstep.alpha}, {cfg.mstep.rounds} rounds, "
        f"{'extrapolated local deltas' if opts.extrapolate else 'plain local copies'}")
    src = state_source(spark, warehouse, cfg, path_scores_version, init_item_paths_version, opts)
    ctx = src.ctx
    how = (f"each reading its share of the {ctx.buckets} item buckets' files" if ctx.buckets else
           "path_scores shuffled by item (the version records no item buckets)")

    def meta(stats: list[RoundStats], barrier: bool, target: float | None) -> CommitMeta:
        return CommitMeta(JOB, run_id, round, cfg.hash(), extra={
            "path_scores_version": path_scores_version, "init_item_paths_version": init_item_paths_version,
            "scheme": "extrapolated-local-deltas" if opts.extrapolate else "plain",
            "sync": "barrier" if barrier else "jobs", "partitions": src.partitions,
            "objective": stats[-1].objective, "alpha": stats[-1].alpha, "path_size": stats[-1].path_size,
            "max_path_size": stats[-1].max_path_size, "target_path_size": target})
    try:
        if src.barrier and opts.one_stage and cfg.mstep.rounds > 0:
            staged, stats, target = _one_stage(warehouse, src, cfg, opts, log, how)
            res = warehouse.commit(staged, meta(stats, True, target), mode="overwrite")
        else:
            state = initial_state(spark, warehouse, cfg, path_scores_version, init_item_paths_version, opts, src)
            try:
                sums = collect_stats(state, cfg.model.num_paths, opts.driver_merge)     # builds the state
                log(f"state of {state.partitions} partitions built from path_scores, {how} "
                    f"[{time.perf_counter() - t0:.1f}s]")
                state, stats = run_rounds(spark, state, cfg, opts, log, sums)
                # the item_paths rows are made in the writing task (3 * items rows never cross the JVM)
                res = warehouse.write_spark("item_paths", state.df.select(*INPUT_COLUMNS),
                                            meta(stats, state.barrier, state.extra.get("target_path_size")),
                                            mode="overwrite", transform=lambda it: item_paths_batches(it, ctx))
            finally:
                state.df.unpersist()
    finally:
        drop_job(ctx.job)                                   # local mode: the executors' cache folder
    log(f"committed item_paths v{res.version}: {res.rows} rows [{time.perf_counter() - t0:.1f}s]")
    return res, stats


def _one_stage(warehouse: Warehouse, src: StateSource, cfg: DRConfig, opts: MStepOptions, log: Callable[[str], None],
               how: str) -> tuple[Staged, list[RoundStats], float | None]:
    """Build, rounds and item_paths rows in one barrier stage (spark_udfs.mstep_onestage) -> (the staged
    item_paths files, the statistics with round 0 = the start, the target path size)."""
    t0 = time.perf_counter()
    ctx, rounds, build, plan = src.ctx, cfg.mstep.rounds, src.build, start_plan(cfg, opts.alpha0)
    staged = warehouse.stage_spark(src.df, "item_paths", barrier=True,
                                   transform=lambda it: one_stage_batches(it, ctx, build, rounds, plan))["item_paths"]
    secs = time.perf_counter() - t0
    if len(staged.notes) != 1:
        raise RuntimeError(f"M-step stage: expected one statistics note (task 0), got {len(staged.notes)}")
    h = json.loads(staged.notes[0])
    start, stats = RoundStats(**h["start"]), [RoundStats(**d) for d in h["rounds"]]
    log(f"state of {src.partitions} partitions built from path_scores, {how}, in the stage's tasks "
        f"[{h['build_seconds']:.1f}s]")
    log_start(log, start, h["items"], src.partitions, "in the same barrier stage", start.alpha, h["target"])
    log_rounds(log, h, stats)
    log(f"{rounds} rounds in one barrier stage over {src.partitions} partitions: "
        f"{sum(st.seconds for st in stats):.2f}s in the tasks; the stage (start, state build, rounds, item_paths "
        f"files) {secs:.2f}s")
    return staged, [start] + stats, h["target"]

__all__ = ["MStepOptions", "MStepState", "StateSource", "SYNC_MODES", "state_source", "start_plan", "task_slots",
           "plan_partitions", "initial_state", "collect_stats", "round_stats", "run_rounds", "distributed_mstep", "JOB"]
