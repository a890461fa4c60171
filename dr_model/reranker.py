"""Softmax reranker: item embeddings + bias over a user vector, trained by sampled softmax."""
from __future__ import annotations

import math

import numpy as np

import torch
from torch import nn
from torch.nn import functional as F


class Reranker(nn.Module):
    """score(x, v) = <w(x), e_v> + b_v for all V items."""

    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(num_items, dim)
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        nn.init.normal_(self.item_emb.weight, std=1.0 / math.sqrt(dim))

    @property
    def num_items(self) -> int:
        return self.item_emb.num_embeddings

    def score(self, w: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """w [N, dim], items [N, M] int64 -> scores [N, M]."""
        return torch.einsum("nd,nmd->nm", w, self.item_emb(items)) + self.item_bias[items]

    def sampled_softmax_loss(self, w: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Sampled softmax with log-Q correction and accidental hits removed.

        w [N, dim], pos [N] int64, neg [M] int64 shared negatives drawn from Q,
        log_q [V] = log of each item's expected count among the M draws. -> scalar.
        """
        pos_logit = (w * self.item_emb(pos)).sum(-1) + self.item_bias[pos] - log_q[pos]
        neg_logit = w @ self.item_emb(neg).T + self.item_bias[neg] - log_q[neg]
        neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
        logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(pos))

    def full_softmax_loss(self, w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Exact softmax over all V items: w [N, dim], pos [N] int64 -> scalar (small catalogs)."""
        return F.cross_entropy(torch.addmm(self.item_bias, w, self.item_emb.weight.T), pos)

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
        E, b = self.item_emb.weight, self.item_bias
        for lo in range(0, V, chunk):
            hi = min(lo + chunk, V)
            s = torch.addmm(b[lo:hi], w, E[lo:hi].T)
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


def sampling_log_q(counts: torch.Tensor, num_samples: int, power: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Unigram^power proposal over items: counts [V] -> (probs [V], log expected count per draw set [V])."""
    q = counts.double().clamp_min(1.0) ** power
    q = q / q.sum()
    return q.float(), torch.log(q * num_samples).float()
