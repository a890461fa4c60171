"""String user / item ids through `id_dictionary`, and inputs without timestamps: real Spark, real Delta.

Fault injection only (a commit that raises once, two commits held at a barrier so they race);
Spark and delta-rs themselves are never mocked.
"""
from __future__ import annotations

import json
import threading
import uuid
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from jobs import id_dictionary
from jobs.cli import main as dr
from jobs.ingest import ColumnMap, IngestConfig, IngestError, ingest_path
from jobs.tables import CommitMeta, VersionConflict, Warehouse

STRING = IngestConfig(ids="string")
USERS = [str(uuid.UUID(int=n * 0x1F1F1F1F1F1F1F1F1F1F)) for n in range(1, 7)]     # UUID user ids
ITEMS = [f"B0{n:08d}X" for n in (7, 3, 11, 5, 2, 13)]                               # ASIN-like item ids


def _csv(path, rows: list[tuple], header: str = "uid,asin,ts,event") -> str:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def _dictionary(wh: Warehouse) -> dict[str, dict[str, int]]:
    d = wh.read_arrow("id_dictionary").to_pylist()
    out: dict[str, dict[str, int]] = {"user": {}, "item": {}}
    for r in d:
        assert r["key"] not in out[r["kind"]], f"{r['kind']} {r['key']} has two ids"
        out[r["kind"]][r["key"]] = r["id"]
    return out


def _pairs(wh: Warehouse) -> list[tuple[str, str, int]]:
    """interactions as (user key, item key, ts), mapped back through the dictionary."""
    d = _dictionary(wh)
    user, item = ({v: k for k, v in d[kind].items()} for kind in ("user", "item"))
    return sorted((user[r["user_id"]], item[r["item_id"]], r["ts"]) for r in wh.read_arrow("interactions").to_pylist())


def _versions(wh: Warehouse) -> dict[str, int | None]:
    return {t: wh.version(t) for t in ("interactions", "interactions_quarantine", "id_dictionary")}


def _assert_dense(d: dict[str, dict[str, int]]) -> None:
    for kind, m in d.items():
        assert sorted(m.values()) == list(range(len(m))), f"{kind} ids are not dense from 0: {sorted(m.values())}"


MAP = ColumnMap.parse("user_id=uid,item_id=asin,event=event")
B1 = [(f" {USERS[0]} ", ITEMS[0], 1_600_000_000, "view"), (USERS[1], ITEMS[1], 1_600_000_010, "view"),
      (USERS[0], ITEMS[2], 1_600_000_020, "click"), ("", ITEMS[3], 1_600_000_030, "view"),          # null_id
      (USERS[5], ITEMS[5], 1_600_000_040, "dance"), ("007", "7", 1_600_000_050, "view")]            # unknown_event
B2 = [(USERS[1], ITEMS[0], 1_600_000_100, "view"), (USERS[2], ITEMS[4], 1_600_000_110, "view"),
      (USERS[0], ITEMS[3], 1_600_000_120, "cart"), ("7", "007", 1_600_000_130, "view")]


