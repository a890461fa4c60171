"""`dr data ...`: MovieLens and synthetic datasets into the warehouse tables.

MovieLens (DESIGN.md §6, fetched by jobs/movielens.py) goes through `ingest` like any batch
(batch id `movielens-<name>`, so loading twice adds nothing) and its catalog is upserted
into `items` (first genre as category).

Synthetic data is generated INSIDE Spark tasks, one chunk of users at a time (each chunk is a
pure function of seed + user range, dr_model/synthetic.py), so 10^8 interactions never sit in
one process: a task holds one chunk of `chunk_users * events_per_user` rows. The generator is
trusted, so its rows are committed to `interactions` directly (no validation pass). The ground
truth is stored as `synthetic_truth` (user -> planted clusters); item -> cluster is the closed
form `item_id % num_clusters` (also the items' category `c<cluster>`), and the spec JSON is in
the commit metadata of every table written (`dr.spec`), read back by `stored_spec`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from dr_model.synthetic import SyntheticSpec, generate_users, user_clusters

from .ingest import IngestResult, ingest_dataframe
from .movielens import load_movielens
from .tables import CommitMeta, Warehouse

RAW_EVENTS = "user_id long, item_id long, rating float, ts long"


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DatasetResult:
    """Table versions written by a dataset load and its sizes."""

    name: str
    interactions: int
    items: int
    versions: dict[str, int]
    skipped: bool
    seconds: float

    def summary(self) -> str:
        state = "already loaded, nothing added" if self.skipped else f"{self.interactions} interactions, {self.items} items"
        vs = ", ".join(f"{k} v{v}" for k, v in sorted(self.versions.items()))
        return f"{self.name}: {state}; {vs}; {self.seconds:.1f}s"


def movielens(spark: Any, wh: Warehouse, name: str = "ml-1m") -> tuple[DatasetResult, IngestResult]:
    """MovieLens-1M / -100K -> interactions (via ingest, event 'rating') and items (upsert)."""
    t0 = time.time()
    _log(f"loading {name}")
    inter, items = load_movielens(name)
    run_id = f"movielens-{name}"
    _log(f"{name}: {len(inter)} ratings, {len(items)} items; ingesting")
    res = ingest_dataframe(spark, wh, spark.createDataFrame(inter), run_id, source=f"movielens:{name}")
    it = wh.merge("items", items, CommitMeta("data", run_id, watermark=1, extra={"dataset": name}))
    versions = {**res.versions, "items": it.version}
    return DatasetResult(name, res.ingested, 0 if it.skipped else len(items), versions,
                         res.skipped and it.skipped, time.time() - t0), res


def iter_chunks(first: int, count: int, spec: SyntheticSpec, chunk_users: int) -> Iterator[pd.DataFrame]:
    """Events of users [first, first+count) in chunks of <= chunk_users users (bounded memory)."""
    for start in range(first, first + count, chunk_users):
        yield generate_users(start, min(chunk_users, first + count - start), spec)


def synthetic_events(spark: Any, spec: SyntheticSpec, chunk_users: int = 20_000, partitions: int | None = None) -> Any:
    """Spark DataFrame[user_id, item_id, rating, ts] of the whole spec, generated chunk by chunk in tasks."""
    n_chunks = -(-spec.num_users // chunk_users)
    parts = partitions or min(n_chunks, max(2, spark.sparkContext.defaultParallelism * 4))

    def gen(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for c in b.column("id").to_numpy():
                first = int(c) * chunk_users
                for df in iter_chunks(first, min(chunk_users, spec.num_users - first), spec, chunk_users):
                    yield pa.RecordBatch.from_pandas(df, preserve_index=False)

    return spark.range(0, n_chunks, numPartitions=parts).mapInArrow(gen, RAW_EVENTS)


def synthetic(spark: Any, wh: Warehouse, spec: SyntheticSpec, chunk_users: int = 20_000) -> DatasetResult:
    """Synthetic interactions, items (category c<cluster>) and ground truth into the warehouse."""
    from pyspark.sql import functions as F

    t0 = time.time()
    spec_json = json.dumps(asdict(spec), sort_keys=True)
    # The random stream is seeded per chunk, so the data is a function of (spec, chunk_users).
    run_id = "synthetic-" + hashlib.sha256(f"{spec_json}/{chunk_users}".encode()).hexdigest()[:12]
    meta = CommitMeta("data", run_id, watermark=1, extra={"spec": spec_json, "chunk_users": chunk_users})
    _log(f"{run_id}: {spec.num_events} interactions of {spec.num_users} users over {spec.num_items} items, "
         f"chunks of {chunk_users} users")
    ev = synthetic_events(spark, spec, chunk_users).select(
        "user_id", "item_id", "ts", F.lit("view").alias("event"), F.lit(1.0).cast("float").alias("weight"),
        "rating", F.lit(run_id).alias("batch_id"),
        F.expr("date_from_unix_date(CAST(floor(ts / 86400) AS INT))").alias("date"))
    ri = wh.write_spark("interactions", ev, meta)
    _log(f"{run_id}: interactions v{ri.version} ({ri.rows} rows); writing items")
    items = spark.range(spec.num_items, numPartitions=max(1, min(64, spec.num_items // 1_000_000 + 1))).select(
        F.col("id").alias("item_id"), F.concat(F.lit("item "), F.col("id")).alias("title"),
        F.concat(F.lit("c"), F.pmod(F.col("id"), F.lit(spec.num_clusters))).alias("category"))
    # A synthetic catalog replaces the previous one (load it into its own warehouse).
    rit = wh.write_spark("items", items, meta, mode="overwrite")
    _log(f"{run_id}: items v{rit.version}; writing ground truth")
    rt = wh.write_spark("synthetic_truth", _truth(spark, spec), meta, mode="overwrite")
    skipped = ri.skipped and rit.skipped and rt.skipped
    return DatasetResult(run_id, ri.rows, rit.rows, {"interactions": ri.version, "items": rit.version,
                                                     "synthetic_truth": rt.version}, skipped, time.time() - t0)


def _truth(spark: Any, spec: SyntheticSpec) -> Any:
    """DataFrame[user_id, slot, cluster]: each user's planted interest clusters."""
    def gen(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            users = b.column("id").to_numpy()
            cl = user_clusters(users, spec)                                     # [n, interests]
            yield pa.RecordBatch.from_pydict({
                "user_id": np.repeat(users, spec.interests),
                "slot": np.tile(np.arange(spec.interests, dtype=np.int32), len(users)),
                "cluster": cl.ravel().astype(np.int64)})

    parts = max(1, min(64, spec.num_users // 1_000_000 + 1))
    return spark.range(spec.num_users, numPartitions=parts).mapInArrow(gen, "user_id long, slot int, cluster long")


def planted_precision(spark: Any, wh: Warehouse, run_id: str | None = None, ks: tuple[int, ...] = (10, 100)) -> dict:
    """Share of the `candidates` rows (of one train run's candidates, default all) whose item lies in one of
    its user's planted clusters, at each rank cut-off k; the chance level is interests / clusters."""
    from pyspark.sql import functions as F

    spec, _ = stored_spec(wh)
    cand = wh.read_spark(spark, "candidates")
    if run_id is not None:
        cand = cand.where(F.col("run_id") == run_id)
    truth = wh.read_spark(spark, "synthetic_truth").select("user_id", "cluster").distinct()
    hit = (cand.select("user_id", "rank", F.pmod("item_id", F.lit(spec.num_clusters)).alias("cluster"))
           .join(truth.withColumn("hit", F.lit(1)), ["user_id", "cluster"], "left"))
    row = hit.agg(F.countDistinct("user_id").alias("users"),
                  *[F.sum(F.when(F.col("rank") <= k, 1).otherwise(0)).alias(f"rows_{k}") for k in ks],
                  *[F.sum(F.when((F.col("rank") <= k) & F.col("hit").isNotNull(), 1).otherwise(0)).alias(f"hits_{k}")
                    for k in ks]).collect()[0]
    out: dict = {"users": int(row["users"]), "chance": spec.interests / spec.num_clusters}
    for k in ks:
        out[f"planted_precision_at_{k}"] = (row[f"hits_{k}"] or 0) / max(row[f"rows_{k}"] or 0, 1)
    return out


def stored_spec(wh: Warehouse) -> tuple[SyntheticSpec, int]:
    """(SyntheticSpec, chunk_users) recorded with the latest synthetic_truth version."""
    md = wh.versions("synthetic_truth")[-1].metadata
    return SyntheticSpec(**json.loads(md["dr.spec"])), int(md["dr.chunk_users"])
