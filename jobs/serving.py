"""The serving bundle of a train run (dr_model.serving): built once per (run, path_index version), then mmapped.

Folder: `<warehouse>/serving/<train run id>/path_index-v<N>.f<format>/` (no Delta table owns it, so a
vacuum never deletes it). Written into a temporary folder and renamed, so a reader never sees
half a bundle and two jobs racing to build it both end with one complete copy.

Driver memory while building: the checkpoint's item ids (8 B/item) and row maps (4 B/item per
budgeted table), one reranker (O(model.item_rows) rows), O(P) path counts, and one batch of
path_index rows or item vectors at a time; everything catalog-sized is streamed into the
memory-mapped files. The path_index version read is the latest built for the run's item_paths
version, so cold items (jobs/cold_items.py) are in it once `dr backfill cold-items` has run.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from dr_model.config import DRConfig
from dr_model.reranker import reranker_from_state
from dr_model.serving import FORMAT, catalog_index, tower_state
from dr_model.vocab import Vocab

from . import runs
from .path_index import build_path_index, find_path_index
from .tables import Warehouse

CHUNK = 1 << 16          # item vectors written per step


def _log(msg: str) -> None:
    print(f"[serving] {msg}", file=sys.stderr, flush=True)


def bundle_dir(wh: Warehouse, run_id: str, path_index_version: int) -> Path:
    # the bundle format in the name: a bundle of an older format is rebuilt beside it, never misread
    return Path(wh.root) / "serving" / run_id / f"path_index-v{path_index_version}.f{FORMAT}"


def _cold_vectors(wh: Warehouse, ip_v: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [C] sorted, embeddings [C, dim] fp32, biases [C]) of the cold items given vectors for item_paths@ip_v."""
    got = []
    if wh.exists("cold_item_vectors"):
        got = [b for b in wh.batches("cold_item_vectors", columns=["item_id", "embedding", "bias"],
                                     filter=pads.field("item_paths_version") == ip_v) if b.num_rows]
    if not got:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.float32)
    tbl = pa.Table.from_batches(got)
    ids = tbl.column("item_id").to_numpy()
    order = np.argsort(ids)
    emb = tbl.column("embedding").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(len(ids), dim)
    return ids[order], emb[order], tbl.column("bias").to_numpy().astype(np.float32)[order]


def _write_path_index(wh: Warehouse, pi_v: int, num_paths: int, to_index: Callable[[np.ndarray], np.ndarray],
                      out: Path) -> tuple[int, int, int]:
    """path_index@pi_v -> path_keys/offsets/items .npy in `out` in two streaming passes -> (paths, rows, rows dropped)."""
    cols = ["path", "item_id"]
    counts = np.zeros(num_paths, dtype=np.int64)
    dropped = 0
    for b in wh.batches("path_index", pi_v, cols):
        path, idx = b.column(0).to_numpy(), to_index(b.column(1).to_numpy())
        dropped += int((idx < 0).sum())
        counts += np.bincount(path[idx >= 0], minlength=num_paths)
    keys = np.flatnonzero(counts)
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(counts[keys], out=offsets[1:])
    items = np.lib.format.open_memmap(out / "path_items.npy", "w+", np.int32, (int(offsets[-1]),))
    cursor = np.zeros(num_paths, dtype=np.int64)
    cursor[keys] = offsets[:-1]
    for b in wh.batches("path_index", pi_v, cols):
        path, idx = b.column(0).to_numpy(), to_index(b.column(1).to_numpy())
        path, idx = path[idx >= 0], idx[idx >= 0]
        order = np.argsort(path, kind="stable")
        path, idx = path[order], idx[order]
        first = np.searchsorted(path, path, side="left")         # rank of each row within its path in this batch
        items[cursor[path] + np.arange(len(path)) - first] = idx
        cursor += np.bincount(path, minlength=num_paths)
    items.flush()
    del items
    np.save(out / "path_keys.npy", keys)
    np.save(out / "path_offsets.npy", offsets)
    return len(keys), int(offsets[-1]), dropped


def _write_item_vectors(state: dict[str, torch.Tensor], cfg: DRConfig, V: int, cold_emb: np.ndarray,
                        cold_bias: np.ndarray, out: Path) -> None:
    """The reranker's item embeddings (fp16) and biases (fp32) of the model's V items, then the cold items'."""
    rr = reranker_from_state(state, cfg.model, V)
    C = len(cold_bias)
    vec = np.lib.format.open_memmap(out / "item_vec.npy", "w+", np.float16, (V + C, cfg.model.rerank_dim))
    bias = np.lib.format.open_memmap(out / "item_bias.npy", "w+", np.float32, (V + C,))
    for lo, emb, b in rr.chunks(CHUNK):
        vec[lo:lo + len(b)], bias[lo:lo + len(b)] = emb.numpy(), b.numpy()
    vec[V:], bias[V:] = cold_emb, cold_bias
    vec.flush()
    bias.flush()


