"""M-step: penalized coordinate descent over item->path assignments (paper's Algorithm 2).

Objective (reported per round):
    Q = sum_v N_v * log(sum_j s[v, pi_j(v)])  -  alpha * sum_c f(|c|),   f(n) = n**p / p
Items whose J chosen paths all have score 0 (or that have no candidate at all) are left
out of the first sum and counted (`skipped`).

Two solvers share ONE gain function (`gain`):

* `mstep_reference`: the paper, sequential. For each item in order: take its J paths out
  of the size table, pick J paths one by one among its S candidates by the largest
  incremental gain, add 1 to each picked path's size.
* `mstep_blocked`: the fast kernel, vectorized over a block of `block_size` items:
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
  undamped limit of this scheme and oscillates (DESIGN.md section 7). `update_block` is
  one block; `sweep` one round over a set of items, written so a distributed job can run
  it per partition against its copy of the broadcast size table (which then carries
  that partition's own changes).

Rule for items with fewer than J usable candidates (a candidate is usable when its path
is not -1 and its score is > 0; a zero score has gain -inf): after the gain picks, every
remaining slot takes the least-loaded path among ALL num_paths paths, ties to the smallest
path id, never a path the item already holds, and each fill adds 1 to that path's size
before the next fill. (For a zero-score path the log term is 0 once partial > 0, so the
true gain is -alpha*df(|c|), which the least-loaded path maximises; the fill is that
argmax over all paths rather than over the S candidates.) Both solvers apply it per item,
in item order; `mstep_blocked` applies it after the block's gain picks.

Candidate lists follow `PathScores`: scores descending per row, distinct paths per row,
-1 / 0 in empty slots.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from dr_model.config import MStepConfig
from dr_model.scores import EMPTY, PathScores

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


# --------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class ObjectiveParts:
    """Q = loglik - penalty; `skipped` items (assigned total score 0) are left out of loglik."""

    total: float
    loglik: float
    penalty: float
    skipped: int


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


def path_sizes(assign: np.ndarray, num_paths: int) -> np.ndarray:
    """assign [V, J] int64 -> |c| for every path [num_paths] int64 (-1 entries ignored)."""
    a = np.asarray(assign, dtype=np.int64).ravel()
    a = a[a >= 0]
    if a.size and a.max() >= num_paths:
        raise ValueError(f"assignment holds path {a.max()} >= num_paths={num_paths}")
    return np.bincount(a, minlength=num_paths).astype(np.int64, copy=False)


def assigned_scores(ps: PathScores, assign: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """sum_j s[v, pi_j(v)] for every item [V] float64 (0 where no assigned path is a candidate)."""
    V = len(ps)
    out = np.zeros(V, dtype=np.float64)
    for lo in range(0, V, chunk):
        hi = min(V, lo + chunk)
        # [n, J, S] match of assigned paths against candidates (paths are distinct per row)
        eq = ps.paths[lo:hi, None, :] == assign[lo:hi, :, None]
        out[lo:hi] = np.where(eq, ps.scores[lo:hi, None, :], 0.0).sum(axis=(1, 2))
    return out


def objective(ps: PathScores, assign: np.ndarray, num_paths: int, alpha: float, power: float,
              sizes: np.ndarray | None = None) -> ObjectiveParts:
    """Q for an assignment [V, J]; items with assigned score 0 are skipped and counted."""
    tot = assigned_scores(ps, assign)
    pos = tot > 0
    # elementwise + sum, not np.dot: a BLAS call leaves OpenBLAS threads spinning into the next sweep
    loglik = float((ps.n_v[pos] * np.log(tot[pos])).sum())
    if sizes is None:
        sizes = path_sizes(assign, num_paths)
    nz = sizes[sizes > 0].astype(np.float64)
    pen = float(alpha * penalty(nz, power).sum())
    return ObjectiveParts(total=loglik - pen, loglik=loglik, penalty=pen, skipped=int((~pos).sum()))


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RoundStats:
    """One coordinate-descent sweep (round 0 = the starting assignment)."""

    round: int
    objective: float
    max_path_size: int
    nonempty_paths: int
    items_moved: int          # items whose SET of paths changed in this round
    skipped_items: int        # items left out of the log-likelihood sum
    seconds: float            # wall time of the sweep itself (statistics excluded)
    cpu_seconds: float        # process CPU time of the sweep (per-core figures, robust to load)

    @classmethod
    def from_sums(cls, r: int, sizes: np.ndarray, loglik: float, skipped: int, moved: int, alpha: float,
                  power: float, seconds: float = 0.0, cpu_seconds: float = 0.0) -> "RoundStats":
        """A round's statistics from the global size table [num_paths] and the summed log-likelihood part."""
        pen = alpha * float(penalty(sizes[sizes > 0], power).sum())
        return cls(round=r, objective=float(loglik) - pen, max_path_size=int(sizes.max(initial=0)),
                   nonempty_paths=int((sizes > 0).sum()), items_moved=int(moved), skipped_items=int(skipped),
                   seconds=seconds, cpu_seconds=float(cpu_seconds))


