"""The layer-wise structure model: p(c|x) = prod_d p(c_d | x, c_<d).

Layer d sees concat(u, e_1(c_1), ..., e_{d-1}(c_{d-1})) -> Linear -> ReLU -> Linear -> softmax
over K. The first Linear is split by input block, so the prefix part is a gather from a
small [K, hidden] table per earlier layer: beam search and training share that code and
never materialise the concatenation.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class StructureModel(nn.Module):
    """D layers of K nodes; per-layer path-node embeddings and one MLP per layer."""

    def __init__(self, user_dim: int, K: int, D: int, node_dim: int, hidden: int) -> None:
        super().__init__()
        self.K, self.D, self.user_dim, self.node_dim = K, D, user_dim, node_dim
        self.node_emb = nn.ModuleList([nn.Embedding(K, node_dim) for _ in range(D - 1)])
        self.inp = nn.ModuleList([nn.Linear(user_dim + d * node_dim, hidden) for d in range(D)])
        self.out = nn.ModuleList([nn.Linear(hidden, K) for _ in range(D)])

    def user_part(self, u: torch.Tensor, d: int) -> torch.Tensor:
        """u [N, user_dim] -> layer d's pre-activation from the user block [N, hidden]."""
        W = self.inp[d].weight
        return F.linear(u, W[:, : self.user_dim], self.inp[d].bias)

    def prefix_tables(self, d: int) -> list[torch.Tensor]:
        """Per earlier layer d' < d: node embedding projected by layer d's weights, [K, hidden]."""
        W = self.inp[d].weight
        o = self.user_dim
        return [self.node_emb[p].weight @ W[:, o + p * self.node_dim: o + (p + 1) * self.node_dim].T for p in range(d)]

    def layer_log_probs(self, up: torch.Tensor, prefix: torch.Tensor, d: int, tables: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Layer d: up [N, hidden] (user_part), prefix [N, P, d] codes -> log p(c_d | x, prefix) [N, P, K]."""
        h = up.unsqueeze(1)
        if d > 0:
            tables = self.prefix_tables(d) if tables is None else tables
            for p in range(d):
                h = h + tables[p][prefix[..., p]]
        return F.log_softmax(self.out[d](F.relu(h)), dim=-1)

    def path_log_prob(self, u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """u [N, user_dim], codes [N, P, D] -> log p(path | x) [N, P]."""
        total = torch.zeros(codes.shape[:2], dtype=u.dtype, device=u.device)
        for d in range(self.D):
            lp = self.layer_log_probs(self.user_part(u, d), codes[..., :d], d)
            lp = lp.expand(-1, codes.shape[1], -1)   # layer 1 has no prefix: one row per user
            total = total + lp.gather(-1, codes[..., d: d + 1]).squeeze(-1)
        return total

    def multi_path_loss(self, u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of -log sum_j p(pi_j(v) | x); u [N, user_dim], codes [N, J, D] -> scalar."""
        return -torch.logsumexp(self.path_log_prob(u, codes), dim=1).mean()
