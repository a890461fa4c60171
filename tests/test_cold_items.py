"""Cold items: paths by the M-step's size penalty against the live sizes, reranker vectors from the category.

Unit tests of dr_model.cold, then `run_cold_items` on a tiny warehouse written by hand (items,
item_paths, a checkpoint and a succeeded `runs` row: no Ray training), which is also the data
an end-to-end "cold item reaches a user's candidates" test needs (see `cold_world`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from dr_model.cold import assign_cold, code_sums, cosine
from dr_model.config import DRConfig, MStepConfig

# --------------------------------------------------------------------------- dr_model.cold


def test_category_candidates_rank_a_categorys_paths_by_the_share_of_its_items(spark):
    from jobs.cold_items import _Frames, category_candidates

    assign = [[0, 1], [0, 2], [0, 1], [4, 3], [5, 6]]
    cats = ["x", "x", "x", "y", None]
    paths = spark.createDataFrame([(i, j, p, cats[i]) for i, row in enumerate(assign) for j, p in enumerate(row)],
                                  "item_id long, slot int, path long, category string")
    assigned = paths.where("slot = 0").select("item_id", "category")
    cold = spark.createDataFrame([(9, "z")], "item_id long, category string")
    got = {r["category"]: (r["cand_paths"], r["cand_shares"])
           for r in category_candidates(_Frames(paths, assigned, cold), S=2).collect()}
    assert set(got) == {"x", "y"}                                       # z, none: no assigned item
    assert got["x"][0] == [0, 1] and got["y"][0] == [3, 4]              # ties to the smaller path id
    np.testing.assert_allclose(got["x"][1], [1, 2 / 3])
    np.testing.assert_allclose(got["y"][1], [1, 1])


CANDS = np.array([0, 1, 2, 3, 4, 5])
SHARES = np.array([0.9, 0.8, 0.5, 0.4, 0.2, 0.1])


def _cold(C: int, alpha: float, live: np.ndarray, J: int = 2) -> np.ndarray:
    """C cold items of one category whose candidates are CANDS, J paths each."""
    return assign_cold(np.tile(CANDS, (C, 1)), np.tile(SHARES, (C, 1)), live, J, alpha, MStepConfig())


def test_a_tight_penalty_spreads_a_categorys_cold_items_a_loose_one_keeps_its_best_paths():
    live = np.zeros(32, dtype=np.int64)
    loose = _cold(60, 0.0, live)
    assert (np.sort(loose, 1) == [0, 1]).all()                         # everybody on the category's best J
    tight = _cold(60, 1e-3, live)
    used = np.bincount(tight.ravel(), minlength=32)
    assert (np.sort(tight, 1)[:, 1:] != np.sort(tight, 1)[:, :-1]).all()   # J distinct paths each
    assert set(np.unique(tight)) <= set(CANDS) and (used > 0).sum() > 2   # more than J paths, all the category's
    assert used.max() - used[used > 0].min() <= 4                      # and about level: the penalty at work
    assert (live == 0).all()                                           # the caller's sizes are not touched


def test_cold_items_see_the_live_path_sizes():
    alone = _cold(10, 1e-5, np.zeros(32, dtype=np.int64))
    assert (alone == 0).any(1).all()                                   # path 0 is the best and light: all take it
    live = np.zeros(32, dtype=np.int64)
    live[0] = 100                                                      # the trained items crowd it
    crowded = _cold(10, 1e-5, live)
    assert not (crowded == 0).any() and set(np.unique(crowded)) <= set(CANDS)


def test_cold_items_without_candidates_take_the_least_loaded_paths():
    live = np.full(8, 5, dtype=np.int64)
    live[[2, 6]] = 0
    out = assign_cold(np.full((1, 3), -1), np.zeros((1, 3)), live, 2, 1e-3, MStepConfig())
    assert sorted(out[0].tolist()) == [2, 6]
    assert assign_cold(np.zeros((0, 3), np.int64), np.zeros((0, 3)), live, 2, 1e-3, MStepConfig()).shape == (0, 2)


def test_a_partition_of_cold_items_counted_at_scale_places_like_the_whole():
    live = np.zeros(32, dtype=np.int64)
    whole = np.bincount(_cold(240, 1e-6, live).ravel(), minlength=32)
    half = np.bincount(assign_cold(np.tile(CANDS, (120, 1)), np.tile(SHARES, (120, 1)), live, 2, 1e-6,
                                   MStepConfig(), scale=2).ravel(), minlength=32)
    unscaled = np.bincount(_cold(120, 1e-6, live).ravel(), minlength=32)
    # two such partitions together spread like the whole; unscaled, each would crowd the best paths
    assert np.abs(2 * half - whole).max() <= 0.05 * whole.max()
    assert (2 * unscaled)[0] > 1.4 * whole[0] and (unscaled[4:6] == 0).all() and (whole[4:6] > 0).all()


def test_code_sums_merge_partial_sums_and_cosine():
    rng = np.random.default_rng(0)
    V, d = 50, 4
    cat = rng.integers(-1, 3, V)
    emb, bias = rng.normal(size=(V, d)), rng.normal(size=V)
    parts = [code_sums(cat[lo:lo + 7], emb[lo:lo + 7], bias[lo:lo + 7]) for lo in range(0, V, 7)]
    keys, n, b, e = code_sums(*(np.concatenate([p[i] for p in parts]) for i in (0, 3, 2, 1)))
    assert keys.tolist() == [-1, 0, 1, 2] and n.tolist() == np.bincount(cat + 1).tolist()
    for k, g in enumerate(keys):
        np.testing.assert_allclose(e[k], emb[cat == g].sum(0))
        np.testing.assert_allclose(b[k], bias[cat == g].sum())
    sim = cosine(emb, np.tile(emb[:1], (V, 1)))
    np.testing.assert_allclose(sim, emb @ emb[0] / np.linalg.norm(emb, axis=1) / np.linalg.norm(emb[0]))
    assert code_sums(np.zeros(0), np.zeros((0, d)), np.zeros(0))[3].shape == (0, d)


def test_a_partitions_category_sums_merge_across_many_batches(monkeypatch):
    import spark_udfs.cold_udf as cu

    rng = np.random.default_rng(1)
    V, d = 50_000, 4
    emb, bias = rng.normal(size=(V, d)).astype(np.float32), rng.normal(size=V)
    cats = np.array([f"c{i}" for i in rng.integers(0, 3000, V)], dtype=object)
    cats[rng.random(V) < 0.1] = None
    monkeypatch.setattr(cu, "_vectors", lambda ids, state_file, model: (emb[ids], bias[ids]))   # the lookup aside
    batches = [pa.RecordBatch.from_arrays([pa.array(np.arange(lo, lo + 1000)), pa.array(list(cats[lo:lo + 1000]),
                                                                                       pa.string())],
                                          names=["item_id", "category"]) for lo in range(0, V, 1000)]
    out = pa.Table.from_batches(list(cu.category_sum_batches(iter(batches), "", {}))).to_pandas()
    assert len(out) == len(set(cats[pd.notna(cats)])) + 1 and out.category.isna().sum() == 1    # one row per category
    for _, row in out.iterrows():
        sel = pd.isna(cats) if pd.isna(row.category) else cats == row.category
        assert row["items"] == sel.sum()
        np.testing.assert_allclose(row.bias, bias[sel].sum())
        np.testing.assert_allclose(np.array(row.emb), emb[sel].astype(np.float64).sum(0), rtol=1e-9)


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class ColdWorld:
    """What `cold_world` wrote: the run, the categories' items and the user meant to see the cold items."""

    run_id: str
    item_paths_version: int
    cfg: DRConfig
    items_a: np.ndarray         # assigned "A" items: on paths 0..3, reranker bias +2
    items_b: np.ndarray         # assigned "B" items: on paths 8..11, bias -2
    cold_a: np.ndarray          # cold "A" items
    cold_other: np.ndarray      # cold items of an unseen category, no category, empty category
    user: int                   # history: A items only
    model_emb: np.ndarray       # reranker embeddings [V, d] of the assigned items (A then B)
    model_bias: np.ndarray      # [V]
    alpha: float


