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
