"""The E-step on Ray Train: data-parallel training of dr_model's DRModel against a pinned item_paths.

Inputs are pinned Delta versions, and nothing catalog-sized passes through the driver on the way
in: `samples_train` is streamed to the workers by Ray Data; the training pairs per item (the
sampled softmax's proposal) are an aggregation (Ray Data groupby) kept in the object store;
every worker reads the `item_paths` files itself, batch by batch, into the model's vocabulary +
path table [V, J]. Each worker streams its shard once per call into memory and reshuffles it
fully every epoch when it fits (RayConfig.cache_shard / cache_shard_max_mb), else streams it
from Delta every epoch through a local shuffle buffer. Every worker runs
dr_model.trainer.train_step (the same update as the single-process trainer) on its shard with
the per-worker batch batch_size / num_workers, and gradients are averaged between backward and
the optimizer step, so N workers follow the global batch of the single-process loop; with
RayConfig.batch_per_worker every worker's batch is fixed instead (global batch = workers x it,
learning rate scaled by sqrt(global / batch_size)).

Per-worker memory: the model's item tables follow model.item_rows, not the catalog (exact rows
for the most frequent items, quotient-remainder rows for the rest: dr_model.item_table), with
lazy Adam's two moments per row; what grows with the catalog is 8 (J + 1) bytes per item for the
vocabulary and paths, 8 for the counts, 16 for the proposal and its log-Q table and 16 for the
four tables' exact-row maps: 72 bytes per item at J = 3 (0.7 GB at 10^7 items, 7 GB at 10^8).
A step exchanges the dense layers' gradients, the touched rows of the reranker's item table and,
for each mean-pool encoder, its samples' (history, pooled gradient) (grad_sync.GradSync), so its
traffic follows the batch.

Phases follow dr_model.schedule: each ends at its most epochs or when the validation users'
recall@k (computed by rank 0 after every epoch, broadcast to the others so every rank takes
the same decision) stops improving. The validation users (<= split.valid_users rows) travel
through the object store; the decisions are a function of the per-epoch history, which the
checkpoints keep, so a resumed round takes the same ones.

Gradients are averaged by grad_sync.GradSync (why not DDP: its module doc); the same exchange
carries a "had a batch" flag, so workers whose shard ran out keep stepping with the others'
average (DDP's Join). Workers on one host exchange through shared memory (shm_exchange.py),
others through gloo.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import torch

from dr_model.best_weights import BestWeights, best_epoch, kept_note
from dr_model.config import DRConfig
from dr_model.encoders import pooled_encoders
from dr_model.evaluation import EvalUsers
from dr_model.state_file import checkpoint_state, open_state
from dr_model.schedule import Phase, phase_finished, remaining, schedule
from dr_model.optim import sparse_tables
from dr_model.warm_start import grow_state
from dr_model.trainer import (Validation, Vocab, epoch_line, new_model, phase_optimizer, proposal, rows_per_step,
                              train_step, unfreeze)

from .checkpoint import (CheckpointMeta, CheckpointMismatch, checked_meta, final_checkpoint, latest_partial,
                         load_checkpoint, read_meta, run_dir)
from .config import RayConfig, ensure_ray
from .estep_state import phase_rows, resolve_start, resumed_best, save_progress
from .estep_data import (Tables, batch_tensors, count_vector, item_paths_files, load_item_paths,
                         read_item_paths, read_shard, samples_dataset, shuffled_batches, target_counts)
from .faults import hold_target, maybe_hold
from .grad_sync import GradSync

Log = Callable[[str], None]
# a long epoch prints where it is at most this often (rank 0)
PROGRESS_EVERY_S = 60.0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EStepResult:
    """What one round's E-step produced; its model pairs with item_paths_version only.

    The model stays in its checkpoint: model_state and item_ids open it (memory-mapped) only
    when read, so a driver that hands the checkpoint to Spark tasks never holds its item rows.
    """

    checkpoint_path: str
    complete: bool                          # False when stopped early (stop_after_epochs)
    losses: list[dict[str, Any]]            # one row per epoch of the round (resumed epochs included)
    item_paths_version: int
    epochs_trained: int                     # epochs run by this call (0: the round was already done)
    resumed_from: str | None                # checkpoint this call continued (or warm-started) from
    dropped_samples: int                    # samples whose target has no paths in item_paths (skipped)
    num_items: int                          # V: the model's items

    @cached_property
    def _state(self) -> dict[str, Any]:
        return open_state(checkpoint_state(self.checkpoint_path))

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self._state["model"]

    @property
    def item_ids(self) -> np.ndarray:
        """[V] raw item ids in model-index order."""
        return self._state["item_ids"].numpy()


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (Linux reports KB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _agree(value: float | None, distributed: bool) -> float | None:
    """Rank 0's validation figure on every rank (nan travels for 'none')."""
    if not distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return None if math.isnan(float(t)) else float(t)


