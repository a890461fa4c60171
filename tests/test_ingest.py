"""`dr ingest` on a real SparkSession and real Delta tables: rules, counts, idempotency, failures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

from jobs.ingest import ColumnMap, IngestConfig, IngestError, ingest_path

CSV = """uid,movie,when,action,stars
1,10,1600000000,view,
1,10,1600000000,view,
1,10,1600000000,view,
2,11,2020-09-13T12:00:00Z,click,4
x,12,1600000000,view,
,13,1600000000,view,
3,1.5,1600000000,view,
4,14,notatime,view,
5,15,-5,view,
6,16,99999999999,view,
7,17,1600000000,dance,
8,18,1600000000,view,3,surplus
9,19,1600086400.0,PURCHASE,5
10,20,1600000000,view,great
"""
MAP = ColumnMap.parse("user_id=uid,item_id=movie,ts=when,event=action,rating=stars")


def table_versions(wh) -> dict[str, int | None]:
    return {t: wh.version(t) for t in ("interactions", "interactions_quarantine")}


def test_csv_rules_counts_and_idempotent_reingest(spark, warehouse, tmp_path):
    src = tmp_path / "batch.csv"
    src.write_text(CSV)
    res = ingest_path(spark, warehouse, str(src), cols=MAP)
    assert res.input_rows == 14
    assert res.quarantined == {"duplicate": 2, "non_integer_id": 2, "null_id": 1, "ts_unparsable": 1,
                               "ts_out_of_range": 2, "unknown_event": 1, "schema_drift": 1, "bad_rating": 1}
    assert res.ingested + sum(res.quarantined.values()) == res.input_rows
    good = warehouse.read_arrow("interactions").to_pandas().sort_values("user_id", ignore_index=True)
    assert good["user_id"].tolist() == [1, 2, 9]
    assert good["ts"].tolist() == [1_600_000_000, 1_599_998_400, 1_600_086_400]
    assert good["event"].tolist() == ["view", "click", "purchase"]
    assert good["rating"].fillna(-1).tolist() == [-1, 4.0, 5.0]
    assert [str(d) for d in good["date"]] == ["2020-09-13", "2020-09-13", "2020-09-14"]
    q = warehouse.read_arrow("interactions_quarantine").to_pandas()
    assert len(q) == 11 and (q["batch_id"] == res.batch_id).all() and q["source"].str.endswith("batch.csv").all()
    bad_id = q[q["rule"] == "non_integer_id"].set_index("field")
    assert bad_id.loc["user_id", "detail"] == "x" and bad_id.loc["item_id", "detail"] == "1.5"
    assert '"_corrupt_record":"8,18,1600000000,view,3,surplus"' in q.loc[q["rule"] == "schema_drift", "raw"].item()
    assert q.loc[q["rule"] == "ts_unparsable", "detail"].item() == "notatime"
    md = warehouse.versions("interactions")[-1]
    assert (md.job, md.run_id, md.metadata["dr.input_rows"]) == ("ingest", res.batch_id, 14)
    # Same batch again: nothing added, no new versions.
    before = table_versions(warehouse)
    again = ingest_path(spark, warehouse, str(src), cols=MAP)
    assert again.skipped and table_versions(warehouse) == before
    assert warehouse.read_arrow("interactions").num_rows == 3
    # Same batch id given explicitly by another path also adds nothing.
    assert ingest_path(spark, warehouse, str(src), batch_id=res.batch_id, cols=MAP).skipped


def test_parquet_typed_columns_and_schema_drift(spark, warehouse, tmp_path):
    n = 1000
    df = pd.DataFrame({
        "u": np.arange(n, dtype=np.float64), "i": np.arange(n, dtype=np.int64) % 50,
        "t": pd.array(1_600_000_000_000 + np.arange(n, dtype=np.int64) * 1000, dtype="Int64"),
        "note": "x"})
    df.loc[3, "u"] = 3.25          # non-integer id in a float column
    df.loc[4, "u"] = np.nan        # null id
    df.loc[5, "t"] = pd.NA         # missing time
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), src / "part-0.parquet")
    cols = ColumnMap(user_id="u", item_id="i", ts="t")
    # An unmapped column is schema drift: refused by default, and no table is created.
    with pytest.raises(IngestError, match=r"unexpected input column\(s\) \['note'\]"):
        ingest_path(spark, warehouse, str(src), cols=cols, cfg=IngestConfig(ts_unit="ms"))
    assert table_versions(warehouse) == {"interactions": None, "interactions_quarantine": None}
    with pytest.raises(IngestError, match="no column 'user' for field 'user_id'"):
        ingest_path(spark, warehouse, str(src), cols=ColumnMap(user_id="user", item_id="i", ts="t"))
    res = ingest_path(spark, warehouse, str(src), cols=cols, cfg=IngestConfig(ts_unit="ms", extra_columns="ignore"))
    assert res.ignored_columns == ("note",)
    assert res.quarantined == {"non_integer_id": 1, "null_id": 1, "ts_unparsable": 1}
    assert res.ingested == n - 3 and res.input_rows == n
    got = warehouse.read_spark(spark, "interactions").orderBy("user_id").toPandas()
    assert got["user_id"].tolist() == [u for u in range(n) if u not in (3, 4, 5)]
    assert (got["ts"] == 1_600_000_000 + got["user_id"]).all()
    assert (got["event"] == "rating").all() and (got["weight"] == 1.0).all()
    assert warehouse.read_arrow("interactions").num_rows == n - 3
    assert len({str(d) for d in got["date"]}) == 1


def test_delta_input(spark, warehouse, tmp_path):
    src = str(tmp_path / "src_delta")
    write_deltalake(src, pd.DataFrame({"user_id": [1, 2, 2], "item_id": [5, 6, 6], "ts": [1_600_000_000] * 3,
                                       "event": ["view", "cart", "cart"], "weight": [1.0, 2.0, 2.0]}))
    res = ingest_path(spark, warehouse, src)
    assert (res.input_rows, res.ingested, res.quarantined) == (3, 2, {"duplicate": 1})
    got = warehouse.read_arrow("interactions").to_pandas().sort_values("user_id")
    assert got["weight"].tolist() == [1.0, 2.0] and got["event"].tolist() == ["view", "cart"]


def test_unreadable_input_fails_clearly_and_changes_nothing(spark, warehouse, tmp_path):
    ok = tmp_path / "ok.csv"
    ok.write_text("user_id,item_id,ts\n1,2,1600000000\n")
    first = ingest_path(spark, warehouse, str(ok))
    before = table_versions(warehouse)
    assert first.ingested == 1 and before == {"interactions": 0, "interactions_quarantine": 0}
    with pytest.raises(IngestError, match="no such file or folder"):
        ingest_path(spark, warehouse, str(tmp_path / "missing.parquet"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "part-0.parquet").write_bytes(b"this is not parquet at all" * 100)
    with pytest.raises(IngestError, match="cannot read"):
        ingest_path(spark, warehouse, str(junk))
    assert table_versions(warehouse) == before
    assert warehouse.read_arrow("interactions").num_rows == 1
