"""`dr train | candidates | evaluate | backfill | runs`: the nightly pipeline's commands."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date

from jobs.cli_common import config_options, spark_options, spark_session

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cluster_options(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--warehouse", default="./warehouse",
                   help="warehouse root holding every Delta table and checkpoint (default ./warehouse)")
    spark_options(p)
    if ray:
        p.add_argument("--ray-address", default=None,
                       help="Ray address ('auto', ray://host:10001); default: start a local Ray")
        p.add_argument("--ray-workers", type=int, default=2, help="Ray Train workers for the E-step (default 2)")
        p.add_argument("--ray-cpus-per-worker", type=float, default=0.5,
                       help="CPUs reserved per Ray Train worker (default 0.5: leaves CPUs for Ray Data readers)")
        p.add_argument("--ray-max-failures", type=int, default=None,
                       help="E-step worker-group restarts after a lost worker or node, each resuming from the last "
                            "checkpoint (-1: unlimited; default 3 with --ray-address, 0 on a local Ray, where a "
                            "failure is a bug, not a lost node)")
        p.add_argument("--ray-batch-per-worker", type=int, default=None,
                       help="fixed E-step batch per worker: the global batch is workers x this and the learning "
                            "rate follows sqrt(global / train.batch_size) (default: train.batch_size split over "
                            "the workers, the single-process run's batch and learning rate)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def _config(args: argparse.Namespace, dataset: str | None = None):
    """The run's config: the built-in defaults (configs/default.toml spells them out), --config, --set."""
    from dr_model.config import DRConfig

    return DRConfig.load(args.config, args.set)


def _spark_wh(args: argparse.Namespace):
    from jobs.tables import Warehouse

    return spark_session(args, f"dr-{args.cmd_name}"), Warehouse(args.warehouse)


def _emit(args: argparse.Namespace, obj: dict, text: str) -> None:
    print(json.dumps(obj, sort_keys=True, default=str) if args.json else text)


def cmd_train(args: argparse.Namespace) -> int:
    from ray_trainers.config import RayConfig

    from jobs.train import run_train

    cfg = _config(args, args.dataset)
    failures = args.ray_max_failures if args.ray_max_failures is not None else (3 if args.ray_address else 0)
    ray_cfg = RayConfig(address=args.ray_address, num_workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                        max_failures=failures,
                        batch_per_worker=args.ray_batch_per_worker)
    spark, wh = _spark_wh(args)
    if args.dataset and not wh.exists("interactions"):
        from jobs.datasets import movielens

        _log(f"[train] empty warehouse: loading {args.dataset}")
        movielens(spark, wh, args.dataset)
    res = run_train(spark, wh, cfg, ray_cfg, args.run_id, mode=args.mode)
    _emit(args, {"run_id": res.run_id, "skipped": res.skipped, "table_versions": res.table_versions,
                 "checkpoint": res.checkpoint, "seconds": round(res.seconds, 1), "mode": res.metrics.get("mode")},
          f"train run {res.run_id} ({res.metrics.get('mode', 'full')}): "
          f"{'already done' if res.skipped else 'succeeded'}; tables {res.table_versions}; "
          f"checkpoint {res.checkpoint}")
    return 0


