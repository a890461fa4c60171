"""`dr scores`, `dr mstep`, `dr path-index`: the Spark jobs of an EM round from the command line."""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

from jobs.cli_common import spark_options, spark_session


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warehouse", type=Path, required=True, help="warehouse root (folder or URI) holding the Delta tables")
    spark_options(p)
    p.add_argument("--run-id", default=None, help="run id recorded with the commit (default: a new uuid)")
    p.add_argument("--round", type=int, default=None, help="EM round recorded with the commit")


def _session(args: argparse.Namespace, app: str):  # noqa: ANN202
    from jobs.tables import Warehouse

    return spark_session(args, app), Warehouse(args.warehouse), args.run_id or uuid.uuid4().hex[:12]


def _print(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True))


def _scores(args: argparse.Namespace) -> int:
    from jobs.cli import load_config
    from jobs.scores import compute_path_scores
    from spark_udfs.model_source import ModelSource

    cfg = load_config(args)
    spark, wh, run_id = _session(args, "dr-scores")
    model = ModelSource.from_checkpoint(str(args.checkpoint), cfg.model)
    res = compute_path_scores(spark, wh, model, cfg, args.samples_version, run_id, args.round,
                              previous_version=args.previous_version, days=args.days)
    _print({"table": res.table, "version": res.version, "rows": res.rows, "run_id": run_id})
    return 0


def _mstep(args: argparse.Namespace) -> int:
    from jobs.cli import load_config
    from jobs.mstep import MStepOptions, distributed_mstep

    cfg = load_config(args)
    spark, wh, run_id = _session(args, "dr-mstep")
    opts = MStepOptions(partitions=args.partitions, sync=args.sync, extrapolate=not args.plain, seed=args.seed)
    res, stats = distributed_mstep(spark, wh, cfg, args.path_scores_version, args.init_item_paths_version,
                                   run_id, args.round, opts)
    _print({"table": res.table, "version": res.version, "rows": res.rows, "run_id": run_id,
            "rounds": [vars(s) for s in stats]})
    return 0


def _path_index(args: argparse.Namespace) -> int:
    from jobs.path_index import build_path_index

    spark, wh, run_id = _session(args, "dr-path-index")
    res = build_path_index(spark, wh, args.item_paths_version, run_id)
    _print({"table": res.table, "version": res.version, "rows": res.rows, "run_id": run_id})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommands scores, mstep and path-index."""
    s = sub.add_parser("scores", help="beam-search the training samples on Spark -> a path_scores version",
                       description="Beam search (beam S = search.score_paths, batches of search.batch_size) over "
                                   "samples_train with an E-step checkpoint's model; s[v,c] = summed p(c|x), top S per "
                                   "item, committed as one path_scores version. With --previous-version: streaming "
                                   "merge into that version (decay incremental.decay_per_day ** --days, min_score seeding).")
    _common(s)
    s.add_argument("--checkpoint", type=Path, required=True, help="E-step checkpoint directory (ray_trainers layout)")
    s.add_argument("--samples-version", type=int, default=None, help="samples_train version (default latest)")
    s.add_argument("--previous-version", type=int, default=None, help="path_scores version to merge into (streaming)")
    s.add_argument("--days", type=float, default=1.0,
                   help="streaming: days of data between the previous version and these samples (default 1)")
    s.set_defaults(func=_scores)

    m = sub.add_parser("mstep", help="distributed penalized coordinate descent -> an item_paths version",
                       description="Items hash-partitioned over executors; the path-size table is aggregated and "
                                   "broadcast every round; each partition re-assigns its items with dr_model's kernel, "
                                   "counting its own moves once per partition (extrapolated local deltas). Logs "
                                   "objective / largest path / non-empty paths / items moved per round to stderr.")
    _common(m)
    m.add_argument("--path-scores-version", type=int, default=None, help="path_scores version (default latest)")
    m.add_argument("--init-item-paths-version", type=int, default=None,
                   help="starting item_paths version (default: random balanced start)")
    m.add_argument("--partitions", type=int, default=None,
                   help="item partitions (default: the cluster's concurrent task slots, at most one per 50,000 scored items)")
    m.add_argument("--sync", choices=("auto", "barrier", "jobs"), default="auto",
                   help="rounds in one barrier stage exchanging size changes (barrier; needs partitions <= task "
                        "slots), one Spark job per round (jobs), or barrier whenever it fits (auto, default)")
    m.add_argument("--plain", action="store_true", help="plain local copies of the size table (comparison only)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random start")
    m.set_defaults(func=_mstep)

    p = sub.add_parser("path-index", help="build the path -> items index of an item_paths version",
                       description="Reads item_paths at a version and commits path_index (path, item_id, slot, "
                                   "score) clustered by path; the commit records the item_paths version.")
    _common(p)
    p.add_argument("--item-paths-version", type=int, default=None, help="item_paths version (default latest)")
    p.set_defaults(func=_path_index)


__all__ = ["register"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `dr scores|mstep|path-index`")
