"""`dr bench mstep`: M-step coordinate-descent throughput per core, against the sequential reference.

Setting from the issue: 10^6 items, S=32 candidates, J=3, K=100, D=3 (10^6 paths), 3
rounds. The scores are synthetic with planted structure (`synthetic_scores`): every item
belongs to a home cluster of 64 candidate paths, cluster sizes are Zipf (the largest
holds ~10% of all items) and so is path popularity inside a cluster, so without the
penalty one path collects ~64k items; alpha = 3e-10 caps it near 5.3k while the
log-likelihood still dominates Q (penalty ~1/3 of it).

Both solvers start from the same balanced random assignment and run the same rounds on
the same scores, with MStepConfig's default block_size. Throughput counts only the sweeps
(not the per-round statistics): `*_per_core` figures divide by process CPU time, so
other load on the machine does not deflate them (the kernel is NumPy ufuncs, single
threaded; `cpu_per_wall` shows it), `*_wall` ones by wall time. The plain block-Jacobi
kernel (damping off) is measured too, as the before-figure.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from dr_model.config import MStepConfig
from dr_model.mstep import MStepResult, initial_assignment, mstep_blocked, mstep_reference
from dr_model.scores import PathScores

K, D, S, J = 100, 3, 32, 3
ALPHA = 3e-10         # caps the largest path of the synthetic data ~12x (see module doc)
POWER = 4.0
ROUNDS = 3
TARGET = 1_000_000    # fast-kernel item-rounds per second per core


def synthetic_scores(num_items: int, S: int, num_paths: int, seed: int = 0, *, items_per_cluster: int = 50,
                     pool: int = 64, cluster_zipf: float = 1.0, path_zipf: float = 1.2,
                     chunk: int = 1 << 17) -> PathScores:
    """Planted-cluster s[v,c]: items [V], paths [V,S] distinct per row, scores [V,S] descending, n_v [V].

    Item v picks a home cluster (Zipf(cluster_zipf) popularity); the cluster owns `pool`
    paths; the item's S candidates are drawn from that pool without replacement with
    Zipf(path_zipf) weights (Gumbel top-S), so the cluster's first paths are everybody's
    favourites. Scores: N_v * (Dirichlet-like decaying shares), i.e. summed beam
    probabilities over the item's N_v training pairs (N_v ~ 1 + lognormal).
    """
    if pool < S or pool > num_paths:
        raise ValueError(f"need S={S} <= pool={pool} <= num_paths={num_paths}")
    rng = np.random.default_rng(seed)
    n_clusters = max(1, num_items // items_per_cluster)
    perm = rng.permutation(num_paths)
    # each cluster owns `pool` consecutive entries of a random permutation (distinct in a pool)
    pools = perm[(np.arange(n_clusters)[:, None] * pool + np.arange(pool)[None, :]) % num_paths]
    cw = 1.0 / np.arange(1, n_clusters + 1) ** cluster_zipf
    home = rng.choice(n_clusters, size=num_items, p=cw / cw.sum())
    log_pw = -path_zipf * np.log(np.arange(1, pool + 1))
    n_v = 1.0 + np.floor(rng.lognormal(1.0, 1.0, num_items))
    paths = np.empty((num_items, S), dtype=np.int64)
    scores = np.empty((num_items, S), dtype=np.float64)
    for lo in range(0, num_items, chunk):
        hi = min(num_items, lo + chunk)
        n = hi - lo
        key = log_pw[None, :] + rng.gumbel(size=(n, pool))
        top = np.argpartition(-key, S - 1, axis=1)[:, :S]
        # share of the item's probability mass per candidate: popularity times noise
        w = np.exp(np.take_along_axis(key, top, 1))
        w /= w.sum(1, keepdims=True)
        order = np.argsort(-w, axis=1)
        top = np.take_along_axis(top, order, 1)
        scores[lo:hi] = 0.9 * n_v[lo:hi, None] * np.take_along_axis(w, order, 1)
        paths[lo:hi] = pools[home[lo:hi, None], top]
    return PathScores(np.arange(num_items, dtype=np.int64), paths, scores, n_v)


def _single_thread() -> None:
    """One thread everywhere (env vars reach libraries loaded later; the timed code is single-threaded NumPy ufuncs)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    torch = sys.modules.get("torch")   # only if already loaded: importing torch costs seconds
    if torch is not None:
        torch.set_num_threads(1)


