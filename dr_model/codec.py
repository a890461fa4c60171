"""Path codec: a path (c_1..c_D), c_d in [0, K), <-> one int64 = sum_d c_d * K**(D-d)."""
from __future__ import annotations

import numpy as np
import torch


def _powers(K: int, D: int) -> np.ndarray:
    return K ** np.arange(D - 1, -1, -1, dtype=np.int64)


def encode(codes: np.ndarray | torch.Tensor, K: int) -> np.ndarray | torch.Tensor:
    """Codes [..., D] (ints in [0, K)) -> paths [...] int64."""
    D = codes.shape[-1]
    if isinstance(codes, torch.Tensor):
        p = torch.as_tensor(_powers(K, D), device=codes.device)
        return (codes.long() * p).sum(-1)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= K):
        raise ValueError(f"path codes must lie in [0, {K}); got range [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int64) @ _powers(K, D)


def decode(paths: np.ndarray | torch.Tensor, K: int, D: int) -> np.ndarray | torch.Tensor:
    """Paths [...] int64 -> codes [..., D] int64."""
    if isinstance(paths, torch.Tensor):
        p = torch.as_tensor(_powers(K, D), device=paths.device)
        return (paths.long().unsqueeze(-1) // p) % K
    paths = np.asarray(paths, dtype=np.int64)
    if paths.size and (paths.min() < 0 or paths.max() >= K ** D):
        raise ValueError(f"paths must lie in [0, K**D={K ** D}); got range [{paths.min()}, {paths.max()}]")
    return (paths[..., None] // _powers(K, D)) % K
