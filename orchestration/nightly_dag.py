"""Nightly Deep Retrieval job: ingest -> train -> candidates -> evaluate.

Airflow 3 DAG ``deep_retrieval_nightly``. Every task shells out to the ``dr`` CLI
of this project, so the Airflow workers only need the ``dr`` executable (its own
virtualenv or image), never this project's Python packages: Airflow's pins and
ours (pyspark, ray, torch, deltalake) never meet in one interpreter.

Schedule and run semantics
--------------------------
* Daily at 02:00 UTC (``0 2 * * *``), ``catchup=False``: a paused or new
  deployment runs tonight's job only; use ``deep_retrieval_backfill`` (or
  ``airflow backfill create``) for past nights.
* ``max_active_runs=1``: two nights never train at once against the same
  warehouse and cluster; a late run delays the next one instead.
* Run id ``nightly-YYYYMMDD`` from the logical date (``{{ ds_nodash }}``). The
  ``dr`` jobs are idempotent per run id (ingest batch id = run id), so clearing
  and re-running a night, or a task retry, rewrites the same versions instead of
  adding new ones. A manual trigger without a logical date uses the trigger's
  ``run_after`` date.
* Retries with exponential backoff and a per-task ``execution_timeout``; the
  whole run is capped by ``dagrun_timeout`` (20 h) so that a hung run cannot
  block the next night forever (``max_active_runs=1``).
* ``dr evaluate --json`` prints its metrics; the last stdout line is pushed to
  XCom (``return_value`` of task ``evaluate``).

Configuration (first non-empty wins)
------------------------------------
1. DAG param at trigger time ("Trigger DAG w/ config"), e.g. ``{"warehouse": "s3://..."}``;
2. Airflow Variable (Admin -> Variables, or ``AIRFLOW_VAR_<NAME>`` env var);
3. built-in default (the embedded, single-machine setup of DESIGN §4).

=============  ===================  ==============================  ==========================================
param          Airflow Variable     default                         meaning
=============  ===================  ==============================  ==========================================
warehouse      dr_warehouse         ./warehouse                     local folder or object-store URI (s3://...)
spark_master   dr_spark_master      local[2]                        Spark master URL (spark://..., yarn, k8s://...)
ray_address    dr_ray_address       local                           Ray address (ray://head:10001, auto, local)
ray_workers    dr_ray_workers       2                               Ray Train workers of the E-step (0: in the driver)
config         dr_config            (empty: the CLI's default)      path of the TOML job config
input_path     dr_input_path        ./incoming/interactions/dt={ds} new interactions; ``{ds}``/``{ds_nodash}``
                                                                    are replaced by the run date
dr_bin         dr_bin               dr                              the ``dr`` executable (absolute path if it
                                                                    is not on the worker's PATH)
train_mode     dr_train_mode        auto                            ``dr train --mode``: auto = incremental once a
                                                                    night has succeeded (first night full)
run_id         (none)               nightly-YYYYMMDD                override the derived run id (manual re-runs)
=============  ===================  ==============================  ==========================================

Values reach the shell as environment variables (``env=``), never pasted into
the command line, so a trigger param cannot inject shell syntax.
"""
from __future__ import annotations

import json
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import CronTriggerTimetable, Param, chain, dag

DAG_ID = "deep_retrieval_nightly"
SCHEDULE = "0 2 * * *"  # daily, 02:00 UTC: after the upstream interaction exports land

# Keep in sync with backfill_dag.py (which derives a night's run id from a date);
# DAG files are deployed standalone, so they share no module.
RUN_ID_PREFIX = "nightly-"

# Scheduled runs always have a logical date; a manual trigger in Airflow 3 may not
# (then ds/ds_nodash are absent from the context), so fall back to run_after.
_RUN_DATE = "(logical_date if logical_date is defined and logical_date else dag_run.run_after)"
RUN_ID = "{{ params.run_id or (%s ~ %s.strftime('%%Y%%m%%d')) }}" % (json.dumps(RUN_ID_PREFIX), _RUN_DATE)

INPUT_PATH_DEFAULT = "./incoming/interactions/dt={ds}"

# (param name, Variable name, built-in default, description)
SETTINGS: list[tuple[str, str, str, str]] = [
    ("warehouse", "dr_warehouse", "./warehouse", "Warehouse: local folder or object-store URI."),
    ("spark_master", "dr_spark_master", "local[2]", "Spark master URL."),
    ("ray_address", "dr_ray_address", "local", "Ray cluster address (ray://host:10001, auto, local)."),
    ("ray_workers", "dr_ray_workers", "2", "Ray Train workers of the E-step (0: the training loop in the driver)."),
    ("config", "dr_config", "", "Path of the job config (TOML); empty = the CLI's default."),
    ("input_path", "dr_input_path", INPUT_PATH_DEFAULT,
     "New interactions to ingest; {ds} / {ds_nodash} are replaced by the run date."),
    ("dr_bin", "dr_bin", "dr", "The dr executable (absolute path if not on PATH)."),
    ("train_mode", "dr_train_mode", "auto",
     "dr train --mode: auto (incremental once a night has succeeded, else full), full or incremental."),
]


