"""The whole distributed M-step in ONE barrier stage: state build, rounds, and the item_paths rows.

jobs.mstep runs this whenever its rounds run in a barrier stage. Each task builds its partition's
state in process (spark_udfs.mstep_state, the function `build` it is given); the tasks sum their
starting path counts, log-likelihood parts and path traffic by all-reduce (spark_udfs.exchange),
so every task derives the same start (`plan`: scored items, alpha, target path size) with no
statistics job and no broadcast; they run the rounds (mstep_udf.group_rounds) and turn the final
assignment into item_paths rows (mstep_udf.item_paths_of) for the writing task around this
(jobs.tables.Warehouse.stage_spark's transform). No state row passes through the JVM, and
there is no stage, job or checkpoint between the build, the rounds and the write.

The stage's statistics leave as one JSON note (a `str` among the yielded batches, from task 0):
the start and every round as RoundStats, the alpha trials, the scored items, the target size, and
task 0's build seconds.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from dr_model.mstep import RoundStats
from spark_udfs.mstep_cache import MStepContext
from spark_udfs.mstep_udf import _table, group_rounds, one_state_row

# (global path sizes [num_paths] int64, total path traffic) -> (scored items, alpha0, target size or None)
Plan = Callable[[np.ndarray, float], tuple[int, float, "float | None"]]


def _start_sums(tbl: pa.Table | None, num_paths: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A built state row's path counts [P] int64, traffic [P] and (loglik, skipped); zeros without a row."""
    if tbl is None or not tbl.num_rows:
        return np.zeros(num_paths, np.int64), np.zeros(num_paths), np.zeros(2)
    traffic = tbl.column("traffic")[0].as_py()
    return (np.frombuffer(tbl.column("counts")[0].as_py(), np.int32).astype(np.int64),
            np.frombuffer(traffic, np.float64).copy() if traffic else np.zeros(num_paths),
            np.array([tbl.column("loglik")[0].as_py(), tbl.column("skipped")[0].as_py()], np.float64))


def one_stage_batches(batches: Iterator[pa.RecordBatch], ctx: MStepContext,
                      build: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]], rounds: int,
                      plan: Plan, log_rounds: bool = True) -> Iterator[pa.RecordBatch | str]:
    """A partition's build input rows -> its item_paths rows after `rounds` rounds, then (task 0) the
    stage's statistics as a JSON str. Every task joins every exchange, empty partitions too."""
    from spark_udfs.exchange import TaskGroup

    group = TaskGroup.open()
    try:
        t0 = time.perf_counter()
        tbl = _table(build(batches))
        row = one_state_row(tbl, ctx, group.rank)
        build_s = time.perf_counter() - t0
        counts, traffic, ll_skipped = _start_sums(tbl, ctx.num_paths)
        sizes, W = group.sum(counts), group.sum(traffic)
        loglik, skipped = group.sum(ll_skipped)
        V, alpha0, target = plan(sizes, float(W.sum()))
        start = RoundStats.from_sums(0, sizes, loglik, int(skipped), 0, alpha0, ctx.power, traffic=W)
        final, history = group_rounds(group, row, sizes, ctx, V, rounds, alpha0, target if rounds else None,
                                      log_rounds)
        rank = group.rank
    finally:
        group.close()
    if final is not None:
        yield final.item_paths(ctx)
    if rank == 0:
        yield json.dumps({**history, "start": asdict(start), "items": V, "target": target,
                          "build_seconds": build_s})


__all__ = ["Plan", "one_stage_batches"]
