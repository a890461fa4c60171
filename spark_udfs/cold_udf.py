"""Cold items, the per-partition side (`mapInArrow` bodies around dr_model.cold).

Reranker vectors are looked up where the items are: every Python worker opens the train run's
checkpoint once with torch.load(mmap=True), so its tensors are views of the file and a host's
workers share its pages (the reranker's tables, min(V + 1, model.item_rows) rows each plus 4
bytes per item of row map above that budget, and the vocabulary's 8 bytes per item); a task
holds one Arrow batch, or one partition of cold items for the path assignment. Category keys are
the category strings themselves (null: none), grouped per batch by dictionary encoding.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dr_model.cold import assign_cold, code_sums, cosine
from dr_model.config import ModelConfig, MStepConfig
from dr_model.scores import EMPTY

SUMS_DDL = "category string, items long, bias double, emb array<double>"
NEAR_DDL = "category string, sim double, item_id long"
PATHS_DDL = "item_id long, slot int, path long, method string, neighbor_item_id long"

_OPEN: dict[str, Any] = {}              # state file -> (Vocab, Reranker), one per Python worker


def _reranker(state_file: str, model: dict[str, Any]) -> Any:
    """(Vocab, Reranker) of a checkpoint's state.pt, opened once per Python worker (the latest one kept)."""
    got = _OPEN.get(state_file)
    if got is None:

        from dr_model.reranker import reranker_from_state
        from dr_model.state_file import open_state
        from dr_model.vocab import Vocab

        state = open_state(state_file)     # memory-mapped where local: a host's workers share the pages
        ids = state["item_ids"].numpy()
        got = (Vocab(ids), reranker_from_state(state["model"], ModelConfig(**model), len(ids), assign=True))
        _OPEN.clear()
        _OPEN[state_file] = got
    return got


def _vectors(ids: np.ndarray, state_file: str, model: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids [n] -> (reranker embeddings [n, d] float32, biases [n] float64); an id outside the model raises."""
    import torch

    vocab, rr = _reranker(state_file, model)
    rows = vocab.index(ids)
    if (rows < 0).any():
        raise ValueError(f"item {int(ids[rows < 0][0])} has paths but no row in checkpoint {state_file}: "
                         f"the checkpoint and item_paths disagree on the item set")
    with torch.inference_mode():
        emb, bias = rr.vectors(torch.from_numpy(rows))
    return emb.float().numpy(), bias.double().numpy()


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Strings [n] (null allowed) -> (codes [n] int64, -1 = null; the distinct strings by code)."""
    enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    return enc.indices.fill_null(-1).to_numpy().astype(np.int64), enc.dictionary


def _category(keys: np.ndarray, names: pa.Array) -> pa.Array:
    """Codes [g] (-1: null) -> the category strings [g]."""
    return pc.take(names, pa.array(np.where(keys >= 0, keys, 0), mask=keys < 0)) if len(names) else \
        pa.nulls(len(keys), pa.string())


def _doubles(x: np.ndarray) -> pa.Array:
    """[n, d] float64 -> list<double> [n]."""
    n, d = x.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d), pa.array(x.ravel()))


