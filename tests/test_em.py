"""End-to-end single-process EM on planted-cluster data: DR must nearly match brute force."""
from __future__ import annotations

import numpy as np
import torch

from dr_model.config import DRConfig
from dr_model.split import paper_split
from dr_model.synthetic import SyntheticSpec, generate, item_cluster
from dr_model.trainer import evaluate, train_em


def _config() -> DRConfig:
    return DRConfig.from_dict({
        "model": {"K": 8, "D": 3, "J": 2, "item_dim": 32, "user_dim": 32, "node_dim": 16,
                  "hidden": 64, "rerank_dim": 32, "seq_len": 10},
        "search": {"beam": 8, "score_paths": 8, "batch_size": 2048},
        "mstep": {"alpha": 1e-3, "rounds": 3, "block_size": 64},
        "train": {"em_rounds": 2, "joint_epochs": 2, "structure_epochs": 2, "batch_size": 256,
                  "lr": 5e-3, "negatives": 64, "seed": 0},
        "eval": {"k": 10},
        "split": {"rating_threshold": 0.0, "min_events": 10, "test_users": 300, "valid_users": 0, "seed": 1},
    })


def test_em_on_planted_clusters_reaches_brute_force_recall():
    torch.set_num_threads(2)
    spec = SyntheticSpec(num_users=2500, num_items=400, num_clusters=20, events_per_user=16, zipf_a=0.8, seed=0)
    cfg = _config()
    split = paper_split(generate(spec), cfg.split, cfg.model.seq_len)
    logs: list[str] = []
    res = train_em(split.train_hist, split.train_target, cfg, log=logs.append)
    report = evaluate(res, split.eval_hist, split.truth_offsets, split.truth_items, cfg)

    m = report["methods"]
    assert m["brute_force"]["recall"] > 0.05, report          # the reranker learned something
    assert m["dr"]["recall"] >= 0.9 * m["brute_force"]["recall"], report
    # ... while scoring well under the whole catalog per user
    assert report["items_scored_per_user"] < 0.5 * report["catalog_size"], report

    # the learned structure follows the planted clusters: items sharing a path mostly share a cluster
    clusters = item_cluster(res.vocab.ids, spec)
    first = res.assign[:, 0]
    same = [np.bincount(clusters[first == p]).max() / (first == p).sum() for p in np.unique(first)]
    assert np.mean(same) > 0.6, np.mean(same)
    assert len(res.history) == cfg.train.em_rounds
    assert any("m-step sweep" in line for line in logs)