@dataclass(frozen=True)
class MStepResult:
    """Final assignment [V, J] int64, per-round statistics, and the starting point's."""

    assign: np.ndarray
    rounds: list[RoundStats]
    initial: RoundStats

    @property
    def objective(self) -> float:
        return self.rounds[-1].objective if self.rounds else self.initial.objective


def _round_stats(ps: PathScores, assign: np.ndarray, prev: np.ndarray | None, sizes: np.ndarray,
                 num_paths: int, cfg: MStepConfig, r: int, seconds: float, cpu_seconds: float) -> RoundStats:
    obj = objective(ps, assign, num_paths, cfg.alpha, cfg.penalty_power, sizes=sizes)
    moved = 0 if prev is None else int((np.sort(prev, 1) != np.sort(assign, 1)).any(1).sum())
    return RoundStats(round=r, objective=obj.total, max_path_size=int(sizes.max(initial=0)),
                      nonempty_paths=int((sizes > 0).sum()), items_moved=moved,
                      skipped_items=obj.skipped, seconds=seconds, cpu_seconds=cpu_seconds)


def _check_inputs(ps: PathScores, assign0: np.ndarray, num_paths: int) -> np.ndarray:
    assign0 = np.array(assign0, dtype=np.int64, copy=True)
    V = len(ps)
    if assign0.ndim != 2 or assign0.shape[0] != V:
        raise ValueError(f"assign0 must be [V={V}, J], got {assign0.shape}")
    J = assign0.shape[1]
    if J > num_paths:
        raise ValueError(f"J={J} paths per item need num_paths >= J, got {num_paths}")
    if V and (assign0.min() < 0 or assign0.max() >= num_paths):
        raise ValueError(f"assign0 paths must lie in [0, {num_paths})")
    if ps.paths.size and ps.paths.max() >= num_paths:
        raise ValueError(f"candidate path {ps.paths.max()} >= num_paths={num_paths}")
    if not (np.isfinite(ps.scores).all() and (ps.scores >= 0).all()):
        raise ValueError("candidate scores must be finite and >= 0")
    if not (np.isfinite(ps.n_v).all() and (ps.n_v >= 0).all()):
        raise ValueError("n_v must be finite and >= 0")
    return assign0


# --------------------------------------------------------------------------- initial
def initial_assignment(num_items: int, J: int, num_paths: int, seed: int) -> np.ndarray:
    """Random balanced start [num_items, J] int64: path counts differ by at most 1, no repeats per item."""
    if J > num_paths:
        raise ValueError(f"J={J} distinct paths per item need num_paths >= J, got {num_paths}")
    rng = np.random.default_rng(seed)
    n = num_items * J
    cycles = -(-n // num_paths) if n else 0
    # Concatenated random permutations: every path appears once per full cycle, so counts
    # are balanced exactly; a row can only repeat a path where it straddles two cycles.
    seq = np.concatenate([rng.permutation(num_paths) for _ in range(cycles)])[:n] if n else np.zeros(0, np.int64)
    a = seq.reshape(num_items, J).astype(np.int64)
    if J > 1 and num_items:
        srt = np.sort(a, 1)
        bad = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(1))[0]
        for r in bad:  # at most one row per cycle boundary
            _repair_row(a, int(r), rng)
    return a


def _repair_row(a: np.ndarray, r: int, rng: np.random.Generator) -> None:
    """Swap repeated entries of row r with entries of other rows (counts stay balanced)."""
    V, J = a.shape
    for _ in range(100000):
        row = list(a[r])
        dup = next((j for j in range(J) if row[j] in row[:j]), None)
        if dup is None:
            return
        r2, j2 = int(rng.integers(V)), int(rng.integers(J))
        y, x = int(a[r2, j2]), int(a[r, dup])
        if r2 != r and y not in row and x not in a[r2]:
            a[r, dup], a[r2, j2] = y, x
    raise RuntimeError("could not build a repeat-free balanced assignment")


