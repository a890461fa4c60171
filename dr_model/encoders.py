"""User encoders over padded behaviour sequences: mean-pool and GRU.

Sequences are item indices [N, L], left-padded with `pad = num_items` (most recent
item last); the pad row of the embedding table is zero and excluded from pooling.
sparse=True: the item table's gradient holds the batch's rows only (dr_model.optim). The table
follows a row budget (dr_model.item_table): exact rows up to `rows` ids, composed above.
"""
from __future__ import annotations

import torch
from torch import nn

from .item_table import ROWS, item_table, set_table_grads


class MeanPoolEncoder(nn.Module):
    """Masked mean of item embeddings, then a two-layer MLP (a single tanh layer under-fits:
    measured in BENCHMARKS.md, "Model quality").

    The table's gradient is a function of (seq, dL/dpooled) alone: with `capture` set, a training
    forward keeps both and backward stops at the pooled vectors, so data-parallel workers can
    exchange N (L + item_dim) numbers per step instead of the touched rows (ray_trainers.grad_sync)
    and each rebuild the same table gradient (table_grads).
    """

    def __init__(self, num_items: int, item_dim: int, user_dim: int, sparse: bool = False, rows: int = ROWS,
                 exact_share: float = 0.5) -> None:
        super().__init__()
        self.pad = num_items
        self.emb = item_table(num_items + 1, item_dim, rows, exact_share, sparse, padding_idx=num_items)
        self.mlp = nn.Sequential(nn.Linear(item_dim, 2 * user_dim), nn.ReLU(), nn.Linear(2 * user_dim, user_dim))
        self.capture = False
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def pool(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [N, L] int64 -> the masked mean of its item rows [N, item_dim]."""
        mask = (seq != self.pad).unsqueeze(-1).float()
        return (self.emb(seq) * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [N, L] int64 -> [N, user_dim]."""
        if self.capture and torch.is_grad_enabled() and any(p.requires_grad for p in self.emb.parameters()):
            # The table's gradient will be rebuilt from (seq, dL/dpooled) over every rank's samples:
            # backward stops at pooled instead of also building this rank's own table gradient.
            with torch.no_grad():
                pooled = self.pool(seq)
            self._kept = (seq, pooled.requires_grad_())
            return self.mlp(pooled)
        return self.mlp(self.pool(seq))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After backward: (seq [N, L], dL/dpooled [N, item_dim]) of the last captured forward, then forgotten;
        None if none reached backward."""
        kept, self._kept = self._kept, None
        if kept is None or kept[1].grad is None:
            return None
        return kept[0], kept[1].grad

    def table_grads(self, seq: torch.Tensor, grad: torch.Tensor) -> None:
        """Set the table's gradients to what pooled gradients grad [N, item_dim] of seq [N, L] put on it:
        pool's backward, term for term (grad / count, then the mask), without reading the rows."""
        mask = (seq != self.pad).unsqueeze(-1).float()
        per_item = (grad / mask.sum(1).clamp_min(1.0)).unsqueeze(1) * mask          # [N, L, item_dim]
        set_table_grads(self.emb, seq, per_item)


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


def pooled_encoders(module: nn.Module) -> list[MeanPoolEncoder]:
    """The module's mean-pool encoders whose item table is sparse and read by nothing else (a tied reranker
    scores with its encoder's table: its gradient is then more than (seq, dL/dpooled))."""
    parents: dict[int, int] = {}
    for m in module.modules():
        for child in m.children():
            parents[id(child)] = parents.get(id(child), 0) + 1
    return [m for m in module.modules() if isinstance(m, MeanPoolEncoder) and parents.get(id(m.emb), 0) == 1
            and all(e.sparse for e in m.emb.modules() if isinstance(e, nn.Embedding))]


def make_encoder(kind: str, num_items: int, item_dim: int, user_dim: int, sparse: bool = False, rows: int = ROWS,
                 exact_share: float = 0.5) -> nn.Module:
    """Encoder by name ('mean' | 'gru')."""
    if kind == "mean":
        return MeanPoolEncoder(num_items, item_dim, user_dim, sparse, rows, exact_share)
    if kind == "gru":
        return GRUEncoder(num_items, item_dim, user_dim, sparse, rows, exact_share)
    raise ValueError(f"unknown encoder {kind!r}; expected 'mean' or 'gru'")
