"""The classical peers computed by Spark (jobs/peers.py) equal the in-process ones (dr_model.evaluation.Peers)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dr_model.config import SplitConfig
from dr_model.evaluation import EvalUsers, Peers
from dr_model.split import paper_split
from dr_model.synthetic import SyntheticSpec, generate
from dr_model.vocab import Vocab
from jobs.peers import in_model_indices, spark_peers


def test_spark_peers_equal_the_in_process_ones(spark):
    spec = SyntheticSpec(num_users=600, num_items=300, num_clusters=6, events_per_user=20, seed=3)
    split = paper_split(generate(spec), SplitConfig(rating_threshold=0.0, test_users=100, valid_users=50), 10)
    users = EvalUsers.of(split, 2)
    vocab = Vocab(np.unique(split.train_target))
    k = 10
    want = Peers.in_process(split.train_user, split.train_target, vocab, users, k, with_gram=True)
    samples = spark.createDataFrame(pd.DataFrame({"user_id": split.train_user, "target": split.train_target}))
    raw = spark_peers(spark, samples, users, k, gram_vocab=vocab)
    # the driver gets raw ids; the evaluation task maps them onto the model's items
    assert set(raw.item_cf[raw.item_cf >= 0].tolist()) <= set(vocab.ids.tolist())
    got = in_model_indices(raw, vocab)

    np.testing.assert_array_equal(got.gram, want.gram)
    np.testing.assert_array_equal(got.popular_count, want.popular_count[: len(got.popular_count)])
    np.testing.assert_array_equal(got.popular, want.popular[: len(got.popular)])
    assert len(got.popular) >= k + int(np.diff(users.input_offsets).max())
    # item-CF: the same lists, up to the order of float ties (sums in another order)
    same = np.mean([set(a) == set(b) for a, b in zip(got.item_cf, want.item_cf)])
    assert got.item_cf.shape == want.item_cf.shape and same >= 0.95
    inputs = users.input_matrix(vocab)
    for row in range(len(users)):                    # never an input item
        assert not set(got.item_cf[row][got.item_cf[row] >= 0]) & set(inputs[row].indices)
