"""Warm start across vocabularies: last night's model state -> tonight's model over a grown (or aged) item set.

Item-indexed tensors (exact item tables: encoder inputs with their pad row, reranker vectors
and biases) keep the rows of the items both vocabularies hold, at their new indices; new
items keep the fresh model's initial rows. Every other tensor (structure model, encoder
MLPs/GRUs, budgeted SplitTable parts, whose rows are shared by construction) is copied when
its shape is unchanged. A SplitTable's id -> exact-row map is rebuilt from tonight's counts.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .item_table import keep_frequent_exact


def index_map(old_ids: np.ndarray, new_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted raw ids old [V0], new [V1] -> (new indices [n], old indices [n]) of the items in both."""
    pos = np.searchsorted(old_ids, new_ids)
    pos_c = np.minimum(pos, max(len(old_ids) - 1, 0))
    hit = (pos < len(old_ids)) & (old_ids[pos_c] == new_ids) if len(old_ids) else np.zeros(len(new_ids), bool)
    return np.flatnonzero(hit), pos_c[hit]


def _item_indexed(name: str) -> bool:
    """An exact item table's weight (rows = items, + the pad row for encoder inputs)."""
    return not name.startswith("structure.") and name.endswith(("emb.weight", "bias.weight"))


def grow_state(model: nn.Module, old_state: dict[str, torch.Tensor], old_ids: np.ndarray, new_ids: np.ndarray,
               counts: torch.Tensor | None = None) -> dict[str, int]:
    """Load `old_state` (trained over old_ids [V0]) into `model` (built over new_ids [V1]) in place -> counts of
    tensors {copied, remapped, fresh}."""
    V0, V1 = len(old_ids), len(new_ids)
    new_idx, old_idx = (torch.from_numpy(a).long() for a in index_map(old_ids, new_ids))
    state = model.state_dict()
    done = {"copied": 0, "remapped": 0, "fresh": 0}
    for name, cur in state.items():
        old = old_state.get(name)
        if old is None:
            done["fresh"] += 1
            continue
        if name.endswith(".slot"):                      # SplitTable id -> exact row: rebuilt below
            continue
        if _item_indexed(name) and old.shape[1:] == cur.shape[1:] and (old.shape[0], cur.shape[0]) in ((V0, V1), (V0 + 1, V1 + 1)):
            rows = cur.clone()
            rows[new_idx] = old[old_idx].to(rows.dtype)
            if old.shape[0] == V0 + 1:                  # the pad row (index V) moves with V
                rows[V1] = old[V0]
            state[name] = rows
            done["remapped"] += 1
        elif old.shape == cur.shape:
            state[name] = old.clone()
            done["copied"] += 1
        else:
            done["fresh"] += 1
    model.load_state_dict(state)
    if counts is not None:
        keep_frequent_exact(model, counts)
    return done


__all__ = ["index_map", "grow_state"]
