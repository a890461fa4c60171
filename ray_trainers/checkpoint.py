"""E-step checkpoints under the warehouse, tied to the item_paths version they were trained against.

Layout: `<warehouse>/checkpoints/<run_id>/`
  estep-round-<r>/                 the round's finished E-step (what retrieval and the M-step use)
  estep-round-<r>.epoch-<e>/       in-progress state after e epochs of round r (finer resume; removed
                                   once the round is finished)
Each directory holds `state.pt` (tensors only: model and vocabulary item ids; loaded with
`torch.load(weights_only=True)`), `optimizer.pt` (the optimizer's state, read only to resume inside
a round: readers of the model never load it), in a partial checkpoint whose phase's best validation
epoch is an earlier one `best.pt` (that epoch's trainable parameters, dr_model.best_weights; read only
to resume) and `meta.json` (run, round, table versions, config + hash,
epoch counters, per-epoch losses). A directory is written under a hidden temporary name and
renamed into place, so a reader never sees half a checkpoint.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from dr_model.state_file import save_state

FORMAT = 2                      # 2: the reranker bias is a table (reranker.bias.weight), HybridAdam state
_NAME = re.compile(r"^estep-round-(\d+)(?:\.epoch-(\d+))?$")


class CheckpointMismatch(ValueError):
    """A checkpoint was asked to pair with a different item_paths/samples version or config."""


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything about a checkpoint except its tensors (stored as meta.json)."""

    run_id: str
    round: int
    item_paths_version: int
    samples_version: int
    config: dict[str, Any]
    config_hash: str
    epochs_done: int                # epochs of this round's schedule already trained
    epochs_total: int               # the schedule's most epochs (early stopping may end it sooner)
    num_items: int
    losses: list[dict[str, Any]] = field(default_factory=list)   # one row per trained epoch
    format: int = FORMAT
    created_at: float = 0.0
    finished: bool = False          # every phase of the round has ended
    dropped_samples: int = 0        # samples skipped: their target has no paths in item_paths

    @property
    def complete(self) -> bool:
        return self.finished or self.epochs_done >= self.epochs_total


@dataclass(frozen=True)
class EStepCheckpoint:
    """A loaded checkpoint: meta + model state, optimizer state (None unless asked for), item ids [V] (model index order)."""

    path: str
    meta: CheckpointMeta
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    item_ids: np.ndarray
    best_state: dict[str, torch.Tensor] | None = None   # the phase's best epoch's trainable parameters (resume only)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)


def run_dir(warehouse_root: str, run_id: str) -> str:
    """Checkpoint folder of one run under the warehouse root (a path or URI)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", run_id):
        raise ValueError(f"run_id {run_id!r}: use letters, digits, '_', '.', '-' only (it names a folder)")
    return f"{warehouse_root.rstrip('/')}/checkpoints/{run_id}"


def checkpoint_name(em_round: int, epochs_done: int | None = None) -> str:
    """Folder name: the round's final checkpoint, or its partial state after `epochs_done` epochs."""
    return f"estep-round-{em_round:04d}" + ("" if epochs_done is None else f".epoch-{epochs_done:04d}")


