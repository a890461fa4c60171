"""Where a Spark task reads the structure model from: a checkpoint's state.pt, named in the task, not broadcast.

A broadcast made the driver hold the model twice (its state and its bytes) and every
executor's block manager once more, each model.item_rows rows deep. A ModelSource is a file
name and a config (a few hundred bytes in the task's closure); each Python worker opens the
file once (dr_model.state_file: memory-mapped where the file is local or mounted, so a host's
workers share its pages) and keeps the latest model. The file must be readable by every
executor: the warehouse's checkpoints folder is (DESIGN.md §8), as cold items already rely on.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from dr_model.config import ModelConfig

_MODELS: dict[str, Any] = {}          # source key -> (DRModel, Vocab), one per Python worker


@dataclass(frozen=True)
class ModelSource:
    """A structure model on disk: its state.pt (path or URI), its ModelConfig fields, a key that follows both."""

    state_file: str
    model: dict[str, Any]
    key: str

    @classmethod
    def of(cls, state_file: str, model_cfg: ModelConfig) -> "ModelSource":
        """A state.pt (dr_model.state_file layout) read with `model_cfg`."""
        from dr_model.state_file import file_stamp

        cfg = asdict(model_cfg)
        stamp = f"{state_file}|{file_stamp(state_file)}|{sorted(cfg.items())}"
        return cls(state_file, cfg, hashlib.sha256(stamp.encode()).hexdigest()[:20])

    @classmethod
    def from_checkpoint(cls, checkpoint: str, model_cfg: ModelConfig) -> "ModelSource":
        """An E-step checkpoint folder (ray_trainers.checkpoint layout)."""
        from dr_model.state_file import checkpoint_state

        return cls.of(checkpoint_state(checkpoint), model_cfg)

    @classmethod
    def from_model(cls, model: Any, vocab: Any, folder: str) -> "ModelSource":
        """A DRModel and its Vocab, saved as `folder`/state.pt first (tests, benchmarks)."""
        import os

        from dr_model.state_file import save_state

        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "state.pt")
        with open(path, "wb") as f:
            save_state(f, model.state_dict(), vocab.ids)
        return cls.of(path, model.cfg)


def load_model(src: ModelSource) -> tuple[Any, Any]:
    """(DRModel in eval mode, Vocab) of a source, opened once per Python worker (the latest one kept)."""
    hit = _MODELS.get(src.key)
    if hit is not None:
        return hit
    import numpy as np
    import torch

    from dr_model.model import DRModel
    from dr_model.state_file import open_state
    from dr_model.trainer import Vocab

    state = open_state(src.state_file)
    vocab = Vocab(np.asarray(state["item_ids"].numpy(), dtype=np.int64))
    with torch.device("meta"):              # no fresh V-row tables: the file's tensors are assigned
        model = DRModel(ModelConfig(**src.model), vocab.size)
    model.load_state_dict(state["model"], assign=True)
    model.eval()
    _MODELS.clear()               # keep one model per worker: a new round's model replaces the old
    _MODELS[src.key] = (model, vocab)
    return model, vocab


__all__ = ["ModelSource", "load_model"]
