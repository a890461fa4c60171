"""The ANN peer (dr_model.ann) against the reranker's own brute force, on a small random model; no Spark."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dr_model import ann
from dr_model.config import ConfigError, DRConfig, EvalConfig, ModelConfig
from dr_model.evaluation import ann_peer
from dr_model.index import pair_keys
from dr_model.metrics import prf_at_k
from dr_model.model import DRModel

V, N, K = 600, 40, 10


def _model(item_rows: int = 524_288) -> DRModel:
    """A random model whose biases are large enough to reorder items (so folding them in matters)."""
    torch.manual_seed(0)
    cfg = ModelConfig(K=4, D=2, J=1, item_dim=8, user_dim=8, node_dim=4, hidden=8, rerank_dim=16, seq_len=6,
                      item_rows=item_rows)
    model = DRModel(cfg, V).eval()
    with torch.no_grad():
        for p in model.reranker.bias.parameters():
            p.normal_(0.0, 1.0)
    return model


def _users(rng: np.random.Generator) -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray]]:
    """seq [N, 6] item indices and the pairs excluded: each user's history, one user with 150 items."""
    seq = torch.from_numpy(rng.integers(0, V, size=(N, 6)))
    n = rng.integers(1, 20, size=N)
    n[3] = 150      # a long history: the search must ask for k + 150 to still return k items
    row = np.repeat(np.arange(N), n)
    item = np.concatenate([rng.choice(V, m, replace=False) for m in n])
    return seq, (row.astype(np.int64), item.astype(np.int64))


@pytest.mark.parametrize("item_rows", [524_288, 128])     # exact tables, then quotient-remainder (composed) rows
def test_bias_folded_inner_product_is_the_reranker_score(item_rows: int) -> None:
    model = _model(item_rows)
    items = ann.reranker_items(model.reranker, chunk=128)     # several chunks
    assert items.shape == (V, 17) and items.dtype == np.float32
    with torch.inference_mode():
        w = model.rerank_encoder(torch.from_numpy(np.random.default_rng(1).integers(0, V, size=(5, 6))))
        ids = torch.arange(V).expand(5, V)
        want = model.reranker.score(w, ids).numpy()
    got = ann.user_queries(w) @ items.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(items[:, -1]).max() > 0.5        # the biases are there, not zeros


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_exhaustive_setting_equals_brute_force_and_respects_exclusions(kind: str) -> None:
    model = _model()
    seq, seen = _users(np.random.default_rng(0))
    items = ann.reranker_items(model.reranker)
    cfg = ann.AnnConfig(hnsw_m=16, ef_construction=64)
    index = ann.build_hnsw(items, cfg) if kind == "hnsw" else ann.build_ivf(items, cfg)
    setting = 2048 if kind == "hnsw" else index.nlist
    with torch.inference_mode():
        q = ann.user_queries(model.rerank_encoder(seq))
    got_i, got_s, scored = ann.search(index, q, K, setting, exclude=seen)
    want_i, want_s = model.brute_force(seq, K, exclude=seen)
    assert got_i.shape == (N, K) and (got_i >= 0).all()          # k items even for the user with 150 excluded
    np.testing.assert_array_equal(np.sort(got_i, 1), np.sort(want_i, 1))
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
    assert not np.isin(pair_keys(np.repeat(np.arange(N), K), got_i.ravel(), V), pair_keys(*seen, V)).any()
    if kind == "ivf":
        assert scored == pytest.approx(V)       # every list probed: every item scored once
    else:
        assert 0 < scored
    # Without exclusions the same search would return history items: the exclusion did the work.
    free_i, _, _ = ann.search(index, q, K, setting)
    assert np.isin(pair_keys(np.repeat(np.arange(N), K), free_i.ravel(), V), pair_keys(*seen, V)).any()


