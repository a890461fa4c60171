"""Single-process EM trainer: E-step phases -> s[v,c] by beam search -> calibrated penalized M-step.

The E-step's one-batch update (`train_step`), a phase's epochs (`run_phase`) and the scoring
pass (`pair_scores`) are the pieces the distributed jobs reuse; `train_em` strings them
together for tests, `dr local-train` and the benchmarks, in the order `dr train` runs them:

  round 0   the reranker (dr_model.schedule), early-stopped on the validation users
  paths     from the reranker's item embeddings (dr_model.init_paths), or balanced random
  round r   structure model against the paths -> s[v,c] (+ exploration paths) -> M-step with
            alpha calibrated to the retrieval budget (dr_model.calibrate), r = 1..em_rounds
  final     structure model against the final paths (the model and paths always pair)
  beam      the retrieval beam that fits the budget on the validation users
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .beam_choice import BeamChoice
from .best_weights import BestWeights, kept_note
from .calibrate import is_collapsed, start_path_size, with_exploration
from .config import DRConfig
from .evaluation import EvalUsers, choose_beam, evaluate_users, validation_path_recall, validation_recall
from .index import PathIndex
from .init_paths import paths_from_embeddings
from .model import DRModel
from .optim import HybridAdam, sparse_tables
from .mstep import MStepResult, effective_block, initial_assignment, mstep_blocked
from .sampling import Proposal
from .schedule import Phase, schedule, should_stop
from .scores import PathScores, aggregate_pairs
from .vocab import Vocab

Log = Callable[[str], None]


@dataclass
class EMResult:
    """A trained model, its vocabulary, the item_paths it was trained against and its retrieval beam."""

    model: DRModel
    vocab: Vocab
    assign: np.ndarray                      # [V, J] paths of model indices
    history: list[dict] = field(default_factory=list)
    beam: int = 0                           # retrieval beam chosen for the budget (0: search.beam)
    alpha: float | None = None              # the last M-step's alpha
    beam_choice: BeamChoice | None = None   # how the beam was chosen (None: no validation users)

    def index(self) -> PathIndex:
        return PathIndex.build(self.assign)


def sampled_softmax(cfg: DRConfig, num_items: int) -> bool:
    """Does a catalog of num_items train the reranker by sampled softmax (and so with sparse item tables)?"""
    return num_items > cfg.train.full_softmax_max_items


def new_model(cfg: DRConfig, num_items: int, counts: torch.Tensor | np.ndarray | None = None) -> DRModel:
    """The model the E-step trains: sparse item tables exactly where the reranker samples its negatives;
    counts [V] (training pairs per item) pick the items that keep exact rows in budgeted tables."""
    if counts is not None:
        counts = torch.as_tensor(counts)
    return DRModel(cfg.model, num_items, sparse=sampled_softmax(cfg, num_items), counts=counts)


def phase_optimizer(model: DRModel, cfg: DRConfig, phase: Phase, lr: float | None = None) -> HybridAdam:
    """Freeze/unfreeze each tower for the phase, then (lazy) Adam over the trainable parameters only
    (at train.lr unless given)."""
    for p in model.reranker_parameters():
        p.requires_grad_(phase.train_reranker)
    for p in model.structure_parameters():
        p.requires_grad_(phase.train_structure)
    params = [p for p in model.parameters() if p.requires_grad]
    return HybridAdam(params, sparse_tables(model), lr=cfg.train.lr if lr is None else lr,
                      weight_decay=cfg.train.weight_decay)


def unfreeze(model: DRModel) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def proposal(counts: torch.Tensor, cfg: DRConfig) -> tuple[Proposal | None, torch.Tensor | None]:
    """Negative-sampling proposal (q, log_q [V]) from the training pairs per item counts [V];
    (None, None) where the exact softmax is used."""
    if not sampled_softmax(cfg, counts.shape[0]):
        return None, None
    q = Proposal(counts)
    return q, q.log_q(cfg.train.negatives)


def rows_per_step(cfg: DRConfig, batch: int) -> int:
    """The most rows of one item table a train_step of `batch` samples touches: the encoders' inputs
    (batch x L) or the reranker's targets and negatives (batch x W + negatives)."""
    tc = cfg.train
    return max(batch * cfg.model.seq_len, batch * tc.rerank_targets + tc.negatives)


