"""The distributed M-step's worker-side candidate cache, and the context every task of a run shares.

The candidates (paths / scores / n_v of a partition's items) never change during an M-step, so
the pass that builds the state stores them, already in the kernel's block layout, keyed by
(job id, partition): NumPy files in the executor's local SparkFiles folder, memory-mapped by
every Python worker of that executor (page cache: one copy per machine, shared by the workers,
whichever worker gets the partition), plus a per-process dict of the mapped arrays. A miss (a
lost executor, a partition scheduled elsewhere) rebuilds the entry from the `path_scores`
version's files (only this partition's items), so a round never depends on the cache for
correctness, only for speed. (spark_udfs.mstep_files reads the files, spark_udfs.mstep_udf runs
the rounds.)
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from dr_model.calibrate import with_exploration
from dr_model.mstep import CandidateBlocks, prepare_blocks
from dr_model.scores import EMPTY, PathScores

# where a pass found the partition's candidates (`cache` column of the state; -1: the build pass)
REBUILT, FROM_FILES, FROM_WORKER = 0, 1, 2


@dataclass(frozen=True)
class MStepContext:
    """What every task of one M-step run needs (pickled into the closures; small).

    job: unique id of the run (cache key); sources: file URIs of the path_scores version
    (the cache-miss fallback); partitions: number of item partitions (the block-layout
    guess at build time); cache False: always rebuild from `sources` (tests, debugging).
    """

    job: str
    S: int
    J: int
    num_paths: int
    alpha: float
    power: float
    block_size: int
    extrapolate: bool
    partitions: int
    sources: tuple[str, ...]
    cache: bool = True
    improving_only: bool = True
    K: int = 0                        # nodes per layer and layers (exploration paths are near in code space)
    D: int = 0
    explore: int = 0                  # exploration paths per item (dr_model.calibrate.with_exploration)
    explore_score: float = 0.5
    seed: int = 0
    buckets: int = 0                  # > 0: each source file holds one Spark hash bucket of item_id
                                      # (of `buckets`; a multiple of partitions): read_scores

    @property
    def width(self) -> int:
        """Candidate slots per item in the kernel: the path_scores lists plus the exploration paths."""
        return self.S + self.explore

    def candidates(self, ps: PathScores, out: tuple[np.ndarray, np.ndarray] | None = None) -> PathScores:
        """A partition's s[v,c] lists with the exploration paths (width S + explore); out: (paths, scores) to fill."""
        if self.explore:
            return with_exploration(ps, self.K, self.D, self.explore, self.explore_score, self.seed, out=out)
        if out is None:
            return ps
        w = ps.S
        out[0][:, :w], out[1][:, :w], out[0][:, w:], out[1][:, w:] = ps.paths, ps.scores, EMPTY, 0.0
        return PathScores(ps.items, *out, ps.n_v)

    @staticmethod
    def new_job() -> str:
        return uuid.uuid4().hex[:16]

    @property
    def assign_dtype(self) -> type:
        """Blob dtype of paths in the state (int32 whenever path ids fit: half the bytes per round)."""
        return np.int32 if self.num_paths <= np.iinfo(np.int32).max else np.int64

    @property
    def slot_dtype(self) -> type:
        """Blob dtype of candidate slots in the state (-1 = not a candidate)."""
        return np.int8 if self.width <= 127 else np.int16 if self.width <= 32767 else np.int32



@dataclass
class _Entry:
    """A partition's candidates: items [n] (scored first), row-major paths/scores [m, S] (float64), n_v [m]."""

    dir: str | None
    items: np.ndarray
    paths: np.ndarray
    scores: np.ndarray
    n_v: np.ndarray
    blocks: dict
    source: int = REBUILT

    @property
    def n_scored(self) -> int:
        return self.paths.shape[0]


_CACHE: dict[tuple[str, int], _Entry] = {}     # one per Python worker; only the current job's entries


def _cache_root() -> str:
    try:
        from pyspark import SparkFiles

        root = SparkFiles.getRootDirectory()
    except Exception:  # noqa: BLE001 - not inside Spark (direct calls): a temp folder
        import tempfile

        root = tempfile.gettempdir()
    return os.path.join(root, "dr-mstep")


def job_dir(job: str) -> str:
    """This run's cache folder on this machine (the executor's SparkFiles folder)."""
    return os.path.join(_cache_root(), job)


