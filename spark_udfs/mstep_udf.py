"""Distributed M-step, the per-partition side (`mapInArrow` bodies around dr_model.mstep).

Convergence scheme: **extrapolated local deltas** (DESIGN.md §2 "Distributed form").
Every partition sweeps its items block after block with dr_model's kernel
(`update_block`: damped Jacobi inside a block, Gauss-Seidel between blocks) against its
copy of the broadcast path-size table. Plain copies would carry only the partition's own
moves: P partitions would then each make the whole correction for a crowded path (all
flee it at once, the cross-partition Jacobi oscillation). Items are hash-partitioned, so
the other P-1 partitions make statistically the same moves as this one: the copy counts
every local move `scale` = round(V_total / V_partition) times, which is an unbiased
estimate of the global table at that point of the sweep. Each partition therefore
corrects only its share. scale = 1 (one partition) is exactly `mstep_blocked`'s sweep.
A scaled departure can push an entry below zero; entries are clipped at 0.

State rows (one per item, `STATE_DDL`): candidates [S] (PathScores layout), n_v, the
current assignment [J] and the previous round's (for `items moved`), `scored` (False
for items carried through from the starting item_paths without any candidate: they keep
their paths and, as in trainer.train_em, are not in the size table), and `cpu`, the
sweep's task CPU seconds on the partition's first row.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from dr_model.mstep import initial_assignment, objective, path_sizes, penalty_delta, prepare_blocks, sweep, update_block
from dr_model.scores import EMPTY, PathScores

STATE_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("scored", pa.bool_()), ("n_v", pa.float64()),
    ("paths", pa.list_(pa.int64())), ("scores", pa.list_(pa.float64())),
    ("assign", pa.list_(pa.int64())), ("prev", pa.list_(pa.int64())), ("cpu", pa.float64()),
])
STATE_DDL = ("item_id long, scored boolean, n_v double, paths array<long>, scores array<double>, "
             "assign array<long>, prev array<long>, cpu double")
# Per-round statistics rows: per-path counts (path >= 0) and one row per partition (path = -1).
STATS_SCHEMA = pa.schema([("path", pa.int64()), ("cnt", pa.int64()), ("loglik", pa.float64()),
                          ("skipped", pa.int64()), ("moved", pa.int64()), ("cpu", pa.float64())])
STATS_DDL = "path long, cnt long, loglik double, skipped long, moved long, cpu double"
ITEM_PATHS_SCHEMA = pa.schema([("item_id", pa.int64()), ("slot", pa.int32()), ("path", pa.int64()),
                               ("score", pa.float64())])
ITEM_PATHS_DDL = "item_id long, slot int, path long, score double"


# --------------------------------------------------------------------------- arrow <-> numpy
def _table(batches: Iterator[pa.RecordBatch]) -> pa.Table | None:
    got = [b for b in batches if b.num_rows]
    return pa.Table.from_batches(got) if got else None


def _mat(tbl: pa.Table, name: str, width: int, dtype: type) -> np.ndarray:
    """A list column of equal-length rows -> [n, width] array (flat child, no per-row work)."""
    col = tbl.column(name).combine_chunks()
    return col.flatten().to_numpy().astype(dtype, copy=False).reshape(tbl.num_rows, width)


def _lists(x: np.ndarray) -> pa.ListArray:
    """[n, w] -> list array of n rows of w values."""
    n, w = x.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * w + 1, w, dtype=np.int32)), pa.array(x.ravel()))


def _state_batch(item: np.ndarray, scored: np.ndarray, n_v: np.ndarray, paths: np.ndarray, scores: np.ndarray,
                 assign: np.ndarray, prev: np.ndarray, cpu: np.ndarray) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(item), pa.array(scored), pa.array(n_v), _lists(paths), _lists(scores), _lists(assign),
         _lists(prev), pa.array(cpu)], schema=STATE_SCHEMA)


def _unpack(tbl: pa.Table, S: int, J: int) -> tuple[np.ndarray, ...]:
    return (tbl.column("item_id").to_numpy(), tbl.column("scored").to_numpy(zero_copy_only=False),
            tbl.column("n_v").to_numpy(), _mat(tbl, "paths", S, np.int64), _mat(tbl, "scores", S, np.float64),
            _mat(tbl, "assign", J, np.int64), _mat(tbl, "prev", J, np.int64))


def _partition_seed(seed: int) -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return seed * 100_003 + (ctx.partitionId() if ctx else 0)    # same on a task retry


# --------------------------------------------------------------------------- build the state
def build_state(batches: Iterator[pa.RecordBatch], S: int, J: int, num_paths: int,
                seed: int) -> Iterator[pa.RecordBatch]:
    """A partition's rows (src 0: path_scores item_id/path/score/n_v; src 1: item_paths item_id/slot/path) -> state rows.

    Scored items without a starting assignment get a balanced random one (per partition:
    path counts differ by at most 1 within the partition).
    """
    tbl = _table(batches)
    if tbl is None:
        return
    src = tbl.column("src").to_numpy()
    sc = tbl.filter(pa.array(src == 0))
    if sc.num_rows:
        ps = PathScores.from_long(sc.column("item_id").to_numpy(), sc.column("path").to_numpy(),
                                  sc.column("score").to_numpy(), sc.column("n_v").to_numpy(), S)
    else:
        ps = PathScores(np.zeros(0, np.int64), np.zeros((0, S), np.int64), np.zeros((0, S)), np.zeros(0))
    ip = tbl.filter(pa.array(src == 1))
    order = np.lexsort((ip.column("slot").to_numpy(), ip.column("item_id").to_numpy()))
    ip_item = ip.column("item_id").to_numpy()[order]
    init_items, counts = np.unique(ip_item, return_counts=True)
    if (counts != J).any():
        bad = init_items[counts != J][0]
        raise ValueError(f"starting item_paths: item {bad} has {counts[counts != J][0]} paths, expected J={J}")
    init_assign = ip.column("path").to_numpy()[order].reshape(-1, J)
    # scored items: starting paths from item_paths where present, else random balanced
    pos = np.minimum(np.searchsorted(init_items, ps.items), max(len(init_items) - 1, 0))
    has = (init_items[pos] == ps.items) if len(init_items) else np.zeros(len(ps), bool)
    assign = np.empty((len(ps), J), np.int64)
    assign[has] = init_assign[pos[has]]
    if (~has).any():
        assign[~has] = initial_assignment(int((~has).sum()), J, num_paths, _partition_seed(seed))
    # items with paths but no candidate at all: carried through unchanged
    rest = ~np.isin(init_items, ps.items)
    n_rest = int(rest.sum())
    item = np.concatenate([ps.items, init_items[rest]])
    scored = np.concatenate([np.ones(len(ps), bool), np.zeros(n_rest, bool)])
    n_v = np.concatenate([ps.n_v, np.zeros(n_rest)])
    paths = np.concatenate([ps.paths, np.full((n_rest, S), EMPTY, np.int64)])
    scores = np.concatenate([ps.scores, np.zeros((n_rest, S))])
    assign = np.concatenate([assign, init_assign[rest]])
    yield _state_batch(item, scored, n_v, paths, scores, assign, assign, np.zeros(len(item)))


# --------------------------------------------------------------------------- one round
def _kernel_dtype(alpha: float, power: float, total_items: int) -> type:
    # same guard as mstep_blocked: float32 unless the penalty could overflow it on a crowded path
    return np.float64 if alpha * penalty_delta(float(max(total_items, 1)), power) > 1e37 else np.float32


def partition_sweep(paths: np.ndarray, scores: np.ndarray, n_v: np.ndarray, assign: np.ndarray,
                    base_sizes: np.ndarray, scale: int, alpha: float, power: float, block_size: int,
                    total_items: int) -> np.ndarray:
    """One round over a partition's items: paths/scores [n, S], n_v [n], assign [n, J] -> new assign [n, J].

    base_sizes [P] (the broadcast table) is not modified. Local moves count `scale` times
    in the partition's copy of the table (module doc).
    """
    view = np.array(base_sizes, dtype=np.int64, copy=True)
    dtype = _kernel_dtype(alpha, power, total_items)
    # the P partitions' blocks move at the same time: together they must not exceed one kernel block
    block_size = max(1, block_size // max(scale, 1))
    cands = prepare_blocks(paths, scores, n_v, block_size, dtype)
    if scale <= 1:
        return sweep(cands, assign, view, alpha, power)
    out = np.empty_like(assign)
    extra = scale - 1
    for b in range(cands.paths.shape[0]):
        lo, hi = b * block_size, min(len(assign), (b + 1) * block_size)
        pb, sb, nb = cands.block(b)
        new = update_block(pb, sb, nb, assign[lo:hi], view, alpha, power, slot_major=True, dtype=dtype)
        # the other partitions' (unseen) share of the same moves
        old_f, new_f = assign[lo:hi].ravel(), new.ravel()
        np.subtract.at(view, old_f, extra)
        np.add.at(view, new_f, extra)
        view[old_f] = np.maximum(view[old_f], 0)
        out[lo:hi] = new
    return out


def sweep_batches(batches: Iterator[pa.RecordBatch], sizes_bc: object, S: int, J: int, alpha: float,
                  power: float, block_size: int, total_items: int, extrapolate: bool) -> Iterator[pa.RecordBatch]:
    """State rows of a partition -> state rows after one round (prev = the round's input assignment)."""
    tbl = _table(batches)
    if tbl is None:
        return
    item, scored, n_v, paths, scores, assign, _ = _unpack(tbl, S, J)
    c0 = time.process_time()
    new = assign.copy()
    n = int(scored.sum())
    if n:
        scale = max(1, round(total_items / n)) if extrapolate else 1
        idx = np.flatnonzero(scored)
        new[idx] = partition_sweep(paths[idx], scores[idx], n_v[idx], assign[idx], sizes_bc.value,  # type: ignore[attr-defined]
                                   scale, alpha, power, block_size, total_items)
    cpu = np.zeros(len(item))
    cpu[0] = time.process_time() - c0
    yield _state_batch(item, scored, n_v, paths, scores, new, assign, cpu)


# --------------------------------------------------------------------------- statistics
def stats_batches(batches: Iterator[pa.RecordBatch], S: int, J: int, num_paths: int,
                  power: float) -> Iterator[pa.RecordBatch]:
    """State rows -> per-path counts of scored items + one partition row (log-likelihood, skipped, moved, cpu)."""
    tbl = _table(batches)
    if tbl is None:
        return
    item, scored, n_v, paths, scores, assign, prev = _unpack(tbl, S, J)
    idx = np.flatnonzero(scored)
    ps = PathScores(item[idx], paths[idx], scores[idx], n_v[idx])
    # alpha = 0: the partition's log-likelihood part; the penalty is global (driver, from the table)
    part = objective(ps, assign[idx], num_paths, 0.0, power)
    moved = int((np.sort(prev, 1) != np.sort(assign, 1)).any(1).sum())
    sizes = path_sizes(assign[idx], num_paths)
    nz = np.flatnonzero(sizes)
    k = len(nz)
    yield pa.RecordBatch.from_arrays([
        pa.array(np.append(nz, -1)), pa.array(np.append(sizes[nz], 0)),
        pa.array(np.append(np.zeros(k), part.loglik)), pa.array(np.append(np.zeros(k, np.int64), part.skipped)),
        pa.array(np.append(np.zeros(k, np.int64), moved)), pa.array(np.append(np.zeros(k), tbl.column("cpu").to_numpy().sum())),
    ], schema=STATS_SCHEMA)


# --------------------------------------------------------------------------- output
def item_paths_batches(batches: Iterator[pa.RecordBatch], S: int, J: int) -> Iterator[pa.RecordBatch]:
    """State rows -> item_paths rows (item_id, slot, path, score = s[v, path], null when not a candidate)."""
    tbl = _table(batches)
    if tbl is None:
        return
    item, _, _, paths, scores, assign, _ = _unpack(tbl, S, J)
    eq = paths[:, None, :] == assign[:, :, None]                   # [n, J, S]; candidates distinct per row
    score = np.where(eq, scores[:, None, :], 0.0).sum(2)
    yield pa.RecordBatch.from_arrays([
        pa.array(np.repeat(item, J)), pa.array(np.tile(np.arange(J, dtype=np.int32), len(item))),
        pa.array(assign.ravel()), pa.array(score.ravel(), mask=~eq.any(2).ravel())], schema=ITEM_PATHS_SCHEMA)


__all__ = ["STATE_DDL", "STATS_DDL", "ITEM_PATHS_DDL", "build_state", "partition_sweep", "sweep_batches",
           "stats_batches", "item_paths_batches"]
