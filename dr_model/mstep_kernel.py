"""The M-step's math and its block-vectorized kernel (dr_model.mstep runs them).

* `penalty`, `penalty_delta`, `gain`: f(n) = n**p / p and the incremental gain of adding a
  path to an item, shared by the sequential reference and the kernel.
* `update_block`: re-assign one block of B items, vectorized:
  1. Proposal (Jacobi inside the block): every item makes its greedy picks against the
     size table as it was at the start of the block minus its own paths, i.e. what the
     sequential order would show it if no other block item moved.
  2. Damping (a Gauss-Seidel correction inside the block): for each moving item the
     exact change of Q is recomputed as if the moves proposed by the block items BEFORE
     it had been made (per-path prefix sums of their changes). A move that this
     interference turns into a loss is undone: the item keeps its paths. This is what
     stops a block from piling onto, or fleeing from, a hot path all at once. A move
     that no earlier proposal touches is left alone, so block_size = 1 is exactly the
     sequential reference.
  3. The block's net change goes into the table, so the next block sees it
     (Gauss-Seidel between blocks).
  Plain Jacobi over ALL items (one stale table for everybody) is the block_size = V,
  undamped limit of this scheme and oscillates (DESIGN.md section 7).
* `sweep`: one round over a set of items, block by block, written so a distributed job can
  run it per partition against its copy of the broadcast size table (which then carries
  that partition's own changes).

The fill rule for items with fewer than J usable candidates is in dr_model.mstep's doc.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from dr_model.kernels import compiled, slot_rows
from dr_model.scores import EMPTY

# Python / NumPy scalar types that take the math-module fast path of `gain`.
_SCALAR = (int, float, np.integer, np.floating)


# --------------------------------------------------------------------------- penalty
def penalty(n: Any, power: float) -> Any:
    """f(n) = n**power / power, elementwise; n scalar or array [...] -> same shape (float)."""
    n = np.asarray(n, dtype=np.float64) if not isinstance(n, _SCALAR) else float(n)
    return n ** power / power


@lru_cache(maxsize=32)
def _delta_coeffs(power: float) -> tuple[float, ...] | None:
    """Horner coefficients (highest degree first) of f(n+1)-f(n) when power is an integer.

    For integer p, f(n+1)-f(n) = sum_{k<p} C(p,k) n**k / p: a polynomial with positive
    coefficients, so Horner is cheap and has no cancellation (the direct difference of
    two n**p loses ~log10(n) digits, which matters in float32).
    """
    if float(power).is_integer() and 2 <= power <= 16:
        p = int(power)
        return tuple(math.comb(p, k) / p for k in range(p - 1, -1, -1))
    return None


def penalty_delta(n: Any, power: float) -> Any:
    """df(n) = f(n+1) - f(n) elementwise; n scalar or array [...] (float32 stays float32)."""
    coeffs = _delta_coeffs(power)
    if isinstance(n, _SCALAR):
        n = float(n)
    elif not (isinstance(n, np.ndarray) and n.dtype.kind == "f"):
        n = np.asarray(n, dtype=np.float64)
    if coeffs is None:
        return ((n + 1.0) ** power - n ** power) / power
    out = n + coeffs[1]          # leading coefficient C(p, p-1)/p is 1
    for c in coeffs[2:]:
        out = out * n + c
    return out


# --------------------------------------------------------------------------- the gain
def gain(n_v: Any, partial: Any, s: Any, size: Any, alpha: float, power: float, *,
         delta_f: Any = None) -> Any:
    """Incremental gain of adding a path with score s and size |c| to an item (broadcasts).

    N_v * (log(partial + s) - log(partial)) - alpha * (f(|c|+1) - f(|c|)); at the first
    pick (partial == 0) the log term is N_v * log(s). s <= 0 gives -inf. Scalars in ->
    float out (math module: no temporaries); arrays in -> array out in s's float dtype.
    delta_f, when given, is f(|c|+1) - f(|c|) already computed (sizes do not change
    while one item makes its J picks, so the kernel computes it once per block).
    """
    df = penalty_delta(size, power) if delta_f is None else delta_f
    if isinstance(s, _SCALAR) and isinstance(partial, _SCALAR):
        if s <= 0:
            return -math.inf
        log_ratio = math.log(partial + s) - (math.log(partial) if partial > 0 else 0.0)
        return n_v * log_ratio - alpha * df
    s = np.asarray(s)
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    partial = np.asarray(partial, dtype=s.dtype)
    # one output buffer of the broadcast shape, then everything in place (no temporaries)
    g = np.empty(np.broadcast_shapes(np.shape(n_v), partial.shape, s.shape, np.shape(df)), dtype=s.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.add(partial, s, out=g)
        np.log(g, out=g)
        if partial.any():   # log(partial) only where partial > 0: the first pick compares log s alone
            g -= np.log(np.where(partial > 0, partial, 1))
        g *= n_v
        g -= alpha * df
    # a zero score is never worth choosing (and N_v * -inf would be NaN for N_v = 0)
    np.copyto(g, -np.inf, where=s <= 0)
    return g


def size_table(sizes: np.ndarray) -> np.ndarray:
    """A writable int64 copy of a size table [num_paths] for the kernel to update in place.

    Built with np.empty + copy, not np.array(x, copy=True): the latter keeps x's dtype
    object, and a dtype that came out of a pickle (a Spark broadcast) is not numpy's
    canonical int64 instance, which sends ufunc.at (the kernel's table updates) down a
    generic path ~30x slower (measured: 45 ms vs 1.3 ms per 1.2M updates, numpy 2.4).
    """
    out = np.empty(np.shape(sizes), dtype=np.int64)
    out[...] = sizes
    return out


# --------------------------------------------------------------------------- fast kernel
def _greedy(delta_f: np.ndarray, s: np.ndarray, nv: np.ndarray, paths: np.ndarray, J: int,
            alpha: float, power: float) -> tuple[np.ndarray, np.ndarray]:
    """J gain picks per column: delta_f / s / paths [S, n] slot-major, nv [1, n] -> paths [n, J], slots [n, J].

    Sizes stay fixed during an item's own picks (the only size it changes is its chosen
    path's, which it may not pick again), so delta_f is computed once. A picked slot's
    score is zeroed in a working copy: gain() then gives it -inf (no repeats) for free.
    Unusable picks (max gain -inf) are -1.
    """
    S, n = s.shape
    cols = np.arange(n)
    s_work = np.array(s, order="C")
    flat_p, flat_s = paths.reshape(-1), s_work.reshape(-1)
    partial = np.zeros((1, n), dtype=s.dtype)
    new_p = np.full((n, J), EMPTY, dtype=np.int64)
    new_k = np.full((n, J), -1, dtype=np.int64)
    # "first slot holding the max" as a max-reduction over rows (argmax over axis 0 is slow)
    wdt = np.uint8 if S < 255 else np.int32
    first_w = np.arange(S, 0, -1, dtype=wdt)[:, None]
    for j in range(J):
        g = gain(nv, partial, s_work, None, alpha, power, delta_f=delta_f)     # [S, n]
        best = g.max(axis=0)
        ok = best > -np.inf
        eq = g == best
        k = S - (eq.view(np.uint8) * first_w if wdt is np.uint8 else eq * first_w).max(axis=0).astype(np.int64)
        flat = k * n + cols
        if ok.all():
            new_k[:, j] = k
            new_p[:, j] = flat_p[flat]
            partial += flat_s[flat]
            flat_s[flat] = 0
        else:
            if not ok.any():
                break
            flat = flat[ok]
            new_k[ok, j] = k[ok]
            new_p[ok, j] = flat_p[flat]
            partial[0, ok] += flat_s[flat]
            flat_s[flat] = 0
    return new_p, new_k


def _own_slots(paths: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Slot of each current path among the item's candidates: paths [S, B], assign [B, J] -> [B, J] (-1: none)."""
    out = np.empty(assign.shape, dtype=np.int64)
    compiled(slot_rows)(paths.T, assign, out)                       # candidate paths are distinct per item
    return out


def update_block(paths_blk: np.ndarray, scores_blk: np.ndarray, nv_blk: np.ndarray, assign_blk: np.ndarray,
                 sizes: np.ndarray, alpha: float, power: float, *, slot_major: bool = False,
                 own_slots: np.ndarray | None = None, slots_out: np.ndarray | None = None,
                 damping: bool = True, improving_only: bool = True, dtype: type = np.float32) -> np.ndarray:
    """Re-assign one block of B items; sizes [P] int64 is updated IN PLACE; returns new assign [B, J] int64.

    paths_blk / scores_blk [B, S] (or [S, B] with slot_major=True, the kernel's layout:
    reductions over slots become maxima over rows), nv_blk [B], assign_blk [B, J] the
    items' current paths (counted in `sizes`). Every item proposes its greedy picks against
    `sizes` minus its own paths (a Jacobi step inside the block: the other block items are
    assumed to stay, as the sequential order assumes of items not yet visited); with
    `damping` a proposal that the EARLIER block items' proposals turn into a loss is undone
    (`_damp_block`); then the block's net change goes into `sizes` and the fill rule runs
    item by item. own_slots [B, J] (slot of each current path among the item's candidates,
    -1 if none) skips a search; slots_out [B, J] receives the new paths' slots (-1 for
    fills). This is the step a distributed job runs per partition, block after block,
    against its copy of the broadcast size table.
    """
    if not slot_major:
        paths_blk, scores_blk = paths_blk.T, scores_blk.T
    paths_blk = np.ascontiguousarray(paths_blk, dtype=np.int64)
    s = np.ascontiguousarray(scores_blk, dtype=dtype)
    S, B = paths_blk.shape
    old = np.asarray(assign_blk, dtype=np.int64)
    J = old.shape[1]
    if B == 0:
        return old.copy()
    nv = np.asarray(nv_blk, dtype=dtype)[None, :]
    # view of item i: the table minus its own paths (via the slots they occupy; unique per item)
    seen = np.take(sizes, paths_blk)
    if own_slots is None:
        own_slots = _own_slots(paths_blk, old)
    own = own_slots >= 0
    seen.reshape(-1)[(own_slots * B + np.arange(B)[:, None])[own]] -= 1
    delta_f = penalty_delta(seen.astype(dtype), power)
    new_p, new_k = _greedy(delta_f, s, nv, paths_blk, J, alpha, power)
    if (damping and B > 1) or improving_only:
        _damp_block(new_p, new_k, old, own_slots, seen, sizes, s, nv_blk, alpha, power, damping, improving_only)
    # net change of the block: own paths out, gain picks in
    np.subtract.at(sizes, old.reshape(-1), 1)
    picked = new_p >= 0
    if picked.all():
        np.add.at(sizes, new_p.reshape(-1), 1)
    else:
        np.add.at(sizes, new_p[picked], 1)
        _fill_least_loaded(new_p, sizes)
    if slots_out is not None:
        slots_out[...] = new_k
    return new_p


def _damp_block(new_p: np.ndarray, new_k: np.ndarray, old: np.ndarray, own_slots: np.ndarray, seen: np.ndarray,
                sizes: np.ndarray, s: np.ndarray, nv: np.ndarray, alpha: float, power: float,
                damping: bool = True, improving_only: bool = False) -> None:
    """Undo the block's proposed moves that earlier block items' proposals made non-improving (in place).

    For a moving item i (new/old path sets, s from its candidates):
      imp_i(D) = N_i log(sum_new s / sum_old s) - alpha sum_{c in new-old} df(n_c + D_c)
                                                + alpha sum_{c in old-new} df(n_c + D_c)
    is the exact change of the global objective if i moves right after the block items
    before it made their proposed moves; n_c is the start-of-block size i saw (own paths
    out) and D_c the net change those earlier proposals make on c. The move is undone
    (i keeps its paths) iff imp_i(D) <= 0 and imp_i(D) < imp_i(0): the pile-on / stampede
    of its own block turned it into a loss. Without interference D = 0 and nothing is
    undone, so the sequential semantics are untouched (block_size = 1 is the reference).
    Items that need a fill, or whose old paths have no score, always move.
    improving_only adds the coordinate-descent acceptance test: a move is also undone when
    it does not strictly improve the objective (imp <= 0), interference or not.
    new_p / new_k [B, J], old / own_slots [B, J], seen [S, B], s [S, B], nv [B].
    """
    S, B = s.shape
    J = old.shape[1]
    in_old = _member(new_p, old)                                    # new path already held
    mv = np.flatnonzero(~_row_all(in_old))                          # moving items
    if mv.size == 0:
        return
    np_m, nk_m, old_m, os_m, in_old = new_p[mv], new_k[mv], old[mv], own_slots[mv], in_old[mv]
    flat_s = s.reshape(-1)
    old_tot, new_tot = np.zeros(mv.size), np.zeros(mv.size)
    for j in range(J):   # sums over the J slots (reductions over a length-J axis are slow)
        old_tot += np.where(os_m[:, j] >= 0, flat_s[np.maximum(os_m[:, j], 0) * B + mv], 0)
        new_tot += np.where(nk_m[:, j] >= 0, flat_s[np.maximum(nk_m[:, j], 0) * B + mv], 0)
    test = _row_all(np_m != EMPTY) & (old_tot > 0)
    if not test.any():
        return
    # one entry per changed path of a moving item: arrivals (+1) and departures (-1)
    ra, ja = np.nonzero(~in_old & (np_m != EMPTY))
    rd, jd = np.nonzero(~_member(old_m, np_m))
    item = np.concatenate([ra, rd])                                 # index into mv (block order)
    path = np.concatenate([np_m[ra, ja], old_m[rd, jd]])
    w = np.concatenate([np.ones(ra.size), -np.ones(rd.size)])
    n_seen = np.concatenate([seen.reshape(-1)[nk_m[ra, ja] * B + mv[ra]],
                             np.take(sizes, old_m[rd, jd]) - 1]).astype(np.float64)
    if 2 * test.sum() < mv.size:
        # mostly untested movers (e.g. round 1 from a random start): only the paths that a
        # tested item changes need prefix sums, so sort just their entries
        on = np.zeros(sizes.shape[0], dtype=bool)
        on[path[test[item]]] = True
        keep = on[path]
        item, path, w, n_seen = item[keep], path[keep], w[keep], n_seen[keep]
    # D per entry: prefix sum of w over the entries of the same path from earlier items
    m = mv.size
    o = np.lexsort((item, path)) if sizes.shape[0] > (1 << 62) // max(m, 1) else np.argsort(path * m + item)
    item, path, w, n_seen = item[o], path[o], w[o], n_seen[o]
    first = np.ones(path.size, dtype=bool)
    first[1:] = path[1:] != path[:-1]
    before = np.cumsum(w) - w
    D = before - before[first][np.cumsum(first) - 1]
    # arriving on c costs alpha*df(n_c + D), leaving c saves it
    cost_d = np.bincount(item, weights=w * penalty_delta(n_seen + D, power), minlength=m)
    cost_0 = np.bincount(item, weights=w * penalty_delta(n_seen, power), minlength=m)
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = np.asarray(nv, dtype=np.float64)[mv] * (np.log(new_tot) - np.log(old_tot))
    imp_d = ll - alpha * cost_d
    imp_0 = ll - alpha * cost_0
    if damping:
        bad = (imp_d <= 0) & ((imp_d < imp_0) | improving_only)
    else:
        bad = imp_0 <= 0
    undo = mv[test & bad]
    new_p[undo] = old[undo]
    new_k[undo] = own_slots[undo]


def _member(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x [n, J], y [n, K] -> [n, J] bool: is x[i, a] among y[i, :]? (K small: one compare per column)"""
    out = np.zeros(x.shape, dtype=bool)
    for b in range(y.shape[1]):
        out |= x == y[:, b:b + 1]
    return out


def _row_all(x: np.ndarray) -> np.ndarray:
    """x [n, J] bool -> [n]: all over the J columns."""
    out = x[:, 0].copy()
    for j in range(1, x.shape[1]):
        out &= x[:, j]
    return out


def _fill_least_loaded(new: np.ndarray, sizes: np.ndarray, step: int = 1, offset: int = 0) -> None:
    """Fill rule, in item order: EMPTY slots of new [B, J] take the least-loaded path (ties: smallest id).

    Each placement adds `step` to its path's size (an extrapolated table, see sweep's `scale`);
    ties go to the smallest id counted from `offset` (cyclically), so partitions filling at once
    with different offsets take different paths of equal size.

    Sizes only grow during the fill, so F requests can only land on the F + J paths with
    the smallest (size, id) keys at the start: each request still has an untouched pool
    path it may take, whose key is <= that of any path outside the pool. Runs only for
    items with fewer than J usable candidates (cold or nearly cold items).
    """
    rows, slots = np.nonzero(new == EMPTY)
    P = sizes.shape[0]
    L = min(P, rows.size + new.shape[1])
    key = sizes * P + (np.arange(P, dtype=np.int64) - offset) % P   # (size, id - offset) order as one int64
    pool = np.argpartition(key, L - 1)[:L] if L < P else np.arange(P)
    heap = [(int(key[c]), int(c)) for c in pool]
    heapq.heapify(heap)
    for r, j in zip(rows.tolist(), slots.tolist()):
        have = set(new[r].tolist())
        aside = []
        while heap[0][1] in have:
            aside.append(heapq.heappop(heap))
        k, c = heapq.heappop(heap)
        new[r, j] = c
        sizes[c] += step
        heapq.heappush(heap, (k + P * step, c))
        for e in aside:
            heapq.heappush(heap, e)


@dataclass(frozen=True)
class CandidateBlocks:
    """Candidates in the kernel's layout: paths [nb, S, B] (the lists' integer type), scores [nb, S, B], n_v [nb, B] (V items)."""

    paths: np.ndarray
    scores: np.ndarray
    n_v: np.ndarray
    num_items: int

    @property
    def block_size(self) -> int:
        return self.paths.shape[2]

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block b as (paths [S, n], scores [S, n], n_v [n]); the last block may be shorter."""
        n = min(self.block_size, self.num_items - b * self.block_size)
        if n == self.block_size:
            return self.paths[b], self.scores[b], self.n_v[b]
        return self.paths[b, :, :n], self.scores[b, :, :n], self.n_v[b, :n]


