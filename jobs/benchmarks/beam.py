"""`dr bench beam`: beam-search throughput per core, and the brute-force cost it avoids.

Setting from the issue: K=100, D=3, B=50, user embedding 64. The `plain` figure is the
straightforward batched version (materialise concat(u, e_1, ..) for every beam, one
Linear on it) kept here only as the before-figure; the product code gathers projected
node tables instead (dr_model/structure.py).
"""
from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from dr_model.beam import beam_search
from dr_model.reranker import Reranker
from dr_model.structure import StructureModel

K, D, B, USER_DIM, NODE_DIM, HIDDEN = 100, 3, 50, 64, 32, 128


def _plain_beam(m: StructureModel, u: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    N = u.shape[0]
    prefix = torch.zeros(N, 1, 0, dtype=torch.long)
    score = torch.zeros(N, 1)
    for d in range(m.D):
        P = prefix.shape[1]
        parts = [u.unsqueeze(1).expand(N, P, -1)] + [m.node_emb[p](prefix[..., p]) for p in range(d)]
        lp = F.log_softmax(m.out[d](F.relu(m.inp[d](torch.cat(parts, -1)))), -1)
        score, idx = torch.topk((score.unsqueeze(-1) + lp).reshape(N, -1), min(beam, P * m.K), dim=1)
        parent = idx // m.K
        prefix = torch.cat([torch.gather(prefix, 1, parent.unsqueeze(-1).expand(-1, -1, d)), (idx % m.K).unsqueeze(-1)], 2)
    return prefix, score


def _rate(fn, n_users: int, min_seconds: float) -> float:
    fn()  # warm-up
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return reps * n_users / dt


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    secs = 0.5 if quick else 5.0
    m = StructureModel(USER_DIM, K, D, NODE_DIM, HIDDEN).eval()
    batch = 512
    u = torch.randn(batch, USER_DIM)
    with torch.inference_mode():
        beam = _rate(lambda: beam_search(m, u, B), batch, secs)
        plain = _rate(lambda: _plain_beam(m, u, B), batch, secs)
        n_items = 10 ** 5 if quick else 10 ** 6
        r = Reranker(n_items, USER_DIM)
        w = torch.randn(256, USER_DIM)
        brute = _rate(lambda: r.brute_force_topk(w, 200), 256, secs)
    return {
        "K": K, "D": D, "beam": B, "user_dim": USER_DIM, "hidden": HIDDEN, "batch": batch,
        "beam_users_per_s_per_core": round(beam, 1),
        "plain_beam_users_per_s_per_core": round(plain, 1),
        "target_users_per_s_per_core": 5000,
        "meets_target": beam >= 5000,
        "brute_force_items": n_items,
        "brute_force_top200_users_per_s_per_core": round(brute, 1),
        "beam_speedup_over_brute_force": round(beam / brute, 1),
    }
