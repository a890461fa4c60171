"""`dr data`: MovieLens and the streamed synthetic generator into real Delta tables."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dr_model.synthetic import SyntheticSpec, item_cluster, user_clusters
from jobs import datasets
from jobs.movielens import load_movielens


def test_movielens_100k_tables_and_reload(spark, warehouse):
    res, ing = datasets.movielens(spark, warehouse, "ml-100k")
    assert (res.interactions, res.items, ing.input_rows, ing.quarantined) == (100_000, 1682, 100_000, {})
    inter, items = load_movielens("ml-100k")
    got = warehouse.read_arrow("interactions").to_pandas()
    assert (got["event"] == "rating").all() and got["batch_id"].eq("movielens-ml-100k").all()
    cols = ["user_id", "item_id", "ts", "rating"]
    pd.testing.assert_frame_equal(got[cols].sort_values(cols, ignore_index=True),
                                  inter[cols].sort_values(cols, ignore_index=True), check_dtype=False)
    cat = warehouse.read_arrow("items").to_pandas().set_index("item_id").sort_index()
    assert len(cat) == 1682 and cat.loc[1, "category"] == items.set_index("item_id").loc[1, "category"]
    assert cat["category"].notna().all() and not cat["category"].str.contains(" ").any()
    before = {t: warehouse.version(t) for t in ("interactions", "items")}
    again, _ = datasets.movielens(spark, warehouse, "ml-100k")
    assert again.skipped and {t: warehouse.version(t) for t in before} == before


def test_synthetic_streams_in_chunks_with_ground_truth(spark, warehouse):
    spec = SyntheticSpec(num_users=50, num_items=120, num_clusters=6, events_per_user=8, interests=2, seed=3)
    chunk = 7
    # Bounded memory: the generator never holds more than one chunk of users.
    chunks = list(datasets.iter_chunks(0, spec.num_users, spec, chunk))
    assert len(chunks) == -(-spec.num_users // chunk)
    assert max(len(c) for c in chunks) == chunk * spec.events_per_user
    res = datasets.synthetic(spark, warehouse, spec, chunk_users=chunk)
    assert (res.interactions, res.items) == (spec.num_events, spec.num_items)
    cols = ["user_id", "item_id", "ts", "rating"]
    want = pd.concat(chunks, ignore_index=True).sort_values(cols, ignore_index=True)
    got = warehouse.read_spark(spark, "interactions").toPandas().sort_values(cols, ignore_index=True)
    pd.testing.assert_frame_equal(got[cols], want[cols], check_dtype=False)
    assert got["date"].astype(str).tolist() == pd.to_datetime(got["ts"], unit="s").dt.strftime("%Y-%m-%d").tolist()
    # Planted structure is visible: users' events fall in their own clusters.
    uc = user_clusters(got["user_id"].to_numpy(), spec)
    assert (uc == item_cluster(got["item_id"].to_numpy(), spec)[:, None]).any(axis=1).all()
    # Ground truth and catalog round-trip.
    truth = warehouse.read_arrow("synthetic_truth").to_pandas().sort_values(["user_id", "slot"])
    np.testing.assert_array_equal(truth["cluster"].to_numpy().reshape(-1, 2), user_clusters(np.arange(50), spec))
    items = warehouse.read_arrow("items").to_pandas().sort_values("item_id")
    assert items["category"].tolist() == [f"c{c}" for c in item_cluster(np.arange(120), spec)]
    assert datasets.stored_spec(warehouse) == (spec, chunk)
    assert datasets.synthetic(spark, warehouse, spec, chunk_users=chunk).skipped
    assert warehouse.read_arrow("interactions").num_rows == spec.num_events
    # Candidates against the planted clusters: ranks 1-4 and 11-20 inside a user's clusters, 5-10 outside.
    from datetime import date

    from jobs.tables import CommitMeta
    users = np.arange(spec.num_users)
    uc = user_clusters(users, spec)
    outside = np.array([next(c for c in range(spec.num_clusters) if c not in row) for row in uc])
    rank = np.tile(np.arange(1, 21), len(users))
    user = np.repeat(users, 20)
    inside = (rank <= 4) | (rank > 10)
    item = np.where(inside, uc[user, 0], outside[user]) + spec.num_clusters * (rank % 3)    # same cluster
    cand = pd.DataFrame({"user_id": user, "rank": rank.astype(np.int32), "item_id": item,
                         "score": np.float32(0), "run_id": "r1", "run_date": date(2026, 12, 1),
                         "user_key": None, "item_key": None})
    warehouse.write_arrow("candidates", cand, CommitMeta("test", "r1"))
    got = datasets.planted_precision(spark, warehouse, "r1")
    assert got["users"] == spec.num_users and got["chance"] == 2 / 6
    assert got["planted_precision_at_10"] == 0.4 and got["planted_precision_at_100"] == 14 / 20
    assert datasets.planted_precision(spark, warehouse, "other")["users"] == 0