def prepare_blocks(paths: np.ndarray, scores: np.ndarray, n_v: np.ndarray, block_size: int,
                   dtype: type = np.float32,
                   alloc: Callable[[str, tuple[int, ...], Any], np.ndarray] | None = None) -> CandidateBlocks:
    """[V, S] candidate lists -> contiguous slot-major blocks (done once per M-step: scores are fixed).

    alloc(name, shape, dtype): where the block arrays live (e.g. memory-mapped files), else new arrays.
    """
    V, S = paths.shape
    nb = max(1, -(-V // block_size))
    full = V // block_size
    new = alloc or (lambda name, shape, dt: np.empty(shape, dtype=dt))

    def blocks(name: str, x: np.ndarray, fill: Any, dt: Any) -> np.ndarray:
        out = new(name, (nb, S, block_size), dt)
        for b in range(full):           # a block at a time: its transpose stays in cache, no padded copy
            out[b] = x[b * block_size:(b + 1) * block_size].T
        if full < nb:
            tail = V - full * block_size
            out[full, :, :tail] = x[full * block_size:].T
            out[full, :, tail:] = fill
        return out

    nv = new("n_v", (nb, block_size), dtype)
    flat = nv.reshape(-1)
    flat[:V], flat[V:] = n_v, 0
    return CandidateBlocks(blocks("paths", paths, EMPTY, paths.dtype), blocks("scores", scores, 0.0, dtype), nv, V)


def sweep(cands: CandidateBlocks, assign: np.ndarray, sizes: np.ndarray, alpha: float, power: float, *,
          slots: np.ndarray | None = None, damping: bool = True, improving_only: bool = True,
          scale: int = 1) -> np.ndarray:
    """One round over a set of items, block by block: assign [V, J] -> new assign [V, J].

    `sizes` [P] is updated in place. A distributed job runs this per partition against its
    copy of the broadcast size table; with `scale` > 1 every local move counts `scale` times
    in it (extrapolated local deltas: the other partitions' unseen share of the same moves,
    spark_udfs.mstep_udf), entries clipped at 0. scale = 1 is the sequential sweep.
    slots [V, J] (own slots, see update_block) is read and updated in place when given.
    """
    V = cands.num_items
    out = np.empty_like(assign)
    B = cands.block_size
    extra = scale - 1
    for b in range(cands.paths.shape[0]):
        lo, hi = b * B, min(V, (b + 1) * B)
        pb, sb, nb = cands.block(b)
        own = slots[lo:hi] if slots is not None else None
        out[lo:hi] = update_block(pb, sb, nb, assign[lo:hi], sizes, alpha, power, slot_major=True,
                                  own_slots=own, slots_out=own, damping=damping,
                                  improving_only=improving_only, dtype=cands.scores.dtype.type)
        if extra > 0:
            old_f, new_f = assign[lo:hi].ravel(), out[lo:hi].ravel()
            np.subtract.at(sizes, old_f, extra)
            np.add.at(sizes, new_f, extra)
            sizes[old_f] = np.maximum(sizes[old_f], 0)
    return out


__all__ = ["penalty", "penalty_delta", "gain", "size_table", "update_block", "CandidateBlocks", "prepare_blocks",
           "sweep"]
