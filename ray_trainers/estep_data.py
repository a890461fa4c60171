"""What an E-step worker reads: a pinned item_paths version, samples_train as Ray Data, batches.

Workers read the `item_paths` files themselves, batch by batch, into the model's vocabulary and
path table [V, J] (8 (J + 1) bytes per item); `samples_train` streams through Ray Data; the
training pairs per item are a Ray Data aggregation. ray_trainers.estep trains on what these return.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import torch

from dr_model.split import csr_segments
from dr_model.trainer import Vocab


class Tables(Protocol):
    """What the E-step needs of a warehouse (jobs.tables.Warehouse): its root, a version's data files and rows."""

    root: Any

    def files(self, table: str, version: int | None = None) -> list[str]: ...

    def rows(self, table: str, version: int | None = None) -> int: ...




def read_item_paths(files: list[str], J: int, what: str = "item_paths") -> tuple[np.ndarray, np.ndarray]:
    """The data files of one item_paths version -> (item ids [V] sorted, paths [V, J] int64).

    Two streaming passes over record batches (the ids of slot 0, then every row into place), so
    the transient memory is a batch, not the table: the result's 8 (J + 1) bytes per item are
    what a worker keeps.
    """
    data = pds.dataset(files, format="parquet")
    first = [b.column("item_id").to_numpy() for b in data.to_batches(columns=["item_id"], filter=pc.field("slot") == 0)]
    ids = np.sort(np.concatenate(first)) if first else np.empty(0, dtype=np.int64)
    del first
    if len(ids) == 0:
        raise ValueError(f"{what} is empty")
    if (ids[1:] == ids[:-1]).any():
        raise ValueError(f"{what}: duplicate (item_id, slot) rows")
    assign = np.full((len(ids), J), -1, dtype=np.int64)
    per_item = np.zeros(len(ids), dtype=np.int64)
    for b in data.to_batches(columns=["item_id", "slot", "path"]):
        item, slot = b.column("item_id").to_numpy(), b.column("slot").to_numpy()
        pos = np.minimum(np.searchsorted(ids, item), len(ids) - 1)
        if (ids[pos] != item).any() or slot.min() < 0 or slot.max() >= J:
            raise ValueError(f"{what}: every item needs exactly J={J} slots 0..{J - 1} "
                             f"(item {int(item[(ids[pos] != item) | (slot < 0) | (slot >= J)][0])} breaks it)")
        assign[pos, slot] = b.column("path").to_numpy()
        per_item += np.bincount(pos, minlength=len(ids))
    if (per_item != J).any():
        raise ValueError(f"{what}: every item needs exactly J={J} slots 0..{J - 1} "
                         f"(found {int((per_item != J).sum())} items with another count)")
    if (assign < 0).any():
        raise ValueError(f"{what}: duplicate (item_id, slot) rows")
    return ids, assign


def item_paths_files(warehouse: Tables, version: int) -> list[str]:
    """The data files of an item_paths version (an error when it has none)."""
    files = warehouse.files("item_paths", version)
    if not files:
        raise ValueError(f"item_paths version {version} is empty")
    return files


def load_item_paths(warehouse: Tables, version: int, J: int) -> tuple[np.ndarray, np.ndarray]:
    """item_paths at a pinned version -> (item ids [V] sorted, paths [V, J] int64)."""
    return read_item_paths(item_paths_files(warehouse, version), J, f"item_paths version {version}")


def samples_dataset(warehouse: Tables, version: int, with_next: bool = False) -> Any:
    """samples_train at a pinned version as a Ray Dataset of (hist, target[, next]), read by Ray tasks."""
    import ray.data

    files = warehouse.files("samples_train", version)
    if not files:
        raise ValueError(f"samples_train version {version} has no data files")
    return ray.data.read_parquet(files).select_columns(["hist", "target"] + (["next"] if with_next else []))


