"""Load the DAG files with Airflow's real DagBag and print what the scheduler would see, as JSON.

Run INSIDE the Airflow virtualenv (``.venv-airflow/bin/python orchestration/check_dags.py``),
not the project venv: Airflow's pins clash with the project's. It needs no metadata DB,
no scheduler and no API server: it parses the files (``DagBag``), serializes each DAG the
way the DAG processor does, and renders the bash tasks' templates for one sample night.

Prints one JSON object (on stdout, or to ``--output FILE``) and exits non-zero on import errors; the assertions on
order, schedule etc. live in ``tests/test_airflow_dags.py`` (project venv).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DAG_FILES = [HERE / "nightly_dag.py", HERE / "backfill_dag.py"]


def _isolate_airflow(home: Path) -> None:
    """Point Airflow at a throwaway home BEFORE it is imported (it reads config at import)."""
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(HERE)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
    # Never created (nothing here opens a session), but it must not point at a real DB.
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home / 'airflow.db'}"
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"


def _render_env(dag: Any, task: Any, context: dict[str, Any]) -> dict[str, str]:
    """Render a BashOperator's templated env with the DAG's own Jinja environment (StrictUndefined)."""
    jinja = dag.get_template_env()
    return {key: jinja.from_string(value).render(**context) for key, value in task.env.items()}


def _sample_context(dag: Any, variables: dict[str, str], params: dict[str, Any], scheduled: bool) -> dict[str, Any]:
    """The context keys our templates use, for a run of 2026-11-03 02:00 UTC.

    A scheduled run has a logical date (and ds, ds_nodash); an Airflow 3 manual trigger
    may have none, only dag_run.run_after: the templates must render in both cases.
    Variables are given as a plain dict (``var.value.get`` works on it): real Variables
    need the API server, and this checks our templates, not Airflow's Variable backend.
    """
    import pendulum

    logical_date = pendulum.datetime(2026, 11, 3, 2, tz="UTC")
    context: dict[str, Any] = {
        "dag_run": {"run_after": logical_date},
        "params": {**dag.params.dump(), **params},
        "var": {"value": variables},
    }
    if scheduled:
        context.update(logical_date=logical_date, ds=logical_date.strftime("%Y-%m-%d"),
                       ds_nodash=logical_date.strftime("%Y%m%d"))
    return context


def _backfill_choices() -> dict[str, str]:
    """What the backfill DAG's branch task picks (or the error it fails with) for sample params."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dr_backfill_dag_check", HERE / "backfill_dag.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    samples: dict[str, dict[str, Any]] = {
        "path-index": {"backfill": "path-index", "item_paths_version": 7},
        "path-index-no-version": {"backfill": "path-index", "item_paths_version": None},
        "candidates-run-id": {"backfill": "candidates", "run_id": "nightly-20261101"},
        "candidates-date": {"backfill": "candidates", "date": "2026-11-02"},
        "candidates-nothing": {"backfill": "candidates"},
        "cold-items": {"backfill": "cold-items"},
        "unknown": {"backfill": "everything"},
    }
    out: dict[str, str] = {}
    for name, params in samples.items():
        try:
            chosen = module.choose_task(params)
            out[name] = chosen + (f" {module.resolve_run_id(params)}" if chosen == "candidates" else "")
        except ValueError as exc:
            out[name] = f"error: {exc}"
    return out


def describe(dag: Any) -> dict[str, Any]:
    tasks = {
        t.task_id: {
            "operator": type(t).__name__,
            "upstream": sorted(t.upstream_task_ids),
            "downstream": sorted(t.downstream_task_ids),
            "retries": t.retries,
            "retry_delay_s": t.retry_delay.total_seconds() if t.retry_delay else None,
            "execution_timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None,
            "bash_command": getattr(t, "bash_command", None),
            "env_keys": sorted(getattr(t, "env", None) or {}),
        }
        for t in dag.tasks
    }
    params = {
        name: {"default": p.value if p.has_value else None, "schema": p.schema, "description": p.description}
        for name, p in dag.params.items()
    }
    return {
        "fileloc": dag.fileloc,
        # Cron expression for cron timetables, None for schedule=None (NullTimetable).
        "schedule": getattr(dag.timetable, "expression", None),
        "timezone": str(getattr(dag.timetable, "timezone", None) or getattr(dag.timetable, "_timezone", "")) or None,
        "timetable": type(dag.timetable).__name__,
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "dagrun_timeout_s": dag.dagrun_timeout.total_seconds() if dag.dagrun_timeout else None,
        "task_ids": [t.task_id for t in dag.topological_sort()],
        "tasks": tasks,
        "params": params,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Airflow logs (e.g. a failed import's traceback) go to stdout: write the JSON to a file
    # when a program reads it.
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here (default: stdout)")
    output: Path | None = parser.parse_args(argv).output
    with tempfile.TemporaryDirectory(prefix="airflow-home-") as home:
        _isolate_airflow(Path(home))

        import airflow
        from airflow.dag_processing.dagbag import DagBag
        from airflow.serialization.serialized_objects import DagSerialization

        # One bag, the two DAG files only (not the whole folder: this script and
        # __init__.py are not DAG files).
        bag = DagBag(dag_folder=str(HERE), collect_dags=False)
        for path in DAG_FILES:
            bag.collect_dags(dag_folder=str(path), only_if_updated=False)

        report: dict[str, Any] = {
            "airflow_version": airflow.__version__,
            "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
            "dag_ids": sorted(bag.dags),
            "dags": {},
            "serialization_errors": {},
            "rendered": {},
        }
        for dag_id, dag in bag.dags.items():
            report["dags"][dag_id] = describe(dag)
            try:
                # What the DAG processor stores for the scheduler/UI; fails on e.g. unserializable params.
                DagSerialization.to_dict(dag)
            except Exception as exc:  # noqa: BLE001 - reported, then asserted on by the test
                report["serialization_errors"][dag_id] = repr(exc)

        nightly = bag.dags.get("deep_retrieval_nightly")
        if nightly is not None:
            # Defaults only, then a Variable plus a trigger param (param must win over the Variable).
            cases = {
                "defaults": ({}, {}, True),
                "overrides": ({"dr_warehouse": "s3://var-bucket/wh", "dr_spark_master": "spark://var:7077"},
                              {"warehouse": "s3://param-bucket/wh", "config": "configs/default.toml"}, True),
                "manual_no_logical_date": ({}, {}, False),
            }
            for case, (variables, params, scheduled) in cases.items():
                ctx = _sample_context(nightly, variables, params, scheduled)
                report["rendered"][case] = {t.task_id: _render_env(nightly, t, ctx) for t in nightly.tasks}

        # Only meaningful (and importable) when the file loaded cleanly.
        report["backfill_choices"] = _backfill_choices() if "deep_retrieval_backfill" in bag.dags else {}

        text = json.dumps(report, indent=2, sort_keys=True, default=str)
        if output is None:
            print(text)
        else:
            output.write_text(text + "\n")
        bad = report["import_errors"] or report["serialization_errors"] or not report["dag_ids"]
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
