"""The classical peers of `dr evaluate`, computed by Spark where the training samples live.

Only the evaluation users' inputs go to the executors (a broadcast of O(evaluation users x
input) pairs) and only their top-k lists come back, so the driver never holds samples_train.
The math is dr_model.baselines' on the binary training matrix X (training user x item, from
samples_train's (user_id, target) pairs):

- popularity: n_i = users with item i; the top k + (longest input) items reach the driver.
- item-CF (cosine): score(u, j) = sum_{i in input(u)} c_ij / sqrt(n_i n_j), c_ij = users with
  both; one join of the pairs touching an evaluation input item with each user's pairs.
- EASE's Gram matrix G = X^T X as (i, j, c_ij) rows, only for catalogs up to
  eval.ease_max_items (G is dense V x V on the driver).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def training_pairs(samples: Any) -> Any:
    """samples_train DataFrame -> distinct (user_id, item_id) rows: the ones of X."""
    return samples.selectExpr("user_id", "target as item_id").distinct()


def item_counts(pairs: Any) -> Any:
    """(user_id, item_id) -> (item_id, n): users per item."""
    return pairs.groupBy("item_id").count().withColumnRenamed("count", "n")


def popularity(pairs: Any, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m most popular items -> (raw ids [m], counts [m]), ties by the lower id."""
    top = item_counts(pairs).orderBy(["n", "item_id"], ascending=[False, True]).limit(m).toPandas()
    return top["item_id"].to_numpy(np.int64), top["n"].to_numpy(np.float64)


def item_cf(spark: Any, pairs: Any, inputs: pd.DataFrame, k: int) -> pd.DataFrame:
    """Item-CF top-k of evaluation users: inputs (row, item_id) of their input halves -> (row, item_id, score, rank).

    Items of a row's input are never returned. Rows with fewer than k scored items get fewer.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ev = F.broadcast(spark.createDataFrame(inputs[["row", "item_id"]].drop_duplicates()))
    wanted = ev.select(F.col("item_id").alias("i")).distinct()
    n = item_counts(pairs)
    touch = pairs.join(wanted, pairs.item_id == wanted.i).select("user_id", "i")
    co = (touch.join(pairs.withColumnRenamed("item_id", "j"), "user_id")
          .filter(F.col("i") != F.col("j"))
          .groupBy("i", "j").count())
    ni = n.select(F.col("item_id").alias("i"), F.col("n").alias("n_i"))
    nj = n.select(F.col("item_id").alias("j"), F.col("n").alias("n_j"))
    contrib = (co.join(ni, "i").join(ev.select("row", F.col("item_id").alias("i")), "i")
               .groupBy("row", "j").agg(F.sum(F.col("count") / F.sqrt("n_i")).alias("s"))
               .join(nj, "j").select("row", F.col("j").alias("item_id"), (F.col("s") / F.sqrt("n_j")).alias("score")))
    contrib = contrib.join(ev, ["row", "item_id"], "left_anti")
    w = Window.partitionBy("row").orderBy(F.col("score").desc(), F.col("item_id").asc())
    return (contrib.withColumn("rank", F.row_number().over(w)).filter(F.col("rank") <= k)
            .toPandas().sort_values(["row", "rank"]))


def gram(pairs: Any, item_index: Any) -> tuple[np.ndarray, np.ndarray]:
    """G = X^T X over the model's items -> (rows i [M], cols j [M]) model indices and counts; `item_index`
    is a DataFrame (item_id, idx) of the model's items."""
    idx = pairs.join(item_index, "item_id").select("user_id", "idx")
    g = (idx.withColumnRenamed("idx", "i").join(idx.withColumnRenamed("idx", "j"), "user_id")
         .groupBy("i", "j").count().toPandas())
    return np.stack([g["i"].to_numpy(np.int64), g["j"].to_numpy(np.int64)]), g["count"].to_numpy(np.float64)


def spark_peers(spark: Any, samples: Any, users: Any, k: int, gram_vocab: Any = None) -> Any:
    """dr_model.evaluation.Peers of the evaluated `users` (EvalUsers) from a samples_train DataFrame, in RAW
    item ids (popular, item_cf; -1 pad): the driver needs no catalog (in_model_indices maps them where the
    model is). gram_vocab: a dr_model.vocab.Vocab whose items get EASE's Gram (small catalogs only: G is
    dense V x V on the driver), or None.
    """
    from dr_model.evaluation import Peers

    pairs = training_pairs(samples).cache()
    try:
        longest = int(np.diff(users.input_offsets).max(initial=0))
        top, count = popularity(pairs, k + longest)
        row = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(users.input_offsets))
        cf = to_topk(item_cf(spark, pairs, pd.DataFrame({"row": row, "item_id": users.input_items}), k), len(users), k)
        G = None
        if gram_vocab is not None:
            v = gram_vocab
            ids = spark.createDataFrame(pd.DataFrame({"item_id": v.ids, "idx": np.arange(v.size)}))
            (i, j), c = gram(pairs, ids)
            G = np.zeros((v.size, v.size))
            G[i, j] = c
    finally:
        pairs.unpersist()
    return Peers(top, count, cf, G)


def in_model_indices(peers: Any, vocab: Any) -> Any:
    """Peers in raw ids -> the same in the model's indices (popular items outside the model dropped, -1 kept)."""
    from dr_model.evaluation import Peers

    top = vocab.index(peers.popular)
    keep = top >= 0
    return Peers(top[keep], peers.popular_count[keep], vocab.index(peers.item_cf), peers.gram)


def to_topk(rows: pd.DataFrame, n_rows: int, k: int) -> np.ndarray:
    """(row, item_id, rank) rows -> raw ids [n_rows, k] (-1 pad)."""
    out = np.full((n_rows, k), -1, dtype=np.int64)
    out[rows["row"].to_numpy(np.int64), rows["rank"].to_numpy(np.int64) - 1] = rows["item_id"].to_numpy(np.int64)
    return out


__all__ = ["training_pairs", "item_counts", "popularity", "item_cf", "gram", "spark_peers", "in_model_indices", "to_topk"]
