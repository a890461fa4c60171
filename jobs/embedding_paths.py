"""Initial item_paths from the round-0 reranker's item embeddings, on Spark (dr_model.init_paths).

One Spark task fits the clustering tree on the embeddings of at most init_paths.SAMPLE_MAX items,
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
    from pyspark.sql import functions as F

    from dr_model import init_paths
    from spark_udfs.init_paths_udf import fit_tree_task, init_path_batches
    from spark_udfs.model_source import ModelSource
    from spark_udfs.mstep_udf import ITEM_PATHS_DDL

    t0 = time.perf_counter()
    mc, sc = cfg.model, spark.sparkContext
    src, sample_max = ModelSource.from_checkpoint(checkpoint, cfg.model), init_paths.SAMPLE_MAX
    # the fit's sample (up to SAMPLE_MAX x dim floats, the mapped item rows it reads, k-means' temporaries)
    # lives in one task, as the retrieval beam's choice does: the driver gets the tree back
    levels, V, n, target = sc.parallelize([0], 1).map(lambda _: fit_tree_task(src, cfg, sample_max)).collect()[0]
    log(f"initial paths: tree {'x'.join(str(lv.centroids.shape[1]) for lv in levels)} fitted on {n} of "
        f"{V} items in a Spark task [{time.perf_counter() - t0:.1f}s]")
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
