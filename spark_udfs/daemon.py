"""Spark's Python worker daemon, with the heavy imports done once before it forks workers.

jobs.spark sets `spark.python.daemon.module` to this module. Every Python worker of an
executor is forked from its daemon, so the modules the daemon has imported are already
in each worker (copy-on-write pages): a worker's first beam-search or M-step task no
longer pays torch's import (~1.5 s on this machine) per worker and per job, nor numba's
(dr_model.kernels). Importing either starts no threads (their pools start on first use), so
forking after it is safe.
"""
from __future__ import annotations

import numba  # noqa: F401
import numpy  # noqa: F401
import pyarrow  # noqa: F401
import torch  # noqa: F401
from pyspark.daemon import manager

if __name__ == "__main__":
    manager()
