"""The id dictionary (issue #13): string user / item keys <-> dense int64 ids, stable across batches.

`id_dictionary` holds one row per (kind, key): kind 'user' | 'item', the original key (trimmed),
its id and the ingest batch that brought it. Ids are dense from 0 per kind and never change: a
batch's new keys get max(id of the kind) + 1, + 2, ... in sorted key order, numbered on Spark
(distinct new keys -> sort -> zipWithIndex; no key reaches the driver, and the sort is a range
partitioning, not a window over one partition).

One commit per batch (empty when it brings no new key), made before the batch's quarantine and
interactions commits and carrying the watermark (ingest.ids, batch_id): a re-run of the batch
(after a crash, or a second time) finds it and reads its mapping at that version instead of
numbering again.

Concurrent ingests number optimistically: read the dictionary at version v, stage the new rows,
commit them only as version v + 1 (`Warehouse.commit(expected_version=v)`); a batch that loses
the race recomputes its new keys against the winner's version and tries again (MAX_ATTEMPTS),
its lost attempt's staged files left as orphans for `vacuum`. What delta-rs does, checked on
deltalake 1.6.6: `DeltaTable(uri, version=v).create_write_transaction(..., commit_properties=
CommitProperties(max_commit_retries=0))` raises CommitFailedError and writes nothing when v + 1
already exists, and four threads committing from one version gave exactly one commit per round
(20 rounds); with the retries left at delta-rs's default the same call silently rebases the
blind append onto v + 1 — which here would give two keys one id.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from .tables import CommitMeta, VersionConflict, Warehouse, spec

TABLE = "id_dictionary"
JOB = "ingest.ids"
KINDS = ("user", "item")
MAX_ATTEMPTS = 5
DDL = "kind string, key string, id long, batch_id string"


class IdDictionaryError(RuntimeError):
    """Ids could not be assigned (e.g. every attempt lost the race); the dictionary is unchanged."""


@dataclass(frozen=True)
class Assigned:
    """The dictionary version that holds every key of a batch, and what the batch added."""

    version: int
    new_keys: Mapping[str, int]     # kind -> keys added by this batch (empty when reused)
    attempts: int
    reused: bool                    # the batch's commit was already there (a re-run)


def _log(msg: str) -> None:
    print(f"[ids] {msg}", file=sys.stderr, flush=True)


def batch_keys(df: Any, user_col: str = "user_key", item_col: str = "item_key") -> Any:
    """Distinct (kind, key) of a DataFrame's user and item key columns (nulls left out)."""
    from pyspark.sql import functions as F

    pairs = F.explode(F.array(F.struct(F.lit("user").alias("kind"), F.col(user_col).alias("key")),
                              F.struct(F.lit("item").alias("kind"), F.col(item_col).alias("key"))))
    return df.select(pairs.alias("p")).select("p.kind", "p.key").filter(F.col("key").isNotNull()).distinct()


def _dictionary(spark: Any, wh: Warehouse, version: int | None) -> Any:
    return wh.read_spark(spark, TABLE, version) if version is not None else spark.createDataFrame([], DDL)


def _number_new_keys(spark: Any, current: Any, keys: Any, batch_id: str) -> tuple[Any, dict[str, int]]:
    """(rows of the keys not in `current`, numbered from max(id) + 1 per kind in key order; new keys per kind)."""
    from pyspark.sql import functions as F

    new = keys.join(current.select("kind", "key"), ["kind", "key"], "left_anti")
    counts = {r["kind"]: int(r["count"]) for r in new.groupBy("kind").count().collect()}          # <= 2 rows
    nxt = {r["kind"]: int(r["next"]) for r in current.groupBy("kind").agg((F.max("id") + 1).alias("next")).collect()}
    if not counts:
        return spark.createDataFrame([], DDL), {}
    # Sorted by (kind, key), kind k's keys hold the global positions [start_k, start_k + n_k).
    shift, start = {}, 0
    for k in sorted(counts):
        shift[k] = nxt.get(k, 0) - start
        start += counts[k]
    # One RDD lineage: zipWithIndex's counting job and the staging job reuse the sort's shuffle,
    # so both see the same order.
    pos = new.orderBy("kind", "key").rdd.zipWithIndex().map(lambda r: (r[0][0], r[0][1], r[1]))
    numbered = spark.createDataFrame(pos, "kind string, key string, pos long")
    offset = F.coalesce(*[F.when(F.col("kind") == k, F.lit(s)) for k, s in shift.items()])
    rows = numbered.select("kind", "key", (F.col("pos") + offset).alias("id"), F.lit(batch_id).alias("batch_id"))
    return rows, counts


