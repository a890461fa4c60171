"""Fast tests of the pure-PyTorch/NumPy core: codec, structure model, beam search, encoders, reranker."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dr_model.beam import beam_search
from dr_model.codec import decode, encode
from dr_model.config import ConfigError, DRConfig, ModelConfig
from dr_model.encoders import GRUEncoder, MeanPoolEncoder
from dr_model.index import PathIndex
from dr_model.reranker import Reranker
from dr_model.structure import StructureModel


def test_codec_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    for K, D in [(2, 1), (7, 3), (100, 3), (50, 4)]:
        codes = rng.integers(0, K, size=(64, 5, D))
        paths = encode(codes, K)
        assert paths.dtype == np.int64 and paths.shape == (64, 5)
        assert paths.min() >= 0 and paths.max() < K ** D
        np.testing.assert_array_equal(decode(paths, K, D), codes)
        t = torch.from_numpy(codes)
        np.testing.assert_array_equal(encode(t, K).numpy(), paths)
        np.testing.assert_array_equal(decode(torch.from_numpy(paths), K, D).numpy(), codes)
    # first layer is the most significant digit
    assert encode(np.array([1, 2, 3]), 10) == 123


def test_codec_rejects_out_of_range():
    with pytest.raises(ValueError, match="path codes"):
        encode(np.array([[0, 5]]), 5)
    with pytest.raises(ValueError, match="paths must lie"):
        decode(np.array([25]), 5, 2)


def _direct_path_log_prob(m: StructureModel, u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log p(path|x) computed literally: concat(u, e_1(c_1), ...) -> MLP -> log_softmax."""
    N, P, D = codes.shape
    total = torch.zeros(N, P)
    for d in range(D):
        parts = [u.unsqueeze(1).expand(N, P, -1)] + [m.node_emb[p](codes[..., p]) for p in range(d)]
        x = torch.cat(parts, -1)
        logits = m.out[d](F.relu(m.inp[d](x)))
        total = total + F.log_softmax(logits, -1).gather(-1, codes[..., d:d + 1]).squeeze(-1)
    return total


def test_path_log_prob_and_gradients_match_direct_computation():
    torch.manual_seed(0)
    m = StructureModel(user_dim=8, K=5, D=3, node_dim=4, hidden=16).double()
    u = torch.randn(6, 8, dtype=torch.double)
    codes = torch.randint(0, 5, (6, 3, 3))
    ours = m.path_log_prob(u, codes)
    direct = _direct_path_log_prob(m, u, codes)
    torch.testing.assert_close(ours, direct)

    loss = m.multi_path_loss(u, codes)
    direct_loss = -torch.log(direct.exp().sum(1)).mean()
    torch.testing.assert_close(loss, direct_loss)
    g_ours = torch.autograd.grad(loss, list(m.parameters()))
    g_direct = torch.autograd.grad(-torch.log(_direct_path_log_prob(m, u, codes).exp().sum(1)).mean(), list(m.parameters()))
    for a, b in zip(g_ours, g_direct):
        torch.testing.assert_close(a, b)


def test_path_probabilities_sum_to_one():
    torch.manual_seed(1)
    K, D = 3, 3
    m = StructureModel(4, K, D, 2, 8).double()
    u = torch.randn(2, 4, dtype=torch.double)
    all_codes = torch.tensor(list(itertools.product(range(K), repeat=D))).unsqueeze(0).expand(2, -1, -1)
    total = m.path_log_prob(u, all_codes).exp().sum(1)
    torch.testing.assert_close(total, torch.ones(2, dtype=torch.double))


