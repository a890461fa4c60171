"""The hot loops that torch ops would run as many passes over a batch's rows, compiled by numba.

Each is a plain Python function (readable, testable uncompiled); `compiled(f)` gives its numba
build, once per process (numba's on-disk cache spares later processes the compile). Catalog-sized
tables are cache misses row by row: a loop that reads and writes each row once, and requests the
next rows' lines before it needs them, is what these buy.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np

from .scores import EMPTY


@lru_cache(maxsize=None)
def compiled(f: Callable) -> Callable:
    """f compiled by numba (nopython, GIL released); cached on disk where a cache folder is writable."""
    import numba

    try:
        return numba.njit(cache=True, nogil=True)(f)
    except RuntimeError:        # no writable cache folder (a read-only install, no home): compile per process
        return numba.njit(nogil=True)(f)


AHEAD = 32        # rows whose cache lines are requested before the update reaches them


def adam_rows(weight: np.ndarray, moments: np.ndarray, rows: np.ndarray, grad: np.ndarray,
               b1: float, b2: float, eps: float, step_size: float) -> float:
    """In place: weight [V, dim], moments [V, 2, dim] (m, v) at the distinct rows [k] with grad [k, dim].

    The arithmetic of torch.optim.SparseAdam in the table's dtype, in its order of operations.
    Before a block of AHEAD rows is updated, one value per 64-byte line of the next block's rows
    is read: independent loads, so their cache misses overlap instead of stalling the update one
    row at a time (a catalog-sized table's rows are all misses). Returns those values' sum, so the
    compiler keeps the loads.
    """
    k, dim = grad.shape
    f = weight.dtype.type
    c1, c2 = f(1 - b1), f(1 - b2)
    b1, b2, eps, step_size = f(b1), f(b2), f(eps), f(step_size)
    touched = f(0)
    for lo in range(0, k, AHEAD):
        hi = min(lo + AHEAD, k)
        for i in range(hi, min(hi + AHEAD, k)):
            r = rows[i]
            for d in range(0, dim, 16):
                touched += weight[r, d] + moments[r, 0, d] + moments[r, 1, d]
        for i in range(lo, hi):
            r = rows[i]
            for d in range(dim):
                g = grad[i, d]
                m = moments[r, 0, d] * b1 + c1 * g
                v = moments[r, 1, d] * b2 + c2 * g * g
                moments[r, 0, d] = m
                moments[r, 1, d] = v
                weight[r, d] -= step_size * (m / (np.sqrt(v) + eps))
    return touched


def split_rows(ids: np.ndarray, slot: np.ndarray, n_exact: int, n_r: int, n_q: int,
               main: np.ndarray, quo: np.ndarray) -> int:
    """A split table's rows of ids [n] int64 -> main [n], quo [n] (dr_model.item_table.SplitTable.rows_of).

    slot [V] int32: an id's exact row, or -1 for a composed id (remainder row n_exact + id % n_r,
    quotient row id // n_r); an exact id reads the zero quotient row n_q. Returns the position of
    the first id outside [0, V), or -1 when all are inside (nothing is read out of range).
    """
    V = slot.shape[0]
    for i in range(ids.shape[0]):
        v = ids[i]
        if v < 0 or v >= V:
            return i
        s = slot[v]
        if s < 0:
            main[i] = n_exact + v % n_r
            quo[i] = v // n_r
        else:
            main[i] = s
            quo[i] = n_q
    return -1


def merge_siblings(real_p: np.ndarray, real_s: np.ndarray, sib: np.ndarray, score_frac: float,
                   out_p: np.ndarray, out_s: np.ndarray) -> None:
    """Each row's candidates real_p/real_s [r, S] (score descending, empty slots last) with its siblings
    sib [r, n] -> out_p/out_s [r, S + n] (dr_model.calibrate.with_exploration).

    A sibling is kept unless empty, already a candidate or an earlier sibling; kept ones score
    score_frac x the row's best and go where a stable sort by score puts them: after the real
    candidates scoring at least as much, in sibling order. Empty slots fill the row's end.
    """
    r, S = real_p.shape
    n = sib.shape[1]
    for i in range(r):
        sib_score = score_frac * real_s[i, 0]
        pos = 0
        for c in range(S):
            if real_p[i, c] != EMPTY and real_s[i, c] >= sib_score:
                pos += 1
        for c in range(pos):
            out_p[i, c] = real_p[i, c]
            out_s[i, c] = real_s[i, c]
        k = pos
        for j in range(n):
            p = sib[i, j]
            keep = p != EMPTY
            for c in range(S):
                if keep and real_p[i, c] == p:
                    keep = False
            for t in range(j):
                if keep and sib[i, t] == p:
                    keep = False
            if keep:
                out_p[i, k] = p
                out_s[i, k] = sib_score
                k += 1
        for c in range(pos, S):
            out_p[i, k] = real_p[i, c]
            out_s[i, k] = real_s[i, c]
            k += 1
        while k < S + n:
            out_p[i, k] = EMPTY
            out_s[i, k] = 0.0
            k += 1


def traffic_rows(n_v: np.ndarray, scores: np.ndarray, slots: np.ndarray, assign: np.ndarray, out: np.ndarray) -> None:
    """out[c] += N_v w[v, j] for every slot j holding path c (dr_model.calibrate.assigned_traffic).

    n_v [m], scores [m, S], slots / assign [m, J] (slot -1: the path is not a candidate); w is
    the slot's share of the item's assigned score, 1/J each where that score is 0. The
    arithmetic and order of path_traffic(n_v, assigned_weights(scores, slots), assign, P).
    """
    m, J = slots.shape
    for i in range(m):
        tot = 0.0
        for j in range(J):
            if slots[i, j] >= 0:
                tot += scores[i, slots[i, j]]
        for j in range(J):
            if tot > 0:
                w = scores[i, slots[i, j]] / tot if slots[i, j] >= 0 else 0.0
            else:
                w = 1.0 / J
            out[assign[i, j]] += w * n_v[i]


def slot_rows(paths: np.ndarray, assign: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = the column of assign[i, j] among paths[i] (candidates distinct per row), -1 where absent.

    paths [m, S] (any strides), assign / out [m, J].
    """
    m, S = paths.shape
    for i in range(m):
        for j in range(assign.shape[1]):
            a = assign[i, j]
            out[i, j] = -1
            for c in range(S):
                if paths[i, c] == a:
                    out[i, j] = c
                    break


__all__ = ["AHEAD", "adam_rows", "compiled", "merge_siblings", "slot_rows", "split_rows", "traffic_rows"]