def cold_world(wh, n_cold_a: int = 100, alpha: float = 1e-4) -> ColdWorld:
    """A tiny warehouse a cold-items / candidates test can run on, written without Ray training.

    K=4, D=2 (16 paths), J=2. Category A: 20 assigned items 1..20 on path 0 and one of 1..3,
    reranker vectors +e_0 with bias +2; category B: 20 items 21..40 on 8 and one of 9..11,
    -e_0, bias -2. Cold: `n_cold_a` A items (1001..) and three with no usable category. User 7's
    interactions are A items 1..5. The run records beam 16 (every path), so the end-to-end test
    is: `run_cold_items`, then `run_candidates(spark, wh, top_n=30)` must list a cold A item for
    user 7 (its vector is A's mean: bias +2 beats every B item; its paths are A's, all beamed).
    """
    from jobs import runs
    from jobs.tables import CommitMeta
    from dr_model.model import DRModel
    from ray_trainers.checkpoint import CheckpointMeta, run_dir, save_checkpoint

    cfg = DRConfig().with_overrides([
        "model.K=4", "model.D=2", "model.J=2", "model.item_dim=8", "model.user_dim=8", "model.rerank_dim=8",
        "model.node_dim=4", "model.hidden=8", "model.seq_len=5", "search.score_paths=4", "search.beam=16"])
    a, b = np.arange(1, 21), np.arange(21, 41)
    cold_a, cold_other = 1001 + np.arange(n_cold_a), np.array([2001, 2002, 2003])
    items = pd.DataFrame({
        "item_id": np.concatenate([a, b, cold_a, cold_other]),
        "title": None,
        "category": ["A"] * 20 + ["B"] * 20 + ["A"] * n_cold_a + ["C", None, ""]})
    wh.write_arrow("items", items, CommitMeta("test", "catalog"))
    ids = np.concatenate([a, b])
    paths = np.stack([np.r_[np.zeros(20), np.full(20, 8)], np.r_[1 + np.arange(20) % 3, 9 + np.arange(20) % 3]], 1)
    ip = pa.table({"item_id": np.repeat(ids, 2), "slot": np.tile(np.arange(2, dtype=np.int32), 40),
                   "path": paths.astype(np.int64).ravel(), "score": np.ones(80)})
    ip_v = wh.write_arrow("item_paths", ip, CommitMeta("mstep", "r1")).version

    torch.manual_seed(0)
    model = DRModel(cfg.model, len(ids))
    rng = np.random.default_rng(0)
    emb = rng.normal(scale=0.1, size=(40, 8)).astype(np.float32)
    emb[:20, 0] += 1
    emb[20:, 0] -= 1
    bias = np.r_[np.full(20, 2.0), np.full(20, -2.0)] + rng.normal(scale=0.1, size=40)
    with torch.no_grad():
        model.reranker.item_emb.weight[:40] = torch.from_numpy(emb)
        model.reranker.bias.weight[:40, 0] = torch.from_numpy(bias).float()
    meta = CheckpointMeta(run_id="r1", round=0, item_paths_version=ip_v, samples_version=0, config=cfg.to_dict(),
                          config_hash=cfg.hash(), epochs_done=1, epochs_total=1, num_items=40, finished=True)
    ck = save_checkpoint(run_dir(wh.root, "r1"), meta, model.state_dict(), None, ids)

    user, hist = 7, a[:5]
    inter = pd.DataFrame({"user_id": user, "item_id": hist, "ts": 1_700_000_000 + np.arange(5), "event": "rating",
                          "weight": np.float32(1), "rating": np.float32(5), "batch_id": "b1",
                          "date": pd.Timestamp("2023-11-14").date()})
    inter_v = wh.write_arrow("interactions", inter, CommitMeta("test", "b1")).version
    runs.record(wh, runs.RunRecord("r1", "train", "succeeded", runs.now(), cfg.hash(),
                                   {"item_paths": ip_v, "interactions": inter_v}, ck,
                                   {"alpha": alpha, "retrieval_beam": 16}))
    return ColdWorld("r1", ip_v, cfg, a, b, cold_a, cold_other, user, emb, bias.astype(np.float32), alpha)


