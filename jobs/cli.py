"""`dr`: the command line of Deep Retrieval at catalog scale.

Every command reads one TOML config (`--config`) plus `--set section.field=value`
overrides; progress goes to stderr, results to stdout (`--json` for machines).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys

from dr_model.config import ConfigError, DRConfig
from jobs import faults
from jobs.cli_common import config_options

BENCHMARKS = {
    "beam": "beam search users/s/core at K=100, D=3, B=50, embedding 64 (+ brute-force top-200 over 10^6 items)",
    "mstep": "M-step kernel item-rounds/s/core at 10^6 items, S=32, J=3 vs the sequential reference",
    "ingest": "rows/s ingesting synthetic interactions into Delta on local Spark",
    "spark-scores": "scores job (Spark beam search -> s[v,c]) pairs/s/core on local[1] and local[2] vs in-process",
    "spark-mstep": "distributed M-step item-rounds/s/core on local[1] and local[2] vs the in-process kernel",
    "estep": "E-step training samples/s: Ray Train 1 and 2 workers vs a plain PyTorch loop (target: <= 20% overhead)",
    "quality": "default config on a synthetic planted-cluster catalog of 10^5 items: DR recall / brute force, "
               "share of the catalog scored, largest path, alpha used",
    "structure": "MovieLens-1M top path size vs alpha (the paper's Table 5); a collapsed start recovering on ML-100K",
    "encoders": "MovieLens-1M reranker quality: mean-pool over 20 / 69 items vs the paper's GRU over 69",
    "estep-scale": "E-step on 2 Ray workers, same samples at 10^4 / 10^6 / 10^7 items: samples/s/core, peak "
                   "worker RSS, gradient bytes per step",
    "item-rows": "10^4-item synthetic catalog, reranker only: every item its own row vs a row budget of a fifth of "
                 "the catalog with and without exact rows for the frequent items, and tied item tables",
    "candidates": "top-100 candidates on a planted-cluster catalog of 10^6 items (--items N): DR vs brute force vs "
                  "HNSW at DR's recall, users/s/core, recall / brute force; `dr candidates` peak driver / worker RSS",
    "cold-items": "dr backfill cold-items on local[2] at 10^5 and 10^6 catalog items (--items N: N / 10 and N), 10% "
                  "cold: wall time, cold items/s/core, peak driver / worker RSS (the driver's must not grow)",
    "negatives": "one step's 256 sampled-softmax negatives: torch.multinomial over all items vs the O(1) proposal, 10^4-10^7 items",
    "replay": "MovieLens-1M cut by time into a first period + 8 increments: each night incremental vs full retrain, "
              "recall@10 on the next increment and wall time (--quick: ML-100K, 4 nights)",
}

# Command modules that add their own subcommands (each has register(subparsers)).
COMMAND_MODULES = ["jobs.cli_pipeline", "jobs.cli_spark", "jobs.cli_data", "jobs.local_train", "jobs.cli_plan"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_config(args: argparse.Namespace) -> DRConfig:
    """The config file (if any) with the command line's --set overrides applied."""
    return DRConfig.load(args.config, args.set)


def _bench(args: argparse.Namespace) -> int:
    name = args.name.replace("-", "_")
    try:
        mod = importlib.import_module(f"jobs.benchmarks.{name}")
    except ModuleNotFoundError:
        log(f"unknown benchmark {args.name!r}; known: {', '.join(sorted(BENCHMARKS))}")
        return 2
    # stdout carries the result only: engines' forwarded lines (e.g. Ray's raylet warnings, printed
    # by its log thread on sys.stdout) go to stderr with the progress lines.
    with contextlib.redirect_stdout(sys.stderr):
        kwargs = {"items": args.items} if args.items else {}
        if kwargs and "items" not in inspect.signature(mod.run).parameters:
            log(f"benchmark {args.name!r} has no --items")
            return 2
        result = mod.run(quick=args.quick, **kwargs)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for k, v in result.items():
            print(f"{k:40s} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dr",
        description="Deep Retrieval at catalog scale: learn a K x D path structure over items with "
                    "penalized EM, retrieve candidates by beam search, store everything as versioned "
                    "Delta tables. Run `dr COMMAND --help` for each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_options(p, top_level=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser("bench", help="run a benchmark and print its figures",
                       description="Benchmarks:\n" + "\n".join(f"  {k:8s} {v}" for k, v in BENCHMARKS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("name", help=f"one of: {', '.join(BENCHMARKS)}")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    b.add_argument("--quick", action="store_true", help="a small, fast version (smoke test)")
    b.add_argument("--items", type=int, default=None, help="catalog size, for the benchmarks that take one (candidates)")
    b.set_defaults(func=_bench)

    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    faults.set_command(args.command)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        log(f"dr: config error: {e}")
        return 2
    except (LookupError, FileNotFoundError) as e:
        if isinstance(e, (KeyError, IndexError)):      # LookupError's subclasses are bugs, not user errors
            raise
        # a missing run, table or file: what the user must do first, without a traceback
        log(f"dr {args.command}: {e.args[0] if e.args else e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
