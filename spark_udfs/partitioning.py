"""Spark's hash partitioning of a long column, in NumPy, and the Spark task behind a staged file.

`df.repartition(n, "item_id")` sends a row to partition pmod(murmur3_x86_32(item_id, seed 42), n)
(Spark's HashPartitioning over Murmur3Hash). A job that wrote a table from such a partitioning
knows every file holds one partition's items: a later job can read "its" files directly instead
of shuffling the table again, and check with `spark_partition` that rows it received by a
shuffle belong to it.
"""
from __future__ import annotations

import re

import numpy as np

_C1, _C2, _M = np.uint32(0xCC9E2D51), np.uint32(0x1B873593), np.uint32(0xE6546B64)
_SEED = 42                      # Spark's Murmur3Hash default seed (functions.hash, HashPartitioning)
# jobs.staging names a Spark task's files part-<write tag>-<partition id>-<attempt>-<uuid>.parquet
_TASK_FILE = re.compile(r"part-[0-9a-f]{8}-(\d{5})-\d+-[0-9a-f]{12}\.parquet$")


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _mix(h1: np.ndarray, k1: np.ndarray) -> np.ndarray:
    k1 = _rotl(k1 * _C1, 15) * _C2
    return _rotl(h1 ^ k1, 13) * np.uint32(5) + _M


def spark_hash(ids: np.ndarray, seed: int = _SEED) -> np.ndarray:
    """Spark's hash() of int64 values (Murmur3_x86_32.hashLong): ids [n] int64 -> [n] int32."""
    u = np.asarray(ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.full(u.shape, seed, np.uint32), (u & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        h = _mix(h, (u >> np.uint64(32)).astype(np.uint32))
        h ^= np.uint32(8)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h.view(np.int32)


def spark_partition(ids: np.ndarray, n: int) -> np.ndarray:
    """The partition `repartition(n, <long column>)` sends each id to: ids [m] int64 -> [m] int64 in [0, n)."""
    return np.mod(spark_hash(ids).astype(np.int64), n)


def task_of(path: str) -> int | None:
    """Partition id of the Spark task that staged this file (None: written on the driver)."""
    m = _TASK_FILE.search(path)
    return int(m.group(1)) if m else None


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (>= 1): partitions that take whole groups of n buckets."""
    return max(d for d in range(1, max(min(n, at_most), 1) + 1) if n % d == 0)


__all__ = ["spark_hash", "spark_partition", "task_of", "largest_divisor"]
