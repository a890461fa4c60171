"""The M-step state build streams a partition's sorted rows chunk by chunk: same state as in one piece; no Spark."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dr_model.mstep import initial_assignment
from jobs.benchmarks.mstep import synthetic_scores
from spark_udfs import mstep_state as mstep_udf
from spark_udfs.mstep_cache import MStepContext

S, J, P = 8, 3, 4_000


def _rows(items: int = 3_000, seed: int = 0) -> pa.Table:
    """path_scores rows (src 0) of `items` items and starting item_paths (src 1) of 2/3 of them, sorted by item."""
    ps = synthetic_scores(items, S, P, seed=seed, pool=32)
    item, path, score, n_v = ps.to_long()
    # 2/3 of the scored items start from item_paths; 50 unscored items are carried through
    start = np.concatenate([ps.items[np.arange(len(ps)) % 3 != 0], ps.items.max() + 1 + np.arange(50)])
    a0 = initial_assignment(len(start), J, P, seed=1)
    sc = pa.table({"item_id": item, "path": path, "score": score, "n_v": n_v,
                   "slot": np.full(len(item), -1, np.int32), "src": np.zeros(len(item), np.int32)})
    ip = pa.table({"item_id": np.repeat(start, J), "path": a0.ravel(), "score": np.zeros(a0.size),
                   "n_v": np.zeros(a0.size), "slot": np.tile(np.arange(J, dtype=np.int32), len(start)),
                   "src": np.ones(a0.size, np.int32)})
    both = pa.concat_tables([sc, ip])
    return both.take(np.argsort(both.column("item_id").to_numpy(), kind="stable"))


def _state(tbl: pa.Table, batch: int) -> dict:
    ctx = MStepContext(job="t", S=S, J=J, num_paths=P, alpha=0.0, power=1.0, block_size=256, extrapolate=True,
                       partitions=1, sources=(), cache=False)
    out = list(mstep_udf.build_state(iter(tbl.to_batches(max_chunksize=batch)), ctx, seed=0))
    assert len(out) == 1
    return out[0].to_pydict()


def test_streamed_state_equals_the_state_built_in_one_piece(monkeypatch):
    tbl = _rows()
    whole = _state(tbl, tbl.num_rows)
    monkeypatch.setattr(mstep_udf, "STREAM_ROWS", 1_000)      # ~25 chunks, cut between items
    streamed = _state(tbl, 333)                               # batches that split items
    assert streamed == whole
    items = np.frombuffer(whole["items"][0], np.int64)
    assert whole["n_scored"][0] == 3_000 and len(items) == 3_050 and (np.diff(items[:3_000]) > 0).all()


def test_state_build_refuses_rows_out_of_item_order():
    tbl = _rows(300)
    shuffled = tbl.take(np.random.default_rng(0).permutation(tbl.num_rows))
    with pytest.raises(RuntimeError, match="sorted by item_id"):
        _state(shuffled, 100)


def test_bucket_files_that_split_an_item_read_as_one_list(tmp_path):
    """A task that rolled its path_scores file mid-item: read_scores merges the item's two partial lists
    and gives what the rows read in one piece give (exploration paths included)."""
    import pyarrow.parquet as pq

    from dr_model.scores import PathScores
    from spark_udfs.mstep_files import read_scores

    K, D = 10, 3
    ps = synthetic_scores(300, S, K ** D, seed=3, pool=32)
    perm = np.random.default_rng(0).permutation(len(ps))              # a bucket's items are not in id order
    item, path, score, n_v = PathScores(ps.items[perm], ps.paths[perm], ps.scores[perm], ps.n_v[perm]).to_long()
    cuts = [0, 1_001, 1_603, len(item)]
    files = []
    for f, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        name = tmp_path / f"part-0000abcd-00000-0-{f:012x}.parquet"
        pq.write_table(pa.table({"item_id": item[lo:hi], "path": path[lo:hi], "score": score[lo:hi],
                                 "n_v": n_v[lo:hi]}), name)
        files.append(name.as_uri())
    assert sum(item[c - 1] == item[c] for c in cuts[1:-1]) == 2            # both cuts split an item
    ctx = MStepContext(job="t", S=S, J=J, num_paths=K ** D, alpha=0.0, power=1.0, block_size=256, extrapolate=True,
                       partitions=1, sources=tuple(files), cache=False, K=K, D=D, explore=2, buckets=1)
    got = read_scores(ctx, 0)
    want = ctx.candidates(PathScores.from_long(item, path, score, n_v, S))
    assert got.paths.shape == (300, S + 2)
    for f in ("items", "paths", "scores", "n_v"):
        assert np.array_equal(getattr(got, f), getattr(want, f)), f


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("batch_rows", [7, 1 << 17])
def test_bucket_files_in_item_order_are_read_one_at_a_time_into_the_cache(tmp_path, monkeypatch, cache, batch_rows):
    """Files holding their items in order (the scores job's, lists narrower than S), listed in any order:
    read one file at a time, in batches cut between items, straight into the result (the cache folder's
    memory-mapped files with `into`), the same lists as the general merge of every file."""
    import pyarrow.parquet as pq

    from dr_model.scores import PathScores
    from spark_udfs import mstep_cache, mstep_files

    K, D = 10, 3
    ps = synthetic_scores(300, S - 2, K ** D, seed=4, pool=32)         # 6 rows an item, S = 8 columns
    item, path, score, n_v = ps.to_long()
    files = []
    for f, (lo, hi) in enumerate(zip([0, 600, 1_200], [600, 1_200, len(item)])):
        name = tmp_path / f"part-0000abcd-00000-0-{f:012x}.parquet"
        pq.write_table(pa.table({"item_id": item[lo:hi], "path": path[lo:hi], "score": score[lo:hi],
                                 "n_v": n_v[lo:hi]}), name)
        files.append(name.as_uri())
    monkeypatch.setattr(mstep_cache, "_cache_root", lambda: str(tmp_path / "cache"))
    ctx = MStepContext(job="t", S=S, J=J, num_paths=K ** D, alpha=0.0, power=1.0, block_size=256, extrapolate=True,
                       partitions=1, sources=tuple(files[::-1]), cache=cache, K=K, D=D, explore=2, buckets=1)
    monkeypatch.setattr(mstep_files, "BATCH_ROWS", batch_rows)         # 7: batches end inside items
    general = []
    monkeypatch.setattr(mstep_files, "_read_any_order", lambda *a: general.append(1) or PathScores(
        np.zeros(0, np.int64), np.zeros((0, S + 2), np.int64), np.zeros((0, S + 2)), np.zeros(0)))
    into = mstep_cache.partition_dir(ctx, 0)
    got = mstep_files.read_scores(ctx, 0, into)
    assert not general                                                  # the in-order path read it
    want = ctx.candidates(PathScores.from_long(item, path, score, n_v, S))
    for f in ("items", "paths", "scores", "n_v"):
        assert np.array_equal(getattr(got, f), getattr(want, f)), f
    if cache:
        e = mstep_cache._store(ctx, 0, got.items, got, into)
        on_disk = mstep_cache._load_dir(e.dir, ("items", "paths", "scores", "n_v"))
        assert all(np.array_equal(on_disk[f], getattr(want, f)) for f in ("paths", "scores", "n_v"))
        assert not list((tmp_path / "cache" / "t").glob("*.tmp-*"))     # the temp folder was renamed


def test_find_slots_and_the_kernel_blocks_own_slots_find_each_assigned_path():
    """The state's slots (row-major lists) and the sweep's own slots (slot-major blocks): the column of
    each assigned path among its item's candidates, -1 where it is not one; int32 lists as the cache holds them."""
    from dr_model.mstep_kernel import _own_slots
    from spark_udfs.mstep_udf import find_slots

    rng = np.random.default_rng(7)
    paths = np.stack([rng.choice(500, S, replace=False) for _ in range(400)])
    paths[::5, S // 2:] = -1                                             # narrower lists: EMPTY slots
    assign = np.where(rng.random((400, J)) < 0.5, paths[np.arange(400)[:, None], rng.integers(0, S // 2, (400, J))],
                      rng.integers(500, 600, (400, J)))
    want = np.array([[next(iter(np.flatnonzero(paths[i] == a)), -1) for a in assign[i]] for i in range(len(paths))])
    assert (want >= 0).any() and (want == -1).any()
    assert np.array_equal(_own_slots(np.ascontiguousarray(paths.T), assign), want)
    assert np.array_equal(find_slots(paths, assign), want)
    assert np.array_equal(find_slots(paths.astype(np.int32), assign), want)
