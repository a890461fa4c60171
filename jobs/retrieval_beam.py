"""The retrieval beam of a trained run, chosen on its validation users (dr_model.beam_choice's rule).

The run's serving bundle (jobs/serving.py: the user towers, fp16 item vectors and the path index,
memory-mapped) is built here, once, and `dr candidates` reuses it, so the beam is chosen on exactly
what serves: the distinct items on the validation users' paths and their reranked recall come from
the bundle, brute force's recall from the run's model (its item rows bounded by model.item_rows,
scored in chunks). The driver holds the validation users (a bounded set), one block of their
(user, item) pairs at a time and the model; nothing catalog-sized but the bundle's maps.
"""
from __future__ import annotations

from typing import Any, Callable

from dr_model.config import DRConfig

from . import runs
from .tables import Warehouse


def choose_retrieval_beam(spark: Any, wh: Warehouse, cfg: DRConfig, run_id: str, est: Any, item_paths_version: int,
                          valid: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The run's metrics for its beam (retrieval_beam, budget, items per validation user, the recalls behind the
    choice) for a final E-step `est` (model_state, item_ids, checkpoint_path) trained against item_paths_version,
    whose path_index is built."""
    from dr_model.beam_choice import distinct_on_paths, pick_beam
    from dr_model.evaluation import validation_recalls
    from dr_model.metrics import per_user_prf
    from dr_model.model import DRModel
    from dr_model.serving import ServingBundle
    from dr_model.vocab import Vocab

    from .serving import ensure_bundle

    V, k = len(est.item_ids), cfg.search.top_n      # recall at the depth `dr candidates` serves
    budget = cfg.search.budget(V, cfg.eval.k)
    if valid is None or len(valid) == 0:
        log(f"no validation users: retrieval beam {cfg.search.beam} (search.beam)")
        return {"retrieval_beam": cfg.search.beam, "budget": budget}
    run = runs.RunRecord(run_id, "train", "running", runs.now(), cfg.hash(), {"item_paths": item_paths_version},
                         est.checkpoint_path)
    bundle = ServingBundle.open(ensure_bundle(spark, wh, run, log=log))
    seq, _ = bundle.seq(valid.hist)
    seen = valid.input_pairs(bundle.model_vocab)     # the model's items keep their indices in the catalog
    truth = (valid.truth_offsets, valid.truth_items)
    target = cfg.search.recall_target
    reference: Any = 0.0
    if target > 0:
        model = DRModel(cfg.model, V)
        model.load_state_dict(est.model_state)
        reference = validation_recalls(model.eval(), Vocab(est.item_ids), valid, k)
        del model
    choice = pick_beam(lambda b: float(distinct_on_paths(bundle.towers.beam(seq, b).numpy(), bundle.index).mean()),
                       lambda b: per_user_prf(bundle.retrieve(valid.hist, b, k, exclude=seen)[0], *truth, k)[1],
                       reference, budget, min(4096, cfg.model.num_paths), target, cfg.search.recall_confidence)
    log(choice.line(budget, V))
    return {**choice.metrics(), "budget": budget}


__all__ = ["choose_retrieval_beam"]
