"""The retrieval beam of a trained run, chosen on its validation users (dr_model.beam_choice's rule).

The run's serving bundle (jobs/serving.py: the user towers, fp16 item vectors and the path index,
memory-mapped) is built here, once, and `dr candidates` reuses it, so the beam is chosen on exactly
what serves: the distinct items on the validation users' paths and their reranked recall come from
the bundle, brute force's recall from the run's model (its item rows bounded by model.item_rows,
scored in chunks). Both run in one Spark task (as `dr evaluate`'s model half does): the bundle's
maps, the model read from the checkpoint and the validation users' candidates live in an executor;
the driver sends the validation users (a bounded set) and gets the metrics back.
"""
from __future__ import annotations

from typing import Any, Callable

from dr_model.config import DRConfig

from . import runs
from .tables import Warehouse


def beam_task(wh: Warehouse, cfg: DRConfig, run: runs.RunRecord, valid: Any, budget: int) -> dict[str, Any]:
    """Inside one Spark task: build (or open) the run's serving bundle and pick the beam -> {metrics, log lines}."""
    from dr_model.beam_choice import distinct_on_paths, pick_beam
    from dr_model.evaluation import validation_recalls
    from dr_model.metrics import per_user_prf
    from dr_model.model import DRModel
    from dr_model.serving import ServingBundle
    from dr_model.vocab import Vocab
    from ray_trainers.checkpoint import load_checkpoint
    from spark_udfs.beam_udf import set_task_threads

    from .serving import ensure_bundle

    set_task_threads()
    lines: list[str] = []
    bundle = ServingBundle.open(ensure_bundle(None, wh, run, log=lines.append))
    seq, _ = bundle.seq(valid.hist)
    seen = valid.input_pairs(bundle.model_vocab)     # the model's items keep their indices in the catalog
    truth = (valid.truth_offsets, valid.truth_items)
    k, target = cfg.search.top_n, cfg.search.recall_target      # recall at the depth `dr candidates` serves
    reference: Any = 0.0
    if target > 0:
        ck = load_checkpoint(run.checkpoint, run.table_versions["item_paths"])
        model = DRModel(cfg.model, len(ck.item_ids))
        model.load_state_dict(ck.model_state)
        reference = validation_recalls(model.eval(), Vocab(ck.item_ids), valid, k)
        del model, ck
    choice = pick_beam(lambda b: float(distinct_on_paths(bundle.towers.beam(seq, b).numpy(), bundle.index).mean()),
                       lambda b: per_user_prf(bundle.retrieve(valid.hist, b, k, exclude=seen)[0], *truth, k)[1],
                       reference, budget, min(4096, cfg.model.num_paths), target, cfg.search.recall_confidence)
    lines.append(choice.line(budget, bundle.model_vocab.size))
    return {"metrics": {**choice.metrics(), "budget": budget}, "lines": lines}


def choose_retrieval_beam(spark: Any, wh: Warehouse, cfg: DRConfig, run_id: str, est: Any, item_paths_version: int,
                          valid: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The run's metrics for its beam (retrieval_beam, budget, items per validation user, the recalls behind the
    choice) for a final E-step `est` (num_items, checkpoint_path) trained against item_paths_version."""
    from .path_index import build_path_index, find_path_index

    budget = cfg.search.budget(est.num_items, cfg.eval.k)
    if valid is None or len(valid) == 0:
        log(f"no validation users: retrieval beam {cfg.search.beam} (search.beam)")
        return {"retrieval_beam": cfg.search.beam, "budget": budget}
    if find_path_index(wh, item_paths_version) is None:         # a Spark job: the driver's part of the bundle
        build_path_index(spark, wh, item_paths_version, run_id, log=log)
    run = runs.RunRecord(run_id, "train", "running", runs.now(), cfg.hash(), {"item_paths": item_paths_version},
                         est.checkpoint_path)
    sc = spark.sparkContext
    args = sc.broadcast((wh, cfg, run, valid, budget))
    try:
        got = sc.parallelize([0], 1).map(lambda _: beam_task(*args.value)).collect()[0]
    finally:
        args.destroy()
    for line in got["lines"]:
        log(line)
    return got["metrics"]


__all__ = ["beam_task", "choose_retrieval_beam"]
