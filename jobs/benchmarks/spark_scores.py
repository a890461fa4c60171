"""`dr bench spark-scores`: scores job pairs/s/core on local[1] and local[2] vs in-process `pair_scores`.

A randomly initialised structure model (K=50, D=3, the paper's MovieLens shape; beam
S=10; a 10^4-item encoder vocabulary) scores 10^6 synthetic training pairs whose targets
range over `items` catalog items (10^6; 10^7 with DR_BENCH_10M=1), generated inside
Spark. Spark throughput = pairs / job wall seconds (beam, aggregation, top-S, Delta
commit) / cores; in-process = `trainer.pair_scores` per CPU second on one thread.
Each configuration runs in its own subprocess (own JVM).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from jobs.benchmarks import run_module_json

L, VOCAB, CHUNK = 20, 10_000, 50_000
# A night scores 10^7+ pairs; at 2*10^5 (~5 s of work) the job's fixed costs (first read of
# the table, model load, commit: ~1.5 s) would dominate the per-pair figure.
PAIRS = 1_000_000
TARGET_FRACTION = 0.70


def _cfg():  # noqa: ANN202
    from dr_model.config import DRConfig

    return DRConfig.from_dict({"model": {"K": 50, "D": 3, "J": 3, "seq_len": L},
                               "search": {"score_paths": 10, "batch_size": 1024}})


def chunk_samples(chunk: int, pairs: int, items: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk of synthetic pairs: hist [n, L] raw ids (vocabulary 0..VOCAB-1), target [n] in 0..items-1."""
    rng = np.random.default_rng(chunk)
    n = min(CHUNK, pairs - chunk * CHUNK)
    return rng.integers(0, VOCAB, size=(n, L)), rng.integers(0, items, size=n)


def _gen(batches: Iterator[pa.RecordBatch], pairs: int, items: int) -> Iterator[pa.RecordBatch]:
    from jobs.tables import list_array
    for b in batches:
        for c in b.column(0).to_numpy():
            hist, target = chunk_samples(int(c), pairs, items)
            n = len(target)
            yield pa.RecordBatch.from_arrays([
                pa.array(np.arange(n) + int(c) * CHUNK), pa.array(np.zeros(n, np.int32)),
                pa.ListArray.from_arrays(pa.array(np.arange(0, n * L + 1, L, dtype=np.int32)), pa.array(hist.ravel())),
                pa.array(target), list_array(target[:, None])], names=["user_id", "pos", "hist", "target", "next"])


def _model():  # noqa: ANN202
    import torch

    from dr_model.model import DRModel
    from dr_model.trainer import Vocab

    torch.manual_seed(0)
    return DRModel(_cfg().model, VOCAB).eval(), Vocab(np.arange(VOCAB, dtype=np.int64))


def worker(master: str, pairs: int, items: int) -> dict:
    """One Spark configuration in a subprocess: generate samples_train, time the scores job."""
    from jobs.benchmarks.spark_mstep import _jvm_peak_mb
    from jobs.scores import compute_path_scores
    from jobs.spark import get_spark
    from jobs.tables import CommitMeta, Warehouse
    from spark_udfs.model_source import ModelSource

    cores = int(master[len("local["):-1])
    spark = get_spark(master, app="bench-spark-scores", conf={"spark.sql.shuffle.partitions": str(2 * cores)})
    model, vocab = _model()
    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(tmp)
        n = -(-pairs // CHUNK)
        gen = spark.range(n, numPartitions=min(n, 4 * cores)).mapInArrow(
            lambda it: _gen(it, pairs, items), "user_id long, pos int, hist array<long>, target long, next array<long>")
        v = wh.write_spark("samples_train", gen, CommitMeta("bench", "gen")).version
        src = ModelSource.from_model(model, vocab, f"{tmp}/model")
        t0 = time.perf_counter()
        res = compute_path_scores(spark, wh, src, _cfg(), v, "bench", 0,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
        wall = time.perf_counter() - t0
    out = {"master": master, "cores": cores, "pairs": pairs, "items": items, "job_wall_s": round(wall, 2),
           "rows": res.rows, "pairs_per_s_per_core": round(pairs / wall / cores, 1),
           "peak_driver_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "peak_jvm_rss_mb": round(_jvm_peak_mb(spark), 1)}
    spark.stop()
    return out


def in_process(pairs: int, items: int) -> dict:
    """trainer.pair_scores on the same pairs, one torch thread, per CPU second."""
    import torch

    from dr_model.trainer import pair_scores

    torch.set_num_threads(1)
    model, vocab = _model()
    cfg = _cfg()
    parts = [chunk_samples(c, pairs, items) for c in range(-(-pairs // CHUNK))]
    hist, target = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    c0 = time.process_time()
    ps = pair_scores(model, vocab.seq(hist), target, cfg.search.score_paths, cfg.search.batch_size)
    cpu = time.process_time() - c0
    return {"pairs": pairs, "items_scored": len(ps), "pairs_per_s_per_core": round(pairs / cpu, 1)}


def _sub(args: list[str]) -> dict:
    return run_module_json(__name__, args)


def run(quick: bool = False) -> dict:
    """local[1] / local[2] vs in-process; 10^6 catalog items and 10^6 pairs (quick: 10^5 and 2*10^4)."""
    sizes = [10 ** 5] if quick else [10 ** 6] + ([10 ** 7] if os.environ.get("DR_BENCH_10M") == "1" else [])
    pairs = 20_000 if quick else PAIRS
    out: dict = {"date": time.strftime("%Y-%m-%d"), "K": 50, "D": 3, "S": 10, "batch_size": 1024,
                 "items": sizes[0], "pairs": pairs, "sizes": sizes}
    base = _sub(["--in-process", str(pairs), str(sizes[0])])
    out["in_process_pairs_per_s_per_core"] = base["pairs_per_s_per_core"]
    for V in sizes:
        sfx = "" if V == sizes[0] else f"_{V}"
        runs = {m: _sub(["--worker", m, str(pairs), str(V)]) for m in ("local[1]", "local[2]")}
        for m, key in (("local[1]", "local1"), ("local[2]", "local2")):
            out[f"{key}_pairs_per_s_per_core{sfx}"] = runs[m]["pairs_per_s_per_core"]
            out[f"{key}_job_wall_s{sfx}"] = runs[m]["job_wall_s"]
            out[f"{key}_peak_driver_rss_mb{sfx}"] = runs[m]["peak_driver_rss_mb"]
            out[f"{key}_peak_jvm_rss_mb{sfx}"] = runs[m]["peak_jvm_rss_mb"]
        out[f"scaling_local1_to_local2{sfx}"] = round(2 * runs["local[2]"]["pairs_per_s_per_core"]
                                                     / runs["local[1]"]["pairs_per_s_per_core"], 3)
        out[f"peak_driver_rss_mb_{V}"] = max(r["peak_driver_rss_mb"] for r in runs.values())
    out["fraction_of_in_process"] = round(out["local1_pairs_per_s_per_core"] / out["in_process_pairs_per_s_per_core"], 3)
    out["meets_targets"] = bool(out["fraction_of_in_process"] >= TARGET_FRACTION)
    return out


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif sys.argv[1:2] == ["--in-process"]:
        print(json.dumps(in_process(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
