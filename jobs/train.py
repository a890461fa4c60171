"""`dr train`: the nightly job. A full night: split -> initial paths -> R EM rounds -> final E-step -> path
index -> user/item state -> runs row; an incremental night (--mode incremental, or auto once a run
with state has succeeded) learns from the interactions since the last run instead (jobs/incremental.py).

Each EM round r: E-step on Ray Train against item_paths v_r (checkpointed) -> s[v,c] on Spark
(path_scores version) -> penalized M-step on Spark (item_paths v_{r+1}). A last E-step
trains the structure model against the final item_paths, so the run's checkpoint and its
item_paths version always belong together (retrieval pairs them).

Idempotent per run id: a succeeded run changes nothing when re-run; a failed run resumes at
its last committed round (every table write carries the run id, the round and a watermark;
the E-step resumes from its checkpoints). A failure records a `failed` row and leaves every
table at the versions its committed rounds made; the interactions version the first attempt read
is recorded with its `started` row, so a rerun trains on the same data.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

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


def init_item_paths(spark: Any, wh: Warehouse, cfg: DRConfig, items: Any, run_id: str, log: Log,
                    previous: int | None = None) -> int:
    """item_paths for round 0 over `items` (a DataFrame of item_id): the assignment of item_paths@previous
    for known items, hash-random paths for new ones.

    Hash-random paths are balanced in expectation and computed on the executors (no item
    list on the driver); an item's J paths are distinct (offsets of num_paths // J).
    """
    from pyspark.sql import functions as F

    P, J = cfg.model.num_paths, cfg.model.J
    items = items.select("item_id").distinct()
    step = max(P // J, 1)
    h = F.pmod(F.xxhash64(F.col("item_id"), F.lit(cfg.train.seed)), F.lit(P))
    fresh = (items.crossJoin(spark.range(J).select(F.col("id").cast("int").alias("slot")))
             .select("item_id", "slot", F.pmod(h + F.col("slot") * F.lit(step), F.lit(P)).alias("path"),
                     F.lit(None).cast("double").alias("score")))
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
    hit = _committed(wh, run_id, job, em_round)
    return hit.version if hit is not None else None


def _committed(wh: Warehouse, run_id: str, job: str, em_round: int) -> Any:
    if not wh.exists("item_paths"):
        return None
    hits = [v for v in wh.versions("item_paths") if v.run_id == run_id and v.job == job and v.round == em_round]
    return hits[-1] if hits else None


Mode = Literal["full", "incremental", "auto"]


def _mode(wh: Warehouse, run_id: str, mode: Mode, cfg: DRConfig, log: Log) -> tuple[str, runs.RunRecord | None]:
    """(full | incremental, the succeeded run an incremental night builds on). Auto: incremental on a
    succeeded run with state whose structure is not collapsed."""
    prev = next((r for r in reversed(runs.history(wh, JOB)) if r.status == "succeeded" and r.run_id != run_id), None)
    if mode == "full":
        return "full", prev
    ready = prev is not None and {"user_state", "item_state", "path_scores"} <= set(prev.table_versions)
    if mode == "incremental" and not ready:
        raise LookupError(f"dr train --mode incremental: no succeeded train run with user state and path scores in "
                          f"{wh.root} to build on (run a full night first, or use --mode auto)")
    if not ready:
        log("mode auto: no succeeded run with state to build on: a full night")
        return "full", prev
    if mode == "auto" and (why := _collapsed(wh, prev.table_versions["item_paths"], cfg)):
        log(f"mode auto: run {prev.run_id}'s structure is collapsed ({why}): a full night re-seeds it")
        return "full", prev
    return "incremental", prev


def _collapsed(wh: Warehouse, ip_v: int, cfg: DRConfig) -> str | None:
    """Why item_paths version ip_v is collapsed (train.collapse_factor), from its M-step's commit, else None."""
    from dr_model.calibrate import is_collapsed

    md = next((v.metadata for v in wh.versions("item_paths") if v.version == ip_v), {})
    size, target = md.get("dr.path_size"), md.get("dr.target_path_size")
    if size is None or target is None:          # a fixed alpha, or paths no M-step wrote
        return None
    size, target = float(size), float(target)
    if is_collapsed(size, target, cfg.train.collapse_factor):
        return f"path size {size:.1f} > {cfg.train.collapse_factor:g} x the target {target:.1f}"
    return None