def _listing(root: str) -> list[tuple[int, int | None, str]]:
    """(round, epochs or None for final, path) of every complete checkpoint folder under a run dir."""
    fs, path = _fs(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    out = []
    for info in infos:
        m = _NAME.match(info.base_name)
        if info.type == pafs.FileType.Directory and m:
            out.append((int(m.group(1)), None if m.group(2) is None else int(m.group(2)), f"{root}/{info.base_name}"))
    return out


def final_checkpoint(root: str, em_round: int) -> str | None:
    """Path of round `em_round`'s finished E-step checkpoint, or None."""
    return next((p for r, e, p in _listing(root) if r == em_round and e is None), None)


def latest_partial(root: str, em_round: int) -> str | None:
    """The in-progress checkpoint of round `em_round` with the most epochs, or None."""
    parts = sorted((e, p) for r, e, p in _listing(root) if r == em_round and e is not None)
    return parts[-1][1] if parts else None


def previous_final(root: str, em_round: int) -> str | None:
    """The finished checkpoint of the latest round before `em_round` (warm start), or None."""
    done = sorted((r, p) for r, e, p in _listing(root) if r < em_round and e is None)
    return done[-1][1] if done else None


def save_checkpoint(root: str, meta: CheckpointMeta, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None, item_ids: np.ndarray,
                    best_state: dict[str, torch.Tensor] | None = None) -> str:
    """Write atomically (temp folder + rename); a final checkpoint removes the round's partial ones."""
    fs, base = _fs(root)
    name = checkpoint_name(meta.round, None if meta.complete else meta.epochs_done)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/.tmp-{name}-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    # Tensors and plain containers only, so loading works with weights_only=True; streamed to the
    # file (an in-memory copy would double the writer's peak memory for a catalog-sized model).
    with fs.open_output_stream(f"{tmp}/state.pt") as f:
        save_state(f, model_state, item_ids)
    if optimizer_state is not None:
        with fs.open_output_stream(f"{tmp}/optimizer.pt") as f:
            torch.save(optimizer_state, f)
    if best_state is not None:
        with fs.open_output_stream(f"{tmp}/best.pt") as f:
            torch.save(best_state, f)
    meta = CheckpointMeta(**{**asdict(meta), "created_at": time.time()})
    with fs.open_output_stream(f"{tmp}/meta.json") as f:
        f.write(json.dumps(asdict(meta), indent=1, sort_keys=True).encode())
    final = f"{base}/{name}"
    if fs.get_file_info(final).type == pafs.FileType.Directory:
        fs.delete_dir(final)        # a rerun of the same epoch (after a crash) replaces it
    fs.move(tmp, final)
    if meta.complete:
        for r, e, p in _listing(root):
            if r == meta.round and e is not None:
                _fs(p)[0].delete_dir(_fs(p)[1])
    else:
        for r, e, p in _listing(root):
            if r == meta.round and e is not None and e < meta.epochs_done:
                _fs(p)[0].delete_dir(_fs(p)[1])
    return f"{root}/{name}"


def read_meta(path: str) -> CheckpointMeta:
    """meta.json of a checkpoint folder."""
    fs, p = _fs(path)
    with fs.open_input_stream(f"{p}/meta.json") as f:
        data = json.loads(f.read())
    if data.get("format") != FORMAT:
        raise CheckpointMismatch(f"checkpoint {path}: format {data.get('format')} is not {FORMAT}")
    return CheckpointMeta(**data)


def check_pairing(meta: CheckpointMeta, path: str, item_paths_version: int | None,
                  samples_version: int | None = None, config_hash: str | None = None) -> None:
    """Refuse (CheckpointMismatch) a checkpoint trained against other table versions or another config."""
    if item_paths_version is not None and meta.item_paths_version != item_paths_version:
        raise CheckpointMismatch(
            f"checkpoint {path} was trained against item_paths version {meta.item_paths_version}, "
            f"not {item_paths_version}: a model only pairs with the paths it was trained against")
    if samples_version is not None and meta.samples_version != samples_version:
        raise CheckpointMismatch(f"checkpoint {path} was trained on samples_train version "
                                 f"{meta.samples_version}, not {samples_version}")
    if config_hash is not None and meta.config_hash != config_hash:
        raise CheckpointMismatch(f"checkpoint {path} has config hash {meta.config_hash}, not {config_hash}")


def checked_meta(path: str, item_paths_version: int | None, samples_version: int | None = None,
                 config_hash: str | None = None) -> CheckpointMeta:
    """meta.json of a checkpoint, refused (CheckpointMismatch) when it pairs with other versions or config."""
    meta = read_meta(path)
    check_pairing(meta, path, item_paths_version, samples_version, config_hash)
    return meta


def load_checkpoint(path: str, item_paths_version: int | None, samples_version: int | None = None,
                    config_hash: str | None = None, optimizer: bool = False) -> EStepCheckpoint:
    """Load and check pairing; item_paths_version=None only for a deliberate warm start. optimizer:
    also load the optimizer state and the best epoch's parameters (resuming a round; None where the
    checkpoint has none)."""
    meta = checked_meta(path, item_paths_version, samples_version, config_hash)
    fs, p = _fs(path)
    with fs.open_input_file(f"{p}/state.pt") as f:        # seekable: torch.load reads it in place
        state = torch.load(f, weights_only=True)
    opt, best = (_load_if_there(fs, f"{p}/optimizer.pt"), _load_if_there(fs, f"{p}/best.pt")) if optimizer else (None, None)
    return EStepCheckpoint(path, meta, state["model"], opt, state["item_ids"].numpy(), best)


def _load_if_there(fs: pafs.FileSystem, path: str) -> Any:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_file(path) as f:
        return torch.load(f, weights_only=True)
