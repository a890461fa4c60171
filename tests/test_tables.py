"""The table layer on real Delta tables: atomic commits, metadata, pinning, idempotency, crashes, races."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.tables import TABLES, CommitError, CommitMeta, Staged, StagedFile

ROOT = Path(__file__).resolve().parents[1]


def events(n: int, first_user: int = 0, batch: str = "b") -> pd.DataFrame:
    """n interactions spread over a few UTC days."""
    ts = 1_600_000_000 + np.arange(n, dtype=np.int64) * 40_000
    return pd.DataFrame({
        "user_id": np.arange(first_user, first_user + n, dtype=np.int64), "item_id": np.arange(n, dtype=np.int64) % 7,
        "ts": ts, "event": "view", "weight": np.float32(1.0), "rating": np.float32(4.0), "batch_id": batch,
        "date": pd.to_datetime(ts, unit="s").date,
    })


def parquet_files(root: str) -> set[str]:
    return {str(p) for p in Path(root).rglob("*.parquet")}


def test_versions_pinning_and_metadata_round_trip(spark, warehouse):
    r0 = warehouse.write_arrow("interactions", events(10), CommitMeta("ingest", "run-a", config_hash="c0"))
    r1 = warehouse.write_spark("interactions", spark.createDataFrame(events(5, first_user=100)),
                               CommitMeta("ingest", "run-b", round=3, config_hash="c1", extra={"source": "x"}))
    assert (r0.version, r0.rows, r1.version, r1.rows) == (0, 10, 1, 5)
    vs = warehouse.versions("interactions")
    assert [(v.version, v.job, v.run_id, v.round, v.config_hash) for v in vs] == \
        [(0, "ingest", "run-a", None, "c0"), (1, "ingest", "run-b", 3, "c1")]
    assert vs[1].metadata["dr.source"] == "x"
    # Pinned reads, Spark and Arrow, see exactly that version's rows (partition column included).
    assert warehouse.read_spark(spark, "interactions", version=0).count() == 10
    latest = warehouse.read_spark(spark, "interactions")
    assert latest.count() == 15 and latest.columns == TABLES["interactions"].schema.names
    got = warehouse.read_arrow("interactions", version=1).to_pandas().sort_values("user_id", ignore_index=True)
    want = pd.concat([events(10), events(5, first_user=100)], ignore_index=True)
    pd.testing.assert_frame_equal(got[["user_id", "ts", "date"]].astype({"date": "object"}),
                                  want[["user_id", "ts", "date"]].astype({"date": "object"}), check_dtype=False)
    sp = warehouse.read_spark(spark, "interactions", 1).orderBy("user_id").toPandas()
    assert sp["date"].tolist() == want["date"].tolist()
    # Time travel by timestamp: just after version 0 was committed.
    t0 = datetime.fromtimestamp(vs[0].timestamp_ms / 1000 + 0.0005, tz=timezone.utc)
    assert warehouse.read_arrow("interactions", version=t0).num_rows == 10
    # row counts from the Delta log alone
    assert (warehouse.rows("interactions", 0), warehouse.rows("interactions")) == (10, 15)


def test_overwrite_merge_and_schema_enforcement(warehouse):
    warehouse.write_arrow("interactions", events(6), CommitMeta("t", "1"))
    r = warehouse.write_arrow("interactions", events(2), CommitMeta("t", "2"), mode="overwrite")
    assert warehouse.read_arrow("interactions").num_rows == 2 and warehouse.read_arrow("interactions", 0).num_rows == 6
    assert r.version == 1
    items = pd.DataFrame({"item_id": np.arange(4, dtype=np.int64), "title": list("abcd"), "category": "x"})
    warehouse.merge("items", items, CommitMeta("t", "m1"))
    upd = pd.DataFrame({"item_id": np.array([3, 9], dtype=np.int64), "title": ["D", "z"], "category": "y"})
    m = warehouse.merge("items", upd, CommitMeta("t", "m2"))
    got = warehouse.read_arrow("items").to_pandas().sort_values("item_id")
    assert got["item_id"].tolist() == [0, 1, 2, 3, 9] and got["title"].tolist() == ["a", "b", "c", "D", "z"]
    assert m.version == 1 and warehouse.versions("items")[-1].operation == "MERGE"
    with pytest.raises(ValueError, match="more than once"):
        warehouse.merge("items", pd.concat([upd, upd]), CommitMeta("t", "m3"))
    bad = events(3)
    bad.loc[1, "event"] = None
    with pytest.raises(ValueError, match="'event' has 1 nulls"):
        warehouse.write_arrow("interactions", bad, CommitMeta("t", "3"))
    with pytest.raises(ValueError, match=r"lacks columns \['batch_id'\]"):
        warehouse.write_arrow("interactions", events(3).drop(columns="batch_id"), CommitMeta("t", "3"))
    assert warehouse.version("interactions") == 1 and warehouse.version("items") == 1


def test_idempotency_watermark(spark, warehouse):
    meta = CommitMeta("ingest", "batch-7", watermark=1)
    first = warehouse.write_spark("interactions", spark.createDataFrame(events(4)), meta)
    again = warehouse.write_spark("interactions", spark.createDataFrame(events(4)), meta)
    assert not first.skipped and again.skipped and again.version == first.version
    assert warehouse.watermark("interactions", "ingest", "batch-7") == 1
    assert warehouse.watermark("interactions", "ingest", "batch-8") is None
    # A higher watermark for the same (job, run_id), e.g. the next EM round, does commit.
    nxt = warehouse.write_arrow("interactions", events(1), CommitMeta("ingest", "batch-7", watermark=2))
    assert not nxt.skipped and warehouse.watermark("interactions", "ingest", "batch-7") == 2
    assert warehouse.read_arrow("interactions").num_rows == 5


def test_commit_refuses_missing_or_truncated_files(warehouse):
    warehouse.write_arrow("interactions", events(3), CommitMeta("t", "0"))
    staged = warehouse.stage_arrow("interactions", events(5, first_user=50))
    victim = Path(warehouse.uri("interactions")) / staged.files[0].path
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CommitError, match="wrong size"):
        warehouse.commit(staged, CommitMeta("t", "1"))
    ghost = Staged("interactions", (StagedFile("date=2020-01-01/nope.parquet", 10, {"date": "2020-01-01"}, 1, "{}"),))
    with pytest.raises(CommitError, match="nope.parquet"):
        warehouse.commit(ghost, CommitMeta("t", "2"))
    assert warehouse.version("interactions") == 0 and warehouse.read_arrow("interactions").num_rows == 3


KILLED_CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np, pandas as pd
    from jobs.spark import get_spark
    from jobs.tables import Warehouse
    spark = get_spark("local[1]", app="killed")
    ts = 1_600_000_000 + np.arange(1000, dtype=np.int64) * 600
    df = spark.createDataFrame(pd.DataFrame({"user_id": np.arange(1000, dtype=np.int64) + 10_000, "item_id": 1,
        "ts": ts, "event": "view", "weight": np.float32(1), "rating": np.float32(1), "batch_id": "doomed",
        "date": pd.to_datetime(ts, unit="s").date}))
    staged = Warehouse(sys.argv[1]).stage_spark(df, "interactions")["interactions"]
    print("STAGED", len(staged.files), staged.rows, flush=True)
    os._exit(17)   # dies after the executors wrote their files, before the driver commits
""")


