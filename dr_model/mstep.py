"""M-step: penalized coordinate descent over item->path assignments (paper's Algorithm 2).

Objective (reported per round):
    Q = sum_v N_v * log(sum_j s[v, pi_j(v)])  -  alpha * sum_c f(|c|),   f(n) = n**p / p
Items whose J chosen paths all have score 0 (or that have no candidate at all) are left
out of the first sum and counted (`skipped`).

Two solvers share ONE gain function (`mstep_kernel.gain`):

* `mstep_reference`: the paper, sequential. For each item in order: take its J paths out
  of the size table, pick J paths one by one among its S candidates by the largest
  incremental gain, add 1 to each picked path's size.
* `mstep_blocked`: the fast kernel (dr_model.mstep_kernel): blocks of `block_size` items
  re-assigned together (damped Jacobi inside a block, Gauss-Seidel between blocks); a block
  of one item is exactly the reference.

With `mstep.alpha = "auto"`, `mstep_blocked` re-calibrates alpha after every sweep so the
traffic-weighted path size meets a target (dr_model.calibrate); the objective of a round
is reported under that round's alpha. With `mstep.explore`, every item also sees a few
light paths next to its best one (calibrate.with_exploration).

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

import math
import time
from dataclasses import dataclass, field

import numpy as np

from dr_model.calibrate import AlphaSearch, assigned_traffic, initial_alpha, traffic_size
from dr_model.config import MStepConfig
from dr_model.mstep_kernel import (CandidateBlocks, _own_slots, gain, penalty, penalty_delta, prepare_blocks,
                                   size_table, sweep, update_block)
from dr_model.scores import EMPTY, PathScores


# --------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class ObjectiveParts:
    """Q = loglik - penalty; `skipped` items (assigned total score 0) are left out of loglik."""

    total: float
    loglik: float
    penalty: float
    skipped: int


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
    alpha: float = 0.0        # the penalty weight this sweep ran with (the objective is under it)
    path_size: float = 0.0    # traffic-weighted path size after the sweep (dr_model.calibrate)

    @classmethod
    def from_sums(cls, r: int, sizes: np.ndarray, loglik: float, skipped: int, moved: int, alpha: float,
                  power: float, seconds: float = 0.0, cpu_seconds: float = 0.0,
                  traffic: np.ndarray | None = None) -> "RoundStats":
        """A round's statistics from the global size table [num_paths], the summed log-likelihood part
        and (optional) the summed path traffic [num_paths]."""
        pen = alpha * float(penalty(sizes[sizes > 0], power).sum())
        return cls(round=r, objective=float(loglik) - pen, max_path_size=int(sizes.max(initial=0)),
                   nonempty_paths=int((sizes > 0).sum()), items_moved=int(moved), skipped_items=int(skipped),
                   seconds=seconds, cpu_seconds=float(cpu_seconds), alpha=float(alpha),
                   path_size=traffic_size(traffic, sizes) if traffic is not None else 0.0)


@dataclass(frozen=True)
class MStepResult:
    """Final assignment [V, J] int64, per-round statistics, and the starting point's."""

    assign: np.ndarray
    rounds: list[RoundStats]
    initial: RoundStats
    trials: list[tuple[float, float]] = field(default_factory=list)     # (alpha, path size) of the alpha search

    @property
    def objective(self) -> float:
        return self.rounds[-1].objective if self.rounds else self.initial.objective

    @property
    def alpha(self) -> float:
        """The alpha of the last sweep (the one a later M-step may start from)."""
        return self.rounds[-1].alpha if self.rounds else self.initial.alpha


def _round_stats(ps: PathScores, assign: np.ndarray, prev: np.ndarray | None, sizes: np.ndarray,
                 num_paths: int, cfg: MStepConfig, r: int, seconds: float, cpu_seconds: float,
                 alpha: float) -> RoundStats:
    obj = objective(ps, assign, num_paths, alpha, cfg.penalty_power, sizes=sizes)
    moved = 0 if prev is None else int((np.sort(prev, 1) != np.sort(assign, 1)).any(1).sum())
    traffic = assigned_traffic(ps.n_v, ps.scores, _own_slots(ps.paths.T, assign), assign, num_paths)
    return RoundStats(round=r, objective=obj.total, max_path_size=int(sizes.max(initial=0)),
                      nonempty_paths=int((sizes > 0).sum()), items_moved=moved,
                      skipped_items=obj.skipped, seconds=seconds, cpu_seconds=cpu_seconds, alpha=float(alpha),
                      path_size=traffic_size(traffic, sizes))


