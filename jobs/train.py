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
    hit = _committed(wh, run_id, job, em_round)
    return hit.version if hit is not None else None


def _committed(wh: Warehouse, run_id: str, job: str, em_round: int) -> Any:
    if not wh.exists("item_paths"):
        return None
    hits = [v for v in wh.versions("item_paths") if v.run_id == run_id and v.job == job and v.round == em_round]
    return hits[-1] if hits else None


def embedding_item_paths(wh: Warehouse, cfg: DRConfig, model_state: dict, item_ids: Any, run_id: str, log: Log) -> int:
    """item_paths from the reranker's item embeddings (dr_model.init_paths) -> the committed version.

    Runs on the driver over the round-0 model it already holds (V x rerank_dim floats).
    """
    import numpy as np

    from dr_model.init_paths import paths_from_embeddings

    from dr_model.model import DRModel

    mc, V = cfg.model, len(item_ids)
    model = DRModel(mc, V)
    model.load_state_dict(model_state)
    emb = model.reranker.item_vectors().detach().numpy()
    target = cfg.search.target_path_size(V, cfg.eval.k)
    assign = paths_from_embeddings(emb, mc.K, mc.D, mc.J, target, cfg.train.seed)
    sizes = np.bincount(assign.ravel())
    log(f"initial paths from the reranker's item embeddings: {int((sizes > 0).sum())} non-empty paths, largest "
        f"{int(sizes.max())}, {V} items (target path size {target:.1f})")
    import pyarrow as pa

    tbl = pa.table({"item_id": np.repeat(np.asarray(item_ids, np.int64), mc.J),
                    "slot": np.tile(np.arange(mc.J, dtype=np.int32), V), "path": assign.ravel(),
                    "score": pa.nulls(V * mc.J, pa.float64())})
    meta = CommitMeta(job=f"{JOB}.init_paths", run_id=run_id, round=0, config_hash=cfg.hash(), watermark=1)
    return wh.write_arrow("item_paths", tbl, meta, mode="overwrite").version


def choose_retrieval_beam(wh: Warehouse, cfg: DRConfig, est: Any, ip_v: int, valid: Any, log: Log) -> dict[str, Any]:
    """The beam whose mean items scored per validation user fits the budget, for the final model and paths."""
    from dr_model.evaluation import choose_beam
    from dr_model.index import PathIndex
    from dr_model.model import DRModel
    from dr_model.vocab import Vocab
    from ray_trainers.estep import load_item_paths

    item_ids, assign = load_item_paths(wh, ip_v, cfg.model.J)
    model = DRModel(cfg.model, len(item_ids))
    model.load_state_dict(est.model_state)
    model.eval()
    budget = cfg.search.budget(len(item_ids), cfg.eval.k)
    if valid is None or len(valid) == 0:
        log(f"no validation users: retrieval beam {cfg.search.beam} (search.beam)")
        return {"retrieval_beam": cfg.search.beam, "budget": budget}
    beam, cost = choose_beam(model, Vocab(item_ids), valid, PathIndex.build(assign), budget)
    log(f"retrieval beam {beam}: {cost:.1f} items scored per validation user (budget {budget} of {len(item_ids)} items)")
    return {"retrieval_beam": beam, "budget": budget, "items_scored_per_validation_user": cost}