def _write_path_vectors(out: Path) -> None:
    """item_vec/item_bias.npy (catalog order) -> path_vec/path_bias.npy in path_items order, in chunks; the former removed."""
    items = np.load(out / "path_items.npy", mmap_mode="r")
    vec, bias = np.load(out / "item_vec.npy", mmap_mode="r"), np.load(out / "item_bias.npy", mmap_mode="r")
    pvec = np.lib.format.open_memmap(out / "path_vec.npy", "w+", np.float16, (len(items), vec.shape[1]))
    pbias = np.lib.format.open_memmap(out / "path_bias.npy", "w+", np.float32, (len(items),))
    for lo in range(0, len(items), CHUNK):
        at = items[lo:lo + CHUNK]
        pvec[lo:lo + len(at)], pbias[lo:lo + len(at)] = vec[at], bias[at]
    pvec.flush()
    pbias.flush()
    del pvec, pbias, vec, bias, items
    (out / "item_vec.npy").unlink()
    (out / "item_bias.npy").unlink()


def ensure_bundle(spark: Any, wh: Warehouse, run: runs.RunRecord, log: Callable[[str], None] = _log) -> Path:
    """The serving bundle of a succeeded train run, built if missing -> its folder. spark None (inside a
    Spark task): the run's path_index must exist already."""
    from ray_trainers.checkpoint import load_checkpoint

    ip_v = run.table_versions["item_paths"]
    pi_v = find_path_index(wh, ip_v)
    if pi_v is None:
        if spark is None:
            raise RuntimeError(f"run {run.run_id}: no path_index for item_paths v{ip_v}; build it before the bundle")
        pi_v = build_path_index(spark, wh, ip_v, f"serving-{run.run_id}", log=log).version
    final = bundle_dir(wh, run.run_id, pi_v)
    if (final / "meta.json").exists():
        return final
    t0 = time.perf_counter()
    ck = load_checkpoint(run.checkpoint, ip_v)
    cfg = DRConfig.from_dict(ck.meta.config)
    V = len(ck.item_ids)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        cold_ids, cold_emb, cold_bias = _cold_vectors(wh, ip_v, cfg.model.rerank_dim)
        np.save(tmp / "model_ids.npy", ck.item_ids)
        np.save(tmp / "cold_ids.npy", cold_ids)
        torch.save(tower_state(ck.model_state), tmp / "towers.pt")
        _write_item_vectors(ck.model_state, cfg, V, cold_emb, cold_bias, tmp)
        model_vocab = Vocab(ck.item_ids)
        paths, rows, dropped = _write_path_index(wh, pi_v, cfg.model.num_paths,
                                                 lambda raw: catalog_index(model_vocab, cold_ids, raw), tmp)
        _write_path_vectors(tmp)
        meta = {"format": FORMAT, "train_run_id": run.run_id, "item_paths_version": ip_v,
                "path_index_version": pi_v, "model_items": V, "cold_items": len(cold_ids),
                "nonempty_paths": paths, "index_rows": rows, "index_rows_without_vector": dropped,
                "model": {k: getattr(cfg.model, k) for k in cfg.model.__dataclass_fields__}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():     # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"serving bundle for run {run.run_id} (path_index v{pi_v}): {V} items + {len(cold_ids)} cold, "
        f"{paths} paths, {rows} index rows" + (f", {dropped} rows without a vector left out" if dropped else "")
        + f" [{time.perf_counter() - t0:.1f}s] -> {final}")
    return final


def record_trained_model(spark: Any, wh: Warehouse, run_id: str, model: torch.nn.Module, item_ids: np.ndarray,
                         assign: np.ndarray, cfg: DRConfig, table_versions: dict[str, int] | None = None,
                         metrics: dict[str, Any] | None = None) -> runs.RunRecord:
    """Register a model trained outside `dr train` (one process: benchmarks, experiments) as a succeeded train run.

    item_ids [V] sorted raw ids, assign [V, J] its paths: commits item_paths and its path_index,
    saves the checkpoint paired with that item_paths version and records the run, so candidates,
    cold items and evaluation read it like any nightly run.
    """
    from jobs.tables import CommitMeta
    from ray_trainers.checkpoint import CheckpointMeta, checkpoint_name, run_dir, save_checkpoint

    V, J = assign.shape
    ip = pa.table({"item_id": np.repeat(item_ids, J), "slot": np.tile(np.arange(J, dtype=np.int32), V),
                   "path": assign.ravel().astype(np.int64), "score": pa.nulls(V * J, pa.float64())})
    ip_v = wh.write_arrow("item_paths", ip, CommitMeta("mstep", run_id), mode="overwrite").version
    build_path_index(spark, wh, ip_v, run_id, log=lambda m: None)
    meta = CheckpointMeta(run_id, 0, ip_v, -1, cfg.to_dict(), cfg.hash(), 1, 1, V, finished=True)
    ck = save_checkpoint(f"{run_dir(wh.root, run_id)}/{checkpoint_name(0)}", meta, model.state_dict(), None, item_ids)
    rec = runs.RunRecord(run_id, "train", "succeeded", runs.now(), cfg.hash(),
                         {**(table_versions or {}), "item_paths": ip_v}, ck, dict(metrics or {}))
    runs.record(wh, rec)
    return rec


__all__ = ["ensure_bundle", "bundle_dir", "record_trained_model"]
