"""The paper's split, in process (the reference the Spark split job must reproduce).

Rules: keep events with rating >= threshold; keep users with >= min_events kept events;
hold out test and validation users (disjoint from training users) chosen by a seeded
integer hash of user_id, so every engine picks the same users; order each user's events
by (ts, item_id); training users give (previous <= L items, next item) samples;
evaluation users give their first half (by time) as input and second half as truth.
The input half is kept whole (`input_*`, for the baselines and for excluding seen items)
besides its last L items (`eval_hist`, the sequence the models read).

Held-out sizes adapt to small datasets: at most `max_heldout_fraction` of the eligible
users are held out, test and validation scaled down together (`heldout_sizes`), so the
default sizes never ask for more users than a dataset has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import SplitConfig

PAD = -1
HASH_MULT = 48271
HASH_MOD = 2147483647  # 2**31 - 1: squares of residues stay below 2**62, no int64 overflow


def user_hash(user_id: np.ndarray, seed: int) -> np.ndarray:
    """Seeded hash [U] -> [U] int64 in [0, P), with P = 2**31-1, in plain int64 arithmetic:

    x = pmod(pmod(u, P) * 48271 + seed, P); then twice x = pmod(x * x + seed + 1, P).
    The squaring makes the ranking depend on the seed (an affine map alone would not),
    and every step is expressible in Spark SQL, so every engine picks the same users.
    """
    u = np.asarray(user_id, dtype=np.int64)
    x = np.mod(np.mod(u, HASH_MOD) * HASH_MULT + seed, HASH_MOD)
    for _ in range(2):
        x = np.mod(x * x + seed + 1, HASH_MOD)
    return x


def heldout_sizes(eligible: int, cfg: SplitConfig) -> tuple[int, int]:
    """(test, validation) users for `eligible` users: the configured sizes, scaled down together
    (floor, proportionally) when they exceed max_heldout_fraction of the eligible users."""
    want = cfg.test_users + cfg.valid_users
    cap = int(eligible * cfg.max_heldout_fraction)
    if want <= cap:
        return cfg.test_users, cfg.valid_users
    test = cfg.test_users * cap // want
    return test, min(cfg.valid_users * cap // want, cap - test)


def roles(user_ids: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Eligible users [U] -> role [U] int8: 0 train, 1 validation, 2 test (by hash rank)."""
    n_test, n_valid = heldout_sizes(len(user_ids), cfg)
    if len(user_ids) and cfg.test_users + cfg.valid_users and n_test + n_valid == 0:
        raise ValueError(f"split: {len(user_ids)} eligible users (>= split.min_events={cfg.min_events} kept events) "
                         "leave no held-out user: the dataset is too small to evaluate")
    h = user_hash(user_ids, cfg.seed)
    order = np.lexsort((user_ids, h))
    role = np.zeros(len(user_ids), dtype=np.int8)
    role[order[:n_test]] = 2
    role[order[n_test: n_test + n_valid]] = 1
    return role


def windows(items: np.ndarray, starts: np.ndarray, positions: np.ndarray, L: int) -> np.ndarray:
    """History windows: for each row index p (global, into `items`), the <= L items before it
    within its user (user starts at `starts`), left-padded with PAD. -> [P, L] int64."""
    offs = np.arange(-L, 0, dtype=np.int64)
    idx = positions[:, None] + offs[None, :]
    valid = idx >= starts[:, None]
    return np.where(valid, items[np.clip(idx, 0, None)], PAD)


