"""The nightly job on real clusters: a Spark standalone Master + 2 Workers and a Ray head + 1 worker node.

Both clusters run on loopback, started by the launchers that ship with pyspark and ray
(tests/clusters.py). `dr train` -> `dr candidates` -> `dr evaluate` on MovieLens-100K runs
once in local mode (local[2], a local Ray) and once with --spark-master spark://... and
--ray-address against the clusters, with the same short schedule and 2 E-step workers. The
cluster's first E-step pauses inside its third epoch (DR_ESTEP_HOLD, ray_trainers/faults.py); the
Ray worker node is killed then (SIGKILL to its process group) and a new one joins: Ray Train
restarts the worker group, which resumes from the second epoch's checkpoint.
While the cluster writes candidates, a Spark worker is killed: its tasks are retried on the other.

Tolerances (stated in README "Clusters"): the split, the vocabulary and the candidate users are
equal; the reranker's recall@k (brute force) within 8 % of local mode (measured: 0 %, 3.6 % and 5.1 % on three runs;
the epoch killed with the node is re-trained from its checkpoint on another schedule of batches). DR's own recall is the
structure's outcome, and the structure is not reproducible bit for bit across topologies: the
gradient exchange sums in another order across nodes and the beam's ties break differently. With the
structure cut to 2 epochs those differences moved whole paths (DR/brute force 0.65 local vs 0.93
cluster on one run, 0.49 local on CI's machine); with its default early-stopped schedule DR at a fixed
beam must reach STRUCTURE_FLOOR of brute force in both modes, the two may differ by DR_SPREAD of brute
force's recall, and DR at the run's own (recall-chosen, smallest) beam must reach OWN_BEAM_FLOOR.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.tables import Warehouse
from ray_trainers.faults import ENV as HOLD_ENV, HOLD_LINE
from clusters import RAY_ENV, RayCluster, SparkStandalone

pytestmark = pytest.mark.system

DR = [sys.executable, "-m", "jobs.cli"]
# the structure keeps its default schedule (early-stopped, at most 10 epochs): cut to 2 epochs it had not
# settled, and DR/brute force moved with the float rounding of the machine (0.65 here, 0.49 on CI)
SCHEDULE = ["--set", "train.em_rounds=1", "--set", "train.joint_epochs=4"]
# DR at beam 10 (a point of eval.beam_sweep, ~150 items, 11 % of the catalog): the structure, whatever beam
# the run chose; measured 0.96 local / 0.92 cluster (2026-12-03). A random structure gives ~0.11 there.
STRUCTURE_BEAM, STRUCTURE_FLOOR = "10", 0.80
# DR at the run's own beam, the smallest whose recall reaches 0.98 x brute force's on the 179 validation
# users (dr_model/beam_choice.py): on the 179 test users it lands below by the validation noise
# (measured 0.90 / 0.80 / 0.91 and 0.80 local / 0.71 cluster at beams 4 / 3, 2026-12-03)
OWN_BEAM_FLOOR = 0.60
DR_SPREAD = 0.25       # |DR cluster - DR local| at STRUCTURE_BEAM / brute force (measured 0.07)
RERANKER_TOLERANCE = 0.08   # measured 0 %, 3.6 %, 5.1 % (the killed epoch re-trained on other batches)


def _dr(args: list[str], on_line=None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `dr ARGS`; on_line(line) sees each stderr line as it comes. -> (rc, stdout, stderr)."""
    p = subprocess.Popen([*DR, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **RAY_ENV, "PYTHONUNBUFFERED": "1", "SPARK_LOCAL_IP": "127.0.0.1",
                              **(env or {})})
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    reader.start()
    err: list[str] = []
    for line in p.stderr:
        err.append(line)
        if on_line is not None:
            on_line(line)
    p.wait(timeout=1800)
    reader.join(30)
    return p.returncode, "".join(out), "".join(err)