def _pinned_interactions(wh: Warehouse, run_id: str) -> int | None:
    """The interactions version an earlier attempt of this run started on (a rerun reads the same data)."""
    rows = [r for r in runs.history(wh, JOB) if r.run_id == run_id and "interactions" in r.table_versions]
    return rows[0].table_versions["interactions"] if rows else None


def run_train(spark: Any, wh: Warehouse, cfg: DRConfig, ray_cfg: RayConfig, run_id: str, log: Log = _log,
              mode: Mode = "full") -> TrainResult:
    """Run (or resume, or skip) the nightly training job for `run_id`: a full night, an incremental one
    (jobs/incremental.py), or auto (incremental once a run with state has succeeded)."""
    t0 = time.perf_counter()
    prev = runs.latest(wh, JOB, run_id)
    if prev is not None and prev.status == "succeeded":
        log(f"run {run_id} already succeeded: nothing to do (tables {prev.table_versions})")
        return TrainResult(run_id, True, prev.table_versions, prev.checkpoint, prev.metrics)
    inter_v = _pinned_interactions(wh, run_id)
    if inter_v is None:
        inter_v = wh.version("interactions")
    if inter_v is None:
        raise FileNotFoundError(f"no interactions table under {wh.root}: run `dr ingest` or `dr data` first")
    kind, base = _mode(wh, run_id, mode, cfg, log)
    runs.record(wh, runs.RunRecord(run_id, JOB, "started", runs.now(), cfg.hash(), {"interactions": inter_v},
                                   metrics={"mode": kind}))
    try:
        if kind == "incremental":
            from .incremental import run_night

            log(f"run {run_id}: incremental night on train run {base.run_id} (config {cfg.hash()})")
            versions, checkpoint, metrics = run_night(spark, wh, cfg, ray_cfg, run_id, base, inter_v, log)
        else:
            versions, checkpoint, metrics = _full_night(spark, wh, cfg, ray_cfg, run_id, inter_v, log)
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        runs.record(wh, runs.RunRecord(run_id, JOB, "succeeded", runs.now(), cfg.hash(), versions, checkpoint, metrics))
        log(f"run {run_id} ({kind}) succeeded in {time.perf_counter() - t0:.0f}s: {versions}")
        return TrainResult(run_id, False, versions, checkpoint, metrics, time.perf_counter() - t0)
    except BaseException as e:
        runs.record(wh, runs.RunRecord(run_id, JOB, "failed", runs.now(), cfg.hash(), {"interactions": inter_v},
                                       metrics={"mode": kind, "error": repr(e)[:2000]}))
        raise


