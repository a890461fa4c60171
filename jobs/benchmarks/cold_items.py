"""`dr bench cold-items`: `dr backfill cold-items` at two catalog sizes, for its wall time and its peak memory.

Per size N (default 10^5 and 10^6 items; `--items N`: N / 10 and N; `--quick`: 10^3 and 10^4) a
catalog of N items in max(10, N / 1000) categories (5% without one) goes into a warehouse; every
tenth item is cold, the rest get J paths near their category's own paths and a model with random
weights (the default config) is registered as the train run (jobs.serving.record_trained_model: no
training, the job's cost does not depend on what the weights learned). Then `dr backfill
cold-items` runs on local[2] in a fresh process: wall time, the driver's peak RSS (Python), the
Python workers' and the JVM's (VmHWM), and how the cold items landed (share placed by category,
largest path before -> after). What DESIGN.md section 8 asks of the stage is that the driver's peak
does not grow with the catalog: `driver_rss_growth` is the large size's peak over the small one's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .candidates import _python_workers, _vm_hwm_mb

COLD_EVERY = 10             # every tenth catalog item has no paths
NO_CATEGORY = 0.05
ALPHA = 1e-6                # the run's "calibrated" alpha: a light penalty, so categories spread a little


def _log(msg: str) -> None:
    print(f"[bench cold-items] {msg}", file=sys.stderr, flush=True)


def build(items: int, warehouse: Path) -> dict:
    """The catalog, the assigned items' paths and a registered train run in `warehouse` -> its sizes."""
    import pandas as pd
    import torch

    from dr_model.config import DRConfig
    from dr_model.model import DRModel
    from jobs.serving import record_trained_model
    from jobs.spark import get_spark
    from jobs.tables import CommitMeta, Warehouse

    cfg = DRConfig()
    J, P = cfg.model.J, cfg.model.num_paths
    G = max(10, items // 1000)
    rng = np.random.default_rng(0)
    ids = np.arange(items, dtype=np.int64) * 7 + 3                   # raw ids need not be dense
    cat = rng.integers(0, G, items)
    names = np.array([f"cat-{g}" for g in range(G)], dtype=object)[cat]
    names[rng.random(items) < NO_CATEGORY] = None
    spark = get_spark("local[2]", app="bench-cold-items-setup", conf={"spark.sql.shuffle.partitions": "4"})
    wh = Warehouse(str(warehouse))
    wh.write_arrow("items", pd.DataFrame({"item_id": ids, "title": None, "category": names}),
                   CommitMeta("bench", "catalog"))
    assigned = np.arange(items) % COLD_EVERY != 0
    V = int(assigned.sum())
    # a category's items on J groups of 4 paths of their own (its base), as a trained model's would be
    base = (cat[assigned] * 7919) % P
    assign = (base[:, None] + np.arange(J) * (P // J) + rng.integers(0, 4, (V, J))) % P
    torch.manual_seed(0)
    model = DRModel(cfg.model, V)
    record_trained_model(spark, wh, "bench", model, ids[assigned], assign, cfg, metrics={"alpha": ALPHA})
    spark.stop()
    return {"items": items, "assigned": V, "cold": items - V, "categories": G}


def cold_job(warehouse: str) -> dict:
    """`dr backfill cold-items` on local[2] (run in a fresh process) -> wall time, counts and peak RSS."""
    from jobs.cold_items import run_cold_items
    from jobs.spark import get_spark
    from jobs.tables import Warehouse

    spark = get_spark("local[2]", app="bench-cold-items", conf={"spark.sql.shuffle.partitions": "4"})
    lines: list[str] = []
    t0 = time.perf_counter()
    res = run_cold_items(spark, Warehouse(warehouse), log=lambda m: (lines.append(m), _log(m)))
    wall = time.perf_counter() - t0
    workers, jvm = _python_workers(spark)
    largest = next((m.split("largest path ")[1] for m in lines if "largest path " in m), "")
    out = {"seconds": wall, "cold_items": res.cold_items, "by_category": res.by_category,
           "paths_used": res.paths_used, "largest_path": largest,
           "peak_driver_rss_mb": _vm_hwm_mb(os.getpid()),
           "peak_executor_rss_mb": max((_vm_hwm_mb(p) for p in workers), default=0.0),
           "peak_jvm_rss_mb": _vm_hwm_mb(jvm)}
    spark.stop()
    return out


def run(quick: bool = False, items: int | None = None) -> dict:
    import tempfile

    top = items or (10_000 if quick else 1_000_000)
    sizes = [top // 10, top]
    rows: list[dict] = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
            t0 = time.perf_counter()
            built = build(n, Path(tmp) / "wh")
            _log(f"{n} items: warehouse built in {time.perf_counter() - t0:.0f}s ({built})")
            got = subprocess.run([sys.executable, "-m", "jobs.benchmarks.cold_items", "--job", str(Path(tmp) / "wh")],
                                 check=True, capture_output=True, text=True)
            job = json.loads(got.stdout.strip().splitlines()[-1])
            _log(f"{n} items: {job}")
            rows.append({**built, **job})
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return {
        "date": time.strftime("%Y-%m-%d"), "cores": 2, "items": col("items"), "cold_items": col("cold_items"),
        "categories": col("categories"), "seconds": [round(s, 1) for s in col("seconds")],
        # the job reads every catalog item (the assigned ones' vectors), so the catalog is its unit of work
        "catalog_items_per_s_per_core": [round(r["items"] / r["seconds"] / 2, 1) for r in rows],
        "cold_items_per_s_per_core": [round(r["cold_items"] / r["seconds"] / 2, 1) for r in rows],
        "by_category_share": [round(r["by_category"] / max(r["cold_items"], 1), 4) for r in rows],
        "largest_path": col("largest_path"),
        "peak_driver_rss_mb": [round(x, 1) for x in col("peak_driver_rss_mb")],
        "peak_executor_rss_mb": [round(x, 1) for x in col("peak_executor_rss_mb")],
        "peak_jvm_rss_mb": [round(x, 1) for x in col("peak_jvm_rss_mb")],
        "driver_rss_growth": round(rows[-1]["peak_driver_rss_mb"] / rows[0]["peak_driver_rss_mb"], 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", metavar="WAREHOUSE", required=True)
    print(json.dumps(cold_job(ap.parse_args().job)))