def test_run_cold_items_spreads_a_category_and_writes_paths_vectors_and_index(spark, warehouse):
    from jobs.cold_items import run_cold_items
    from jobs.path_index import find_path_index
    from jobs.tables import TABLES, CommitMeta

    wh = warehouse
    w = cold_world(wh)
    res = run_cold_items(spark, wh, log=lambda m: None)
    C = len(w.cold_a) + len(w.cold_other)
    assert (res.cold_items, res.by_category, res.by_least_loaded) == (C, len(w.cold_a), 3) and not res.skipped

    cp = wh.read_arrow("cold_item_paths").to_pandas()
    assert len(cp) == 2 * C and (cp.groupby("item_id").path.nunique() == 2).all()
    assert set(cp.item_paths_version) == {w.item_paths_version} and set(cp.run_id) == {"r1"}
    a_rows, other = cp[cp.item_id.isin(w.cold_a)], cp[cp.item_id.isin(w.cold_other)]
    assert set(a_rows.method) == {"category"} and set(other.method) == {"least_loaded"}
    # the category's paths only, but more than J of them: 100 cold items on 2 paths would crowd them
    assert set(a_rows.path) <= {0, 1, 2, 3} and a_rows.path.nunique() > 2
    final = np.array([20, 7, 7, 6]) + np.bincount(a_rows.path, minlength=4)[:4]      # live sizes + cold
    assert final.max() - final.min() < final.max() / 2                 # A's paths level out, trained items counted
    assert not set(other.path) & {0, 1, 2, 3, 8, 9, 10, 11}             # least-loaded: paths nobody uses
    unit = w.model_emb[:20] / np.linalg.norm(w.model_emb[:20], axis=1, keepdims=True)
    assert set(a_rows.neighbor_item_id) == {w.items_a[np.argmax(unit @ w.model_emb[:20].mean(0))]}
    assert set(other.neighbor_item_id) == {-1}

    cv = wh.read_arrow("cold_item_vectors")
    assert cv.schema == TABLES["cold_item_vectors"].schema
    cv = cv.to_pandas().set_index("item_id")
    assert sorted(cv.index) == sorted([*w.cold_a, *w.cold_other])
    assert set(cv.item_paths_version) == {w.item_paths_version} and set(cv.run_id) == {"r1"}
    emb = np.stack(cv.embedding.to_numpy())
    is_a = cv.index.isin(w.cold_a)
    np.testing.assert_allclose(emb[is_a], np.tile(w.model_emb[:20].mean(0), (is_a.sum(), 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cv.bias[is_a], w.model_bias[:20].mean(), rtol=1e-5)
    np.testing.assert_allclose(emb[~is_a], np.tile(w.model_emb.mean(0), (3, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cv.bias[~is_a], w.model_bias.mean(), rtol=1e-4, atol=1e-5)

    # the index a serving bundle picks for the run's item_paths version holds learned + cold rows
    assert find_path_index(wh, w.item_paths_version) == res.versions["path_index"]
    idx = wh.read_arrow("path_index", res.versions["path_index"]).to_pandas()
    assert len(idx) == 80 + 2 * C and idx[idx.item_id > 1000].score.isna().all()
    merged = idx.merge(cp, on=["item_id", "slot"])
    assert (merged.path_x == merged.path_y).all() and len(merged) == 2 * C

    # same run, same catalog: nothing new; one more cold item: new versions with it
    before = {t: wh.version(t) for t in ("cold_item_paths", "cold_item_vectors", "path_index")}
    again = run_cold_items(spark, wh, log=lambda m: None)
    assert again.skipped and again.versions == res.versions
    assert {t: wh.version(t) for t in before} == before
    wh.merge("items", pd.DataFrame({"item_id": [1500], "title": [None], "category": ["B"]}),
             CommitMeta("test", "catalog-2"))
    more = run_cold_items(spark, wh, log=lambda m: None)
    assert more.cold_items == C + 1 and not more.skipped
    new = wh.read_arrow("cold_item_paths").to_pandas()
    assert set(new[new.item_id == 1500].path) <= {8, 9, 10, 11}
    assert find_path_index(wh, w.item_paths_version) == more.versions["path_index"] > res.versions["path_index"]


def test_a_cold_item_reaches_the_candidates_of_a_user_whose_history_holds_its_category(spark, warehouse):
    from datetime import date

    from jobs.candidates import run_candidates
    from jobs.cold_items import run_cold_items

    world = cold_world(warehouse)
    run_cold_items(spark, warehouse, log=lambda m: None)
    res = run_candidates(spark, warehouse, run_date=date(2026, 11, 30), top_n=30, log=lambda m: None)
    c = warehouse.read_arrow("candidates", res.version).to_pandas()
    mine = set(c[c.user_id == world.user].item_id)
    assert res.users == 1 and mine & set(world.cold_a)               # a cold A item, recommended
    assert not mine & set(world.items_b)                            # A's vectors outrank B's for an A user
    assert not mine & set(world.items_a[:5])                        # history never recommended back
