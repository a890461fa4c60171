"""Item embedding tables whose size follows a row budget, not the catalog.

Up to `rows` ids a table is a plain nn.Embedding (one exact row per id). Above it, a
frequency-split quotient-remainder table (Shi et al. 2019, "Compositional Embeddings Using
Complementary Partitions"; exact rows for frequent ids as in frequency-based double hashing,
Zhang et al. 2020): the `exact_share` x rows most frequent ids keep an exact row, every other
id v is remainder[v % n_r] + quotient[v // n_r], a pair no other id shares (n_q = the fewest
quotient rows that make it so; the rest of the budget are remainder rows). Parameters, optimizer moments and the rows a step touches stay
O(rows) whatever the catalog; the one catalog-sized part is the id -> exact row map
(4 bytes per id, a buffer saved with the model).
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import compiled, split_rows

ROWS = 1 << 62                  # no budget: one exact row per id


class SplitTable(nn.Module):
    """ids [...] int64 -> rows [..., dim]: exact rows for the frequent ids, remainder + quotient rows for the rest.

    Two lookups per id: `main` holds the exact rows [0, n_exact) and the remainder rows after
    them; `quotient` ends with a zero padding row that exact ids add (no gradient reaches it).
    """

    def __init__(self, num: int, dim: int, rows: int, exact_share: float, sparse: bool) -> None:
        super().__init__()
        self.n_exact = n_exact = int(rows * exact_share)
        free = rows - n_exact
        # As few quotient rows as make every (remainder, quotient) pair unique: the rest of the
        # budget goes to remainder rows, so fewer ids share one.
        self.n_q = max(-(-num // max(free - 1, 1)), 1)
        while (free - self.n_q) * self.n_q < num and self.n_q < free // 2:
            self.n_q += 1
        self.n_r = free - self.n_q
        if self.n_r < 1 or self.n_r * self.n_q < num:
            raise ValueError(f"{num} ids do not fit a {rows}-row table with {n_exact} exact rows "
                             f"(remainder x quotient rows must reach {num}): raise model.item_rows")
        self.num_embeddings, self.embedding_dim = num, dim
        self.main = nn.Embedding(n_exact + self.n_r, dim, sparse=sparse)
        self.quotient = nn.Embedding(self.n_q + 1, dim, padding_idx=self.n_q, sparse=sparse)
        init_split(self, 1.0)
        self.register_buffer("slot", torch.full((num,), -1, dtype=torch.int32))   # id -> exact row (-1: composed)

    def keep_exact(self, order: torch.Tensor) -> None:
        """Give exact rows to the first ids of `order` (ids by falling frequency, [>= n_exact] int64)."""
        order = order[:self.n_exact]
        self.slot.fill_(-1)
        self.slot[order] = torch.arange(len(order), dtype=torch.int32)

    def rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [...] int64 -> (the `main` rows [...], the `quotient` rows [...]) they read."""
        flat = ids.reshape(-1).contiguous()
        main, quo = torch.empty_like(flat), torch.empty_like(flat)
        bad = compiled(split_rows)(flat.numpy(), self.slot.numpy(), self.n_exact, self.n_r, self.n_q,
                                   main.numpy(), quo.numpy())
        if bad >= 0:
            raise IndexError(f"item id {int(flat[bad])} is outside this {self.num_embeddings}-id table")
        return main.view(ids.shape), quo.view(ids.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        main, quo = self.rows_of(ids)
        return self.main(main) + self.quotient(quo)


def init_split(table: SplitTable, std: float) -> None:
    """Exact rows ~ N(0, std^2); remainder and quotient rows at std / sqrt 2 (their sum keeps the scale)."""
    with torch.no_grad():
        nn.init.normal_(table.main.weight[: table.n_exact], std=std)
        nn.init.normal_(table.main.weight[table.n_exact:], std=std * 2 ** -0.5)
        nn.init.normal_(table.quotient.weight, std=std * 2 ** -0.5)
        table.quotient.weight[table.n_q].zero_()


def item_table(num: int, dim: int, rows: int, exact_share: float, sparse: bool = False,
               padding_idx: int | None = None) -> nn.Module:
    """An exact nn.Embedding when num <= rows, else a SplitTable (the padding id's row is then
    composed like any other: encoders mask pads out)."""
    if num <= rows:
        return nn.Embedding(num, dim, padding_idx=padding_idx, sparse=sparse)
    return SplitTable(num, dim, rows, exact_share, sparse)


def init_rows(table: nn.Module, std: float) -> None:
    """Rows ~ N(0, std^2): an exact table's, or a SplitTable's composed rows (each part at std / sqrt 2)."""
    if isinstance(table, nn.Embedding):
        nn.init.normal_(table.weight, std=std)
    else:
        init_split(table, std)


def table_rows(table: nn.Module, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Rows lo..hi of an item table [hi - lo, dim] (a view for an exact table, composed otherwise)."""
    hi = table.num_embeddings if hi is None else hi
    if isinstance(table, nn.Embedding):
        return table.weight[lo:hi]
    return table(torch.arange(lo, hi))


def _embedding_grad(emb: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What backward of a sparse emb(ids) [n] given grad [n, dim] puts on emb.weight: uncoalesced sparse [V, dim]."""
    if emb.padding_idx is not None:
        keep = ids != emb.padding_idx
        ids, grad = ids[keep], grad[keep]
    return torch.sparse_coo_tensor(ids.unsqueeze(0), grad, emb.weight.shape, check_invariants=False)


def set_table_grads(table: nn.Module, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """Set a sparse item table's gradients to what backward of table(ids) [..., dim] given grad [..., dim]
    puts on them, without the forward's row reads (they do not enter the gradient)."""
    ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
    if isinstance(table, SplitTable):
        main, quo = table.rows_of(ids)
        parts = ((table.main, main), (table.quotient, quo))
    else:
        parts = ((table, ids),)
    for emb, rows in parts:
        if not emb.sparse:
            raise ValueError(f"set_table_grads: the {tuple(emb.weight.shape)} table is not sparse")
        emb.weight.grad = _embedding_grad(emb, rows, grad)


def keep_frequent_exact(module: nn.Module, counts: torch.Tensor) -> int:
    """Every SplitTable in the module gives its exact rows to the most frequent ids -> tables set."""
    tables = [m for m in module.modules() if isinstance(m, SplitTable)]
    if tables:
        order = torch.argsort(-torch.as_tensor(counts, dtype=torch.int64), stable=True)   # ties: the lower id
        for t in tables:
            t.keep_exact(order)
    return len(tables)


__all__ = ["ROWS", "SplitTable", "item_table", "init_rows", "table_rows", "keep_frequent_exact", "set_table_grads"]
