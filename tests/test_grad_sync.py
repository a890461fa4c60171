"""GradSync between 2 spawned ranks: dense and sparse-table gradients averaged alike over shared memory and gloo;
a mean-pool encoder's table exchanged as (history, pooled gradient), from which every rank rebuilds the gradient
the touched rows would have carried, in N (L + dim) numbers per step."""
from __future__ import annotations

import os
import platform
import socket

import pytest
import torch

from dr_model.config import ModelConfig
from dr_model.encoders import MeanPoolEncoder, pooled_encoders
from dr_model.model import DRModel
from dr_model.optim import sparse_tables
from ray_trainers.grad_sync import GradSync

ITEMS, DIM, L, CAP = 40, 4, 5, 6
SPLIT_ROWS = 30                            # < 41 ids: a SplitTable (15 exact rows, 11 remainder x 4 quotient)
BATCH = {0: 6, 1: 4}                       # the ranks' batches differ in size


def _join(rank: int, world: int, port: int):  # noqa: ANN202
    """In a spawned rank: join the gloo group on loopback -> torch.distributed."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return dist


def _spawn(rank_fn, tmp_path) -> tuple[dict, dict]:  # noqa: ANN001
    """Run rank_fn(rank, 2, port, out_dir) in 2 spawned processes -> what ranks 0 and 1 saved (rank{r}.pt)."""
    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    mp.start_processes(rank_fn, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    return tuple(torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))


def _sparse_grad(step: int, rank: int) -> torch.Tensor:
    """A rank's sparse table gradient [9, 2] of a step: rows with repeats, as an embedding lookup gives."""
    gen = torch.Generator().manual_seed(1000 + 100 * step + rank)
    rows = torch.randint(0, 9, (5,), generator=gen)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(5, 2, generator=gen), (9, 2), check_invariants=True)


def _grad_sync_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One spawned rank: the same per-rank gradients averaged by GradSync over shared memory, then gloo."""
    dist = _join(rank, world, port)
    params = [torch.nn.Parameter(torch.zeros(7, 3)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 2))]
    table = torch.nn.Parameter(torch.zeros(9, 2))
    out = {}
    for shm in (True, False):
        sync = GradSync(params + [table], shared_memory=shm, tables=[table], max_rows=5)
        out[shm] = {"transport": sync.transport, "steps": []}
        for step in range(4):
            gen = torch.Generator().manual_seed(100 * step + rank)
            for i, p in enumerate(params):   # rank 1 never has a gradient for params[1]
                p.grad = None if (i == 1 and rank == 1) else torch.randn(p.shape, generator=gen)
            table.grad = _sparse_grad(step, rank)
            if step == 3 and rank == 1:      # rank 1 ran out of batches: join with zero gradients
                for p in params:
                    p.grad = torch.zeros_like(p)
                table.grad = None
                n = sync(has_batch=False)
            else:
                n = sync()
            assert table.grad.is_sparse and table.grad.is_coalesced()
            out[shm]["steps"].append((n, [p.grad.clone() for p in params] + [table.grad.to_dense()]))
        out[shm]["bytes"] = sync.bytes_per_step
        sync.close()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_grad_sync_shared_memory_equals_gloo(tmp_path):
    """Dense and sparse (item table) gradients: both transports give every rank the workers' average."""
    from ray_trainers.shm_exchange import SHM_DIR

    shm_before = set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()
    r0, r1 = _spawn(_grad_sync_rank, tmp_path)
    if platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR):
        assert r0[True]["transport"] == r1[True]["transport"] == "shm"
    assert r0[False]["transport"] == "gloo"
    # dense 21 + 5 + 4 floats and the flag, then the table's count and one record (row, 2 values)
    # per row the rank touched (shared memory) or per row of the rank that touched the most and
    # the counts' exchange (gloo)
    rows = [[len(torch.unique(_sparse_grad(step, r).coalesce().indices())) if (step, r) != (3, 1) else 0
             for r in (0, 1)] for step in range(4)]
    assert r0[True]["bytes"] == pytest.approx(sum(4 * (31 + 1 + 3 * k[0]) for k in rows) / 4)
    assert r0[False]["bytes"] == pytest.approx(sum(4 * (31 + 1 + 3 * max(k) + 1) for k in rows) / 4)
    for step in range(4):
        g = []                               # each rank's gradients, drawn as _grad_sync_rank draws them
        for r in (0, 1):
            gen = torch.Generator().manual_seed(100 * step + r)
            g.append([torch.zeros(shape) if (i == 1 and r == 1) else torch.randn(shape, generator=gen)
                      for i, shape in enumerate([(7, 3), (5,), (2, 2)])]
                     + [torch.zeros(9, 2) if (step == 3 and r == 1) else _sparse_grad(step, r).to_dense()])
        n = 1 if step == 3 else 2
        want = [a if step == 3 else (a + b) / 2 for a, b in zip(g[0], g[1])]
        for res in (r0[True], r1[True], r0[False], r1[False]):
            got_n, got = res["steps"][step]
            assert got_n == n
            for w, x in zip(want[:3], got[:3]):
                assert torch.equal(w, x), step
            assert torch.allclose(want[3], got[3], atol=1e-6), step
        # every rank applies the bitwise-same sparse update
        assert torch.equal(r0[True]["steps"][step][1][3], r1[True]["steps"][step][1][3])
        assert torch.equal(r0[False]["steps"][step][1][3], r1[False]["steps"][step][1][3])
    # the segment's name is unlinked once every rank has mapped it
    if os.path.isdir(SHM_DIR):
        assert not {f for f in os.listdir(SHM_DIR) if f.startswith("dr-gradsync-")} - shm_before


