"""`dr bench encoders`: the paper's GRU over long histories against mean-pooling, on MovieLens-1M.

The reranker alone (EM round 0 of the default schedule: exact softmax, early-stopped on the
validation users) trained in one process for each encoder, then brute force over it on the
test users (the paper's protocol, input halves excluded): P/R/F@10 and the training time.
Rows: mean-pool over the last 20 items learning the next item only (the paper's loss), the
default (mean-pool over 20, the next 5 items: train.rerank_targets), mean-pool over 69, a GRU
over 69 (the paper's encoder). `--quick`: MovieLens-100K.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from dr_model.config import DRConfig
from dr_model.evaluation import EvalUsers, validation_recall
from dr_model.metrics import prf_at_k
from dr_model.schedule import schedule
from dr_model.split import paper_split
from dr_model.trainer import Validation, new_model, run_phase
from dr_model.vocab import Vocab

ROWS = (("mean", 20, 1), ("mean", 20, 5), ("mean", 69, 5), ("gru", 69, 5))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def reranker_figures(split, cfg: DRConfig) -> dict:
    """Round 0 (the reranker alone, early-stopped on the validation users) on a paper split -> the
    test users' P/R/F@k of brute force over it, the epochs run and the validation recall kept."""
    vocab = Vocab(np.unique(split.train_target))
    torch.manual_seed(cfg.train.seed)
    model = new_model(cfg, vocab.size, np.bincount(vocab.index(split.train_target), minlength=vocab.size))
    valid, test = EvalUsers.of(split, 1), EvalUsers.of(split, 2)
    t0 = time.perf_counter()
    rows = run_phase(model, vocab.seq(split.train_hist),
                     torch.from_numpy(vocab.index(split.train_next(cfg.train.rerank_targets))),
                     np.zeros((vocab.size, cfg.model.J), np.int64), cfg, schedule(cfg, 0)[0],
                     Validation(valid, vocab, cfg.eval.k, cfg.search.beam), _log)
    secs = time.perf_counter() - t0
    pred, _ = model.brute_force(vocab.seq(test.hist), cfg.eval.k, exclude=test.input_pairs(vocab))
    m = prf_at_k(vocab.raw(pred), test.truth_offsets, test.truth_items, cfg.eval.k)
    return {"epochs": len(rows), "train_seconds": round(secs, 1),
            "precision": round(m.precision, 4), "recall": round(m.recall, 4), "f1": round(m.f1, 4),
            "valid_recall": round(validation_recall(model, vocab, valid, cfg.eval.k), 4)}


def measure(inter, encoder: str, seq_len: int, targets: int) -> dict:
    cfg = DRConfig().with_overrides([f"model.encoder={encoder}", f"model.seq_len={seq_len}",
                                     f"train.rerank_targets={targets}"])
    return {"encoder": encoder, "seq_len": seq_len, "rerank_targets": targets,
            **reranker_figures(paper_split(inter, cfg.split, seq_len), cfg)}


def run(quick: bool = False) -> dict:
    from jobs.movielens import load_movielens

    torch.set_num_threads(2)
    name = "ml-100k" if quick else "ml-1m"
    inter, _ = load_movielens(name)
    return {"date": time.strftime("%Y-%m-%d"), "dataset": name,
            "rows": [measure(inter, enc, L, w) for enc, L, w in ROWS]}
