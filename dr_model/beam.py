"""Batched beam search over the structure model (paper's Algorithm 1)."""
from __future__ import annotations

import torch

from .codec import encode
from .structure import StructureModel


@torch.inference_mode()
def beam_search(model: StructureModel, u: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """u [N, user_dim] -> (paths [N, B'] int64, log p [N, B'] descending), B' = min(beam, K**D).

    Layer 1 keeps the top B of K nodes; layer d extends every kept prefix by all K nodes
    and keeps the top B of the B*K extensions by prefix log-prob + log p(c_d | x, prefix).
    """
    N, K = u.shape[0], model.K
    prefix = torch.zeros(N, 1, 0, dtype=torch.long, device=u.device)
    score = torch.zeros(N, 1, dtype=u.dtype, device=u.device)
    for d in range(model.D):
        lp = model.layer_log_probs(model.user_part(u, d), prefix, d)      # [N, P, K]
        P = prefix.shape[1]
        cand = (score.unsqueeze(-1) + lp).reshape(N, P * K)
        keep = min(beam, P * K)
        score, idx = torch.topk(cand, keep, dim=1, sorted=True)
        parent = torch.div(idx, K, rounding_mode="floor")
        node = idx - parent * K
        prefix = torch.cat([torch.gather(prefix, 1, parent.unsqueeze(-1).expand(-1, -1, d)), node.unsqueeze(-1)], dim=2)
    return encode(prefix, K), score
