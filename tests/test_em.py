"""End-to-end single-process EM on planted-cluster data: DR must nearly match brute force."""
from __future__ import annotations

import numpy as np
import torch

from dr_model.config import DRConfig
from dr_model.evaluation import EvalUsers
from dr_model.split import paper_split
from dr_model.synthetic import SyntheticSpec, generate, item_cluster
from dr_model.trainer import evaluate, train_em


def _config() -> DRConfig:
    return DRConfig.from_dict({
        "model": {"K": 8, "D": 3, "J": 2, "item_dim": 32, "user_dim": 32, "node_dim": 16,
                  "hidden": 64, "rerank_dim": 32, "seq_len": 10},
        "search": {"beam": 8, "score_paths": 8, "batch_size": 2048},
        "mstep": {"rounds": 3, "block_size": 64},
        "train": {"em_rounds": 2, "joint_epochs": 4, "structure_epochs": 3, "batch_size": 256,
                  "lr": 5e-3, "seed": 0},
        "eval": {"k": 10},
        "split": {"rating_threshold": 0.0, "min_events": 10, "test_users": 300, "valid_users": 150, "seed": 1},
    })


def test_em_on_planted_clusters_reaches_brute_force_recall():
    torch.set_num_threads(2)
    spec = SyntheticSpec(num_users=2500, num_items=400, num_clusters=20, events_per_user=16, zipf_a=0.8, seed=0)
    cfg = _config()
    split = paper_split(generate(spec), cfg.split, cfg.model.seq_len)
    logs: list[str] = []
    valid = EvalUsers.of(split, 1)
    res = train_em(split.train_hist, split.train_target, cfg, train_next=split.train_next(cfg.train.rerank_targets), log=logs.append, valid=valid)
    report = evaluate(res, EvalUsers.of(split, 2), cfg)

    m = report["methods"]
    assert m["brute_force"]["recall"] > 0.05, report          # the reranker learned something
    assert m["dr"]["recall"] >= 0.9 * m["brute_force"]["recall"], report
    # ... within the retrieval budget the run chose its beam for
    budget = cfg.search.budget(report["catalog_size"], cfg.eval.k)
    assert report["items_scored_per_user"] <= 1.2 * budget < 0.5 * report["catalog_size"], report

    # the learned structure follows the planted clusters: items sharing a path mostly share a cluster
    clusters = item_cluster(res.vocab.ids, spec)
    first = res.assign[:, 0]
    same = [np.bincount(clusters[first == p]).max() / (first == p).sum() for p in np.unique(first)]
    assert np.mean(same) > 0.6, np.mean(same)
    assert [h["round"] for h in res.history] == [0, 1, 2, 3]        # reranker, 2 EM rounds, final E-step
    assert any("m-step sweep" in line for line in logs) and res.alpha is not None and res.beam >= 1
