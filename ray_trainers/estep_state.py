"""Where a worker's round starts (resume, warm start) and what its checkpoints hold (model, optimizer, best epoch)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dr_model.best_weights import BestWeights, best_epoch, trainable_state
from dr_model.config import DRConfig
from dr_model.model import DRModel
from dr_model.optim import HybridAdam

from .checkpoint import (CheckpointMeta, CheckpointMismatch, check_pairing, latest_partial, previous_final, read_meta,
                         save_checkpoint)


def resolve_start(root: str, em_round: int, c: dict[str, Any]) -> tuple[str | None, str | None]:
    """(checkpoint to resume this round from, or to warm-start from) — checked for pairing."""
    part = latest_partial(root, em_round)
    if part is not None:
        meta = read_meta(part)
        check_pairing(meta, part, c["item_paths_version"], c["samples_version"], c["config_hash"])
        total = sum(p["epochs"] for p in c["phases"])
        if meta.epochs_total != total:
            raise CheckpointMismatch(f"checkpoint {part} belongs to a {meta.epochs_total}-epoch schedule, "
                                     f"this run asks for {total} epochs")
        return part, None
    return None, previous_final(root, em_round) or c.get("warm_from")


def phase_rows(history: list[dict[str, Any]], phase_index: int) -> list[dict[str, Any]]:
    """The history rows of one phase of the round."""
    return [h for h in history if h.get("phase_index") == phase_index]


def resumed_best(model: DRModel, rows: list[dict[str, Any]], saved: dict[str, torch.Tensor] | None) -> BestWeights:
    """The phase's best epoch on resuming inside it: the loaded weights when it was the last epoch, else best.pt."""
    b = best_epoch(rows)
    if b is None:
        return BestWeights()
    if b == len(rows) - 1:
        return BestWeights(trainable_state(model), b)
    return BestWeights(saved, b) if saved is not None else BestWeights()


def save_progress(c: dict[str, Any], cfg: DRConfig, model: DRModel, opt: HybridAdam, item_ids: np.ndarray,
                  epochs_done: int, total: int, history: list[dict[str, Any]], finished: bool, best: BestWeights,
                  rows: list[dict[str, Any]]) -> str:
    """Rank 0's checkpoint after an epoch (rows: the current phase's history rows) -> its path."""
    meta = CheckpointMeta(run_id=c["run_id"], round=c["round"], item_paths_version=c["item_paths_version"],
                          samples_version=c["samples_version"], config=cfg.to_dict(), config_hash=c["config_hash"],
                          epochs_done=epochs_done, epochs_total=total, num_items=len(item_ids), losses=history,
                          finished=finished, dropped_samples=c.get("dropped", 0))
    return save_checkpoint(c["root"], meta, model.state_dict(), opt.state_dict(), item_ids,
                           best.state if best.pending(rows) else None)


__all__ = ["phase_rows", "resolve_start", "resumed_best", "save_progress"]
