"""The nightly DAG executed by Airflow itself: `airflow dags test` for two consecutive nights.

Airflow runs every task of ``deep_retrieval_nightly`` in process (no scheduler), each one a
real ``dr`` command of this project against one local warehouse: night 1 (2026-11-02) trains
in full, night 2 (2026-11-03) ingests the next day's drop and trains incrementally (the DAG's
``train_mode`` default, auto). Airflow lives in its own virtualenv (tests/test_airflow_dags.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from dr_model.synthetic import SyntheticSpec, generate
from jobs import runs
from jobs.tables import Warehouse

from test_airflow_dags import ROOT, ensure_airflow_venv

pytestmark = pytest.mark.system        # ~7.5 min of real `dr` processes: make system-test

NIGHTS = ("2026-11-02", "2026-11-03")


def _day(d: str) -> int:
    return int(datetime.fromisoformat(d).replace(tzinfo=timezone.utc).timestamp())


def _drops(base: Path) -> None:
    """incoming/dt=<night>/part.parquet: 30 days of history up to night 1, then night 2's events."""
    spec = SyntheticSpec(num_users=600, num_items=300, num_clusters=10, events_per_user=25, seed=1)
    ev = generate(spec).sort_values(["user_id", "ts"])
    rank = ev.groupby("user_id").cumcount().to_numpy()
    late = rank >= 0.8 * spec.events_per_user
    n_hist = int(np.ceil(0.8 * spec.events_per_user))
    # history one event every 1.5 days up to night 1 (its last event on night 1's day), the rest on night 2
    ev["ts"] = np.where(late, _day(NIGHTS[1]) + 3600 + rank * 60,
                        _day(NIGHTS[0]) + 3600 - ((n_hist - 1 - rank) * 1.5 * 86400).astype(np.int64))
    for night, part in zip(NIGHTS, (ev[~late], ev[late])):
        (base / f"dt={night}").mkdir(parents=True)
        part.to_parquet(base / f"dt={night}" / "part.parquet", index=False)


def _airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "orchestration"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}")
    return env


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """(warehouse, [(returncode, log tail)] per night) after `airflow dags test` of both nights."""
    python = ensure_airflow_venv()
    airflow = python.parent / "airflow"
    base = tmp_path_factory.mktemp("airflow_nights")
    _drops(base / "incoming")
    (base / "dr.toml").write_text("[train]\nem_rounds = 1\njoint_epochs = 3\nstructure_epochs = 2\n"
                                  "[incremental]\nepochs = 1\n[split]\ntest_users = 100\nvalid_users = 100\n")
    env = _airflow_env(base / "airflow")
    subprocess.run([str(airflow), "db", "migrate"], env=env, cwd=base, check=True, capture_output=True, timeout=300)
    conf = {"warehouse": str(base / "warehouse"), "config": str(base / "dr.toml"),
            "input_path": str(base / "incoming" / "dt={ds}"), "dr_bin": str(Path(sys.executable).parent / "dr"),
            "spark_master": "local[2]", "ray_workers": "0"}
    results = []
    for night in NIGHTS:
        proc = subprocess.run([str(airflow), "dags", "test", "deep_retrieval_nightly", night, "-c", json.dumps(conf)],
                              env=env, cwd=base, capture_output=True, text=True, timeout=1200)
        results.append((proc.returncode, (proc.stdout + proc.stderr)[-6000:]))
    return Warehouse(base / "warehouse"), results


def test_both_nights_green(two_nights):
    _, results = two_nights
    for night, (rc, log) in zip(NIGHTS, results):
        assert rc == 0, f"night {night}:\n{log}"
        assert "state=success" in log, f"night {night} not marked successful:\n{log}"


def test_first_night_full_second_incremental_tables_versioned(two_nights):
    wh, _ = two_nights
    n1 = runs.latest(wh, "train", "nightly-20261102", status="succeeded")
    n2 = runs.latest(wh, "train", "nightly-20261103", status="succeeded")
    assert n1 is not None and n2 is not None
    assert (n1.metrics["mode"], n2.metrics["mode"]) == ("full", "incremental")
    assert n2.metrics["previous_run"] == "nightly-20261102"
    for t in ("interactions", "item_paths", "path_index", "path_scores", "user_state", "item_state", "samples_train"):
        assert n2.table_versions[t] > n1.table_versions[t], t
    assert n2.table_versions["eval_users"] == n1.table_versions["eval_users"]
    # each night ingested its own drop once (batch id = run id)
    batches = {v.run_id for v in wh.versions("interactions") if v.job == "ingest"}
    assert batches == {"nightly-20261102", "nightly-20261103"}


def test_each_night_wrote_candidates_and_a_report(two_nights):
    wh, _ = two_nights
    c = wh.read_arrow("candidates").to_pandas()
    for night in ("nightly-20261102", "nightly-20261103"):
        mine = c[c.run_id == night]
        assert len(mine) > 0 and mine.user_id.nunique() > 10, night
        report = json.loads(Path(f"{wh.root}/reports/{night}/evaluation.json").read_text())
        assert report["methods"]["dr"]["recall"] > 0.1, night
