"""Ray's forwarded output as the driver prints it: the job's lines once, Ray's own chatter never."""
from __future__ import annotations

import subprocess
import sys

from ray_trainers.log_filter import RayLogFilter

# lines seen in the cluster test's `dr train` log (2026-12-03), Ray's, not the job's
RAY_LINES = [
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "\u2714\ufe0f  Dataset train_0358Hlnv3oa9jBBTZDBO4u_0 execution finished in 7.39 seconds",
    "[2026-12-03 13:04:43,885 E 21537 21537] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor 89b9cc",
    "[mutex.cc : 1954] RAW: Lock blocking 0x7f3f2dbec0d0   @ 0x7f3f2faca7a7",
    "[estep] round 0 joint epoch 1: rerank loss 6.5943\x1b[32m [repeated 2x across cluster]\x1b[0m",
]
SHUTDOWN = [
    "Graceful shutdown of backend failed. This is expected if one of the workers has crashed.",
    "Traceback (most recent call last):",
    '  File "/x/ray/train/torch/config.py", line 333, in on_shutdown',
    "    ray.get(futures, timeout=timeout_s)",
    "           ^^^^^^^^^^^^^^^^^^^",
    "ray.exceptions.ActorUnavailableError: The actor 7ceb98 is unavailable",
]


def test_ray_chatter_is_dropped_and_the_jobs_lines_pass_once():
    now = [0.0]
    f = RayLogFilter(window_s=60, clock=lambda: now[0])
    job = ["[estep] round 0 joint epoch 1: rerank loss 6.5943", "[estep] round 0: resuming from /c after 2 of 4 epochs"]
    assert f.keep(RAY_LINES + job[:1]) == job[:1]
    # the expected traceback goes, its one-line reason stays; what follows it prints again
    assert f.keep(SHUTDOWN + job[1:]) == SHUTDOWN[:1] + job[1:]
    assert f.keep(job) == []                       # the second node's copy of the same lines
    now[0] = 61.0
    assert f.keep(job[:1]) == job[:1]              # past the window a line prints again
    # a traceback of the job's own (no quiet header before it) passes whole
    own = ["Traceback (most recent call last):", '  File "ray_trainers/estep.py", line 9', "ValueError: bad"]
    assert f.keep(own) == own


def test_a_real_ray_driver_prints_its_workers_lines_filtered():
    """ensure_ray installs the filter: a task's noise line and a twice-printed line, as the driver prints them."""
    script = """
import io, sys, time, ray
from ray_trainers.config import RayConfig, ensure_ray
ensure_ray(RayConfig(num_cpus=1))
seen = io.StringIO()
class Tee:                 # Ray prints forwarded lines to sys.stderr at call time: watch what reaches it
    def write(self, s):
        seen.write(s)
        return sys.__stderr__.write(s)
    def flush(self):
        sys.__stderr__.flush()
sys.stderr = Tee()
@ray.remote
def talk():
    print("Progress bars disabled. To enable, set it", file=sys.stderr, flush=True)
    for _ in range(2):
        print("[estep] the job's own line", file=sys.stderr, flush=True)
    return 1
ray.get(talk.remote())
deadline = time.time() + 120
while "the job's own line" not in seen.getvalue() and time.time() < deadline:
    time.sleep(0.2)
time.sleep(3)              # room for a second copy to arrive, had the filter let it through
ray.shutdown()
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("[estep] the job's own line") == 1, p.stderr[-3000:]
    assert "Progress bars disabled" not in p.stderr


# a detached Ray Train actor's monitor thread on a loaded host (make demo, 2026-12-05), as forwarded
RAY_THREAD = [
    "Exception in thread PlacementGroupCleanerMonitor:",
    "Traceback (most recent call last):",
    '  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner',
    "    self.run()",
    '  File "/v/site-packages/ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, '
    "in _monitor_loop",
    "    alive = is_actor_alive(",
    "            ^^^^^^^^^^^^^^^",
    '  File "python/ray/includes/common.pxi", line 144, in ray._raylet.check_status_timeout_as_rpc_error',
    "ray.exceptions.RpcError: Timed out while waiting for GCS to become available.",
]


def test_a_ray_thread_that_dies_prints_one_line_and_other_threads_keep_their_traceback():
    f = RayLogFilter()
    job = "[estep] round 1 structure epoch 2: structure loss 3.48"
    # the traceback split over two forwarded batches, the job's line after it
    got = f.keep(RAY_THREAD[:4]) + f.keep(RAY_THREAD[4:] + [job])
    assert got == ["[ray] Ray's background thread PlacementGroupCleanerMonitor stopped: "
                   "ray.exceptions.RpcError: Timed out while waiting for GCS to become available.", job]
    ours = ["Exception in thread loader:", "Traceback (most recent call last):",
            '  File "/work/jobs/loader.py", line 3, in run', "    raise ValueError('bad row 7')",
            "ValueError: bad row 7"]
    assert f.keep(ours) == ours                             # the job's own thread: every line
    cut = ["Exception in thread x:", "[train] next line"]  # no traceback followed: both lines as they came
    assert f.keep(cut) == cut
