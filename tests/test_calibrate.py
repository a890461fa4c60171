"""Path sizes from a budget: the alpha search, exploration paths, initial paths from embeddings, own-path scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dr_model.calibrate import (AlphaSearch, assigned_traffic, assigned_weights, exploration_paths, initial_alpha, path_traffic,
                                start_path_size, traffic_size, with_exploration)
from dr_model.codec import decode
from dr_model.config import DRConfig, MStepConfig
from dr_model.init_paths import branching, paths_from_embeddings
from dr_model.model import DRModel
from dr_model.mstep import mstep_blocked, path_sizes
from dr_model.scores import EMPTY, PathScores


def _search(f, alpha0: float, target: float, **kw) -> AlphaSearch:
    s = AlphaSearch(alpha0, target, **kw)
    while (a := s.propose()) is not None:
        s.observe(a, f(a))
    return s


def test_alpha_search_brackets_then_bisects_a_decreasing_size():
    size = lambda a: 100.0 * a ** (-1 / 3)                  # the penalty's equilibrium law for f = n^4/4
    s = _search(size, alpha0=1.0, target=20.0, max_trials=12)
    assert size(s.result) <= 20.0 * 1.05
    assert s.result == pytest.approx(125.0, rel=0.2)         # (100 / 20)^3
    up = [a for a, _ in s.trials[:3]]
    assert up == [1.0, 10.0, 100.0]                          # x10 steps until the size fits
    # a target already met at the start: alpha comes down until the paths are too large
    s = _search(size, alpha0=1e4, target=20.0, max_trials=12)
    assert size(s.result) <= 21.0 and s.result == pytest.approx(125.0, rel=0.2)


def test_alpha_search_stops_on_a_plateau_and_at_the_cap():
    flat = lambda a: 50.0 - min(a, 1.0)                      # a stronger penalty buys (almost) nothing
    s = _search(flat, alpha0=0.01, target=10.0)
    assert s.result == pytest.approx(0.01)                   # 0.01 -> 0.1 lowered the size by < 2 %: stop there
    steep = lambda a: 1e6 / a                                # reachable only far above the cap
    s = _search(steep, alpha0=1.0, target=1.0)
    assert s.result == 1e3 and size_ok(s, steep) is False


def size_ok(s: AlphaSearch, f) -> bool:
    return f(s.result) <= s.target * 1.05


def test_traffic_weighted_size_follows_the_scores():
    # item 0 (N=10) holds paths 0 and 1, its score mostly on path 0; item 1 (N=1) on paths 1, 2
    scores = np.array([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    slots = np.array([[0, 1], [0, 1]])
    w = assigned_weights(scores, slots)
    np.testing.assert_allclose(w, [[0.75, 0.25], [0.5, 0.5]])
    assign = np.array([[0, 1], [1, 2]])
    W = path_traffic(np.array([10.0, 1.0]), w, assign, 4)
    np.testing.assert_allclose(W, [7.5, 3.0, 0.5, 0.0])
    sizes = path_sizes(assign, 4)                            # [1, 2, 1, 0]
    assert traffic_size(W, sizes) == pytest.approx((7.5 * 1 + 3.0 * 2 + 0.5 * 1) / 11.0)
    # an item without score on its paths spreads its traffic evenly
    np.testing.assert_allclose(assigned_weights(np.zeros((1, 3)), np.array([[-1, -1]])), [[0.5, 0.5]])
    assert initial_alpha(2.0, 10.0, 4.0) > initial_alpha(2.0, 20.0, 4.0) > 0


def test_assigned_traffic_is_path_traffic_of_the_assigned_weights():
    """The compiled pass gives path_traffic(assigned_weights) bit for bit: partial, missing and zero scores."""
    rng = np.random.default_rng(3)
    m, S, J, P = 2_000, 6, 3, 50
    scores = np.where(rng.random((m, S)) < 0.2, 0.0, rng.random((m, S)))
    slots = np.where(rng.random((m, J)) < 0.3, -1, rng.integers(0, S, (m, J)))
    slots[:5] = -1                                            # no score on any assigned path
    assign = rng.integers(0, P, (m, J))
    n_v = rng.random(m) * 10
    want = path_traffic(n_v, assigned_weights(scores, slots), assign, P)
    assert np.array_equal(assigned_traffic(n_v, scores, slots, assign, P), want)
    assert np.array_equal(assigned_traffic(n_v[:0], scores[:0], slots[:0], assign[:0], P), np.zeros(P))
    with pytest.raises(ValueError, match="outside"):
        assigned_traffic(n_v, scores, slots, assign + P, P)


def test_exploration_paths_are_near_the_best_path():
    K, D = 7, 3
    items = np.arange(200)
    best = np.full(200, 3 * 49 + 5 * 7 + 2)
    best[7] = EMPTY
    sib = exploration_paths(items, best, K, D, 3)
    ok = sib[items != 7]
    codes = decode(ok, K, D)
    assert (codes[:, 0, :2] == [3, 5]).all() and (codes[:, 2, :2] == [3, 5]).all()   # siblings: D-1 codes shared
    assert (codes[:, 1, 0] == 3).all()                        # cousins: D-2 codes shared
    assert (sib[7] == EMPTY).all()
    assert len(np.unique(ok[:, 0])) == K                     # the hash spreads items over all siblings
    assert len(np.unique(ok[:, 1])) > K                      # ... and over the cousins
    ps = PathScores(np.array([0, 1]), np.array([[10, 11, EMPTY], [20, EMPTY, EMPTY]]),
                    np.array([[4.0, 1.0, 0.0], [2.0, 0.0, 0.0]]), np.array([3.0, 1.0]))
    x = with_exploration(ps, K, 3, 2, 0.5)
    assert x.S == 5
    for r in range(2):
        p, s = x.paths[r], x.scores[r]
        real = p[p != EMPTY]
        assert len(set(real.tolist())) == len(real)          # no repeats
        assert (np.diff(s[p != EMPTY]) <= 0).all() and (p[len(real):] == EMPTY).all()
        added = [c for c in real if c not in ps.paths[r]]
        assert added and all(c // (K * K) == ps.paths[r, 0] // (K * K) for c in added)
        assert all(s[list(p).index(c)] == 0.5 * ps.scores[r, 0] for c in added)


def test_with_exploration_places_siblings_as_a_stable_sort_in_row_blocks_and_into_a_wider_out(monkeypatch):
    """Row blocks (EXPLORE_ROWS) and an `out` wider than S + n (padded with empty slots) give what a stable
    sort by score of [the real candidates, then the kept siblings] gives, row by row."""
    import dr_model.calibrate as calibrate

    monkeypatch.setattr(calibrate, "EXPLORE_ROWS", 3)
    rng = np.random.default_rng(5)
    K, D, n, m, S = 4, 3, 2, 23, 4
    width = rng.integers(0, S + 1, m)
    paths = np.full((m, S), EMPTY)
    scores = np.zeros((m, S))
    for r in range(m):
        paths[r, :width[r]] = rng.choice(K ** D, width[r], replace=False)
        scores[r, :width[r]] = np.sort(rng.choice([0.2, 0.5, 1.0, 2.0], width[r]))[::-1]   # ties with siblings
    ps = PathScores(np.arange(m) * 7, paths, scores, np.ones(m))
    sib = exploration_paths(ps.items, paths[:, 0], K, D, n, 0)
    out = (np.full((m, S + n + 2), 99), np.full((m, S + n + 2), 9.0))
    got = with_exploration(ps, K, D, n, 0.5, out=out)
    assert got.paths is out[0] and got.scores is out[1]
    for r in range(m):
        real = [(p, s) for p, s in zip(paths[r], scores[r]) if p != EMPTY]
        kept = []
        for c in sib[r]:
            if c != EMPTY and c not in paths[r] and c not in kept:
                kept.append(c)
        entries = sorted(real + [(c, 0.5 * scores[r, 0]) for c in kept], key=lambda e: -e[1])   # stable
        want_p = [p for p, _ in entries] + [EMPTY] * (S + n + 2 - len(entries))
        want_s = [s for _, s in entries] + [0.0] * (S + n + 2 - len(entries))
        assert got.paths[r].tolist() == want_p and got.scores[r].tolist() == want_s, r


def test_exploration_lets_the_penalty_spread_a_collapsed_assignment():
    """Every item scored only on the same 4 paths (a collapse the beam locks in): without exploration
    the M-step cannot spread them; with it the auto alpha brings the path size down."""
    K, D, V = 10, 3, 400
    rng = np.random.default_rng(0)
    hot = np.array([0, 10, 200, 210])
    paths = np.tile(hot, (V, 1))
    scores = np.sort(rng.random((V, 4)) + 0.5, 1)[:, ::-1].copy()
    ps = PathScores(np.arange(V), paths, scores, np.full(V, 5.0))
    a0 = np.tile(hot[:2], (V, 1))
    cfg = MStepConfig(rounds=4, block_size=8)
    stuck = mstep_blocked(ps, a0, K ** D, cfg, target_size=10.0)
    spread = mstep_blocked(with_exploration(ps, K, D, 2, 0.5), a0, K ** D, cfg, target_size=10.0)
    assert stuck.rounds[-1].nonempty_paths <= 4
    assert spread.rounds[-1].nonempty_paths > 20
    assert spread.rounds[-1].path_size < 0.5 * stuck.rounds[-1].path_size


def test_a_collapsed_start_is_reseeded_from_the_embeddings_and_a_healthy_one_kept():
    """train.collapse_factor: a given start far above the target path size is replaced by the
    reranker's embedding paths; a balanced one, or any start with the guard off, is kept."""
    from dataclasses import replace

    from dr_model.mstep import initial_assignment
    from dr_model.trainer import given_start

    cfg = DRConfig.from_dict({"model": {"K": 8, "D": 3, "J": 2}, "search": {"beam": 8}})
    V, P = 400, cfg.model.num_paths
    model = DRModel(cfg.model, V)
    counts = np.random.default_rng(0).integers(1, 20, V)
    collapsed = np.tile([3, 77], (V, 1))
    healthy = initial_assignment(V, 2, P, 0)
    target = cfg.search.target_path_size(V, cfg.eval.k)
    assert start_path_size(counts, collapsed, P) == V > 4 * target > start_path_size(counts, healthy, P)
    logs: list[str] = []
    out, reseeded = given_start(model, cfg, collapsed, counts, logs.append)
    assert reseeded and len(np.unique(out)) > 50 and start_path_size(counts, out, P) < 2 * target
    assert len(logs) == 1 and "collapsed" in logs[0] and "re-seeded" in logs[0]
    kept, reseeded = given_start(model, cfg, healthy, counts, logs.append)
    assert not reseeded and (kept == healthy).all() and len(logs) == 1
    off = replace(cfg, train=replace(cfg.train, collapse_factor=0.0))
    kept, reseeded = given_start(model, off, collapsed, counts, logs.append)
    assert not reseeded and (kept == collapsed).all() and len(logs) == 1