def env_var(param: str) -> str:
    """Environment variable a setting reaches the shell as: warehouse -> DR_WAREHOUSE, dr_bin -> DR_BIN."""
    return param.upper() if param.startswith("dr_") else f"DR_{param.upper()}"


def setting(param: str, variable: str, default: str) -> str:
    """Jinja expression: trigger param, else Airflow Variable, else default.

    Rendered at run time (not parse time): reading Variables while the DAG file is
    parsed would hit the metadata DB on every parse loop.
    """
    return "{{ params.%s or var.value.get(%s, %s) }}" % (param, json.dumps(variable), json.dumps(default))


def _env() -> dict[str, str]:
    """Environment shared by all tasks: every setting plus the run id / date."""
    env = {env_var(name): setting(name, variable, default) for name, variable, default, _ in SETTINGS}
    ds = "%s.strftime('%%Y-%%m-%%d')" % _RUN_DATE
    ds_nodash = "%s.strftime('%%Y%%m%%d')" % _RUN_DATE
    # The input path usually names the night's drop folder: substitute the date placeholders.
    env["DR_INPUT_PATH"] = (
        "{{ (params.input_path or var.value.get('dr_input_path', %s))"
        " | replace('{ds_nodash}', %s) | replace('{ds}', %s) }}"
        % (json.dumps(INPUT_PATH_DEFAULT), ds_nodash, ds)
    )
    env["DR_RUN_ID"] = RUN_ID
    env["DR_DATE"] = "{{ %s }}" % ds
    return env


# `set -euo pipefail`: fail the task on the first failing command. The optional
# --config is only passed when set, so the CLI's own default applies otherwise.
_COMMON = '--warehouse "$DR_WAREHOUSE" ${DR_CONFIG:+--config "$DR_CONFIG"}'
COMMANDS: dict[str, str] = {
    "ingest": f'set -euo pipefail; "$DR_BIN" ingest "$DR_INPUT_PATH" --batch-id "$DR_RUN_ID" {_COMMON}',
    "train": (
        f'set -euo pipefail; "$DR_BIN" train --run-id "$DR_RUN_ID" --mode "$DR_TRAIN_MODE" {_COMMON}'
        ' --spark-master "$DR_SPARK_MASTER" --ray-address "$DR_RAY_ADDRESS" --ray-workers "$DR_RAY_WORKERS"'
    ),
    "candidates": (
        f'set -euo pipefail; "$DR_BIN" candidates --run-id "$DR_RUN_ID" --date "$DR_DATE" {_COMMON}'
        ' --spark-master "$DR_SPARK_MASTER"'
    ),
    # evaluate's classical peers (popularity, item-CF, EASE's Gram) run on Spark over samples_train
    "evaluate": (
        f'set -euo pipefail; "$DR_BIN" evaluate --run-id "$DR_RUN_ID" --json {_COMMON}'
        ' --spark-master "$DR_SPARK_MASTER"'
    ),
}

# Sized for catalog scale on a cluster; a task past its timeout is killed and retried.
TIMEOUTS: dict[str, timedelta] = {
    "ingest": timedelta(hours=2),
    "train": timedelta(hours=8),
    "candidates": timedelta(hours=6),
    "evaluate": timedelta(hours=1),
}

DEFAULT_ARGS = {
    "owner": "recsys-platform",
    "depends_on_past": False,
    # Transient cluster failures (preempted executors, lost Ray nodes, object-store
    # throttling) are the common case; the jobs are idempotent, so retrying is safe.
    "retries": 2,
    "retry_delay": timedelta(minutes=10),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(hours=1),
}


@dag(
    dag_id=DAG_ID,
    description="Deep Retrieval nightly retraining: ingest -> train (EM) -> candidates -> evaluate",
    # Explicit CronTriggerTimetable (not a bare cron string, whose timetable depends on
    # [scheduler] create_cron_data_intervals): the logical date IS the night it runs,
    # so run id nightly-20261103 is the run started on 2026-11-03 02:00 UTC.
    schedule=CronTriggerTimetable(SCHEDULE, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=20),
    default_args=DEFAULT_ARGS,
    tags=["deep-retrieval", "nightly"],
    doc_md=__doc__,
    params={
        **{
            name: Param(None, type=["null", "string"], description=f"{desc} Default: Variable {var} or {default!r}.")
            for name, var, default, desc in SETTINGS
        },
        "run_id": Param(None, type=["null", "string"], description="Override the run id (default nightly-YYYYMMDD)."),
    },
)
def deep_retrieval_nightly() -> None:
    env = _env()
    tasks = [
        BashOperator(
            task_id=name,
            bash_command=command,
            env=env,
            append_env=True,  # keep PATH, JAVA_HOME, cloud credentials of the worker
            execution_timeout=TIMEOUTS[name],
            # BashOperator skips the task on exit code 99 by default; a dr failure must never look like a skip.
            skip_on_exit_code=None,
            # Only train runs long on the cluster; one retry of 8 h is already a lot.
            retries=1 if name == "train" else DEFAULT_ARGS["retries"],
        )
        for name, command in COMMANDS.items()
    ]
    chain(*tasks)  # ingest >> train >> candidates >> evaluate


deep_retrieval_nightly()
