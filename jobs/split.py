"""`dr split`: the paper's split as a Spark job -> `samples_train` and `eval_users` tables.

It reproduces dr_model/split.py::paper_split exactly (same users, same samples): events with
rating >= threshold (events without a rating, i.e. implicit feedback, are kept), users with
>= min_events events, held-out users by the seeded hash rank, each user's events ordered by
(ts, item_id). Histories are stored as array<bigint> of exactly L items, left-padded with -1:
  samples_train(user_id, pos, hist[L], target): pos = 0-based index of the target event, pos >= 1
  eval_users(user_id, role 1|2, hist[L], n_input = n // 2, input[n_input], truth[n - n_input],
             both in time order; `input` is the whole input half the baselines read)
Held-out sizes follow dr_model.split.heldout_sizes of the eligible users (one count).
Both tables are overwritten, each in one commit tagged with the run id, the config hash and the
`interactions` version read; re-running the same split of the same version is a no-op.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dr_model.config import SplitConfig
from dr_model.evaluation import EvalUsers
from dr_model.split import HASH_MOD, HASH_MULT, PAD, Split, heldout_sizes

from .tables import CommitMeta, Warehouse


@dataclass(frozen=True)
class SplitResult:
    """Versions written by one split run and its sizes."""

    run_id: str
    interactions_version: int
    train_samples: int
    eval_users: int
    versions: dict[str, int]
    skipped: bool
    seconds: float

    def summary(self) -> str:
        state = "already split, nothing written; " if self.skipped else ""
        return (f"split {self.run_id} of interactions v{self.interactions_version}: {state}"
                f"{self.train_samples} training samples, {self.eval_users} evaluation users; "
                f"samples_train v{self.versions['samples_train']}, eval_users v{self.versions['eval_users']}; "
                f"{self.seconds:.1f}s")


def user_hash_col(user_id: Any, seed: int) -> Any:
    """Spark Column equal to dr_model.split.user_hash (int64 arithmetic that cannot overflow there)."""
    from pyspark.sql import functions as F

    P = F.lit(HASH_MOD).cast("bigint")
    x = F.pmod(F.pmod(user_id.cast("bigint"), P) * F.lit(HASH_MULT).cast("bigint") + F.lit(seed).cast("bigint"), P)
    for _ in range(2):
        x = F.pmod(x * x + F.lit(seed + 1).cast("bigint"), P)
    return x


def _pad_left(arr: Any, L: int) -> Any:
    from pyspark.sql import functions as F
    return F.concat(F.array_repeat(F.lit(PAD).cast("bigint"), F.lit(L) - F.size(arr)), arr)


def split_frames(events: Any, cfg: SplitConfig, seq_len: int, eligible: int | None = None,
                 next_items: int = 1) -> tuple[Any, Any, Any]:
    """interactions DataFrame -> (samples_train, eval_users, the persisted per-user sequences to
    unpersist once both are written) DataFrames.

    next_items: the length of each sample's `next` column (its target and the user's next
    items: the reranker's targets, train.rerank_targets).
    eligible: the number of users with >= min_events kept events (counted when not given),
    which caps the held-out users (dr_model.split.heldout_sizes).
    """
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    L = seq_len
    from .user_state import kept as kept_events

    kept = kept_events(events, cfg)
    # One ordered sequence per user: sorting structs orders by (ts, item_id).
    seqs = (kept.groupBy("user_id")
            .agg(F.sort_array(F.collect_list(F.struct("ts", "item_id"))).alias("ev"))
            .select("user_id", F.col("ev.item_id").alias("items"), F.size("ev").alias("n"))
            .filter(F.col("n") >= cfg.min_events)
            .withColumn("h", user_hash_col(F.col("user_id"), cfg.seed)))
    # Read three times (count, held-out top-k, the two outputs): one sort of the events, not three.
    # O(events) spread over the executors, spilling to disk where memory is short.
    cached = seqs = seqs.persist(StorageLevel.MEMORY_AND_DISK)
    if eligible is None:
        eligible = seqs.count()
    n_test, n_valid = heldout_sizes(eligible, cfg)
    if eligible and cfg.test_users + cfg.valid_users and n_test + n_valid == 0:
        raise ValueError(f"split: {eligible} eligible users (>= split.min_events={cfg.min_events} kept events) "
                         "leave no held-out user: the dataset is too small to evaluate")
    if (n_test, n_valid) != (cfg.test_users, cfg.valid_users):
        print(f"[split] {eligible} eligible users: holding out {n_test} test and {n_valid} validation users "
              f"(asked {cfg.test_users} + {cfg.valid_users}; at most split.max_heldout_fraction="
              f"{cfg.max_heldout_fraction} of the eligible users)", file=sys.stderr, flush=True)
    n_out = n_test + n_valid
    # Held-out users: the n_out smallest (hash, user_id); a top-k, then ranks on <= n_out rows.
    held = (seqs.select("user_id", "h").orderBy("h", "user_id").limit(n_out)
            .withColumn("rank", F.row_number().over(Window.orderBy("h", "user_id")))
            .select("user_id", F.when(F.col("rank") <= n_test, 2).otherwise(1).cast("tinyint").alias("role")))
    seqs = seqs.join(F.broadcast(held), "user_id", "left").fillna(0, subset=["role"])

    p = F.col("pos")
    lo = F.greatest(F.lit(0), p - L)
    train = (seqs.filter(F.col("role") == 0)
             .select("user_id", "items", F.explode(F.sequence(F.lit(1), F.col("n") - 1)).alias("pos"))
             .select("user_id", p.cast("int").alias("pos"),
                     _pad_left(F.slice("items", lo + 1, p - lo), L).alias("hist"),
                     F.element_at("items", p + 1).alias("target"),
                     F.slice("items", p + 1, next_items).alias("next")))
    n_in = (F.col("n") / 2).cast("int")
    lo_e = F.greatest(F.lit(0), n_in - L)
    evals = (seqs.filter(F.col("role") > 0)
             .select("user_id", "role",
                     _pad_left(F.slice("items", lo_e + 1, n_in - lo_e), L).alias("hist"),
                     n_in.alias("n_input"),
                     F.slice("items", F.lit(1), n_in).alias("input"),
                     F.slice("items", n_in + 1, F.col("n") - n_in).alias("truth")))
    return train, evals, cached


def run_split(spark: Any, wh: Warehouse, cfg: SplitConfig, seq_len: int, version: int | None = None,
              run_id: str | None = None, next_items: int = 1) -> SplitResult:
    """Split `interactions` (at `version`, latest by default) into samples_train and eval_users."""
    t0 = time.time()
    src = wh.version("interactions") if version is None else version
    if src is None:
        raise FileNotFoundError(f"no interactions table under {wh.root}: run `dr ingest` or `dr data` first")
    conf = json.dumps({"split": asdict(cfg), "seq_len": seq_len, "next_items": next_items}, sort_keys=True)
    chash = hashlib.sha256(conf.encode()).hexdigest()[:16]
    run_id = run_id or f"split-{chash}-v{src}"
    meta = CommitMeta("split", run_id, config_hash=chash, watermark=1,
                      extra={"interactions_version": src, "config": conf})
    tables = ("eval_users", "samples_train")
    if all(wh.watermark(t, meta.job, run_id) is not None for t in tables):
        # a rerun of a committed split: its versions, without recomputing the frames
        versions = {t: wh.committed_version(t, meta.job, run_id) for t in tables}
        print(f"[split] {run_id}: already committed ({versions}), nothing to recompute", file=sys.stderr, flush=True)
        return SplitResult(run_id, src, wh.rows("samples_train", versions["samples_train"]),
                           wh.rows("eval_users", versions["eval_users"]), versions, True, time.time() - t0)
    print(f"[split] {run_id}: interactions v{src}, {cfg}, L={seq_len}, next items {next_items}", file=sys.stderr, flush=True)
    train, evals, cached = split_frames(wh.read_spark(spark, "interactions", src), cfg, seq_len, next_items=next_items)
    try:
        re = wh.write_spark("eval_users", evals, meta, mode="overwrite")
        rt = wh.write_spark("samples_train", train, meta, mode="overwrite")
    finally:
        cached.unpersist()
    # a rerun after a crash between the two writes skips the one already committed: count its rows
    n_train, n_eval = (wh.rows(r.table, r.version) if r.skipped else r.rows for r in (rt, re))
    return SplitResult(run_id, src, n_train, n_eval, {"samples_train": rt.version, "eval_users": re.version},
                       re.skipped and rt.skipped, time.time() - t0)


def load_eval_users(wh: Warehouse, version: int | None, role: int) -> EvalUsers:
    """The held-out users of one role (1 validation, 2 test) of an eval_users version, as dr_model's EvalUsers.

    O(held-out users) rows: what the driver may hold (DESIGN.md §8, evaluate).
    """
    import pyarrow.compute as pc

    ev = wh.read_arrow("eval_users", version)
    ev = ev.filter(pc.equal(ev.column("role"), role)).sort_by("user_id")
    L = len(ev.column("hist")[0]) if ev.num_rows else 0
    flat = ev.column("hist").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    t_off, t_items = _csr(ev.column("truth"))
    i_off, i_items = _csr(ev.column("input"))
    return EvalUsers(flat.reshape(ev.num_rows, L), i_off, i_items, t_off, t_items)


def _csr(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> CSR (offsets [n+1] int64, values int64)."""
    arr = col.combine_chunks()
    lens = np.asarray(arr.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64)
    return (np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64))


def load_split(wh: Warehouse, train_version: int | None = None, eval_version: int | None = None) -> Split:
    """The stored split as dr_model's in-process Split (rows ordered by user, then position)."""
    tr = wh.read_arrow("samples_train", train_version).sort_by([("user_id", "ascending"), ("pos", "ascending")])
    ev = wh.read_arrow("eval_users", eval_version).sort_by("user_id")
    L = len(tr.column("hist")[0]) if tr.num_rows else (len(ev.column("hist")[0]) if ev.num_rows else 0)

    def mat(col: pa.ChunkedArray) -> np.ndarray:
        flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        return flat.reshape(len(col), L)

    t_off, t_items = _csr(ev.column("truth"))
    i_off, i_items = _csr(ev.column("input"))
    return Split(
        train_hist=mat(tr.column("hist")), train_target=tr.column("target").to_numpy(),
        train_user=tr.column("user_id").to_numpy(),
        eval_user=ev.column("user_id").to_numpy(), eval_role=ev.column("role").to_numpy().astype(np.int8),
        eval_hist=mat(ev.column("hist")), truth_offsets=t_off, truth_items=t_items,
        input_offsets=i_off, input_items=i_items)
