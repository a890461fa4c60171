"""`dr candidates`: top-N candidates for every user (or one date's active users) from a train run.

Each user's last L kept interactions (the run's user_state version) -> beam search -> the run's
`path_index` version (cold items included) -> rerank -> top N (history items removed) ->
`candidates`, partitioned by run date. Executors read the run's serving bundle (jobs/serving.py:
the user towers, fp16 item vectors and the path index, memory-mapped; its README section states
the memory per executor); the driver passes a folder name and counts, never users or items.
The checkpoint and the item_paths version come from the same succeeded train run, so they
always pair. Idempotent per candidates run id (watermark); one commit at the end.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from dr_model.config import DRConfig

from . import runs
from .id_dictionary import with_keys
from .serving import ensure_bundle
from .tables import CommitMeta, CommitResult, Warehouse

JOB = "candidates"
OUT_SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("item_id", pa.int64()),
                        ("score", pa.float32()), ("run_id", pa.string()), ("run_date", pa.date32())])
OUT_DDL = "user_id long, rank int, item_id long, score float, run_id string, run_date date"


def _log(msg: str) -> None:
    print(f"[candidates] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CandidatesResult:
    run_id: str
    train_run_id: str
    users: int
    rows: int
    version: int
    skipped: bool
    seconds: float


def user_histories(spark: Any, wh: Warehouse, versions: dict[str, int], L: int,
                   active_on: date | None = None) -> Any:
    """One row per user: (user_id, hist array<bigint> of the last L kept items in time order, left-padded -1).

    From the run's user_state (jobs/user_state.py: no history scan; --date lists only that day's
    partition of interactions, for the active users); runs without state scan interactions.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    users = None
    if active_on is not None:
        day = wh.read_spark(spark, "interactions", versions.get("interactions"), [("date", "=", str(active_on))])
        users = day.filter(F.col("date") == F.lit(active_on)).select("user_id").distinct()
    if "user_state" in versions:
        state = wh.read_spark(spark, "user_state", versions["user_state"])
        if users is not None:
            state = state.join(users, "user_id", "left_semi")
        from .split import _pad_left

        last = F.slice("items", F.greatest(F.lit(1), F.size("items") - L + 1), L)
        return state.select("user_id", _pad_left(last, L).alias("hist"))
    inter = wh.read_spark(spark, "interactions", versions.get("interactions"))
    w = Window.partitionBy("user_id").orderBy(F.col("ts").desc(), F.col("item_id").desc())
    last = inter.select("user_id", "item_id", "ts").withColumn("rn", F.row_number().over(w)).filter(F.col("rn") <= L)
    if users is not None:
        last = last.join(users, "user_id", "left_semi")
    hist = last.groupBy("user_id").agg(F.sort_array(F.collect_list(F.struct("ts", "item_id"))).alias("evs"))
    items = F.transform("evs", lambda e: e["item_id"])
    pad = F.array_repeat(F.lit(-1).cast("bigint"), F.lit(L) - F.size(items))
    return hist.select("user_id", F.concat(pad, items).alias("hist"))


_BUNDLES: dict[str, Any] = {}        # bundle folder -> ServingBundle, one per Python worker


def _bundle(path: str) -> Any:
    """The serving bundle at `path`, opened once per Python worker (a new night's replaces the old)."""
    from dr_model.serving import ServingBundle

    hit = _BUNDLES.get(path)
    if hit is None:
        _BUNDLES.clear()
        hit = _BUNDLES[path] = ServingBundle.open(path)
    return hit


