"""`dr bench spark-mstep`: distributed M-step item-rounds/s/core on local[1] and local[2] vs the in-process kernel.

Setting of `dr bench mstep` (K=100, D=3, S=32, J=3, alpha=3e-10, 3 rounds, block 4096) on
planted-cluster scores generated inside Spark, chunk by chunk (`chunk_scores`), so the
driver never holds them. Each configuration runs in its own subprocess (its own JVM).
The job runs its rounds in one barrier stage (jobs.mstep module doc). Spark throughput =
V * rounds / (sum of the rounds' wall times, measured in the tasks from the start of a
sweep to the end of the exchange of size changes and statistics) / cores, so the
partitions' statistics and the exchange are included (the in-process figure excludes
statistics). `*_with_startup` divides by the whole barrier stage instead (torch import in
the workers, the rendezvous, the checkpoint of the final state): a fixed cost per M-step,
not per round. The in-process figure is
`mstep_blocked` on the same chunks (per CPU second, single thread). Peak driver memory:
the Python driver's peak RSS; the JVM's peak RSS during the job is reported too (reset after the
setup), but in local mode the executors live in that JVM.
10^7 items: set DR_BENCH_10M=1 (slow on 2 cores; S there: S_LARGE).
"""
from __future__ import annotations

import json
import os
import re
import resource
import sys
import tempfile
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from jobs.benchmarks import run_module_json

K, D, S, J = 100, 3, 32, 3
# candidates per item above 10^6 items (DR_BENCH_S_LARGE; S=8 until the state build stopped
# shuffling path_scores: 3.2*10^8 shuffled rows needed ~13 GB of Arrow tables at 10^7)
S_LARGE = int(os.environ.get("DR_BENCH_S_LARGE", "32"))
ALPHA, ROUNDS = 3e-10, 3
CHUNK = 100_000
TARGET_FRACTION, TARGET_SCALING = 0.70, 1.6
TARGET_JOB = 300_000     # whole job on local[1], item-rounds/s/core (issue #14)


def s_for(items: int) -> int:
    """Candidates per item at this catalog size (S_LARGE above 10^6 items)."""
    return S if items <= 10 ** 6 else S_LARGE


def chunk_scores(chunk: int, items: int, num_paths: int) -> tuple[np.ndarray, ...]:
    """Chunk `chunk` of a synthetic s[v,c]: items [n], paths [n,S], scores [n,S], n_v [n] (same in and out of Spark)."""
    from jobs.benchmarks.mstep import synthetic_scores

    lo = chunk * CHUNK
    n = min(CHUNK, items - lo)
    ps = synthetic_scores(n, s_for(items), num_paths, seed=chunk)
    return ps.items + lo, ps.paths, ps.scores, ps.n_v


