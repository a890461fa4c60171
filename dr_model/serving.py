"""What candidate generation reads: the user towers, item vectors in fp16 and the path index, memory-mapped.

A serving bundle is one folder written once per (train run, path_index version):

    meta.json         sizes, the model config, the versions it was built from
    towers.pt         structure encoder + structure model + reranker encoder (no item-side table)
    model_ids.npy     int64 [V] raw ids of the model's items (sorted): histories -> encoder rows
    cold_ids.npy      int64 [C] raw ids of cold items (sorted), catalog indices V..V+C-1
    path_keys.npy     int64 [P'] non-empty paths, sorted
    path_offsets.npy  int64 [P' + 1]
    path_items.npy    int32 [M] catalog indices of each path's items (M = J (V + C))
    path_vec.npy      float16 [M, d] the reranker's item embeddings in path_items order (cold: derived,
                      jobs/cold_items.py), so a path's items are one contiguous block (dr_model.path_scoring)
    path_bias.npy     float32 [M] the reranker's biases, same order

Every array is opened with mmap, so the pages are shared by all Python workers of a host and
only the blocks a batch touches are read. Per Python worker the private part is the towers:
2 item tables of min(V + 1, model.item_rows) x item_dim fp32 rows, their 4-byte-per-item row
maps above the budget, and the MLPs, plus a batch's working set (dr_model.path_scoring: about
BLOCK_ROWS x d x 12 bytes of blocks and batch x beam x (k + L) x 12 bytes of kept scores). The
shared (page-cache) part is M x (2 d + 8) + 8 (V + C) + 16 P' bytes: J copies of each vector,
traded for scoring a path's items with one GEMM instead of a row gather per candidate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .beam import beam_search
from .config import ModelConfig
from .encoders import make_encoder
from .index import PathIndex
from .path_scoring import score_by_path, sliced_blocks
from .structure import StructureModel
from .vocab import Vocab

FORMAT = 2
TOWER_PREFIXES = ("encoder.", "structure.", "rerank_encoder.")


class UserTowers(nn.Module):
    """The user side of DRModel under the same state names: seq [N, L] -> beam paths and reranker user vectors."""

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__()
        self.cfg = cfg
        rows, share = cfg.item_rows, cfg.item_exact_share
        self.encoder = make_encoder(cfg.encoder, num_items, cfg.item_dim, cfg.user_dim, False, rows, share)
        self.structure = StructureModel(cfg.user_dim, cfg.K, cfg.D, cfg.node_dim, cfg.hidden)
        self.rerank_encoder = make_encoder(cfg.encoder, num_items, cfg.item_dim, cfg.rerank_dim, False, rows, share)

    @torch.inference_mode()
    def beam(self, seq: torch.Tensor, beam: int) -> torch.Tensor:
        """seq [N, L] -> paths [N, B]."""
        return beam_search(self.structure, self.encoder(seq), beam)[0]

    @torch.inference_mode()
    def user_vectors(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [N, L] -> reranker user vectors [N, rerank_dim]."""
        return self.rerank_encoder(seq)


def tower_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DRModel state_dict -> the UserTowers part of it."""
    return {k: v for k, v in model_state.items() if k.startswith(TOWER_PREFIXES)}


def catalog_index(model_vocab: Vocab, cold_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """raw ids [...] -> catalog indices [...]: the model's items first, then the cold ids [C] (sorted); -1: neither."""
    idx = model_vocab.index(raw)
    if len(cold_ids) == 0:
        return idx
    cold = Vocab(cold_ids).index(raw)
    return np.where(idx >= 0, idx, np.where(cold >= 0, cold + model_vocab.size, -1))


@dataclass(frozen=True)
class ServingBundle:
    """An opened bundle: towers in memory, everything catalog-sized memory-mapped."""

    path: str
    meta: dict[str, Any]
    towers: UserTowers
    model_vocab: Vocab
    cold_ids: np.ndarray
    path_vec: torch.Tensor
    path_bias: torch.Tensor
    index: PathIndex

    @classmethod
    def open(cls, path: str | Path) -> "ServingBundle":
        p = Path(path)
        meta = json.loads((p / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"serving bundle {p}: format {meta.get('format')}, this code reads {FORMAT}")
        cfg = ModelConfig(**meta["model"])
        towers = UserTowers(cfg, meta["model_items"])
        towers.load_state_dict(torch.load(p / "towers.pt", weights_only=True))
        towers.eval()
        mm = lambda name: np.load(p / name, mmap_mode="r")  # noqa: E731
        n = meta["model_items"] + meta["cold_items"]
        index = PathIndex(mm("path_keys.npy"), mm("path_offsets.npy"), mm("path_items.npy"), n)
        # copy-on-write maps viewed as tensors (torch reads them without copying the files)
        vec, bias = (torch.from_numpy(np.load(p / f, mmap_mode="c")) for f in ("path_vec.npy", "path_bias.npy"))
        return cls(str(p), meta, towers, Vocab(mm("model_ids.npy")), mm("cold_ids.npy"), vec, bias, index)

    @property
    def num_items(self) -> int:
        """Catalog indices: the model's items, then the cold ones."""
        return self.model_vocab.size + len(self.cold_ids)

    def catalog_index(self, raw: np.ndarray) -> np.ndarray:
        """raw ids [...] -> catalog indices [...] (-1: not in the catalog)."""
        return catalog_index(self.model_vocab, self.cold_ids, raw)

    def raw(self, idx: np.ndarray) -> np.ndarray:
        """catalog indices [...] (-1 = nothing) -> raw ids [...] (-1 kept)."""
        V = self.model_vocab.size
        out = self.model_vocab.raw(np.where(idx < V, idx, -1))
        if len(self.cold_ids):
            cold = idx >= V
            out[cold] = self.cold_ids[idx[cold] - V]
        return out

    def seq(self, hist: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Histories of raw ids [N, L] (-1 pad) -> (the towers' input [N, L], catalog indices [N, L])."""
        h = self.catalog_index(hist)
        V = self.model_vocab.size
        return torch.from_numpy(np.where((h < 0) | (h >= V), V, h)), h      # cold and unknown items: the pad

    def retrieve(self, hist: np.ndarray, beam: int, k: int, exclude_history: bool = True,
                 exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histories of raw ids [N, L] (-1 pad) -> (raw ids [N, k] (-1 pad), scores [N, k], vectors scored [N]).

        exclude = (row [X], catalog index [X]) pairs never returned, instead of the histories' items.
        """
        seq, h = self.seq(hist)
        paths = self.towers.beam(seq, beam).numpy()
        if exclude is None and exclude_history:
            r, c = np.nonzero(h >= 0)
            exclude = (r.astype(np.int64), h[r, c])
        w = self.towers.user_vectors(seq)
        items, scores, scored = score_by_path(w, paths, self.index, sliced_blocks(self.path_vec, self.path_bias), k,
                                              self.towers.cfg.J, exclude)
        return self.raw(items), scores, scored


__all__ = ["UserTowers", "ServingBundle", "catalog_index", "tower_state", "FORMAT", "TOWER_PREFIXES"]