def target_counts(ds: Any) -> Any:
    """Training pairs per target item: a Ray Data aggregation (target, count()) materialized in the object store."""
    return ds.select_columns(["target"]).groupby("target").count().materialize()


def count_vector(counts: Any, vocab: Vocab) -> tuple[np.ndarray, int]:
    """The aggregated (target, count()) rows -> (pairs per model index [V] int64, pairs whose target is in vocab)."""
    out = np.zeros(vocab.size, dtype=np.int64)
    for b in counts.iter_batches(batch_size=1 << 20, batch_format="numpy"):
        idx = vocab.index(b["target"])
        ok = idx >= 0
        out[idx[ok]] += b["count()"][ok]
    return out, int(out.sum())


def batch_tensors(batch: pa.Table, vocab: Vocab, L: int, width: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Arrow (hist list<int64> [n], target [n][, next list<int64> [n]]) -> (seq [m, L], target
    indices [m] (width 1) or [m, width] (the first `width` of `next`, -1 padded), dropped n-m)."""
    hist = batch.column("hist").combine_chunks()
    n = len(hist)
    if n == 0:
        empty_t = torch.empty((0,) if width == 1 else (0, width), dtype=torch.long)
        return torch.empty((0, L), dtype=torch.long), empty_t, 0
    lens = pc.list_value_length(hist)
    mm = pc.min_max(lens).as_py()
    if mm["min"] != mm["max"]:
        raise ValueError(f"samples_train.hist must be padded to one length, found {mm['min']}..{mm['max']}")
    h_width = int(mm["max"])
    h = hist.flatten().to_numpy().reshape(n, h_width)
    # Left padding keeps the most recent items last: cut or pad on the left.
    h = h[:, -L:] if h_width >= L else np.pad(h, ((0, 0), (L - h_width, 0)), constant_values=-1)
    t = vocab.index(batch.column("target").to_numpy())
    keep = t >= 0
    if width > 1:
        t = next_matrix(batch.column("next").combine_chunks(), vocab, width)
    return vocab.seq(h[keep]), torch.from_numpy(t[keep]), int(n - keep.sum())


def next_matrix(nxt: pa.ListArray, vocab: Vocab, width: int) -> np.ndarray:
    """list<int64> [n] raw ids -> [n, width] model indices of each list's first `width` (-1 pad)."""
    lens = np.asarray(pc.list_value_length(nxt).to_numpy(zero_copy_only=False), dtype=np.int64)
    flat = vocab.index(nxt.flatten().to_numpy(zero_copy_only=False))
    row = np.repeat(np.arange(len(lens)), lens)
    col = csr_segments(np.zeros(len(lens), dtype=np.int64), lens)     # position inside each list
    out = np.full((len(lens), width), -1, dtype=np.int64)
    ok = col < width
    out[row[ok], col[ok]] = flat[ok]
    return out


def read_shard(shard: Any, vocab: Vocab, L: int, prefetch: int, width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream this worker's shard once into memory -> (seq [n, L], target [n] or [n, width]) (model indices)."""
    seqs, tgts = [], []
    for b in shard.iter_batches(batch_size=65536, batch_format="pyarrow", prefetch_batches=prefetch):
        s, t, _ = batch_tensors(b, vocab, L, width)
        seqs.append(s)
        tgts.append(t)
    if not seqs:
        return torch.empty((0, L), dtype=torch.long), torch.empty((0,) if width == 1 else (0, width), dtype=torch.long)
    return torch.cat(seqs), torch.cat(tgts)


def shuffled_batches(seq: torch.Tensor, target: torch.Tensor, bs: int, seed: int):
    """A full shuffle of the cached shard per epoch (as the single-process loop): yields (seq [b, L], target [b])."""
    perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    for b in perm.split(bs):
        yield seq[b], target[b]


# --------------------------------------------------------------------------------------------
# Per-worker training loop
# --------------------------------------------------------------------------------------------