def _rates(res: MStepResult, V: int) -> tuple[float, float, float]:
    """(item-rounds per CPU second, per wall second, CPU/wall) over the sweeps of a result."""
    cpu = sum(r.cpu_seconds for r in res.rounds)
    wall = sum(r.seconds for r in res.rounds)
    n = V * len(res.rounds)
    return n / cpu, n / wall, cpu / wall


def _per_round(res: MStepResult) -> list[dict]:
    return [{"round": r.round, "objective": round(r.objective, 3), "max_path_size": r.max_path_size,
             "nonempty_paths": r.nonempty_paths, "items_moved": r.items_moved, "skipped_items": r.skipped_items,
             "seconds": round(r.seconds, 3), "cpu_seconds": round(r.cpu_seconds, 3)}
            for r in [res.initial, *res.rounds]]


def run(quick: bool = False) -> dict:
    """Fast kernel vs sequential reference on 10^6 items (10^5 with quick); stable keys listed in the issue."""
    _single_thread()
    V = 10 ** 5 if quick else 10 ** 6
    num_paths = K ** D
    t0 = time.perf_counter()
    ps = synthetic_scores(V, S, num_paths, seed=0)
    assign0 = initial_assignment(V, J, num_paths, seed=1)
    setup_s = time.perf_counter() - t0
    cfg = MStepConfig(alpha=ALPHA, penalty_power=POWER, rounds=ROUNDS)
    fast = mstep_blocked(ps, assign0, num_paths, cfg)
    plain = mstep_blocked(ps, assign0, num_paths, cfg, damping=False)
    # the same data without the penalty: shows alpha really constrains the largest path
    free = mstep_blocked(ps, assign0, num_paths, MStepConfig(alpha=0.0, penalty_power=POWER, rounds=1))
    t0 = time.perf_counter()
    ref = mstep_reference(ps, assign0, num_paths, cfg)
    ref_wall = time.perf_counter() - t0
    rate, rate_wall, cpu_per_wall = _rates(fast, V)
    plain_rate, _, _ = _rates(plain, V)
    ref_rate, _, _ = _rates(ref, V)

    def gap(res: MStepResult) -> float:   # > 0: below the reference
        return (ref.objective - res.objective) / abs(ref.objective)

    return {
        "items": V, "S": S, "J": J, "K": K, "D": D, "num_paths": num_paths, "rounds": ROUNDS,
        "alpha": ALPHA, "penalty_power": POWER, "block_size": cfg.block_size,
        "item_rounds_per_s_per_core": round(rate, 1),
        "item_rounds_per_s_wall": round(rate_wall, 1),
        "cpu_per_wall": round(cpu_per_wall, 3),
        "reference_item_rounds_per_s_per_core": round(ref_rate, 1),
        "speedup_over_reference": round(rate / ref_rate, 1),
        "objective_fast": float(fast.objective),
        "objective_reference": float(ref.objective),
        "objective_rel_gap": float(gap(fast)),
        "max_path_size_fast": fast.rounds[-1].max_path_size,
        "max_path_size_reference": ref.rounds[-1].max_path_size,
        "max_path_size_without_penalty": free.rounds[-1].max_path_size,
        "undamped_item_rounds_per_s_per_core": round(plain_rate, 1),
        "undamped_objective_rel_gap": float(gap(plain)),
        "undamped_max_path_size": plain.rounds[-1].max_path_size,
        "target_item_rounds_per_s_per_core": TARGET,
        "meets_target": bool(rate >= TARGET and abs(gap(fast)) <= 0.005),
        "rounds_fast": _per_round(fast),
        "rounds_reference": _per_round(ref),
        "rounds_undamped": _per_round(plain),
        "setup_s": round(setup_s, 2),
        "reference_wall_s": round(ref_wall, 1),
    }


if __name__ == "__main__":  # pragma: no cover
    import json
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