def _gen_bucket(batches: Iterator[pa.RecordBatch], items: int, num_paths: int, buckets: int) -> Iterator[pa.RecordBatch]:
    """Bucket b's path_scores rows (the items `repartition(buckets, item_id)` sends to b) in item order,
    as the scores job writes a bucket; every bucket's task generates every chunk and keeps its items."""
    from dr_model.scores import PathScores
    from spark_udfs.partitioning import spark_partition

    for b in batches:
        for bucket in b.column(0).to_numpy():
            for c in range(-(-items // CHUNK)):
                it, p, s, nv = chunk_scores(c, items, num_paths)
                mine = spark_partition(it, buckets) == bucket
                item, path, score, n_v = PathScores(it[mine], p[mine], s[mine], nv[mine]).to_long()
                yield pa.RecordBatch.from_arrays([pa.array(item), pa.array(path), pa.array(score), pa.array(n_v)],
                                                 names=["item_id", "path", "score", "n_v"])


def _cfg(items: int = 10 ** 6):  # noqa: ANN202
    from dr_model.config import DRConfig

    return DRConfig.from_dict({"model": {"K": K, "D": D, "J": J}, "search": {"score_paths": s_for(items)},
                               "mstep": {"alpha": ALPHA, "rounds": ROUNDS}})


def _jvm_pid(spark) -> int:  # noqa: ANN001
    return int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())


def _jvm_peak_mb(spark) -> float:  # noqa: ANN001
    with open(f"/proc/{_jvm_pid(spark)}/status") as fh:
        return next(int(x.split()[1]) for x in fh if x.startswith("VmHWM")) / 1024


def _reset_jvm_peak(spark) -> None:  # noqa: ANN001
    """Restart the JVM's peak RSS from its current RSS (Linux clear_refs 5), so it reports the job's peak,
    not the setup's (the generator's sort of the bucket grows the heap)."""
    try:
        with open(f"/proc/{_jvm_pid(spark)}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def worker(master: str, items: int) -> dict:
    """One Spark configuration (run in a subprocess): generate, commit path_scores, time the M-step."""
    from jobs.mstep import MStepOptions, distributed_mstep
    from jobs.spark import get_spark
    from jobs.tables import CommitMeta, Warehouse

    cores = int(master[len("local["):-1])
    cfg = _cfg(items)
    P = cfg.model.num_paths
    spark = get_spark(master, app="bench-spark-mstep", conf={"spark.sql.shuffle.partitions": str(cores),
                                                              "spark.driver.memory": "6g"})
    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(tmp)
        t0 = time.perf_counter()
        # written as the scores job writes it: task b writes hash bucket b of item_id (recorded), its items
        # in order (top_s_batches' lists), each item in one file (TableSpec.file_group); no shuffle or
        # sort, so the JVM's heap stays what the job needs
        gen = spark.range(cores, numPartitions=cores).mapInArrow(
            lambda it: _gen_bucket(it, items, P, cores), "item_id long, path long, score double, n_v double")
        v = wh.write_spark("path_scores", gen, CommitMeta("bench", "gen", extra={"item_buckets": cores})).version
        setup_s = time.perf_counter() - t0
        _reset_jvm_peak(spark)
        t0 = time.perf_counter()
        logs: list[str] = []

        def log(m: str) -> None:
            logs.append(m)
            print(m, file=sys.stderr, flush=True)

        _, stats = distributed_mstep(spark, wh, cfg, v, None, "bench", 0, MStepOptions(partitions=cores), log=log)
        job_s = time.perf_counter() - t0
        sweep_s = sum(s.seconds for s in stats[1:])
        text = "\n".join(logs)
        barrier = re.search(r"rounds in one barrier stage over \d+ partitions: ([0-9.]+)s", text)
        # barrier: a round's wall time is measured in the tasks and already includes the exchange of statistics
        with_stats = ([round(s.seconds, 3) for s in stats[1:]] if barrier else
                      [float(x) for x in re.findall(r"with statistics ([0-9.]+)s", text)])
        rounds_wall = float(barrier.group(1)) if barrier else sum(with_stats)
        built = re.search(r"partitions built from path_scores[^\[]*\[([0-9.]+)s\]", text)
        out = {"master": master, "cores": cores, "items": items, "setup_s": round(setup_s, 1),
               "job_wall_s": round(job_s, 1), "sweep_wall_s": round(sweep_s, 2),
               "state_build_s": float(built.group(1)) if built else None,
               # the whole job: state build from path_scores, rounds, item_paths commit
               "job_item_rounds_per_s_per_core": round(items * ROUNDS / job_s / cores, 1),
               "item_rounds_per_s_per_core": round(items * ROUNDS / sweep_s / cores, 1),
               "task_cpu_item_rounds_per_s": round(items * ROUNDS / max(sum(s.cpu_seconds for s in stats[1:]), 1e-9), 1),
               "objective": stats[-1].objective, "max_path_size": stats[-1].max_path_size,
               "rounds": [{"round": s.round, "objective": round(s.objective, 1), "max_path_size": s.max_path_size,
                           "nonempty_paths": s.nonempty_paths, "items_moved": s.items_moved,
                           "seconds": round(s.seconds, 2)} for s in stats],
               "sync": "barrier" if barrier else "jobs",
               # per round: wall with the statistics summed (the driver's sum, or the tasks' exchange)
               "round_wall_with_stats_s": with_stats,
               # all rounds, with the stage/job start-up and the checkpoint of the state
               "rounds_wall_s": round(rounds_wall, 2),
               "item_rounds_per_s_per_core_with_startup": round(items * ROUNDS / rounds_wall / cores, 1),
               "candidates_cache": re.findall(r"candidates of the partitions: ([^\]\n]+)", text),
               "peak_driver_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "peak_jvm_rss_mb": round(_jvm_peak_mb(spark), 1)}
    spark.stop()
    return out


def in_process(items: int) -> dict:
    """mstep_blocked on the same chunks (single thread, per CPU second)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dr_model.mstep import initial_assignment, mstep_blocked
    from dr_model.scores import PathScores

    cfg = _cfg(items)
    P = cfg.model.num_paths
    parts = [chunk_scores(c, items, P) for c in range(-(-items // CHUNK))]
    ps = PathScores(*(np.concatenate(x) for x in zip(*parts)))
    res = mstep_blocked(ps, initial_assignment(items, J, P, seed=1), P, cfg.mstep)
    cpu = sum(r.cpu_seconds for r in res.rounds)
    return {"items": items, "item_rounds_per_s_per_core": round(items * ROUNDS / cpu, 1),
            "objective": res.objective, "max_path_size": res.rounds[-1].max_path_size}


def _sub(args: list[str]) -> dict:
    return run_module_json(__name__, args)


def run(quick: bool = False) -> dict:
    """local[1] / local[2] at 10^6 items (10^5 quick; + 10^7 with DR_BENCH_10M=1) vs in-process; stable keys."""
    sizes = [10 ** 5] if quick else [10 ** 6] + ([10 ** 7] if os.environ.get("DR_BENCH_10M") == "1" else [])
    out: dict = {"date": time.strftime("%Y-%m-%d"), "K": K, "D": D, "S": S, "J": J, "alpha": ALPHA, "rounds": ROUNDS,
                 "items": sizes[0], "sizes": sizes}
    base = _sub(["--in-process", str(sizes[0])])
    out["in_process_item_rounds_per_s_per_core"] = base["item_rounds_per_s_per_core"]
    out["in_process_objective"] = base["objective"]
    out["in_process_max_path_size"] = base["max_path_size"]
    for V in sizes:
        runs = {m: _sub(["--worker", m, str(V)]) for m in ("local[1]", "local[2]")}
        sfx = "" if V == sizes[0] else f"_{V}"
        if sfx:
            ref = _sub(["--in-process", str(V)])
            out[f"S{sfx}"] = s_for(V)
            out[f"in_process_item_rounds_per_s_per_core{sfx}"] = ref["item_rounds_per_s_per_core"]
            out[f"in_process_objective{sfx}"] = ref["objective"]
        for m, key in (("local[1]", "local1"), ("local[2]", "local2")):
            r = runs[m]
            out[f"{key}_item_rounds_per_s_per_core{sfx}"] = r["item_rounds_per_s_per_core"]
            out[f"{key}_peak_driver_rss_mb{sfx}"] = r["peak_driver_rss_mb"]
            out[f"{key}_peak_jvm_rss_mb{sfx}"] = r["peak_jvm_rss_mb"]
            out[f"{key}_objective{sfx}"] = r["objective"]
            out[f"{key}_max_path_size{sfx}"] = r["max_path_size"]
            out[f"{key}_rounds{sfx}"] = r["rounds"]
            out[f"{key}_job_wall_s{sfx}"] = r["job_wall_s"]
            out[f"{key}_state_build_s{sfx}"] = r["state_build_s"]
            out[f"{key}_job_item_rounds_per_s_per_core{sfx}"] = r["job_item_rounds_per_s_per_core"]
            out[f"{key}_round_wall_with_stats_s{sfx}"] = r["round_wall_with_stats_s"]
            out[f"{key}_rounds_wall_s{sfx}"] = r["rounds_wall_s"]
            out[f"{key}_item_rounds_per_s_per_core_with_startup{sfx}"] = r["item_rounds_per_s_per_core_with_startup"]
            out[f"{key}_sync{sfx}"] = r["sync"]
            out[f"{key}_candidates_cache{sfx}"] = r["candidates_cache"]
        out[f"scaling_local1_to_local2{sfx}"] = round(runs["local[2]"]["item_rounds_per_s_per_core"] * 2
                                                     / runs["local[1]"]["item_rounds_per_s_per_core"], 3)
        if sfx:
            out[f"fraction_of_in_process{sfx}"] = round(runs["local[1]"]["item_rounds_per_s_per_core"]
                                                        / out[f"in_process_item_rounds_per_s_per_core{sfx}"], 3)
        out[f"peak_driver_rss_mb_{V}"] = max(runs[m]["peak_driver_rss_mb"] for m in runs)
    out["fraction_of_in_process"] = round(out["local1_item_rounds_per_s_per_core"]
                                          / out["in_process_item_rounds_per_s_per_core"], 3)
    out["objective_rel_gap_local2_vs_in_process"] = (out["in_process_objective"] - out["local2_objective"]) / abs(out["in_process_objective"])
    out["meets_job_target"] = bool(out["local1_job_item_rounds_per_s_per_core"] >= TARGET_JOB)
    out["meets_targets"] = bool(out["fraction_of_in_process"] >= TARGET_FRACTION
                                and out["scaling_local1_to_local2"] >= TARGET_SCALING)
    return out


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1:2] == ["--in-process"]:
        print(json.dumps(in_process(int(sys.argv[2]))))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
