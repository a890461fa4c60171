"""Scores job on a real local SparkSession vs the in-process s[v,c] computation (ML-100K, a briefly trained model)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import pytest

from dr_model.config import DRConfig, ModelConfig
from dr_model.scores import PathScores, streaming_merge
from dr_model.split import paper_split
from dr_model.trainer import EMResult, pair_scores, train_em
from jobs.movielens import load_movielens
from jobs.scores import compute_path_scores
from jobs.tables import CommitMeta, Warehouse
from spark_udfs.model_source import ModelSource

CFG = DRConfig.from_dict({
    "model": {"K": 10, "D": 2, "J": 3, "item_dim": 16, "user_dim": 16, "node_dim": 8, "hidden": 32,
              "rerank_dim": 16, "seq_len": 10},
    "search": {"score_paths": 16, "batch_size": 300},
    "mstep": {"alpha": 3e-6, "rounds": 3, "block_size": 64},
    "incremental": {"decay_per_day": 0.9},
    "train": {"em_rounds": 1, "joint_epochs": 1, "structure_epochs": 1, "batch_size": 512},
    "split": {"test_users": 100, "valid_users": 100},
})


@lru_cache(maxsize=1)
def trained_ml100k() -> tuple[EMResult, np.ndarray, np.ndarray, np.ndarray]:
    """(EM result, hist [N, L] raw ids, target [N] raw ids, user [N]) of a one-epoch model on ML-100K."""
    inter, _ = load_movielens("ml-100k")
    split = paper_split(inter, CFG.split, CFG.model.seq_len)
    res = train_em(split.train_hist, split.train_target, CFG, log=lambda _: None)
    return res, split.train_hist, split.train_target, split.train_user


def write_samples(wh: Warehouse, hist: np.ndarray, target: np.ndarray, user: np.ndarray, run: str) -> int:
    """samples_train rows from arrays; returns the committed version (a full snapshot)."""
    df = pd.DataFrame({"user_id": user, "pos": np.arange(len(user), dtype=np.int32), "hist": list(hist),
                       "target": target, "next": list(np.asarray(target)[:, None])})
    return wh.write_arrow("samples_train", df, CommitMeta("test", run), mode="overwrite").version


def read_scores(wh: Warehouse, version: int, S: int) -> PathScores:
    t = wh.read_arrow("path_scores", version)
    return PathScores.from_long(*(t.column(c).to_numpy() for c in ("item_id", "path", "score", "n_v")), S)


def assert_same_scores(got: PathScores, want: PathScores) -> None:
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.n_v, want.n_v)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)
    # same top-S per item; slots may swap only between scores equal to 1e-9 (summation order)
    same = got.paths == want.paths
    assert same.mean() > 0.999
    assert np.all(np.abs(got.scores - want.scores)[~same] < 1e-9)


def test_batch_scores_equal_in_process(spark, warehouse, tmp_path):
    res, hist, target, user = trained_ml100k()
    S = CFG.search.score_paths
    v = write_samples(warehouse, hist, target, user, "s")
    src = ModelSource.from_model(res.model, res.vocab, str(tmp_path / "model"))
    out = compute_path_scores(spark, warehouse, src, CFG, v, "run-1", 0)
    want = pair_scores(res.model, res.vocab.seq(hist), target, S, CFG.search.batch_size)
    got = read_scores(warehouse, out.version, S)
    assert len(want) > 1000 and want.n_v.sum() == len(target)
    assert_same_scores(got, want)
    info = warehouse.versions("path_scores")[-1]
    assert (info.job, info.run_id, info.round, info.config_hash) == ("scores", "run-1", 0, CFG.hash())
    assert info.metadata["dr.mode"] == "batch"


def test_own_paths_join_the_lists_as_in_process(spark, warehouse, tmp_path):
    """Given the item_paths the model was trained against, each pair also scores its target's J paths."""
    res, hist, target, user = trained_ml100k()
    S, J = CFG.search.score_paths, CFG.model.J
    v = write_samples(warehouse, hist, target, user, "s")
    V = res.vocab.size
    ip = warehouse.write_arrow("item_paths", pd.DataFrame({
        "item_id": np.repeat(res.vocab.ids, J), "slot": np.tile(np.arange(J, dtype=np.int32), V),
        "path": res.assign.ravel(), "score": np.zeros(V * J)}), CommitMeta("test", "paths"), mode="overwrite").version
    src = ModelSource.from_model(res.model, res.vocab, str(tmp_path / "model"))
    out = compute_path_scores(spark, warehouse, src, CFG, v, "run-own", 1, item_paths_version=ip)
    idx = res.vocab.index(target)
    want = pair_scores(res.model, res.vocab.seq(hist), idx, S, CFG.search.batch_size, res.assign)
    want = PathScores(res.vocab.ids[want.items], want.paths, want.scores, want.n_v)
    got = read_scores(warehouse, out.version, S + J)
    assert_same_scores(got, want)
    # the items' own paths are on their lists now (the beam alone misses many); one drops out only
    # when S + J other paths outscore it
    own_listed = (want.paths[:, :, None] == res.assign[res.vocab.index(want.items)][:, None, :]).any(1)
    beam_only = pair_scores(res.model, res.vocab.seq(hist), idx, S, CFG.search.batch_size)
    beam_listed = (beam_only.paths[:, :, None] == res.assign[beam_only.items][:, None, :]).any(1)
    assert own_listed.mean() > 0.9 and own_listed.mean() > beam_listed.mean() + 0.1, (own_listed.mean(),
                                                                                      beam_listed.mean())
    assert warehouse.versions("path_scores")[-1].metadata["dr.item_paths_version"] == ip


