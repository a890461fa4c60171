"""Retrieval scored path by path: a beam path's items are one block of vectors, scored for all its users by one GEMM.

A batch's (user, path) pairs are grouped by path; each non-empty path's item vectors come as one
block (`PathBlocks`: a slice of a path-ordered table, or a gather of the path's items) and are
scored for every user of the batch whose beam holds that path. Each (user, path) keeps its top
k + H items (H = the most excluded items of any user), which cannot drop an item of the user's
true top k: above such an item, a path holds fewer than k other kept items plus the user's
excluded ones. Duplicates (an item on several of a user's paths: same vector, same score) and
excluded pairs are then removed and the top k kept.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .index import PathIndex, excluded

# positions in PathIndex.items [n] -> (embeddings [n, d] fp32, biases [n]) of the items there
PathBlocks = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

USERS_PER_COPY = 8        # a path held by more users of a batch is scored in several copies of its block
BLOCK_ROWS = 1 << 13      # item rows of the blocks scored at once: cache-sized (more rows measured slower)


def gathered_blocks(index: PathIndex, vectors: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> PathBlocks:
    """PathBlocks from a per-item lookup: vectors(item indices [n]) -> (embeddings [n, d], biases [n])."""
    items = torch.from_numpy(np.asarray(index.items, dtype=np.int64))
    return lambda at: vectors(items.index_select(0, at))


def sliced_blocks(vec: torch.Tensor, bias: torch.Tensor) -> PathBlocks:
    """PathBlocks from tables in PathIndex.items order: vec [M, d] (any float dtype), bias [M]."""
    return lambda at: (vec.index_select(0, at).float(), bias.index_select(0, at).float())


def _pairs(paths: np.ndarray, index: PathIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """paths [N, B] -> (row [P], beam slot [P], position in index.keys [P]) of the pairs whose path is non-empty,
    sorted by path."""
    flat = paths.ravel()
    if len(index.keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(index.keys, flat), len(index.keys) - 1)
    at = np.flatnonzero(index.keys[pos] == flat)
    order = np.argsort(pos[at], kind="stable")
    at = at[order]
    return at // paths.shape[1], at % paths.shape[1], pos[at]


def _segments(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs sorted by path -> (segment [P], slot in it [P], first pair of each segment [S]).

    A segment is one block copy: the pairs of one path, USERS_PER_COPY at most.
    """
    P = len(pos)
    new_run = np.ones(P, dtype=bool)
    new_run[1:] = pos[1:] != pos[:-1]
    starts = np.flatnonzero(new_run)
    j = np.arange(P) - np.repeat(starts, np.diff(np.r_[starts, P]))
    slot = j % USERS_PER_COPY
    first = np.flatnonzero(slot == 0)
    return np.cumsum(slot == 0) - 1, slot, first


