"""Manually triggered Deep Retrieval index backfills.

Airflow 3 DAG ``deep_retrieval_backfill`` (``schedule=None``: it only runs when
someone triggers it, with params from the "Trigger DAG" form or
``airflow dags trigger deep_retrieval_backfill --conf '{...}'``).

Params
------
``backfill`` (required, one of):

* ``path-index``  rebuild the path->items index of a committed item->paths version:
  ``dr backfill path-index --item-paths-version N``; needs ``item_paths_version``.
* ``candidates``  regenerate the top-N candidates of a past run:
  ``dr backfill candidates --run-id ID``; needs ``run_id``, or ``date``
  (YYYY-MM-DD), which names that night's nightly run (``nightly-YYYYMMDD``).
* ``cold-items``  give paths to catalog items without interactions:
  ``dr backfill cold-items``.

``warehouse``, ``spark_master``, ``ray_address``, ``config``, ``dr_bin``: as in the
nightly DAG (empty param -> Airflow Variable ``dr_<name>`` -> built-in default).

Task ``choose_backfill`` checks the params (failing fast, before any cluster work)
and branches to exactly one of ``path_index`` / ``candidates`` / ``cold_items``;
the other two are skipped. ``max_active_runs=1``: backfills are catalog-scale,
so they run one at a time.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import Param, dag, task

DAG_ID = "deep_retrieval_backfill"

# Keep in sync with nightly_dag.py (DAG files are deployed standalone).
RUN_ID_PREFIX = "nightly-"

BACKFILLS = ("path-index", "candidates", "cold-items")

# (param name, Variable name, built-in default, description): same names as the nightly DAG.
SETTINGS: list[tuple[str, str, str, str]] = [
    ("warehouse", "dr_warehouse", "./warehouse", "Warehouse: local folder or object-store URI."),
    ("spark_master", "dr_spark_master", "local[2]", "Spark master URL."),
    ("ray_address", "dr_ray_address", "local", "Ray cluster address (ray://host:10001, auto, local)."),
    ("config", "dr_config", "", "Path of the job config (TOML); empty = the CLI's default."),
    ("dr_bin", "dr_bin", "dr", "The dr executable (absolute path if not on PATH)."),
]


def env_var(param: str) -> str:
    """Environment variable a setting reaches the shell as: warehouse -> DR_WAREHOUSE, dr_bin -> DR_BIN."""
    return param.upper() if param.startswith("dr_") else f"DR_{param.upper()}"


def setting(param: str, variable: str, default: str) -> str:
    """Jinja expression: trigger param, else Airflow Variable, else default (read at run time, not parse time)."""
    return "{{ params.%s or var.value.get(%s, %s) }}" % (param, json.dumps(variable), json.dumps(default))


def resolve_run_id(params: dict[str, Any]) -> str:
    """The run id a candidates backfill regenerates: explicit, or the nightly run of `date`."""
    if params.get("run_id"):
        return str(params["run_id"])
    if params.get("date"):
        return RUN_ID_PREFIX + pendulum.parse(str(params["date"])).strftime("%Y%m%d")
    raise ValueError("backfill=candidates needs param run_id or date (YYYY-MM-DD)")


def choose_task(params: dict[str, Any]) -> str:
    """Validate the params of the chosen backfill and return the task id to run."""
    kind = params.get("backfill")
    if kind not in BACKFILLS:
        raise ValueError(f"param backfill must be one of {BACKFILLS}, got {kind!r}")
    if kind == "path-index" and params.get("item_paths_version") is None:
        raise ValueError("backfill=path-index needs param item_paths_version")
    if kind == "candidates":
        resolve_run_id(params)  # raises if neither run_id nor date is given
    return kind.replace("-", "_")


_ENV = {env_var(name): setting(name, variable, default) for name, variable, default, _ in SETTINGS}
_COMMON = '--warehouse "$DR_WAREHOUSE" ${DR_CONFIG:+--config "$DR_CONFIG"}'
_CLUSTER = '--spark-master "$DR_SPARK_MASTER" --ray-address "$DR_RAY_ADDRESS"'

# Per backfill: the extra env it needs (templated) and its command. Values go through
# env, not into the command line, so trigger params cannot inject shell syntax.
BACKFILL_TASKS: dict[str, tuple[dict[str, str], str]] = {
    "path_index": (
        {"DR_ITEM_PATHS_VERSION": "{{ params.item_paths_version }}"},
        f'set -euo pipefail; "$DR_BIN" backfill path-index --item-paths-version "$DR_ITEM_PATHS_VERSION"'
        f" {_COMMON} --spark-master \"$DR_SPARK_MASTER\"",
    ),
    "candidates": (
        # Computed once by choose_backfill (run_id or the date's nightly run id).
        {"DR_RUN_ID": "{{ ti.xcom_pull(task_ids='choose_backfill', key='run_id') }}"},
        f'set -euo pipefail; "$DR_BIN" backfill candidates --run-id "$DR_RUN_ID" {_COMMON} {_CLUSTER}',
    ),
    "cold_items": (
        {},
        f'set -euo pipefail; "$DR_BIN" backfill cold-items {_COMMON} {_CLUSTER}',
    ),
}


@dag(
    dag_id=DAG_ID,
    description="Deep Retrieval backfills: path-index / candidates / cold-items (manual trigger with params)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=24),
    default_args={
        "owner": "recsys-platform",
        "retries": 1,
        "retry_delay": timedelta(minutes=10),
    },
    tags=["deep-retrieval", "backfill"],
    doc_md=__doc__,
    params={
        "backfill": Param("path-index", type="string", enum=list(BACKFILLS),
                          description="Which backfill to run."),
        "item_paths_version": Param(None, type=["null", "integer"], minimum=0,
                                    description="path-index: Delta version of the item->paths table to index."),
        "run_id": Param(None, type=["null", "string"],
                        description="candidates: run id whose candidates to regenerate."),
        "date": Param(None, type=["null", "string"], format="date",
                      description="candidates: YYYY-MM-DD of a nightly run (used when run_id is empty)."),
        **{
            name: Param(None, type=["null", "string"], description=f"{desc} Default: Variable {var} or {default!r}.")
            for name, var, default, desc in SETTINGS
        },
    },
)
def deep_retrieval_backfill() -> None:
    @task.branch(task_id="choose_backfill")
    def choose_backfill(**context: Any) -> str:
        params: dict[str, Any] = dict(context["params"])
        chosen = choose_task(params)
        if chosen == "candidates":
            context["ti"].xcom_push(key="run_id", value=resolve_run_id(params))
        return chosen

    branch = choose_backfill()
    for task_id, (extra_env, command) in BACKFILL_TASKS.items():
        branch >> BashOperator(
            task_id=task_id,
            bash_command=command,
            env={**_ENV, **extra_env},
            append_env=True,  # keep PATH, JAVA_HOME, cloud credentials of the worker
            execution_timeout=timedelta(hours=12),
            skip_on_exit_code=None,  # a dr exit code 99 is a failure, not a skip
        )


deep_retrieval_backfill()
