"""The E-step schedule: which phases a round trains, and when the validation users end a phase.

The paper's shape (joint, then the reranker frozen) with lengths picked by the data:
EM round 0 trains the reranker (jointly with the structure model when the initial paths
are random) and rounds 1..R train the structure model alone against the round's paths.
`epochs` of a phase is an upper bound: the phase stops once the validation users' recall@k
has not improved by more than `min_delta` (relative) for `patience` epochs. Everything here
is a pure function of the per-epoch history rows, so a resumed run takes the same decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .config import DRConfig

FINAL = "final"


@dataclass(frozen=True)
class Phase:
    """One stretch of the E-step: at most `epochs` epochs of the towers it trains, its own seed."""

    name: str
    epochs: int
    train_reranker: bool
    train_structure: bool
    seed: int


def schedule(cfg: DRConfig, em_round: int) -> list[Phase]:
    """Phases of EM round `em_round` (0: the reranker's round; >= 1: the structure model's)."""
    tc = cfg.train
    if em_round == 0:
        return [Phase("joint", tc.joint_epochs, True, tc.init_paths == "random", tc.seed * 1000)]
    return [Phase("structure", tc.structure_epochs, False, True, tc.seed * 1000 + em_round + 500)]


def should_stop(metrics: Sequence[float | None], patience: int, min_delta: float) -> bool:
    """True once none of the last `patience` epochs beat the best epoch before them by more than
    min_delta relative to its size (higher is better)."""
    vals = [m for m in metrics if m is not None]
    if patience <= 0 or len(vals) <= patience:
        return False
    best_before = max(vals[:-patience])
    return max(vals[-patience:]) <= best_before + min_delta * abs(best_before)


def phase_finished(rows: Sequence[dict[str, Any]], phase: Phase, patience: int, min_delta: float) -> bool:
    """Has a phase ended, given its history rows (one per trained epoch, with `valid_recall`)?"""
    return len(rows) >= phase.epochs or should_stop([r.get("valid_recall") for r in rows], patience, min_delta)


def remaining(phases: Sequence[Phase], history: Sequence[dict[str, Any]], patience: int,
              min_delta: float) -> list[tuple[int, Phase, int]]:
    """(phase index, phase, next epoch in phase) of every phase not finished yet, from the history rows
    (each with `phase_index`); the epochs to come depend on validation, so only the next one is known."""
    out = []
    for i, ph in enumerate(phases):
        rows = [r for r in history if r.get("phase_index") == i]
        if not phase_finished(rows, ph, patience, min_delta):
            out.append((i, ph, len(rows)))
    return out


__all__ = ["Phase", "schedule", "should_stop", "phase_finished", "remaining", "FINAL"]
