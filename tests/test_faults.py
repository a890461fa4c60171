"""Faults injected at every commit point: each `dr` command killed (SIGKILL) after each commit it makes.

For ingest, train, candidates and cold items (real `dr` processes, real Spark, real Ray, Delta on
disk): attempt after attempt is killed right after its next commit (DR_FAULT, jobs/faults.py),
each attempt is checked to have moved exactly one table forward by exactly one version (every
other table at its previous version), and the attempt that is no longer killed completes the
run. The warehouse then holds what a run that was never killed wrote: every table's rows equal
(no row lost or doubled), and one `succeeded` ledger row per run. (`dr evaluate` commits no
table: its report is a file written last, rewritten whole by a rerun.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.tables import Warehouse, spec

pytestmark = pytest.mark.system

DR = [sys.executable, "-m", "jobs.cli"]
TRAIN = ["--ray-workers", "0", "--set", "train.em_rounds=1", "--set", "train.joint_epochs=1",
         "--set", "train.structure_epochs=1"]
# `dr train` writes a `started` ledger row on each attempt, before any table: killed after its
# second commit, an attempt commits that row and one table
COMMANDS = [
    ("ingest", ["ingest", "{events}", "--batch-id", "b1"], 1),
    ("train", ["train", "--run-id", "night-1", *TRAIN], 2),
    ("candidates", ["candidates", "--train-run-id", "night-1", "--top-n", "20"], 1),
    # cold items (catalog written by _catalog first): cold_item_paths, cold_item_vectors, path_index
    ("backfill", ["backfill", "cold-items", "--run-id", "night-1"], 1),
]
# the ledger records attempts; every other table must come out as in the clean run
LEDGER = "runs"
VOLATILE = ["run_date", "source"]     # the day a job ran, the input path


def _events(path: Path) -> Path:
    """1,200 users x 15 events over 300 items in 10 planted clusters."""
    rng = np.random.default_rng(0)
    users, items, events, clusters = 1200, 300, 15, 10
    cl = rng.integers(0, clusters, users)
    item = (cl[:, None] * (items // clusters) + rng.zipf(1.3, (users, events)) % (items // clusters)).ravel()
    pd.DataFrame({"user_id": np.repeat(np.arange(users), events), "item_id": item,
                  "ts": 1_700_000_000 + np.arange(users * events) * 60, "rating": 5.0}).to_parquet(path, index=False)
    return path


def _catalog(wh: Warehouse) -> None:
    """The 300 event items in their planted clusters' categories, plus 30 items without events (cold; 3 uncategorised)."""
    from jobs.tables import CommitMeta

    ids = np.arange(330)
    cat = np.array([f"cluster-{i // 30 % 10}" for i in ids], dtype=object)
    cat[[300, 301, 302]] = None
    wh.write_arrow("items", pd.DataFrame({"item_id": ids, "title": None, "category": cat}), CommitMeta("test", "catalog"))


def _dr(args: list[str], warehouse: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DR_FAULT", None)
    if fault:
        env["DR_FAULT"] = fault
    return subprocess.run([*DR, *args, "--warehouse", str(warehouse)], env=env, capture_output=True, text=True,
                          timeout=900)


def _versions(wh: Warehouse) -> dict[str, int]:
    root = Path(wh.root)
    return {p.name: wh.version(p.name) for p in sorted(root.iterdir()) if (p / "_delta_log").is_dir()}


def _rows(wh: Warehouse, table: str) -> pd.DataFrame:
    df = wh.read_arrow(table).to_pandas()
    cols = [c for c in df.columns if df[c].map(lambda v: not isinstance(v, (list, np.ndarray, dict))).all()]
    return df[cols].sort_values(cols).reset_index(drop=True)


@pytest.fixture(scope="module")
def warehouses(tmp_path_factory):
    """(clean warehouse, fault-injected warehouse, {command: killed attempts}) after the four commands."""
    base = tmp_path_factory.mktemp("faults")
    events = _events(base / "events.parquet")
    clean, faulty = base / "clean", base / "faulty"
    killed: dict[str, list[dict[str, int]]] = {}
    for name, args, n in COMMANDS:
        args = [a.format(events=events) for a in args]
        if name == "backfill":
            _catalog(Warehouse(clean))
            _catalog(Warehouse(faulty))
        ok = _dr(args, clean, None)
        assert ok.returncode == 0, ok.stderr[-3000:]
        killed[name] = []
        for attempt in range(40):
            before = _versions(Warehouse(faulty)) if faulty.exists() else {}
            res = _dr(args, faulty, f"{name}:{n}:after")
            if res.returncode == 0:
                break
            assert res.returncode == -9, f"dr {name} attempt {attempt}: rc {res.returncode}\n{res.stderr[-3000:]}"
            assert f"killing `dr {name}` after its commit #{n}" in res.stderr
            after = _versions(Warehouse(faulty))
            killed[name].append({t: v - before.get(t, -1) for t, v in after.items() if v != before.get(t)})
        else:
            pytest.fail(f"dr {name} never completed under faults")
    return Warehouse(clean), Warehouse(faulty), killed


def test_each_killed_attempt_moved_one_table_by_one_version(warehouses):
    _, _, killed = warehouses
    for name, attempts in killed.items():
        assert attempts, f"dr {name}: no commit was ever killed"
        for i, moved in enumerate(attempts):
            data = {t: d for t, d in moved.items() if t != LEDGER}
            last_train = name == "train" and i == len(attempts) - 1
            # a run's last commit is its `succeeded` ledger row: that attempt moved the ledger only
            assert (moved == {LEDGER: 2}) if last_train else list(data.values()) == [1], \
                f"dr {name}: attempt {i}, killed after one commit, moved {moved}"
    # every commit of train was a kill point: as many killed attempts as tables it commits
    assert len(killed["train"]) >= 8
    # cold items commit cold_item_paths, cold_item_vectors and a path_index: one killed attempt each
    assert [set(m) for m in killed["backfill"]] == [{"cold_item_paths"}, {"cold_item_vectors"}, {"path_index"}]


def test_completed_runs_equal_the_never_killed_run(warehouses):
    clean, faulty, _ = warehouses
    tables = _versions(clean)
    assert set(tables) == set(_versions(faulty))
    for table in tables:
        if table == LEDGER:
            continue
        a, b = _rows(clean, table), _rows(faulty, table)
        assert len(a) == len(b), f"{table}: {len(b)} rows after the faults, {len(a)} in the clean run"
        key = list(spec(table).key)
        if key:
            assert not b.duplicated(key).any(), f"{table}: a key written twice"
        pd.testing.assert_frame_equal(a.drop(columns=VOLATILE, errors="ignore"),
                                      b.drop(columns=VOLATILE, errors="ignore"), check_exact=False, rtol=1e-4, obj=table)


def test_one_succeeded_train_run_in_the_ledger(warehouses):
    _, faulty, killed = warehouses
    ledger = faulty.read_arrow(LEDGER).to_pandas()
    train = ledger[(ledger.job == "train") & (ledger.run_id == "night-1")]
    assert (train.status == "succeeded").sum() == 1
    # one per killed attempt; the attempt that was not killed found the run succeeded and wrote nothing
    assert (train.status == "started").sum() == len(killed["train"])
