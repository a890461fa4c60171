"""Validated, frozen Ray settings for the distributed jobs (scaling lives here, not in DRConfig).

DRConfig says WHAT is trained (and is hashed into every commit); RayConfig says WHERE it runs,
so the same model config trains identically on a laptop and on a cluster.
"""
from __future__ import annotations

import os
from pathlib import Path

from dataclasses import dataclass

from dr_model.config import ConfigError

from .log_filter import install as install_log_filter


def _check(cond: bool, name: str, rule: str, value: object) -> None:
    if not cond:
        raise ConfigError(f"ray config field '{name}' = {value!r}: must be {rule}")


@dataclass(frozen=True)
class RayConfig:
    """Ray cluster address and E-step scaling.

    num_workers=0 runs the training loop in the driver process (Ray Train local mode: fast
    tests, no torch.distributed); >= 1 starts that many Ray Train worker actors.
    cpus_per_worker < 1 leaves CPUs for Ray Data's read tasks on small machines (DESIGN §7:
    2 workers x 1 CPU on 2 CPUs hang because read tasks never get a CPU).
    """

    address: str | None = None              # None: start/attach a local Ray; "auto" or ray://... on a cluster
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    torch_threads: int = 1                  # intra-op threads per worker (match the CPUs it really gets)
    max_failures: int = 0                   # worker-group restarts; each restart resumes from the last checkpoint
    checkpoint_every_epoch: bool = True     # partial checkpoints inside an E-step (finer resume)
    prefetch_batches: int = 1               # Ray Data batches prepared ahead of the training step
    # True: each worker streams its shard once per call into memory (n/W x (L+W+1) int64) and
    # fully reshuffles it every epoch; False: stream from Delta every epoch with a local
    # shuffle buffer (shards larger than worker memory). Restarting Ray Data's pipeline each
    # epoch costs seconds, which dominated small epochs (see jobs/benchmarks/estep.py).
    # None (default): cache when the shard takes at most cache_shard_max_mb.
    cache_shard: bool | None = None
    cache_shard_max_mb: int = 2048
    # None: the global batch is train.batch_size, split over the workers (N workers follow the
    # single-process run: same batch, same learning rate). A number: every worker takes this many
    # samples per step whatever the cluster size, the global batch is workers x it, and the
    # learning rate follows sqrt(global / train.batch_size) (the square-root rule for Adam:
    # Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms").
    batch_per_worker: int | None = None
    # Only used when this process starts a local Ray (address None and Ray not yet up).
    num_cpus: int | None = None
    object_store_memory: int | None = None

    def cache(self, num_samples: int, seq_len: int, width: int) -> bool:
        """Cache a worker's shard in memory? (n / workers samples x (L + W + 1) int64)"""
        if self.cache_shard is not None:
            return self.cache_shard
        mb = num_samples / max(self.num_workers, 1) * (seq_len + width + 1) * 8 / 2 ** 20
        return mb <= self.cache_shard_max_mb

    def batch(self, batch_size: int, lr: float, world: int) -> tuple[int, int, float]:
        """(per-worker batch, global batch, learning rate) for `world` workers."""
        if self.batch_per_worker is None:
            return -(-batch_size // world), batch_size, lr
        total = self.batch_per_worker * world
        return self.batch_per_worker, total, lr * (total / batch_size) ** 0.5

    def __post_init__(self) -> None:
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "an integer >= 0", self.num_workers)
        _check(self.cpus_per_worker > 0, "cpus_per_worker", "> 0", self.cpus_per_worker)
        _check(isinstance(self.torch_threads, int) and self.torch_threads >= 1, "torch_threads", "an integer >= 1", self.torch_threads)
        _check(isinstance(self.max_failures, int) and self.max_failures >= -1, "max_failures", "an integer >= -1 (-1: unlimited)", self.max_failures)
        _check(self.batch_per_worker is None or (isinstance(self.batch_per_worker, int) and self.batch_per_worker >= 1),
               "batch_per_worker", "None or an integer >= 1", self.batch_per_worker)
        _check(self.cache_shard in (None, True, False), "cache_shard", "None (auto), true or false", self.cache_shard)
        _check(isinstance(self.cache_shard_max_mb, int) and self.cache_shard_max_mb >= 0, "cache_shard_max_mb",
               "an integer >= 0", self.cache_shard_max_mb)
        _check(isinstance(self.prefetch_batches, int) and self.prefetch_batches >= 0, "prefetch_batches", "an integer >= 0", self.prefetch_batches)
        _check(self.num_cpus is None or (isinstance(self.num_cpus, int) and self.num_cpus >= 1), "num_cpus", "None or an integer >= 1", self.num_cpus)
        _check(self.object_store_memory is None or self.object_store_memory >= 75 * 2 ** 20,
               "object_store_memory", "None or >= 75 MiB (Ray's minimum)", self.object_store_memory)


def quiet_ray() -> None:
    """Keep Ray's own chatter out of a job's log (this process): progress bars, per-operator INFO
    lines and deprecation warnings of Ray Data, the auth-token notice. The job logs what happened."""
    import logging
    import warnings

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # noqa: BLE001 - an older or newer Ray Data without these knobs: noisier, not wrong
        pass


def ray_environment() -> None:
    """Environment defaults for every Ray process this job starts or attaches to (set before ray.init)."""
    # No usage telemetry: our machines have no internet, and its GCS key-value writes from inside
    # Ray Data's execution were seen to hang a test run (2026-11-30).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train routes a worker's print() through its logger AND the original stream, so every
    # progress line reached the driver twice: plain prints only (Train copies these variables
    # from the driver's environment into its workers, so they apply to an attached Ray too).
    # The preemption watcher only matters on spot-instance clusters.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Data's per-dataset lines from the executing processes (their loggers are not this
    # process's): its own config, console at ERROR; processes of a local Ray inherit it.
    data_logging = Path(__file__).with_name("ray_data_logging.yaml")
    if data_logging.exists():
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(data_logging))


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to / start Ray once per process (dashboard off); a no-op when Ray is already up.

    Every Ray process of the job logs at ERROR (ray.LoggingConfig): the Train controller's
    state-API warnings (they need the dashboard) and per-report INFO lines are noise here; the
    training loop's own progress lines are prints and still reach the driver.
    """
    import ray

    quiet_ray()
    ray_environment()
    if ray.is_initialized():
        return
    # without an address: a new local Ray, never one found on the machine (ray.init(None) attaches to the
    # last cluster started here, /tmp/ray/ray_current_cluster, even a dead one: a job then hangs)
    ray.init(address=cfg.address or "local", num_cpus=cfg.num_cpus if cfg.address is None else None,
             object_store_memory=cfg.object_store_memory if cfg.address is None else None,
             include_dashboard=False, configure_logging=False,
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    # what the cluster's processes print reaches this driver without Ray's own chatter
    install_log_filter()
