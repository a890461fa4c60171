"""Synthetic interactions with planted interest clusters and power-law popularity.

Item i belongs to cluster i % C and has rank i // C inside it; popularity within a
cluster falls as (rank+1)^-a. Each user draws `interests` clusters and every event
picks one of them, then an item by popularity. Everything is a closed-form function
of (seed, user id), so chunks of users are generated independently in O(chunk) memory
and the ground truth (item -> cluster, user -> clusters) is known exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and shape of a planted-cluster dataset."""

    num_users: int = 2000
    num_items: int = 1000
    num_clusters: int = 20
    events_per_user: int = 30
    interests: int = 1          # clusters per user
    zipf_a: float = 1.1         # popularity exponent inside a cluster
    noise: float = 0.0          # fraction of events drawn uniformly from the catalog
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_clusters", "events_per_user", "interests"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_clusters > self.num_items:
            raise ValueError("SyntheticSpec.num_clusters must be <= num_items")
        if not (0 <= self.noise <= 1) or self.zipf_a <= 0 or self.zipf_a == 1.0:
            raise ValueError("SyntheticSpec: need 0 <= noise <= 1 and zipf_a > 0, != 1")

    @property
    def num_events(self) -> int:
        return self.num_users * self.events_per_user


def item_cluster(item_id: np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """Ground-truth cluster of items [n] -> [n] int64."""
    return np.asarray(item_id, dtype=np.int64) % spec.num_clusters


def user_clusters(user_id: np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """Ground-truth interest clusters of users [n] -> [n, interests] int64."""
    u = np.asarray(user_id, dtype=np.int64)
    # A hash of (user, slot, seed): the same clusters whichever chunk the user falls in.
    mix = (u[:, None] % (2 ** 31 - 1) * 0x9E3779B1 + np.arange(spec.interests)[None, :] * 0x85EBCA77 + spec.seed) % (2 ** 31 - 1)
    return mix % spec.num_clusters


def _cluster_sizes(spec: SyntheticSpec, cluster: np.ndarray) -> np.ndarray:
    base, extra = divmod(spec.num_items, spec.num_clusters)
    return base + (cluster < extra)


def generate_users(first_user: int, count: int, spec: SyntheticSpec) -> pd.DataFrame:
    """Events of users [first_user, first_user+count): (user_id, item_id, rating, ts), ts increasing per user."""
    users = np.arange(first_user, first_user + count, dtype=np.int64)
    rng = np.random.default_rng([spec.seed, first_user, count])
    E = spec.events_per_user
    clusters = user_clusters(users, spec)                                   # [n, I]
    pick = rng.integers(0, spec.interests, size=(count, E))
    cl = np.take_along_axis(clusters, pick, axis=1).ravel()                 # [n*E]
    n_c = _cluster_sizes(spec, cl).astype(np.float64)
    # Inverse CDF of the continuous power law on [1, n_c + 1): rank in [0, n_c).
    a = spec.zipf_a
    u = rng.random(cl.shape[0])
    rank = np.floor(((np.power(n_c + 1, 1 - a) - 1) * u + 1) ** (1 / (1 - a))).astype(np.int64) - 1
    rank = np.clip(rank, 0, n_c.astype(np.int64) - 1)
    item = rank * spec.num_clusters + cl
    if spec.noise > 0:
        noisy = rng.random(cl.shape[0]) < spec.noise
        item[noisy] = rng.integers(0, spec.num_items, size=int(noisy.sum()))
    # seconds; one event a minute per user, users staggered so days vary
    ts = 1_600_000_000 + np.repeat(users % 86_400, E) + np.tile(np.arange(E, dtype=np.int64) * 60, count)
    return pd.DataFrame({
        "user_id": np.repeat(users, E),
        "item_id": item,
        "rating": np.full(cl.shape[0], 5.0, dtype=np.float32),
        "ts": ts,
    })


def generate(spec: SyntheticSpec) -> pd.DataFrame:
    """All events of a (small) synthetic dataset in one frame."""
    return generate_users(0, spec.num_users, spec)
