"""Beam search over training samples inside Spark (`mapInArrow`), and the per-item s[v,c] step.

DESIGN.md §7 "Beam search inside Spark": a task names the model's checkpoint file (a
ModelSource); every Python worker opens it once (memory-mapped, cached by the source's key,
so later tasks and later jobs with the same model reuse it), torch uses as many threads as
the task has CPUs, and inference runs in batches of `search.batch_size`.

The math is dr_model's: `DRModel.beam` + `exp(logp)` per pair (what `trainer.pair_scores`
does), and per item `PathScores.from_long` (sums the (item, path) duplicates exactly, then
keeps the top S) and `streaming_merge`. Spark only moves rows: the beam UDF emits ONE row
per training pair (its kept outputs and p(c|x) as two lists, n_v = 1), so n_v needs no
second scan of the samples and no join; one shuffle brings every row of an item to one
partition, where dr_model sums and keeps the top S. (A per-batch partial sum in the UDF
would only pay off when an item repeats within an Arrow batch; with catalog-scale
targets it rarely does, and the per-item step sums exactly anyway.)
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from dr_model.scores import EMPTY, PathScores, streaming_merge

from .model_source import ModelSource, load_model

# Output of the beam UDF: one row per (training pair, beam output).
BEAM_SCHEMA = pa.schema([("item_id", pa.int64()), ("path", pa.int64()), ("prob", pa.float64())])
BEAM_DDL = "item_id long, path long, prob double"
# Input of the per-item step: ONE row per training pair (its kept beam outputs as lists,
# n_v = 1, src 0), or one row per stored (item, path) of the previous version (src 1).
PAIR_SCHEMA = pa.schema([("item_id", pa.int64()), ("paths", pa.list_(pa.int64())), ("scores", pa.list_(pa.float64())),
                         ("n_v", pa.float64()), ("src", pa.int32())])
PAIR_DDL = "item_id long, paths array<long>, scores array<double>, n_v double, src int"
PATH_SCORES_SCHEMA = pa.schema([("item_id", pa.int64()), ("path", pa.int64()),
                                ("score", pa.float64()), ("n_v", pa.float64())])

def set_task_threads() -> None:
    """torch threads = the task's CPUs (spark.task.cpus), so tasks do not oversubscribe cores."""
    import torch
    from pyspark import TaskContext

    ctx = TaskContext.get()
    n = max(1, ctx.cpus()) if ctx is not None else 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _own_paths(batch: pa.RecordBatch, J: int) -> np.ndarray | None:
    """The `own` column (the target's current paths, list<long> [J], null: none) -> [N, J] int64 (-1: none)."""
    i = batch.schema.get_field_index("own")
    if i < 0:
        return None
    col = batch.column(i)
    out = np.full((batch.num_rows, J), EMPTY, dtype=np.int64)
    lens = np.asarray(col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
    full = lens == J
    if full.any():
        out[full] = col.filter(pa.array(full)).flatten().to_numpy().reshape(-1, J)
    return out


def _beam_arrays(batches: Iterator[pa.RecordBatch], src: ModelSource, S: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per input Arrow batch: (target [N], paths [N, B'], prob [N, B'] float64, kept [N, B'] bool = path not EMPTY).

    With an `own` column (the target's J current paths), each pair also scores them
    (DRModel.beam_and_own): B' = S + J.
    """
    import torch

    model = None
    for batch in batches:
        if batch.num_rows == 0:
            continue
        if model is None:
            set_task_threads()
            model, vocab = load_model(src)
        hist_col = batch.column(batch.schema.get_field_index("hist"))
        target = batch.column(batch.schema.get_field_index("target")).to_numpy()
        # fixed-length histories: the flat child array reshapes to [N, L] without copies per row
        L = len(hist_col[0]) if batch.num_rows else 0
        hist = hist_col.flatten().to_numpy().reshape(batch.num_rows, L)
        own = _own_paths(batch, model.cfg.J)
        ps, probs = [], []
        for lo in range(0, batch.num_rows, batch_size):
            own_b = torch.from_numpy(own[lo:lo + batch_size]) if own is not None else None
            paths, logp = model.beam_and_own(vocab.seq(hist[lo:lo + batch_size]), S, own_b)
            ps.append(paths.numpy())
            probs.append(logp.double().exp().numpy())
        p = np.concatenate(ps) if len(ps) > 1 else ps[0]
        prob = np.concatenate(probs) if len(probs) > 1 else probs[0]
        yield target, p, prob, p != EMPTY


def beam_batches(batches: Iterator[pa.RecordBatch], src: ModelSource, S: int,
                 batch_size: int) -> Iterator[pa.RecordBatch]:
    """Samples (hist list<long> [L], target) -> rows (item_id = target, path, prob = p(c|x)), S per pair.
    """
    for target, p, prob, kept in _beam_arrays(batches, src, S, batch_size):
        keep = kept.ravel()
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.repeat(target, p.shape[1])[keep]), pa.array(p.ravel()[keep]),
             pa.array(prob.ravel()[keep])], schema=BEAM_SCHEMA)


def pair_batches(batches: Iterator[pa.RecordBatch], src: ModelSource, S: int,
                 batch_size: int) -> Iterator[pa.RecordBatch]:
    """Samples -> PAIR_SCHEMA rows: one per pair with a kept beam output (its paths and p(c|x) as lists, n_v = 1).

    One row per pair, not per (pair, output): the shuffle to the items' partitions then
    moves S' times fewer rows (Spark's cost there is per row more than per value).
    """
    for target, p, prob, kept in _beam_arrays(batches, src, S, batch_size):
        lens = kept.sum(1)
        has = lens > 0
        offsets = np.zeros(int(has.sum()) + 1, dtype=np.int32)
        np.cumsum(lens[has], out=offsets[1:])
        n = len(offsets) - 1
        yield pa.RecordBatch.from_arrays(
            [pa.array(target[has]), pa.ListArray.from_arrays(pa.array(offsets), pa.array(p[kept])),
             pa.ListArray.from_arrays(pa.array(offsets), pa.array(prob[kept])), pa.array(np.ones(n)),
             pa.array(np.zeros(n, np.int32))], schema=PAIR_SCHEMA)


def _path_scores(tbl: pa.Table, S: int) -> PathScores:
    """Long rows (item_id, path, score, n_v) of some items -> PathScores (top-S per item)."""
    col = lambda name, dt: tbl.column(name).to_numpy().astype(dt, copy=False)  # noqa: E731
    if tbl.num_rows == 0:
        return PathScores(np.zeros(0, np.int64), np.zeros((0, S), np.int64), np.zeros((0, S)), np.zeros(0))
    return PathScores.from_long(col("item_id", np.int64), col("path", np.int64), col("score", np.float64),
                                col("n_v", np.float64), S)


def _flat(tbl: pa.Table, n_v_row: np.ndarray) -> pa.Table:
    """PAIR_SCHEMA rows -> long rows (item_id, path, score, n_v): each row's lists flattened, its n_v repeated."""
    paths, scores = tbl.column("paths").combine_chunks(), tbl.column("scores").combine_chunks()
    lens = paths.value_lengths().to_numpy(zero_copy_only=False)
    return pa.table({"item_id": np.repeat(tbl.column("item_id").to_numpy(), lens),
                     "path": paths.flatten().to_numpy(), "score": scores.flatten().to_numpy(),
                     "n_v": np.repeat(n_v_row, lens)})


def top_s_batches(batches: Iterator[pa.RecordBatch], S: int, decay: float | None) -> Iterator[pa.RecordBatch]:
    """All rows of a partition's items (PAIR_SCHEMA) -> path_scores rows.

    src 0: this run's pair rows (n_v = 1 each: the item's pair count is their sum); src 1:
    the previous version (n_v per item on every row). decay None: batch mode (new only).
    Otherwise dr_model's streaming merge of the previous top-S lists with the new ones
    (decay eta, min_score seeding).
    """
    got = [b for b in batches if b.num_rows]
    if not got:
        return
    tbl = pa.Table.from_batches(got)
    src = tbl.column("src").to_numpy()
    fresh = tbl if (src == 0).all() else tbl.filter(pa.array(src == 0))
    nv = np.zeros(0)
    if fresh.num_rows:
        # n_v per item = the sum of its pairs' n_v, on every row of the item (from_long's layout)
        _, inv = np.unique(fresh.column("item_id").to_numpy(), return_inverse=True)
        nv = np.bincount(inv, weights=fresh.column("n_v").to_numpy())[inv]
    new = _path_scores(_flat(fresh, nv), S)
    if decay is None:
        out = new
    else:
        old = tbl.filter(pa.array(src == 1))
        out = streaming_merge(_path_scores(_flat(old, old.column("n_v").to_numpy()), S), new, decay)
    item, path, score, n_v = out.to_long()
    yield pa.RecordBatch.from_arrays([pa.array(item), pa.array(path), pa.array(score), pa.array(n_v)],
                                     schema=PATH_SCORES_SCHEMA)


__all__ = ["ModelSource", "load_model", "beam_batches", "pair_batches", "top_s_batches", "BEAM_DDL", "PAIR_DDL"]