def test_paths_from_embeddings_are_balanced_distinct_and_follow_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(30, 16))
    label = rng.integers(0, 30, 3000)
    emb = centers[label] + 0.2 * rng.normal(size=(3000, 16))
    K, D, J, target = 20, 3, 3, 12.0
    assign = paths_from_embeddings(emb, K, D, J, target, seed=0)
    assert assign.shape == (3000, J) and assign.min() >= 0 and assign.max() < K ** D
    srt = np.sort(assign, 1)
    assert not (srt[:, 1:] == srt[:, :-1]).any()             # J distinct paths per item
    b = branching(3000, J, target, K, D)
    assert b == [10, 10, 10]                                 # 3 * 3000 / 12 = 750 leaves -> at least that: 10^3
    first = assign[:, 0]
    sizes = np.bincount(first)
    assert sizes.max() <= 4 * 3000 / len(np.unique(first))   # balanced: no leaf far above the mean
    purity = np.mean([np.bincount(label[first == p]).max() / (first == p).sum() for p in np.unique(first)])
    assert purity > 0.9


def test_own_paths_are_scored_exactly_beside_the_beam():
    cfg = DRConfig.from_dict({"model": {"K": 6, "D": 3, "J": 2, "item_dim": 8, "user_dim": 8, "node_dim": 4,
                                        "hidden": 16, "rerank_dim": 8, "seq_len": 4}})
    torch.manual_seed(0)
    model = DRModel(cfg.model, 30).eval()
    seq = torch.randint(0, 30, (5, 4))
    beam_p, beam_lp = model.beam(seq, 4)
    own = torch.stack([beam_p[:, 0], torch.full((5,), 7)], 1)     # one path the beam found, one it may not have
    own[2, 1] = -1                                                # a target without paths
    paths, lp = model.beam_and_own(seq, 4, own)
    assert paths.shape == (5, 6)
    assert torch.equal(paths[:, :4], beam_p) and (paths[:, 4] == EMPTY).all()      # already in the beam
    with torch.no_grad():
        exact = model.structure.path_log_prob(model.encoder(seq), decode(torch.full((5, 1), 7), 6, 3))[:, 0]
    for r in range(5):
        if r == 2 or (beam_p[r] == 7).any():
            assert paths[r, 5] == EMPTY and lp[r, 5] == float("-inf")
        else:
            assert paths[r, 5] == 7 and torch.isclose(lp[r, 5], exact[r])