@pytest.mark.parametrize("K,D", [(3, 3), (4, 2), (2, 4)])
def test_beam_search_equals_exhaustive_enumeration_when_beam_covers_all(K, D):
    torch.manual_seed(K * 10 + D)
    m = StructureModel(6, K, D, 3, 10).double()
    u = torch.randn(5, 6, dtype=torch.double)
    all_codes = torch.tensor(list(itertools.product(range(K), repeat=D)))
    lp = m.path_log_prob(u, all_codes.unsqueeze(0).expand(5, -1, -1))
    exact_lp, order = torch.sort(lp, dim=1, descending=True)
    exact_paths = encode(all_codes, K)[order]
    # A beam of K**(D-1) keeps every prefix, so the top-B result is exact for any B <= K**D.
    for B in (K ** (D - 1), K ** D):
        paths, logp = beam_search(m, u, B)
        assert paths.shape == (5, B)
        torch.testing.assert_close(logp, exact_lp[:, :B])
        np.testing.assert_array_equal(paths.numpy(), exact_paths[:, :B].numpy())


def test_beam_search_small_beam_returns_sorted_valid_paths():
    torch.manual_seed(3)
    m = StructureModel(8, 10, 3, 4, 16)
    u = torch.randn(7, 8)
    paths, logp = beam_search(m, u, 4)
    assert paths.shape == (7, 4)
    assert torch.all(logp[:, :-1] >= logp[:, 1:])
    assert torch.all((paths >= 0) & (paths < 1000))
    # scores are the model's own log p of the returned paths
    torch.testing.assert_close(m.path_log_prob(u, decode(paths, 10, 3)), logp)
    # each user's paths are distinct
    assert all(len(set(r.tolist())) == 4 for r in paths)


def test_encoders_ignore_left_padding():
    torch.manual_seed(0)
    V = 10
    for enc in (MeanPoolEncoder(V, 4, 6), GRUEncoder(V, 4, 6)):
        short = torch.tensor([[3, 5, 7]])
        padded = torch.tensor([[V, V, 3, 5, 7]])
        torch.testing.assert_close(enc(short), enc(padded))
        empty = torch.tensor([[V, V, V]])
        assert enc(empty).shape == (1, 6)
    # GRU is order sensitive, mean-pool is not
    gru = GRUEncoder(V, 4, 6)
    assert not torch.allclose(gru(torch.tensor([[1, 2]])), gru(torch.tensor([[2, 1]])))


def test_brute_force_topk_is_exact_across_chunks():
    torch.manual_seed(0)
    r = Reranker(1000, 8)
    with torch.no_grad():
        r.item_bias.normal_()
    w = torch.randn(9, 8)
    s, i = r.brute_force_topk(w, 20, chunk=64)
    full = w @ r.item_emb.weight.T + r.item_bias
    es, ei = torch.topk(full, 20, dim=1)
    torch.testing.assert_close(s, es)
    np.testing.assert_array_equal(i.numpy(), ei.numpy())


def test_sampled_softmax_log_q_correction_and_accidental_hits():
    torch.manual_seed(0)
    r = Reranker(5, 3)
    w = torch.randn(2, 3)
    pos = torch.tensor([1, 4])
    neg = torch.tensor([0, 1, 2])
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]) * 3)
    loss = r.sampled_softmax_loss(w, pos, neg, log_q)
    # by hand
    logits = w @ r.item_emb.weight.T + r.item_bias - log_q
    l0 = -(logits[0, 1] - torch.logsumexp(torch.stack([logits[0, 1], logits[0, 0], logits[0, 2]]), 0))  # hit on 1 removed
    l1 = -(logits[1, 4] - torch.logsumexp(torch.stack([logits[1, 4], logits[1, 0], logits[1, 1], logits[1, 2]]), 0))
    torch.testing.assert_close(loss, (l0 + l1) / 2)


