"""Deliberate faults: DR_FAULT=<command>:<n>[:before|after] kills this process at its n-th commit.

Every table write of every job goes through Warehouse.commit / Warehouse.merge, which call
`at_commit` just before and just after the Delta transaction. The hook counts the commits this
process actually makes (a rerun's skipped, already-committed writes do not count) and, at the
n-th, sends itself SIGKILL: no `finally`, no atexit, no flush, as when a node is lost. `before`
(the default) dies with the commit's data files staged but not committed; `after` dies with the
commit landed and nothing that follows it. <command> is the `dr` subcommand (`train`, `ingest`,
...) or `*`. Used by tests/test_faults.py; harmless when unset.
"""
from __future__ import annotations

import os
import signal
import sys

ENV = "DR_FAULT"
_command = "*"
_made = 0


def set_command(name: str) -> None:
    """The `dr` subcommand this process runs (what DR_FAULT's first field names)."""
    global _command
    _command = name


def _target() -> tuple[int, str] | None:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1 or \
            (len(parts) == 3 and parts[2] not in ("before", "after")):
        raise ValueError(f"{ENV}={raw!r}: expected <command>:<n>[:before|after] with n >= 1, e.g. train:3:after")
    if parts[0] not in ("*", _command):
        return None
    return int(parts[1]), parts[2] if len(parts) == 3 else "before"


def at_commit(table: str, when: str) -> None:
    """Called by the warehouse around each commit it makes (`when` is 'before' or 'after')."""
    global _made
    target = _target()
    if target is None:
        return
    if when == "before":
        _made += 1
    n, point = target
    if _made == n and point == when:
        print(f"{ENV}: killing `dr {_command}` {when} its commit #{n} (table {table})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
