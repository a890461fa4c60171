"""The distributed M-step's candidates read from `path_scores` bucket files (a partition's share, its items only).

The scores job writes one file set per hash bucket of item_id, each item's rows together and the
files' items in order; a partition reads its buckets' files itself (no shuffle). Such files are read
one at a time straight into the result (the cache's memory-mapped files, spark_udfs.mstep_cache),
so memory holds the result and one file; any other layout (an item split between two files, items
out of order) takes the general merge.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from dr_model.scores import PathScores
from spark_udfs.mstep_cache import MStepContext, _CacheDir
from spark_udfs.partitioning import spark_partition, task_of


def partition_files(ctx: MStepContext, part: int) -> list[str]:
    """The path_scores files of this partition's buckets (ctx.buckets > 0): bucket b goes to partition b % partitions."""
    return [u for u in ctx.sources if (task_of(u) or 0) % ctx.partitions == part]


BATCH_ROWS = 1 << 17       # rows decoded at a time: the Arrow pool reuses one batch's memory


def _read_columns(uri: str, columns: Sequence[str]) -> pa.Table:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = pafs.FileSystem.from_uri(uri)
    return pq.read_table(path, filesystem=fs, columns=list(columns))


def _item_batches(uri: str, columns: Sequence[str]) -> Iterator[list[np.ndarray]]:
    """One file's columns (the first is item_id) in slices of BATCH_ROWS rows, cut between items: an
    item's rows in one slice. Single-threaded: a Spark task has one core.

    Decoding a whole file first-touches a file's worth of fresh memory (measured ~4x slower than
    batches on a worker's first read); batches reuse the same few buffers.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = pafs.FileSystem.from_uri(uri)
    carry: list[np.ndarray] | None = None
    with fs.open_input_file(path) as fh:
        for b in pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS, columns=list(columns), use_threads=False):
            cols = [b.column(c).to_numpy() for c in columns]
            if carry is not None:
                cols = [np.concatenate([a, c]) for a, c in zip(carry, cols)]
            ids = cols[0]
            other = np.flatnonzero(ids != ids[-1])
            cut = int(other[-1]) + 1 if other.size else 0     # the last item may go on in the next batch
            if cut:
                yield [c[:cut] for c in cols]
            carry = [np.array(c[cut:]) for c in cols]
    if carry is not None and carry[0].size:
        yield carry


def _file_items(uri: str) -> np.ndarray:
    """The items of one path_scores file, one per run of equal item_id rows, in file order."""
    runs = [ids[np.r_[True, ids[1:] != ids[:-1]]] for ids, in _item_batches(uri, ["item_id"])]
    return _cat(runs) if runs else np.zeros(0, np.int64)


def _lists(item: np.ndarray, path: np.ndarray, score: np.ndarray, n_v: np.ndarray, S: int) -> PathScores:
    """path_scores rows -> their s[v,c] lists (at most S wide), items in row order."""
    # lists narrower than S stay so: the exploration pass writes them into the full width once
    return PathScores.from_long(item.astype(np.int64, copy=False), path.astype(np.int64, copy=False),
                                score.astype(np.float64, copy=False), n_v.astype(np.float64, copy=False), S, pad=False)


def _read_file(uri: str, S: int) -> PathScores:
    """One path_scores file's s[v,c] lists (width S), its items in file order."""
    cols = ("item_id", "path", "score", "n_v")
    t = _read_columns(uri, cols)
    return _lists(*(t.column(c).to_numpy() for c in cols), S)


def _cat(xs: list[np.ndarray]) -> np.ndarray:
    return xs[0] if len(xs) == 1 else np.concatenate(xs)


