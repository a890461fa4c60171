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
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dr_model.calibrate import AlphaSearch, initial_alpha, traffic_size
from dr_model.config import DRConfig
from dr_model.mstep import RoundStats, fixed_alpha
from jobs.tables import CommitMeta, CommitResult, Staged, Warehouse
from spark_udfs.mstep_onestage import one_stage_batches
from spark_udfs.mstep_state import build_state, build_state_from_files
from spark_udfs.mstep_udf import (INPUT_COLUMNS, STATE_DDL, STATS_COLUMNS, MStepContext,
                                  barrier_batches, drop_job, item_paths_batches, sweep_batches)
from spark_udfs.partitioning import largest_divisor, task_of

JOB = "mstep"


def _log(msg: str) -> None:
    print(f"[mstep] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class MStepOptions:
    """Plan knobs: item partitions, how rounds synchronise, the scheme switch, start seed, state storage.

    partitions None: the cluster's concurrent task slots (barrier), else defaultParallelism,
    but no more than one per `min_items_per_partition` scored items: each partition's
    extrapolated copy of the size table is an estimate, noisy where paths hold a few items
    (ML-100K on 2 partitions kept moving a quarter of its items every sweep, in one it
    settles), and a sweep of 50,000 items takes a few milliseconds, so splitting less buys nothing.
    sync: "auto" (barrier when partitions <= task slots, else jobs), "barrier" (an error if
    the partitions do not fit), "jobs" (module doc). worker_cache False: every task
    rebuilds its candidates from the path_scores files (the cache-miss path; slow, for
    tests). one_stage (barrier runs): the state build, the rounds and the item_paths rows in
    ONE barrier stage (spark_udfs.mstep_onestage); False: a build job, a barrier stage and a
    writing job, the state checkpointed between them (the jobs-mode layout; for tests). driver_merge (jobs mode): partitions' count vectors summed on the driver
    directly; more partitions are summed by a Spark tree reduction first.
    """

    partitions: int | None = None
    sync: str = "auto"
    extrapolate: bool = True          # False: plain copies (cross-partition Jacobi; kept for comparison)
    alpha0: float | None = None       # where the alpha search starts (the previous EM round's alpha)
    seed: int = 0                     # random balanced start of items without starting paths
    storage: str = "MEMORY_AND_DISK"  # StorageLevel name of each round's checkpointed state
    worker_cache: bool = True
    driver_merge: int = 32
    min_items_per_partition: int = 50_000
    read_buckets: bool = True         # False: always shuffle path_scores (the general path, for tests)
    one_stage: bool = True            # barrier runs: build, rounds and item_paths rows in one stage


@dataclass
class MStepState:
    """The checkpointed state (one row per item partition, STATE_DDL) and the run's task context."""

    df: DataFrame
    ctx: MStepContext
    partitions: int
    barrier: bool = False             # run the rounds in one barrier stage (plan_partitions)
    extra: dict = field(default_factory=dict)


SYNC_MODES = ("auto", "barrier", "jobs")


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


def _checkpoint(df: DataFrame, storage: str) -> DataFrame:
    # lazy: the next job (the statistics' collect) computes, stores and checkpoints it; an eager
    # checkpoint would cost a job of its own before that one
    return df.localCheckpoint(eager=False, storageLevel=getattr(StorageLevel, storage))


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
    return MStepState(_checkpoint(state, opts.storage), src.ctx, src.partitions, src.barrier)


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def _stats_of(counts: bytes, loglik: float, skipped: int, moved: int, cpu: float, cache: int, traffic: bytes) -> tuple:
    return (np.frombuffer(counts, dtype=np.int32).astype(np.int64), loglik, skipped, moved, cpu,
            np.bincount([cache], minlength=3)[:3] if cache >= 0 else np.zeros(3, np.int64),
            np.frombuffer(traffic, dtype=np.float64) if traffic else 0.0)


def collect_stats(state: MStepState | DataFrame, num_paths: int,
                  driver_merge: int = 32) -> tuple[np.ndarray, float, int, int, float, np.ndarray, np.ndarray]:
    """Sum the partitions' statistics of a state (or of any frame of state rows).

    -> (sizes [num_paths] int64, loglik, skipped, moved, task cpu, cache [3]: partitions whose
    candidates were rebuilt from path_scores / mapped from the machine's files / in the worker,
    path traffic [num_paths] float64).
    """
    zero = (np.zeros(num_paths, dtype=np.int64), 0.0, 0, 0, 0.0, np.zeros(3, np.int64), np.zeros(num_paths))
    frame = state.df if isinstance(state, MStepState) else state
    parts = state.partitions if isinstance(state, MStepState) else frame.rdd.getNumPartitions()
    df = frame.select(*STATS_COLUMNS)
    if parts <= driver_merge:
        t = df.toArrow()                                    # <= driver_merge rows
        tot = zero
        cols = [t.column(c).to_pylist() for c in STATS_COLUMNS]
        for row in zip(*cols):
            tot = _add(tot, _stats_of(*row))
        return tot
    depth = max(2, int(np.ceil(np.log(parts) / np.log(max(driver_merge, 2)))))
    got = df.rdd.map(lambda r: _stats_of(*r)).treeReduce(_add, depth=depth) if parts else zero
    return got


def round_stats(state: MStepState, cfg: DRConfig, r: int, seconds: float,
                driver_merge: int = 32) -> tuple[RoundStats, np.ndarray]:
    """Objective / largest path / non-empty paths / moved of a state, and its size table [num_paths] int64."""
    return _round_stats(collect_stats(state, cfg.model.num_paths, driver_merge), state, cfg, r, seconds)


def _round_stats(sums: tuple, state: MStepState, cfg: DRConfig, r: int, seconds: float,
                 alpha: float = 0.0) -> tuple[RoundStats, np.ndarray]:
    sizes, loglik, skipped, moved, cpu, cache, traffic = sums
    state.extra["cache"] = cache.tolist()
    state.extra["traffic_total"] = float(np.sum(traffic))
    st = RoundStats.from_sums(r, sizes, loglik, skipped, moved, alpha, cfg.mstep.penalty_power, seconds,
                              cpu, traffic=traffic if np.ndim(traffic) else None)
    return st, sizes


def run_rounds(spark: SparkSession, state: MStepState, cfg: DRConfig, opts: MStepOptions = MStepOptions(),
               log: Callable[[str], None] = _log, sums: tuple | None = None) -> tuple[MStepState, list[RoundStats]]:
    """cfg.mstep.rounds sweeps from a state -> (final state, stats with round 0 = the start).

    With mstep.alpha "auto", alpha is searched first (dr_model.calibrate.AlphaSearch, from
    opts.alpha0 or calibrate.initial_alpha) for the traffic-weighted path size
    search.target_path_size of the scored items; state.extra["alpha_trials"] lists the trials.
    RoundStats.seconds: wall time of a round, the exchange included (barrier), or of the
    round's job (jobs; the driver's sum of the statistics, a few ms, excluded and logged).
    sums: the state's collect_stats when the caller has them.
    """
    sums = sums or collect_stats(state, cfg.model.num_paths, opts.driver_merge)
    V, alpha0, target = start_plan(cfg, opts.alpha0)(sums[0], float(np.sum(sums[6])))
    st, sizes = _round_stats(sums, state, cfg, 0, 0.0, alpha0)
    _log_start(log, st, V, state.partitions, "in one barrier stage" if state.barrier else "one job each", alpha0, target)
    rounds = _barrier_rounds if state.barrier else _job_rounds
    state.extra["target_path_size"] = target
    state, more = rounds(spark, state, cfg, opts, sizes, V, alpha0, target, log)
    return state, [st] + more


def start_plan(cfg: DRConfig, alpha0: float | None = None) -> Callable[[np.ndarray, float], tuple[int, float, float | None]]:
    """(global path sizes [num_paths], total path traffic) -> (scored items, starting alpha, target path size or
    None); the same on the driver and in every barrier task (mstep_onestage)."""
    J, mc, k = cfg.model.J, cfg.mstep, cfg.eval.k
    search = cfg.search

    def plan(sizes: np.ndarray, traffic_total: float) -> tuple[int, float, float | None]:
        V = int(sizes.sum()) // J                             # scored items (each holds J paths)
        target = search.target_path_size(V, k) if mc.auto_alpha else None
        if target is None:
            return V, fixed_alpha(mc), None
        return V, alpha0 or initial_alpha(traffic_total / max(V, 1), target, mc.penalty_power), target
    return plan


def _log_start(log: Callable[[str], None], st: RoundStats, V: int, partitions: int, how: str, alpha0: float,
               target: float | None) -> None:
    log(f"round 0: objective {st.objective:.4f}, path size {st.path_size:.1f}, largest path {st.max_path_size}, "
        f"non-empty paths {st.nonempty_paths}, {V} scored items ({st.skipped_items} without score on their paths); "
        f"{partitions} partitions, rounds {how}; "
        + (f"alpha {alpha0:.4g}" if target is None else f"alpha searched from {alpha0:.4g} for path size {target:.1f}"))


def _log_rounds(log: Callable[[str], None], h: dict, stats: list[RoundStats]) -> None:
    if h["trials"]:
        log(f"alpha {stats[-1].alpha:.4g} after {len(h['trials'])} trials: "
            + ", ".join(f"{t:.3g} -> size {z:.1f}" for t, z in h["trials"]))
    for st in stats:
        log(f"round {st.round}: objective {st.objective:.4f}, path size {st.path_size:.1f}, largest path "
            f"{st.max_path_size}, non-empty paths {st.nonempty_paths}, items moved {st.items_moved} "
            f"[{st.seconds:.2f}s with the exchange, task cpu {st.cpu_seconds:.2f}s]")


def _job_rounds(spark: SparkSession, state: MStepState, cfg: DRConfig, opts: MStepOptions, sizes: np.ndarray,
                V: int, alpha: float, target: float | None,
                log: Callable[[str], None]) -> tuple[MStepState, list[RoundStats]]:
    """One Spark job per round: the pass (sweep + the partitions' statistics) is marked for a
    local checkpoint, and collecting its statistics columns computes, stores and checkpoints it.
    An alpha search runs one job per trial, reading only the trial's statistics."""
    ctx, stats = state.ctx, []
    if target is not None:
        search = AlphaSearch(alpha, target)
        bc = spark.sparkContext.broadcast(sizes)
        while (a := search.propose()) is not None:
            trial = state.df.select(*INPUT_COLUMNS).mapInArrow(
                lambda it, a=a: sweep_batches(it, bc, ctx, V, a), STATE_DDL)
            t_sizes, *_, t_traffic = collect_stats(trial, cfg.model.num_paths, opts.driver_merge)
            search.observe(a, traffic_size(t_traffic, t_sizes))
        bc.destroy()
        alpha = search.result
        state.extra["alpha_trials"] = search.trials
        log(f"alpha {alpha:.4g} after {len(search.trials)} trials: "
            + ", ".join(f"{t:.3g} -> size {z:.1f}" for t, z in search.trials))
    for r in range(1, cfg.mstep.rounds + 1):
        t0 = time.perf_counter()
        bc = spark.sparkContext.broadcast(sizes)              # the round's size table, once per executor
        new = state.df.select(*INPUT_COLUMNS).mapInArrow(lambda it, bc=bc: sweep_batches(it, bc, ctx, V, alpha),
                                                         STATE_DDL)
        # cuts the lineage (plans stay one round long); materialised by the statistics job below
        new = new.localCheckpoint(eager=False, storageLevel=getattr(StorageLevel, opts.storage))
        old, state = state, MStepState(new, ctx, state.partitions, state.barrier)
        sums = collect_stats(state, cfg.model.num_paths, opts.driver_merge)
        secs = time.perf_counter() - t0
        st, sizes = _round_stats(sums, state, cfg, r, secs, alpha)
        old.df.unpersist()
        bc.destroy()
        stats.append(st)
        log(f"round {r}: objective {st.objective:.4f}, path size {st.path_size:.1f}, largest path "
            f"{st.max_path_size}, non-empty paths {st.nonempty_paths}, items moved {st.items_moved} [{secs:.2f}s, with statistics "
            f"{time.perf_counter() - t0:.2f}s, task cpu {st.cpu_seconds:.2f}s; candidates of the partitions: "
            f"{_cache_msg(state.extra['cache'])}]")
    return state, stats


def _barrier_rounds(spark: SparkSession, state: MStepState, cfg: DRConfig, opts: MStepOptions, sizes: np.ndarray,
                    V: int, alpha: float, target: float | None,
                    log: Callable[[str], None]) -> tuple[MStepState, list[RoundStats]]:
    """All rounds (and the alpha search) in one barrier stage (mstep_udf.barrier_batches); its
    statistics come back in `history`."""
    ctx, rounds = state.ctx, cfg.mstep.rounds
    if rounds == 0:
        return state, []
    t0 = time.perf_counter()
    bc = spark.sparkContext.broadcast(sizes)                  # the starting table; the tasks keep it up to date
    new = state.df.select(*INPUT_COLUMNS).mapInArrow(
        lambda it: barrier_batches(it, bc, ctx, V, rounds, alpha, target), STATE_DDL, barrier=True)
    new = _checkpoint(new, opts.storage)
    got = new.select("history", "cache").toArrow()            # <= task slots rows
    secs = time.perf_counter() - t0
    bc.destroy()
    state.df.unpersist()
    state = MStepState(new, ctx, state.partitions, True)
    hist = [h for h in got.column("history").to_pylist() if h]
    h = json.loads(hist[0]) if hist else {"trials": []}
    if not hist:                                              # no partition holds an item: nothing moves
        st0 = RoundStats.from_sums(0, sizes, 0.0, 0, 0, alpha, cfg.mstep.penalty_power)
        stats = [replace(st0, round=r) for r in range(1, rounds + 1)]
    else:
        stats = [RoundStats(**d) for d in h["rounds"]]
        state.extra["alpha_trials"] = [tuple(t) for t in h["trials"]]
    state.extra["cache"] = np.bincount([c for c in got.column("cache").to_pylist() if c >= 0],
                                       minlength=3)[:3].tolist()
    _log_rounds(log, h, stats)
    log(f"{rounds} rounds in one barrier stage over {state.partitions} partitions: {secs:.2f}s with stage start and "
        f"checkpoint; candidates of the partitions: {_cache_msg(state.extra['cache'])}")
    return state, stats


def _cache_msg(c: list[int]) -> str:
    return f"{c[2]} in worker memory, {c[1]} mapped from local files, {c[0]} rebuilt from path_scores"


def distributed_mstep(spark: SparkSession, warehouse: Warehouse, cfg: DRConfig, path_scores_version: int | None,
                      init_item_paths_version: int | None, run_id: str, round: int | None = None,
                      opts: MStepOptions = MStepOptions(),
                      log: Callable[[str], None] = _log) -> tuple[CommitResult, list[RoundStats]]:
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
    _log_start(log, start, h["items"], src.partitions, "in the same barrier stage", start.alpha, h["target"])
    _log_rounds(log, h, stats)
    log(f"{rounds} rounds in one barrier stage over {src.partitions} partitions: "
        f"{sum(st.seconds for st in stats):.2f}s in the tasks; the stage (start, state build, rounds, item_paths "
        f"files) {secs:.2f}s")
    return staged, [start] + stats, h["target"]


__all__ = ["MStepOptions", "MStepState", "StateSource", "SYNC_MODES", "state_source", "start_plan", "task_slots", "plan_partitions", "initial_state", "collect_stats", "round_stats", "run_rounds",
           "distributed_mstep", "JOB"]