def train_loop(c: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker body: resume/warm-start, then the round's phases until each ends; rank 0 checkpoints."""
    import ray
    import ray.train
    import torch.distributed as dist

    torch.set_num_threads(c["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    cfg = DRConfig.from_dict(c["config"])
    item_ids, assign = read_item_paths(c["item_paths_files"], cfg.model.J, f"item_paths version {c['item_paths_version']}")
    vocab = Vocab(item_ids)
    valid_users = ray.get(c["valid_users"])
    counts, in_vocab = count_vector(c["counts"], vocab)
    c["dropped"] = dropped = c["num_samples"] - in_vocab     # targets without paths: skipped by every epoch
    if rank == 0 and dropped:
        _stderr(f"[estep] round {c['round']}: {dropped} samples have a target without paths in item_paths "
                f"v{c['item_paths_version']}; they are skipped")
    phases = [Phase(**p) for p in c["phases"]]
    total = sum(p.epochs for p in phases)
    tc = cfg.train
    check = (Validation(valid_users, vocab, cfg.eval.k, cfg.search.beam)
             if rank == 0 and valid_users is not None and len(valid_users) else None)
    root, em_round = c["root"], c["round"]
    if final_checkpoint(root, em_round) is not None:
        return {"epochs_done": total}           # a restarted worker group after the round finished

    torch.manual_seed(cfg.train.seed)
    model = new_model(cfg, vocab.size, counts)
    resume, warm = resolve_start(root, em_round, c)
    epochs_done, opt_state, history, trained, best_state = 0, None, [], 0, None
    if resume is not None:
        ck = load_checkpoint(resume, c["item_paths_version"], c["samples_version"], c["config_hash"], optimizer=True)
        model.load_state_dict(ck.model_state)
        epochs_done, opt_state, history = ck.meta.epochs_done, ck.optimizer_state, list(ck.meta.losses)
        best_state = ck.best_state
        if rank == 0:
            _stderr(f"[estep] round {em_round}: resuming from {resume} after {epochs_done} of {total} epochs")
    elif warm is not None and warm == c.get("warm_from"):
        # Another run's model (an incremental night): its items keep their rows, new items start fresh.
        ck = load_checkpoint(warm, None)
        moved = grow_state(model, ck.model_state, ck.item_ids, item_ids, torch.from_numpy(counts))
        if rank == 0:
            _stderr(f"[estep] round {em_round}: warm start from {warm} ({len(ck.item_ids)} -> {len(item_ids)} items; "
                    f"tensors {moved})")
    elif warm is not None:
        # The previous round's model, trained against the previous paths: an initialisation only.
        ck = load_checkpoint(warm, None)
        if not np.array_equal(ck.item_ids, item_ids):
            raise CheckpointMismatch(f"warm start {warm}: its item vocabulary differs from item_paths "
                                     f"version {c['item_paths_version']}")
        model.load_state_dict(ck.model_state)
        if c["seed_structure_encoder"] and model.seed_structure_encoder() and rank == 0:
            _stderr(f"[estep] round {em_round}: the structure encoder starts from the reranker's")
    if distributed:
        for t in model.state_dict().values():   # identical by seed/checkpoint; make it certain
            dist.broadcast(t, 0)

    q, log_q = proposal(torch.from_numpy(counts), cfg)
    assign_np = np.array(assign)
    assign_t = torch.from_numpy(assign_np)
    bs, global_bs, lr = RayConfig(batch_per_worker=c["batch_per_worker"]).batch(tc.batch_size, tc.lr, world)
    shard = ray.train.get_dataset_shard("train")
    L = cfg.model.seq_len
    budget = c["stop_after_epochs"]
    opt, cur_phase, sync = None, -1, None
    cache: tuple[torch.Tensor, torch.Tensor] | None = None
    while True:
        todo = remaining(phases, history, tc.patience, tc.min_delta)
        if not todo or (budget is not None and budget <= 0):
            break
        i, ph, ep = todo[0]
        if i != cur_phase:
            # A new phase: (un)freeze, fresh Adam over the trainable set (as the single-process
            # trainer does), and a gradient sync over exactly those parameters.
            opt = phase_optimizer(model, cfg, ph, lr)
            best = BestWeights()
            if opt_state is not None and ep > 0 and trained == 0:
                opt.load_state_dict(opt_state)  # resuming inside this phase
                best = resumed_best(model, phase_rows(history, i), best_state)
            cur_phase = i
            if sync is not None:
                sync.close()
            sync = (GradSync([p for p in model.parameters() if p.requires_grad], tables=sparse_tables(model),
                             max_rows=rows_per_step(cfg, bs), pooled=pooled_encoders(model), max_samples=bs,
                             seq_len=cfg.model.seq_len) if distributed else None)
            if rank == 0 and sync is not None:
                _stderr(f"[estep] {ph.name} phase: gradient sync over {sync.transport} ({world} workers, "
                        f"at most {sync.capacity_bytes / 2 ** 20:.1f} MB per step and worker)")
        gen = torch.Generator().manual_seed(_seed(ph.seed, ep, rank))
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)   # structure loss * n, rerank loss * n, n
        sync_at = (sync.steps, sync.bytes_sent) if sync is not None else (0, 0)
        t0 = time.perf_counter()
        if c["cache_shard"]:
            if cache is None:
                cache = read_shard(shard, vocab, L, c["prefetch_batches"], tc.rerank_targets)
            batches = shuffled_batches(*cache, bs, _seed(ph.seed, ep, rank, 7))
        else:
            batches = (batch_tensors(b, vocab, L, tc.rerank_targets)[:2] for b in shard.iter_batches(
                batch_size=bs, batch_format="pyarrow", prefetch_batches=c["prefetch_batches"],
                local_shuffle_buffer_size=c["shuffle_buffer"], local_shuffle_seed=_seed(ph.seed, ep, 7)))
        next_note = t0 + PROGRESS_EVERY_S
        for step, (seq, target) in enumerate(batches):
            if len(target) == 0:
                continue
            s, r = train_step(model, opt, seq, target, assign_t, q, log_q, tc.negatives, ph, gen, sync)
            if step == 0 and resume is None:       # a test's node kill lands mid-epoch (faults.py)
                maybe_hold(c["hold"], em_round, epochs_done + 1, rank, _stderr)
            n = len(target)
            sums[0] += (s if ph.train_structure else 0.0) * n
            sums[1] += (r if ph.train_reranker else 0.0) * n
            sums[2] += n
            if rank == 0 and step % 64 == 0 and time.perf_counter() > next_note:
                # a long epoch says where it is: rank 0's share of the samples, the rate, the time left
                next_note = time.perf_counter() + PROGRESS_EVERY_S
                share, rate = c["num_samples"] / world, float(sums[2]) / (time.perf_counter() - t0)
                _stderr(f"[estep] round {em_round} {ph.name} epoch {ep + 1}: {int(sums[2]):,} of ~{int(share):,} "
                        f"samples ({rate:.0f}/s per worker), ~{max(share - float(sums[2]), 0) / rate / 60:.1f} min "
                        f"left in the epoch")
        peak = torch.tensor([_peak_rss_mb()])
        if sync is not None:
            while sync.join(opt):
                pass
            dist.all_reduce(sums)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        secs = time.perf_counter() - t0
        epochs_done += 1
        trained += 1
        if budget is not None:
            budget -= 1
        model.eval()
        valid = _agree(check(model, ph, assign_np) if check is not None else None, distributed)
        model.train()
        row = {"phase": ph.name, "phase_index": i, "epoch": ep, "round_epoch": epochs_done - 1,
               "structure_loss": float(sums[0] / max(sums[2], 1)) if ph.train_structure else None,
               "rerank_loss": float(sums[1] / max(sums[2], 1)) if ph.train_reranker else None,
               "valid_recall": valid, "samples": int(sums[2]), "seconds": secs,
               "samples_per_s": float(sums[2]) / secs, "workers": world, "global_batch": global_bs, "lr": lr,
               "grad_sync": None if sync is None else sync.transport,
               "sync_bytes_per_step": (None if sync is None else
                                       (sync.bytes_sent - sync_at[1]) / max(sync.steps - sync_at[0], 1)),
               "sync_capacity_bytes": None if sync is None else sync.capacity_bytes,
               "peak_worker_rss_mb": float(peak)}
        history.append(row)
        rows = phase_rows(history, i)
        best.after_epoch(model, rows)
        ended = phase_finished(rows, ph, tc.patience, tc.min_delta)
        kept = best.restore(model, rows) if ended else None     # every rank: the models stay identical
        finished = not remaining(phases, history, tc.patience, tc.min_delta)
        if rank == 0:
            # saved before the epoch is logged: a logged epoch is one a restart resumes after
            if c["checkpoint_every_epoch"] or finished:
                save_progress(c, cfg, model, opt, item_ids, epochs_done, total, history, finished, best, rows)
            _stderr(f"[estep] round {em_round} {epoch_line(row)}, {row['samples']} samples "
                    f"({row['samples_per_s']:.0f}/s, {world} worker(s))"
                    + (f"; {ph.name} phase ended after {ep + 1} epochs" if ended else "")
                    + ("" if kept is None else f", {kept_note(rows, kept)}")
                    + ("" if finished else f"; at most {total - epochs_done} epochs left in the round "
                                           f"(~{(total - epochs_done) * secs / 60:.1f} min)"))
    if sync is not None:
        sync.close()
    unfreeze(model)
    finished = not remaining(phases, history, tc.patience, tc.min_delta)
    if rank == 0 and trained and not c["checkpoint_every_epoch"] and not finished:
        # stopped early: keep the progress
        save_progress(c, cfg, model, opt, item_ids, epochs_done, total, history, False, best, phase_rows(history, cur_phase))
    return {"epochs_done": epochs_done}


# --------------------------------------------------------------------------------------------
# Driver entry point
# --------------------------------------------------------------------------------------------


def run_estep(warehouse: Tables, run_id: str, em_round: int, cfg: DRConfig, ray_cfg: RayConfig,
              samples_version: int, item_paths_version: int, phases: list[Phase] | None = None,
              stop_after_epochs: int | None = None, valid_users: EvalUsers | None = None,
              warm_from: str | None = None, log: Log = _stderr) -> EStepResult:
    """Train round `em_round`'s E-step (or resume it) and return its checkpoint + per-epoch losses.

    valid_users: the held-out users whose recall@k ends each phase (dr_model.schedule); without
    them every phase runs its most epochs.

    Resume: a finished checkpoint of this round is returned as is (no training); otherwise the
    latest in-progress checkpoint of this round is continued; otherwise the previous round's
    finished model is the starting point (warm start) or, in round 0, a fresh seeded model.
    Both refuse (CheckpointMismatch) state trained against another item_paths/samples version
    or config. warm_from: another run's finished checkpoint to start from when this run has none
    (an incremental night; item rows follow the vocabulary, dr_model.warm_start). `stop_after_epochs` stops after that many epochs (time-boxed runs, tests).
    """
    root = run_dir(warehouse.root, run_id)
    phases = schedule(cfg, em_round) if phases is None else phases
    done = final_checkpoint(root, em_round)
    if done is not None:
        meta = checked_meta(done, item_paths_version, samples_version, cfg.hash())
        log(f"[estep] round {em_round}: finished checkpoint {done} exists, nothing to train")
        return _result(done, meta, 0, done)

    import ray
    from ray.train import DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(ray_cfg)
    files = item_paths_files(warehouse, item_paths_version)
    num_items = warehouse.rows("item_paths", item_paths_version) // cfg.model.J
    ds = samples_dataset(warehouse, samples_version, with_next=cfg.train.rerank_targets > 1)
    num_samples = ds.count()
    conf = {
        "config": cfg.to_dict(), "config_hash": cfg.hash(), "root": root, "run_id": run_id, "round": em_round,
        "item_paths_version": item_paths_version, "samples_version": samples_version,
        "phases": [asdict(p) for p in phases], "stop_after_epochs": stop_after_epochs,
        "item_paths_files": files, "counts": target_counts(ds), "num_samples": num_samples,
        "cache_shard": ray_cfg.cache(num_samples, cfg.model.seq_len, cfg.train.rerank_targets),
        "valid_users": ray.put(valid_users),
        "torch_threads": ray_cfg.torch_threads, "prefetch_batches": ray_cfg.prefetch_batches,
        "batch_per_worker": ray_cfg.batch_per_worker,
        "checkpoint_every_epoch": ray_cfg.checkpoint_every_epoch,
        "shuffle_buffer": max(4 * cfg.train.batch_size, 1024),
        # round 1 is the structure model's first round (round 0 trained the reranker)
        "seed_structure_encoder": em_round == 1 and warm_from is None,
        "warm_from": warm_from,
        "hold": hold_target(),
    }
    resume, warm = resolve_start(root, em_round, conf)
    prev = 0 if resume is None else read_meta(resume).epochs_done    # read now: finishing removes partials
    log(f"[estep] round {em_round}: {num_items} items x J={cfg.model.J} (item_paths v{item_paths_version}), "
        f"samples_train v{samples_version}, {ray_cfg.num_workers} worker(s), schedule "
        + ", ".join(f"{p.name} (at most {p.epochs} epochs)" for p in phases)
        + (f"; resuming {resume}" if resume else f"; warm start from {warm}" if warm else ""))
    # Deterministic block order: same seed -> same batches, so a resumed run retraces an uninterrupted one.
    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    ds.context.execution_options.preserve_order = True     # local mode iterates the dataset itself
    trainer = TorchTrainer(
        train_loop, train_loop_config=conf,
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"estep-{run_id}-round-{em_round}", storage_path=f"{root}/_ray",
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": ds}, dataset_config=DataConfig(execution_options=opts))
    t0 = time.perf_counter()
    trainer.fit()
    log(f"[estep] round {em_round}: Ray Train finished in {time.perf_counter() - t0:.1f}s")
    path = final_checkpoint(root, em_round) or latest_partial(root, em_round)
    if path is None:
        raise RuntimeError(f"E-step round {em_round} of run {run_id} left no checkpoint under {root}")
    meta = checked_meta(path, item_paths_version, samples_version, cfg.hash())
    rows = meta.losses[prev:]
    if rows:                                   # the workers printed every epoch as it ended
        phase = phase_rows(meta.losses, rows[-1].get("phase_index"))
        b = best_epoch(phase)
        kept = "" if b is None or b == len(phase) - 1 else f"; the phase kept epoch {b + 1}'s weights"
        log(f"[estep] round {em_round}: {len(rows)} epochs trained, last {epoch_line(rows[-1])}{kept}")
    return _result(path, meta, meta.epochs_done - prev, resume or warm)


def _result(path: str, meta: CheckpointMeta, trained: int, resumed_from: str | None) -> EStepResult:
    res = EStepResult(checkpoint_path=path, complete=meta.complete, losses=list(meta.losses),
                      item_paths_version=meta.item_paths_version, epochs_trained=trained,
                      resumed_from=resumed_from, dropped_samples=meta.dropped_samples, num_items=meta.num_items)
    if not meta.complete:
        # the call that finishes the round removes this partial checkpoint: open it now (a local
        # file's mapping outlives the file, and mapping it costs no memory until it is read)
        res._state
    return res


# the data readers live in estep_data; callers import them from here too
__all__ = ["EStepResult", "run_estep", "train_loop", "Tables", "load_item_paths", "read_item_paths", "samples_dataset",
           "batch_tensors", "count_vector", "shuffled_batches"]
