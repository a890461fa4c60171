"""Single-process EM trainer: E-step epochs -> s[v,c] by beam search -> penalized M-step.

The E-step's one-batch update (`train_step`) and the scoring pass (`pair_scores`) are the
pieces the distributed jobs reuse; this module strings them together for tests and the demo.

Schedule (paper: joint 2 epochs, then reranker frozen, structure model 2 more): EM round 0
trains jointly for `joint_epochs` then the structure model alone for `structure_epochs`;
later rounds retrain the structure model alone against the new paths (the reranker does not
depend on paths, so it stays frozen, which also keeps it from over-fitting).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .config import DRConfig
from .index import PathIndex
from .evaluation import evaluate_users
from .model import DRModel
from .mstep import MStepResult, initial_assignment, mstep_blocked
from .reranker import sampling_log_q
from .scores import PathScores, aggregate_pairs
from .vocab import Vocab

Log = Callable[[str], None]


@dataclass
class EMResult:
    """A trained model, its vocabulary and the item_paths it was trained against."""

    model: DRModel
    vocab: Vocab
    assign: np.ndarray                      # [V, J] paths of model indices
    history: list[dict] = field(default_factory=list)

    def index(self) -> PathIndex:
        return PathIndex.build(self.assign)


@dataclass(frozen=True)
class Phase:
    """One stretch of the E-step schedule: `epochs` epochs, reranker trained or frozen, its own seed."""

    name: str
    epochs: int
    train_reranker: bool
    seed: int


def schedule(cfg: DRConfig, em_round: int) -> list[Phase]:
    """The paper's E-step schedule for one EM round (joint phase in round 0 only, then structure only)."""
    tc = cfg.train
    phases = []
    if em_round == 0 and tc.joint_epochs:
        phases.append(Phase("joint", tc.joint_epochs, True, tc.seed * 1000 + em_round))
    phases.append(Phase("structure", tc.structure_epochs, False, tc.seed * 1000 + em_round + 500))
    return phases


def phase_optimizer(model: DRModel, cfg: DRConfig, train_reranker: bool) -> torch.optim.Optimizer:
    """Freeze/unfreeze the reranker side, then Adam over the trainable parameters only."""
    for p in model.reranker_parameters():
        p.requires_grad_(train_reranker)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def train_step(model: DRModel, opt: torch.optim.Optimizer, seq: torch.Tensor, target: torch.Tensor,
               assign_t: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor, negatives: int,
               train_reranker: bool, gen: torch.Generator,
               sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """One E-step batch: seq [N, L], target [N] -> (structure loss, rerank loss or nan).

    `sync` runs between backward and the optimizer step (data-parallel gradient averaging).
    """
    opt.zero_grad(set_to_none=True)
    loss_s = model.structure_loss(seq, assign_t[target])
    loss = loss_s
    loss_r = torch.tensor(float("nan"))
    if train_reranker:
        neg = torch.multinomial(q, negatives, replacement=True, generator=gen)
        loss_r = model.rerank_loss(seq, target, neg, log_q)
        loss = loss + loss_r
    loss.backward()
    if sync is not None:
        sync()
    opt.step()
    return float(loss_s.detach()), float(loss_r.detach())


def estep(model: DRModel, seq: torch.Tensor, target: torch.Tensor, assign: np.ndarray, cfg: DRConfig,
          epochs: int, train_reranker: bool, seed: int, log: Log) -> list[dict]:
    """Train for `epochs` over all samples; seq [N, L], target [N] -> per-epoch mean losses."""
    tc = cfg.train
    gen = torch.Generator().manual_seed(seed)
    opt = phase_optimizer(model, cfg, train_reranker)
    counts = torch.bincount(target, minlength=model.num_items)
    q, log_q = sampling_log_q(counts, tc.negatives)
    assign_t = torch.from_numpy(assign)
    out = []
    for ep in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(target), generator=gen)
        ls, lr = [], []
        for lo in range(0, len(perm), tc.batch_size):
            b = perm[lo: lo + tc.batch_size]
            s, r = train_step(model, opt, seq[b], target[b], assign_t, q, log_q, tc.negatives, train_reranker, gen)
            ls.append(s)
            lr.append(r)
        row = {"epoch": ep, "structure_loss": float(np.mean(ls)),
               "rerank_loss": float(np.nanmean(lr)) if train_reranker else None,
               "seconds": time.perf_counter() - t0}
        log(f"  e-step epoch {ep + 1}/{epochs}: structure loss {row['structure_loss']:.4f}"
            + (f", rerank loss {row['rerank_loss']:.4f}" if train_reranker else " (reranker frozen)")
            + f" [{row['seconds']:.1f}s]")
        out.append(row)
    for p in model.reranker_parameters():
        p.requires_grad_(True)
    return out


