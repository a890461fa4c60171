"""The whole Deep Retrieval model: structure encoder + structure model, reranker encoder + reranker."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .beam import beam_search
from .codec import decode
from .config import ModelConfig
from .encoders import make_encoder
from .index import PathIndex
from .item_table import keep_frequent_exact
from .path_scoring import gathered_blocks, score_by_path
from .reranker import Reranker
from .scores import EMPTY
from .structure import StructureModel


USER_BLOCK = 4096        # users retrieved at once by DRModel.retrieve


class DRModel(nn.Module):
    """Two towers over the same behaviour sequence: one feeds the structure model, one the reranker.

    They are separate so the reranker can be frozen (paper schedule) while the structure
    side keeps training. sparse=True: the item tables get sparse gradients (the sampled-softmax
    regime, dr_model.optim); the parameters and their names are the same. Item tables follow
    cfg.item_rows (dr_model.item_table); counts [V] (training pairs per item) give the exact
    rows of a budgeted table to the most frequent items (a loaded state carries that choice).
    cfg.tie_item_tables: the reranker scores items with its encoder's input table (both are
    reranker parameters, frozen together); the structure encoder keeps its own, which the
    structure phases train while the reranker stays frozen.
    """

    def __init__(self, cfg: ModelConfig, num_items: int, sparse: bool = False,
                 counts: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        rows, share = cfg.item_rows, cfg.item_exact_share
        self.encoder = make_encoder(cfg.encoder, num_items, cfg.item_dim, cfg.user_dim, sparse, rows, share)
        self.structure = StructureModel(cfg.user_dim, cfg.K, cfg.D, cfg.node_dim, cfg.hidden)
        self.rerank_encoder = make_encoder(cfg.encoder, num_items, cfg.item_dim, cfg.rerank_dim, sparse, rows, share)
        self.reranker = Reranker(num_items, cfg.rerank_dim, sparse, rows, share,
                                 table=self.rerank_encoder.emb if cfg.tie_item_tables else None)
        if counts is not None:
            keep_frequent_exact(self, counts)

    def seed_structure_encoder(self) -> bool:
        """Start the structure tower's encoder from the trained reranker's (same shapes only) -> copied?

        The initial paths are clusters of the reranker's item embeddings, so the reranker's user
        vector already points at a user's paths: the structure model starts from it instead of
        learning user representations again from scratch (measured in BENCHMARKS.md).
        """
        src, dst = self.rerank_encoder.state_dict(), self.encoder.state_dict()
        if any(k not in src or src[k].shape != v.shape for k, v in dst.items()):
            return False
        self.encoder.load_state_dict(src)
        return True

    def reranker_parameters(self) -> list[nn.Parameter]:
        return list(self.rerank_encoder.parameters()) + list(self.reranker.parameters())

    def structure_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.structure.parameters())

    def structure_loss(self, seq: torch.Tensor, item_paths: torch.Tensor) -> torch.Tensor:
        """seq [N, L], item_paths [N, J] int64 (the target's paths) -> -mean log sum_j p(pi_j|x)."""
        codes = decode(item_paths, self.cfg.K, self.cfg.D)
        return self.structure.multi_path_loss(self.encoder(seq), codes)

    def rerank_loss(self, seq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None,
                    log_q: torch.Tensor | None) -> torch.Tensor:
        """seq [N, L], pos [N] or [N, W] (-1 = none), shared negatives neg [M] with log_q [V] -> sampled-softmax loss;
        neg None -> the exact softmax over all items."""
        w = self.rerank_encoder(seq)
        if neg is None:
            return self.reranker.full_softmax_loss(w, pos)
        return self.reranker.sampled_softmax_loss(w, pos, neg, log_q)

    @torch.inference_mode()
    def beam(self, seq: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
        """seq [N, L] -> (paths [N, B], log p [N, B])."""
        return beam_search(self.structure, self.encoder(seq), beam)

    @torch.inference_mode()
    def beam_and_own(self, seq: torch.Tensor, beam: int, own: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair's beam outputs plus its target's own paths: seq [N, L], own [N, J] (-1: none)
        -> (paths [N, B' + J], log p [N, B' + J]); an own path already in the beam is EMPTY (-inf).

        s[v,c] from the beam alone only holds paths the beam emits for v's pairs, so an item whose
        own paths the beam misses would look unscored on them and be pulled onto popular paths;
        its own paths' exact probabilities keep its current placement comparable.
        """
        u = self.encoder(seq)
        paths, lp = beam_search(self.structure, u, beam)
        if own is None:
            return paths, lp
        bad = own < 0
        own_lp = self.structure.path_log_prob(u, decode(own.clamp_min(0), self.cfg.K, self.cfg.D))
        drop = bad | (own.unsqueeze(-1) == paths.unsqueeze(1)).any(-1)
        return (torch.cat([paths, own.masked_fill(drop, EMPTY)], 1),
                torch.cat([lp, own_lp.masked_fill(drop, float("-inf"))], 1))

    @torch.inference_mode()
    def retrieve(self, seq: torch.Tensor, index: PathIndex, beam: int, k: int,
                 exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """seq [N, L] -> (items [N, k] (-1 pad), scores [N, k], vectors scored per user [N]).

        exclude = (row [X], item index [X]) pairs never returned (e.g. the users' input items).
        Users go in blocks of USER_BLOCK, so memory follows the block, not N.
        """
        blocks = gathered_blocks(index, self.reranker.vectors)
        out = []
        for lo in range(0, max(seq.shape[0], 1), USER_BLOCK):
            hi = min(lo + USER_BLOCK, seq.shape[0])
            ex = None
            if exclude is not None:
                m = (exclude[0] >= lo) & (exclude[0] < hi)
                ex = (exclude[0][m] - lo, exclude[1][m])
            paths = self.beam(seq[lo:hi], beam)[0].numpy()
            out.append(score_by_path(self.rerank_encoder(seq[lo:hi]), paths, index, blocks, k, self.cfg.J, ex))
        if len(out) == 1:
            return out[0]
        return tuple(np.concatenate(x) for x in zip(*out))  # type: ignore[return-value]

    @torch.inference_mode()
    def brute_force(self, seq: torch.Tensor, k: int,
                    exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """seq [N, L] -> exact reranker top-k over all items (items [N, k], scores [N, k]), `exclude` pairs left out."""
        s, i = self.reranker.brute_force_topk(self.rerank_encoder(seq), k, exclude=exclude)
        return i.numpy(), s.double().numpy()