def _merge(parts: list[tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[pa.Array, np.ndarray,
                                                                                     np.ndarray, np.ndarray]:
    """Partial sums keyed by category string [(categories [g], items [g], bias sums [g], emb sums [g, d])] -> one
    partial sum per distinct category (null: one row)."""
    codes, dic = _codes(pa.concat_arrays([p[0] for p in parts]))
    keys, n, bs, es = code_sums(codes, np.concatenate([p[3] for p in parts]), np.concatenate([p[2] for p in parts]),
                                np.concatenate([p[1] for p in parts]))
    return _category(keys, dic), n, bs, es


def category_sum_batches(batches: Iterator[pa.RecordBatch], state_file: str,
                         model: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    """Assigned items (item_id, category) -> per category of the partition: items, bias sum, embedding sum.

    One row per category of the partition (null: the uncategorised items). Batches' sums are
    merged once they outnumber the merged ones, so a task holds O(G_p d) sums (G_p: the
    partition's categories) plus one batch.
    """
    parts: list[tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]] = []
    pending = merged = 0
    for b in batches:
        if not b.num_rows:
            continue
        emb, bias = _vectors(b.column("item_id").to_numpy(), state_file, model)
        codes, dic = _codes(b.column("category"))
        keys, n, bs, es = code_sums(codes, emb, bias)
        parts.append((_category(keys, dic), n, bs, es))
        pending += len(keys)
        if pending > max(merged, 1 << 14):
            parts = [_merge(parts)]
            pending, merged = 0, len(parts[0][1])
    if not parts:
        return
    cats, n, bs, es = _merge(parts)
    yield pa.RecordBatch.from_arrays([cats, pa.array(n), pa.array(bs), _doubles(es)],
                                     names=["category", "items", "bias", "emb"])


def nearest_batches(batches: Iterator[pa.RecordBatch], state_file: str,
                    model: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    """Assigned items with their category's mean (item_id, category, centroid) -> per category of the
    batch, its item nearest (cosine) the mean: (category, sim, item_id), ties to the smaller id."""
    for b in batches:
        if not b.num_rows:
            continue
        ids = b.column("item_id").to_numpy()
        emb, _ = _vectors(ids, state_file, model)
        cent = b.column("centroid")
        d = emb.shape[1]
        sim = cosine(emb, pc.list_flatten(cent).to_numpy().reshape(-1, d))
        codes, dic = _codes(b.column("category"))
        o = np.lexsort((ids, -sim, codes))                  # per category: most similar, then smallest id
        first = o[np.r_[True, codes[o][1:] != codes[o][:-1]]]
        yield pa.RecordBatch.from_arrays([_category(codes[first], dic), pa.array(sim[first]), pa.array(ids[first])],
                                         names=["category", "sim", "item_id"])


def _padded(col: pa.ChunkedArray, width: int, fill: Any, dtype: type) -> np.ndarray:
    """list column [n] (lists of <= width) -> [n, width] padded with `fill`."""
    arr = col.combine_chunks()
    lens = pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy().astype(dtype)
    out = np.full((len(arr), width), fill, dtype=dtype)
    rows = np.repeat(np.arange(len(arr)), lens)
    out[rows, np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)] = flat
    return out


def assign_batches(batches: Iterator[pa.RecordBatch], live_bc: Any, total: int, partitions: int, J: int, S: int,
                   alpha: float, mstep: MStepConfig) -> Iterator[pa.RecordBatch]:
    """One partition of cold items (item_id, cand_paths, cand_shares, method, neighbor_item_id), sorted by id
    -> one row per (item, slot) of its J paths.

    The partition's placements count round(total / items here) times (dr_model.cold.assign_cold's
    scale: the other, hash-alike partitions place their share alike), and its least-loaded fills
    start at its own 1/partitions of the path ids. live_bc: a broadcast of the live path sizes [P].
    """
    from pyspark import TaskContext

    got = [b for b in batches if b.num_rows]
    if not got:
        return
    t = pa.Table.from_batches(got)
    C = t.num_rows
    paths = assign_cold(_padded(t.column("cand_paths"), S, EMPTY, np.int64),
                        _padded(t.column("cand_shares"), S, 0.0, np.float64),
                        live_bc.value, J, alpha, mstep, scale=max(1, round(total / C)),
                        fill_offset=TaskContext.get().partitionId() * len(live_bc.value) // max(partitions, 1))
    rep = lambda name: pc.take(t.column(name), pa.array(np.repeat(np.arange(C), J)))  # noqa: E731
    yield pa.RecordBatch.from_arrays(
        [rep("item_id").combine_chunks(), pa.array(np.tile(np.arange(J, dtype=np.int32), C)), pa.array(paths.ravel()),
         rep("method").combine_chunks(), rep("neighbor_item_id").combine_chunks()],
        names=["item_id", "slot", "path", "method", "neighbor_item_id"])


__all__ = ["SUMS_DDL", "NEAR_DDL", "PATHS_DDL", "category_sum_batches", "nearest_batches", "assign_batches"]
