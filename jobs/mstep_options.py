"""The distributed M-step's plan knobs, its checkpointed Spark state, and its log (jobs.mstep, jobs.mstep_rounds)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from pyspark import StorageLevel
from pyspark.sql import DataFrame

from spark_udfs.mstep_udf import MStepContext


def log_mstep(msg: str) -> None:
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
    writing job, the state checkpointed between them (the jobs-mode layout; for tests).
    driver_merge (jobs mode): partitions' count vectors summed on the driver directly; more
    partitions are summed by a Spark tree reduction first.
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

def checkpoint(df: DataFrame, storage: str) -> DataFrame:
    # lazy: the next job (the statistics' collect) computes, stores and checkpoints it; an eager
    # checkpoint would cost a job of its own before that one
    return df.localCheckpoint(eager=False, storageLevel=getattr(StorageLevel, storage))

__all__ = ["MStepOptions", "MStepState", "SYNC_MODES", "checkpoint", "log_mstep"]