def assign_ids(spark: Any, wh: Warehouse, keys: Any, batch_id: str, extra: Mapping[str, Any] | None = None,
               max_attempts: int = MAX_ATTEMPTS, log=_log) -> Assigned:
    """Give a batch's (kind, key) rows their ids: one dictionary commit (watermarked), retried on a lost race."""
    from pyspark import StorageLevel

    keys = keys.persist(StorageLevel.MEMORY_AND_DISK)   # the batch is read and validated once for all attempts
    try:
        return _assign(spark, wh, keys, batch_id, extra or {}, max_attempts, log)
    finally:
        keys.unpersist()


def _assign(spark: Any, wh: Warehouse, keys: Any, batch_id: str, extra: Mapping[str, Any], max_attempts: int,
            log) -> Assigned:
    for attempt in range(1, max_attempts + 1):
        if wh.watermark(TABLE, JOB, batch_id):
            v = wh.committed_version(TABLE, JOB, batch_id)
            log(f"batch {batch_id}: ids already assigned (id_dictionary v{v}); reusing them")
            return Assigned(v, {}, attempt, True)
        v = wh.version(TABLE)
        rows, counts = _number_new_keys(spark, _dictionary(spark, wh, v), keys, batch_id)
        staged = wh.stage_spark(rows, TABLE)[TABLE]
        meta = CommitMeta(JOB, batch_id, watermark=1,
                          extra={**extra, **{f"new_{k}s": counts.get(k, 0) for k in KINDS}})
        try:
            res = wh.commit(staged, meta, expected_version=-1 if v is None else v)
        except VersionConflict as e:
            log(f"batch {batch_id}: attempt {attempt} lost the race to a concurrent ingest ({e}); renumbering")
            continue
        log(f"batch {batch_id}: id_dictionary v{res.version}: "
            + ", ".join(f"{counts.get(k, 0)} new {k}s" for k in KINDS))
        return Assigned(res.version, {} if res.skipped else counts, attempt, res.skipped)
    raise IdDictionaryError(f"batch {batch_id}: {max_attempts} attempts to commit new ids to {TABLE} all lost the "
                            f"race to concurrent ingests; nothing was added to any table, run the batch again")


def with_ids(spark: Any, wh: Warehouse, df: Any, version: int, user_col: str = "user_key",
             item_col: str = "item_key") -> Any:
    """df + user_id, item_id (bigint) looked up at a dictionary version; null where the key is null or unknown."""
    from pyspark.sql import functions as F

    d = wh.read_spark(spark, TABLE, version)
    for kind, key_col, id_col in (("user", user_col, "user_id"), ("item", item_col, "item_id")):
        df = df.join(d.filter(F.col("kind") == kind).select(F.col("key").alias(key_col), F.col("id").alias(id_col)),
                     key_col, "left")
    return df


def with_keys(spark: Any, wh: Warehouse, df: Any) -> Any:
    """df (user_id, item_id, ...) + user_key, item_key: the original ids (null: integer ids, or an id not in it)."""
    from pyspark.sql import functions as F

    if not wh.exists(TABLE):     # integer ids: nothing to join, keep the plan as it was
        return df.withColumn("user_key", F.lit(None).cast("string")).withColumn("item_key", F.lit(None).cast("string"))
    d = wh.read_spark(spark, TABLE)
    for kind, id_col, key_col in (("user", "user_id", "user_key"), ("item", "item_id", "item_key")):
        df = df.join(d.filter(F.col("kind") == kind).select(F.col("id").alias(id_col), F.col("key").alias(key_col)),
                     id_col, "left")
    return df


def lookup(wh: Warehouse, kind: str, keys: Iterable[str] = (), ids: Iterable[int] = ()) -> pa.Table:
    """Dictionary rows (kind, key, id, batch_id) of some keys or ids of one kind, read with a pushed-down filter."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not wh.exists(TABLE):
        raise FileNotFoundError(f"no {TABLE} under {wh.root}: this warehouse was ingested with integer ids")
    keys, ids = [str(k).strip() for k in keys], [int(i) for i in ids]
    want = (pc.field("kind") == kind) & (pc.field("key").isin(keys) if keys else pc.field("id").isin(ids))
    # Only an id predicate is pushed down: the files carry no string min/max statistics, which
    # delta-rs's dataset turns into guarantees (key >= null) that drop every row of a string filter.
    found = [pa.Table.from_batches([b]).filter(want)
             for b in wh.batches(TABLE, filter=None if keys else pc.field("id").isin(ids))]
    return pa.concat_tables(found).sort_by("id") if found else spec(TABLE).schema.empty_table()
