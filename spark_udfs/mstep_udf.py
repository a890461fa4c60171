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

Block size: every partition sweeps blocks of `mstep.block_size`, whatever the number of
partitions, unless the cluster's concurrent blocks would hold more than 1/64 of the catalog
(dr_model.mstep.effective_block: small catalogs). Dividing it by the partitions (so that
the cluster moves one kernel block at a time) would leave a few items per block at catalog
scale (4096 / 200 partitions = 20), where the kernel's fixed cost per block (~0.3 ms)
dominates; it also cost 20-30% of a partition's speed at 2 partitions. The extrapolation
already accounts for the other partitions' earlier blocks; their concurrent blocks are the
Jacobi part that the within-block damping does not see. Measured on the equivalence tests:
final objective 0.10% below the sequential reference (0.06% with divided blocks), same
largest path. (Scaling the damping's pile-on estimate by `scale` too over-damped: largest
path -9%, objective -0.25%.)

Alpha: with mstep.alpha "auto" the barrier stage first runs dr_model.calibrate.AlphaSearch's
trials (one discarded sweep each, exchanged like a round), so every task picks the same alpha
from the same sums; the path traffic travels with the size changes. Exploration paths join
each partition's candidates where they are built (MStepContext.candidates).

Data layout (what makes a round cheap):

* The candidates (paths / scores / n_v) never change during an M-step, so they are NOT
  part of the per-round Spark state: they sit in a worker-side cache (spark_udfs.mstep_cache),
  rebuilt from the `path_scores` files on a miss.
* The Spark state is ONE row per partition (`STATE_DDL`) holding the partition's item
  ids, its assignment [n, J] and each assigned path's slot among the item's candidates
  [n_scored, J] as binary blobs (no per-item rows, no list columns), plus the round's
  statistics of that partition: its path counts (dense int32 [num_paths]), the
  log-likelihood part, skipped / moved items, the sweep's task CPU seconds and the path
  traffic (dense float64 [num_paths], dr_model.calibrate). So the
  statistics come out of the same pass as the sweep; the driver sums P count vectors
  (per-round jobs), or a barrier stage has summed them already and adds the rounds'
  global statistics as `history` (JSON).

Items carried through from the starting item_paths without any candidate (`scored` =
False in the previous layout) sit after the n_scored scored items of the row: they keep
their paths and, as in trainer.train_em, are not in the size table.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from dr_model.calibrate import AlphaSearch, assigned_scores, assigned_traffic, traffic_size
from dr_model.mstep import (CandidateBlocks, RoundStats, effective_block, penalty_delta,
                            size_table, sweep)
from dr_model.mstep_kernel import _own_slots
from dr_model.scores import EMPTY
from spark_udfs.mstep_cache import (FROM_FILES, FROM_WORKER, REBUILT, MStepContext, _blocks, _entry, _Entry,
                                    drop_job, drop_partition, job_dir)

STATE_SCHEMA = pa.schema([
    ("part", pa.int32()), ("n_scored", pa.int64()), ("items", pa.binary()), ("assign", pa.binary()),
    ("slots", pa.binary()), ("counts", pa.binary()), ("loglik", pa.float64()), ("skipped", pa.int64()),
    ("moved", pa.int64()), ("cpu", pa.float64()), ("cache", pa.int32()), ("history", pa.string()),
    ("traffic", pa.binary()),
])
STATE_DDL = ("part int, n_scored long, items binary, assign binary, slots binary, counts binary, "
             "loglik double, skipped long, moved long, cpu double, cache int, history string, traffic binary")
STATS_COLUMNS = ("counts", "loglik", "skipped", "moved", "cpu", "cache", "traffic")
# what a pass reads of the previous state (the statistics columns stay behind)
INPUT_COLUMNS = ("part", "n_scored", "items", "assign", "slots")
ITEM_PATHS_SCHEMA = pa.schema([("item_id", pa.int64()), ("slot", pa.int32()), ("path", pa.int64()),
                               ("score", pa.float64())])
ITEM_PATHS_DDL = "item_id long, slot int, path long, score double"


