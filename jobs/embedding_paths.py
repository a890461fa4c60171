"""Initial item_paths from the round-0 reranker's item embeddings, on Spark (dr_model.init_paths).

The driver fits the clustering tree on the embeddings of at most init_paths.SAMPLE_MAX items
(its model holds at most model.item_rows rows); Spark tasks then assign every item, a chunk of
model indices at a time, computing the chunk's embeddings from the broadcast model: no
catalog x dim array exists anywhere. The driver still holds the vocabulary's ids (8 bytes an
item), as the scores job's broadcast does.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from dr_model.config import DRConfig

from .tables import CommitMeta, Warehouse

CHUNK = 1 << 16             # items a task embeds and assigns at once


def embedding_item_paths(spark: Any, wh: Warehouse, cfg: DRConfig, model_state: dict, item_ids: np.ndarray,
                         run_id: str, job: str, log: Callable[[str], None], chunk: int = CHUNK) -> int:
    """item_paths (round 0 of `job`) from the model's reranker item embeddings -> the committed version."""
    import torch
    from pyspark.sql import functions as F

    from dr_model.init_paths import fit_paths_tree, sample_rows
    from dr_model.model import DRModel
    from spark_udfs.beam_udf import ModelPayload
    from spark_udfs.init_paths_udf import init_path_batches
    from spark_udfs.mstep_udf import ITEM_PATHS_DDL

    t0 = time.perf_counter()
    mc, V = cfg.model, len(item_ids)
    model = DRModel(mc, V)
    model.load_state_dict(model_state)
    rows = sample_rows(V, cfg.train.seed)
    with torch.no_grad():
        sample = model.reranker.item_emb(torch.from_numpy(rows)).numpy()
    target = cfg.search.target_path_size(V, cfg.eval.k)
    levels = fit_paths_tree(sample, V, mc.K, mc.D, mc.J, target, cfg.train.seed)
    del model, sample
    log(f"initial paths: tree {'x'.join(str(lv.centroids.shape[1]) for lv in levels)} fitted on {len(rows)} of "
        f"{V} items [{time.perf_counter() - t0:.1f}s]")
    payload = ModelPayload.from_state(model_state, item_ids, mc)
    sc = spark.sparkContext
    bc, tree, key = sc.broadcast(payload.data), sc.broadcast(levels), payload.key
    chunks = math.ceil(V / chunk)
    starts = spark.range(0, V, chunk, numPartitions=max(1, min(chunks, 4 * sc.defaultParallelism)))
    out = starts.mapInArrow(lambda it: init_path_batches(it, key, bc, tree, V, chunk, mc.J, mc.K), ITEM_PATHS_DDL)
    meta = CommitMeta(job=job, run_id=run_id, round=0, config_hash=cfg.hash(), watermark=1)
    try:
        res = wh.write_spark("item_paths", out, meta, mode="overwrite")
    finally:
        bc.destroy()                # the model, held by the driver's and executors' block managers
        tree.destroy()
    sizes = wh.read_spark(spark, "item_paths", res.version).groupBy("path").count()
    st = sizes.agg(F.count("*").alias("n"), F.max("count").alias("largest")).first()
    log(f"initial paths from the reranker's item embeddings: {st['n']} non-empty paths, largest {st['largest']}, "
        f"{V} items (target path size {target:.1f}), item_paths v{res.version} [{time.perf_counter() - t0:.1f}s]")
    return res.version


__all__ = ["embedding_item_paths", "CHUNK"]
