"""`dr train`'s driver-bounded steps equal the in-process ones: the initial paths on Spark (the tree fitted on
a sample), and the retrieval beam chosen over the run's serving bundle."""
from __future__ import annotations

import numpy as np
import torch

import dr_model.init_paths as init_paths
from dr_model.beam_choice import confidence_z, margin_lower_bound
from dr_model.config import DRConfig
from dr_model.model import DRModel
from dr_model.vocab import Vocab
from jobs.embedding_paths import embedding_item_paths
from jobs.tables import Warehouse
from ray_trainers.estep import load_item_paths
from spark_udfs.model_source import ModelSource


def test_spark_initial_paths_equal_the_in_process_ones_with_a_sampled_tree(spark, tmp_path, monkeypatch):
    cfg = DRConfig.from_dict({"model": {"K": 12, "D": 3, "J": 3, "rerank_dim": 16, "item_dim": 16, "user_dim": 16}})
    V = 3000
    monkeypatch.setattr(init_paths, "SAMPLE_MAX", 1000)      # the tree is fitted on a third of the catalog
    torch.manual_seed(0)
    model = DRModel(cfg.model, V)
    ids = np.sort(np.random.default_rng(0).choice(10 ** 9, V, replace=False)).astype(np.int64)
    logs: list[str] = []
    wh = Warehouse(tmp_path / "wh")
    ModelSource.from_model(model, Vocab(ids), str(tmp_path / "ck"))       # a checkpoint folder's state.pt
    v = embedding_item_paths(spark, wh, cfg, str(tmp_path / "ck"), "r1", "train.init_paths", logs.append, chunk=700)
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


def test_retrieval_beam_from_the_serving_bundle_equals_the_in_process_choice(spark, tmp_path):
    from types import SimpleNamespace

    from dr_model.evaluation import EvalUsers, choose_beam
    from dr_model.index import PathIndex
    from dr_model.mstep import initial_assignment
    from jobs.path_index import find_path_index
    from jobs.retrieval_beam import choose_retrieval_beam
    from jobs.serving import bundle_dir, record_trained_model

    cfg = DRConfig.from_dict({"model": {"K": 8, "D": 3, "J": 2, "rerank_dim": 16, "item_dim": 16, "user_dim": 16,
                                        "seq_len": 6}, "search": {"items_per_user": 60, "top_n": 20}})
    V, J, U, k, rng = 900, 2, 40, cfg.search.top_n, np.random.default_rng(1)   # the beam is chosen at top_n
    torch.manual_seed(1)
    model = DRModel(cfg.model, V).eval()
    ids = np.arange(0, 3 * V, 3, dtype=np.int64)
    assign = initial_assignment(V, J, cfg.model.num_paths, 0)
    wh = Warehouse(tmp_path / "wh")
    rec = record_trained_model(spark, wh, "r1", model, ids, assign, cfg)
    hist = rng.choice(ids, size=(U, 6))
    hist[::5, 3:] = -1                                                  # padded histories
    inp = [h[h >= 0] for h in hist]
    # every item is a truth item: recall = items returned / V, so a beam reaches brute force's recall exactly
    # when its paths hold k items beyond a user's input, and fp16 (bundle) and fp32 (model) vectors agree on it
    valid = EvalUsers(hist, np.append(0, np.cumsum([len(x) for x in inp])), np.concatenate(inp),
                      np.arange(U + 1, dtype=np.int64) * V, np.tile(ids, U))
    est = SimpleNamespace(num_items=V, checkpoint_path=rec.checkpoint)
    ip_v = rec.table_versions["item_paths"]
    index = PathIndex.build(assign)
    for target, confidence in ((0.98, 0.0), (0.98, 0.95), (0.0, 0.95)):
        run_cfg = cfg.with_overrides([f"search.recall_target={target}", f"search.recall_confidence={confidence}"])
        logs: list[str] = []
        got = choose_retrieval_beam(spark, wh, run_cfg, "r1", est, ip_v, valid, logs.append)
        want = choose_beam(model, Vocab(ids), valid, index, 60, k, target, confidence=confidence)
        assert got == {**want.metrics(), "budget": 60}, (got, want)
        assert 1 < want.budget_beam < cfg.model.num_paths                # the budget had something to choose
        if target:      # the smallest beam whose paths give every user its k items: below the budget's
            assert want.recall >= want.floor == target * want.brute_force_recall > 0
            assert want.lower >= 0 and 1 < want.beam < want.budget_beam
            below = validation_recalls_at(model, ids, valid, index, want.beam - 1, k)
            bf = validation_recalls_at(model, ids, valid, None, 0, k)
            assert margin_lower_bound(below, bf, target, confidence_z(confidence)) < 0
            if not confidence:
                assert below.mean() < want.floor
        else:
            assert want.beam == want.budget_beam and want.recall is None
        assert f"retrieval beam {want.beam}:" in logs[-1], logs
    assert (bundle_dir(wh, "r1", find_path_index(wh, ip_v)) / "meta.json").exists()   # dr candidates reuses it


def validation_recalls_at(model, ids, valid, index, beam, k):  # noqa: ANN001, ANN201
    from dr_model.evaluation import validation_recalls

    return validation_recalls(model, Vocab(ids), valid, k, index, beam)
