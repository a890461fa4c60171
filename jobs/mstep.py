"""Distributed M-step job: penalized coordinate descent over items partitioned on Spark -> an `item_paths` version.

Per round (DESIGN.md §2 "Distributed form"): the path-size table |c| is aggregated over
all items (a sparse per-partition count, summed by Spark) and broadcast; every partition
re-assigns its items with dr_model's kernel against its copy of the table
(spark_udfs.mstep_udf: extrapolated local deltas, the convergence scheme); the new state
is checkpointed (`localCheckpoint`) so the plan does not grow with the rounds. The driver
only ever holds the size table (num_paths ints) and a few scalars per round. One commit
at the end: a failed run leaves `item_paths` at its previous version.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dr_model.config import DRConfig
from dr_model.mstep import RoundStats, penalty
from jobs.tables import CommitMeta, CommitResult, Warehouse
from spark_udfs.mstep_udf import (ITEM_PATHS_DDL, STATE_DDL, STATS_DDL, build_state, item_paths_batches,
                                  stats_batches, sweep_batches)

JOB = "mstep"


def _log(msg: str) -> None:
    print(f"[mstep] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class MStepOptions:
    """Plan knobs: item partitions (None: defaultParallelism), the scheme switch, start seed, state storage."""

    partitions: int | None = None
    extrapolate: bool = True          # False: plain copies (cross-partition Jacobi; kept for comparison)
    seed: int = 0                     # random balanced start of items without starting paths
    storage: str = "MEMORY_AND_DISK"  # StorageLevel name of each round's checkpointed state


def _checkpoint(df: DataFrame, storage: str) -> DataFrame:
    return df.localCheckpoint(eager=True, storageLevel=getattr(StorageLevel, storage))


def initial_state(spark: SparkSession, warehouse: Warehouse, cfg: DRConfig, path_scores_version: int | None,
                  init_item_paths_version: int | None, opts: MStepOptions = MStepOptions()) -> DataFrame:
    """One checkpointed row per item (STATE_DDL), hash-partitioned by item_id."""
    S, J, P = cfg.search.score_paths, cfg.model.J, cfg.model.num_paths
    n = opts.partitions or spark.sparkContext.defaultParallelism
    rows = (warehouse.read_spark(spark, "path_scores", path_scores_version)
            .select("item_id", "path", "score", "n_v", F.lit(-1).alias("slot"), F.lit(0).alias("src")))
    if init_item_paths_version is not None:
        ip = warehouse.read_spark(spark, "item_paths", init_item_paths_version)
        rows = rows.unionByName(ip.select("item_id", "path", F.lit(0.0).alias("score"), F.lit(0.0).alias("n_v"),
                                          F.col("slot").cast("int").alias("slot"), F.lit(1).alias("src")))
    seed = opts.seed
    state = rows.repartition(n, "item_id").mapInArrow(lambda it: build_state(it, S, J, P, seed), STATE_DDL)
    return _checkpoint(state, opts.storage)


def round_stats(state: DataFrame, cfg: DRConfig, r: int, seconds: float) -> tuple[RoundStats, np.ndarray]:
    """Objective / largest path / non-empty paths / moved of a state, and its size table [num_paths] int64."""
    S, J, P, power = cfg.search.score_paths, cfg.model.J, cfg.model.num_paths, cfg.mstep.penalty_power
    agg = (state.mapInArrow(lambda it: stats_batches(it, S, J, P, power), STATS_DDL)
           .groupBy("path").agg(F.sum("cnt").alias("cnt"), F.sum("loglik").alias("loglik"),
                                F.sum("skipped").alias("skipped"), F.sum("moved").alias("moved"),
                                F.sum("cpu").alias("cpu"))
           .toArrow())                                       # <= num_paths + 1 rows: the only driver data
    path = agg.column("path").to_numpy()
    sizes = np.zeros(P, dtype=np.int64)
    sizes[path[path >= 0]] = agg.column("cnt").to_numpy()[path >= 0]
    part = agg.filter(agg.column("path").to_numpy() == -1).to_pylist()
    tot = part[0] if part else {"loglik": 0.0, "skipped": 0, "moved": 0, "cpu": 0.0}
    pen = cfg.mstep.alpha * float(penalty(sizes[sizes > 0], power).sum())
    st = RoundStats(round=r, objective=float(tot["loglik"]) - pen, max_path_size=int(sizes.max(initial=0)),
                    nonempty_paths=int((sizes > 0).sum()), items_moved=int(tot["moved"]),
                    skipped_items=int(tot["skipped"]), seconds=seconds, cpu_seconds=float(tot["cpu"]))
    return st, sizes


def run_rounds(spark: SparkSession, state: DataFrame, cfg: DRConfig, opts: MStepOptions = MStepOptions(),
               log: Callable[[str], None] = _log) -> tuple[DataFrame, list[RoundStats]]:
    """cfg.mstep.rounds sweeps from a state -> (final state, stats with round 0 = the start)."""
    S, J, mc = cfg.search.score_paths, cfg.model.J, cfg.mstep
    st, sizes = round_stats(state, cfg, 0, 0.0)
    stats = [st]
    V = int(sizes.sum()) // J                                # scored items (each holds J paths)
    log(f"round 0: objective {st.objective:.4f}, largest path {st.max_path_size}, non-empty paths "
        f"{st.nonempty_paths}, {V} scored items ({st.skipped_items} without score on their paths)")
    ext = opts.extrapolate
    for r in range(1, mc.rounds + 1):
        t0 = time.perf_counter()
        bc = spark.sparkContext.broadcast(sizes)              # the round's size table, once per executor
        new = state.mapInArrow(lambda it, bc=bc: sweep_batches(it, bc, S, J, mc.alpha, mc.penalty_power,
                                                               mc.block_size, V, ext), STATE_DDL)
        new = _checkpoint(new, opts.storage)                  # cuts the lineage: plans stay one round long
        secs = time.perf_counter() - t0
        bc.destroy()
        state.unpersist()
        state = new
        st, sizes = round_stats(state, cfg, r, secs)
        stats.append(st)
        log(f"round {r}: objective {st.objective:.4f}, largest path {st.max_path_size}, non-empty paths "
            f"{st.nonempty_paths}, items moved {st.items_moved} [{secs:.1f}s, task cpu {st.cpu_seconds:.1f}s]")
    return state, stats


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
    S, J = cfg.search.score_paths, cfg.model.J
    log(f"path_scores@{path_scores_version}, start item_paths@{init_item_paths_version}, K={cfg.model.K} "
        f"D={cfg.model.D} J={J} S={S}, alpha={cfg.mstep.alpha}, {cfg.mstep.rounds} rounds, "
        f"{'extrapolated local deltas' if opts.extrapolate else 'plain local copies'}")
    state = initial_state(spark, warehouse, cfg, path_scores_version, init_item_paths_version, opts)
    state, stats = run_rounds(spark, state, cfg, opts, log)
    out = state.mapInArrow(lambda it: item_paths_batches(it, S, J), ITEM_PATHS_DDL)
    meta = CommitMeta(JOB, run_id, round, cfg.hash(), extra={
        "path_scores_version": path_scores_version, "init_item_paths_version": init_item_paths_version,
        "scheme": "extrapolated-local-deltas" if opts.extrapolate else "plain", "objective": stats[-1].objective,
        "max_path_size": stats[-1].max_path_size})
    res = warehouse.write_spark("item_paths", out, meta, mode="overwrite")
    state.unpersist()
    log(f"committed item_paths v{res.version}: {res.rows} rows [{time.perf_counter() - t0:.1f}s]")
    return res, stats


__all__ = ["MStepOptions", "initial_state", "round_stats", "run_rounds", "distributed_mstep", "JOB"]
