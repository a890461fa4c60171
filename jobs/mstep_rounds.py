"""The distributed M-step's rounds on a built Spark state: one Spark job per round, or all in one barrier stage.

jobs.mstep runs them when the M-step is not one barrier stage from build to write (more
partitions than task slots, dynamic allocation, `sync="jobs"`, `MStepOptions.one_stage=False`);
`start_plan` and the round logs are shared with that one-stage path.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Callable

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from dr_model.calibrate import AlphaSearch, initial_alpha, traffic_size
from dr_model.config import DRConfig
from dr_model.mstep import RoundStats, fixed_alpha
from jobs.mstep_options import MStepOptions, MStepState, checkpoint, log_mstep
from spark_udfs.mstep_udf import INPUT_COLUMNS, STATE_DDL, STATS_COLUMNS, barrier_batches, sweep_batches


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
               log: Callable[[str], None] = log_mstep, sums: tuple | None = None) -> tuple[MStepState, list[RoundStats]]:
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
    log_start(log, st, V, state.partitions, "in one barrier stage" if state.barrier else "one job each", alpha0, target)
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


def log_start(log: Callable[[str], None], st: RoundStats, V: int, partitions: int, how: str, alpha0: float,
               target: float | None) -> None:
    log(f"round 0: objective {st.objective:.4f}, path size {st.path_size:.1f}, largest path {st.max_path_size}, "
        f"non-empty paths {st.nonempty_paths}, {V} scored items ({st.skipped_items} without score on their paths); "
        f"{partitions} partitions, rounds {how}; "
        + (f"alpha {alpha0:.4g}" if target is None else f"alpha searched from {alpha0:.4g} for path size {target:.1f}"))


def log_rounds(log: Callable[[str], None], h: dict, stats: list[RoundStats]) -> None:
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
    new = checkpoint(new, opts.storage)
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
    log_rounds(log, h, stats)
    log(f"{rounds} rounds in one barrier stage over {state.partitions} partitions: {secs:.2f}s with stage start and "
        f"checkpoint; candidates of the partitions: {_cache_msg(state.extra['cache'])}")
    return state, stats


def _cache_msg(c: list[int]) -> str:
    return f"{c[2]} in worker memory, {c[1]} mapped from local files, {c[0]} rebuilt from path_scores"

__all__ = ["collect_stats", "round_stats", "run_rounds", "start_plan", "log_start", "log_rounds"]
