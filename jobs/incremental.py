"""`dr train --mode incremental`: one night learns from the interactions ingested since the last succeeded run.

1. state: the night's kept events merge into the last run's user_state / item_state
   (jobs/user_state.py); samples_train holds one sample per new event, its history taken from
   the merged sequence (the same slicing as the full split, users held out by the last full
   split excluded), so the night reads the state and its own events, not the history;
2. vocabulary: the last run's items and the night's sample targets that are still live (an event within incremental.item_ttl_days
   of the night's data end) keep their paths, new items start on hash-random paths
   (jobs/train.py::init_item_paths);
3. E-step: the last run's model, warm-started with its item rows moved to the new vocabulary
   (dr_model.warm_start), trains both towers incremental.epochs epochs on the night's samples;
4. s[v,c] of the night's samples merged into the last run's path_scores with decay
   incremental.decay_per_day ** (days between the two data ends) and min_score seeding; aged
   items dropped;
5. the M-step on the merged scores (alpha starts from the last run's), then the structure model
   incremental.epochs epochs against the new paths (so checkpoint and item_paths pair, as in
   a full run), the retrieval beam, the path index.
Every step commits with the run id (and a watermark where a rerun could double rows), so a
failed night leaves the tables at versions no run names and a rerun completes it.
"""
from __future__ import annotations

from typing import Any, Callable

from dr_model.config import DRConfig
from dr_model.schedule import Phase
from ray_trainers.config import RayConfig

from . import user_state
from .runs import RunRecord
from .tables import CommitMeta, Warehouse

Log = Callable[[str], None]
JOB = "train.incremental"


def night_samples(seqs: Any, held: Any, L: int, width: int, min_events: int) -> Any:
    """merged_sequences rows -> samples_train rows (user_id, pos, hist[L], target, next[<= width]), one per
    new event with at least one event before it, for users not held out with >= min_events kept events."""
    from pyspark.sql import functions as F

    from .split import _pad_left

    s = (seqs.filter(F.col("n_before") + F.col("n_new") >= min_events)
         .join(held, "user_id", "left_anti")
         .select("user_id", F.transform("ev", lambda e: e["item_id"]).alias("items"),
                 F.transform("ev", lambda e: e["new"]).alias("is_new"),
                 (F.col("n_before") - (F.size("ev") - F.col("n_new"))).alias("first_pos"), F.size("ev").alias("n")))
    p = F.col("p")
    lo = F.greatest(F.lit(0), p - L)
    return (s.select("*", F.explode(F.sequence(F.lit(1), F.greatest(F.col("n") - 1, F.lit(1)))).alias("p"))
            .filter((p < F.col("n")) & F.element_at("is_new", p + 1))
            .select("user_id", (F.col("first_pos") + p).cast("int").alias("pos"),
                    _pad_left(F.slice("items", lo + 1, p - lo), L).alias("hist"),
                    F.element_at("items", p + 1).alias("target"),
                    F.slice("items", p + 1, width).alias("next")))


def live_items(spark: Any, wh: Warehouse, item_state_version: int, end_ts: int, cfg: DRConfig) -> Any:
    """item_id of the items still in the vocabulary: an event within item_ttl_days of end_ts (0: all)."""
    from pyspark.sql import functions as F

    items = wh.read_spark(spark, "item_state", item_state_version)
    ttl = cfg.incremental.item_ttl_days
    if ttl > 0:
        items = items.filter(F.col("last_ts") >= F.lit(end_ts - int(ttl * 86400)))
    return items.select("item_id")


def prepare_night(spark: Any, wh: Warehouse, cfg: DRConfig, run_id: str, prev: RunRecord, interactions_version: int,
                  log: Log) -> dict[str, int]:
    """Step 1: state and the night's samples -> versions {samples_train, user_state, item_state}."""
    from pyspark import StorageLevel

    pv = prev.table_versions
    batches = user_state.batches_since(wh, pv["interactions"], interactions_version)
    log(f"incremental: {len(batches)} ingest batch(es) since interactions v{pv['interactions']} "
        f"(train run {prev.run_id}): {', '.join(batches[:5])}{' ...' if len(batches) > 5 else ''}")
    events = user_state.new_events(spark, wh, pv["interactions"], interactions_version, cfg.split)
    ustate, istate = user_state.read_state(spark, wh, pv)
    seqs = user_state.merged_sequences(ustate, events).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        held = wh.read_spark(spark, "eval_users", pv["eval_users"]).select("user_id")
        L = cfg.model.seq_len
        samples = night_samples(seqs, held, L, cfg.train.rerank_targets, cfg.split.min_events)
        meta = CommitMeta(JOB, run_id, config_hash=cfg.hash(), watermark=1,
                          extra={"interactions_version": interactions_version, "batches": len(batches)})
        sv = wh.write_spark("samples_train", samples, meta, mode="overwrite").version
        versions = user_state.write_state(spark, wh, user_state.next_user_state(ustate, seqs, L),
                                          user_state.next_item_state(istate, events), run_id,
                                          interactions_version, cfg.hash())
    finally:
        seqs.unpersist()
    return {"samples_train": sv, **versions}