@torch.inference_mode()
def score_by_path(w: torch.Tensor, paths: np.ndarray, index: PathIndex, blocks: PathBlocks, k: int, copies: int,
                  exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top k items per user over the items of its beam paths.

    w [N, d] user vectors, paths [N, B] (beam outputs; EMPTY or unknown paths hold nothing), copies:
    the most paths one item is on (J), exclude = (row [X], item index [X]) pairs never returned ->
    (items [N, k] (-1 pad), scores [N, k] (-inf pad), vectors scored per user [N]: its paths' sizes summed).
    Segments of similar size are scored together: their blocks padded to the longest, one bmm
    against their users' vectors, one topk.
    """
    N, B = paths.shape
    row, beam_slot, pos = _pairs(paths, index)
    offsets = index.offsets
    size = np.asarray(offsets[pos + 1], dtype=np.int64) - np.asarray(offsets[pos], dtype=np.int64)
    scored = np.bincount(row, weights=size, minlength=N).astype(np.int64)
    if len(row) == 0:
        return np.full((N, k), -1, np.int64), np.full((N, k), -np.inf), scored
    H = int(np.bincount(exclude[0], minlength=N).max(initial=0)) if exclude is not None and len(exclude[0]) else 0
    keep = k + H
    seg, slot, first = _segments(pos)
    S = len(first)
    pair_at = np.full((S, USERS_PER_COPY), -1, dtype=np.int64)           # segment x slot -> pair
    pair_at[seg, slot] = np.arange(len(row))
    seg_lo = np.asarray(offsets[pos[first]], dtype=np.int64)
    seg_n = size[first]
    by_size = np.argsort(seg_n, kind="stable")
    ends = np.cumsum(seg_n[by_size])
    cuts = np.unique(np.r_[np.searchsorted(ends, np.arange(BLOCK_ROWS, int(ends[-1]), BLOCK_ROWS)), S - 1]) + 1
    w = w.float()
    # each (user, beam slot) keeps its path's best `keep` in its own columns: no sort of the pairs
    best_s = torch.full((N, B * keep), float("-inf"))
    best_at = np.zeros((N, B * keep), dtype=np.int64)                      # positions in index.items
    lo = 0
    for hi in cuts.tolist():
        c = by_size[lo:hi]
        lo = hi
        W = int(seg_n[c].max())
        cols = np.arange(W)
        valid = cols[None, :] < seg_n[c, None]                                  # [C, W]
        at = np.where(valid, seg_lo[c, None] + cols[None, :], seg_lo[c, None])
        emb, b = blocks(torch.from_numpy(at.ravel()))
        emb, b = emb.view(len(c), W, -1), b.view(len(c), W).float()
        pp = pair_at[c]                                                         # [C, slots]
        m = int((pp >= 0).sum(1).max())
        pp = pp[:, :m]
        has = pp >= 0
        users = w.index_select(0, torch.from_numpy(row[np.where(has, pp, 0)].ravel())).view(len(c), m, -1)
        sc = torch.baddbmm(b.unsqueeze(1), users, emb.transpose(1, 2))          # [C, m, W]
        sc.masked_fill_(torch.from_numpy(~valid).unsqueeze(1), float("-inf"))
        sc = sc[torch.from_numpy(has)]                                          # [Q, W]: the real pairs
        q = pp[has]
        seg_q = np.repeat(np.arange(len(c)), has.sum(1))
        kk = min(keep, W)
        if kk < W:
            top_s, top_c = torch.topk(sc, kk, dim=1, sorted=False)     # the final cut orders them
            top_c = top_c.numpy()
        else:
            top_s, top_c = sc, np.broadcast_to(cols, sc.shape)
        dest = beam_slot[q, None] * keep + np.arange(kk)[None, :]
        best_s[torch.from_numpy(row[q, None]), torch.from_numpy(dest)] = top_s
        best_at[row[q, None], dest] = at[seg_q[:, None], top_c]
    # an item is on at most `copies` of a user's paths, and at most H of its items are excluded:
    # k + H distinct items, each up to `copies` times, hold the user's k best that are not excluded
    kq = min(copies * keep, B * keep)
    top_s, top_c = torch.topk(best_s, kq, dim=1)
    top_s = top_s.double().numpy()
    items = np.where(np.isfinite(top_s), np.asarray(index.items[np.take_along_axis(best_at, top_c.numpy(), 1)]), -1)
    items = items.astype(np.int64)
    if H:
        items[excluded(items, exclude, index.num_items)] = -1
    return *_dedupe(items, top_s, k), scored


def _dedupe(items: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of items [N, m] in score order (-1 pad) -> the first k distinct per row (items [N, k], scores [N, k])."""
    N, m = items.shape
    # sorted by (item, column): equal items keep the best-scored copy first; one sort of packed keys
    # instead of a stable argsort (~3x faster)
    sh = max(m - 1, 1).bit_length()
    key = np.sort((items << sh) | np.arange(m, dtype=np.int64)[None, :], axis=1)
    s_items, order = key >> sh, key & ((1 << sh) - 1)
    dup_sorted = np.zeros((N, m), dtype=bool)
    dup_sorted[:, 1:] = (s_items[:, 1:] == s_items[:, :-1]) & (s_items[:, 1:] >= 0)
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, 1)
    ok = ~dup & (items >= 0)
    rank = np.cumsum(ok, axis=1) - 1
    take = ok & (rank < k)
    out_i = np.full((N, k), -1, np.int64)
    out_s = np.full((N, k), -np.inf)
    rr, cc = np.nonzero(take)
    out_i[rr, rank[rr, cc]] = items[rr, cc]
    out_s[rr, rank[rr, cc]] = scores[rr, cc]
    return out_i, out_s


__all__ = ["PathBlocks", "score_by_path", "gathered_blocks", "sliced_blocks"]