def first_target(target: torch.Tensor) -> torch.Tensor:
    """target [N] or [N, W] -> [N], the next item of each sample."""
    return target if target.dim() == 1 else target[:, 0]


def train_step(model: DRModel, opt: HybridAdam, seq: torch.Tensor, target: torch.Tensor,
               assign_t: torch.Tensor, q: Proposal | None, log_q: torch.Tensor | None, negatives: int,
               phase: Phase, gen: torch.Generator,
               sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """One E-step batch: seq [N, L], target [N] or [N, W] -> (structure loss or nan, rerank loss or nan).

    target [N, W]: column 0 is the next item (the structure model's target), the reranker learns
    all W (-1 = none). q None: the reranker trains with the exact softmax. `sync` runs between backward and the
    optimizer step (data-parallel gradient averaging).
    """
    opt.zero_grad(set_to_none=True)
    nan = torch.tensor(float("nan"))
    loss_s, loss_r = nan, nan
    loss = torch.zeros(())
    if phase.train_structure:
        loss_s = model.structure_loss(seq, assign_t[first_target(target)])
        loss = loss + loss_s
    if phase.train_reranker:
        neg = q.sample(negatives, gen) if q is not None else None
        loss_r = model.rerank_loss(seq, target, neg, log_q)
        loss = loss + loss_r
    loss.backward()
    if sync is not None:
        sync()
    opt.step()
    return float(loss_s.detach()), float(loss_r.detach())


@dataclass(frozen=True)
class Validation:
    """Held-out users that end a phase: recall@k of brute force over the reranker (phases that train
    it), else the share of their truth items the beam's `beam` paths reach (the structure model's)."""

    users: EvalUsers
    vocab: Vocab
    k: int
    beam: int

    def __call__(self, model: DRModel, phase: Phase, assign: np.ndarray) -> float:
        if phase.train_reranker:
            return validation_recall(model, self.vocab, self.users, self.k)
        return validation_path_recall(model, self.vocab, self.users, PathIndex.build(assign), self.beam)


def epoch_line(row: dict) -> str:
    """One progress line of an epoch's history row."""
    parts = []
    if row.get("structure_loss") is not None:
        parts.append(f"structure loss {row['structure_loss']:.4f}")
    if row.get("rerank_loss") is not None:
        parts.append(f"rerank loss {row['rerank_loss']:.4f}")
    if row.get("valid_recall") is not None:
        what = "validation recall" if row.get("rerank_loss") is not None else "validation path recall"
        parts.append(f"{what} {row['valid_recall']:.4f}")
    return f"{row['phase']} epoch {row['epoch'] + 1}: " + ", ".join(parts) + f" [{row['seconds']:.1f}s]"


def run_phase(model: DRModel, seq: torch.Tensor, target: torch.Tensor, assign: np.ndarray, cfg: DRConfig,
              phase: Phase, valid: Validation | None, log: Log) -> list[dict]:
    """Train one phase over all samples (seq [N, L], target [N] or [N, W]) until it ends -> per-epoch history rows."""
    tc = cfg.train
    gen = torch.Generator().manual_seed(phase.seed)
    opt = phase_optimizer(model, cfg, phase)
    q, log_q = proposal(torch.bincount(first_target(target), minlength=model.num_items), cfg)
    assign_t = torch.from_numpy(assign)
    rows: list[dict] = []
    best = BestWeights()
    for ep in range(phase.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(target), generator=gen)
        ls, lr = [], []
        for lo in range(0, len(perm), tc.batch_size):
            b = perm[lo: lo + tc.batch_size]
            s, r = train_step(model, opt, seq[b], target[b], assign_t, q, log_q, tc.negatives, phase, gen)
            ls.append(s)
            lr.append(r)
        row = {"phase": phase.name, "epoch": ep,
               "structure_loss": float(np.mean(ls)) if phase.train_structure else None,
               "rerank_loss": float(np.mean(lr)) if phase.train_reranker else None,
               "valid_recall": valid(model, phase, assign) if valid is not None else None,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        best.after_epoch(model, rows)
        log("  " + epoch_line(row))
        if should_stop([r["valid_recall"] for r in rows], tc.patience, tc.min_delta):
            log(f"  {phase.name}: validation recall stopped improving, stopping after {ep + 1} epochs")
            break
    kept = best.restore(model, rows)
    if kept is not None:
        log(f"  {phase.name}: {kept_note(rows, kept)}")
    unfreeze(model)
    model.eval()
    return rows


def pair_scores(model: DRModel, seq: torch.Tensor, target: np.ndarray, S: int, batch_size: int,
                assign: np.ndarray | None = None) -> PathScores:
    """Beam search (beam S) on every training pair, p(c|x) summed per item -> s[v,c], top S (+ J) per item.

    With the current assignment [V, J], every pair also scores its target's own J paths
    (DRModel.beam_and_own) and the lists keep S + J paths per item.
    """
    paths, probs = [], []
    own_all = torch.from_numpy(assign[target]) if assign is not None else None
    for lo in range(0, seq.shape[0], batch_size):
        own = own_all[lo: lo + batch_size] if own_all is not None else None
        p, lp = model.beam_and_own(seq[lo: lo + batch_size], S, own)
        paths.append(p.numpy())
        probs.append(lp.double().exp().numpy())
    width = S + (assign.shape[1] if assign is not None else 0)
    return aggregate_pairs(target, np.concatenate(paths), np.concatenate(probs), width)


def initial_paths(model: DRModel, cfg: DRConfig, num_items: int) -> np.ndarray:
    """Round 1's paths [V, J]: balanced k-means of the reranker's item embeddings, or balanced random."""
    mc = cfg.model
    if cfg.train.init_paths == "embeddings":
        emb = model.reranker.item_vectors().detach().numpy()
        return paths_from_embeddings(emb, mc.K, mc.D, mc.J, cfg.search.target_path_size(num_items, cfg.eval.k),
                                     cfg.train.seed)
    return initial_assignment(num_items, mc.J, mc.num_paths, cfg.train.seed)


def given_start(model: DRModel, cfg: DRConfig, start: np.ndarray, counts: np.ndarray,
                log: Log) -> tuple[np.ndarray, bool]:
    """A given start [V, J] (counts [V]: training pairs per item) -> (paths [V, J], re-seeded): re-seeded from
    the embeddings if it is collapsed."""
    start = np.asarray(start, dtype=np.int64)
    size = start_path_size(counts, start, cfg.model.num_paths)
    target = cfg.search.target_path_size(start.shape[0], cfg.eval.k)
    if cfg.train.init_paths == "embeddings" and is_collapsed(size, target, cfg.train.collapse_factor):
        log(f"[em] the given paths are collapsed (path size {size:.1f} > {cfg.train.collapse_factor:g} x the target "
            f"{target:.1f}): re-seeded from the reranker's item embeddings")
        return initial_paths(model, cfg, start.shape[0]), True
    return start, False


def mstep(ps: PathScores, assign: np.ndarray, cfg: DRConfig, num_items: int, alpha0: float | None) -> MStepResult:
    """The M-step of one EM round on s[v,c] (exploration paths added), alpha calibrated to the budget."""
    mc = cfg.model
    ps_x = with_exploration(ps, mc.K, mc.D, cfg.mstep.explore, cfg.mstep.explore_score, cfg.train.seed)
    ms_cfg = replace(cfg.mstep, block_size=effective_block(cfg.mstep.block_size, len(ps)))
    return mstep_blocked(ps_x, assign[ps.items], mc.num_paths, ms_cfg, damping=cfg.mstep.damping,
                         target_size=cfg.search.target_path_size(num_items, cfg.eval.k), alpha0=alpha0)


def evaluate(res: EMResult, users: EvalUsers, cfg: DRConfig, train: tuple[np.ndarray, np.ndarray] | None = None,
             valid: EvalUsers | None = None) -> dict:
    """The evaluation report (dr_model.evaluation) of a trained EMResult at its retrieval beam."""
    return evaluate_users(res.model, res.vocab.ids, res.index(), users, cfg, train, valid, beam=res.beam or None)


def train_em(train_hist: np.ndarray, train_target: np.ndarray, cfg: DRConfig, log: Log = print,
             on_round: Callable[[int, EMResult], None] | None = None, valid: EvalUsers | None = None,
             start: np.ndarray | None = None, train_next: np.ndarray | None = None) -> EMResult:
    """train_hist [N, L] raw ids (-1 pad), train_target [N] raw ids -> trained EMResult.

    train_next [N, W] raw ids (Split.train_next): the reranker's targets (column 0 = train_target);
    None: the next item only.
    valid: held-out users that end each phase and choose the retrieval beam (without them
    every phase runs its maximum epochs and the beam is search.beam). start [V, J]: round 1's
    paths (model indices, vocabulary = sorted unique targets) instead of initial_paths.
    """
    torch.manual_seed(cfg.train.seed)
    vocab = Vocab(np.unique(train_target))
    seq = vocab.seq(train_hist)
    target_np = vocab.index(train_target)
    target = torch.from_numpy(target_np if train_next is None else vocab.index(train_next[:, :cfg.train.rerank_targets]))
    mc, V = cfg.model, vocab.size
    model = new_model(cfg, V, np.bincount(target_np, minlength=V))
    res = EMResult(model, vocab, initial_assignment(V, mc.J, mc.num_paths, cfg.train.seed))
    check = Validation(valid, vocab, cfg.eval.k, cfg.search.beam) if valid is not None and len(valid) else None
    budget = cfg.search.budget(V, cfg.eval.k)
    log(f"[em] {len(target)} training pairs, {V} items, K={mc.K} D={mc.D} J={mc.J}, {cfg.train.em_rounds} EM rounds; "
        f"budget {budget} items per user (target path size {cfg.search.target_path_size(V, cfg.eval.k):.1f} "
        f"at beam {cfg.search.beam})")

    def phases(r: int) -> list[dict]:
        rows = []
        for ph in schedule(cfg, r):
            rows += run_phase(model, seq, target, res.assign, cfg, ph, check, log)
        return rows

    t0 = time.perf_counter()
    log("[em] round 0: reranker" + (" and structure model" if cfg.train.init_paths == "random" else ""))
    hist0 = phases(0)
    how = cfg.train.init_paths
    if start is None:
        res.assign = initial_paths(model, cfg, V)
    else:
        res.assign, reseeded = given_start(model, cfg, start, np.bincount(target_np, minlength=V), log)
        how = "given, collapsed: re-seeded from embeddings" if reseeded else "given"
    if model.seed_structure_encoder():
        log("[em] structure encoder starts from the reranker's")
    log(f"[em] initial paths ({how}): {len(np.unique(res.assign))} non-empty paths, largest "
        f"{np.bincount(res.assign.ravel()).max()}")
    res.history.append({"round": 0, "estep": hist0, "seconds": time.perf_counter() - t0})
    for r in range(1, cfg.train.em_rounds + 1):
        t0 = time.perf_counter()
        log(f"[em] round {r}/{cfg.train.em_rounds}: E-step")
        hist = phases(r)
        log(f"[em] round {r}: scoring {len(target)} pairs with beam S={cfg.search.score_paths}")
        ps = pair_scores(model, seq, target_np, cfg.search.score_paths, cfg.search.batch_size, res.assign)
        ms = mstep(ps, res.assign, cfg, V, res.alpha)
        res.assign = res.assign.copy()
        res.assign[ps.items] = ms.assign
        res.alpha = ms.alpha
        if ms.trials:
            log(f"  alpha {ms.alpha:.3g} after {len(ms.trials)} trials: "
                + ", ".join(f"{a:.3g} -> size {z:.1f}" for a, z in ms.trials))
        for st in ms.rounds:
            log(f"  m-step sweep {st.round}: objective {st.objective:.2f}, alpha {st.alpha:.3g}, path size "
                f"{st.path_size:.1f}, largest path {st.max_path_size}, non-empty paths {st.nonempty_paths}, "
                f"items moved {st.items_moved}")
        res.history.append({"round": r, "estep": hist, "mstep": [vars(s) for s in ms.rounds],
                            "seconds": time.perf_counter() - t0})
        if on_round is not None:
            on_round(r, res)
    log("[em] final E-step against the final paths")
    final = run_phase(model, seq, target, res.assign, cfg, schedule(cfg, cfg.train.em_rounds + 1)[0], check, log)
    res.history.append({"round": cfg.train.em_rounds + 1, "estep": final})
    if check is not None:
        res.beam_choice = choose_beam(model, vocab, valid, res.index(), budget, cfg.search.top_n, cfg.search.recall_target,
                                      confidence=cfg.search.recall_confidence)
        res.beam = res.beam_choice.beam
        log(f"[em] {res.beam_choice.line(budget, V)}")
    return res


__all__ = ["EMResult", "Phase", "Validation", "sampled_softmax", "new_model", "rows_per_step", "phase_optimizer", "proposal", "train_step", "run_phase", "pair_scores",
           "initial_paths", "mstep", "evaluate", "train_em", "epoch_line", "unfreeze"]
