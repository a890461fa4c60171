"""s[v,c] aggregation and streaming merge; P/R/F@k metrics; the in-process split."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dr_model.scores as scores_mod
from dr_model.config import SplitConfig
from dr_model.metrics import per_user_prf, prf_at_k
from dr_model.scores import EMPTY, PathScores, _grouped_lists, aggregate_pairs, streaming_merge
from dr_model.split import paper_split, roles


def _as_dict(ps: PathScores) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for v, row_p, row_s in zip(ps.items, ps.paths, ps.scores):
        out[int(v)] = {int(p): float(s) for p, s in zip(row_p, row_s) if p != EMPTY}
    return out


def test_aggregate_sums_exactly_and_keeps_top_s_per_item():
    # pairs: item 7 twice, item 3 once; each pair's beam gave 3 paths
    item = np.array([7, 7, 3])
    path = np.array([[1, 2, 3], [2, 4, 1], [9, 8, 7]])
    prob = np.array([[0.5, 0.2, 0.1], [0.4, 0.3, 0.05], [0.6, 0.3, 0.1]])
    ps = aggregate_pairs(item, path, prob, S=2)
    np.testing.assert_array_equal(ps.items, [3, 7])
    np.testing.assert_array_equal(ps.n_v, [1, 2])
    d = _as_dict(ps)
    assert d[3] == pytest.approx({9: 0.6, 8: 0.3})
    # item 7: path1 0.55, path2 0.6, path4 0.3, path3 0.1 -> top 2: 2, 1
    assert d[7] == pytest.approx({2: 0.6, 1: 0.55})
    assert np.all(ps.scores[:, :-1] >= ps.scores[:, 1:])


def test_aggregate_pads_items_with_fewer_than_s_paths():
    ps = aggregate_pairs(np.array([1]), np.array([[4, 5]]), np.array([[0.7, 0.2]]), S=4)
    np.testing.assert_array_equal(ps.paths[0], [4, 5, EMPTY, EMPTY])
    np.testing.assert_array_equal(ps.scores[0], [0.7, 0.2, 0, 0])


def test_aggregate_rejects_negative_scores():
    with pytest.raises(ValueError, match=">= 0"):
        aggregate_pairs(np.array([1]), np.array([[4]]), np.array([[-0.1]]), S=1)


def test_streaming_merge_follows_the_three_cases():
    eta = 0.9
    S = 3
    old = PathScores(np.array([1, 2]), np.array([[10, 11, 12], [20, EMPTY, EMPTY]]),
                     np.array([[5.0, 3.0, 1.0], [2.0, 0, 0]]), np.array([4.0, 1.0]))
    new = PathScores(np.array([1, 3]), np.array([[11, 13, EMPTY], [30, EMPTY, EMPTY]]),
                     np.array([[2.0, 4.0, 0], [0.5, 0, 0]]), np.array([2.0, 1.0]))
    m = streaming_merge(old, new, eta)
    d = _as_dict(m)
    # item 1: min_score = 1.0
    #   11 in both -> 0.9*3 + 2 = 4.7; 13 only new -> 0.9*1 + 4 = 4.9;
    #   10 only old -> 4.5; 12 only old -> 0.9; keep top 3 -> 13, 11, 10
    assert d[1] == pytest.approx({13: 4.9, 11: 4.7, 10: 4.5})
    # item 2: only old -> decayed
    assert d[2] == pytest.approx({20: 1.8})
    # item 3: never stored -> min_score is 0, so just s'
    assert d[3] == pytest.approx({30: 0.5})
    np.testing.assert_allclose(m.n_v, [0.9 * 4 + 2, 0.9 * 1, 1.0])
    assert m.S == S


def test_streaming_merge_equals_batch_when_eta_is_one_and_lists_fit():
    rng = np.random.default_rng(0)
    item = rng.integers(0, 20, 200)
    path = rng.integers(0, 6, (200, 2))
    path[:, 1] = (path[:, 0] + 1 + rng.integers(0, 5, 200)) % 6  # two distinct paths per pair
    prob = rng.random((200, 2))
    whole = aggregate_pairs(item, path, prob, S=6)
    a = aggregate_pairs(item[:100], path[:100], prob[:100], S=6)
    b = aggregate_pairs(item[100:], path[100:], prob[100:], S=6)
    merged = streaming_merge(a, b, 1.0)
    # with S covering all 6 paths nothing is ever dropped; seeding adds min_score only to new paths
    da, dw, dm = _as_dict(a), _as_dict(whole), _as_dict(merged)
    for v, paths in dw.items():
        mins = min(da[v].values()) if v in da and len(da[v]) else 0.0
        for p, s in paths.items():
            seeded = 0.0 if (v not in da or p in da[v]) else mins
            assert dm[v][p] == pytest.approx(s + seeded)


def test_from_long_reads_written_rows_like_aggregate_pairs(monkeypatch):
    """path_scores rows as written (an item's rows together, any item order) take the fast path; an item
    whose rows are split falls back to the exact sum; both equal aggregate_pairs."""
    rng = np.random.default_rng(1)
    m, S = 40, 5
    items = rng.permutation(np.arange(100, 100 + m))            # items in no order, as a file may hold them
    width = rng.integers(1, S + 1, m)
    width[0] = S                                                 # the first item's rows can be split
    item = np.repeat(items, width)
    path = np.concatenate([rng.choice(50, w, replace=False) for w in width])
    score = rng.random(len(item))
    n_v = np.repeat(rng.integers(1, 9, m).astype(float), width)
    want = aggregate_pairs(item, path, score, S, n_v=n_v, n_v_is_per_item=True)
    for check_rows in (1 << 16, 3):                              # the checks in row blocks give the same
        monkeypatch.setattr(scores_mod, "CHECK_ROWS", check_rows)
        for rows, fast in ((np.arange(len(item)), True), (np.r_[np.arange(2, len(item)), np.arange(2)], False)):
            assert (_grouped_lists(item[rows], path[rows], score[rows], n_v[rows], S) is not None) == fast
            got = PathScores.from_long(item[rows], path[rows], score[rows], n_v[rows], S)
            np.testing.assert_array_equal(got.items, want.items)
            np.testing.assert_array_equal(got.paths, want.paths)
            np.testing.assert_allclose(got.scores, want.scores)
            np.testing.assert_allclose(got.n_v, want.n_v)
    # pad=False: lists as written keep their longest width (no copy into S columns)
    narrow = width < S
    keep = np.isin(item, items[narrow])
    w = int(width[narrow].max())
    want_n = aggregate_pairs(item[keep], path[keep], score[keep], S, n_v=n_v[keep], n_v_is_per_item=True)
    got_n = PathScores.from_long(item[keep], path[keep], score[keep], n_v[keep], S, pad=False)
    assert got_n.S == w < S
    np.testing.assert_array_equal(got_n.paths, want_n.paths[:, :w])
    np.testing.assert_array_equal(got_n.scores, want_n.scores[:, :w])


def test_metrics_match_hand_computed_cases():
    pred = np.array([[1, 2, 3, 4], [5, 6, 7, -1], [9, 9, 9, 9]])
    truth_offsets = np.array([0, 2, 5, 6])
    truth_items = np.array([2, 8, 5, 6, 10, 3])
    p, r, f = per_user_prf(pred, truth_offsets, truth_items, k=4)
    np.testing.assert_allclose(p, [1 / 4, 2 / 4, 0])
    np.testing.assert_allclose(r, [1 / 2, 2 / 3, 0])
    np.testing.assert_allclose(f, [2 * (0.25 * 0.5) / 0.75, 2 * (0.5 * 2 / 3) / (0.5 + 2 / 3), 0])
    agg = prf_at_k(pred, truth_offsets, truth_items, k=4)
    assert agg.recall == pytest.approx((0.5 + 2 / 3) / 3)
    assert agg.users == 3
    # @2 only the first two predictions count
    p2, r2, _ = per_user_prf(pred, truth_offsets, truth_items, k=2)
    np.testing.assert_allclose(p2, [0.5, 1.0, 0])
    # duplicate truth items count once
    p3, r3, _ = per_user_prf(np.array([[4, 5]]), np.array([0, 3]), np.array([4, 4, 6]), k=2)
    np.testing.assert_allclose([p3[0], r3[0]], [0.5, 0.5])


def _toy_interactions() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        n = int(rng.integers(4, 25))
        for t in range(n):
            rows.append((u, int(rng.integers(0, 50)), float(rng.integers(1, 6)), 1000 + 7 * t + u))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "ts"])


def test_split_rules_disjoint_users_and_halves():
    df = _toy_interactions()
    cfg = SplitConfig(rating_threshold=3.0, min_events=5, test_users=5, valid_users=4, seed=3)
    s = paper_split(df, cfg, seq_len=4)
    kept = df[df.rating >= 3.0]
    counts = kept.groupby("user_id").size()
    eligible = set(counts[counts >= 5].index)
    assert set(s.eval_user) <= eligible and set(s.train_user) <= eligible
    assert not set(s.eval_user) & set(s.train_user)
    assert np.bincount(s.eval_role, minlength=3)[1:].tolist() == [4, 5]
    # every training user with n events yields n-1 samples
    tr = counts[list(set(eligible) - set(s.eval_user))]
    assert len(s.train_target) == int((tr - 1).sum())
    # eval user: input = last <= L items of the first half, truth = the second half
    for i, u in enumerate(s.eval_user):
        ev = kept[kept.user_id == u].sort_values(["ts", "item_id"]).item_id.to_numpy()
        h = len(ev) // 2
        want_hist = ev[:h][-4:]
        got = s.eval_hist[i]
        np.testing.assert_array_equal(got[got >= 0], want_hist)
        np.testing.assert_array_equal(s.truth_items[s.truth_offsets[i]:s.truth_offsets[i + 1]], ev[h:])
    # roles depend only on (user, seed)
    users = np.array(sorted(eligible))
    np.testing.assert_array_equal(roles(users, cfg), roles(users, cfg))
    assert not np.array_equal(roles(users, cfg), roles(users, SplitConfig(test_users=5, valid_users=4, seed=4)))
