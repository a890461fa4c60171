"""A mean-pool encoder's table exchanged as (history, pooled gradient): every rank rebuilds the gradient the
touched rows would have carried, over both transports, in N (L + dim) numbers per step."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from dr_model.config import ModelConfig
from dr_model.encoders import MeanPoolEncoder, pooled_encoders
from dr_model.model import DRModel
from dr_model.optim import sparse_tables
from ray_trainers.grad_sync import GradSync

ITEMS, DIM, L, CAP = 40, 4, 5, 6
SPLIT_ROWS = 30                            # < 41 ids: a SplitTable (15 exact rows, 8 remainder x 7 quotient)
BATCH = {0: 6, 1: 4}                       # the ranks' batches differ in size


def _pooled_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One spawned rank: the same encoder and batches synced by rows and by pooled gradients, both transports."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    mp.start_processes(_pooled_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
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