def _full_night(spark: Any, wh: Warehouse, cfg: DRConfig, ray_cfg: RayConfig, run_id: str, inter_v: int,
                log: Log) -> tuple[dict[str, int], str, dict[str, Any]]:
    """The whole history: split -> round 0 -> R EM rounds -> final E-step -> state -> (versions, checkpoint, metrics)."""
    from ray_trainers.estep import run_estep
    from spark_udfs.model_source import ModelSource

    from . import user_state
    from .mstep import JOB as MSTEP_JOB
    from .mstep import MStepOptions, distributed_mstep
    from .embedding_paths import embedding_item_paths
    from .path_index import build_path_index
    from .retrieval_beam import choose_retrieval_beam
    from .scores import compute_path_scores
    from .split import load_eval_users, run_split

    log(f"run {run_id}: split (config {cfg.hash()})")
    split = run_split(spark, wh, cfg.split, cfg.model.seq_len, version=inter_v, run_id=run_id,
                      next_items=cfg.train.rerank_targets)
    log(split.summary())
    sv, ev = split.versions["samples_train"], split.versions["eval_users"]
    valid = load_eval_users(wh, ev, role=1)
    ip_v = committed_round(wh, run_id, f"{JOB}.init", 0)
    if ip_v is None:               # version 0 is a real version: compare with None, not falsiness
        items = wh.read_spark(spark, "samples_train", sv).selectExpr("target AS item_id")
        ip_v = init_item_paths(spark, wh, cfg, items, run_id, log, previous=wh.version("item_paths"))
    rounds: list[dict[str, Any]] = []
    emb_v = committed_round(wh, run_id, f"{JOB}.init_paths", 0)
    if emb_v is None and committed_round(wh, run_id, MSTEP_JOB, 1) is None:
        log(f"round 0: the reranker on Ray (item_paths v{ip_v} fixes the vocabulary), {len(valid)} validation users")
        est0 = run_estep(wh, run_id, 0, cfg, ray_cfg, sv, ip_v, valid_users=valid, log=log)
        rounds.append({"round": 0, "estep": est0.losses})
        if cfg.train.init_paths == "embeddings":
            emb_v = embedding_item_paths(spark, wh, cfg, est0.checkpoint_path, run_id, f"{JOB}.init_paths", log)
    ip_v = emb_v if emb_v is not None else ip_v
    alpha, ps_v = None, None
    for r in range(1, cfg.train.em_rounds + 1):
        done = _committed(wh, run_id, MSTEP_JOB, r)
        if done is not None:
            log(f"round {r}/{cfg.train.em_rounds}: already committed (item_paths v{done.version}), skipping")
            md = done.metadata
            ip_v, alpha, ps_v = done.version, md.get("dr.alpha", alpha), md.get("dr.path_scores_version", ps_v)
            rounds.append({"round": r, "item_paths": ip_v, "alpha": alpha, "resumed": True,
                           "mstep": [{k: md.get(f"dr.{k}") for k in ("objective", "alpha", "path_size",
                                                                      "max_path_size")}]})
            continue
        log(f"round {r}/{cfg.train.em_rounds}: E-step on Ray against item_paths v{ip_v}")
        est = run_estep(wh, run_id, r, cfg, ray_cfg, sv, ip_v, valid_users=valid, log=log)
        log(f"round {r}: s[v,c] on Spark")
        model = ModelSource.from_checkpoint(est.checkpoint_path, cfg.model)    # the executors read it themselves
        ps = compute_path_scores(spark, wh, model, cfg, sv, run_id, r, item_paths_version=ip_v, log=log)
        log(f"round {r}: M-step on Spark over path_scores v{ps.version}")
        res, stats = distributed_mstep(spark, wh, cfg, ps.version, ip_v, run_id, r,
                                       opts=MStepOptions(alpha0=alpha), log=log)
        ip_v, alpha, ps_v = res.version, stats[-1].alpha, ps.version
        rounds.append({"round": r, "path_scores": ps.version, "item_paths": ip_v, "alpha": alpha,
                       "estep": est.losses, "mstep": [vars(s) for s in stats]})
    final_round = cfg.train.em_rounds + 1
    log(f"final E-step against item_paths v{ip_v}")
    final = run_estep(wh, run_id, final_round, cfg, ray_cfg, sv, ip_v, valid_users=valid, log=log)
    pi = build_path_index(spark, wh, ip_v, run_id, log=log)
    retrieval = choose_retrieval_beam(spark, wh, cfg, run_id, final, ip_v, valid, log)
    state = user_state.build_state(spark, wh, cfg.split, cfg.model.seq_len, inter_v, run_id, cfg.hash())
    end_ts = user_state.data_end_ts(spark, wh, state["item_state"])
    log(f"user_state v{state['user_state']}, item_state v{state['item_state']} (data end {end_ts})")
    versions = {"samples_train": sv, "eval_users": ev, "item_paths": ip_v, "path_index": pi.version,
                "interactions": split.interactions_version, **state}
    if ps_v is not None:           # no EM round (em_rounds = 0): nothing for an incremental night to merge into
        versions["path_scores"] = ps_v
    metrics = {"mode": "full", "rounds": rounds, "final_estep": final.losses, "alpha": alpha,
               "data_end_ts": end_ts, **retrieval}
    return versions, final.checkpoint_path, metrics