def _nightly(wh: Path, spark: list[str], ray: list[str], train_line=None, candidates_line=None,
             train_env: dict[str, str] | None = None) -> dict:
    common = ["--warehouse", str(wh), *spark]
    rc, _, err = _dr(["train", "--dataset", "ml-100k", "--run-id", "night-1", *SCHEDULE, *common, *ray,
                      "--ray-workers", "2"], train_line, train_env)
    assert rc == 0, err[-4000:]
    rc, out, err2 = _dr(["candidates", "--train-run-id", "night-1", "--top-n", "50", "--json", *common],
                        candidates_line)
    assert rc == 0, err2[-4000:]
    rc, out3, err3 = _dr(["evaluate", "--run-id", "night-1", "--json", *common])
    assert rc == 0, err3[-4000:]
    return {"train_log": err, "candidates": json.loads(out), "evaluation": json.loads(out3)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    local = _nightly(base / "local", ["--spark-master", "local[2]"], [])
    logs = base / "logs"
    logs.mkdir()
    with SparkStandalone(logs, workers=2, cores=1) as spark, RayCluster(logs, workers=1, cpus=3) as ray:
        killed: dict[str, float] = {}

        def kill_ray_node(line: str) -> None:
            # the first E-step pauses in its third epoch (DR_ESTEP_HOLD), after the second epoch's
            # checkpoint: an ML-100K epoch lasts under a second, less than the log line takes to come
            # here, and the round once ended before the node's death reached the group
            if "ray-node" not in killed and HOLD_LINE in line:
                killed["ray-node"] = time.time()
                ray.procs[1].kill()
                ray.add_worker(1)

        def kill_spark_worker(line: str) -> None:
            # the line logged as the candidates stage starts: the worker dies with its tasks running
            if "spark-worker" not in killed and ", top 50," in line:
                killed["spark-worker"] = time.time()
                threading.Timer(1.0, spark.worker(0).kill).start()

        cluster = _nightly(base / "cluster", ["--spark-master", spark.url],
                           ["--ray-address", ray.address, "--ray-cpus-per-worker", "2"], kill_ray_node, kill_spark_worker,
                           {HOLD_ENV: "0:3:60"})
        master_log = spark.procs[0].text()
    (logs / "cluster-train.log").write_text(cluster["train_log"])   # kept for a failed test's post-mortem
    return local, cluster, killed, master_log, Warehouse(base / "local"), Warehouse(base / "cluster")


def test_the_cluster_run_used_both_clusters_and_survived_the_kills(runs):
    _, cluster, killed, master_log, _, _ = runs
    assert set(killed) == {"ray-node", "spark-worker"}
    # Ray Train restarted the group, which resumed from the checkpoint before the held epoch
    assert re.search(r"round 0: resuming from \S+ after 2 of 4 epochs", cluster["train_log"])
    assert "Registering app dr-train" in master_log and "Removing worker" in master_log


def test_cluster_results_equal_local_within_tolerance(runs):
    local, cluster, _, _, wl, wc = runs
    for table in ("interactions", "samples_train", "eval_users"):
        assert wl.rows(table) == wc.rows(table), table
    il = wl.read_arrow("item_paths").column("item_id").unique().to_pylist()
    ic = wc.read_arrow("item_paths").column("item_id").unique().to_pylist()
    assert sorted(il) == sorted(ic)
    assert local["candidates"]["users"] == cluster["candidates"]["users"]
    ml, mc = local["evaluation"]["methods"], cluster["evaluation"]["methods"]
    bl, bc = ml["brute_force"]["recall"], mc["brute_force"]["recall"]
    assert abs(bc - bl) <= RERANKER_TOLERANCE * bl, (bl, bc)
    dl, dc = ml["dr"]["recall"], mc["dr"]["recall"]
    assert dl >= OWN_BEAM_FLOOR * bl and dc >= OWN_BEAM_FLOOR * bc, (dl, bl, dc, bc)
    sl, sc = (e["dr_recall_by_beam"][STRUCTURE_BEAM]["recall"] for e in (local["evaluation"], cluster["evaluation"]))
    assert sl >= STRUCTURE_FLOOR * bl and sc >= STRUCTURE_FLOOR * bc, (sl, bl, sc, bc)
    assert abs(sc - sl) <= DR_SPREAD * bl, (sl, sc)


def test_no_doubled_rows_after_the_spark_worker_was_lost(runs):
    _, _, _, _, _, wc = runs
    cand = wc.read_arrow("candidates").to_pandas()
    assert not cand.duplicated(["run_id", "user_id", "rank"]).any()