def run_train(spark: Any, wh: Warehouse, cfg: DRConfig, ray_cfg: RayConfig, run_id: str, log: Log = _log) -> TrainResult:
    """Run (or resume, or skip) the nightly training job for `run_id`."""
    from ray_trainers.estep import run_estep
    from spark_udfs.beam_udf import ModelPayload

    from .mstep import JOB as MSTEP_JOB
    from .mstep import MStepOptions, distributed_mstep
    from .path_index import build_path_index
    from .scores import compute_path_scores
    from .split import load_eval_users, run_split

    t0 = time.perf_counter()
    prev = runs.latest(wh, JOB, run_id)
    if prev is not None and prev.status == "succeeded":
        log(f"run {run_id} already succeeded: nothing to do (tables {prev.table_versions})")
        return TrainResult(run_id, True, prev.table_versions, prev.checkpoint, prev.metrics)
    runs.record(wh, runs.RunRecord(run_id, JOB, "started", runs.now(), cfg.hash()))
    try:
        log(f"run {run_id}: split (config {cfg.hash()})")
        split = run_split(spark, wh, cfg.split, cfg.model.seq_len, run_id=run_id,
                          next_items=cfg.train.rerank_targets)
        log(split.summary())
        sv, ev = split.versions["samples_train"], split.versions["eval_users"]
        valid = load_eval_users(wh, ev, role=1)
        ip_v = committed_round(wh, run_id, f"{JOB}.init", 0)
        if ip_v is None:               # version 0 is a real version: compare with None, not falsiness
            ip_v = init_item_paths(spark, wh, cfg, sv, run_id, log)
        rounds: list[dict[str, Any]] = []
        emb_v = committed_round(wh, run_id, f"{JOB}.init_paths", 0)
        if emb_v is None and committed_round(wh, run_id, MSTEP_JOB, 1) is None:
            log(f"round 0: the reranker on Ray (item_paths v{ip_v} fixes the vocabulary), {len(valid)} validation users")
            est0 = run_estep(wh, run_id, 0, cfg, ray_cfg, sv, ip_v, valid_users=valid, log=log)
            rounds.append({"round": 0, "estep": est0.losses})
            if cfg.train.init_paths == "embeddings":
                emb_v = embedding_item_paths(wh, cfg, est0.model_state, est0.item_ids, run_id, log)
        ip_v = emb_v if emb_v is not None else ip_v
        alpha = None
        for r in range(1, cfg.train.em_rounds + 1):
            done = _committed(wh, run_id, MSTEP_JOB, r)
            if done is not None:
                log(f"round {r}/{cfg.train.em_rounds}: already committed (item_paths v{done.version}), skipping")
                md = done.metadata
                ip_v, alpha = done.version, md.get("dr.alpha", alpha)
                rounds.append({"round": r, "item_paths": ip_v, "alpha": alpha, "resumed": True,
                               "mstep": [{k: md.get(f"dr.{k}") for k in ("objective", "alpha", "path_size",
                                                                          "max_path_size")}]})
                continue
            log(f"round {r}/{cfg.train.em_rounds}: E-step on Ray against item_paths v{ip_v}")
            est = run_estep(wh, run_id, r, cfg, ray_cfg, sv, ip_v, valid_users=valid, log=log)
            log(f"round {r}: s[v,c] on Spark")
            payload = ModelPayload.from_state(est.model_state, est.item_ids, cfg.model)
            ps = compute_path_scores(spark, wh, payload, cfg, sv, run_id, r, item_paths_version=ip_v, log=log)
            log(f"round {r}: M-step on Spark over path_scores v{ps.version}")
            res, stats = distributed_mstep(spark, wh, cfg, ps.version, ip_v, run_id, r,
                                           opts=MStepOptions(alpha0=alpha), log=log)
            ip_v, alpha = res.version, stats[-1].alpha
            rounds.append({"round": r, "path_scores": ps.version, "item_paths": ip_v, "alpha": alpha,
                           "estep": est.losses, "mstep": [vars(s) for s in stats]})
        final_round = cfg.train.em_rounds + 1
        log(f"final E-step against item_paths v{ip_v}")
        final = run_estep(wh, run_id, final_round, cfg, ray_cfg, sv, ip_v, valid_users=valid, log=log)
        retrieval = choose_retrieval_beam(wh, cfg, final, ip_v, valid, log)
        pi = build_path_index(spark, wh, ip_v, run_id, log=log)
        versions = {"samples_train": sv, "eval_users": ev, "item_paths": ip_v, "path_index": pi.version,
                    "interactions": split.interactions_version}
        metrics = {"rounds": rounds, "final_estep": final.losses, "alpha": alpha, **retrieval}
        runs.record(wh, runs.RunRecord(run_id, JOB, "succeeded", runs.now(), cfg.hash(), versions,
                                       final.checkpoint_path, metrics))
        log(f"run {run_id} succeeded in {time.perf_counter() - t0:.0f}s: {versions}")
        return TrainResult(run_id, False, versions, final.checkpoint_path, metrics, time.perf_counter() - t0)
    except BaseException as e:
        runs.record(wh, runs.RunRecord(run_id, JOB, "failed", runs.now(), cfg.hash(), metrics={"error": repr(e)[:2000]}))
        raise