def test_one_long_history_changes_only_its_own_search() -> None:
    """Users are searched in groups by history length (faiss takes one k per call, and N x (k + the longest
    history) results would follow the longest): a user's results and cost never depend on another's history."""
    model = _model()
    seq, seen = _users(np.random.default_rng(4))
    index = ann.build_hnsw(ann.reranker_items(model.reranker), ann.AnnConfig(hnsw_m=16, ef_construction=64))
    with torch.inference_mode():
        q = ann.user_queries(model.rerank_encoder(seq))
    row3 = seen[0] == 3
    short = (np.concatenate([seen[0][~row3], [3]]), np.concatenate([seen[1][~row3], seen[1][row3][:1]]))
    long_i, _, long_cost = ann.search(index, q, K, 16, seen)
    short_i, _, short_cost = ann.search(index, q, K, 16, short)
    others = np.arange(N) != 3
    np.testing.assert_array_equal(long_i[others], short_i[others])
    _, _, alone_long = ann.search(index, q[3:4], K, 16, (np.zeros(150, np.int64), seen[1][row3]))
    _, _, alone_short = ann.search(index, q[3:4], K, 16, (np.zeros(1, np.int64), seen[1][row3][:1]))
    assert long_cost * N - alone_long == pytest.approx(short_cost * N - alone_short)


def test_sweep_reports_cost_and_picks_the_cheapest_setting_at_a_recall() -> None:
    model = _model()
    seq, seen = _users(np.random.default_rng(2))
    items = ann.reranker_items(model.reranker)
    index = ann.build_ivf(items, ann.AnnConfig())
    assert index.nlist == ann.ivf_nlist(V) == V // 39

    exact, _ = model.brute_force(seq, K, exclude=seen)

    def judge(pred: np.ndarray) -> dict:     # recall against brute force's own top-k
        return {"recall": float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(pred, exact)]))}

    def encode() -> np.ndarray:
        with torch.inference_mode():
            return ann.user_queries(model.rerank_encoder(seq))

    pts = ann.sweep(index, encode, (1, 4, 256), K, seen, judge)
    assert [p["nprobe"] for p in pts] == [1, 4, index.nlist]     # above nlist collapses to nlist
    assert all(p["users_per_s"] > 0 for p in pts)
    scored = [p["items_scored_per_user"] for p in pts]
    assert scored[0] < scored[1] < scored[2] == pytest.approx(V)
    assert pts[0]["recall"] < pts[1]["recall"] == pts[2]["recall"] == 1.0
    assert ann.at_recall(pts, 1.0) is pts[1] and ann.at_recall(pts, 0.0) is pts[0]
    assert ann.at_recall(pts, 1.01) is pts[-1]       # unreachable: the largest setting


def test_ann_peer_reports_both_indexes_at_dr_recall() -> None:
    model = _model()
    rng = np.random.default_rng(3)
    seq, seen = _users(rng)
    truth_items = rng.integers(0, V, size=N * 5)
    offsets = np.arange(0, N * 5 + 1, 5)

    def prf(pred: np.ndarray):
        return prf_at_k(pred, offsets, truth_items, K)

    cfg = DRConfig(eval=EvalConfig(k=K, ann_ef_sweep=(16, 2048), ann_nprobe_sweep=(1, 1024)))
    methods, summary, sweeps = ann_peer(model, seq, cfg, seen, prf, target_recall=2.0)   # never reached
    bf = prf(model.brute_force(seq, K, exclude=seen)[0])
    for kind, knob in (("hnsw", "ef"), ("ivf", "nprobe")):
        assert [set(p) for p in sweeps[kind]] == [{knob, "recall", "items_scored_per_user", "users_per_s"}] * 2
        assert summary[kind]["reached_target"] is False and summary[kind][knob] == sweeps[kind][-1][knob]
        assert methods[kind].recall == pytest.approx(bf.recall)    # the largest setting is exhaustive here
    assert summary["threads"] == torch.get_num_threads()


def test_ann_sweeps_must_increase() -> None:
    with pytest.raises(ConfigError, match="eval.ann_ef_sweep"):
        EvalConfig(ann_ef_sweep=(64, 32))
    with pytest.raises(ConfigError, match="eval.ann_nprobe_sweep"):
        EvalConfig(ann_nprobe_sweep=())