def cmd_candidates(args: argparse.Namespace) -> int:
    from jobs.candidates import run_candidates

    from jobs import runs

    spark, wh = _spark_wh(args)
    train_run = args.train_run_id
    if train_run is None and args.run_id and runs.latest(wh, "train", args.run_id, status="succeeded"):
        train_run = args.run_id        # the nightly DAG: candidates of the night's own train run
    res = run_candidates(spark, wh, train_run_id=train_run, run_id=args.run_id,
                         run_date=args.run_date, active_on=args.date, top_n=args.top_n, beam=args.beam)
    _emit(args, vars(res), f"candidates {res.run_id} (model of train run {res.train_run_id}): {res.rows} rows, "
          f"candidates v{res.version}{' (already done)' if res.skipped else ''}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dr_model.evaluation import format_report

    from jobs.evaluate import run_evaluate

    spark, wh = _spark_wh(args)
    report = run_evaluate(spark, wh, args.run_id, args.set or None)
    _emit(args, report, format_report(report) + f"\nreport: {report['report_files'][1]}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    spark, wh = _spark_wh(args)
    if args.what == "path-index":
        from jobs.path_index import build_path_index

        res = build_path_index(spark, wh, args.item_paths_version, f"backfill-item_paths-{args.item_paths_version}")
        _emit(args, vars(res), f"path_index v{res.version} for item_paths v{args.item_paths_version}: {res.rows} rows")
    elif args.what == "candidates":
        from jobs.candidates import run_candidates

        if args.run_id is None:
            raise SystemExit("dr backfill candidates: --run-id (the past train run whose model to use) is required")
        res = run_candidates(spark, wh, train_run_id=args.run_id, run_id=f"backfill-{args.run_id}",
                             run_date=args.run_date, active_on=args.date, top_n=args.top_n)
        _emit(args, vars(res), f"candidates {res.run_id} regenerated with train run {res.train_run_id}: {res.rows} rows, "
              f"candidates v{res.version}{' (already done)' if res.skipped else ''}")
    else:
        from jobs.cold_items import run_cold_items

        res = run_cold_items(spark, wh, args.run_id)
        _emit(args, vars(res), f"cold items of train run {res.train_run_id}: {res.cold_items} given paths "
              f"({res.by_category} by their category's paths, {res.by_least_loaded} least-loaded, "
              f"{res.paths_used} paths used); {res.versions}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from jobs import runs
    from jobs.tables import Warehouse

    rows = runs.history(Warehouse(args.warehouse), args.job)
    if args.json:
        print(json.dumps([{**vars(r), "ts": r.ts.isoformat()} for r in rows], sort_keys=True, default=str))
        return 0
    print(f"{'time (UTC)':<20} {'job':<11} {'run id':<24} {'status':<10} tables")
    for r in rows:
        print(f"{r.ts:%Y-%m-%d %H:%M:%S}  {r.job:<11} {r.run_id:<24} {r.status:<10} "
              f"{json.dumps(r.table_versions, sort_keys=True)}")
    return 0


def _date(s: str) -> date:
    return date.fromisoformat(s)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="the nightly job: split -> EM rounds (Ray E-step, Spark scores + M-step) -> path index",
        description="Run the nightly training job: the paper's split of the latest interactions, initial "
                    "round 0 (the reranker on Ray Train, early-stopped on the validation users), initial paths "
                    "from its item embeddings, R EM rounds [E-step on Ray Train -> s[v,c] on Spark -> "
                    "penalized M-step on Spark, alpha calibrated to the retrieval budget -> item_paths + "
                    "checkpoint], a final E-step against the final paths, the path index, the retrieval beam (the "
                    "cheapest within the budget that keeps search.recall_target of brute force's validation recall) "
                    "and its serving bundle, and a row in `runs`. "
                    "Idempotent per --run-id: a finished run changes nothing; a failed run resumes at its "
                    "last committed round. --mode incremental learns only from the interactions ingested since "
                    "the last succeeded run (jobs/incremental.py): the last model warm-started over the grown "
                    "vocabulary, s[v,c] merged with a decay per day of data, the M-step on the merged scores.")
    config_options(p)
    p.add_argument("--run-id", required=True, help="idempotency key of this night's run, e.g. nightly-20261124")
    p.add_argument("--mode", choices=["full", "incremental", "auto"], default="full",
                   help="full: retrain on the whole history (default); incremental: the interactions since the "
                        "last succeeded run, on top of it (fails if there is none); auto: incremental once a "
                        "run has succeeded, else full (the nightly DAG's choice)")
    p.add_argument("--dataset", choices=["ml-1m", "ml-100k"], default=None,
                   help="load this MovieLens set first when the warehouse has no interactions")
    _cluster_options(p)
    p.set_defaults(func=cmd_train, cmd_name="train")

    p = sub.add_parser("candidates", help="top-N candidates for every user (or one date's active users)",
                       description="Beam search -> path index -> rerank -> top-N for every user, with the model "
                                   "and item_paths of one succeeded train run (latest by default), into "
                                   "`candidates` partitioned by run date. Idempotent per --run-id.")
    config_options(p)
    p.add_argument("--train-run-id", default=None,
                   help="train run whose model to use (default: the train run named --run-id if any, else the latest succeeded)")
    p.add_argument("--run-id", default=None, help="candidates run id (default: the train run id)")
    p.add_argument("--date", type=_date, default=None, help="only users active on this date (YYYY-MM-DD)")
    p.add_argument("--run-date", type=_date, default=None, help="partition date to write (default today)")
    p.add_argument("--top-n", type=int, default=None,
                   help="candidates per user (default: the train run's search.top_n, the depth its beam was chosen for)")
    p.add_argument("--beam", type=int, default=None,
                   help="paths per user (default: the beam the train run chose for its retrieval budget)")
    _cluster_options(p)
    p.set_defaults(func=cmd_candidates, cmd_name="candidates")

    p = sub.add_parser("evaluate", help="the paper's protocol: P/R/F@k for DR, brute force, HNSW/IVF, popularity, item-CF",
                       description="Evaluate a train run (latest succeeded by default) on its held-out test users: "
                                   "P/R/F@k for DR, brute force (same reranker over all items), the ANN peer "
                                   "(faiss HNSW and IVF over the same reranker vectors, tuned to DR's recall), popularity, "
                                   "item-CF and EASE; items scored per user and users/s; recall against items scored "
                                   "(DR beam sweep, HNSW efSearch and IVF nprobe sweeps); path-size histogram; "
                                   "objective per EM round. Writes evaluation.json and evaluation.html (charts) "
                                   "into <warehouse>/reports/<run_id>/. --set eval.k=... / search.beam=... apply.")
    config_options(p)
    p.add_argument("--run-id", default=None, help="train run to evaluate (default: latest succeeded)")
    _cluster_options(p, ray=False)
    p.set_defaults(func=cmd_evaluate, cmd_name="evaluate")

    p = sub.add_parser("backfill", help="index for any item_paths version, past candidates, paths for cold items",
                       description="path-index: the path -> items index for any committed item_paths version. "
                                   "candidates: regenerate candidates with a past train run's model (paired with "
                                   "the item_paths version it was trained against), written as run "
                                   "backfill-<run id>. cold-items: catalog items without interactions get J paths "
                                   "among their category's most used ones, chosen by the M-step's size penalty "
                                   "against the live path sizes (no category: the least-loaded paths), and the "
                                   "category's mean reranker vector, so `dr candidates` can recommend them; "
                                   "recorded in cold_item_paths, cold_item_vectors and a new path_index.")
    config_options(p)
    p.add_argument("what", choices=["path-index", "candidates", "cold-items"])
    p.add_argument("--item-paths-version", type=int, default=None, help="path-index: item_paths version (default latest)")
    p.add_argument("--run-id", default=None, help="candidates / cold-items: the train run (default latest succeeded)")
    p.add_argument("--date", type=_date, default=None, help="candidates: only users active on this date")
    p.add_argument("--run-date", type=_date, default=None, help="candidates: partition date (default today)")
    p.add_argument("--top-n", type=int, default=None, help="candidates: per user (default: the run's search.top_n)")
    _cluster_options(p)
    p.set_defaults(func=cmd_backfill, cmd_name="backfill")

    p = sub.add_parser("runs", help="list runs and the table versions they produced")
    p.add_argument("--job", default=None, help="only this job (train, candidates, ...)")
    p.add_argument("--warehouse", default="./warehouse")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs, cmd_name="runs")