def test_killed_before_commit_leaves_previous_version(spark, warehouse):
    warehouse.write_arrow("interactions", events(8), CommitMeta("t", "ok"))
    before = parquet_files(warehouse.uri("interactions"))
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, warehouse.root], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert "STAGED" in proc.stdout and " 1000" in proc.stdout
    orphans = parquet_files(warehouse.uri("interactions")) - before
    assert orphans, "the child should have written data files"
    # Same version, none of the child's rows visible through either reader.
    assert warehouse.version("interactions") == 0
    assert warehouse.read_arrow("interactions").num_rows == 8
    assert warehouse.read_spark(spark, "interactions").filter("batch_id = 'doomed'").count() == 0
    # Orphans remain on disk until vacuum removes them.
    removed = warehouse.vacuum("interactions", retention_hours=0)
    assert len(removed) == len(orphans)
    assert parquet_files(warehouse.uri("interactions")) == before and warehouse.read_arrow("interactions").num_rows == 8


CONCURRENT_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, pandas as pd
    from deltalake.exceptions import CommitFailedError
    from jobs.tables import CommitMeta, Warehouse
    root, k = sys.argv[1], int(sys.argv[2])
    ts = np.full(100, 1_600_000_000 + k * 86_400, dtype=np.int64)
    df = pd.DataFrame({"user_id": np.arange(100, dtype=np.int64) + 1000 * k, "item_id": k, "ts": ts,
        "event": "view", "weight": np.float32(1), "rating": np.float32(1), "batch_id": f"w{k}",
        "date": pd.to_datetime(ts, unit="s").date})
    try:
        r = Warehouse(root).write_arrow("interactions", df, CommitMeta("race", f"w{k}"))
        print(json.dumps({"k": k, "version": r.version}))
    except CommitFailedError as e:
        print(json.dumps({"k": k, "failed": str(e)}))