def test_string_ids_dense_stable_across_batches_and_idempotent(spark, warehouse, tmp_path, capsys):
    r1 = ingest_path(spark, warehouse, _csv(tmp_path / "b1.csv", B1), cols=MAP, cfg=STRING)
    assert (r1.ingested, r1.quarantined) == (4, {"null_id": 1, "unknown_event": 1})
    d1 = _dictionary(warehouse)
    # Sorted key order from 0; trimmed; a quarantined row's keys get no id; "007" is a key, not 7.
    assert d1["user"] == {k: i for i, k in enumerate(sorted([USERS[0], USERS[1], "007"]))}
    assert d1["item"] == {k: i for i, k in enumerate(sorted([ITEMS[0], ITEMS[1], ITEMS[2], "7"]))}
    assert r1.extra["new_keys"] == {"user": 3, "item": 4} and r1.versions["id_dictionary"] == 0
    # Second batch: old keys keep their ids, new keys continue after them in key order.
    r2 = ingest_path(spark, warehouse, _csv(tmp_path / "b2.csv", B2), cols=MAP, cfg=STRING)
    d2 = _dictionary(warehouse)
    assert {k: d2[kind][k] for kind in d1 for k in d1[kind]} == {k: v for m in d1.values() for k, v in m.items()}
    assert [k for k, _ in sorted(d2["user"].items(), key=lambda kv: kv[1])][3:] == sorted([USERS[2], "7"])
    assert [k for k, _ in sorted(d2["item"].items(), key=lambda kv: kv[1])][4:] == sorted([ITEMS[3], ITEMS[4], "007"])
    _assert_dense(d2)
    assert r2.extra["new_keys"] == {"user": 2, "item": 3}
    good = [r for r in B1 if r[0].strip() and r[3] != "dance"] + B2
    assert _pairs(warehouse) == sorted((u.strip(), i, t) for u, i, t, _ in good)
    # The same batch again: nothing added anywhere, no new versions.
    before = _versions(warehouse)
    again = ingest_path(spark, warehouse, str(tmp_path / "b2.csv"), cols=MAP, cfg=STRING)
    assert again.skipped and _versions(warehouse) == before
    # `dr ids` both ways, without Spark.
    assert dr(["ids", "--warehouse", warehouse.root, "--kind", "item", "--key", ITEMS[4], "--key", "nope"]) == 1
    assert capsys.readouterr().out.split("\t")[:3] == ["item", ITEMS[4], str(d2["item"][ITEMS[4]])]
    assert dr(["ids", "--warehouse", warehouse.root, "--kind", "user", "--id", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["found"][0]["key"] == {v: k for k, v in d2["user"].items()}[0]
    # An integer batch on this warehouse is refused before any table changes.
    with pytest.raises(IngestError, match="--ids integer: this warehouse maps string ids"):
        ingest_path(spark, warehouse, str(tmp_path / "b1.csv"), batch_id="int", cols=MAP)
    assert _versions(warehouse) == before


def test_string_batch_on_an_integer_warehouse_is_refused(spark, warehouse, tmp_path):
    warehouse.write_arrow("interactions", pd.DataFrame({
        "user_id": [1], "item_id": [2], "ts": [1_600_000_000], "event": ["view"], "weight": np.float32(1.0),
        "rating": None, "batch_id": "b0", "date": [date(2020, 9, 13)]}), CommitMeta("ingest", "b0"))
    with pytest.raises(IngestError, match="--ids string: this warehouse's interactions were ingested with integer"):
        ingest_path(spark, warehouse, _csv(tmp_path / "b1.csv", B1), cols=MAP, cfg=STRING)
    assert not warehouse.exists("id_dictionary")


def test_crash_after_the_dictionary_commit_is_completed_by_a_rerun(spark, warehouse, tmp_path, monkeypatch):
    ingest_path(spark, warehouse, _csv(tmp_path / "b1.csv", B1), cols=MAP, cfg=STRING)
    real = Warehouse.commit
    crashed = []

    def commit_dies_once_on_interactions(self, staged, meta, *a, **kw):      # fault injection
        if staged.table == "interactions" and not crashed:
            crashed.append(meta.run_id)
            raise RuntimeError("killed between the dictionary commit and the interactions commit")
        return real(self, staged, meta, *a, **kw)

    monkeypatch.setattr(Warehouse, "commit", commit_dies_once_on_interactions)
    src = _csv(tmp_path / "b2.csv", B2)
    with pytest.raises(RuntimeError, match="killed"):
        ingest_path(spark, warehouse, src, cols=MAP, cfg=STRING)
    after_crash = _versions(warehouse)
    assert after_crash == {"interactions": 0, "interactions_quarantine": 1, "id_dictionary": 1}
    ids_after_crash = _dictionary(warehouse)
    done = ingest_path(spark, warehouse, src, cols=MAP, cfg=STRING)
    assert not done.skipped and done.extra == {"new_keys": {}, "id_attempts": 1}     # the mapping was reused
    assert _versions(warehouse) == {**after_crash, "interactions": 1}
    assert _dictionary(warehouse) == ids_after_crash
    good = [r for r in B1 if r[0].strip() and r[3] != "dance"] + B2
    assert _pairs(warehouse) == sorted((u.strip(), i, t) for u, i, t, _ in good)    # every event once


def test_concurrent_ingests_never_share_or_split_an_id(spark, warehouse, tmp_path, monkeypatch):
    ingest_path(spark, warehouse, _csv(tmp_path / "b0.csv", B1[:2]), cols=MAP, cfg=STRING)
    # Overlapping new keys: both batches bring USERS[3] and ITEMS[4]; each brings its own too.
    a = [(USERS[3], ITEMS[4], 1_600_001_000, "view"), (USERS[2], ITEMS[0], 1_600_001_001, "view"),
         (USERS[0], "A-only", 1_600_001_002, "view")]
    b = [(USERS[3], ITEMS[4], 1_600_002_000, "view"), (USERS[4], ITEMS[5], 1_600_002_001, "view"),
         ("b-only", ITEMS[1], 1_600_002_002, "view")]
    real = Warehouse.commit
    barrier = threading.Barrier(2, timeout=300)
    held = threading.local()

    def racing_commit(self, staged, meta, *a, **kw):      # fault injection: both first attempts commit at once
        if staged.table == "id_dictionary" and not getattr(held, "done", False):
            held.done = True
            barrier.wait()
        return real(self, staged, meta, *a, **kw)

    monkeypatch.setattr(Warehouse, "commit", racing_commit)
    results, errors = {}, []

    def run(name, rows):
        try:
            results[name] = ingest_path(spark, warehouse, _csv(tmp_path / f"{name}.csv", rows), cols=MAP, cfg=STRING)
        except Exception as e:  # reported below, not swallowed
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n, r)) for n, r in (("a", a), ("b", b))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert sorted(r.extra["id_attempts"] for r in results.values()) == [1, 2]     # one lost the race and renumbered
    d = _dictionary(warehouse)      # raises if a key has two ids
    _assert_dense(d)
    assert set(d["user"]) == {USERS[0], USERS[1], USERS[2], USERS[3], USERS[4], "b-only"}
    assert set(d["item"]) == {ITEMS[0], ITEMS[1], ITEMS[4], ITEMS[5], "A-only"}
    assert _pairs(warehouse) == sorted((u.strip(), i, t) for u, i, t, _ in B1[:2] + a + b)
    assert warehouse.version("id_dictionary") == 2