# --------------------------------------------------------------------------- reference
def mstep_reference(ps: PathScores, assign0: np.ndarray, num_paths: int, cfg: MStepConfig) -> MStepResult:
    """The paper's sequential coordinate descent; assign0 [V, J] -> MStepResult (per-item loop)."""
    assign = _check_inputs(ps, assign0, num_paths)
    V, J = assign.shape
    alpha, power = cfg.alpha, cfg.penalty_power
    if ps.S and np.any(np.diff(ps.scores, axis=1) > 0):
        raise ValueError("candidate scores must be sorted descending per item (PathScores layout)")
    sizes = path_sizes(assign, num_paths)
    # Python lists: scalar access on lists is ~5x faster than on NumPy arrays.
    paths_l, scores_l, nv_l = ps.paths.tolist(), ps.scores.tolist(), ps.n_v.tolist()
    size_l, assign_l = sizes.tolist(), assign.tolist()
    initial = _round_stats(ps, assign, None, sizes, num_paths, cfg, 0, 0.0, 0.0)
    rounds: list[RoundStats] = []
    for r in range(1, cfg.rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        for v in range(V):
            cand, sc, nv = paths_l[v], scores_l[v], nv_l[v]
            for c in assign_l[v]:             # take the item's own paths out of the sizes
                size_l[c] -= 1
            chosen: list[int] = []
            partial = 0.0
            for _ in range(J):
                best_g, best_k = -math.inf, -1
                for k in range(len(cand)):
                    c = cand[k]
                    if c == EMPTY:            # empty slots come last
                        break
                    if c in chosen:
                        continue
                    # Scores are descending and df is increasing, so the gain at size 0 bounds
                    # every later slot: stop once it cannot beat the best (exact argmax; ties
                    # keep the earliest slot, like np.argmax).
                    g = gain(nv, partial, sc[k], 0, alpha, power)
                    if g <= best_g:
                        break
                    if size_l[c]:
                        g = gain(nv, partial, sc[k], size_l[c], alpha, power)
                    if g > best_g:
                        best_g, best_k = g, k
                if best_k < 0:                # no usable candidate left: fill rule below
                    break
                c = cand[best_k]
                chosen.append(c)
                partial += sc[best_k]
                size_l[c] += 1
            if (cfg.improving_only and len(chosen) == J and set(chosen) != set(assign_l[v])
                    and not _improves(chosen, assign_l[v], cand, sc, nv, size_l, alpha, power)):
                for c in chosen:              # keep the current paths: the picks are no better
                    size_l[c] -= 1
                chosen = list(assign_l[v])
                for c in chosen:
                    size_l[c] += 1
            while len(chosen) < J:            # fewer than J usable candidates
                c = _least_loaded_scan(size_l, chosen)
                chosen.append(c)
                size_l[c] += 1
            assign_l[v] = chosen
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        prev, assign = assign, np.array(assign_l, dtype=np.int64).reshape(V, J)
        sizes = np.asarray(size_l, dtype=np.int64)
        rounds.append(_round_stats(ps, assign, prev, sizes, num_paths, cfg, r, secs, cpu))
    return MStepResult(assign=assign, rounds=rounds, initial=initial)


def _improves(new: list[int], old: list[int], cand: list[int], sc: list[float], nv: float,
              size_l: list[int], alpha: float, power: float) -> bool:
    """Is the item's objective strictly better on `new` than on `old`? (sizes hold the new picks, not old)

    Paths in both sets cancel; a set whose scores sum to 0 has log-likelihood -inf, so an
    item whose current paths have no score always moves (as in the kernel's test).
    """
    score = dict(zip(cand, sc))
    old_tot = sum(score.get(c, 0.0) for c in old)
    if old_tot <= 0:
        return True
    new_tot = sum(score.get(c, 0.0) for c in new)
    arrive = sum(penalty_delta(size_l[c] - 1, power) for c in new if c not in old)
    leave = sum(penalty_delta(size_l[c], power) for c in old if c not in new)
    return nv * (math.log(new_tot) - math.log(old_tot)) - alpha * (arrive - leave) > 0


def _least_loaded_scan(size_l: list[int], exclude: list[int]) -> int:
    """Least-loaded path not in `exclude`, ties to the smallest id (O(num_paths) scan)."""
    sizes = np.asarray(size_l, dtype=np.int64)
    if exclude:
        sizes[exclude] = np.iinfo(np.int64).max
    return int(np.argmin(sizes))


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
    B = paths.shape[1]
    slots = np.full(assign.shape, -1, dtype=np.int64)
    for j in range(assign.shape[1]):
        hit = np.flatnonzero(paths == assign[None, :, j])           # candidate paths are distinct per item
        slots[hit % B, j] = hit // B
    return slots


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


def _fill_least_loaded(new: np.ndarray, sizes: np.ndarray) -> None:
    """Fill rule, in item order: EMPTY slots of new [B, J] take the least-loaded path (ties: smallest id).

    Sizes only grow during the fill, so F requests can only land on the F + J paths with
    the smallest (size, id) keys at the start: each request still has an untouched pool
    path it may take, whose key is <= that of any path outside the pool. Runs only for
    items with fewer than J usable candidates (cold or nearly cold items).
    """
    rows, slots = np.nonzero(new == EMPTY)
    P = sizes.shape[0]
    L = min(P, rows.size + new.shape[1])
    key = sizes * P + np.arange(P, dtype=np.int64)   # (size, id) order as one int64
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
        sizes[c] += 1
        heapq.heappush(heap, (k + P, c))
        for e in aside:
            heapq.heappush(heap, e)


@dataclass(frozen=True)
class CandidateBlocks:
    """Candidates in the kernel's layout: paths [nb, S, B] int64, scores [nb, S, B], n_v [nb, B] (V items)."""

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
                   dtype: type = np.float32) -> CandidateBlocks:
    """[V, S] candidate lists -> contiguous slot-major blocks (done once per M-step: scores are fixed)."""
    V, S = paths.shape
    nb = max(1, -(-V // block_size))
    pad = nb * block_size - V

    def blocks(x: np.ndarray, fill: Any, dt: Any) -> np.ndarray:
        x = np.concatenate([x, np.full((pad, S), fill, dtype=x.dtype)]) if pad else x
        return np.ascontiguousarray(x.reshape(nb, block_size, S).transpose(0, 2, 1), dtype=dt)

    nv = np.concatenate([n_v, np.zeros(pad)]) if pad else n_v
    return CandidateBlocks(blocks(paths, EMPTY, np.int64), blocks(scores, 0.0, dtype),
                           np.ascontiguousarray(nv.reshape(nb, block_size), dtype=dtype), V)


def sweep(cands: CandidateBlocks, assign: np.ndarray, sizes: np.ndarray, alpha: float, power: float, *,
          slots: np.ndarray | None = None, damping: bool = True, improving_only: bool = True) -> np.ndarray:
    """One round over a set of items, block by block: assign [V, J] -> new assign [V, J].

    `sizes` [P] is updated in place. A distributed job runs this per partition against its
    copy of the broadcast size table, which then carries that partition's own changes.
    slots [V, J] (own slots, see update_block) is read and updated in place when given.
    """
    V = cands.num_items
    out = np.empty_like(assign)
    B = cands.block_size
    for b in range(cands.paths.shape[0]):
        lo, hi = b * B, min(V, (b + 1) * B)
        pb, sb, nb = cands.block(b)
        own = slots[lo:hi] if slots is not None else None
        out[lo:hi] = update_block(pb, sb, nb, assign[lo:hi], sizes, alpha, power, slot_major=True,
                                  own_slots=own, slots_out=own, damping=damping,
                                  improving_only=improving_only, dtype=cands.scores.dtype.type)
    return out


def mstep_blocked(ps: PathScores, assign0: np.ndarray, num_paths: int, cfg: MStepConfig, *,
                  damping: bool = True, dtype: type = np.float32) -> MStepResult:
    """Block-vectorized coordinate descent; assign0 [V, J] -> MStepResult.

    Blocks of cfg.block_size items in item order (module doc, update_block); damping=False
    gives plain Jacobi inside each block (kept for comparison). dtype float32 by default
    (float64 reproduces the reference bit for bit at block_size=1).
    """
    assign = _check_inputs(ps, assign0, num_paths)
    V, J = assign.shape
    sizes = path_sizes(assign, num_paths)
    if dtype == np.float32 and cfg.alpha * penalty_delta(float(max(V, 1)), cfg.penalty_power) > 1e37:
        dtype = np.float64   # the penalty could overflow float32 on a crowded path
    cands = prepare_blocks(ps.paths, ps.scores, ps.n_v, cfg.block_size, dtype)
    # slots of the current paths among each item's candidates, kept across rounds (a fill
    # leaves -1 even if it landed on a zero-score candidate: harmless, its gain is -inf)
    slots = np.concatenate([_own_slots(cands.block(b)[0], assign[b * cfg.block_size:(b + 1) * cfg.block_size])
                            for b in range(cands.paths.shape[0])]) if V else np.zeros((0, J), np.int64)
    initial = _round_stats(ps, assign, None, sizes, num_paths, cfg, 0, 0.0, 0.0)
    rounds: list[RoundStats] = []
    for r in range(1, cfg.rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        new = sweep(cands, assign, sizes, cfg.alpha, cfg.penalty_power, slots=slots, damping=damping,
                    improving_only=cfg.improving_only)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        rounds.append(_round_stats(ps, new, assign, sizes, num_paths, cfg, r, secs, cpu))
        assign = new
    return MStepResult(assign=assign, rounds=rounds, initial=initial)


__all__ = [
    "penalty", "penalty_delta", "gain", "size_table", "path_sizes", "assigned_scores", "objective", "ObjectiveParts",
    "RoundStats", "MStepResult", "initial_assignment", "mstep_reference", "update_block", "CandidateBlocks",
    "prepare_blocks", "sweep", "mstep_blocked",
]
