"""`dr train --mode incremental` on MovieLens-100K cut by time: real ingest, Spark, Ray Train, Delta tables.

Night 1 trains on the first 85 % of the events (full); night 2 ingests the rest and learns from
it alone: samples of the new events only, the user state merged, the vocabulary grown with the
night's new items and aged, s[v,c] merged with a decay per day of data, the model warm-started.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dr_model.config import DRConfig
from jobs import runs
from jobs.candidates import run_candidates
from jobs.datasets import movielens
from jobs.ingest import ingest_path
from jobs.tables import Warehouse
from jobs.train import run_train
from ray_trainers.config import RayConfig

RAY = RayConfig(num_workers=0)
QUIET = lambda m: None  # noqa: E731


class Crash(RuntimeError):
    pass


def _cfg() -> DRConfig:
    # a short schedule (the pipeline test runs the defaults); items unseen for 60 days of data age out
    return DRConfig().with_overrides(["train.em_rounds=1", "train.joint_epochs=3", "train.structure_epochs=2",
                                      "incremental.epochs=1", "incremental.item_ttl_days=60"])


@pytest.fixture(scope="module")
def nights(spark, ray_local, tmp_path_factory):
    """(warehouse, events of night 1, events of night 2, night-1 result, night-2 result, night-2 logs)."""
    base = tmp_path_factory.mktemp("incremental")
    src = Warehouse(base / "source")
    movielens(spark, src, "ml-100k")
    ev = src.read_arrow("interactions").to_pandas()[["user_id", "item_id", "ts", "rating", "event"]]
    cut = int(np.quantile(ev.ts, 0.85))
    first, second = ev[ev.ts <= cut], ev[ev.ts > cut]
    for name, part in (("night1", first), ("night2", second)):
        (base / name).mkdir()
        part.to_parquet(base / name / "part.parquet", index=False)
    wh, cfg = Warehouse(base / "warehouse"), _cfg()
    ingest_path(spark, wh, str(base / "night1"), batch_id="b1")
    r1 = run_train(spark, wh, cfg, RAY, "night-1", log=QUIET, mode="auto")
    ingest_path(spark, wh, str(base / "night2"), batch_id="b2")

    def crash_after_mstep(msg: str) -> None:
        if msg.startswith("retrieval beam"):
            raise Crash("killed after the M-step")

    with pytest.raises(Crash):
        run_train(spark, wh, cfg, RAY, "night-2", log=crash_after_mstep, mode="auto")
    versions_after_crash = {t: wh.version(t) for t in ("samples_train", "user_state", "item_state", "item_paths")}
    logs: list[str] = []
    r2 = run_train(spark, wh, cfg, RAY, "night-2", log=logs.append, mode="auto")
    return wh, cfg, first, second, r1, r2, logs, versions_after_crash


def _kept(df: pd.DataFrame, cfg: DRConfig) -> pd.DataFrame:
    return df[df.rating.isna() | (df.rating >= cfg.split.rating_threshold)].sort_values(["user_id", "ts", "item_id"])


def test_first_night_full_second_incremental(nights):
    wh, cfg, first, second, r1, r2, logs, _ = nights
    assert r1.metrics["mode"] == "full" and r2.metrics["mode"] == "incremental"
    assert r2.metrics["previous_run"] == "night-1"
    assert {"user_state", "item_state", "path_scores"} <= set(r1.table_versions)
    meta = json.loads((Path(r2.checkpoint) / "meta.json").read_text())
    assert meta["item_paths_version"] == r2.table_versions["item_paths"]      # checkpoint and paths pair
    assert r2.metrics["days"] == pytest.approx((second.ts.max() - first.ts.max()) / 86400)
    assert r2.metrics["decay"] == pytest.approx(cfg.incremental.decay_per_day ** r2.metrics["days"])


def test_night_samples_are_the_new_events_only(nights):
    wh, cfg, first, second, r1, r2, _, _ = nights
    s = wh.read_arrow("samples_train", r2.table_versions["samples_train"]).to_pandas()
    held = set(wh.read_arrow("eval_users", r1.table_versions["eval_users"]).column("user_id").to_pylist())
    # the reference: every kept event of night 2 with an event before it, for eligible users not held out
    allk = _kept(pd.concat([first, second]), cfg)
    allk["pos"] = allk.groupby("user_id").cumcount()
    allk["n"] = allk.groupby("user_id").user_id.transform("size")
    new = allk[(allk.ts > first.ts.max()) & (allk.pos >= 1) & ~allk.user_id.isin(held)
               & (allk.n >= cfg.split.min_events)]
    assert len(s) == len(new) > 0
    got = s.set_index(["user_id", "pos"]).sort_index()
    ref = new.set_index(["user_id", "pos"]).sort_index()
    assert (got.index == ref.index).all() and (got.target.values == ref.item_id.values).all()
    # one history checked in full: the L kept items before the event, in time order, left-padded
    u, p = ref.index[len(ref) // 2]
    items = allk[allk.user_id == u].item_id.to_numpy()
    L = cfg.model.seq_len
    want = np.concatenate([np.full(max(L - p, 0), -1), items[max(p - L, 0):p]])
    assert list(got.loc[(u, p)]["hist"]) == list(want)


def test_user_state_is_the_last_kept_events(nights):
    wh, cfg, first, second, r1, r2, _, _ = nights
    st = wh.read_arrow("user_state", r2.table_versions["user_state"]).to_pandas().set_index("user_id")
    allk = _kept(pd.concat([first, second]), cfg)
    assert len(st) == allk.user_id.nunique()
    L = cfg.model.seq_len
    for u in allk.user_id.drop_duplicates().sample(20, random_state=0):
        mine = allk[allk.user_id == u]
        assert list(st.loc[u, "items"]) == list(mine.item_id.tail(L))
        assert st.loc[u, "n_events"] == len(mine) and st.loc[u, "last_ts"] == mine.ts.max()


def test_vocabulary_grows_and_ages(nights):
    wh, cfg, first, second, r1, r2, _, _ = nights
    ip1 = set(wh.read_arrow("item_paths", r1.table_versions["item_paths"]).column("item_id").to_pylist())
    ip2 = set(wh.read_arrow("item_paths", r2.table_versions["item_paths"]).column("item_id").to_pylist())
    allk = _kept(pd.concat([first, second]), cfg)
    end = allk.ts.max()
    last = allk.groupby("item_id").ts.max()
    live = set(last[last >= end - cfg.incremental.item_ttl_days * 86400].index)
    s2 = set(wh.read_arrow("samples_train", r2.table_versions["samples_train"]).column("target").to_pylist())
    assert ip2 == (ip1 | s2) & live                     # new items in, aged items out
    assert ip2 - ip1 and ip1 - ip2, "the cut grows and ages the vocabulary"
    assert len(wh.read_arrow("item_paths", r2.table_versions["item_paths"])) == cfg.model.J * len(ip2)


def test_scores_merge_decays_items_without_new_samples(nights):
    wh, cfg, first, second, r1, r2, _, _ = nights
    p1 = wh.read_arrow("path_scores", r1.table_versions["path_scores"]).to_pandas()
    p2 = wh.read_arrow("path_scores", r2.table_versions["path_scores"]).to_pandas()
    s2 = set(wh.read_arrow("samples_train", r2.table_versions["samples_train"]).column("target").to_pylist())
    ip2 = set(wh.read_arrow("item_paths", r2.table_versions["item_paths"]).column("item_id").to_pylist())
    assert set(p2.item_id) <= ip2                        # aged items' scores dropped
    quiet = sorted((set(p1.item_id) & ip2) - s2)
    assert quiet
    a = p1[p1.item_id.isin(quiet)].sort_values(["item_id", "path"]).reset_index(drop=True)
    b = p2[p2.item_id.isin(quiet)].sort_values(["item_id", "path"]).reset_index(drop=True)
    eta = r2.metrics["decay"]
    assert (a[["item_id", "path"]].values == b[["item_id", "path"]].values).all()
    np.testing.assert_allclose(b.score, eta * a.score, rtol=1e-9)
    np.testing.assert_allclose(b.n_v, eta * a.n_v, rtol=1e-9)


def test_failed_night_reruns_without_doubling(spark, nights):
    wh, cfg, first, second, r1, r2, logs, after_crash = nights
    assert any("M-step already committed" in line for line in logs)
    for t in ("samples_train", "user_state", "item_state"):
        assert r2.table_versions[t] == after_crash[t], f"{t} was rewritten by the rerun"
    assert [r.status for r in runs.history(wh, "train") if r.run_id == "night-2"] == ["started", "failed", "started",
                                                                                        "succeeded"]
    before = {t: wh.version(t) for t in ("samples_train", "user_state", "item_paths", "path_scores", "path_index")}
    again = run_train(spark, wh, cfg, RAY, "night-2", log=QUIET, mode="auto")
    assert again.skipped and again.table_versions == r2.table_versions
    assert {t: wh.version(t) for t in before} == before


def test_candidates_for_one_day_read_the_state(spark, nights):
    wh, cfg, first, second, r1, r2, _, _ = nights
    day = pd.Timestamp(int(second.ts.max()), unit="s").date()
    res = run_candidates(spark, wh, train_run_id="night-2", run_id="cand-night-2", active_on=day, top_n=10, log=QUIET)
    c = wh.read_arrow("candidates", res.version).to_pandas()
    c = c[c.run_id == "cand-night-2"]
    active = set(second[pd.to_datetime(second.ts, unit="s").dt.date == day].user_id)
    assert res.users == c.user_id.nunique() > 0 and set(c.user_id) <= active
    st = wh.read_arrow("user_state", r2.table_versions["user_state"]).to_pandas().set_index("user_id")
    u = int(c.user_id.iloc[0])
    assert not set(c[c.user_id == u].item_id) & set(st.loc[u, "items"])       # history never recommended back


def test_a_night_without_new_interactions_carries_the_model_over(spark, nights):
    wh, cfg, first, second, r1, r2, _, _ = nights
    r3 = run_train(spark, wh, cfg, RAY, "night-3", log=QUIET, mode="incremental")
    assert r3.metrics["mode"] == "incremental" and r3.metrics["new_samples"] == 0
    assert r3.checkpoint == r2.checkpoint
    for t in ("item_paths", "path_index", "path_scores", "interactions"):
        assert r3.table_versions[t] == r2.table_versions[t], t
    assert r3.metrics["data_end_ts"] == r2.metrics["data_end_ts"]


def test_auto_mode_runs_a_full_night_after_a_collapsed_structure(tmp_path):
    """An automatic night builds on the last run unless its M-step left the paths collapsed
    (train.collapse_factor x the target path size its commit records): then it runs full."""
    import pyarrow as pa

    from jobs.tables import CommitMeta
    from jobs.train import _mode

    wh, cfg = Warehouse(tmp_path / "wh"), DRConfig()
    V, J = 50, cfg.model.J

    def paths(size: float) -> int:
        tbl = pa.table({"item_id": np.repeat(np.arange(V, dtype=np.int64), J),
                        "slot": np.tile(np.arange(J, dtype=np.int32), V),
                        "path": np.tile(np.arange(J, dtype=np.int64), V), "score": pa.nulls(V * J, pa.float64())})
        meta = CommitMeta("dr-mstep", "n1", 1, extra={"path_size": size, "target_path_size": 10.0})
        return wh.write_arrow("item_paths", tbl, meta, mode="overwrite").version

    logs: list[str] = []
    for size, kind in ((500.0, "full"), (12.0, "incremental")):
        v = paths(size)
        runs.record(wh, runs.RunRecord(f"n{v}", "train", "succeeded", runs.now(), None,
                                       {"item_paths": v, "user_state": 0, "item_state": 0, "path_scores": 0}))
        got, prev = _mode(wh, "next", "auto", cfg, logs.append)
        assert (got, prev.run_id) == (kind, f"n{v}"), logs
    assert any("collapsed (path size 500.0 > 4 x the target 10.0)" in m for m in logs), logs
    # explicitly incremental: the operator's choice stands
    assert _mode(wh, "next", "incremental", cfg, logs.append)[0] == "incremental"
