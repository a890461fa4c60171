"""Path index job: path -> items for any committed `item_paths` version, as a `path_index` version.

Rows are clustered by path (hash-partitioned, sorted by path then item inside each file),
so a reader of a few paths touches few row groups. The commit records the source
`item_paths` version; `find_path_index` maps an item_paths version to its index version.
"""
from __future__ import annotations

import sys
from typing import Callable

from pyspark.sql import DataFrame, SparkSession

from jobs.tables import CommitMeta, CommitResult, Warehouse

JOB = "path_index"


def _log(msg: str) -> None:
    print(f"[path-index] {msg}", file=sys.stderr, flush=True)


def build_path_index(spark: SparkSession, warehouse: Warehouse, item_paths_version: int | None, run_id: str,
                     partitions: int | None = None, log: Callable[[str], None] = _log,
                     frame: DataFrame | None = None) -> CommitResult:
    """item_paths@version (latest when None) -> ONE `path_index` version (path, item_id, slot, score).

    `frame` (item_id, slot, path, score) replaces the item_paths rows, e.g. with cold items added.
    """
    v = warehouse.version("item_paths") if item_paths_version is None else item_paths_version
    if v is None:
        raise FileNotFoundError("table 'item_paths' does not exist: run the M-step first")
    done = find_path_index(warehouse, v, run_id) if frame is None else None
    if done is not None:
        # a rerun after a crash past this commit: the index of (this run, this version) is already there
        log(f"path_index v{done} for item_paths v{v} already committed by run {run_id}: reused")
        return CommitResult("path_index", done, True, 0, 0)
    n = partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))
    src = warehouse.read_spark(spark, "item_paths", v) if frame is None else frame
    df = (src.select("path", "item_id", "slot", "score")
          .repartition(n, "path").sortWithinPartitions("path", "item_id"))
    res = warehouse.write_spark("path_index", df, CommitMeta(JOB, run_id, extra={"item_paths_version": v}),
                                mode="overwrite")
    log(f"committed path_index v{res.version} for item_paths v{v}: {res.rows} rows")
    return res


def find_path_index(warehouse: Warehouse, item_paths_version: int, run_id: str | None = None) -> int | None:
    """The latest path_index version built from item_paths@item_paths_version (by this job for run_id), or None."""
    if not warehouse.exists("path_index"):
        return None
    hits = [x.version for x in warehouse.versions("path_index")
            if x.metadata.get("dr.item_paths_version") == item_paths_version
            and (run_id is None or (x.job, x.run_id) == (JOB, run_id))]
    return hits[-1] if hits else None


__all__ = ["build_path_index", "find_path_index", "JOB"]