def effective_block(block_size: int, num_items: int, concurrent: int = 1) -> int:
    """Items re-assigned together per block: mstep.block_size, but never more than 1/64 of the catalog
    across the `concurrent` partitions. A block moves against one stale size table (Jacobi); on a
    small catalog a full block is a large share of all items, and the damping alone does not stop
    them piling onto the same light paths (measured on MovieLens-100K: largest path 81 with one
    block of all 1,359 items, 18 with blocks of 21)."""
    return max(1, min(block_size, num_items // (64 * max(concurrent, 1))))


def fixed_alpha(cfg: MStepConfig) -> float:
    """cfg.alpha as a number (an error for "auto": the caller must calibrate)."""
    if cfg.auto_alpha:
        raise ValueError("mstep.alpha is 'auto': give the M-step a target path size (search.items_per_user / beam)")
    return float(cfg.alpha)


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
    alpha, power = fixed_alpha(cfg), cfg.penalty_power
    if ps.S and np.any(np.diff(ps.scores, axis=1) > 0):
        raise ValueError("candidate scores must be sorted descending per item (PathScores layout)")
    sizes = path_sizes(assign, num_paths)
    # Python lists: scalar access on lists is ~5x faster than on NumPy arrays.
    paths_l, scores_l, nv_l = ps.paths.tolist(), ps.scores.tolist(), ps.n_v.tolist()
    size_l, assign_l = sizes.tolist(), assign.tolist()
    initial = _round_stats(ps, assign, None, sizes, num_paths, cfg, 0, 0.0, 0.0, alpha)
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
        rounds.append(_round_stats(ps, assign, prev, sizes, num_paths, cfg, r, secs, cpu, alpha))
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


def mstep_blocked(ps: PathScores, assign0: np.ndarray, num_paths: int, cfg: MStepConfig, *,
                  damping: bool = True, dtype: type = np.float32, target_size: float | None = None,
                  alpha0: float | None = None) -> MStepResult:
    """Block-vectorized coordinate descent; assign0 [V, J] -> MStepResult.

    Blocks of cfg.block_size items in item order (module doc, update_block); damping=False
    gives plain Jacobi inside each block (kept for comparison). dtype float32 by default
    (float64 reproduces the reference bit for bit at block_size=1). With mstep.alpha "auto",
    alpha is searched first (calibrate.AlphaSearch from alpha0, default calibrate.initial_alpha:
    one discarded trial sweep per alpha) so the traffic-weighted path size meets `target_size`
    (required then); `MStepResult.trials` lists (alpha, size) of the trials.
    """
    assign = _check_inputs(ps, assign0, num_paths)
    V, J = assign.shape
    sizes = path_sizes(assign, num_paths)
    power = cfg.penalty_power
    if cfg.auto_alpha:
        if target_size is None:
            raise ValueError("mstep.alpha is 'auto': mstep_blocked needs target_size")
        alpha = alpha0 if alpha0 is not None else initial_alpha(float(ps.n_v.mean()) if V else 1.0, target_size, power)
    else:
        alpha = float(cfg.alpha)
    cands: dict[type, CandidateBlocks] = {}
    block = cfg.block_size

    def blocks(a: float) -> CandidateBlocks:
        # float32 unless the penalty could overflow it on a crowded path
        dt = np.float64 if a * penalty_delta(float(max(V, 1)), power) > 1e37 else dtype
        if dt not in cands:
            cands[dt] = prepare_blocks(ps.paths, ps.scores, ps.n_v, block, dt)
        return cands[dt]

    # slots of the current paths among each item's candidates, kept across rounds (a fill
    # leaves -1 even if it landed on a zero-score candidate: harmless, its gain is -inf)
    slots = _own_slots(ps.paths.T, assign) if V else np.zeros((0, J), np.int64)
    trials: list[tuple[float, float]] = []
    if cfg.auto_alpha:
        search = AlphaSearch(alpha, target_size)
        while (a := search.propose()) is not None:
            s_try, sz_try = slots.copy(), sizes.copy()
            new = sweep(blocks(a), assign, sz_try, a, power, slots=s_try, damping=damping,
                        improving_only=cfg.improving_only)
            search.observe(a, traffic_size(assigned_traffic(ps.n_v, ps.scores, s_try, new, num_paths),
                                           sz_try))
        alpha, trials = search.result, search.trials
    initial = _round_stats(ps, assign, None, sizes, num_paths, cfg, 0, 0.0, 0.0, alpha)
    rounds: list[RoundStats] = []
    for r in range(1, cfg.rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        new = sweep(blocks(alpha), assign, sizes, alpha, power, slots=slots, damping=damping,
                    improving_only=cfg.improving_only)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        rounds.append(_round_stats(ps, new, assign, sizes, num_paths, cfg, r, secs, cpu, alpha))
        assign = new
    return MStepResult(assign=assign, rounds=rounds, initial=initial, trials=trials)


__all__ = [
    "penalty", "penalty_delta", "gain", "size_table", "path_sizes", "assigned_scores", "objective", "ObjectiveParts",
    "RoundStats", "MStepResult", "effective_block", "fixed_alpha", "initial_alpha", "initial_assignment", "mstep_reference", "update_block", "CandidateBlocks",
    "prepare_blocks", "sweep", "mstep_blocked",
]