# --------------------------------------------------------------------------- arrow helpers
def _table(batches: Iterator[pa.RecordBatch]) -> pa.Table | None:
    got = [b for b in batches if b.num_rows]
    return pa.Table.from_batches(got) if got else None


def _blob(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).tobytes()


def _arr(value: Any, dtype: type, width: int | None = None) -> np.ndarray:
    """A binary scalar -> read-only array (reshaped to [-1, width] when width is given)."""
    a = np.frombuffer(value.as_buffer() if hasattr(value, "as_buffer") else value, dtype=dtype)
    return a.reshape(-1, width) if width else a


def _state_row(ctx: MStepContext, part: int, items: np.ndarray, n_scored: int, assign: np.ndarray, slots: np.ndarray,
               counts: np.ndarray, loglik: float, skipped: int, moved: int, cpu: float,
               cache: int, history: str = "", traffic: np.ndarray | None = None) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([
        pa.array([part], pa.int32()), pa.array([n_scored], pa.int64()),
        pa.array([_blob(items.astype(np.int64, copy=False))], pa.binary()),
        pa.array([_blob(assign.astype(ctx.assign_dtype, copy=False))], pa.binary()),
        pa.array([_blob(slots.astype(ctx.slot_dtype, copy=False))], pa.binary()),
        pa.array([_blob(counts.astype(np.int32))], pa.binary()), pa.array([loglik], pa.float64()),
        pa.array([skipped], pa.int64()), pa.array([moved], pa.int64()), pa.array([cpu], pa.float64()),
        pa.array([cache], pa.int32()), pa.array([history], pa.string()),
        pa.array([_blob(traffic.astype(np.float64)) if traffic is not None else b""], pa.binary()),
    ], schema=STATE_SCHEMA)


def _rows(tbl: pa.Table, ctx: MStepContext) -> Iterator[tuple[int, np.ndarray, int, np.ndarray, np.ndarray]]:
    """State rows -> (part, items [n], n_scored, assign [n, J] int64, slots [n_scored, J] int64) per row."""
    J = ctx.J
    cols = {c: tbl.column(c) for c in INPUT_COLUMNS}
    for i in range(tbl.num_rows):
        yield (int(cols["part"][i].as_py()), _arr(cols["items"][i], np.int64), int(cols["n_scored"][i].as_py()),
               _arr(cols["assign"][i], ctx.assign_dtype, J).astype(np.int64),
               _arr(cols["slots"][i], ctx.slot_dtype, J).astype(np.int64))