def test_commit_on_an_expected_version_refuses_a_moved_table(warehouse):
    rows = pd.DataFrame({"kind": ["item"], "key": ["k"], "id": [0], "batch_id": ["b"]})
    with pytest.raises(VersionConflict):
        warehouse.commit(warehouse.stage_arrow("id_dictionary", rows), CommitMeta("t", "x"), expected_version=0)
    assert warehouse.commit(warehouse.stage_arrow("id_dictionary", rows), CommitMeta("t", "a"),
                            expected_version=-1).version == 0
    stale = warehouse.stage_arrow("id_dictionary", rows)
    warehouse.commit(warehouse.stage_arrow("id_dictionary", rows), CommitMeta("t", "b"), expected_version=0)
    for expected in (-1, 0):     # 0: version 1 exists, found by delta-rs at the commit (no conflict retries)
        with pytest.raises(VersionConflict):
            warehouse.commit(stale, CommitMeta("t", "c"), expected_version=expected)
    assert warehouse.version("id_dictionary") == 1 and warehouse.rows("id_dictionary") == 2


NO_TS = ColumnMap.parse("user_id=uid,item_id=asin")


def test_input_without_timestamps_needs_the_flag_and_follows_file_order(spark, warehouse, tmp_path):
    warehouse.write_arrow("interactions", pd.DataFrame({
        "user_id": [1], "item_id": [2], "ts": [1_600_000_000], "event": ["view"], "weight": np.float32(1.0),
        "rating": None, "batch_id": "b0", "date": [date(2020, 9, 13)]}), CommitMeta("ingest", "b0"))
    src = tmp_path / "in"
    src.mkdir()
    # item = the row's position in file order; "b" is the larger file, which Spark reads first.
    _csv(src / "a.csv", [(u, u) for u in range(5)], header="uid,asin")
    _csv(src / "b.csv", [(u % 7, u) for u in range(5, 1005)], header="uid,asin")
    with pytest.raises(IngestError, match=r"no column 'ts' .*--no-timestamps file-order"):
        ingest_path(spark, warehouse, str(src), cols=NO_TS)
    with pytest.raises(IngestError, match="--no-timestamps file-order: the input has a column 'ts'"):
        ingest_path(spark, warehouse, _csv(tmp_path / "ts.csv", [(1, 2, 3)], header="uid,asin,ts"), cols=NO_TS,
                    cfg=IngestConfig(no_timestamps="file-order"))
    conf = {"spark.sql.files.maxPartitionBytes": "1024", "spark.sql.files.openCostInBytes": "0"}
    old = {k: spark.conf.get(k) for k in conf}
    for k, v in conf.items():        # several splits per file: the order must survive them
        spark.conf.set(k, v)
    try:
        res = ingest_path(spark, warehouse, str(src), cols=NO_TS, cfg=IngestConfig(no_timestamps="file-order"))
    finally:
        for k, v in old.items():
            spark.conf.set(k, v)
    assert (res.ingested, res.quarantined) == (1005, {})
    got = warehouse.read_arrow("interactions").to_pandas()
    got = got[got.batch_id == res.batch_id].sort_values("ts")
    assert got["item_id"].tolist() == list(range(1005))
    assert got["ts"].tolist() == list(range(1_600_000_001, 1_600_000_001 + 1005))
    assert warehouse.versions("interactions")[-1].metadata["dr.ts_base"] == 1_600_000_001


