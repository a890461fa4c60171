"""Adam for the dense layers and lazy Adam for item tables with sparse gradients.

A step of a catalog-sized item table touches a batch's rows only; dense Adam would still read
and write all V rows of the table and of both moments per step (the E-step's cost at 10^5 items
and up, BENCHMARKS.md "Sparse item tables"). Lazy Adam updates the touched rows' moments and
weights alone; a row nobody touched keeps its moments (TensorFlow's LazyAdam, the usual choice
for recommendation embeddings). Weight decay applies to the dense layers only.

The row update is one compiled loop (numba): it reads and writes each touched row's weight and
moments once, where torch ops made ~8 passes over the batch's rows plus a gather and two scatters
into the table, and it requests the next rows' cache lines ahead of the update. A catalog-sized
table's rows are cache misses: passes and stalls are what a step pays for.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from .kernels import adam_rows, compiled


def sparse_tables(module: nn.Module) -> list[nn.Parameter]:
    """The weights of the module's sparse-gradient embedding tables (nn.Embedding(sparse=True))."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding) and m.sparse]


class LazyAdam(torch.optim.Optimizer):
    """torch.optim.SparseAdam's update (same formula, equal to float rounding) for coalescable sparse
    gradients [V, dim], with both moments of a row side by side ([V, 2, dim]), applied by one
    compiled pass over the touched rows."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self) -> None:
        update = compiled(adam_rows)
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError(f"LazyAdam: the {tuple(p.shape)} table got a dense gradient")
                if not p.is_contiguous():
                    raise ValueError(f"LazyAdam: the {tuple(p.shape)} table is not contiguous")
                g = p.grad.coalesce()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["moments"] = torch.zeros(p.shape[0], 2, *p.shape[1:], dtype=p.dtype)
                st["step"] += 1
                t = st["step"]
                step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                n = p.shape[0]
                update(p.detach().view(n, -1).numpy(), st["moments"].view(n, 2, -1).numpy(),
                       g.indices()[0].numpy(), g.values().contiguous().view(len(g.values()), -1).numpy(),
                       b1, b2, eps, step_size)


class HybridAdam:
    """Adam over the dense parameters + LazyAdam over the sparse tables; the torch.optim surface
    the trainers use (zero_grad, step, state_dict, load_state_dict)."""

    def __init__(self, params: Iterable[nn.Parameter], sparse: Iterable[nn.Parameter], lr: float,
                 weight_decay: float = 0.0) -> None:
        sparse_ids = {id(p) for p in sparse}
        params = list(params)
        dense = [p for p in params if id(p) not in sparse_ids]
        tables = [p for p in params if id(p) in sparse_ids]
        self.dense = torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay) if dense else None
        self.sparse = LazyAdam(tables, lr=lr) if tables else None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.dense, self.sparse) if o is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"dense": None if self.dense is None else self.dense.state_dict(),
                "sparse": None if self.sparse is None else self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, o in (("dense", self.dense), ("sparse", self.sparse)):
            if (o is None) != (state.get(name) is None):
                raise ValueError(f"optimizer state: its '{name}' part does not match this model's parameters "
                                 "(sparse item tables on one side only?)")
            if o is not None:
                o.load_state_dict(state[name])


__all__ = ["HybridAdam", "LazyAdam", "sparse_tables"]
