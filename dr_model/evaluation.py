"""The paper's evaluation protocol over held-out users, for every method, in one report.

DR (beam -> paths -> rerank), brute force (the same reranker over all items), and, when
the training samples are given, popularity and item-CF. All methods see the same input
halves and, with `eval.exclude_history`, never get credit for an item of the input half.
"""
from __future__ import annotations

import numpy as np

from .baselines import item_cf_topk, popularity_topk
from .config import DRConfig
from .index import PathIndex
from .metrics import exclude_seen, pad_to, prf_at_k
from .model import DRModel
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


def evaluate_users(model: DRModel, item_ids: np.ndarray, index: PathIndex, hist: np.ndarray,
                   truth_offsets: np.ndarray, truth_items: np.ndarray, cfg: DRConfig,
                   train: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """One report for all methods.

    item_ids [V] raw ids of the model's items, hist [U, L] raw ids (-1 pad), truth CSR
    ([U+1], [T]); train = (train_user [N], train_target [N]) adds popularity and item-CF.
    """
    k, excl = cfg.eval.k, cfg.eval.exclude_history
    extra = hist.shape[1] if excl else 0
    vocab = Vocab(item_ids)
    seq = vocab.seq(hist)

    def finish(pred_raw: np.ndarray) -> np.ndarray:
        return exclude_seen(pred_raw, hist, k) if excl else pad_to(pred_raw, k)

    def dr_at(beam: int) -> tuple[np.ndarray, np.ndarray]:
        pred, _, scored = model.retrieve(seq, index, beam, k + extra)
        return finish(vocab.raw(pred)), scored

    dr_pred, scored = dr_at(cfg.search.beam)
    bf_pred, _ = model.brute_force(seq, k + extra)
    methods = {"dr": prf_at_k(dr_pred, truth_offsets, truth_items, k),
               "brute_force": prf_at_k(finish(vocab.raw(bf_pred)), truth_offsets, truth_items, k)}
    if train is not None:
        t_user, t_target = train
        methods["popularity"] = prf_at_k(popularity_topk(t_target, hist, k, excl), truth_offsets, truth_items, k)
        methods["item_cf"] = prf_at_k(item_cf_topk(t_user, t_target, hist, k, excl), truth_offsets, truth_items, k)
    by_beam = {}
    for b in cfg.eval.beam_sweep:
        pred_b, scored_b = dr_at(b)
        by_beam[str(b)] = {"recall": prf_at_k(pred_b, truth_offsets, truth_items, k).recall,
                           "items_scored_per_user": float(scored_b.mean()) if len(scored_b) else 0.0}
    bf_recall = methods["brute_force"].recall
    return {
        "k": k,
        "users": methods["dr"].users,
        "catalog_size": int(len(item_ids)),
        "beam": cfg.search.beam,
        "items_scored_per_user": float(scored.mean()) if len(scored) else 0.0,
        "fraction_of_catalog_scored": float(scored.mean() / max(len(item_ids), 1)) if len(scored) else 0.0,
        "methods": {name: m.as_dict() for name, m in methods.items()},
        "dr_recall_over_brute_force": methods["dr"].recall / bf_recall if bf_recall > 0 else float("nan"),
        "dr_recall_by_beam": by_beam,
        "path_sizes": path_size_summary(index, cfg.model.num_paths),
        "exclude_history": excl,
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
    ps = report["path_sizes"]
    lines.append(f"paths: {ps['nonempty_paths']} non-empty of {ps['num_paths']}, largest {ps['max']}, mean {ps['mean']:.2f}")
    return "\n".join(lines)
