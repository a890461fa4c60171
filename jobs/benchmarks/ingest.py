"""`dr bench ingest --json`: rows/s of `dr ingest` on synthetic interactions (10^7 rows; quick: 10^5)."""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from dr_model.synthetic import SyntheticSpec

EVENTS_PER_USER = 50


def run(quick: bool = False, master: str = "local[2]") -> dict:
    """Generate the input Parquet (untimed), then time validation + Delta commit of it."""
    from jobs.datasets import synthetic_events
    from jobs.ingest import ingest_path
    from jobs.spark import get_spark
    from jobs.tables import Warehouse

    rows = 10**5 if quick else 10**7
    spec = SyntheticSpec(num_users=rows // EVENTS_PER_USER, num_items=10**6 if not quick else 10**4,
                         num_clusters=100, events_per_user=EVENTS_PER_USER, seed=1)
    spark = get_spark(master, app="dr-bench-ingest")
    cores = int(m.group(1)) if (m := re.fullmatch(r"local\[(\d+)\]", master)) else spark.sparkContext.defaultParallelism
    tmp = Path(tempfile.mkdtemp(prefix="dr-bench-ingest-"))
    try:
        t0 = time.time()
        print(f"[bench] generating {rows} synthetic interactions into {tmp / 'input'}", file=sys.stderr, flush=True)
        synthetic_events(spark, spec).write.parquet(str(tmp / "input"))
        gen_s = time.time() - t0
        t1 = time.time()
        res = ingest_path(spark, Warehouse(tmp / "warehouse"), str(tmp / "input"), batch_id="bench")
        secs = time.time() - t1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert res.input_rows == rows == res.ingested + sum(res.quarantined.values())
    return {"rows": rows, "seconds": round(secs, 2), "rows_per_s": round(rows / secs),
            "rows_per_s_per_core": round(rows / secs / cores), "spark_master": master,
            "quarantined": sum(res.quarantined.values()), "generate_seconds": round(gen_s, 2),
            "date": date.today().isoformat()}


if __name__ == "__main__":
    import json
    print(json.dumps(run(quick="--quick" in sys.argv)))