def init_night_paths(spark: Any, wh: Warehouse, cfg: DRConfig, run_id: str, prev: RunRecord, versions: dict[str, int],
                     end_ts: int, log: Log) -> int:
    """Step 2: item_paths for the night's vocabulary (the last run's items and the night's targets, if live)
    -> its version."""
    from .train import JOB as TRAIN_JOB
    from .train import committed_round, init_item_paths

    done = committed_round(wh, run_id, f"{TRAIN_JOB}.init", 0)
    if done is not None:
        return done
    known = wh.read_spark(spark, "item_paths", prev.table_versions["item_paths"]).select("item_id")
    targets = wh.read_spark(spark, "samples_train", versions["samples_train"]).selectExpr("target AS item_id")
    items = known.unionByName(targets).join(live_items(spark, wh, versions["item_state"], end_ts, cfg),
                                            "item_id", "left_semi")
    return init_item_paths(spark, wh, cfg, items, run_id, log, previous=prev.table_versions["item_paths"])


def run_night(spark: Any, wh: Warehouse, cfg: DRConfig, ray_cfg: RayConfig, run_id: str, prev: RunRecord,
              interactions_version: int, log: Log) -> tuple[dict[str, int], str, dict[str, Any]]:
    """Steps 1-5 -> (table versions, checkpoint, metrics) of the night."""
    from ray_trainers.estep import run_estep
    from spark_udfs.model_source import ModelSource

    from .mstep import JOB as MSTEP_JOB
    from .mstep import MStepOptions, distributed_mstep
    from .path_index import build_path_index
    from .scores import compute_path_scores
    from .split import load_eval_users
    from .retrieval_beam import choose_retrieval_beam
    from .train import _committed

    pv, pm = prev.table_versions, prev.metrics
    versions = prepare_night(spark, wh, cfg, run_id, prev, interactions_version, log)
    end_ts = user_state.data_end_ts(spark, wh, versions["item_state"])
    days = max(end_ts - int(pm.get("data_end_ts") or end_ts), 0) / 86400
    sv = versions["samples_train"]
    if wh.rows("samples_train", sv) == 0:
        # nothing to learn (no new batch, or only events that make no sample): the last model and
        # paths stay, paired as they were; the state moves on
        log(f"incremental: no new training sample since run {prev.run_id}: its model and paths carry over")
        carried = {**pv, "user_state": versions["user_state"], "item_state": versions["item_state"],
                   "interactions": interactions_version}
        # data_end_ts stays the scores' own: the next merge decays them from there
        return carried, prev.checkpoint, {**pm, "mode": "incremental", "previous_run": prev.run_id,
                                          "days": days, "new_samples": 0}
    log(f"incremental: samples_train v{sv} ({wh.rows('samples_train', sv)} samples of new events), data end "
        f"{end_ts} ({days:.2f} days after run {prev.run_id}'s)")
    ip_v = init_night_paths(spark, wh, cfg, run_id, prev, versions, end_ts, log)
    valid = load_eval_users(wh, pv["eval_users"], role=1)
    seed = cfg.train.seed * 1000 + 900
    epochs = cfg.incremental.epochs
    done = _committed(wh, run_id, MSTEP_JOB, 1)
    if done is None:
        est = run_estep(wh, run_id, 1, cfg, ray_cfg, sv, ip_v, phases=[Phase("incremental", epochs, True, True, seed)],
                        valid_users=valid, warm_from=prev.checkpoint, log=log)
        model = ModelSource.from_checkpoint(est.checkpoint_path, cfg.model)
        ps = compute_path_scores(spark, wh, model, cfg, sv, run_id, 1, previous_version=pv["path_scores"],
                                 item_paths_version=ip_v, days=days, log=log)
        res, stats = distributed_mstep(spark, wh, cfg, ps.version, ip_v, run_id, 1,
                                       opts=MStepOptions(alpha0=pm.get("alpha")), log=log)
        new_ip, alpha, ps_v = res.version, stats[-1].alpha, ps.version
        estep_losses = est.losses
    else:
        new_ip, alpha, ps_v = done.version, done.metadata.get("dr.alpha"), done.metadata.get("dr.path_scores_version")
        estep_losses = None
        log(f"incremental: M-step already committed (item_paths v{new_ip}), resuming after it")
    final = run_estep(wh, run_id, 2, cfg, ray_cfg, sv, new_ip,
                      phases=[Phase("structure", epochs, False, True, seed + 1)], valid_users=valid, log=log)
    pi = build_path_index(spark, wh, new_ip, run_id, log=log)
    retrieval = choose_retrieval_beam(spark, wh, cfg, run_id, final, new_ip, valid, log)
    # the classical peers of `dr evaluate` learn from the last full night's samples, not one night's
    full_sv = pv.get("full_samples_train", pv["samples_train"])
    versions = {**versions, "full_samples_train": full_sv, "eval_users": pv["eval_users"], "item_paths": new_ip,
                "path_index": pi.version,
                "path_scores": ps_v, "interactions": interactions_version}
    metrics = {"mode": "incremental", "previous_run": prev.run_id, "alpha": alpha, "data_end_ts": end_ts,
               "days": days, "decay": cfg.incremental.decay(days), "estep": estep_losses,
               "final_estep": final.losses, **retrieval}
    return versions, final.checkpoint_path, metrics

