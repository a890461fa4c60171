"""Initial paths inside Spark: one task fits the clustering tree on a sample; then `mapInArrow` tasks assign
chunks of model indices with the broadcast tree.

Input rows are chunk starts (`spark.range(0, V, chunk)`); a task computes each chunk's item
embeddings from the model's checkpoint (a ModelSource, opened once per Python worker) and its J paths with
dr_model.init_paths.assign_paths: memory O(chunk x dim), whatever the catalog.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .beam_udf import set_task_threads
from .model_source import ModelSource, load_model
from .mstep_udf import ITEM_PATHS_SCHEMA


def fit_tree_task(src: ModelSource, cfg: Any, sample_max: int) -> tuple[list[Any], int, int, float]:
    """Inside a Spark task: the clustering tree fitted on the reranker embeddings of sample_rows, read from the
    checkpoint memory-mapped -> (tree levels, V, items sampled, target path size). cfg: a DRConfig."""
    import torch

    from dr_model.init_paths import fit_paths_tree, sample_rows
    from dr_model.reranker import reranker_from_state
    from dr_model.state_file import open_state

    set_task_threads()
    mc, state = cfg.model, open_state(src.state_file)
    V = int(state["item_ids"].shape[0])
    rows = sample_rows(V, cfg.train.seed, sample_max)
    with torch.no_grad():
        sample = reranker_from_state(state["model"], mc, V, assign=True).item_emb(torch.from_numpy(rows)).numpy()
    target = cfg.search.target_path_size(V, cfg.eval.k)
    return fit_paths_tree(sample, V, mc.K, mc.D, mc.J, target, cfg.train.seed), V, len(rows), target


def init_path_batches(it: Iterator[pa.RecordBatch], src: ModelSource, tree: Any, num_items: int, chunk: int,
                      J: int, K: int) -> Iterator[pa.RecordBatch]:
    """Chunk starts (column `id`) -> item_paths rows (item_id, slot, path, score null) of those chunks' items."""
    import torch

    from dr_model.init_paths import assign_paths

    set_task_threads()
    for batch in it:
        model, vocab = load_model(src)
        for lo in batch.column("id").to_numpy().tolist():
            hi = min(lo + chunk, num_items)
            with torch.no_grad():
                emb = model.reranker.item_vectors(lo, hi).numpy()
            paths = assign_paths(emb, tree.value, J, K)                       # [n, J]
            n = hi - lo
            yield pa.RecordBatch.from_arrays(
                [pa.array(np.repeat(vocab.ids[lo:hi], J)), pa.array(np.tile(np.arange(J, dtype=np.int32), n)),
                 pa.array(paths.ravel()), pa.nulls(n * J, pa.float64())], schema=ITEM_PATHS_SCHEMA)


__all__ = ["fit_tree_task", "init_path_batches"]
