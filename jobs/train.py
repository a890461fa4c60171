"""`dr train`: the nightly job. split -> initial paths -> R EM rounds -> final E-step -> path index -> runs row.

Each EM round r: E-step on Ray Train against item_paths v_r (checkpointed) -> s[v,c] on Spark
(path_scores version) -> penalized M-step on Spark (item_paths v_{r+1}). A last E-step
trains the structure model against the final item_paths, so the run's checkpoint and its
item_paths version always belong together (retrieval pairs them).

Idempotent per run id: a succeeded run changes nothing when re-run; a failed run resumes at
its last committed round (every table write carries the run id, the round and a watermark;
the E-step resumes from its checkpoints). A failure records a `failed` row and leaves every
table at the versions its committed rounds made.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dr_model.config import DRConfig
from ray_trainers.config import RayConfig

from . import runs
from .tables import CommitMeta, Warehouse

JOB = "train"
Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrainResult:
    """What a train run produced (or had produced, when skipped)."""

    run_id: str
    skipped: bool
    table_versions: dict[str, int]
    checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def init_item_paths(spark: Any, wh: Warehouse, cfg: DRConfig, samples_version: int, run_id: str, log: Log) -> int:
    """item_paths for round 0: the last committed assignment for known items, hash-random paths for new ones.

    Hash-random paths are balanced in expectation and computed on the executors (no item
    list on the driver); an item's J paths are distinct (offsets of num_paths // J).
    """
    from pyspark.sql import functions as F

    P, J = cfg.model.num_paths, cfg.model.J
    items = wh.read_spark(spark, "samples_train", samples_version).select(F.col("target").alias("item_id")).distinct()
    step = max(P // J, 1)
    h = F.pmod(F.xxhash64(F.col("item_id"), F.lit(cfg.train.seed)), F.lit(P))
    fresh = (items.crossJoin(spark.range(J).select(F.col("id").cast("int").alias("slot")))
             .select("item_id", "slot", F.pmod(h + F.col("slot") * F.lit(step), F.lit(P)).alias("path"),
                     F.lit(None).cast("double").alias("score")))
    previous = wh.version("item_paths")
    if previous is not None:
        old = wh.read_spark(spark, "item_paths", previous).select("item_id", "slot", "path", "score")
        kept = old.join(items, "item_id", "left_semi")
        fresh = kept.unionByName(fresh.join(old.select("item_id").distinct(), "item_id", "left_anti"))
        log(f"initial paths: item_paths v{previous} for known items, hash-random paths for new ones")
    else:
        log("initial paths: hash-random balanced paths (first run)")
    meta = CommitMeta(job=f"{JOB}.init", run_id=run_id, round=0, config_hash=cfg.hash(), watermark=1)
    return wh.write_spark("item_paths", fresh, meta, mode="overwrite").version


def committed_round(wh: Warehouse, run_id: str, job: str, em_round: int) -> int | None:
    """Version of `item_paths` the M-step of this run committed for this round, or None."""
    if not wh.exists("item_paths"):
        return None
    hits = [v.version for v in wh.versions("item_paths") if v.run_id == run_id and v.job == job and v.round == em_round]
    return hits[-1] if hits else None


def run_train(spark: Any, wh: Warehouse, cfg: DRConfig, ray_cfg: RayConfig, run_id: str, log: Log = _log) -> TrainResult:
    """Run (or resume, or skip) the nightly training job for `run_id`."""
    from ray_trainers.estep import run_estep
    from spark_udfs.beam_udf import ModelPayload

    from .mstep import JOB as MSTEP_JOB
    from .mstep import distributed_mstep
    from .path_index import build_path_index
    from .scores import compute_path_scores
    from .split import run_split

    t0 = time.perf_counter()
    prev = runs.latest(wh, JOB, run_id)
    if prev is not None and prev.status == "succeeded":
        log(f"run {run_id} already succeeded: nothing to do (tables {prev.table_versions})")
        return TrainResult(run_id, True, prev.table_versions, prev.checkpoint, prev.metrics)
    runs.record(wh, runs.RunRecord(run_id, JOB, "started", runs.now(), cfg.hash()))
    try:
        log(f"run {run_id}: split (config {cfg.hash()})")
        split = run_split(spark, wh, cfg.split, cfg.model.seq_len, run_id=run_id)
        log(split.summary())
        sv, ev = split.versions["samples_train"], split.versions["eval_users"]
        ip_v = committed_round(wh, run_id, f"{JOB}.init", 0)
        if ip_v is None:               # version 0 is a real version: compare with None, not falsiness
            ip_v = init_item_paths(spark, wh, cfg, sv, run_id, log)
        rounds: list[dict[str, Any]] = []
        for r in range(cfg.train.em_rounds):
            done = committed_round(wh, run_id, MSTEP_JOB, r)
            if done is not None:
                log(f"round {r + 1}/{cfg.train.em_rounds}: already committed (item_paths v{done}), skipping")
                ip_v = done
                continue
            log(f"round {r + 1}/{cfg.train.em_rounds}: E-step on Ray against item_paths v{ip_v}")
            est = run_estep(wh, run_id, r, cfg, ray_cfg, sv, ip_v, log=log)
            log(f"round {r + 1}: s[v,c] on Spark")
            payload = ModelPayload.from_state(est.model_state, est.item_ids, cfg.model)
            ps = compute_path_scores(spark, wh, payload, cfg, sv, run_id, r, log=log)
            log(f"round {r + 1}: M-step on Spark over path_scores v{ps.version}")
            res, stats = distributed_mstep(spark, wh, cfg, ps.version, ip_v, run_id, r, log=log)
            ip_v = res.version
            rounds.append({"round": r, "path_scores": ps.version, "item_paths": ip_v,
                           "estep_loss": est.losses[-1] if est.losses else None,
                           "mstep": [vars(s) for s in stats]})
        log(f"final E-step against item_paths v{ip_v}")
        final = run_estep(wh, run_id, cfg.train.em_rounds, cfg, ray_cfg, sv, ip_v, log=log)
        pi = build_path_index(spark, wh, ip_v, run_id, log=log)
        versions = {"samples_train": sv, "eval_users": ev, "item_paths": ip_v, "path_index": pi.version,
                    "interactions": split.interactions_version}
        metrics = {"rounds": rounds, "final_estep_loss": final.losses[-1] if final.losses else None}
        runs.record(wh, runs.RunRecord(run_id, JOB, "succeeded", runs.now(), cfg.hash(), versions,
                                       final.checkpoint_path, metrics))
        log(f"run {run_id} succeeded in {time.perf_counter() - t0:.0f}s: {versions}")
        return TrainResult(run_id, False, versions, final.checkpoint_path, metrics, time.perf_counter() - t0)
    except BaseException as e:
        runs.record(wh, runs.RunRecord(run_id, JOB, "failed", runs.now(), cfg.hash(), metrics={"error": repr(e)[:2000]}))
        raise
