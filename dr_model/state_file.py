"""Open a saved `state.pt` (tensors only) for inference: memory-mapped where it is a local or mounted file.

torch.load(mmap=True) makes every tensor a view of the file, so a reader pays only for the
pages it touches and every process of a host shares them (a catalog-sized item table is read,
not copied, by each Spark Python worker). A remote URI (s3://, gs://, hdfs://) is streamed.
"""
from __future__ import annotations

import os
from typing import Any


def local_path(uri: str) -> str:
    """file:// URIs -> plain paths (anything else unchanged)."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def checkpoint_state(checkpoint: str) -> str:
    """A checkpoint folder (path or URI) -> its state.pt, a plain path when it is local."""
    return f"{local_path(checkpoint).rstrip('/')}/state.pt"


def open_state(state_file: str) -> dict[str, Any]:
    """A state.pt (path or URI) -> its dict of tensors, memory-mapped when the file is local."""
    import torch

    path = local_path(state_file)
    if os.path.isfile(path):
        return torch.load(path, mmap=True, weights_only=True)
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(state_file)
    with fs.open_input_file(p) as f:               # seekable: torch.load reads it in place
        return torch.load(f, weights_only=True)


def save_state(f: Any, model_state: dict[str, Any], item_ids: Any) -> None:
    """Write the state.pt layout to an open binary file: {"model": state_dict (detached, CPU), "item_ids": [V] int64}."""
    import numpy as np
    import torch

    torch.save({"model": {k: v.detach().cpu() for k, v in model_state.items()},
                "item_ids": torch.from_numpy(np.array(item_ids, dtype=np.int64))}, f)   # a writable copy


def file_stamp(state_file: str) -> str:
    """'size:mtime_ns' of a file (path or URI): a rewritten file gets a new stamp."""
    import pyarrow.fs as pafs

    path = local_path(state_file)
    fs, p = (pafs.LocalFileSystem(), os.path.abspath(path)) if "://" not in path else pafs.FileSystem.from_uri(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"model state {state_file}: no such file")
    return f"{info.size}:{info.mtime_ns}"


__all__ = ["checkpoint_state", "open_state", "save_state", "file_stamp", "local_path"]