@dataclass(frozen=True)
class Split:
    """Training samples and evaluation users.

    train_hist [N, L], train_target [N], train_user [N]; eval_user [U], eval_role [U]
    (1 validation, 2 test), eval_hist [U, L] (last L input items), truth_offsets [U+1],
    truth_items [T], the whole input half as CSR: input_offsets [U+1], input_items [I].
    """

    train_hist: np.ndarray
    train_target: np.ndarray
    train_user: np.ndarray
    eval_user: np.ndarray
    eval_role: np.ndarray
    eval_hist: np.ndarray
    truth_offsets: np.ndarray
    truth_items: np.ndarray
    input_offsets: np.ndarray
    input_items: np.ndarray

    def train_next(self, width: int) -> np.ndarray:
        """[N, width] raw ids: each sample's target and the user's next width-1 items (-1 pad)."""
        return next_items(self.train_user, self.train_target, width)

    def eval_subset(self, role: int) -> "Split":
        """Only the evaluation users with this role (1 validation, 2 test)."""
        keep = self.eval_role == role
        t_off, t_items = csr_rows(self.truth_offsets, self.truth_items, keep)
        i_off, i_items = csr_rows(self.input_offsets, self.input_items, keep)
        return Split(self.train_hist, self.train_target, self.train_user, self.eval_user[keep],
                     self.eval_role[keep], self.eval_hist[keep], t_off, t_items, i_off, i_items)


def next_items(user: np.ndarray, target: np.ndarray, width: int) -> np.ndarray:
    """Training samples in (user, time) order: user [N], target [N] -> [N, width] raw ids, row i =
    the targets of samples i..i+width-1 of the same user (-1 past the user's last event)."""
    n = len(target)
    out = np.full((n, width), -1, dtype=np.int64)
    for j in range(width):     # width columns, each vectorized over the samples
        same = user[j:] == user[:n - j]
        out[:n - j, j] = np.where(same, target[j:], -1)
    return out


def csr_rows(offsets: np.ndarray, values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `keep` [U] bool of a CSR (offsets [U+1], values [T]) -> (offsets [U'+1], values [T'])."""
    lens = np.diff(offsets)
    offs = np.concatenate([[0], np.cumsum(lens[keep])]).astype(np.int64)
    return offs, values[np.repeat(keep, lens)]


def csr_segments(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Global row indices of consecutive segments (start [U], length [U]) -> [sum(lens)] int64."""
    return np.repeat(starts, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))


def paper_split(interactions: pd.DataFrame, cfg: SplitConfig, seq_len: int) -> Split:
    """interactions (user_id, item_id, rating, ts) -> Split, fully vectorized."""
    df = interactions
    if "rating" in df.columns:
        df = df[df["rating"] >= cfg.rating_threshold]
    df = df.sort_values(["user_id", "ts", "item_id"], kind="stable")
    user = df["user_id"].to_numpy(np.int64)
    item = df["item_id"].to_numpy(np.int64)
    users, starts, counts = np.unique(user, return_index=True, return_counts=True)
    eligible = counts >= cfg.min_events
    role_of_user = np.full(len(users), -1, dtype=np.int8)
    role_of_user[eligible] = roles(users[eligible], cfg)
    row_role = np.repeat(role_of_user, counts)
    row_start = np.repeat(starts, counts)
    pos_in_user = np.arange(len(user)) - row_start

    # Training samples: every event of a training user that has at least one event before it.
    t = np.nonzero((row_role == 0) & (pos_in_user >= 1))[0]
    train_hist = windows(item, row_start[t], t, seq_len)

    # Evaluation users: first half (by time) in, second half truth.
    ev = np.nonzero(role_of_user >= 1)[0]
    n_in = counts[ev] // 2
    eval_hist = windows(item, starts[ev], starts[ev] + n_in, seq_len)
    truth_len = counts[ev] - n_in
    return Split(
        train_hist=train_hist, train_target=item[t], train_user=user[t],
        eval_user=users[ev], eval_role=role_of_user[ev], eval_hist=eval_hist,
        truth_offsets=np.concatenate([[0], np.cumsum(truth_len)]).astype(np.int64),
        truth_items=item[csr_segments(starts[ev] + n_in, truth_len)],
        input_offsets=np.concatenate([[0], np.cumsum(n_in)]).astype(np.int64),
        input_items=item[csr_segments(starts[ev], n_in)],
    )
