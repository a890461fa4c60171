"""A Spark task's model comes from its checkpoint file: mapped, equal to the saved model, re-read when the file changes."""
from __future__ import annotations

import os

import numpy as np
import torch

from dr_model.config import ModelConfig
from dr_model.model import DRModel
from dr_model.vocab import Vocab
from spark_udfs.model_source import ModelSource, load_model

CFG = ModelConfig(K=6, D=2, J=2, item_dim=8, user_dim=8, rerank_dim=8, node_dim=4, hidden=16, seq_len=5)


def test_a_source_loads_the_saved_model_and_a_rewritten_file_gets_a_new_key(tmp_path):
    V, vocab = 500, Vocab(np.arange(0, 1000, 2, dtype=np.int64))
    torch.manual_seed(0)
    a = DRModel(CFG, V).eval()
    src_a = ModelSource.from_model(a, vocab, str(tmp_path))
    got, got_vocab = load_model(src_a)
    assert np.array_equal(got_vocab.ids, vocab.ids)
    seq = torch.randint(0, V + 1, (7, CFG.seq_len))
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(a.beam(seq, 3), got.beam(seq, 3)))
    assert load_model(src_a)[0] is got                              # once per worker
    torch.manual_seed(1)
    b = DRModel(CFG, V).eval()
    st = os.stat(src_a.state_file)
    src_b = ModelSource.from_model(b, vocab, str(tmp_path))         # the same path, rewritten
    os.utime(src_b.state_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))   # a coarse clock still moves on
    src_b = ModelSource.of(src_b.state_file, CFG)
    assert src_b.key != src_a.key and src_b.state_file == src_a.state_file
    with torch.no_grad():
        assert torch.equal(load_model(src_b)[0].reranker.item_vectors(0, V), b.reranker.item_vectors(0, V))
    assert ModelSource.of(src_b.state_file, ModelConfig(**{**vars(CFG), "K": 7})).key != src_b.key