def _sorted_rows(xs: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """_cat(xs)[order] with one copy: each part's rows scattered straight to their sorted places."""
    if len(xs) == 1 and np.array_equal(order, np.arange(len(order))):
        return xs[0]
    at = np.empty_like(order)
    at[order] = np.arange(len(order))
    out = np.empty((len(order),) + xs[0].shape[1:], dtype=xs[0].dtype)
    lo = 0
    for x in xs:
        out[at[lo:lo + len(x)]] = x
        lo += len(x)
    return out


def _rows_of(ps: PathScores, keep: np.ndarray) -> PathScores:
    return PathScores(ps.items[keep], ps.paths[keep], ps.scores[keep], ps.n_v[keep])


def read_scores(ctx: MStepContext, part: int, into: _CacheDir | None = None) -> PathScores:
    """This partition's candidates (width ctx.width: exploration paths included), read from its bucket
    files (ctx.buckets > 0), sorted by item (as the shuffled build's); `into`: the cache folder the
    lists are written into in place, when the files hold their items in order."""
    files = partition_files(ctx, part)
    runs = [_file_items(uri) for uri in files]
    # a table lists its files in no particular order: the scores job's files, taken by their first
    # item, hold consecutive runs of items
    got = sorted((r[0], i) for i, r in enumerate(runs) if r.size)
    files, runs = [files[i] for _, i in got], [runs[i] for _, i in got]
    items = _cat(runs) if runs else np.zeros(0, np.int64)
    if items.size and (items[1:] > items[:-1]).all():
        ps = _read_in_order(ctx, files, items, into)
    else:
        ps = _read_any_order(ctx, files)
    if ps.items.size and (spark_partition(ps.items, ctx.partitions) != part).any():
        raise RuntimeError(f"M-step partition {part} of {ctx.partitions}: path_scores files {files} hold items of "
                           "other partitions (the version's item_buckets do not describe its files)")
    return ps


def _read_in_order(ctx: MStepContext, files: list[str], items: np.ndarray, into: _CacheDir | None) -> PathScores:
    """Files whose items are in order (the scores job's), each item in one file: one file at a time, its
    lists written with their exploration paths straight into their rows (into's files when given), so
    memory holds the result and one file."""
    V, W = len(items), ctx.width
    # paths as narrow as the path ids allow (int32 below 2^31 paths): the lists and the kernel's
    # blocks made from them are the M-step's largest arrays
    new = into.alloc if into is not None else (lambda name, shape, dt: np.empty(shape, dt))
    out_p, out_s = new("paths", (V, W), ctx.assign_dtype), new("scores", (V, W), np.float64)
    n_v = np.empty(V)
    lo = 0
    for uri in files:
        for item, path, score, nv in _item_batches(uri, ("item_id", "path", "score", "n_v")):
            p = _lists(item, path, score, nv, ctx.S)
            hi = lo + len(p)
            if not np.array_equal(p.items, items[lo:hi]):
                raise RuntimeError(f"path_scores file {uri} changed while the M-step read it")
            ctx.candidates(p, out=(out_p[lo:hi], out_s[lo:hi]))
            n_v[lo:hi] = p.n_v
            lo = hi
    return PathScores(items, out_p, out_s, n_v)


def _read_any_order(ctx: MStepContext, files: list[str]) -> PathScores:
    """Files in any order, an item's rows maybe in two files: all read, then merged and sorted by item."""
    parts = [_read_file(uri, ctx.S) for uri in files]
    if not parts:
        W = ctx.width
        return PathScores(np.zeros(0, np.int64), np.zeros((0, W), np.int64), np.zeros((0, W)), np.zeros(0))
    items = _cat([p.items for p in parts])
    order = np.argsort(items, kind="stable")
    same = items[order[1:]] == items[order[:-1]]
    if same.any():
        # an item's rows in two files (a task rolled its file mid-item): its partial lists merged the
        # general way, the other items' lists kept as read
        split = np.unique(items[order[1:]][same])
        parts = [p.padded(ctx.S) for p in parts]
        long = [np.concatenate(x) for x in zip(*(_rows_of(p, np.isin(p.items, split)).to_long() for p in parts))]
        parts = [_rows_of(p, ~np.isin(p.items, split)) for p in parts] + [PathScores.from_long(*long, ctx.S)]
        items = _cat([p.items for p in parts])
        order = np.argsort(items, kind="stable")
    # exploration is row-wise (a hash of the item): added per part, so the lists are copied once
    parts = [ctx.candidates(p.padded(ctx.S)) for p in parts if len(p)]
    return PathScores(items[order], *(_sorted_rows([getattr(p, f) for p in parts], order)
                                      for f in ("paths", "scores", "n_v")))


__all__ = ["partition_files", "read_scores"]
