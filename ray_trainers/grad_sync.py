"""Gradient averaging between data-parallel E-step workers, once per step (between backward and the optimizer step).

Why not torch's DistributedDataParallel wrapper: DDP only synchronises through the wrapped
module's forward(), while DRModel's losses are separate methods (structure_loss, rerank_loss)
and the frozen-reranker phase changes which parameters get gradients. Averaging the trainable
parameters' gradients explicitly (one flattened exchange per step, rebuilt per phase) is what
DDP would do, without either problem.
"""
from __future__ import annotations

import torch

from .shm_exchange import ShmExchange, open_exchange


class GradSync:
    """Averages trainable gradients over the workers that had a batch, once per step, between
    backward and the optimizer step.

    All gradients travel as one flat float32 vector [sum of numel + 1] whose last slot flags
    "had a batch". Transport: shared memory (ShmExchange) when every rank is on this host, else
    one gloo all_reduce. Both give every rank the same sum; on one host the gloo collective's
    syscalls and thread hand-offs cost more than the whole forward/backward of a 128-sample
    batch here (see jobs/benchmarks/estep.py). Built per phase (collective); close() when done.
    """

    def __init__(self, params: list[torch.nn.Parameter], shared_memory: bool = True) -> None:
        self.params = params
        # The averaged gradients [sum of numel + 1]; the parameters' .grad become views of it.
        self.flat = torch.zeros(sum(p.numel() for p in params) + 1)
        self.views = list(zip(params, _split(self.flat, params)))
        self.shm: ShmExchange | None = open_exchange(len(self.flat)) if shared_memory else None
        self.transport = "shm" if self.shm is not None else "gloo"

    def __call__(self, has_batch: bool = True) -> int:
        import torch.distributed as dist

        if self.shm is not None:
            mine = self.shm.slot()              # [n] this rank's slot of this step
            self._pack(mine, has_batch)
            # [world, n] every rank's gradients; summed over dim 0 in rank order on every rank.
            torch.sum(self.shm.publish(), dim=0, out=self.flat)
        else:
            self._pack(self.flat, has_batch)
            dist.all_reduce(self.flat)
        n = int(round(float(self.flat[-1])))
        if n:
            self.flat[:-1] /= n
        for p, v in self.views:
            # A view of the buffer: train_step's zero_grad(set_to_none) drops it before the next backward.
            p.grad = v
        return n

    def _pack(self, out: torch.Tensor, has_batch: bool) -> None:
        """This rank's gradients (zeros where a parameter has none) and flag -> out [sum of numel + 1]."""
        for p, v in zip(self.params, _split(out, self.params)):
            if p.grad is None:
                v.zero_()
            else:
                v.copy_(p.grad)
        out[-1] = 1.0 if has_batch else 0.0

    def join(self, opt: torch.optim.Optimizer) -> bool:
        """This worker has no batch left: step with the others' average; False once nobody has one."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        n = self(has_batch=False)
        if n:
            opt.step()
        return n > 0

    def close(self) -> None:
        """Release the shared-memory segment (the next phase builds its own GradSync)."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None


def _split(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Consecutive views of flat [>= sum of numel] shaped like each parameter, in order."""
    views, off = [], 0
    for p in params:
        views.append(flat[off: off + p.numel()].view_as(p))
        off += p.numel()
    return views



__all__ = ["GradSync"]
