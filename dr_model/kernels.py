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


__all__ = ["AHEAD", "adam_rows", "compiled", "split_rows"]
