"""`dr bench negatives`: one step's sampled-softmax negatives, torch.multinomial over all items
(the proposal the E-step drew from before) vs dr_model.sampling.Proposal, at 10^4..10^7 items.

Counts are Zipf(1.1) draws (a long-tailed catalog), proposal count^0.75, 256 negatives per step
as in the default config, one thread. Printed per size (lists aligned with `items`):
`multinomial_ms_per_step`, `proposal_ms_per_step`, `speedup`, `proposal_build_s`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from dr_model.sampling import Proposal

SIZES = (10_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 1_000_000)
NEGATIVES = 256


def _ms_per_call(fn, min_seconds: float = 1.0) -> float:
    fn()                                                   # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    sizes = QUICK_SIZES if quick else SIZES
    rows = []
    for V in sizes:
        counts = torch.from_numpy(np.random.default_rng(0).zipf(1.1, V).astype(np.int64))
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        prop = Proposal(counts)
        build = time.perf_counter() - t0
        q = counts.double().clamp_min(1) ** 0.75
        q = (q / q.sum()).float()
        multi = _ms_per_call(lambda: torch.multinomial(q, NEGATIVES, replacement=True, generator=gen))
        ours = _ms_per_call(lambda: prop.sample(NEGATIVES, gen))
        rows.append((multi, ours, build))
    return {
        "date": time.strftime("%Y-%m-%d"), "items": list(sizes), "negatives_per_step": NEGATIVES,
        "multinomial_ms_per_step": [round(r[0], 3) for r in rows],
        "proposal_ms_per_step": [round(r[1], 3) for r in rows],
        "speedup": [round(r[0] / r[1], 1) for r in rows],
        "proposal_build_s": [round(r[2], 2) for r in rows],
    }
