"""`dr bench estep-scale`: the E-step on 2 Ray workers with the same samples at 10^4, 10^6 and 10^7 items.

Only the catalog grows: every size trains the default model (sampled softmax with sparse item
tables at every size, `train.full_softmax_max_items` 0, so the model is the same one; item tables
at the default row budget `model.item_rows`) on the same number of synthetic samples, whose
history and target items are Zipf(1) draws over the catalog, against random paths for every item
(item_paths holds all V items: the workers read it and build the V-sized proposal). Printed per
size (lists aligned with `items`): `samples_per_s_per_core` (steady state: the first epoch is
warm-up; 2 workers x 1 thread = 2 cores), `peak_worker_rss_mb` (the largest peak resident set
of the workers), `sync_bytes_per_step` (what each worker publishes per step, mean: the dense
layers, each mean-pool encoder's (history, pooled gradient) per sample and the reranker table's
touched rows, which grow with the distinct items a batch holds, up to
`sync_capacity_bytes_per_step`, the bound the batch shape sets). Targets (issue #11):
10^7 keeps >= 0.7 x the 10^4 throughput, <= 3,000 MB per worker, <= 1.2 x the 10^4 bytes per step.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from dr_model.config import DRConfig
from dr_model.schedule import Phase
from jobs.tables import CommitMeta, Warehouse, list_array

SIZES = (10_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 1_000_000)
SAMPLES, QUICK_SAMPLES = 40_000, 8_000
EPOCHS = 3
CHUNK = 1_000_000


def _zipf(rng: np.random.Generator, V: int, shape: tuple[int, ...]) -> np.ndarray:
    """Zipf(1) item ids over 0..V-1 (id 0 the most frequent): log-uniform ranks."""
    return np.minimum(np.exp(rng.random(shape) * np.log(V + 1)).astype(np.int64) - 1, V - 1)


def write_inputs(wh: Warehouse, V: int, n: int, cfg: DRConfig) -> tuple[int, int]:
    """samples_train (n samples over V items) and random item_paths for all V items -> (samples v, item_paths v)."""
    rng = np.random.default_rng(0)
    L, W, J = cfg.model.seq_len, cfg.train.rerank_targets, cfg.model.J
    hist, nxt = _zipf(rng, V, (n, L)), _zipf(rng, V, (n, W))
    samples = pa.table({"user_id": np.arange(n, dtype=np.int64), "pos": np.ones(n, dtype=np.int32),
                        "hist": list_array(hist), "target": nxt[:, 0], "next": list_array(nxt)})
    meta = CommitMeta(job="bench-estep-scale", run_id=f"v{V}", config_hash=cfg.hash())
    sv = wh.write_arrow("samples_train", samples, meta, mode="overwrite").version

    def chunks():
        for lo in range(0, V, CHUNK):
            m = min(CHUNK, V - lo)
            yield pa.table({"item_id": np.repeat(np.arange(lo, lo + m, dtype=np.int64), J),
                            "slot": np.tile(np.arange(J, dtype=np.int32), m),
                            "path": rng.integers(0, cfg.model.num_paths, m * J),
                            "score": pa.nulls(m * J, pa.float64())})

    pv = wh.write_arrow("item_paths", chunks(), meta, mode="overwrite").version
    return sv, pv


def run(quick: bool = False) -> dict:
    import ray

    from ray_trainers.config import RayConfig, ensure_ray
    from ray_trainers.estep import run_estep

    cfg = DRConfig.from_dict({"train": {"full_softmax_max_items": 0, "seed": 0},
                              "split": {"rating_threshold": 0.0, "test_users": 0, "valid_users": 0}})
    sizes, n = (QUICK_SIZES, QUICK_SAMPLES) if quick else (SIZES, SAMPLES)
    phases = [Phase("joint", EPOCHS, True, True, cfg.train.seed)]
    started_here = not ray.is_initialized()
    # 4 logical CPUs on 2 cores: 2 workers x 1 CPU and Ray Data's read tasks all get scheduled.
    ensure_ray(RayConfig(num_cpus=4, object_store_memory=500 * 2 ** 20))
    rc = RayConfig(num_workers=2, cpus_per_worker=1.0, torch_threads=1, checkpoint_every_epoch=False)
    rate, rss, sync, cap, setup, wall = [], [], [], [], [], []
    for V in sizes:
        with tempfile.TemporaryDirectory(prefix="dr-bench-estep-scale-") as tmp:
            wh = Warehouse(os.path.join(tmp, "warehouse"))
            t0 = time.perf_counter()
            sv, pv = write_inputs(wh, V, n, cfg)
            setup.append(round(time.perf_counter() - t0, 1))
            t0 = time.perf_counter()
            res = run_estep(wh, f"scale-{V}", 0, cfg, rc, sv, pv, phases=phases,
                            log=lambda m: print(m, file=sys.stderr))
            wall.append(round(time.perf_counter() - t0, 1))
        steady = res.losses[1:]
        rate.append(round(sum(r["samples"] for r in steady) / sum(r["seconds"] for r in steady) / 2, 1))
        rss.append(round(max(r["peak_worker_rss_mb"] for r in res.losses), 1))
        sync.append(int(sum(r["sync_bytes_per_step"] for r in steady) / len(steady)))
        cap.append(int(res.losses[-1]["sync_capacity_bytes"]))
        print(f"[bench] {V} items: {rate[-1]} samples/s/core, peak worker RSS {rss[-1]} MB, "
              f"{sync[-1]} bytes per step and worker", file=sys.stderr)
    if started_here:
        ray.shutdown()
    tput = rate[-1] / rate[0]
    sync_ratio = sync[-1] / sync[0]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "items": list(sizes), "samples": n, "epochs": EPOCHS, "warmup_epochs_excluded": 1, "workers": 2,
        "model": f"K={cfg.model.K} D={cfg.model.D} J={cfg.model.J} encoder={cfg.model.encoder} "
                 f"batch={cfg.train.batch_size} negatives={cfg.train.negatives} item_rows={cfg.model.item_rows} "
                 f"(joint phase, sampled softmax)",
        "samples_per_s_per_core": rate,
        "peak_worker_rss_mb": rss,
        "sync_bytes_per_step": sync,
        "sync_capacity_bytes_per_step": cap,
        "input_write_s": setup,
        "estep_wall_s": wall,
        "throughput_ratio_largest_vs_smallest": round(tput, 3),
        "sync_bytes_ratio_largest_vs_smallest": round(sync_ratio, 3),
        "meets_target": bool(tput >= 0.7 and rss[-1] <= 3000 and sync_ratio <= 1.2),
        "cores": os.cpu_count(),
    }
