"""Early stopping keeps the best epoch: a phase ends with the weights of its best validation epoch.

A phase stops `patience` epochs after its best (dr_model.schedule); without this it would end with
the last of those epochs' weights, which validation already judged worse. The snapshot holds the
phase's trainable parameters only (a frozen tower does not move), so it costs one copy of them:
bounded by the item-row budget (train.item_rows), never by the catalog.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def best_epoch(rows: Sequence[dict[str, Any]]) -> int | None:
    """Index of the phase's first epoch with the highest validation recall (None: no figure yet)."""
    vals = [(r.get("valid_recall"), i) for i, r in enumerate(rows) if r.get("valid_recall") is not None]
    if not vals:
        return None
    top = max(v for v, _ in vals)
    return next(i for v, i in vals if v == top)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters that train in the current phase (requires_grad), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class BestWeights:
    """Follows one phase's epochs; `restore` puts the best epoch's parameters back when the phase ends."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None, epoch: int | None = None):
        self.state, self.epoch = state, epoch

    def after_epoch(self, model: nn.Module, rows: Sequence[dict[str, Any]]) -> None:
        """Call after appending an epoch's row to the phase's rows: a new best is copied."""
        best = best_epoch(rows)
        if best is not None and best == len(rows) - 1 and best != self.epoch:
            self.state, self.epoch = trainable_state(model), best

    def pending(self, rows: Sequence[dict[str, Any]]) -> bool:
        """Is the best epoch an earlier one than the model's current (last) epoch?"""
        return self.state is not None and self.epoch is not None and self.epoch != len(rows) - 1

    @torch.no_grad()
    def restore(self, model: nn.Module, rows: Sequence[dict[str, Any]]) -> int | None:
        """Load the best epoch's parameters if it is not the last one -> its index (None: nothing to do)."""
        if not self.pending(rows):
            return None
        params = dict(model.named_parameters())
        for n, t in self.state.items():
            params[n].copy_(t)
        epoch, self.state, self.epoch = self.epoch, None, None
        return epoch


def kept_note(rows: Sequence[dict[str, Any]], epoch: int) -> str:
    """The log's words for a phase that ended with an earlier epoch's weights."""
    return f"keeping epoch {epoch + 1}'s weights (validation recall {rows[epoch]['valid_recall']:.4f})"


__all__ = ["BestWeights", "best_epoch", "kept_note", "trainable_state"]