def pair_scores(model: DRModel, seq: torch.Tensor, target: np.ndarray, S: int, batch_size: int) -> PathScores:
    """Beam search (beam S) on every training pair, p(c|x) summed per item -> s[v,c] top-S per item."""
    paths, probs = [], []
    for lo in range(0, seq.shape[0], batch_size):
        p, lp = model.beam(seq[lo: lo + batch_size], S)
        paths.append(p.numpy())
        probs.append(lp.double().exp().numpy())
    return aggregate_pairs(target, np.concatenate(paths), np.concatenate(probs), S)


def evaluate(res: EMResult, hist: np.ndarray, truth_offsets: np.ndarray, truth_items: np.ndarray,
             cfg: DRConfig, train: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The evaluation report (dr_model.evaluation) of a trained EMResult."""
    return evaluate_users(res.model, res.vocab.ids, res.index(), hist, truth_offsets, truth_items, cfg, train)


def train_em(train_hist: np.ndarray, train_target: np.ndarray, cfg: DRConfig,
             log: Log = print, on_round: Callable[[int, EMResult], None] | None = None) -> EMResult:
    """train_hist [N, L] raw ids (-1 pad), train_target [N] raw ids -> trained EMResult."""
    torch.manual_seed(cfg.train.seed)
    vocab = Vocab(np.unique(train_target))
    seq = vocab.seq(train_hist)
    target_np = vocab.index(train_target)
    target = torch.from_numpy(target_np)
    mc = cfg.model
    model = DRModel(mc, vocab.size)
    assign = initial_assignment(vocab.size, mc.J, mc.num_paths, cfg.train.seed)
    res = EMResult(model, vocab, assign)
    log(f"[em] {len(target)} training pairs, {vocab.size} items, K={mc.K} D={mc.D} J={mc.J}, "
        f"{cfg.train.em_rounds} EM rounds")
    for r in range(cfg.train.em_rounds):
        t0 = time.perf_counter()
        log(f"[em] round {r + 1}/{cfg.train.em_rounds}: E-step")
        hist = []
        for ph in schedule(cfg, r):
            hist += estep(model, seq, target, res.assign, cfg, ph.epochs, ph.train_reranker, ph.seed, log)
        log(f"[em] round {r + 1}: scoring {len(target)} pairs with beam S={cfg.search.score_paths}")
        ps = pair_scores(model, seq, target_np, cfg.search.score_paths, cfg.search.batch_size)
        ms: MStepResult = mstep_blocked(ps, res.assign[ps.items], mc.num_paths, cfg.mstep, damping=cfg.mstep.damping)
        res.assign = res.assign.copy()
        res.assign[ps.items] = ms.assign
        for st in ms.rounds:
            log(f"  m-step sweep {st.round}: objective {st.objective:.2f}, largest path {st.max_path_size}, "
                f"non-empty paths {st.nonempty_paths}, items moved {st.items_moved}")
        res.history.append({"round": r, "estep": hist, "mstep": [vars(s) if not hasattr(s, "_asdict") else s._asdict() for s in ms.rounds],
                            "seconds": time.perf_counter() - t0})
        if on_round is not None:
            on_round(r, res)
    return res