def candidate_batches(batches: Iterator[pa.RecordBatch], bundle_path: str, beam: int, n: int, run_id: str,
                      run_date: date, batch_size: int) -> Iterator[pa.RecordBatch]:
    """(user_id, hist[L]) -> (user_id, rank, item_id, score, run_id, run_date), N rows per user."""
    from spark_udfs.beam_udf import set_task_threads

    bundle = None
    for batch in batches:
        if batch.num_rows == 0:
            continue
        if bundle is None:
            set_task_threads()
            bundle = _bundle(bundle_path)
        users = batch.column(batch.schema.get_field_index("user_id")).to_numpy()
        hc = batch.column(batch.schema.get_field_index("hist"))
        L = len(hc[0])
        hist = hc.flatten().to_numpy().reshape(batch.num_rows, L)
        for lo in range(0, batch.num_rows, batch_size):
            items, scores, _ = bundle.retrieve(hist[lo:lo + batch_size], beam, n)
            ok = items >= 0
            u = np.repeat(users[lo:lo + batch_size], n).reshape(-1, n)
            rank = np.broadcast_to(np.arange(1, n + 1, dtype=np.int32), items.shape)
            cnt = int(ok.sum())
            yield pa.RecordBatch.from_arrays([
                pa.array(u[ok]), pa.array(rank[ok]), pa.array(items[ok]), pa.array(scores[ok].astype(np.float32)),
                pa.array([run_id] * cnt, pa.string()), pa.array([run_date] * cnt, pa.date32())], schema=OUT_SCHEMA)


def run_candidates(spark: Any, wh: Warehouse, train_run_id: str | None = None, run_id: str | None = None,
                   run_date: date | None = None, active_on: date | None = None, top_n: int | None = None,
                   beam: int | None = None, log=_log) -> CandidatesResult:
    """Generate and commit candidates for the users of one train run's model (latest succeeded by default).

    beam None: the beam the train run chose for its retrieval budget; top_n None: the run's search.top_n
    (the depth that beam was chosen for).
    """
    t0 = time.perf_counter()
    run = runs.latest(wh, "train", train_run_id, status="succeeded")
    if run is None:
        raise LookupError(f"no succeeded train run {train_run_id or ''} in {wh.root}: run `dr train` first")
    run_id = run_id or run.run_id
    run_date = run_date or date.today()
    meta = CommitMeta(job=JOB, run_id=run_id, config_hash=None, watermark=1,
                      extra={"train_run_id": run.run_id, "item_paths_version": run.table_versions["item_paths"]})
    if (wh.watermark("candidates", JOB, run_id) or 0) >= 1:
        v = wh.committed_version("candidates", JOB, run_id)
        log(f"candidates for run {run_id} already committed (v{v}): nothing to do")
        return CandidatesResult(run_id, run.run_id, 0, 0, v, True, time.perf_counter() - t0)
    bundle = ensure_bundle(spark, wh, run, log=log)
    cfg = DRConfig.from_dict(json.loads((Path(run.checkpoint) / "meta.json").read_text())["config"])
    users = user_histories(spark, wh, run.table_versions, cfg.model.seq_len, active_on)
    beam = beam or int(run.metrics.get("retrieval_beam") or cfg.search.beam)
    top_n = top_n or cfg.search.top_n
    args = (str(bundle), beam, top_n, run_id, run_date, cfg.search.batch_size)
    out = users.mapInArrow(lambda it: candidate_batches(it, *args), OUT_DDL)
    out = with_keys(spark, wh, out)     # the original user / item ids (null with integer ids)
    log(f"train run {run.run_id} (item_paths v{run.table_versions['item_paths']}), beam {beam}, "
        f"top {top_n}, {'users active on ' + str(active_on) if active_on else 'all users'}")
    res: CommitResult = wh.write_spark("candidates", out, meta, mode="append")
    from pyspark.sql import functions as F

    n_users = (wh.read_spark(spark, "candidates", res.version)
               .filter((F.col("run_date") == F.lit(run_date)) & (F.col("run_id") == run_id))
               .select("user_id").distinct().count())
    log(f"committed candidates v{res.version}: {res.rows} rows for {n_users} users [{time.perf_counter() - t0:.1f}s]")
    return CandidatesResult(run_id, run.run_id, n_users, res.rows, res.version, res.skipped, time.perf_counter() - t0)
