"""The whole Deep Retrieval model: structure encoder + structure model, reranker encoder + reranker."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .beam import beam_search
from .codec import decode
from .config import ModelConfig
from .encoders import make_encoder
from .index import PathIndex, rerank
from .reranker import Reranker
from .structure import StructureModel


class DRModel(nn.Module):
    """Two towers over the same behaviour sequence: one feeds the structure model, one the reranker.

    They are separate so the reranker can be frozen (paper schedule) while the structure
    side keeps training.
    """

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        self.encoder = make_encoder(cfg.encoder, num_items, cfg.item_dim, cfg.user_dim)
        self.structure = StructureModel(cfg.user_dim, cfg.K, cfg.D, cfg.node_dim, cfg.hidden)
        self.rerank_encoder = make_encoder(cfg.encoder, num_items, cfg.item_dim, cfg.rerank_dim)
        self.reranker = Reranker(num_items, cfg.rerank_dim)

    def reranker_parameters(self) -> list[nn.Parameter]:
        return list(self.rerank_encoder.parameters()) + list(self.reranker.parameters())

    def structure_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.structure.parameters())

    def structure_loss(self, seq: torch.Tensor, item_paths: torch.Tensor) -> torch.Tensor:
        """seq [N, L], item_paths [N, J] int64 (the target's paths) -> -mean log sum_j p(pi_j|x)."""
        codes = decode(item_paths, self.cfg.K, self.cfg.D)
        return self.structure.multi_path_loss(self.encoder(seq), codes)

    def rerank_loss(self, seq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """seq [N, L], pos [N], shared negatives neg [M], log_q [V] -> sampled-softmax loss."""
        return self.reranker.sampled_softmax_loss(self.rerank_encoder(seq), pos, neg, log_q)

    @torch.inference_mode()
    def beam(self, seq: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
        """seq [N, L] -> (paths [N, B], log p [N, B])."""
        return beam_search(self.structure, self.encoder(seq), beam)

    @torch.inference_mode()
    def retrieve(self, seq: torch.Tensor, index: PathIndex, beam: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """seq [N, L] -> (items [N, k] (-1 pad), scores [N, k], candidates scored per user [N])."""
        paths, _ = self.beam(seq, beam)
        row, item = index.lookup(paths.numpy())
        items, scores = rerank(self.rerank_encoder(seq), self.reranker.item_emb.weight, self.reranker.item_bias, row, item, k)
        return items, scores, np.bincount(row, minlength=seq.shape[0])

    @torch.inference_mode()
    def brute_force(self, seq: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """seq [N, L] -> exact reranker top-k over all items (items [N, k], scores [N, k])."""
        s, i = self.reranker.brute_force_topk(self.rerank_encoder(seq), k)
        return i.numpy(), s.double().numpy()
