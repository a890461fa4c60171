"""Scoring path by path returns the exact top k over each user's candidates: duplicates and history removed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dr_model.path_scoring as path_scoring
from dr_model.index import PathIndex
from dr_model.path_scoring import gathered_blocks, score_by_path, sliced_blocks


def _case(seed: int, V: int, P: int, J: int, N: int, B: int, d: int = 8):
    g = np.random.default_rng(seed)
    assign = np.stack([g.choice(P, J, replace=False) for _ in range(V)])        # J distinct paths per item
    index = PathIndex.build(assign)
    emb = torch.from_numpy(g.normal(size=(V, d)).astype(np.float32))
    bias = torch.from_numpy(g.normal(size=V).astype(np.float32))
    w = torch.from_numpy(g.normal(size=(N, d)).astype(np.float32))
    # beams that share paths across users, with some paths nobody holds (empty) and repeats of EMPTY
    paths = np.stack([g.choice(P + 5, B, replace=False) for _ in range(N)]).astype(np.int64)
    paths[g.random(paths.shape) < 0.05] = -1
    hist = g.integers(0, V, size=(N, 6))
    # half the users' history lies on their own paths (several copies each): the best-scored ones
    on_paths = [index.items[index.offsets[np.searchsorted(index.keys, p)]] for p in paths[:, :3].clip(0).ravel()
                if p in set(index.keys.tolist())]
    if on_paths:
        hist[: N // 2, :3] = g.choice(np.asarray(on_paths), size=(N // 2, 3))
    ex = (np.repeat(np.arange(N), 6).astype(np.int64), hist.ravel().astype(np.int64))
    return index, emb, bias, w, paths, ex, assign


def _reference(w, emb, bias, paths, index, ex, k):
    """Every candidate of every user scored one by one -> (items [N, k], scores [N, k])."""
    N = len(paths)
    want_i, want_s = np.full((N, k), -1), np.full((N, k), -np.inf)
    row, item = index.lookup(paths)
    for u in range(N):
        cand = np.setdiff1d(item[row == u], ex[1][ex[0] == u])
        s = (emb[cand] @ w[u] + bias[cand]).double().numpy()
        top = np.argsort(-s, kind="stable")[:k]
        want_i[u, :len(top)], want_s[u, :len(top)] = cand[top], s[top]
    return want_i, want_s


@pytest.mark.parametrize("users_per_copy,block_rows", [(8, 1 << 13), (2, 64)])
@pytest.mark.parametrize("seed,V,P,J,N,B,k", [(0, 300, 40, 3, 50, 6, 10), (1, 2_000, 60, 2, 200, 8, 25),
                                               (2, 50, 7, 3, 30, 4, 40), (3, 500, 500, 1, 20, 3, 5)])
def test_score_by_path_is_exact(monkeypatch, users_per_copy, block_rows, seed, V, P, J, N, B, k):
    """Small copies and blocks too: many segments per path, many chunks per batch."""
    monkeypatch.setattr(path_scoring, "USERS_PER_COPY", users_per_copy)
    monkeypatch.setattr(path_scoring, "BLOCK_ROWS", block_rows)
    index, emb, bias, w, paths, ex, _ = _case(seed, V, P, J, N, B)
    vectors = lambda items: (emb[items], bias[items])  # noqa: E731
    want_i, want_s = _reference(w, emb, bias, paths, index, ex, k)
    for blocks in (gathered_blocks(index, vectors), sliced_blocks(emb[torch.from_numpy(index.items)], bias[torch.from_numpy(index.items)])):
        got_i, got_s, scored = score_by_path(w, paths, index, blocks, k, J, ex)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
        same = (got_i == want_i) | np.isclose(got_s, np.roll(got_s, 1, axis=1)) | np.isclose(got_s, np.roll(got_s, -1, axis=1))
        assert same.all()                        # equal items, up to the order of exactly tied scores
        for u in range(N):                       # never an excluded item, never twice
            got = got_i[u][got_i[u] >= 0]
            assert len(set(got)) == len(got) and not set(got) & set(ex[1][ex[0] == u])
        assert (scored == index.counts(paths)).all()


def test_score_by_path_without_candidates():
    index, emb, bias, w, _, _, _ = _case(0, 100, 10, 2, 5, 3)
    paths = np.full((5, 3), -1, dtype=np.int64)
    items, scores, scored = score_by_path(w, paths, index, sliced_blocks(emb, bias), 4, 2)
    assert (items == -1).all() and np.isneginf(scores).all() and (scored == 0).all()


@pytest.mark.parametrize("compare_max", [48, 0])
def test_excluded_matches_a_set_test(monkeypatch, compare_max):
    """Both ways (compare per column, binary search) flag exactly the (row, item) pairs listed, in any order."""
    import dr_model.index as index_mod

    monkeypatch.setattr(index_mod, "COMPARE_MAX", compare_max)
    g = np.random.default_rng(7)
    N, m, V = 40, 30, 200
    items = g.integers(-1, V, size=(N, m))
    row = g.integers(0, N - 5, size=300)                  # rows 35.. exclude nothing; rows unsorted, repeats
    item = np.where(g.random(300) < 0.5, items[row, g.integers(0, m, 300)], g.integers(0, V, 300))
    got = index_mod.excluded(items, (row, item), V)
    listed = {(int(r), int(i)) for r, i in zip(row, item)}
    want = np.array([[(u, int(x)) in listed for x in items[u]] for u in range(N)])
    assert got.any() and (got == want).all()
    assert not index_mod.excluded(items, (np.zeros(0, np.int64), np.zeros(0, np.int64)), V).any()