class _CacheDir:
    """A cache folder written in place: arrays allocated as .npy memory maps in a temp folder, which is
    renamed when complete (a concurrent writer may win). Allocated there, a partition's candidates
    live once, in the machine's page cache, instead of in the worker and again in the file."""

    def __init__(self, final: str) -> None:
        self.final, self.tmp = final, f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.maps: dict[str, tuple[np.ndarray, np.memmap]] = {}

    def alloc(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A new array backed by `name`.npy of this folder (empty arrays: in memory, a file cannot map them)."""
        if not all(shape):
            return np.zeros(shape, dtype)
        os.makedirs(self.tmp, exist_ok=True)
        mm = np.lib.format.open_memmap(os.path.join(self.tmp, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape)
        view = np.asarray(mm)
        self.maps[name] = (view, mm)
        return view

    def commit(self, arrays: dict[str, np.ndarray]) -> None:
        """Write the arrays not allocated here, publish the folder.

        The arrays allocated here are not flushed: the workers that map the files share the machine's
        page cache, and a cache needs no durability (a lost machine takes its executor with it).
        """
        if os.path.isdir(self.final):
            self.discard()
            return
        os.makedirs(self.tmp, exist_ok=True)
        try:
            for name, a in arrays.items():
                mapped = self.maps.get(name)
                if mapped is not None:
                    if mapped[0] is not a:      # np.save would overwrite the file the array maps
                        raise ValueError(f"cache array {name!r}: commit the array alloc returned, not a copy or view")
                else:
                    np.save(os.path.join(self.tmp, f"{name}.npy"), a)
            os.rename(self.tmp, self.final)
        except OSError:
            if not os.path.isdir(self.final):
                raise
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the temp folder (arrays mapped from it stay valid until released)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def partition_dir(ctx: MStepContext, part: int) -> _CacheDir | None:
    """Where a partition's candidates are written in place (None: ctx.cache off)."""
    return _CacheDir(os.path.join(job_dir(ctx.job), f"p{part:05d}")) if ctx.cache else None


def _load_dir(path: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    try:
        return {n: np.asarray(np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r")) for n in names}
    except (OSError, ValueError):
        return None


def _evict_other_jobs(job: str) -> None:
    for key in [k for k in _CACHE if k[0] != job]:
        del _CACHE[key]


def _store(ctx: MStepContext, part: int, items: np.ndarray, ps: PathScores, into: _CacheDir | None = None) -> _Entry:
    """Put a partition's candidates into this machine's cache (files; `into`: the folder read_scores wrote
    them into) and this worker's dict."""
    entry = _Entry(None, items, ps.paths, ps.scores, ps.n_v, {})
    if ctx.cache:
        _evict_other_jobs(ctx.job)
        into = into or partition_dir(ctx, part)
        os.makedirs(os.path.dirname(into.final), exist_ok=True)
        into.commit({"items": items, "paths": ps.paths, "scores": ps.scores, "n_v": ps.n_v})
        entry.dir = into.final
        _CACHE[(ctx.job, part)] = entry
    return entry


def _rebuild(ctx: MStepContext, part: int, items: np.ndarray, n_scored: int) -> _Entry:
    """Cache miss: this partition's candidates straight from the path_scores files (its items only)."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    from spark_udfs.mstep_files import read_scores     # it imports this module

    S = ctx.S
    scored = items[:n_scored]
    if n_scored and ctx.buckets:
        ps = read_scores(ctx, part)
    elif n_scored and ctx.sources:
        fs, _ = pafs.FileSystem.from_uri(ctx.sources[0])
        paths = [pafs.FileSystem.from_uri(u)[1] for u in ctx.sources]
        tbl = ds.dataset(paths, filesystem=fs, format="parquet").to_table(
            columns=["item_id", "path", "score", "n_v"], filter=ds.field("item_id").isin(pa.array(scored)))
        ps = ctx.candidates(PathScores.from_long(*(tbl.column(c).to_numpy().astype(dt, copy=False) for c, dt in
                                                   (("item_id", np.int64), ("path", np.int64),
                                                    ("score", np.float64), ("n_v", np.float64))), S))
    else:
        W = ctx.width
        ps = PathScores(np.zeros(0, np.int64), np.zeros((0, W), np.int64), np.zeros((0, W)), np.zeros(0))
    if not np.array_equal(ps.items, scored):
        raise RuntimeError(f"M-step partition {part}: the path_scores files do not hold this partition's items")
    return _store(ctx, part, items, ps)


def _entry(ctx: MStepContext, part: int, items: np.ndarray, n_scored: int) -> _Entry:
    """The partition's cache entry: this worker's dict, else this machine's files, else rebuilt."""
    if ctx.cache:
        e = _CACHE.get((ctx.job, part))
        if e is not None and e.n_scored == n_scored and np.array_equal(e.items, items):
            e.source = FROM_WORKER
            return e
        d = os.path.join(job_dir(ctx.job), f"p{part:05d}")
        got = _load_dir(d, ("items", "paths", "scores", "n_v"))
        if got is not None and got["paths"].shape[0] == n_scored and np.array_equal(got["items"], items):
            _evict_other_jobs(ctx.job)
            e = _Entry(d, got["items"], got["paths"], got["scores"], got["n_v"], {}, FROM_FILES)
            _CACHE[(ctx.job, part)] = e
            return e
    e = _rebuild(ctx, part, items, n_scored)
    e.source = REBUILT
    return e


def _blocks(e: _Entry, block_size: int, dtype: type) -> CandidateBlocks:
    """The entry's candidates in the kernel's block layout (prepared once per machine, then mapped)."""
    key = (block_size, np.dtype(dtype).name)
    hit = e.blocks.get(key)
    if hit is not None:
        return hit
    names = ("paths", "scores", "n_v")
    sub = os.path.join(e.dir, f"blocks-{block_size}-{key[1]}") if e.dir else None
    got = _load_dir(sub, names) if sub else None
    if got is not None:
        cb = CandidateBlocks(got["paths"], got["scores"], got["n_v"], e.n_scored)
    else:
        into = _CacheDir(sub) if sub else None
        cb = prepare_blocks(np.asarray(e.paths), np.asarray(e.scores), np.asarray(e.n_v), block_size, dtype,
                            alloc=into.alloc if into else None)
        if into:
            into.commit({"paths": cb.paths, "scores": cb.scores, "n_v": cb.n_v})
    e.blocks[key] = cb
    return cb


def drop_partition(job: str, part: int) -> None:
    """Forget a partition's entry in this worker and remove its files on this machine."""
    _CACHE.pop((job, part), None)
    shutil.rmtree(os.path.join(job_dir(job), f"p{part:05d}"), ignore_errors=True)


def drop_job(job: str) -> None:
    """Remove a run's cache folder on this machine (driver side: the local-mode executors' folder)."""
    _evict_other_jobs("")
    shutil.rmtree(job_dir(job), ignore_errors=True)


__all__ = ["MStepContext", "partition_dir", "REBUILT", "FROM_FILES", "FROM_WORKER", "job_dir", "drop_job", "drop_partition"]