""")


def test_concurrent_commits_do_not_corrupt(warehouse):
    # Six processes create-and-append the same (not yet existing) table at once.
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_CHILD, warehouse.root, str(k)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(6)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    ok = [r for r in results if "version" in r]
    assert ok, results
    # Every successful writer got its own version; the log is a gap-free sequence.
    assert sorted(r["version"] for r in ok) == list(range(len(ok)))
    vs = warehouse.versions("interactions")
    assert [v.version for v in vs] == list(range(len(ok)))
    # Exactly one creation: a losing creator appended instead of re-creating the table.
    assert [v.operation for v in vs] == ["CREATE TABLE"] + ["WRITE"] * (len(ok) - 1)
    assert sorted(v.run_id for v in vs) == sorted(f"w{r['k']}" for r in ok)
    table = warehouse.read_arrow("interactions").to_pandas()
    assert len(table) == 100 * len(ok)
    assert sorted(table["batch_id"].unique()) == sorted(f"w{r['k']}" for r in ok)
    assert table.groupby("batch_id").size().eq(100).all()


def test_a_task_writes_row_groups_of_many_arrow_batches(spark, warehouse):
    """Spark hands a writing task Arrow batches of maxRecordsPerBatch rows; the files hold fewer, larger row groups."""
    import pyarrow.parquet as pq

    n = 100_000
    per_batch = int(spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch"))
    assert n > 2 * per_batch
    df = spark.range(n, numPartitions=1).selectExpr("id AS item_id", "id % 1000 AS path", "1.0 AS score", "1.0 AS n_v")
    v = warehouse.write_spark("path_scores", df, CommitMeta("test", "row-groups")).version
    files = warehouse.files("path_scores", v)
    assert sum(pq.ParquetFile(f.split("://")[-1]).metadata.num_rows for f in files) == n
    assert all(pq.ParquetFile(f.split("://")[-1]).metadata.num_row_groups == 1 for f in files)
    got = warehouse.read_arrow("path_scores", v)
    assert np.array_equal(np.sort(got.column("item_id").to_numpy()), np.arange(n))
    assert np.array_equal(got.column("path").to_numpy(), got.column("item_id").to_numpy() % 1000)


def test_a_task_writing_many_partitions_keeps_a_bounded_buffer(warehouse, monkeypatch):
    """Buffered rows of all open files stay under the sink's byte cap; every row lands in its partition."""
    from jobs import staging

    monkeypatch.setattr(staging, "_ROW_GROUP_BYTES", 1 << 16)
    sink = staging._FileSink("interactions", warehouse.uri("interactions"), "t")
    peak = 0
    for b in range(40):
        sink.write(staging.conform("interactions", events(500, first_user=500 * b, batch=f"b{b}")))
        peak = max(peak, sum(sink.pending_bytes.values()))
    files = sink.close()
    assert peak < 1 << 16
    assert sum(f.num_records for f in files) == 40 * 500
    assert len({f.partition_values["date"] for f in files}) > 10


def test_files_roll_between_items_of_a_file_group(warehouse, monkeypatch):
    """path_scores' files roll where item_id changes, never inside an item's rows (TableSpec.file_group),
    across a task's Arrow batches; a table without a group rolls after the batch that fills a file."""
    import pyarrow.parquet as pq

    from jobs import staging

    monkeypatch.setattr(staging, "_MAX_ROWS_PER_FILE", 1_000)
    # 7 rows an item in batches of 300 rows (Spark's batching): the cap falls inside items
    ids = np.arange(7_000)
    rows = pd.DataFrame({"item_id": ids // 7, "path": ids % 7, "score": 1.0, "n_v": 7.0})
    sink = staging._FileSink("path_scores", warehouse.uri("path_scores"), "t")
    for lo in range(0, 7_000, 300):
        sink.write(staging.conform("path_scores", rows.iloc[lo:lo + 300]))
    files = sink.close()
    per_file = [pq.read_table(f"{warehouse.uri('path_scores')}/{f.path}", columns=["item_id"]).column(0).to_numpy()
                for f in files]
    assert [f.num_records for f in files] == [len(x) for x in per_file]
    assert len(files) >= 6 and sum(len(x) for x in per_file) == 7_000
    assert all(len(x) == 7 * len(np.unique(x)) for x in per_file)             # whole items only
    assert len(np.unique(np.concatenate([np.unique(x) for x in per_file]))) == 1_000
    assert all(1_000 <= len(x) < 1_000 + 7 for x in per_file[:-1])
    sink = staging._FileSink("interactions", warehouse.uri("interactions"), "t")
    for b in range(6):
        sink.write(staging.conform("interactions", events(400, first_user=400 * b).assign(date=events(1).date[0])))
    assert [f.num_records for f in sink.close()] == [1_200, 1_200]
