"""`dr bench replay`: nightly incremental training against a full retrain, replayed on MovieLens by time.

The events are cut by timestamp into a first training period (the first 70 % of the events)
and N + 1 increments of equal event counts (N = 7 nights; 4 with --quick, on ML-100K). Two
warehouses start from the same full night on the first period; then each night ingests its
increment into both and trains (a) `dr train --mode incremental` in one and (b) `--mode
full` in the other. Both are scored on the NEXT increment: for every user active in it with a
history, recall@10 of the night's model (the serving bundle `dr candidates` reads, at the
run's retrieval beam, history excluded) against the user's kept events of that increment.
Both chains use the same config; the E-step runs in the driver (RayConfig(num_workers=0)) so
Ray Train's per-round worker start-up, a fixed cost, does not swamp these small nights.
Prints incremental_recall_over_full (mean over nights) and incremental_cost_over_full (mean
wall-time ratio over nights 2..N).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

K = 10
# The same short E-step schedule for both chains: a full ML-1M night at the defaults takes ~25 min on two cores.
SCHEDULE = ["train.em_rounds=1", "train.joint_epochs=8", "train.structure_epochs=4", "incremental.epochs=2"]


def _log(msg: str) -> None:
    print(f"[bench replay] {msg}", file=sys.stderr, flush=True)


def cut(events: pd.DataFrame, nights: int, first_share: float = 0.7) -> list[pd.DataFrame]:
    """events -> [first period, increment 1 .. nights + 1], cut by ts at event-count quantiles."""
    ts = np.sort(events.ts.to_numpy())
    qs = first_share + (1 - first_share) * np.arange(1, nights + 1) / (nights + 1)
    edges = [ts[0] - 1, int(ts[int(first_share * len(ts))])] + [int(ts[int(q * len(ts))]) for q in qs] + [ts[-1]]
    return [events[(events.ts > lo) & (events.ts <= hi)] for lo, hi in zip(edges[:-1], edges[1:])]


def next_day_recall(spark, wh, run, nxt: pd.DataFrame, cfg) -> tuple[float, int]:
    """recall@K of `run`'s model on the kept events of `nxt` of users with a history -> (recall, users)."""
    from dr_model.serving import ServingBundle
    from jobs.serving import ensure_bundle

    kept = nxt[nxt.rating.isna() | (nxt.rating >= cfg.split.rating_threshold)]
    truth = kept.groupby("user_id").item_id.apply(lambda s: np.unique(s.to_numpy()))
    st = wh.read_arrow("user_state", run.table_versions["user_state"]).to_pandas().set_index("user_id")
    users = truth.index.intersection(st.index)
    L = cfg.model.seq_len
    hist = np.full((len(users), L), -1, dtype=np.int64)
    for i, items in enumerate(st.loc[users, "items"]):   # <= a few thousand users: the bench's own reference
        items = np.asarray(items[-L:], dtype=np.int64)
        hist[i, L - len(items):] = items
    bundle = ServingBundle.open(str(ensure_bundle(spark, wh, run, log=lambda m: None)))
    beam = int(run.metrics.get("retrieval_beam") or cfg.search.beam)
    rec = []
    for lo in range(0, len(users), 1024):
        items, _, _ = bundle.retrieve(hist[lo:lo + 1024], beam, K)
        for row, u in zip(items, users[lo:lo + 1024]):
            t = truth[u]
            rec.append(np.isin(t, row).sum() / len(t))
    return float(np.mean(rec)), len(users)


def run(quick: bool = False) -> dict:
    from dr_model.config import DRConfig
    from jobs import runs
    from jobs.datasets import movielens
    from jobs.spark import get_spark
    from jobs.tables import Warehouse
    from jobs.train import run_train
    from ray_trainers.config import RayConfig

    dataset, nights = ("ml-100k", 4) if quick else ("ml-1m", 7)
    cfg = DRConfig().with_overrides(SCHEDULE)
    ray_cfg = RayConfig(num_workers=0)
    spark = get_spark("local[2]", app="dr-bench-replay")
    root = Path(tempfile.mkdtemp(prefix="dr-bench-replay-"))
    try:
        src = Warehouse(root / "source")
        movielens(spark, src, dataset)
        ev = src.read_arrow("interactions").to_pandas()[["user_id", "item_id", "ts", "rating", "event"]]
        parts = cut(ev, nights)
        _log(f"{dataset}: {len(ev)} events -> first period {len(parts[0])} + {nights + 1} increments of "
             f"~{len(parts[1])} events ({(parts[1].ts.max() - parts[1].ts.min()) / 86400:.0f} days the first)")
        for i, p in enumerate(parts):
            (root / "drops" / f"{i}").mkdir(parents=True)
            p.to_parquet(root / "drops" / f"{i}" / "part.parquet", index=False)
        from jobs.ingest import ingest_path

        inc = Warehouse(root / "incremental")
        ingest_path(spark, inc, str(root / "drops" / "0"), batch_id="drop-0")
        t0 = time.perf_counter()
        run_train(spark, inc, cfg, ray_cfg, "night-0", log=_log, mode="full")
        first_s = time.perf_counter() - t0
        shutil.copytree(root / "incremental", root / "full")
        full = Warehouse(root / "full")
        rows = []
        for n in range(1, nights + 1):
            for wh in (inc, full):
                ingest_path(spark, wh, str(root / "drops" / f"{n}"), batch_id=f"drop-{n}")
            out = {"night": n}
            for name, wh, mode in (("incremental", inc, "incremental"), ("full", full, "full")):
                t0 = time.perf_counter()
                run_train(spark, wh, cfg, ray_cfg, f"night-{n}", log=_log, mode=mode)
                out[f"{name}_s"] = time.perf_counter() - t0
                run = runs.latest(wh, "train", f"night-{n}", status="succeeded")
                out[f"{name}_recall"], out["users"] = next_day_recall(spark, wh, run, parts[n + 1], cfg)
            _log(f"night {n}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
            rows.append(out)
        df = pd.DataFrame(rows)
        later = df[df.night >= 2]
        return {
            "date": date.today().isoformat(), "dataset": dataset, "nights": nights, "k": K,
            "schedule": SCHEDULE, "first_night_s": round(first_s, 1),
            "incremental_recall_over_full": float((df.incremental_recall / df.full_recall).mean()),
            "incremental_cost_over_full": float((later.incremental_s / later.full_s).mean()),
            "incremental_recall_mean": float(df.incremental_recall.mean()), "full_recall_mean": float(df.full_recall.mean()),
            "per_night": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
