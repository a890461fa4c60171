"""The distributed M-step's starting state: a partition's candidates and starting paths -> its state row.

Two ways in (jobs.mstep.initial_state picks): `build_state_from_files` reads the partition's
item buckets of `path_scores` itself (the version records the scores job's `item_buckets`) and
gets only the starting item_paths by a shuffle; `build_state` receives every row by a shuffle,
sorted by item, and streams them STREAM_ROWS at a time into per-item arrays. Both end in
`_assemble` (spark_udfs.mstep_udf holds the rounds).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from dr_model.mstep import initial_assignment
from dr_model.scores import PathScores
from spark_udfs.mstep_cache import MStepContext, _CacheDir, _store, partition_dir
from spark_udfs.mstep_files import read_scores
from spark_udfs.mstep_udf import (_counts, _loglik, _partition_id, _partition_seed, _state_row, _table, _traffic,
                                  find_slots)
from spark_udfs.partitioning import spark_partition


STREAM_ROWS = 1 << 20      # input rows turned into compact per-item arrays at a time (bounded memory)


def _init_paths(tbl: pa.Table, J: int) -> tuple[np.ndarray, np.ndarray]:
    """item_paths rows (item_id, slot, path) -> (items [k] sorted, their paths [k, J] in slot order)."""
    order = np.lexsort((tbl.column("slot").to_numpy(), tbl.column("item_id").to_numpy()))
    ip_item = tbl.column("item_id").to_numpy()[order]
    init_items, counts = np.unique(ip_item, return_counts=True)
    if (counts != J).any():
        bad = init_items[counts != J][0]
        raise ValueError(f"starting item_paths: item {bad} has {counts[counts != J][0]} paths, expected J={J}")
    return init_items, tbl.column("path").to_numpy()[order].reshape(-1, J).astype(np.int64)


def _chunk(tbl: pa.Table, ctx: MStepContext) -> tuple[PathScores, np.ndarray, np.ndarray]:
    """Rows of whole items (src 0 path_scores, src 1 item_paths) -> (their s[v,c] lists, start items [k], start paths [k, J])."""
    S = ctx.S
    src = tbl.column("src").to_numpy()
    sc = tbl.filter(pa.array(src == 0))
    if sc.num_rows:
        ps = PathScores.from_long(sc.column("item_id").to_numpy(), sc.column("path").to_numpy(),
                                  sc.column("score").to_numpy(), sc.column("n_v").to_numpy(), S)
    else:
        ps = PathScores(np.zeros(0, np.int64), np.zeros((0, S), np.int64), np.zeros((0, S)), np.zeros(0))
    return (ps, *_init_paths(tbl.filter(pa.array(src == 1)), ctx.J))


def _item_chunks(batches: Iterator[pa.RecordBatch], ctx: MStepContext) -> Iterator[tuple[PathScores, np.ndarray, np.ndarray]]:
    """Rows sorted by item_id -> _chunk of every STREAM_ROWS rows, cut between items (the last item waits for its rest)."""
    pending: list[pa.RecordBatch] = []
    rows, last = 0, None
    for b in batches:
        if not b.num_rows:
            continue
        ids = b.column("item_id").to_numpy()
        if (last is not None and ids[0] < last) or (ids.size > 1 and (np.diff(ids) < 0).any()):
            raise RuntimeError("M-step state build: rows must arrive sorted by item_id (jobs.mstep.initial_state)")
        last = int(ids[-1])
        pending.append(b)
        rows += b.num_rows
        if rows >= STREAM_ROWS:
            tbl = pa.Table.from_batches(pending)
            ids = tbl.column("item_id").to_numpy()
            cut = int(np.searchsorted(ids, ids[-1]))        # the last item may continue in the next batch
            if cut:
                yield _chunk(tbl.slice(0, cut), ctx)
                tail = tbl.slice(cut)
                pending, rows = tail.to_batches(), tail.num_rows
    if pending:
        yield _chunk(pa.Table.from_batches(pending), ctx)


def build_state(batches: Iterator[pa.RecordBatch], ctx: MStepContext, seed: int) -> Iterator[pa.RecordBatch]:
    """A partition's rows sorted by item_id (src 0: path_scores item_id/path/score/n_v; src 1: item_paths
    item_id/slot/path) -> its state row.

    Streamed: every STREAM_ROWS input rows become compact [items, S] arrays, so memory follows
    the partition's items, not its rows. The candidates go to the cache.
    """
    chunks = list(_item_chunks(batches, ctx))
    if not chunks:
        return
    cat = [np.concatenate(x) for x in zip(*((c[0].items, c[0].paths, c[0].scores, c[0].n_v, c[1], c[2])
                                             for c in chunks))]
    del chunks
    yield from _assemble(ctx, _partition_id(), ctx.candidates(PathScores(*cat[:4])), cat[4], cat[5], seed)


def build_state_from_files(batches: Iterator[pa.RecordBatch], ctx: MStepContext, seed: int) -> Iterator[pa.RecordBatch]:
    """A partition's starting item_paths rows (src 1; src 2: a placeholder row) -> its state row, its
    s[v,c] lists read straight from its buckets' path_scores files (ctx.buckets > 0, no shuffle)."""
    part = _partition_id()
    tbl = _table(batches)
    if tbl is not None:
        tbl = tbl.filter(pa.array(tbl.column("src").to_numpy() == 1))
    if tbl is not None and tbl.num_rows:
        wrong = spark_partition(tbl.column("item_id").to_numpy(), ctx.partitions) != part
        if wrong.any():
            raise RuntimeError(f"M-step partition {part} of {ctx.partitions} received item_paths rows of item "
                               f"{tbl.column('item_id')[int(np.argmax(wrong))]} that hash to another partition")
        init_items, init_assign = _init_paths(tbl, ctx.J)
    else:
        init_items, init_assign = np.zeros(0, np.int64), np.zeros((0, ctx.J), np.int64)
    into = partition_dir(ctx, part)
    try:
        ps = read_scores(ctx, part, into)
        if len(ps) or len(init_items):
            yield from _assemble(ctx, part, ps, init_items, init_assign, seed, into)
    finally:
        if into is not None:
            into.discard()                              # a failed build leaves no temp folder


