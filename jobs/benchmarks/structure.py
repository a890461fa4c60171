"""`dr bench structure`: the paper's "top path size vs alpha" (its Table 5) on MovieLens-1M, and a
collapsed structure recovering on MovieLens-100K.

* table5: the default config trained in one process on MovieLens-1M; then, on the s[v,c] of its
  final model (the items' own paths scored, exploration off: the paper's M-step), the M-step
  from the trained assignment with a fixed alpha per row -> the largest path, the non-empty
  paths and the traffic-weighted path size; the row "auto" is the alpha the run calibrated.
  (The paper retrains per alpha; here the scores are fixed, which isolates the penalty's effect.)
* collapse: MovieLens-100K, the default config, but EM starts from a collapsed assignment (every
  item on J of 4 paths, like the 341-path collapse the issue saw) instead of the embedding
  clustering; per EM round the non-empty paths, the largest path and the traffic-weighted size,
  and at the end DR's recall over brute force and the share of the catalog it scores: with the
  default collapse guard (train.collapse_factor: a start far above the target path size is
  re-seeded from the reranker's embeddings), and with the guard off, the M-step alone, with
  exploration (the default) and without it (mstep.explore = 0).
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

import numpy as np
import torch

from dr_model.config import DRConfig
from dr_model.evaluation import EvalUsers
from dr_model.mstep import mstep_blocked
from dr_model.split import paper_split
from dr_model.trainer import evaluate, pair_scores, train_em

ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data(name: str):
    from jobs.movielens import load_movielens

    cfg = DRConfig()
    inter, _ = load_movielens(name)
    return cfg, paper_split(inter, cfg.split, cfg.model.seq_len)


def table5(quick: bool) -> dict:
    cfg, split = _data("ml-100k" if quick else "ml-1m")
    valid = EvalUsers.of(split, 1)
    res = train_em(split.train_hist, split.train_target, cfg, train_next=split.train_next(cfg.train.rerank_targets), log=_log, valid=valid)
    target_idx = res.vocab.index(split.train_target)
    ps = pair_scores(res.model, res.vocab.seq(split.train_hist), target_idx, cfg.search.score_paths,
                     cfg.search.batch_size, res.assign)
    rows = []
    for a in ALPHAS:
        ms = mstep_blocked(ps, res.assign[ps.items], cfg.model.num_paths, replace(cfg.mstep, alpha=a, block_size=64))
        st = ms.rounds[-1]
        rows.append({"alpha": a, "top_path_size": st.max_path_size, "nonempty_paths": st.nonempty_paths,
                     "path_size": round(st.path_size, 2)})
        _log(f"[table5] alpha {a:g}: top path size {st.max_path_size}, {st.nonempty_paths} non-empty paths")
    sizes = np.bincount(res.assign.ravel())
    return {"dataset": "ml-100k" if quick else "ml-1m", "rows": rows,
            "auto": {"alpha": res.alpha, "top_path_size": int(sizes.max()), "nonempty_paths": int((sizes > 0).sum())}}


def collapse(explore: int, collapse_factor: float | None = None) -> dict:
    cfg, split = _data("ml-100k")
    cfg = replace(cfg, mstep=replace(cfg.mstep, explore=explore))
    if collapse_factor is not None:
        cfg = replace(cfg, train=replace(cfg.train, collapse_factor=collapse_factor))
    V = len(np.unique(split.train_target))
    rng = np.random.default_rng(0)
    hot = rng.choice(cfg.model.num_paths, 4, replace=False)
    start = np.stack([rng.permutation(hot)[: cfg.model.J] for _ in range(V)])
    rounds = []

    def on_round(r: int, res) -> None:
        sizes = np.bincount(res.assign.ravel())
        rounds.append({"round": r, "nonempty_paths": int((sizes > 0).sum()), "largest_path": int(sizes.max()),
                       "path_size": round(res.history[-1]["mstep"][-1]["path_size"], 2)})

    valid = EvalUsers.of(split, 1)
    res = train_em(split.train_hist, split.train_target, cfg, train_next=split.train_next(cfg.train.rerank_targets),
                   log=_log, valid=valid, on_round=on_round, start=start)
    rep = evaluate(res, EvalUsers.of(split, 2), cfg)
    return {"explore": explore, "collapse_factor": cfg.train.collapse_factor, "start": {"nonempty_paths": 4, "largest_path": V}, "rounds": rounds,
            "dr_recall_over_brute_force": round(rep["dr_recall_over_brute_force"], 4),
            "fraction_of_catalog_scored": round(rep["fraction_of_catalog_scored"], 4), "beam": res.beam}


def run(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    out = {"date": time.strftime("%Y-%m-%d"), "table5": table5(quick),
           "collapse": [collapse(2), collapse(2, 0.0), collapse(0, 0.0)]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