def test_multi_target_losses_average_each_target_and_skip_padding():
    torch.manual_seed(0)
    r = Reranker(5, 3)
    w = torch.randn(2, 3)
    pos = torch.tensor([[1, 3], [4, -1]])           # row 0: two targets, row 1: one
    logp = F.log_softmax(w @ r.item_emb.weight.T + r.item_bias, 1)
    torch.testing.assert_close(r.full_softmax_loss(w, pos), -(logp[0, 1] + logp[0, 3] + logp[1, 4]) / 3)
    # sampled: every target against the shared negatives, minus the row's own targets
    neg = torch.tensor([0, 3, 2])
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]) * 3)
    lg = w @ r.item_emb.weight.T + r.item_bias - log_q
    lse = torch.logsumexp

    def nll(row: int, item: int, negs: list[int]) -> torch.Tensor:
        return -(lg[row, item] - lse(torch.stack([lg[row, item]] + [lg[row, j] for j in negs]), 0))
    want = (nll(0, 1, [0, 2]) + nll(0, 3, [0, 2]) + nll(1, 4, [0, 3, 2])) / 3
    torch.testing.assert_close(r.sampled_softmax_loss(w, pos, neg, log_q), want)
    # one target per row is the single-target loss
    torch.testing.assert_close(r.full_softmax_loss(w, pos[:, :1]), r.full_softmax_loss(w, pos[:, 0]))


def test_next_items_stay_within_the_user():
    from dr_model.split import next_items
    user = np.array([7, 7, 7, 9, 9])
    target = np.array([10, 11, 12, 20, 21])
    np.testing.assert_array_equal(next_items(user, target, 3),
                                  [[10, 11, 12], [11, 12, -1], [12, -1, -1], [20, 21, -1], [21, -1, -1]])


def test_path_index_lookup_dedupes_items_per_user():
    assign = np.array([[5, 7, 9], [5, 8, 10], [11, 12, 13]])
    idx = PathIndex.build(assign)
    np.testing.assert_array_equal(idx.keys, [5, 7, 8, 9, 10, 11, 12, 13])
    np.testing.assert_array_equal(idx.sizes(), [2, 1, 1, 1, 1, 1, 1, 1])
    row, item = idx.lookup(np.array([[5, 7], [99, 12], [8, 10]]))
    np.testing.assert_array_equal(row, [0, 0, 1, 2])
    np.testing.assert_array_equal(item, [0, 1, 2, 1])


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="model.K"):
        ModelConfig(K=1)
    with pytest.raises(ConfigError, match="model.encoder"):
        ModelConfig(encoder="lstm")
    with pytest.raises(ConfigError, match="search.score_paths"):
        DRConfig.from_dict({"model": {"J": 5}, "search": {"score_paths": 3}})
    with pytest.raises(ConfigError, match="unknown field"):
        DRConfig.from_dict({"model": {"KK": 5}})
    cfg = DRConfig.load(None, ["model.K=7", "model.encoder=gru", "mstep.alpha=1e-3"])
    assert (cfg.model.K, cfg.model.encoder, cfg.mstep.alpha) == (7, "gru", 1e-3)
    assert cfg.hash() != DRConfig().hash()