def test_validation_path_recall_counts_truth_items_the_beam_reaches():
    from dr_model.evaluation import EvalUsers, validation_path_recall
    from dr_model.index import PathIndex
    from dr_model.vocab import Vocab

    cfg = DRConfig.from_dict({"model": {"K": 6, "D": 2, "J": 1, "item_dim": 8, "user_dim": 8, "node_dim": 4,
                                        "hidden": 16, "rerank_dim": 8, "seq_len": 3}})
    torch.manual_seed(1)
    model = DRModel(cfg.model, 4).eval()
    vocab = Vocab(np.array([10, 11, 12, 13]))
    hist = np.array([[10, 11, -1]])
    beam_paths = model.beam(vocab.seq(hist), 2)[0].numpy()[0]
    far = next(p for p in range(36) if p not in beam_paths)
    # item 12 on the beam's best path, item 13 on a path the beam does not return
    index = PathIndex.build(np.array([[far], [far], [beam_paths[0]], [far]]))
    users = EvalUsers(hist, np.array([0, 2]), np.array([10, 11]), np.array([0, 3]), np.array([12, 13, 99]))
    # 3 truth pairs: 12 reached, 13 not, 99 not in the catalog
    assert validation_path_recall(model, vocab, users, index, 2) == pytest.approx(1 / 3)