def test_candidates_carry_the_original_ids(spark, tmp_path):
    from test_serving import USERS as N_USERS, hand_built_run

    from jobs.candidates import run_candidates

    wh = Warehouse(tmp_path / "warehouse")
    _, ids, _, _ = hand_built_run(spark, wh)
    keys = pd.DataFrame({"kind": ["user"] * N_USERS + ["item"] * len(ids),
                         "key": [f"u-{u}" for u in range(N_USERS)] + [f"B{i:010d}" for i in ids],
                         "id": np.r_[np.arange(N_USERS), ids], "batch_id": "b1"})
    wh.write_arrow("id_dictionary", keys, CommitMeta("test", "keys"))
    res = run_candidates(spark, wh, run_date=date(2026, 11, 30), top_n=5, log=lambda m: None)
    c = wh.read_arrow("candidates", res.version).to_pandas()
    assert len(c) == res.rows > 0
    assert (c.user_key == "u-" + c.user_id.astype(str)).all()
    assert (c.item_key == c.item_id.map(lambda i: f"B{i:010d}")).all()


def test_with_keys_without_a_dictionary_and_an_older_candidates_table(spark, warehouse):
    df = spark.createDataFrame([(1, 2)], "user_id long, item_id long")
    assert id_dictionary.with_keys(spark, warehouse, df).collect()[0].asDict() == {
        "user_id": 1, "item_id": 2, "user_key": None, "item_key": None}
    # A candidates table written before user_key / item_key existed gains them on the next commit.
    old = pa.table({"user_id": [1], "rank": pa.array([1], pa.int32()), "item_id": [2],
                    "score": pa.array([0.5], pa.float32()), "run_id": ["r0"], "run_date": [date(2026, 11, 1)]})
    write_deltalake(warehouse.uri("candidates"), old, partition_by=["run_date"])
    new = old.set_column(4, "run_id", pa.array(["r1"])).append_column("user_key", pa.array(["u"])) \
        .append_column("item_key", pa.array(["i"]))
    warehouse.write_arrow("candidates", new, CommitMeta("candidates", "r1"))
    got = warehouse.read_arrow("candidates").sort_by("run_id").to_pydict()
    assert (got["user_key"], got["item_key"]) == ([None, "u"], [None, "i"])
