"""Item vocabulary: raw item ids <-> model indices 0..V-1 (V is the sequence pad index)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Vocab:
    """Raw item ids [V] (sorted) <-> model indices 0..V-1; V is the sequence pad index."""

    ids: np.ndarray

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def index(self, raw: np.ndarray) -> np.ndarray:
        """raw ids [...] -> indices [...] (-1 for ids not in the vocabulary)."""
        raw = np.asarray(raw, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, raw), self.size - 1)
        return np.where(self.ids[pos] == raw, pos, -1)

    def raw(self, idx: np.ndarray) -> np.ndarray:
        """Model indices [...] (-1 = nothing) -> raw ids [...] (-1 kept)."""
        return np.where(idx >= 0, self.ids[np.maximum(idx, 0)], -1)

    def seq(self, hist: np.ndarray) -> torch.Tensor:
        """Histories of raw ids [N, L] (-1 pad) -> model input [N, L] with unknown/pad -> V."""
        idx = self.index(hist)
        return torch.from_numpy(np.where(idx < 0, self.size, idx))