def test_validation_path_recall_in_user_blocks_equals_one_lookup(monkeypatch):
    """Users go through the index in blocks of ~LOOKUP_PAIRS pairs: the same figure as all at once."""
    import dr_model.index as index_mod
    from dr_model.evaluation import EvalUsers, validation_path_recall
    from dr_model.index import PathIndex
    from dr_model.mstep import initial_assignment
    from dr_model.vocab import Vocab

    cfg = DRConfig.from_dict({"model": {"K": 6, "D": 2, "J": 2, "item_dim": 8, "user_dim": 8, "node_dim": 4,
                                        "hidden": 16, "rerank_dim": 8, "seq_len": 3}})
    torch.manual_seed(2)
    V, U, rng = 300, 50, np.random.default_rng(2)
    model = DRModel(cfg.model, V).eval()
    vocab = Vocab(np.arange(V, dtype=np.int64) * 2)
    hist = rng.choice(vocab.ids, size=(U, 3))
    n_truth = rng.integers(0, 6, U)
    offsets = np.r_[0, np.cumsum(n_truth)]
    truth = np.where(rng.random(offsets[-1]) < 0.1, 1, rng.choice(vocab.ids, offsets[-1]))    # 1: not in the catalog
    users = EvalUsers(hist, np.arange(U + 1) * 3, hist.ravel(), offsets, truth)
    index = PathIndex.build(initial_assignment(V, 2, cfg.model.num_paths, 0))
    whole = validation_path_recall(model, vocab, users, index, 4)
    monkeypatch.setattr(index_mod, "LOOKUP_PAIRS", 40)          # a few users per block
    assert len(index_mod.row_blocks(index.counts(model.beam(vocab.seq(hist), 4)[0].numpy()))) > 5
    assert validation_path_recall(model, vocab, users, index, 4) == whole > 0
