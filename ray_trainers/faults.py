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
import re
import time
from typing import Callable

ENV = "DR_ESTEP_HOLD"
HOLD_LINE = "holding the epoch"


def hold_target() -> tuple[int, int, float] | None:
    """(round, epoch, seconds) from DR_ESTEP_HOLD, read on the driver; None when unset."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    m = re.fullmatch(r"(\d+):(\d+)(?::(\d+(?:\.\d*)?))?", raw)
    if m is None or int(m[2]) < 1 or (m[3] is not None and float(m[3]) <= 0):
        raise ValueError(f"{ENV}={raw!r}: expected <round>:<epoch>[:<seconds>] with round >= 0, epoch >= 1, "
                         f"seconds > 0, e.g. 0:3:60")
    return int(m[1]), int(m[2]), 60.0 if m[3] is None else float(m[3])


def maybe_hold(target: tuple[int, int, float] | None, em_round: int, epoch: int, rank: int,
               log: Callable[[str], None]) -> None:
    """Pause this worker if `target` names this round and 1-based epoch."""
    if target is None or (target[0], target[1]) != (em_round, epoch):
        return
    if rank == 0:
        log(f"[estep] round {em_round} epoch {epoch}: {HOLD_LINE} for {target[2]:.0f}s ({ENV})")
    time.sleep(target[2])
