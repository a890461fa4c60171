"""The paper's evaluation protocol over held-out users, for every method, in one report.

DR (beam -> paths -> rerank), brute force (the same reranker over all items), the ANN peer
(faiss HNSW / IVF over the same reranker vectors, dr_model.ann) and, when the training
samples are given, popularity, item-CF and EASE (its lambda chosen on the
validation users). The neural models read the last L items of each user's input half;
the baselines read the whole input half; with `eval.exclude_history` no method ever
recommends an item of the input half.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import sparse

from . import ann
from .baselines import EASE, choose_ease_lambda, ease_lambda_grid, item_cf_topk, popular_topk, to_raw, user_item_matrix
from .beam_choice import BeamChoice, distinct_items, pick_beam
from .config import DRConfig
from .index import PathIndex, member, pair_keys, row_blocks
from .metrics import PRF, per_user_prf, prf_at_k
from .model import DRModel
from .split import Split
from .vocab import Vocab


def path_size_summary(index: PathIndex, num_paths: int) -> dict:
    """Largest / mean / non-empty paths and a log2-bucket histogram of items per path."""
    sizes = index.sizes()
    if len(sizes) == 0:
        return {"nonempty_paths": 0, "num_paths": num_paths, "max": 0, "mean": 0.0, "histogram": {}}
    buckets = 2 ** np.ceil(np.log2(sizes)).astype(np.int64)
    b, c = np.unique(buckets, return_counts=True)
    return {"nonempty_paths": int(len(sizes)), "num_paths": int(num_paths), "max": int(sizes.max()),
            "mean": float(sizes.mean()), "histogram": {f"<={int(x)}": int(n) for x, n in zip(b, c)}}


@dataclass(frozen=True)
class EvalUsers:
    """Held-out users: hist [U, L] raw ids (last L input items: what the models read), the whole
    input half as CSR (input_offsets [U+1], input_items [I]) and the truth half (truth_offsets [U+1],
    truth_items [T]), all raw ids."""

    hist: np.ndarray
    input_offsets: np.ndarray
    input_items: np.ndarray
    truth_offsets: np.ndarray
    truth_items: np.ndarray

    @classmethod
    def of(cls, split: Split, role: int) -> "EvalUsers":
        """The users of `split` with this role (1 validation, 2 test)."""
        s = split.eval_subset(role)
        return cls(s.eval_hist, s.input_offsets, s.input_items, s.truth_offsets, s.truth_items)

    def __len__(self) -> int:
        return self.hist.shape[0]

    def input_pairs(self, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
        """(row [M], item index [M]) of every known input item (the pairs never recommended)."""
        row = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.input_offsets))
        idx = vocab.index(self.input_items)
        return row[idx >= 0], idx[idx >= 0]

    def input_matrix(self, vocab: Vocab) -> sparse.csr_matrix:
        return user_item_matrix(*self.input_pairs(vocab), len(self), vocab.size)


def validation_recall(model: DRModel, vocab: Vocab, users: EvalUsers, k: int, index: PathIndex | None = None,
                      beam: int = 0) -> float:
    """Recall@k on held-out users: brute force over the reranker (index None), else DR at `beam`."""
    r = validation_recalls(model, vocab, users, k, index, beam)
    return float(r.mean()) if len(r) else 0.0


def validation_recalls(model: DRModel, vocab: Vocab, users: EvalUsers, k: int, index: PathIndex | None = None,
                       beam: int = 0) -> np.ndarray:
    """Each held-out user's recall@k [N] (validation_recall's terms)."""
    model.eval()
    seq = vocab.seq(users.hist)
    seen = users.input_pairs(vocab)
    if index is None:
        pred, _ = model.brute_force(seq, k, exclude=seen)
    else:
        pred, _, _ = model.retrieve(seq, index, beam, k, exclude=seen)
    model.train()
    return per_user_prf(to_raw(vocab.ids, pred), users.truth_offsets, users.truth_items, k)[1]


def validation_path_recall(model: DRModel, vocab: Vocab, users: EvalUsers, index: PathIndex, beam: int) -> float:
    """Share of held-out (user, truth item) pairs whose item lies on one of the user's `beam` paths.

    The structure model's own quality, independent of the reranker: DR recall@k saturates at
    brute force's as soon as the few popular hits are reachable, this keeps moving while the
    beam learns to reach the rest.
    """
    model.eval()
    paths = model.beam(vocab.seq(users.hist), beam)[0].numpy()
    model.train()
    t_row = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(users.truth_offsets))
    t_item = vocab.index(users.truth_items)
    if len(t_row) == 0:
        return 0.0
    hits = 0
    # users in blocks of ~LOOKUP_PAIRS (user, item) pairs: the users' paths may hold ~budget items each
    for lo, hi in row_blocks(index.counts(paths)):
        row, item = index.lookup(paths[lo:hi])
        t = slice(users.truth_offsets[lo], users.truth_offsets[hi])
        hit = member(pair_keys(t_row[t] - lo, t_item[t], vocab.size), pair_keys(row, item, vocab.size))
        hits += int((hit & (t_item[t] >= 0)).sum())
    return hits / len(t_row)


def choose_beam(model: DRModel, vocab: Vocab, users: EvalUsers, index: PathIndex, budget: float, k: int,
                target: float, max_beam: int = 4096, confidence: float = 0.0) -> BeamChoice:
    """The retrieval beam for held-out `users` (dr_model.beam_choice's rule) over the fp32 model and index."""
    seq = vocab.seq(users.hist)
    measured = target > 0 and len(users) > 0
    return pick_beam(lambda b: float(distinct_items(model, seq, index, b).mean()) if len(users) else 0.0,
                     lambda b: validation_recalls(model, vocab, users, k, index, b),
                     validation_recalls(model, vocab, users, k) if measured else 0.0,
                     budget, min(max_beam, model.cfg.num_paths), target, confidence)


def ann_peer(model: DRModel, seq: torch.Tensor, cfg: DRConfig, exclude: tuple[np.ndarray, np.ndarray] | None,
             prf: Callable[[np.ndarray], PRF], target_recall: float) -> tuple[dict, dict, dict]:
    """HNSW and IVF over the reranker's item vectors, swept -> (methods, summary, sweeps).

    seq [N, L] item indices, prf(items [N, k]) -> PRF; methods = {"hnsw": PRF, "ivf": PRF} at the
    cheapest setting whose recall reaches `target_recall` (DR's), else the sweep's last;
    sweeps = {kind: [point, ...]}.
    """
    e = cfg.eval
    acfg = ann.AnnConfig(hnsw_m=e.ann_hnsw_m, ef_construction=e.ann_ef_construction, nlist=e.ann_nlist)
    k = e.k
    items = ann.reranker_items(model.reranker)

    def encode() -> np.ndarray:
        with torch.inference_mode():
            return ann.user_queries(model.rerank_encoder(seq))

    judged: list[PRF] = []          # one per sweep point, in order: the chosen point's PRF without a second search

    def judge(pred: np.ndarray) -> dict:
        judged.append(prf(pred))
        return {"recall": judged[-1].recall}

    methods, summary, sweeps = {}, {"threads": ann.use_torch_threads(), "target_recall": target_recall}, {}
    for kind, build, settings in (("hnsw", ann.build_hnsw, e.ann_ef_sweep), ("ivf", ann.build_ivf, e.ann_nprobe_sweep)):
        t0 = time.perf_counter()
        index = build(items, acfg)
        build_s = time.perf_counter() - t0
        judged.clear()
        points = ann.sweep(index, encode, settings, k, exclude, judge)
        pick = ann.at_recall(points, target_recall)
        name = ann.setting_name(index)
        methods[kind] = judged[points.index(pick)]
        summary[kind] = {name: pick[name], "reached_target": pick["recall"] >= target_recall, "build_s": build_s,
                         "users_per_s": pick["users_per_s"], "items_scored_per_user": pick["items_scored_per_user"],
                         **({"nlist": int(index.nlist)} if kind == "ivf" else {"m": acfg.hnsw_m})}
        sweeps[kind] = points
        del index
    return methods, summary, sweeps


@dataclass(frozen=True)
class Peers:
    """What the classical peers need, however computed: popular items [m] (model indices, falling
    counts popular_count [m], m >= k + longest input), item-CF's top-k of the users [U, k] (model
    indices, -1 pad) and EASE's Gram X^T X [V, V] (None above eval.ease_max_items)."""

    popular: np.ndarray
    popular_count: np.ndarray
    item_cf: np.ndarray
    gram: np.ndarray | None

    @classmethod
    def in_process(cls, train_user: np.ndarray, train_target: np.ndarray, vocab: Vocab, users: EvalUsers, k: int,
                   with_gram: bool) -> "Peers":
        """From the training pairs (train_user [N], train_target [N] raw ids) held in memory."""
        u_idx = np.unique(train_user, return_inverse=True)[1].ravel()
        X = user_item_matrix(u_idx, vocab.index(train_target), int(u_idx.max(initial=-1)) + 1, vocab.size)
        H = users.input_matrix(vocab)
        pop = np.asarray(X.sum(0)).ravel()
        top = np.argsort(-pop, kind="stable")[: min(vocab.size, k + int(np.diff(H.indptr).max(initial=0)))]
        return cls(top, pop[top], item_cf_topk(X, H, k), (X.T @ X).toarray() if with_gram else None)


def evaluate_users(model: DRModel, item_ids: np.ndarray, index: PathIndex, users: EvalUsers, cfg: DRConfig,
                   train: tuple[np.ndarray, np.ndarray] | None = None, valid: EvalUsers | None = None,
                   beam: int | None = None, peers: "Peers | None" = None) -> dict:
    """One report for all methods.

    item_ids [V] raw ids of the model's items; train = (train_user [N], train_target [N]) adds
    popularity, item-CF and (catalog up to eval.ease_max_items, `valid` users given to choose its
    lambda) EASE; `peers` gives the same inputs computed elsewhere (jobs/peers.py: by Spark, so
    samples_train never reaches the driver). `beam` is the retrieval beam (default search.beam). Up to eval.ann_max_items,
    the ANN peer (HNSW, IVF) at the setting tuned to DR's recall, with its sweeps in "ann_sweep".
    Users/s are wall-clock on `threads` torch (and faiss) threads, user encoding included.
    """
    k, excl = cfg.eval.k, cfg.eval.exclude_history
    beam = beam or cfg.search.beam
    vocab = Vocab(item_ids)
    seq = vocab.seq(users.hist)
    seen = users.input_pairs(vocab) if excl else None
    truth = (users.truth_offsets, users.truth_items)

    def prf(pred_idx: np.ndarray) -> PRF:
        return prf_at_k(to_raw(item_ids, pred_idx), *truth, k)

    def dr_at(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        pred, _, vectors = model.retrieve(seq, index, b, k, exclude=seen)
        ups = len(users) / max(time.perf_counter() - t0, 1e-9)
        return pred, distinct_items(model, seq, index, b), vectors, ups

    dr_pred, scored, vectors, dr_users_per_s = dr_at(beam)
    t0 = time.perf_counter()
    bf_pred, _ = model.brute_force(seq, k, exclude=seen)
    bf_users_per_s = len(users) / max(time.perf_counter() - t0, 1e-9)
    methods = {"dr": prf(dr_pred), "brute_force": prf(bf_pred)}
    extra: dict = {}
    if len(item_ids) <= cfg.eval.ann_max_items:
        # An index over the reranker is not asked to beat the reranker: when DR's recall exceeds
        # brute force's (it can, by luck of what it leaves out), the ANN is tuned to brute force's.
        target = min(methods["dr"].recall, methods["brute_force"].recall)
        ann_methods, extra["ann"], extra["ann_sweep"] = ann_peer(model, seq, cfg, seen, prf, target)
        methods.update(ann_methods)
    else:
        extra["ann"] = {"skipped": f"catalog of {len(item_ids)} items > eval.ann_max_items={cfg.eval.ann_max_items}"}
    if train is not None and peers is None:
        peers = Peers.in_process(*train, vocab, users, k, vocab.size <= cfg.eval.ease_max_items)
    if peers is not None:
        H = users.input_matrix(vocab)
        methods["popularity"] = prf(popular_topk(peers.popular, peers.popular_count, H, k))
        methods["item_cf"] = prf(peers.item_cf)
        if valid is not None and peers.gram is not None:
            ease = EASE.from_gram(peers.gram)
            lam, by_lam = choose_ease_lambda(ease, item_ids, valid.input_matrix(vocab),
                                             (valid.truth_offsets, valid.truth_items), k,
                                             ease_lambda_grid(np.trace(peers.gram), vocab.size))
            methods["ease"] = prf(ease.topk(H, lam, k))
            extra["ease"] = {"lambda": lam, "validation_f1_by_lambda": by_lam}
        elif valid is not None:
            extra["ease"] = {"skipped": f"catalog of {vocab.size} items > eval.ease_max_items={cfg.eval.ease_max_items}"}
    by_beam = {}
    for b in cfg.eval.beam_sweep:
        pred_b, scored_b, vectors_b, ups = dr_at(b)
        by_beam[str(b)] = {"recall": prf(pred_b).recall,
                           "items_scored_per_user": float(scored_b.mean()) if len(scored_b) else 0.0,
                           "vectors_scored_per_user": float(vectors_b.mean()) if len(vectors_b) else 0.0,
                           "users_per_s": ups}
    bf_recall = methods["brute_force"].recall
    return {
        "k": k,
        "users": methods["dr"].users,
        "catalog_size": int(len(item_ids)),
        "beam": int(beam),
        "items_scored_per_user": float(scored.mean()) if len(scored) else 0.0,
        "fraction_of_catalog_scored": float(scored.mean() / max(len(item_ids), 1)) if len(scored) else 0.0,
        # the work: an item on several of a user's beam paths is scored once per path
        "vectors_scored_per_user": float(vectors.mean()) if len(vectors) else 0.0,
        "methods": {name: m.as_dict() for name, m in methods.items()},
        "dr_recall_over_brute_force": methods["dr"].recall / bf_recall if bf_recall > 0 else float("nan"),
        "dr_recall_by_beam": by_beam,
        "users_per_s": {"dr": dr_users_per_s, "brute_force": bf_users_per_s},
        "threads": torch.get_num_threads(),
        "path_sizes": path_size_summary(index, cfg.model.num_paths),
        "exclude_history": excl,
        **extra,
    }


def format_report(report: dict) -> str:
    """A plain-text table of a report."""
    k = report["k"]
    lines = [f"{'method':<14}{'P@' + str(k):>10}{'R@' + str(k):>10}{'F@' + str(k):>10}"]
    for name, m in report["methods"].items():
        lines.append(f"{name:<14}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}")
    lines.append(f"{report['users']} users, catalog {report['catalog_size']} items; DR scored "
                 f"{report['items_scored_per_user']:.1f} items/user ({report['fraction_of_catalog_scored']:.1%} of the catalog) "
                 f"at beam {report['beam']}; DR recall / brute-force recall = {report['dr_recall_over_brute_force']:.3f}")
    sweep = ", ".join(f"B={b}: R {v['recall']:.4f} ({v['items_scored_per_user']:.0f} items)" for b, v in report["dr_recall_by_beam"].items())
    lines.append(f"DR recall by beam: {sweep}")
    ups = report.get("users_per_s")
    if ups:
        lines.append(f"users/s on {report['threads']} threads (user encoding included): DR {ups['dr']:.0f}, "
                     f"brute force {ups['brute_force']:.0f}")
    a = report.get("ann", {})
    if "skipped" in a:
        lines.append(f"ANN peer skipped: {a['skipped']}")
    for kind in ("hnsw", "ivf"):
        if kind not in a:
            continue
        knob = "ef" if kind == "hnsw" else "nprobe"
        at = a[kind]
        reach = "reaches" if at["reached_target"] else "largest setting; below"
        lines.append(f"{kind.upper()} at {knob}={at[knob]} ({reach} min(DR, brute force) recall {a['target_recall']:.4f}): "
                     f"{at['items_scored_per_user']:.0f} items/user, {at['users_per_s']:.0f} users/s")
        pts = ", ".join(f"{p[knob]}: R {p['recall']:.4f} ({p['items_scored_per_user']:.0f})" for p in report["ann_sweep"][kind])
        lines.append(f"  {kind} recall by {knob} (items/user): {pts}")
    ps = report["path_sizes"]
    lines.append(f"paths: {ps['nonempty_paths']} non-empty of {ps['num_paths']}, largest {ps['max']}, mean {ps['mean']:.2f}")
    return "\n".join(lines)
