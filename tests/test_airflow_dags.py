"""The Airflow DAGs, loaded by Airflow's real DagBag in its own virtualenv.

Airflow's pins clash with the project's (DESIGN §7), so Airflow lives in
``.venv-airflow`` (built here from orchestration/requirements-airflow.txt when
missing, never skipped) and ``orchestration/check_dags.py`` runs there and prints
JSON; this test (project venv) asserts on that JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCH = ROOT / "orchestration"
REQUIREMENTS = ORCH / "requirements-airflow.txt"
VENV = ROOT / ".venv-airflow"
VENV_PY = VENV / "bin" / "python"
# Holds the sha256 of the requirements it was built from: a pin change rebuilds, a re-run does not.
STAMP = VENV / ".installed"
BUILD_PYTHON = os.environ.get("AIRFLOW_VENV_PYTHON", "python3.11")

NIGHTLY = "deep_retrieval_nightly"
BACKFILL = "deep_retrieval_backfill"
NIGHTLY_ORDER = ["ingest", "train", "candidates", "evaluate"]


def _requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def ensure_airflow_venv() -> Path:
    """Build .venv-airflow if missing or built from other pins; return its python."""
    wanted = _requirements_hash()
    if VENV_PY.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return VENV_PY
    start = time.monotonic()
    if not VENV_PY.exists():
        subprocess.run([BUILD_PYTHON, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(VENV_PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
        check=True,
    )
    STAMP.write_text(wanted + "\n")
    # Visible with `pytest -s`, and in the log of a failing run: CI budgets this step.
    print(f"built {VENV} in {time.monotonic() - start:.0f}s", file=sys.stderr)
    return VENV_PY


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = ensure_airflow_venv()
    out = tmp_path_factory.mktemp("check_dags") / "report.json"
    proc = subprocess.run(
        [str(python), str(ORCH / "check_dags.py"), "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        # The Airflow venv must not see the project's packages or config.
        env={k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))},
    )
    log = (proc.stdout + proc.stderr)[-4000:]
    assert out.exists(), f"check_dags.py wrote no report (rc={proc.returncode}):\n{log}"
    result: dict[str, Any] = json.loads(out.read_text())
    result["_log"] = log
    result["_rc"] = proc.returncode
    return result


def _dag(report: dict[str, Any], dag_id: str) -> dict[str, Any]:
    assert dag_id in report["dags"], f"{dag_id} not loaded; loaded: {report['dag_ids']}"
    return report["dags"][dag_id]


def test_dags_import_and_serialize(report: dict[str, Any]) -> None:
    assert report["import_errors"] == {}, report["_log"]
    assert report["serialization_errors"] == {}
    assert report["_rc"] == 0
    assert report["airflow_version"].startswith("3.")
    assert set(report["dag_ids"]) == {NIGHTLY, BACKFILL}


def test_nightly_tasks_are_a_chain_in_order(report: dict[str, Any]) -> None:
    dag = _dag(report, NIGHTLY)
    assert dag["task_ids"] == NIGHTLY_ORDER
    tasks = dag["tasks"]
    for i, task_id in enumerate(NIGHTLY_ORDER):
        # Exactly one predecessor and one successor: a chain, not just a topological order.
        assert tasks[task_id]["upstream"] == NIGHTLY_ORDER[i - 1:i] if i else tasks[task_id]["upstream"] == []
        assert tasks[task_id]["downstream"] == NIGHTLY_ORDER[i + 1:i + 2]
        assert tasks[task_id]["operator"] == "BashOperator"
        assert f" {task_id} " in tasks[task_id]["bash_command"], "each task runs its own dr subcommand"


def test_nightly_schedule_and_run_policy(report: dict[str, Any]) -> None:
    dag = _dag(report, NIGHTLY)
    minute, hour, dom, month, dow = dag["schedule"].split()
    assert (dom, month, dow) == ("*", "*", "*") and minute.isdigit() and hour.isdigit(), "once a day"
    assert dag["timetable"] == "CronTriggerTimetable"
    assert dag["max_active_runs"] == 1
    assert dag["catchup"] is False
    assert dag["dagrun_timeout_s"] and dag["dagrun_timeout_s"] < 24 * 3600, "a hung run must not block the next night"
    for task in dag["tasks"].values():
        assert task["retries"] >= 1 and task["retry_delay_s"] > 0
        assert task["execution_timeout_s"] and task["execution_timeout_s"] <= dag["dagrun_timeout_s"]


def test_every_shell_variable_is_provided(report: dict[str, Any]) -> None:
    # `set -u` makes a missing variable a runtime failure on the worker: catch it here.
    for dag_id in (NIGHTLY, BACKFILL):
        for task_id, task in _dag(report, dag_id)["tasks"].items():
            if task["bash_command"] is None:
                continue
            used = set(re.findall(r"\$\{?(DR_[A-Z_]+)", task["bash_command"]))
            assert used <= set(task["env_keys"]), f"{dag_id}.{task_id} lacks {used - set(task['env_keys'])}"


def test_nightly_run_id_from_logical_date_and_config_precedence(report: dict[str, Any]) -> None:
    rendered = report["rendered"]
    for case in ("defaults", "overrides", "manual_no_logical_date"):
        run_ids = {env["DR_RUN_ID"] for env in rendered[case].values()}
        assert run_ids == {"nightly-20261103"}, f"{case}: one run id per night, from its date"
    defaults = rendered["defaults"]["ingest"]
    assert defaults["DR_WAREHOUSE"] == "./warehouse" and defaults["DR_SPARK_MASTER"] == "local[2]"
    assert defaults["DR_INPUT_PATH"].endswith("dt=2026-11-03")
    assert rendered["defaults"]["candidates"]["DR_DATE"] == "2026-11-03"
    overrides = rendered["overrides"]["train"]
    assert overrides["DR_WAREHOUSE"] == "s3://param-bucket/wh", "trigger param beats Variable"
    assert overrides["DR_SPARK_MASTER"] == "spark://var:7077", "Variable beats built-in default"
    assert overrides["DR_CONFIG"] == "configs/default.toml"


def test_backfill_dag_is_manual_with_params(report: dict[str, Any]) -> None:
    dag = _dag(report, BACKFILL)
    assert dag["schedule"] is None and dag["timetable"] == "NullTimetable"
    params = dag["params"]
    assert params["backfill"]["schema"]["enum"] == ["path-index", "candidates", "cold-items"]
    assert "integer" in params["item_paths_version"]["schema"]["type"]
    assert "string" in params["run_id"]["schema"]["type"]
    assert params["date"]["schema"]["format"] == "date"
    assert {"warehouse", "spark_master", "ray_address", "config"} <= set(params)
    assert all(p["description"] for p in params.values())


def test_backfill_branches_to_one_task_per_kind(report: dict[str, Any]) -> None:
    tasks = _dag(report, BACKFILL)["tasks"]
    assert tasks["choose_backfill"]["downstream"] == ["candidates", "cold_items", "path_index"]
    for task_id, sub in (("path_index", "path-index"), ("candidates", "candidates"), ("cold_items", "cold-items")):
        assert tasks[task_id]["upstream"] == ["choose_backfill"]
        assert f"backfill {sub} " in tasks[task_id]["bash_command"]
    choices = report["backfill_choices"]
    assert choices["path-index"] == "path_index"
    assert choices["cold-items"] == "cold_items"
    assert choices["candidates-run-id"] == "candidates nightly-20261101"
    assert choices["candidates-date"] == "candidates nightly-20261102", "same run id as that night's nightly DAG"
    for bad in ("path-index-no-version", "candidates-nothing", "unknown"):
        assert choices[bad].startswith("error:"), bad
