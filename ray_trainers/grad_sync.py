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

    Dense gradients travel as one flat float32 vector [sum of numel + 1] whose last slot flags
    "had a batch". A sparse item table (`tables`: gradients holding the rows a step touched)
    travels as its row count then one record [row (int32 bits), gradient [dim]] per touched row;
    every rank concatenates all ranks' records and sums duplicate rows in rank order, so all apply
    the same sparse update and what a step moves follows the batch, not the catalog. `max_rows`
    bounds the rows of one table per step (it sizes the shared segment). A mean-pool encoder's
    table (`pooled`: dr_model.encoders.pooled_encoders) travels as its batch instead: its sample
    count, then one record [seq (L int32 bits), dL/dpooled [item_dim]] per sample (`max_samples`
    at most, `seq_len` = L), from which every rank rebuilds the table's gradient over all ranks'
    samples in rank order (what TorchRec's pooled embeddings send backward): N (L + item_dim)
    numbers whatever the catalog, against up to N L rows of 1 + item_dim. Transport: shared memory
    (ShmExchange) when every rank is on this host, else gloo (all_reduce of the dense part; the
    records through one all_gather, cut to the step's largest row count). Both give every rank
    the same result; on one host the gloo collective's syscalls and thread hand-offs cost more
    than the whole forward/backward of a 128-sample batch here (see jobs/benchmarks/estep.py).
    Built per phase (collective); close() when done.
    """

    def __init__(self, params: list[torch.nn.Parameter], shared_memory: bool = True,
                 tables: list[torch.nn.Parameter] = (), max_rows: int = 0, pooled: list[torch.nn.Module] = (),
                 max_samples: int = 0, seq_len: int = 0) -> None:
        trainable = {id(p) for p in params}
        # an encoder whose table is frozen this phase has nothing to send
        self.pooled = [e for e in pooled if all(id(p) in trainable for p in e.emb.parameters())]
        in_pooled = {id(p) for e in self.pooled for p in e.emb.parameters()}
        table_ids = {id(p) for p in tables} - in_pooled
        self.params = [p for p in params if id(p) not in table_ids and id(p) not in in_pooled]
        self.tables = [p for p in params if id(p) in table_ids]
        for t in self.tables:
            if t.dim() != 2 or t.shape[0] >= 2 ** 31:
                raise ValueError(f"a sparse table must be [rows < 2^31, dim], got {tuple(t.shape)}")
        if self.tables and max_rows < 1:
            raise ValueError("sparse tables need max_rows >= 1 (the most rows one step touches)")
        if self.pooled and (max_samples < 1 or seq_len < 1):
            raise ValueError("pooled encoders need max_samples >= 1 and seq_len >= 1 (a step's samples, their length)")
        self.n_dense = sum(p.numel() for p in self.params) + 1
        self.seq_len = seq_len
        # Per table, then per pooled encoder: (where its block starts in the vector, capacity in
        # records, record width); the block is [count, cap records].
        self.blocks, n = [], self.n_dense
        shapes = [(min(max_rows, t.shape[0]), 1 + t.shape[1]) for t in self.tables]
        shapes += [(max_samples, seq_len + e.emb.embedding_dim) for e in self.pooled]
        for cap, width in shapes:
            self.blocks.append((n, cap, width))
            n += 1 + cap * width
        # The averaged dense gradients [n_dense]; the parameters' .grad become views of it.
        self.flat = torch.zeros(self.n_dense)
        self.views = list(zip(self.params, _split(self.flat, self.params)))
        self.shm: ShmExchange | None = open_exchange(n) if shared_memory else None
        self.transport = "shm" if self.shm is not None else "gloo"
        self._own = torch.zeros(n) if self.shm is None else None
        self.steps, self.bytes_sent = 0, 0
        self.capacity_bytes = 4 * n             # the most one rank publishes per step
        for e in self.pooled:
            e.capture = True

    @property
    def bytes_per_step(self) -> float:
        """Mean bytes this rank published per step so far (dense part + the touched rows' records)."""
        return self.bytes_sent / max(self.steps, 1)

    def __call__(self, has_batch: bool = True) -> int:
        import torch.distributed as dist

        if self.shm is not None:
            mine = self.shm.slot()              # [n] this rank's slot of this step
            counts = self._pack(mine, has_batch)
            every = self.shm.publish()          # [world, n] every rank's vector of this step
            # summed over dim 0 in rank order on every rank
            torch.sum(every[:, : self.n_dense], dim=0, out=self.flat)
            blocks = [every[:, start: start + 1 + cap * width] for start, cap, width in self.blocks]
            sent = self.n_dense + sum(1 + k * width for k, (_, _, width) in zip(counts, self.blocks))
        else:
            counts = self._pack(self._own, has_batch)
            self.flat.copy_(self._own[: self.n_dense])
            dist.all_reduce(self.flat)
            blocks, sent = self._gather_records(counts), self.n_dense
            sent += sum(b.shape[1] for b in blocks) + len(counts)
        self.steps += 1
        self.bytes_sent += 4 * sent
        n = int(round(float(self.flat[-1])))
        if n:
            self.flat[:-1] /= n
        for p, v in self.views:
            # A view of the buffer: train_step's zero_grad(set_to_none) drops it before the next backward.
            p.grad = v
        for t, b in zip(self.tables, blocks):
            t.grad = _sum_rows(b, t.shape, max(n, 1))
        for e, b in zip(self.pooled, blocks[len(self.tables):]):
            recs = _records(b, self.seq_len + e.emb.embedding_dim)
            if len(recs) == 0:
                for p in e.emb.parameters():
                    p.grad = None
                continue
            e.table_grads(recs[:, : self.seq_len].contiguous().view(torch.int32).long(), recs[:, self.seq_len:])
            for p in e.emb.parameters():
                if p.grad is not None:
                    p.grad = _mean(p.grad, max(n, 1))
        return n

    def _gather_records(self, rows: list[int]) -> list[torch.Tensor]:
        """gloo: every rank's blocks, each cut to the step's largest record count -> [world, 1 + m width] per block."""
        import torch.distributed as dist

        if not self.blocks:
            return []
        world = dist.get_world_size()
        counts = torch.tensor(rows, dtype=torch.int64)
        every = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(every, counts)
        most = torch.stack(every).amax(0).tolist()
        sizes = [1 + m * width for m, (_, _, width) in zip(most, self.blocks)]
        mine = torch.cat([self._own[start: start + size] for size, (start, _, _) in zip(sizes, self.blocks)])
        got = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(got, mine)
        return list(torch.stack(got).split(sizes, dim=1))

    def _pack(self, out: torch.Tensor, has_batch: bool) -> list[int]:
        """This rank's gradients (zeros where a parameter has none), flag, table records and pooled
        encoders' samples -> out [n]; returns the records written per block."""
        for p, v in zip(self.params, _split(out, self.params)):
            if p.grad is None:
                v.zero_()
            else:
                v.copy_(p.grad)
        out[self.n_dense - 1] = 1.0 if has_batch else 0.0
        written = []
        for t, (start, cap, width) in zip(self.tables, self.blocks):
            block = out[start: start + 1 + cap * width]
            g = t.grad
            k = 0
            if g is not None:
                if not g.is_sparse:
                    raise ValueError(f"table {tuple(t.shape)} got a dense gradient: build it with sparse=True")
                g = g.coalesce()
                k = g.indices().shape[1]
                if k > cap:
                    raise RuntimeError(f"a step touched {k} rows of a {tuple(t.shape)} table, more than the "
                                       f"exchange's capacity {cap} (max_rows): the bound given to GradSync is wrong")
                rec = block[1: 1 + k * width].view(k, width)
                rec[:, 0].view(torch.int32).copy_(g.indices()[0])
                rec[:, 1:].copy_(g.values())
            block[:1].view(torch.int32).fill_(k)
            written.append(k)
        for e, (start, cap, width) in zip(self.pooled, self.blocks[len(self.tables):]):
            block = out[start: start + 1 + cap * width]
            f = e.factors() if has_batch else None
            k = 0
            if f is not None:
                seq, grad = f
                k = seq.shape[0]
                if k > cap or seq.shape[1] != self.seq_len:
                    raise RuntimeError(f"a step's pooled batch [{k}, {seq.shape[1]}] exceeds the exchange's "
                                       f"[{cap}, {self.seq_len}] (max_samples, seq_len)")
                rec = block[1: 1 + k * width].view(k, width)
                rec[:, : self.seq_len].view(torch.int32).copy_(seq)
                rec[:, self.seq_len:].copy_(grad)
            block[:1].view(torch.int32).fill_(k)
            written.append(k)
        return written

    def join(self, opt: torch.optim.Optimizer) -> bool:
        """This worker has no batch left: step with the others' average; False once nobody has one."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        for t in self.tables:
            t.grad = None
        for e in self.pooled:
            e.factors()                         # nothing of this rank's: forget any capture
        n = self(has_batch=False)
        if n:
            opt.step()
        return n > 0

    def close(self) -> None:
        """Release the shared-memory segment (the next phase builds its own GradSync)."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        for e in self.pooled:
            e.capture = False


def _records(blocks: torch.Tensor, width: int) -> torch.Tensor:
    """Every rank's block [world, >= 1 + k width] (count, then k records) -> the records in rank order [sum k, width]."""
    counts = blocks[:, :1].contiguous().view(torch.int32)[:, 0].tolist()
    return torch.cat([blocks[r, 1: 1 + k * width].view(k, width) for r, k in enumerate(counts)])


def _sum_rows(blocks: torch.Tensor, shape: torch.Size, n: int) -> torch.Tensor:
    """Every rank's table block [world, >= 1 + k (1 + dim)] (count, then k records) -> the rows' sum / n,
    coalesced sparse [V, dim]."""
    recs = _records(blocks, 1 + shape[1])
    rows = recs[:, 0].contiguous().view(torch.int32).long()
    return _mean(torch.sparse_coo_tensor(rows.unsqueeze(0), recs[:, 1:], shape, check_invariants=False), n)


def _mean(g: torch.Tensor, n: int) -> torch.Tensor:
    """A sparse gradient summed over n ranks -> coalesced, divided by n."""
    g = g.coalesce()
    return torch.sparse_coo_tensor(g.indices(), g.values() / n, g.shape, is_coalesced=True, check_invariants=False)


def _split(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Consecutive views of flat [>= sum of numel] shaped like each parameter, in order."""
    views, off = [], 0
    for p in params:
        views.append(flat[off: off + p.numel()].view_as(p))
        off += p.numel()
    return views


__all__ = ["GradSync"]
