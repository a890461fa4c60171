"""A deliberate pause inside the E-step: DR_ESTEP_HOLD=<round>:<epoch>[:<seconds>].

A test that kills a Ray node "mid-epoch" needs the epoch to still be running when the kill
lands; on a small dataset an epoch lasts well under a second, shorter than Ray's log forwarding.
With the variable set on the driver (`dr train`), every worker of E-step round <round> pauses
<seconds> (default 60) right after the first step of epoch <epoch> (1-based), once per run: a
worker group resumed from a checkpoint does not pause again. Rank 0 logs HOLD_LINE when the
pause starts. Used by tests/test_cluster.py; harmless when unset.
"""
from __future__ import annotations

import os
import time
from typing import Callable

ENV = "DR_ESTEP_HOLD"
HOLD_LINE = "holding the epoch"


def hold_target() -> tuple[int, int, float] | None:
    """(round, epoch, seconds) from DR_ESTEP_HOLD, read on the driver; None when unset."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    parts = raw.split(":")
    try:
        rnd, epoch = int(parts[0]), int(parts[1])
        seconds = float(parts[2]) if len(parts) == 3 else 60.0
    except (ValueError, IndexError):
        rnd, epoch, seconds = -1, 0, 0.0
    if len(parts) not in (2, 3) or rnd < 0 or epoch < 1 or seconds <= 0:
        raise ValueError(f"{ENV}={raw!r}: expected <round>:<epoch>[:<seconds>] with round >= 0, epoch >= 1, "
                         f"seconds > 0, e.g. 0:3:60")
    return rnd, epoch, seconds


def maybe_hold(target: tuple[int, int, float] | None, em_round: int, epoch: int, rank: int,
               log: Callable[[str], None]) -> None:
    """Pause this worker if `target` names this round and 1-based epoch."""
    if target is None or (target[0], target[1]) != (em_round, epoch):
        return
    if rank == 0:
        log(f"[estep] round {em_round} epoch {epoch}: {HOLD_LINE} for {target[2]:.0f}s ({ENV})")
    time.sleep(target[2])