def test_streaming_merge_across_two_versions_equals_in_process(spark, warehouse, tmp_path):
    res, hist, target, user = trained_ml100k()
    # the second night's data ends 2.5 days after the first's: eta = decay_per_day ** 2.5
    S, bs, eta = CFG.search.score_paths, CFG.search.batch_size, CFG.incremental.decay_per_day ** 2.5
    payload = ModelSource.from_model(res.model, res.vocab, str(tmp_path / "model"))
    night1 = user % 3 != 0                 # two "nights" with overlapping and disjoint items
    v1 = write_samples(warehouse, hist[night1], target[night1], user[night1], "n1")
    p1 = compute_path_scores(spark, warehouse, payload, CFG, v1, "run-n1", 0)
    v2 = write_samples(warehouse, hist[~night1], target[~night1], user[~night1], "n2")
    p2 = compute_path_scores(spark, warehouse, payload, CFG, v2, "run-n2", 1, previous_version=p1.version, days=2.5)
    seq = res.vocab.seq(hist)
    old = pair_scores(res.model, seq[night1], target[night1], S, bs)
    new = pair_scores(res.model, seq[~night1], target[~night1], S, bs)
    want = streaming_merge(old, new, eta)
    got = read_scores(warehouse, p2.version, S)
    assert_same_scores(got, want)
    # the merge really seeded new paths with eta * min_score (differs from a plain decayed sum)
    assert not np.allclose(want.scores, streaming_merge(old, new, 1.0).scores)
    assert warehouse.versions("path_scores")[-1].metadata["dr.previous_version"] == p1.version


def test_failed_scores_job_leaves_table_at_previous_version(spark, warehouse, tmp_path):
    res, hist, target, user = trained_ml100k()
    v = write_samples(warehouse, hist[:2000], target[:2000], user[:2000], "s")
    good = ModelSource.from_model(res.model, res.vocab, str(tmp_path / "model"))
    ok = compute_path_scores(spark, warehouse, good, CFG, v, "ok", 0)
    # a source whose config does not match its weights fails inside the executors
    bad = ModelSource.of(good.state_file, ModelConfig(K=12, D=2, J=3))
    with pytest.raises(Exception, match="size mismatch"):
        compute_path_scores(spark, warehouse, bad, CFG, v, "bad", 1)
    assert warehouse.version("path_scores") == ok.version
