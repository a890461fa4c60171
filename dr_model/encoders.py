"""User encoders over padded behaviour sequences: mean-pool and GRU.

Sequences are item indices [N, L], left-padded with `pad = num_items` (most recent
item last); the pad row of the embedding table is zero and excluded from pooling.
sparse=True: the item table's gradient holds the batch's rows only (dr_model.optim). The table
follows a row budget (dr_model.item_table): exact rows up to `rows` ids, composed above.
"""
from __future__ import annotations

import torch
from torch import nn

from .item_table import ROWS, item_table


class MeanPoolEncoder(nn.Module):
    """Masked mean of item embeddings, then a two-layer MLP (a single tanh layer under-fits:
    measured in BENCHMARKS.md, "Model quality")."""

    def __init__(self, num_items: int, item_dim: int, user_dim: int, sparse: bool = False, rows: int = ROWS,
                 exact_share: float = 0.5) -> None:
        super().__init__()
        self.pad = num_items
        self.emb = item_table(num_items + 1, item_dim, rows, exact_share, sparse, padding_idx=num_items)
        self.mlp = nn.Sequential(nn.Linear(item_dim, 2 * user_dim), nn.ReLU(), nn.Linear(2 * user_dim, user_dim))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [N, L] int64 -> [N, user_dim]."""
        mask = (seq != self.pad).unsqueeze(-1).float()
        pooled = (self.emb(seq) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.mlp(pooled)


class GRUEncoder(nn.Module):
    """GRU over the non-pad items; the last hidden state is the user embedding."""

    def __init__(self, num_items: int, item_dim: int, user_dim: int, sparse: bool = False, rows: int = ROWS,
                 exact_share: float = 0.5) -> None:
        super().__init__()
        self.pad = num_items
        self.emb = item_table(num_items + 1, item_dim, rows, exact_share, sparse, padding_idx=num_items)
        self.gru = nn.GRU(item_dim, user_dim, batch_first=True)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [N, L] int64 -> [N, user_dim]."""
        N, L = seq.shape
        lengths = (seq != self.pad).sum(1)
        # Left padding -> right padding, so packing skips the pads entirely.
        shift = (torch.arange(L, device=seq.device).unsqueeze(0) + (L - lengths).unsqueeze(1)) % L
        right = torch.gather(seq, 1, shift)
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(right), lengths.clamp_min(1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        out = h[-1]
        # A user with no known history gets the zero state, not the pad's transition.
        return out * (lengths > 0).unsqueeze(1).float()


def make_encoder(kind: str, num_items: int, item_dim: int, user_dim: int, sparse: bool = False, rows: int = ROWS,
                 exact_share: float = 0.5) -> nn.Module:
    """Encoder by name ('mean' | 'gru')."""
    if kind == "mean":
        return MeanPoolEncoder(num_items, item_dim, user_dim, sparse, rows, exact_share)
    if kind == "gru":
        return GRUEncoder(num_items, item_dim, user_dim, sparse, rows, exact_share)
    raise ValueError(f"unknown encoder {kind!r}; expected 'mean' or 'gru'")
