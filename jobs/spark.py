"""One way to build the SparkSession every job uses (DESIGN.md §4)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

from pyspark.sql import SparkSession

LOG4J2 = Path(__file__).resolve().parent / "log4j2.properties"

# Small-machine defaults; every key can be overridden through `conf` (cluster URLs, sizes).
DEFAULT_CONF: dict[str, str] = {
    # the JVM logs errors only (jobs/log4j2.properties): Spark's start-up notices are noise in a job's log
    "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={LOG4J2}",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.default.parallelism": "4",
    "spark.driver.memory": "4g",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "20000",
    "spark.sql.adaptive.enabled": "true",
    # Speculative duplicates would write duplicate data files: the table layer commits
    # every file a successful task reports, so keep one successful attempt per task.
    "spark.speculation": "false",
    "spark.python.worker.reuse": "true",
    # workers fork from a daemon that has imported torch and numpy once (spark_udfs/daemon.py)
    "spark.python.daemon.module": "spark_udfs.daemon",
}


def get_spark(master: str = "local[2]", app: str = "dr", conf: Mapping[str, str] | None = None) -> SparkSession:
    """SparkSession with workers on this interpreter (sys.executable), UI off, UTC, Arrow on."""
    # Workers must run the driver's interpreter, or they miss the project's packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    settings = {**DEFAULT_CONF, "spark.pyspark.python": sys.executable,
                "spark.pyspark.driver.python": sys.executable, **dict(conf or {})}
    builder = SparkSession.builder.master(master).appName(app)
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