def _pooled_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One spawned rank: the same encoder and batches synced by rows and by pooled gradients, both transports."""
    dist = _join(rank, world, port)
    out = {}
    for kind, rows in (("exact", 1 << 62), ("split", SPLIT_ROWS)):
        for shm in (True, False):
            for pooled in (False, True):
                torch.manual_seed(0)                                   # the same weights on every rank
                enc = MeanPoolEncoder(ITEMS, DIM, 3, sparse=True, rows=rows)
                if kind == "split":
                    enc.emb.keep_exact(torch.arange(ITEMS + 1))          # ids 0..14 exact, the rest composed
                params = list(enc.parameters())
                sync = GradSync(params, shared_memory=shm, tables=sparse_tables(enc), max_rows=CAP * L,
                                pooled=[enc] if pooled else [], max_samples=CAP, seq_len=L)
                steps = []
                for step in range(3):
                    enc.zero_grad(set_to_none=True)
                    if step == 2 and rank == 1:                        # out of batches: join the others' step
                        sync.join(torch.optim.SGD(params, lr=0.0))
                    else:
                        gen = torch.Generator().manual_seed(10 * step + rank)
                        seq = torch.randint(0, ITEMS + 1, (BATCH[rank], L), generator=gen)   # the pad (40) too
                        enc(seq).square().sum().backward()
                        sync()
                    steps.append([p.grad.to_dense().clone() for p in params])
                out[(kind, shm, pooled)] = {"steps": steps, "bytes": sync.bytes_per_step,
                                            "capture": enc.capture}
                sync.close()
                out[(kind, shm, pooled)]["capture_after"] = enc.capture
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_pooled_gradients_rebuild_the_rows_exchange(tmp_path):
    r0, r1 = _spawn(_pooled_rank, tmp_path)
    for kind in ("exact", "split"):
        for shm in (True, False):
            rows, pooled = r0[(kind, shm, False)], r0[(kind, shm, True)]
            assert pooled["capture"] and not pooled["capture_after"] and not rows["capture"]
            for a, b, c in zip(rows["steps"], pooled["steps"], r1[(kind, shm, True)]["steps"]):
                for x, y, z in zip(a, b, c):
                    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)   # the rows' average, rebuilt
                    assert torch.equal(y, z)                                 # bit-equal on every rank
        # shared memory: dense part + flag, then one block per pooled table: count + N (L + dim) per step
        dense = sum(p.numel() for n, p in MeanPoolEncoder(ITEMS, DIM, 3, rows=SPLIT_ROWS if kind == "split" else 1 << 62)
                    .named_parameters() if not n.startswith("emb.")) + 1
        assert r0[(kind, True, True)]["bytes"] == pytest.approx(4 * (dense + 1 + BATCH[0] * (L + DIM)))
        want_1 = (2 * (dense + 1 + BATCH[1] * (L + DIM)) + dense + 1) / 3     # rank 1 joined the last step
        assert r1[(kind, True, True)]["bytes"] == pytest.approx(4 * want_1)


def test_pooled_encoders_are_the_untied_sparse_mean_pools():
    cfg = ModelConfig(K=4, D=2, J=2, item_dim=8, user_dim=8, node_dim=4, hidden=8, rerank_dim=8)
    model = DRModel(cfg, 30, sparse=True)
    assert pooled_encoders(model) == [model.encoder, model.rerank_encoder]
    assert pooled_encoders(DRModel(cfg, 30, sparse=False)) == []                  # dense tables: all-reduced
    tied = DRModel(ModelConfig(**{**cfg.__dict__, "tie_item_tables": True}), 30, sparse=True)
    assert pooled_encoders(tied) == [tied.encoder]        # the reranker scores with the other one's table
    gru = DRModel(ModelConfig(**{**cfg.__dict__, "encoder": "gru"}), 30, sparse=True)
    assert pooled_encoders(gru) == []
