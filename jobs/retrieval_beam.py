"""The retrieval beam of a trained run: the largest beam whose validation users' items scored fit the budget.

The beam search runs on the driver for the validation users only (a bounded set; the model holds
at most model.item_rows item rows); the distinct items on their beam paths are counted by a Spark
join with the run's path_index version, so no catalog-sized index is built on the driver. The
search itself is dr_model.evaluation.search_beam, the in-process trainer's.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from dr_model.config import DRConfig

from .tables import Warehouse


def choose_retrieval_beam(spark: Any, wh: Warehouse, cfg: DRConfig, est: Any, path_index_version: int, valid: Any,
                          log: Callable[[str], None]) -> dict[str, Any]:
    """{retrieval_beam, budget, items_scored_per_validation_user} for a final E-step `est` (model_state,
    item_ids) and the path_index version of its paths."""
    import pandas as pd
    import torch

    from dr_model.evaluation import search_beam
    from dr_model.model import DRModel
    from dr_model.vocab import Vocab

    V = len(est.item_ids)
    budget = cfg.search.budget(V, cfg.eval.k)
    if valid is None or len(valid) == 0:
        log(f"no validation users: retrieval beam {cfg.search.beam} (search.beam)")
        return {"retrieval_beam": cfg.search.beam, "budget": budget}
    model = DRModel(cfg.model, V)
    model.load_state_dict(est.model_state)
    model.eval()
    seq = Vocab(est.item_ids).seq(valid.hist)
    index = wh.read_spark(spark, "path_index", path_index_version).select("path", "item_id")
    n = len(valid)

    def cost(b: int) -> float:
        with torch.inference_mode():
            paths = model.beam(seq, b)[0].numpy()                       # [n, b]
        row, col = np.nonzero(paths >= 0)
        pairs = spark.createDataFrame(pd.DataFrame({"user": row.astype(np.int64), "path": paths[row, col]}))
        return pairs.join(index, "path").select("user", "item_id").distinct().count() / n

    beam, items = search_beam(cost, budget, min(4096, cfg.model.num_paths))
    log(f"retrieval beam {beam}: {items:.1f} items scored per validation user (budget {budget} of {V} items)")
    return {"retrieval_beam": beam, "budget": budget, "items_scored_per_validation_user": items}


__all__ = ["choose_retrieval_beam"]
