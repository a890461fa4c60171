"""The Spark split job reproduces dr_model.split.paper_split and is stored for every later job."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from dr_model.config import SplitConfig
from dr_model.split import paper_split, user_hash
from jobs import datasets
from jobs.movielens import load_movielens
from jobs.split import load_split, run_split, user_hash_col
from jobs.tables import CommitMeta, Warehouse

CFG = SplitConfig(rating_threshold=4.0, min_events=10, test_users=100, valid_users=80, seed=5)
L = 12


@pytest.fixture(scope="module")
def ml100k(spark, tmp_path_factory) -> Warehouse:
    wh = Warehouse(tmp_path_factory.mktemp("split") / "warehouse")
    datasets.movielens(spark, wh, "ml-100k")
    return wh


def test_user_hash_matches_reference(spark):
    ids = np.array([0, 1, 2, 943, 2**31 - 2, 2**31 - 1, 2**31, 10**12 + 7, 2**62, 2**63 - 1, -1, -(2**63)],
                   dtype=np.int64)
    df = spark.createDataFrame(pd.DataFrame({"u": ids}))
    for seed in (0, 5, 123456):
        got = df.select(user_hash_col(F.col("u"), seed).alias("h")).toPandas()["h"].to_numpy()
        np.testing.assert_array_equal(got, user_hash(ids, seed))


def test_split_equals_paper_split_on_movielens_100k(spark, ml100k):
    res = run_split(spark, ml100k, CFG, L, next_items=3)
    ref = paper_split(load_movielens("ml-100k")[0], CFG, L)
    got = load_split(ml100k)
    for name in ref.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    assert (res.train_samples, res.eval_users) == (len(ref.train_target), 180)
    # Disjoint roles: no evaluation user contributes a training sample.
    assert not set(got.train_user) & set(got.eval_user)
    assert (got.eval_role == 2).sum() == 100 and (got.eval_role == 1).sum() == 80
    # Halves: input = first n//2 events by time, truth = the rest, in order.
    ev = ml100k.read_arrow("eval_users").to_pandas().set_index("user_id")
    raw = ml100k.read_arrow("interactions").to_pandas()
    raw = raw[raw["rating"] >= CFG.rating_threshold].sort_values(["user_id", "ts", "item_id"])
    for u in ev.index[:20]:
        seq = raw.loc[raw["user_id"] == u, "item_id"].tolist()
        row = ev.loc[u]
        assert row["n_input"] == len(seq) // 2 and list(row["truth"]) == seq[len(seq) // 2:]
        assert list(row["input"]) == seq[: len(seq) // 2]
        first = seq[: len(seq) // 2][-L:]
        assert list(row["hist"]) == [-1] * (L - len(first)) + first
    # Windows: the <= L previous items, left-padded.
    tr = ml100k.read_arrow("samples_train").to_pandas()
    nxt = tr.sort_values(["user_id", "pos"])["next"].map(lambda a: list(a) + [-1] * (3 - len(a)))
    np.testing.assert_array_equal(np.stack(nxt.to_numpy()), ref.train_next(3))
    assert tr["hist"].map(len).eq(L).all() and (tr["pos"] >= 1).all()
    short = tr[tr["pos"] == 1].iloc[0]
    assert list(short["hist"][:-1]) == [-1] * (L - 1) and short["hist"][-1] != -1
    md = ml100k.versions("samples_train")[-1]
    assert (md.job, md.run_id, md.metadata["dr.interactions_version"]) == ("split", res.run_id, 0)


def test_split_is_pinned_and_rerun_is_a_no_op(spark, ml100k):
    first = run_split(spark, ml100k, CFG, L)
    again = run_split(spark, ml100k, CFG, L)
    assert again.skipped and again.versions == first.versions
    assert (again.train_samples, again.eval_users) == (first.train_samples, first.eval_users) > (0, 0)
    # New interactions: splitting the pinned old version still gives the same run id and split.
    extra = ml100k.read_arrow("interactions").slice(0, 10)
    ml100k.write_arrow("interactions", extra.to_pandas().assign(batch_id="more"), CommitMeta("t", "more"))
    assert run_split(spark, ml100k, CFG, L, version=0).skipped
    newer = run_split(spark, ml100k, CFG, L)
    assert not newer.skipped and newer.interactions_version == 1
    assert newer.versions["samples_train"] == first.versions["samples_train"] + 1
    # Asking again for the split of version 0 points at the versions that split wrote.
    assert run_split(spark, ml100k, CFG, L, version=0).versions == first.versions
    old = load_split(ml100k, train_version=first.versions["samples_train"])
    assert len(old.train_target) == first.train_samples


def test_heldout_sizes_adapt_to_a_small_dataset(spark, ml100k):
    """The default 1,000 + 1,000 held-out users of 897 eligible: both engines hold out 40% of them."""
    big = SplitConfig(test_users=1000, valid_users=1000)
    ref = paper_split(load_movielens("ml-100k")[0], big, L)
    eligible = len(np.unique(np.concatenate([ref.train_user, ref.eval_user])))
    assert (ref.eval_role == 2).sum() == (ref.eval_role == 1).sum() == int(eligible * 0.4) // 2
    res = run_split(spark, ml100k, big, L)
    got = load_split(ml100k, res.versions["samples_train"], res.versions["eval_users"])
    np.testing.assert_array_equal(got.eval_user, ref.eval_user)
    np.testing.assert_array_equal(got.eval_role, ref.eval_role)
    with pytest.raises(ValueError, match="too small"):
        paper_split(load_movielens("ml-100k")[0].head(200), SplitConfig(min_events=2, max_heldout_fraction=0.001), L)
