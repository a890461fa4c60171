"""The `runs` ledger: one appended row per state change of a job run (started, succeeded, failed).

The latest row of a (job, run_id) is its state. A succeeded train run names the table
versions and the checkpoint that belong together, so every later job (candidates,
evaluate, backfill) reads exactly those.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from .tables import CommitMeta, Warehouse


@dataclass(frozen=True)
class RunRecord:
    """One row of the ledger."""

    run_id: str
    job: str
    status: str
    ts: datetime
    config_hash: str | None = None
    table_versions: dict[str, int] = field(default_factory=dict)
    checkpoint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def record(wh: Warehouse, rec: RunRecord) -> int:
    """Append one ledger row in its own commit; returns the runs version."""
    row = pa.table({
        "run_id": [rec.run_id], "job": [rec.job], "status": [rec.status],
        "ts": pa.array([rec.ts], pa.timestamp("us", tz="UTC")),
        "config_hash": [rec.config_hash], "table_versions": [json.dumps(rec.table_versions, sort_keys=True)],
        "checkpoint": [rec.checkpoint], "metrics": [json.dumps(rec.metrics, sort_keys=True, default=float)],
    })
    # No watermark: a run may legitimately go started -> failed -> started -> succeeded.
    return wh.write_arrow("runs", row, CommitMeta(job=f"runs.{rec.job}", run_id=rec.run_id)).version


def now() -> datetime:
    return datetime.now(timezone.utc)


def history(wh: Warehouse, job: str | None = None) -> list[RunRecord]:
    """All ledger rows (optionally of one job), oldest first."""
    if not wh.exists("runs"):
        return []
    rows = wh.read_arrow("runs").to_pylist()
    out = [RunRecord(r["run_id"], r["job"], r["status"], r["ts"], r["config_hash"],
                     json.loads(r["table_versions"] or "{}"), r["checkpoint"], json.loads(r["metrics"] or "{}"))
           for r in rows if job is None or r["job"] == job]
    return sorted(out, key=lambda r: r.ts)


def latest(wh: Warehouse, job: str, run_id: str | None = None, status: str | None = None) -> RunRecord | None:
    """The newest row of `job` (of one run id, and/or with one status), or None."""
    rows = [r for r in history(wh, job) if (run_id is None or r.run_id == run_id)]
    if run_id is not None and rows:
        rows = [rows[-1]]                      # the state of that run is its last row
    rows = [r for r in rows if status is None or r.status == status]
    return rows[-1] if rows else None
