"""Initial item_paths from the round-0 reranker's item embeddings, on Spark (dr_model.init_paths).

The driver fits the clustering tree on the embeddings of at most init_paths.SAMPLE_MAX items,
read from the round's checkpoint memory-mapped (only the sampled rows are touched); Spark tasks
then assign every item, a chunk of model indices at a time, computing the chunk's embeddings
from the checkpoint they open themselves (spark_udfs.model_source): no catalog x dim array
exists anywhere, and nothing V-sized passes through the driver.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

from dr_model.config import DRConfig

from .tables import CommitMeta, Warehouse

CHUNK = 1 << 16             # items a task embeds and assigns at once


def embedding_item_paths(spark: Any, wh: Warehouse, cfg: DRConfig, checkpoint: str, run_id: str, job: str,
                         log: Callable[[str], None], chunk: int = CHUNK) -> int:
    """item_paths (round 0 of `job`) from the reranker item embeddings of an E-step checkpoint -> the committed version."""
    import torch
    from pyspark.sql import functions as F

    from dr_model.init_paths import fit_paths_tree, sample_rows
    from dr_model.reranker import reranker_from_state
    from dr_model.state_file import open_state
    from spark_udfs.init_paths_udf import init_path_batches
    from spark_udfs.model_source import ModelSource
    from spark_udfs.mstep_udf import ITEM_PATHS_DDL

    t0 = time.perf_counter()
    src = ModelSource.from_checkpoint(checkpoint, cfg.model)
    mc, state = cfg.model, open_state(src.state_file)
    V = int(state["item_ids"].shape[0])
    rows = sample_rows(V, cfg.train.seed)
    with torch.no_grad():
        sample = reranker_from_state(state["model"], mc, V, assign=True).item_emb(torch.from_numpy(rows)).numpy()
    target = cfg.search.target_path_size(V, cfg.eval.k)
    levels = fit_paths_tree(sample, V, mc.K, mc.D, mc.J, target, cfg.train.seed)
    del state, sample
    log(f"initial paths: tree {'x'.join(str(lv.centroids.shape[1]) for lv in levels)} fitted on {len(rows)} of "
        f"{V} items [{time.perf_counter() - t0:.1f}s]")
    sc = spark.sparkContext
    tree = sc.broadcast(levels)     # K^D centroids: small whatever the catalog
    chunks = math.ceil(V / chunk)
    starts = spark.range(0, V, chunk, numPartitions=max(1, min(chunks, 4 * sc.defaultParallelism)))
    out = starts.mapInArrow(lambda it: init_path_batches(it, src, tree, V, chunk, mc.J, mc.K), ITEM_PATHS_DDL)
    meta = CommitMeta(job=job, run_id=run_id, round=0, config_hash=cfg.hash(), watermark=1)
    try:
        res = wh.write_spark("item_paths", out, meta, mode="overwrite")
    finally:
        tree.destroy()
    sizes = wh.read_spark(spark, "item_paths", res.version).groupBy("path").count()
    st = sizes.agg(F.count("*").alias("n"), F.max("count").alias("largest")).first()
    log(f"initial paths from the reranker's item embeddings: {st['n']} non-empty paths, largest {st['largest']}, "
        f"{V} items (target path size {target:.1f}), item_paths v{res.version} [{time.perf_counter() - t0:.1f}s]")
    return res.version


__all__ = ["embedding_item_paths", "CHUNK"]