# --------------------------------------------------------------------------- statistics of a partition
def find_slots(paths: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Slot of each assigned path among the item's candidates: paths [m, S], assign [m, J] -> int64 [m, J] (-1: none)."""
    return _own_slots(paths.T, assign)                  # paths >= 0 in assign: EMPTY never matches


def _loglik(scores: np.ndarray, n_v: np.ndarray, slots: np.ndarray) -> tuple[float, int]:
    """(sum_v N_v log(sum_j s[v, pi_j(v)]) over items with a positive total, items skipped); float64."""
    tot = assigned_scores(scores, slots).sum(1)
    pos = tot > 0
    # elementwise + sum (no BLAS call: OpenBLAS threads would spin into the next sweep)
    return float((n_v[pos] * np.log(tot[pos])).sum()), int((~pos).sum())


def _moved(old: np.ndarray, new: np.ndarray) -> int:
    """Items whose SET of J (distinct) paths changed: old / new [n, J]."""
    same = np.ones(old.shape[0], dtype=bool)
    for j in range(new.shape[1]):
        hit = np.zeros(old.shape[0], dtype=bool)
        for k in range(old.shape[1]):
            hit |= new[:, j] == old[:, k]
        same &= hit
    return int((~same).sum())


def _counts(assign: np.ndarray, num_paths: int) -> np.ndarray:
    a = assign.ravel()
    if a.size and (a.min() < 0 or a.max() >= num_paths):
        raise ValueError(f"assignment holds a path outside [0, {num_paths})")
    return np.bincount(a, minlength=num_paths)


def _partition_seed(seed: int) -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return seed * 100_003 + (ctx.partitionId() if ctx else 0)    # same on a task retry


def _partition_id() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return ctx.partitionId() if ctx else 0


# --------------------------------------------------------------------------- one round
def _kernel_dtype(alpha: float, power: float, total_items: int) -> type:
    # same guard as mstep_blocked: float32 unless the penalty could overflow it on a crowded path
    return np.float64 if alpha * penalty_delta(float(max(total_items, 1)), power) > 1e37 else np.float32


def _traffic(e: _Entry, slots: np.ndarray, assign: np.ndarray, num_paths: int) -> np.ndarray:
    """This partition's path traffic W(c) [num_paths] (dr_model.calibrate) for its scored items' assignment."""
    m = e.n_scored
    return assigned_traffic(e.n_v, e.scores, slots, assign[:m], num_paths)


def sweep_blocks(cands: CandidateBlocks, assign: np.ndarray, slots: np.ndarray, base_sizes: np.ndarray, scale: int,
                 alpha: float, power: float, improving_only: bool = True) -> np.ndarray:
    """One round over prepared candidates: assign [m, J] -> new assign [m, J]; slots [m, J] updated in place.

    base_sizes [P] (the broadcast table) is not modified. Local moves count `scale` times
    in the partition's copy of the table (module doc). Every partition uses the full
    kernel block (module doc: "Block size").
    """
    return sweep(cands, assign, size_table(base_sizes), alpha, power, slots=slots, improving_only=improving_only,
                 scale=max(1, scale))


def _partition_round(e: _Entry, ctx: MStepContext, assign: np.ndarray, slots: np.ndarray, base_sizes: np.ndarray,
                     total_items: int, alpha: float) -> tuple[np.ndarray, float, int, int, float]:
    """One round of a partition: assign [n, J] -> (new assign [n, J], loglik part, skipped, moved, sweep CPU s).

    slots [n_scored, J] is updated in place; base_sizes [num_paths] (the round's global table) is not modified.
    """
    m = e.n_scored
    c0 = time.process_time()
    new = assign.copy()
    if m:
        scale = max(1, round(total_items / m)) if ctx.extrapolate else 1
        block = effective_block(ctx.block_size, total_items, ctx.partitions)
        cands = _blocks(e, block, _kernel_dtype(alpha, ctx.power, total_items))
        new[:m] = sweep_blocks(cands, assign[:m], slots, base_sizes, scale, alpha, ctx.power, ctx.improving_only)
    cpu = time.process_time() - c0
    ll, skipped = _loglik(e.scores, e.n_v, slots)
    return new, ll, skipped, _moved(assign[:m], new[:m]), cpu


def sweep_batches(batches: Iterator[pa.RecordBatch], sizes_bc: object, ctx: MStepContext,
                  total_items: int, alpha: float) -> Iterator[pa.RecordBatch]:
    """State rows of a partition -> state rows after one round at `alpha`, with the round's statistics
    of the partition (a trial of the alpha search reads only those)."""
    tbl = _table(batches)
    if tbl is None:
        return
    for part, items, m, assign, slots in _rows(tbl, ctx):
        e = _entry(ctx, part, items, m)
        slots = slots.copy()
        new, ll, skipped, moved, cpu = _partition_round(e, ctx, assign, slots, sizes_bc.value,  # type: ignore[attr-defined]
                                                        total_items, alpha)
        yield _state_row(ctx, part, items, m, new, slots, _counts(new[:m], ctx.num_paths), ll, skipped, moved, cpu,
                         e.source, traffic=_traffic(e, slots, new, ctx.num_paths))


# --------------------------------------------------------------------------- all rounds in one barrier stage
def barrier_batches(batches: Iterator[pa.RecordBatch], sizes_bc: object, ctx: MStepContext, total_items: int,
                    rounds: int, alpha0: float, target: float | None = None,
                    log_rounds: bool = True) -> Iterator[pa.RecordBatch]:
    """A partition's state row -> its state row after `rounds` rounds (a barrier stage: one task per partition).

    Every task sweeps its items against the same global table, then the tasks sum their
    count changes (exchange.TaskGroup: a gloo all-reduce), so each starts the next round
    from the exact table a per-round job would have broadcast, without a job per round.
    A second all-reduce sums the statistics (the path traffic included), so every task knows
    each round's global objective and traffic-weighted path size. With a `target` size, the
    rounds are preceded by dr_model.calibrate.AlphaSearch's trials (one discarded sweep each,
    from the starting state, with the same exchanges): every task runs the same search on
    the same sums, so all pick the same alpha. The statistics go out in the `history`
    column (JSON: rounds as RoundStats, alpha trials), and partition 0 prints one progress
    line per round. Every task joins every exchange, empty partitions too.
    """
    from spark_udfs.exchange import TaskGroup

    tbl = _table(batches)
    group = TaskGroup.open()
    try:
        row = one_state_row(tbl, ctx, group.rank)
        out, history = group_rounds(group, row, size_table(sizes_bc.value), ctx, total_items,  # type: ignore[attr-defined]
                                    rounds, alpha0, target, log_rounds)
    finally:
        group.close()
    if out is not None:
        yield out.with_history(ctx, json.dumps(history))


def one_state_row(tbl: pa.Table | None, ctx: MStepContext, rank: int) -> tuple | None:
    """A barrier task's state rows -> its one row as _rows gives it (None: an empty partition)."""
    rows = list(_rows(tbl, ctx)) if tbl is not None else []
    if len(rows) > 1:
        raise RuntimeError(f"M-step barrier stage: partition {rank} holds {len(rows)} state rows, "
                           "expected one (the state must not be repartitioned)")
    return rows[0] if rows else None


@dataclass
class FinalState:
    """A partition's state after the rounds (the state row's fields, its history left to fill)."""

    part: int
    items: np.ndarray                 # [n], scored first
    n_scored: int
    assign: np.ndarray                # [n, J]
    slots: np.ndarray                 # [n_scored, J]
    counts: np.ndarray                # [num_paths]
    loglik: float
    skipped: int
    moved: int
    cpu: float
    source: int
    traffic: np.ndarray               # [num_paths]

    def with_history(self, ctx: MStepContext, history: str) -> pa.RecordBatch:
        return _state_row(ctx, self.part, self.items, self.n_scored, self.assign, self.slots, self.counts, self.loglik,
                          self.skipped, self.moved, self.cpu, self.source, history, traffic=self.traffic)

    def item_paths(self, ctx: MStepContext) -> pa.RecordBatch:
        """Its item_paths rows (item_paths_of)."""
        return item_paths_of(ctx, self.part, self.items, self.n_scored, self.assign, self.slots)


def group_rounds(group: Any, row: tuple | None, sizes: np.ndarray, ctx: MStepContext, total_items: int,
                 rounds: int, alpha0: float, target: float | None = None,
                 log_rounds: bool = True) -> tuple[FinalState | None, dict]:
    """The rounds of barrier_batches on one task's state row (None: an empty partition) inside its task
    group, from the global size table `sizes` [num_paths] -> (its final state, the history)."""
    P = ctx.num_paths
    counts = np.zeros(P, np.int64)
    no_traffic = np.zeros(P)
    if row is not None:
        part, items, m, assign, slots = row
        e = _entry(ctx, part, items, m)
        counts = _counts(assign[:m], P)

    def global_size(new_counts: np.ndarray, traffic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return sizes + group.sum((new_counts - counts).astype(np.int32)), group.sum(traffic)

    alpha, trials = alpha0, []
    if target is not None:
        search = AlphaSearch(alpha0, target)
        while (a := search.propose()) is not None:
            t_counts, t_traffic = counts, no_traffic
            if row is not None:
                s_try = slots.copy()
                t_assign = _partition_round(e, ctx, assign, s_try, sizes, total_items, a)[0]
                t_counts, t_traffic = _counts(t_assign[:m], P), _traffic(e, s_try, t_assign, P)
            t_sizes, W = global_size(t_counts, t_traffic)
            search.observe(a, traffic_size(W, t_sizes))
        alpha, trials = search.result, search.trials
        if log_rounds and group.rank == 0:
            print(f"[mstep] (barrier task) alpha {alpha:.4g} after {len(trials)} trials: "
                  + ", ".join(f"{t:.3g} -> size {z:.1f}" for t, z in trials), file=sys.stderr, flush=True)
    history: list[dict] = []
    mine = np.zeros(4)                                   # this partition's loglik, skipped, moved, cpu
    own_cpu = 0.0
    traffic = no_traffic
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        new_counts = counts
        if row is not None:
            assign_new, *part_stats = _partition_round(e, ctx, assign, slots, sizes, total_items, alpha)
            new_counts = _counts(assign_new[:m], P)
            traffic = _traffic(e, slots, assign_new, P)
            mine = np.array(part_stats, dtype=np.float64)
            own_cpu += mine[3]
            assign = assign_new
        sizes, W = global_size(new_counts, traffic)
        counts = new_counts
        ll, skipped, moved, cpu = group.sum(mine)
        st = RoundStats.from_sums(r, sizes, ll, int(skipped), int(moved), alpha, ctx.power,
                                  time.perf_counter() - t0, cpu, traffic=W)
        history.append(asdict(st))
        if log_rounds and group.rank == 0:
            print(f"[mstep] (barrier task) round {r}: objective {st.objective:.4f}, path size {st.path_size:.1f}, "
                  f"largest path {st.max_path_size}, items moved {st.items_moved} [{st.seconds:.2f}s]",
                  file=sys.stderr, flush=True)
    out = None
    if row is not None:
        out = FinalState(part, items, m, assign, slots, counts, float(mine[0]), int(mine[1]), int(mine[2]), own_cpu,
                         e.source, traffic)
    return out, {"rounds": history, "trials": trials}


# --------------------------------------------------------------------------- output
def item_paths_batches(batches: Iterator[pa.RecordBatch], ctx: MStepContext) -> Iterator[pa.RecordBatch]:
    """State rows -> item_paths rows (item_id, slot, path, score = s[v, path], null when not a candidate).

    The last pass of a run: it releases the partition's cache entry afterwards (a retry rebuilds it).
    """
    tbl = _table(batches)
    if tbl is None:
        return
    for part, items, m, assign, slots in _rows(tbl, ctx):
        yield item_paths_of(ctx, part, items, m, assign, slots)


def item_paths_of(ctx: MStepContext, part: int, items: np.ndarray, m: int, assign: np.ndarray,
                  slots: np.ndarray) -> pa.RecordBatch:
    """A partition's final state -> its item_paths rows; releases its cache entry.

    items [n], assign [n, J], slots [m, J] (each assigned path's column among the first m items'
    candidates, -1: none): the score is a gather, not a search of the lists.
    """
    J, n = ctx.J, len(items)
    e = _entry(ctx, part, items, m)
    valid = np.zeros((n, J), dtype=bool)
    valid[:m] = slots >= 0
    score = np.zeros((n, J))
    if m:
        score[:m] = assigned_scores(np.asarray(e.scores), slots)
    del e
    drop_partition(ctx.job, part)
    return pa.RecordBatch.from_arrays([
        pa.array(np.repeat(items, J)), pa.array(np.tile(np.arange(J, dtype=np.int32), n)),
        pa.array(assign.ravel()), pa.array(score.ravel(), mask=~valid.ravel())], schema=ITEM_PATHS_SCHEMA)


__all__ = ["STATE_DDL", "STATS_COLUMNS", "INPUT_COLUMNS", "REBUILT", "FROM_FILES", "FROM_WORKER", "ITEM_PATHS_DDL", "MStepContext", "sweep_blocks",
           "sweep_batches", "barrier_batches", "group_rounds", "one_state_row", "FinalState", "item_paths_batches", "item_paths_of", "find_slots", "job_dir", "drop_job",
           "drop_partition", "EMPTY"]