def _assemble(ctx: MStepContext, part: int, ps: PathScores, init_items: np.ndarray, init_assign: np.ndarray,
              seed: int, into: _CacheDir | None = None) -> Iterator[pa.RecordBatch]:
    """A partition's candidates (with exploration) and starting paths -> its state row; candidates to the cache.

    Scored items without a starting assignment get a balanced random one (per partition:
    path counts differ by at most 1 within the partition).
    """
    J, num_paths = ctx.J, ctx.num_paths
    # scored items: starting paths from item_paths where present, else random balanced
    pos = np.minimum(np.searchsorted(init_items, ps.items), max(len(init_items) - 1, 0))
    has = (init_items[pos] == ps.items) if len(init_items) else np.zeros(len(ps), bool)
    assign = np.empty((len(ps), J), np.int64)
    assign[has] = init_assign[pos[has]]
    if (~has).any():
        assign[~has] = initial_assignment(int((~has).sum()), J, num_paths, _partition_seed(seed))
    # items with paths but no candidate at all: carried through unchanged, after the scored ones
    rest = ~np.isin(init_items, ps.items)
    item = np.concatenate([ps.items, init_items[rest]])
    assign = np.concatenate([assign, init_assign[rest]])
    m = len(ps)
    e = _store(ctx, part, item, ps, into)
    slots = find_slots(ps.paths, assign[:m])
    ll, skipped = _loglik(ps.scores, ps.n_v, slots)
    yield _state_row(ctx, part, item, m, assign, slots, _counts(assign[:m], num_paths), ll, skipped, 0, 0.0, -1,
                     traffic=_traffic(e, slots, assign, num_paths))


__all__ = ["STREAM_ROWS", "build_state", "build_state_from_files"]