def test_default_toml_spells_out_the_defaults():
    """configs/default.toml is the one config every dataset runs on: it must equal the built-in defaults."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "default.toml"
    assert DRConfig.load(path) == DRConfig()


def test_proposal_draws_count_power_exactly():
    from dr_model.sampling import Proposal

    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 1, 1, 2, 3, 7, 50, 51, 400, 10_000] * 5)   # 50 items, classes from 1 to ~2^10
    q_want = counts.double().clamp_min(1) ** 0.75
    q_want /= q_want.sum()
    prop = Proposal(counts)
    n = 400_000
    draws = prop.sample(n, gen)
    assert draws.min() >= 0 and draws.max() < len(counts)
    emp = torch.bincount(draws, minlength=len(counts)).double() / n
    sd = (q_want * (1 - q_want) / n).sqrt()
    assert ((emp - q_want).abs() <= 5 * sd + 1e-12).all()
    torch.testing.assert_close(prop.log_q(256).double(), (256 * q_want).log(), rtol=0, atol=1e-5)
    again = Proposal(counts).sample(1000, torch.Generator().manual_seed(1))
    assert torch.equal(again, Proposal(counts).sample(1000, torch.Generator().manual_seed(1)))


def test_sparse_item_tables_update_only_the_rows_a_step_touched():
    """Above full_softmax_max_items the item tables get sparse gradients and lazy Adam: same parameters
    as the dense model, untouched rows stay bitwise as they were, the loss goes down, the
    optimizer state survives a state_dict round trip."""
    from dr_model.optim import HybridAdam, sparse_tables
    from dr_model.schedule import Phase
    from dr_model.trainer import new_model, phase_optimizer, proposal, train_step

    cfg = DRConfig.from_dict({"train": {"full_softmax_max_items": 50, "negatives": 16}})
    V = 400
    model, dense = new_model(cfg, V), new_model(cfg, 40)
    assert len(sparse_tables(model)) == 4 and not sparse_tables(dense)     # 3 item tables + the bias
    assert {k: v.shape for k, v in model.state_dict().items()} == \
           {k: v.shape for k, v in type(model)(cfg.model, V).state_dict().items()}
    phase = Phase("joint", 1, True, True, 0)
    opt = phase_optimizer(model, cfg, phase)
    assert isinstance(opt, HybridAdam) and opt.sparse is not None and opt.dense is not None
    q, log_q = proposal(torch.randint(1, 9, (V,)), cfg)
    gen = torch.Generator().manual_seed(0)
    assign = torch.randint(0, cfg.model.num_paths, (V, cfg.model.J))
    seq, target = torch.randint(0, 100, (32, cfg.model.seq_len)), torch.randint(0, 100, (32, 2))
    seq[:, :3] = V                                          # left padding
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = [train_step(model, opt, seq, target, assign, q, log_q, 16, phase, gen) for _ in range(20)]
    assert losses[-1][0] < losses[0][0] and losses[-1][1] < losses[0][1]
    after = model.state_dict()
    for name in ("encoder.emb.weight", "rerank_encoder.emb.weight"):
        moved = (after[name] != before[name]).any(1)
        assert moved[:100].any() and not moved[100:].any(), name   # inputs are items < 100, pad row fixed
    # the reranker's rows: targets (< 100) and sampled negatives only; never the others
    moved = (after["reranker.item_emb.weight"] != before["reranker.item_emb.weight"]).any(1)
    assert moved[:100].any() and moved.sum() < V
    other = phase_optimizer(model, cfg, phase)
    other.load_state_dict(opt.state_dict())
    for a, b in zip(opt.optimizers, other.optimizers):
        for sa, sb in zip(a.state.values(), b.state.values()):
            assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    with pytest.raises(ValueError, match="sparse=False"):
        model.reranker.full_softmax_loss(torch.zeros(2, cfg.model.rerank_dim), torch.zeros(2, dtype=torch.long))


def test_lazy_adam_is_sparse_adam_on_the_touched_rows():
    """LazyAdam's compiled row update equals torch.optim.SparseAdam (float rounding) over repeated
    sparse gradients with duplicate rows, for a [V, dim] table and a one-column one; rows no step
    touched stay bitwise as they were."""
    from dr_model.optim import LazyAdam

    gen = torch.Generator().manual_seed(0)
    for dim in (8, 1):
        ours = torch.nn.Parameter(torch.randn(500, dim, generator=gen))
        ref = torch.nn.Parameter(ours.detach().clone())
        start = ours.detach().clone()
        a, b = LazyAdam([ours], lr=1e-2), torch.optim.SparseAdam([ref], lr=1e-2)
        for _ in range(30):
            rows = torch.randint(0, 300, (400,), generator=gen)          # duplicates: coalesced first
            g = torch.sparse_coo_tensor(rows[None], torch.randn(400, dim, generator=gen), ours.shape)
            ours.grad, ref.grad = g, g.clone()
            a.step()
            b.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-5)
        assert (ours.detach()[:300] != start[:300]).any(1).all()
        assert torch.equal(ours.detach()[300:], start[300:])
    with pytest.raises(ValueError, match="dense gradient"):
        p = torch.nn.Parameter(torch.zeros(4, 2))
        p.grad = torch.ones(4, 2)
        LazyAdam([p], lr=0.1).step()


def test_pooled_table_gradient_is_the_pools_backward():
    """A mean-pool encoder's table gradient rebuilt from (seq, dL/dpooled) (what data-parallel workers
    exchange) equals autograd through pool(), bitwise, for an exact and a row-budget table."""
    from dr_model.encoders import MeanPoolEncoder

    gen = torch.Generator().manual_seed(0)
    for rows in (1 << 40, 64):
        enc = MeanPoolEncoder(500, 8, 8, sparse=True, rows=rows, exact_share=0.25)
        seq = torch.randint(0, 501, (32, 10), generator=gen)
        seq[:, :3] = 500                                            # left padding
        grad = torch.randn(32, 8, generator=gen)
        enc.pool(seq).backward(grad)
        want = {n: p.grad.coalesce() for n, p in enc.emb.named_parameters()}
        assert len(want) == (1 if rows > 500 else 2)
        enc.zero_grad(set_to_none=True)
        enc.table_grads(seq, grad)
        for n, p in enc.emb.named_parameters():
            got = p.grad.coalesce()
            assert torch.equal(got.indices(), want[n].indices()) and torch.equal(got.values(), want[n].values()), n


def test_item_tables_follow_the_row_budget():
    """Above model.item_rows: exact rows for the most frequent items, a unique remainder + quotient pair
    for every other one; the parameters stay at the budget and a saved model reloads exactly."""
    from dr_model.item_table import SplitTable, item_table, keep_frequent_exact
    from dr_model.model import DRModel

    assert isinstance(item_table(100, 4, 100, 0.5), torch.nn.Embedding)
    t = item_table(1000, 4, 100, 0.16, sparse=True)
    assert isinstance(t, SplitTable) and sum(p.numel() for p in t.parameters()) == (100 + 1) * 4   # + zero row
    counts = torch.zeros(1000, dtype=torch.long)
    counts[[7, 500, 999]] = torch.tensor([5, 9, 1])
    keep_frequent_exact(t, counts)
    assert t.slot[500] == 0 and t.slot[7] == 1 and t.slot[999] == 2 and int((t.slot >= 0).sum()) == 16
    ids = torch.arange(1000)
    composed = ids[t.slot[ids] < 0]
    assert t.n_q == 15 and t.n_r == 84 - 15          # the fewest quotient rows (69 x 15 >= 1000), the rest remainder
    pairs = (composed % t.n_r) * t.n_q + composed // t.n_r
    assert len(torch.unique(pairs)) == len(composed)          # no two items share both rows
    rows = t(ids.view(10, 100))
    assert rows.shape == (10, 100, 4)
    torch.testing.assert_close(rows.view(1000, 4)[500], t.main.weight[0])
    v = 123
    torch.testing.assert_close(rows.view(1000, 4)[v], t.main.weight[t.n_exact + v % t.n_r] + t.quotient.weight[v // t.n_r])
    t(torch.tensor([500, 123])).sum().backward()
    assert t.main.weight.grad.is_sparse
    assert t.main.weight.grad.coalesce().indices().tolist() == [[0, t.n_exact + 123 % t.n_r]]
    assert t.quotient.weight.grad.coalesce().indices().tolist() == [[123 // t.n_r]]   # not the zero row
    for bad in (1000, -1):                                   # the compiled mapping reads nothing out of range
        with pytest.raises(IndexError, match=f"item id {bad} is outside this 1000-id table"):
            t(torch.tensor([5, bad]))
    with pytest.raises(ValueError, match="item_rows"):
        item_table(10_000, 4, 100, 0.5)

    cfg = ModelConfig(item_rows=256, item_exact_share=0.5)
    V = 3000
    model = DRModel(cfg, V, sparse=True, counts=torch.arange(V))
    tables = [m for m in model.modules() if isinstance(m, SplitTable)]
    n_items = sum(p.numel() for m in tables for p in m.parameters())
    assert len(tables) == 4 and n_items == 257 * (2 * cfg.item_dim + cfg.rerank_dim + 1)
    seq = torch.randint(0, V, (4, cfg.seq_len))
    again = DRModel(cfg, V)
    again.load_state_dict(model.state_dict())
    a, b = model.eval().brute_force(seq, 20), again.eval().brute_force(seq, 20)
    np.testing.assert_array_equal(a[0], b[0])
    index = PathIndex.build(np.random.default_rng(0).integers(0, 30, size=(V, cfg.J)))
    items, scores, _ = again.retrieve(seq, index, beam=5, k=10)
    assert items.shape == (4, 10)


def test_tied_item_tables_share_one_table():
    """model.tie_item_tables: the reranker scores with its encoder's input table (one table less), trains
    it as one parameter, and never returns the pad row."""
    from dr_model.model import DRModel
    from dr_model.schedule import Phase
    from dr_model.trainer import new_model, phase_optimizer, proposal, train_step

    with pytest.raises(ConfigError, match="tie_item_tables"):
        ModelConfig(tie_item_tables=True, item_dim=32, rerank_dim=64)
    cfg = DRConfig.from_dict({"model": {"tie_item_tables": True}, "train": {"full_softmax_max_items": 50}})
    V = 200
    tied, untied = new_model(cfg, V), DRModel(ModelConfig(), V, sparse=True)
    assert tied.reranker.item_emb is tied.rerank_encoder.emb
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(untied) - n(tied) == V * cfg.model.rerank_dim                           # one V x d table less
    assert tied.reranker.num_items == V and tied.reranker.item_vectors().shape == (V, cfg.model.rerank_dim)
    phase = Phase("joint", 1, True, True, 0)
    opt = phase_optimizer(tied, cfg, phase)
    q, log_q = proposal(torch.ones(V, dtype=torch.long), cfg)
    gen = torch.Generator().manual_seed(0)
    seq, target = torch.randint(0, V, (16, cfg.model.seq_len)), torch.randint(0, V, (16,))
    assign = torch.randint(0, cfg.model.num_paths, (V, cfg.model.J))
    losses = [train_step(tied, opt, seq, target, assign, q, log_q, 16, phase, gen)[1] for _ in range(10)]
    assert losses[-1] < losses[0]
    again = DRModel(cfg.model, V)
    again.load_state_dict(tied.state_dict())
    _, items = again.reranker.brute_force_topk(torch.randn(3, cfg.model.rerank_dim), V)
    assert int(items.max()) == V - 1


def test_retrieve_in_user_blocks_equals_one_block(monkeypatch):
    """model.retrieve scores at most USER_BLOCK users at a time; the blocks change nothing."""
    from dr_model import model as model_mod
    from dr_model.model import DRModel

    cfg = ModelConfig()
    V = 2000
    model = DRModel(cfg, V).eval()
    rng = np.random.default_rng(1)
    seq = torch.randint(0, V, (37, cfg.seq_len))
    beamed = np.unique(model.beam(seq, 4)[0].numpy())                   # items on the paths users reach
    index = PathIndex.build(rng.choice(beamed, size=(V, cfg.J)))
    exclude = (np.repeat(np.arange(37), 3), rng.integers(0, V, 37 * 3))
    whole = model.retrieve(seq, index, beam=4, k=10, exclude=exclude)
    assert (whole[0] >= 0).sum(1).min() == 10                           # every user gets k candidates
    monkeypatch.setattr(model_mod, "USER_BLOCK", 5)
    blocks = model.retrieve(seq, index, beam=4, k=10, exclude=exclude)
    np.testing.assert_array_equal(blocks[0], whole[0])                  # items
    np.testing.assert_allclose(blocks[1], whole[1], rtol=1e-6)          # float32 sums in other blocks
    np.testing.assert_array_equal(blocks[2], whole[2])                  # vectors scored per user
