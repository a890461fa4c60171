"""The serving bundle and `dr candidates` on it: real Spark, real Delta tables, a hand-built train run.

The run is written the way `dr train` records one (item_paths, path_index, checkpoint, runs row)
around an untrained model with a budgeted item table, so this needs no Ray and takes seconds.
"""
from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
import torch

from dr_model.config import DRConfig
from dr_model.index import PathIndex
from dr_model.model import DRModel
from dr_model.serving import ServingBundle
from dr_model.vocab import Vocab
from jobs import runs
from jobs.candidates import run_candidates
from jobs.serving import ensure_bundle, record_trained_model
from jobs.tables import CommitMeta, Warehouse

V, USERS, L = 600, 40, 12


def _config() -> DRConfig:
    # item_rows < V: the item tables are budgeted (composed rows + an exact-row map), as at catalog scale
    return DRConfig().with_overrides(["model.K=8", "model.D=2", "model.J=2", "model.item_dim=16", "model.user_dim=16",
                                      "model.rerank_dim=16", "model.node_dim=8", "model.hidden=32",
                                      f"model.seq_len={L}", "model.item_rows=256"])


def hand_built_run(spark, wh: Warehouse, run_id: str = "night-1") -> tuple[DRModel, np.ndarray, np.ndarray, DRConfig]:
    """A succeeded train run of an untrained model -> (model, item ids [V], paths [V, J], config)."""
    cfg = _config()
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10 ** 9, V, replace=False)).astype(np.int64)
    torch.manual_seed(0)
    model = DRModel(cfg.model, V, counts=torch.from_numpy(rng.integers(1, 50, V))).eval()
    assign = np.stack([rng.choice(cfg.model.num_paths, cfg.model.J, replace=False) for _ in range(V)])
    ts = np.arange(USERS * L) * 60 + 1_700_000_000
    inter = pd.DataFrame({"user_id": np.repeat(np.arange(USERS, dtype=np.int64), L),
                          "item_id": ids[rng.integers(0, V, USERS * L)], "ts": ts, "event": "view",
                          "weight": np.float32(1.0), "rating": None, "batch_id": "b1",
                          "date": pd.to_datetime(ts, unit="s").date})
    iv = wh.write_arrow("interactions", inter, CommitMeta("ingest", "b1")).version
    record_trained_model(spark, wh, run_id, model, ids, assign, cfg, {"interactions": iv}, {"retrieval_beam": 6})
    return model, ids, assign, cfg


@pytest.fixture(scope="module")
def served(spark, tmp_path_factory):
    wh = Warehouse(tmp_path_factory.mktemp("serving") / "warehouse")
    return (wh, *hand_built_run(spark, wh))


def test_bundle_retrieves_what_the_model_retrieves(spark, served):
    wh, model, ids, assign, cfg = served
    run = runs.latest(wh, "train", status="succeeded")
    path = ensure_bundle(spark, wh, run, log=lambda m: None)
    assert ensure_bundle(spark, wh, run, log=lambda m: None) == path          # built once
    assert not str(path).startswith(tuple(wh.uri(t) + "/" for t in ("runs", "path_index", "item_paths")))
    b = ServingBundle.open(path)
    # the towers carry no item-side reranker table
    assert not any(k.startswith("reranker.") for k in b.towers.state_dict())
    hist = np.where(np.random.default_rng(1).random((50, L)) < 0.2, -1, ids[np.random.default_rng(2).integers(0, V, (50, L))])
    got, got_s, scored = b.retrieve(hist, 6, 10)
    vocab = Vocab(ids)
    seq = vocab.seq(hist)
    h = vocab.index(hist)
    r, c = np.nonzero(h >= 0)
    want, want_s, want_scored = model.retrieve(seq, PathIndex.build(assign), 6, 10, exclude=(r.astype(np.int64), h[r, c]))
    np.testing.assert_array_equal(scored, want_scored)
    # fp16 item vectors: the same items, scores within fp16 rounding
    same = np.mean([set(x[x >= 0]) == set(vocab.raw(y)[y >= 0]) for x, y in zip(got, want)])
    assert same >= 0.95
    fin = np.isfinite(want_s)
    np.testing.assert_allclose(np.sort(got_s[fin]), np.sort(want_s[fin]), atol=2e-2)
    assert all(not set(g[g >= 0]) & set(hh[hh >= 0]) for g, hh in zip(got, hist))     # history never returned


def test_candidates_from_the_bundle(spark, served):
    wh = served[0]
    res = run_candidates(spark, wh, run_date=date(2026, 11, 30), top_n=15, log=lambda m: None)
    c = wh.read_arrow("candidates", res.version).to_pandas()
    assert res.users == c.user_id.nunique() == USERS and res.rows == len(c)
    assert c.groupby("user_id").size().max() <= 15
    inter = wh.read_arrow("interactions").to_pandas()
    for u, g in c.groupby("user_id"):
        assert not set(g.item_id) & set(inter[inter.user_id == u].item_id)
        assert (np.diff(g.sort_values("rank").score.to_numpy()) <= 1e-6).all()
    again = run_candidates(spark, wh, run_date=date(2026, 11, 30), top_n=15, log=lambda m: None)
    assert again.skipped and wh.version("candidates") == res.version
