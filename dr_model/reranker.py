"""Softmax reranker: item embeddings + bias over a user vector, trained by sampled softmax."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig
from .item_table import ROWS, init_rows, item_table, table_rows


class Reranker(nn.Module):
    """score(x, v) = <w(x), e_v> + b_v for all V items.

    The bias is a one-column table so that, with sparse=True (sampled softmax only: the exact
    softmax touches every row), both tables get gradients on the rows a step used alone. Both
    follow the row budget `rows` (dr_model.item_table). `table`: an item table to share (the
    reranker encoder's input table, [V + 1, dim] with its pad row last) instead of its own.
    """

    def __init__(self, num_items: int, dim: int, sparse: bool = False, rows: int = ROWS,
                 exact_share: float = 0.5, table: nn.Module | None = None) -> None:
        super().__init__()
        self._num_items = num_items
        self.item_emb = item_table(num_items, dim, rows, exact_share, sparse) if table is None else table
        self.bias = item_table(num_items, 1, rows, exact_share, sparse)
        init_rows(self.item_emb, 1.0 / math.sqrt(dim))
        init_rows(self.bias, 0.0)
        pad = getattr(self.item_emb, "padding_idx", None)
        if pad is not None:
            with torch.no_grad():
                self.item_emb.weight[pad].zero_()

    @property
    def num_items(self) -> int:
        return self._num_items

    @property
    def item_bias(self) -> torch.Tensor:
        """[V] the items' biases (a view of an exact table)."""
        return table_rows(self.bias)[:, 0]

    def item_vectors(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Items lo..hi's embeddings [hi - lo, dim] (a view of an exact table)."""
        return table_rows(self.item_emb, lo, self.num_items if hi is None else hi)

    def chunks(self, chunk: int = 1 << 16) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first item, embeddings [n, dim], biases [n]) over all items, no grad, `chunk` at a time (a
        composed table is never materialised whole)."""
        for lo in range(0, self.num_items, chunk):
            hi = min(lo + chunk, self.num_items)
            with torch.no_grad():       # per chunk: a decorator would not cover the caller's use of the yield
                emb, bias = self.item_vectors(lo, hi).detach(), table_rows(self.bias, lo, hi)[:, 0].detach()
            yield lo, emb, bias

    def vectors(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """items [n] int64 -> (embeddings [n, dim], biases [n])."""
        return self.item_emb(items), self._bias(items)

    def _bias(self, items: torch.Tensor) -> torch.Tensor:
        """items [...] int64 -> b [...] (through the table, so a sparse table's gradient stays sparse)."""
        return self.bias(items).squeeze(-1)

    def score(self, w: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """w [N, dim], items [N, M] int64 -> scores [N, M]."""
        return torch.einsum("nd,nmd->nm", w, self.item_emb(items)) + self._bias(items)

    def sampled_softmax_loss(self, w: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Sampled softmax with log-Q correction and accidental hits removed.

        w [N, dim], pos [N] or [N, W] int64 (-1 = no target; each of a row's targets is scored
        against the same negatives), neg [M] int64 shared negatives drawn from Q,
        log_q [V] = log of each item's expected count among the M draws. -> scalar.
        """
        pos, mask = _targets(pos)
        p = pos.clamp_min(0)
        pos_logit = torch.einsum("nd,nwd->nw", w, self.item_emb(p)) + self._bias(p) - log_q[p]
        neg_logit = w @ self.item_emb(neg).T + self._bias(neg) - log_q[neg]
        # A negative that is one of the row's own targets is no negative.
        hit = (neg.view(1, -1, 1) == pos.unsqueeze(1)).any(-1)   # pad -1 never equals an item
        neg_lse = torch.logsumexp(neg_logit.masked_fill(hit, float("-inf")), dim=1, keepdim=True)
        nll = torch.logaddexp(pos_logit, neg_lse) - pos_logit
        return (nll * mask).sum() / mask.sum().clamp_min(1)

    def full_softmax_loss(self, w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Exact softmax over all V items (small catalogs): w [N, dim], pos [N] or [N, W] (-1 = none) -> scalar."""
        if any(m.sparse for m in self.modules() if isinstance(m, nn.Embedding)):
            raise ValueError("full_softmax_loss reads every item row: build the Reranker with sparse=False")
        pos, mask = _targets(pos)
        logp = F.log_softmax(torch.addmm(self.item_bias, w, self.item_vectors().T), dim=1)
        return -(logp.gather(1, pos.clamp_min(0)) * mask).sum() / mask.sum().clamp_min(1)

    @torch.inference_mode()
    def brute_force_topk(self, w: torch.Tensor, k: int, chunk: int = 65536,
                         exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k over ALL items: w [N, dim] -> (scores [N, k], items [N, k]) descending.

        exclude = (row [X], item [X]) pairs scored -inf (never returned unless fewer than k remain).
        """
        V = self.num_items
        k = min(k, V)
        best_s = torch.full((w.shape[0], 0), float("-inf"), dtype=w.dtype)
        best_i = torch.zeros((w.shape[0], 0), dtype=torch.long)
        for lo in range(0, V, chunk):
            hi = min(lo + chunk, V)
            s = torch.addmm(table_rows(self.bias, lo, hi)[:, 0], w, self.item_vectors(lo, hi).T)
            if exclude is not None:
                sel = (exclude[1] >= lo) & (exclude[1] < hi)
                s[torch.from_numpy(exclude[0][sel]), torch.from_numpy(exclude[1][sel] - lo)] = float("-inf")
            cs, ci = torch.topk(s, min(k, hi - lo), dim=1)
            best_s = torch.cat([best_s, cs], 1)
            best_i = torch.cat([best_i, ci + lo], 1)
            if best_s.shape[1] > k:
                best_s, sel = torch.topk(best_s, k, dim=1)
                best_i = torch.gather(best_i, 1, sel)
        return best_s, best_i


def reranker_from_state(state: dict[str, torch.Tensor], m: ModelConfig, num_items: int, assign: bool = False) -> Reranker:
    """The reranker of a DRModel state_dict (its `reranker.*` entries) over num_items items.

    assign=True keeps the state's tensors (e.g. memory-mapped by torch.load(mmap=True)) instead of
    copying them into fresh ones: inference only.
    """
    # tied: the reranker reads its encoder's input table ([V + 1] rows, the pad last)
    table = (item_table(num_items + 1, m.item_dim, m.item_rows, m.item_exact_share, padding_idx=num_items)
             if m.tie_item_tables else None)
    rr = Reranker(num_items, m.rerank_dim, False, m.item_rows, m.item_exact_share, table=table)
    rr.load_state_dict({k[len("reranker."):]: v for k, v in state.items() if k.startswith("reranker.")},
                       assign=assign)
    return rr


def _targets(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [N] or [N, W] (-1 = none) -> (pos [N, W], valid mask [N, W] float)."""
    pos = pos.view(pos.shape[0], -1)
    return pos, (pos >= 0).to(torch.float32)
