"""`dr train`'s driver-bounded steps equal the in-process ones: the initial paths on Spark (the tree fitted on
a sample), and the retrieval beam counted by a Spark join with the path index."""
from __future__ import annotations

import numpy as np
import torch

import dr_model.init_paths as init_paths
from dr_model.config import DRConfig
from dr_model.model import DRModel
from jobs.embedding_paths import embedding_item_paths
from jobs.tables import Warehouse
from ray_trainers.estep import load_item_paths


def test_spark_initial_paths_equal_the_in_process_ones_with_a_sampled_tree(spark, tmp_path, monkeypatch):
    cfg = DRConfig.from_dict({"model": {"K": 12, "D": 3, "J": 3, "rerank_dim": 16, "item_dim": 16, "user_dim": 16}})
    V = 3000
    monkeypatch.setattr(init_paths, "SAMPLE_MAX", 1000)      # the tree is fitted on a third of the catalog
    torch.manual_seed(0)
    model = DRModel(cfg.model, V)
    ids = np.sort(np.random.default_rng(0).choice(10 ** 9, V, replace=False)).astype(np.int64)
    logs: list[str] = []
    wh = Warehouse(tmp_path / "wh")
    v = embedding_item_paths(spark, wh, cfg, model.state_dict(), ids, "r1", "train.init_paths", logs.append, chunk=700)
    got_ids, got = load_item_paths(wh, v, cfg.model.J)

    mc = cfg.model
    ref = init_paths.paths_from_embeddings(model.reranker.item_vectors().detach().numpy(), mc.K, mc.D, mc.J,
                                           cfg.search.target_path_size(V, cfg.eval.k), cfg.train.seed)
    assert (got_ids == ids).all()
    assert (got == ref).all()
    assert any("fitted on 1000 of 3000 items" in m for m in logs), logs
    srt = np.sort(got, 1)
    assert not (srt[:, 1:] == srt[:, :-1]).any()                    # J distinct paths per item
    sizes = np.bincount(got.ravel())
    assert sizes.max() <= 4 * sizes[sizes > 0].mean()                # balanced although fitted on a sample


def test_retrieval_beam_from_the_path_index_equals_the_in_process_choice(spark, tmp_path):
    import pyarrow as pa
    from types import SimpleNamespace

    from dr_model.evaluation import EvalUsers, choose_beam
    from dr_model.index import PathIndex
    from dr_model.mstep import initial_assignment
    from dr_model.vocab import Vocab
    from jobs.path_index import build_path_index
    from jobs.retrieval_beam import choose_retrieval_beam
    from jobs.tables import CommitMeta

    cfg = DRConfig.from_dict({"model": {"K": 8, "D": 3, "J": 2, "rerank_dim": 16, "item_dim": 16, "user_dim": 16,
                                        "seq_len": 6}, "search": {"items_per_user": 60}})
    V, J, rng = 900, 2, np.random.default_rng(1)
    torch.manual_seed(1)
    model = DRModel(cfg.model, V).eval()
    ids = np.arange(0, 3 * V, 3, dtype=np.int64)
    assign = initial_assignment(V, J, cfg.model.num_paths, 0)
    wh = Warehouse(tmp_path / "wh")
    ip = wh.write_arrow("item_paths", pa.table({"item_id": np.repeat(ids, J), "slot": np.tile(np.arange(J, dtype=np.int32), V),
                                                "path": assign.ravel(), "score": pa.nulls(V * J, pa.float64())}),
                        CommitMeta("test", "r1", 0), mode="overwrite").version
    pi = build_path_index(spark, wh, ip, "r1", log=lambda m: None)
    hist = rng.choice(ids, size=(40, 6))
    hist[::5, 3:] = -1                                                  # padded histories
    empty = np.zeros(41, np.int64)
    valid = EvalUsers(hist, empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64))
    est = SimpleNamespace(model_state=model.state_dict(), item_ids=ids)
    got = choose_retrieval_beam(spark, wh, cfg, est, pi.version, valid, lambda m: None)
    beam, cost = choose_beam(model, Vocab(ids), valid, PathIndex.build(assign), 60)
    assert got == {"retrieval_beam": beam, "budget": 60, "items_scored_per_validation_user": cost}
    assert 1 < beam < cfg.model.num_paths                              # the search had something to choose
