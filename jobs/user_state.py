"""Activity state kept night over night: every user's last L kept events, every item's last event.

`user_state(user_id, items[<= L], ts[<= L], n_events, last_ts)`: the user's last L kept events
(rating >= split.rating_threshold or no rating) in (ts, item_id) order; `item_state(item_id,
last_ts, n_events)`. A full night builds both from the whole history; an incremental night
merges only the interactions of the ingest batches committed since the last run into the
previous versions, so its cost follows the state (O(users x L)) and the night's events, never
the history. `dr candidates` reads histories from here, and incremental training takes each
new event's history from it. Both tables are overwritten (one snapshot per version) in one
commit each, tagged with the run id; the train run records the versions it made.
"""
from __future__ import annotations

from typing import Any

from dr_model.config import SplitConfig

from .tables import CommitMeta, Warehouse

JOB = "train.state"


def kept(events: Any, cfg: SplitConfig) -> Any:
    """The events the model learns from: rated >= the threshold, or implicit (no rating)."""
    from pyspark.sql import functions as F

    return events.filter(F.col("rating").isNull() | (F.col("rating") >= F.lit(cfg.rating_threshold)))


def batches_since(wh: Warehouse, since_version: int, until_version: int) -> list[str]:
    """Ingest batch ids committed to `interactions` in versions (since, until]."""
    return sorted({v.run_id for v in wh.versions("interactions")
                   if since_version < v.version <= until_version and v.job == "ingest" and v.run_id})


def new_events(spark: Any, wh: Warehouse, since_version: int, until_version: int, cfg: SplitConfig) -> Any:
    """The kept events of the batches ingested after `since_version` (pinned at `until_version`)."""
    from pyspark.sql import functions as F

    batches = batches_since(wh, since_version, until_version)
    inter = wh.read_spark(spark, "interactions", until_version)
    return kept(inter.filter(F.col("batch_id").isin(batches)), cfg).select("user_id", "item_id", "ts")


def merged_sequences(state: Any | None, events: Any) -> Any:
    """(user_id, ev: array<struct<ts, item_id, new>> sorted by (ts, item_id), n_before, n_new) per user with
    new events: the state's last L events (new = false) followed in time by the night's (new = true)."""
    from pyspark.sql import functions as F

    new = events.groupBy("user_id").agg(
        F.collect_list(F.struct("ts", "item_id", F.lit(True).alias("new"))).alias("evn"), F.count("*").alias("n_new"))
    if state is None:
        return new.select("user_id", F.sort_array("evn").alias("ev"), F.lit(0).cast("bigint").alias("n_before"), "n_new")
    old = state.select("user_id", F.arrays_zip(F.col("ts").alias("ts"), F.col("items").alias("item_id")).alias("z"),
                       F.col("n_events").alias("n_before"))
    old = old.select("user_id", F.transform("z", lambda e: F.struct(e["ts"].alias("ts"), e["item_id"].alias("item_id"),
                                                                    F.lit(False).alias("new"))).alias("evo"), "n_before")
    j = new.join(old, "user_id", "left")
    return j.select("user_id", F.sort_array(F.concat(F.coalesce("evo", F.array().cast(j.schema["evn"].dataType)),
                                                     "evn")).alias("ev"),
                    F.coalesce("n_before", F.lit(0)).cast("bigint").alias("n_before"), "n_new")


def next_user_state(state: Any | None, seqs: Any, L: int) -> Any:
    """user_state rows after the night: users with new events from `seqs` (merged_sequences), the rest unchanged."""
    from pyspark.sql import functions as F

    last = F.slice("ev", F.greatest(F.lit(1), F.size("ev") - L + 1), L)
    upd = seqs.select("user_id", F.transform(last, lambda e: e["item_id"]).alias("items"),
                      F.transform(last, lambda e: e["ts"]).alias("ts"),
                      (F.col("n_before") + F.col("n_new")).alias("n_events"),
                      F.array_max(F.transform("ev", lambda e: e["ts"])).alias("last_ts"))
    if state is None:
        return upd
    return state.join(upd.select("user_id"), "user_id", "left_anti").select(*upd.columns).unionByName(upd)


def next_item_state(state: Any | None, events: Any) -> Any:
    """item_state rows after the night (last_ts = the latest event, n_events summed)."""
    from pyspark.sql import functions as F

    agg = events.groupBy("item_id").agg(F.max("ts").alias("last_ts"), F.count("*").alias("n_events"))
    if state is None:
        return agg
    both = state.select("item_id", "last_ts", "n_events").unionByName(agg)
    return both.groupBy("item_id").agg(F.max("last_ts").alias("last_ts"), F.sum("n_events").alias("n_events"))


def write_state(spark: Any, wh: Warehouse, user_rows: Any, item_rows: Any, run_id: str,
                interactions_version: int, config_hash: str) -> dict[str, int]:
    """Commit both snapshots (a rerun of the run skips the one already committed) -> versions."""
    meta = CommitMeta(JOB, run_id, config_hash=config_hash, watermark=1,
                      extra={"interactions_version": interactions_version})
    return {"user_state": wh.write_spark("user_state", user_rows, meta, mode="overwrite").version,
            "item_state": wh.write_spark("item_state", item_rows, meta, mode="overwrite").version}


def build_state(spark: Any, wh: Warehouse, cfg: SplitConfig, L: int, interactions_version: int, run_id: str,
                config_hash: str) -> dict[str, int]:
    """A full night: both tables from the whole history at `interactions_version`."""
    events = kept(wh.read_spark(spark, "interactions", interactions_version), cfg).select("user_id", "item_id", "ts")
    seqs = merged_sequences(None, events)
    return write_state(spark, wh, next_user_state(None, seqs, L), next_item_state(None, events), run_id,
                       interactions_version, config_hash)


def read_state(spark: Any, wh: Warehouse, versions: dict[str, int]) -> tuple[Any, Any]:
    """(user_state, item_state) DataFrames at a run's recorded versions."""
    return (wh.read_spark(spark, "user_state", versions["user_state"]),
            wh.read_spark(spark, "item_state", versions["item_state"]))


def data_end_ts(spark: Any, wh: Warehouse, item_state_version: int) -> int:
    """The latest event time the state holds (a night's data end: decay and ageing count from it)."""
    from pyspark.sql import functions as F

    return int(wh.read_spark(spark, "item_state", item_state_version).agg(F.max("last_ts")).first()[0] or 0)
