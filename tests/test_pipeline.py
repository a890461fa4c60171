"""The nightly pipeline end to end on MovieLens-100K: real Spark, real Ray Train, real Delta tables.

train -> candidates -> evaluate; idempotent re-runs; a run that fails half-way resumes at its
last committed round and leaves committed versions untouched.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dr_model.config import DRConfig
from jobs import evaluate as evaluate_job
from jobs import runs
from jobs.candidates import run_candidates
from jobs.datasets import movielens
from jobs.evaluate import run_evaluate
from jobs.train import committed_round, run_train
from ray_trainers.config import RayConfig



class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def ml100k(spark, tmp_path_factory):
    from jobs.tables import Warehouse

    wh = Warehouse(tmp_path_factory.mktemp("pipeline") / "warehouse")
    movielens(spark, wh, "ml-100k")
    return wh


def _cfg() -> DRConfig:
    # the defaults, as on every dataset (the split's held-out sizes adapt to ML-100K's 897 eligible users)
    return DRConfig()


def test_train_candidates_evaluate_and_idempotent_reruns(spark, ray_local, ml100k, monkeypatch):
    wh, cfg = ml100k, _cfg()
    ray_cfg = RayConfig(num_workers=0)          # in-process Ray Train loop; real workers: test_ray_estep
    res = run_train(spark, wh, cfg, ray_cfg, "night-1", log=lambda m: None)
    assert not res.skipped
    tv = res.table_versions
    # the checkpoint was trained against exactly the item_paths version the run recorded
    meta = json.loads((Path(res.checkpoint) / "meta.json").read_text())
    assert meta["item_paths_version"] == tv["item_paths"]
    assert [r["round"] for r in res.metrics["rounds"]] == [0, 1, 2, 3]
    assert res.metrics["retrieval_beam"] >= 1 and res.metrics["alpha"] > 0
    assert res.metrics["items_scored_per_validation_user"] <= res.metrics["budget"]
    assert runs.latest(wh, "train", "night-1").status == "succeeded"

    # re-running a finished run changes nothing
    before = {t: wh.version(t) for t in ("item_paths", "path_scores", "samples_train", "path_index")}
    again = run_train(spark, wh, cfg, ray_cfg, "night-1", log=lambda m: None)
    assert again.skipped and again.table_versions == tv
    assert {t: wh.version(t) for t in before} == before

    cand = run_candidates(spark, wh, top_n=20, log=lambda m: None)
    assert cand.rows > 0 and not cand.skipped
    c = wh.read_arrow("candidates", cand.version).to_pandas()
    assert c.groupby("user_id").size().max() <= 20
    assert set(c["run_id"]) == {"night-1"}
    # history items are never recommended back
    inter = wh.read_arrow("interactions").to_pandas()
    u = int(c["user_id"].iloc[0])
    assert not set(c[c.user_id == u].item_id) & set(inter[inter.user_id == u].sort_values("ts").item_id.tail(cfg.model.seq_len))
    assert run_candidates(spark, wh, top_n=20, log=lambda m: None).skipped
    assert wh.version("candidates") == cand.version

    # cold items: two catalog items without interactions, one with a known category
    import pandas as pd

    from jobs.cold_items import run_cold_items
    from jobs.tables import CommitMeta

    new = pd.DataFrame({"item_id": [900001, 900002], "title": ["new comedy", "mystery box"],
                        "category": ["Comedy", None]})
    wh.merge("items", new, CommitMeta("test", "cold-catalog"))
    cold = run_cold_items(spark, wh, log=lambda m: None)
    ip = wh.read_arrow("item_paths", tv["item_paths"]).to_pandas()
    catalog = set(wh.read_arrow("items").column("item_id").to_pylist())
    assert cold.cold_items == len(catalog - set(ip.item_id)) == cold.by_category + cold.by_least_loaded
    cp = wh.read_arrow("cold_item_paths").to_pandas()
    method = cp.groupby("item_id").method.first()
    assert (method[900001], method[900002]) == ("category", "least_loaded")
    assert cp.groupby("item_id").path.nunique().min() == cfg.model.J          # J distinct paths each
    # a Comedy cold item lands on Comedy's paths (chosen by the size penalty: tests/test_cold_items.py)
    cats = wh.read_arrow("items").to_pandas().set_index("item_id").category
    comedy = ip[ip.item_id.map(cats) == "Comedy"]
    assert set(cp[cp.item_id == 900001].path) <= set(comedy.path)
    assert int(cp[cp.item_id == 900001].neighbor_item_id.iloc[0]) in set(comedy.item_id)
    cv = wh.read_arrow("cold_item_vectors").to_pandas()
    assert set(cv.item_id) == set(cp.item_id) and set(cv.item_paths_version) == {tv["item_paths"]}
    assert {len(e) for e in cv.embedding} == {cfg.model.rerank_dim}
    idx = wh.read_arrow("path_index", cold.versions["path_index"]).to_pandas()
    assert {900001, 900002} <= set(idx.item_id) and len(idx) == len(ip) + len(cp)

    def not_on_the_driver(*args, **kwargs):
        raise AssertionError("dr evaluate loaded the model on the driver")

    # the model's half runs in a Spark task's Python worker, where jobs.evaluate is imported afresh
    monkeypatch.setattr(evaluate_job, "load_run_model", not_on_the_driver)
    logs: list[str] = []
    report = run_evaluate(spark, wh, log=logs.append)
    # the catalog size that gates EASE and the ANN is items, not item_paths rows (J an item)
    assert any(f" {report['catalog_size']} items, beam" in line for line in logs), logs
    m = report["methods"]
    assert set(m) == {"dr", "brute_force", "hnsw", "ivf", "popularity", "item_cf", "ease"}
    assert m["brute_force"]["recall"] > m["popularity"]["recall"]
    # 179 test users on ML-100K: DR/brute force at the budget (4 % of the catalog) measured 0.95
    # through this pipeline and 0.98-1.05 in one process (BENCHMARKS.md); the bound catches a
    # broken structure, the targets are checked by the benchmarks
    assert m["dr"]["recall"] >= 0.75 * m["brute_force"]["recall"]
    assert max(b["recall"] for b in report["dr_recall_by_beam"].values()) >= 0.95 * m["brute_force"]["recall"]
    assert report["beam"] == res.metrics["retrieval_beam"]
    assert report["items_scored_per_user"] <= 1.2 * report["budget"] < 0.1 * report["catalog_size"]
    assert report["ease"]["lambda"] > 0 and len(report["objective_per_round"]) == 3
    assert all(Path(f).exists() for f in report["report_files"])
    assert "<svg" in Path(report["report_files"][1]).read_text()


def test_failed_run_resumes_at_last_committed_round(spark, ray_local, ml100k):
    wh, cfg = ml100k, _cfg()
    ray_cfg = RayConfig(num_workers=0)

    def crash_in_round_2(msg: str) -> None:
        if msg.startswith("round 2/3: E-step"):
            raise Crash("killed during round 2")

    with pytest.raises(Crash):
        run_train(spark, wh, cfg, ray_cfg, "night-2", log=crash_in_round_2)
    assert runs.latest(wh, "train", "night-2").status == "failed"
    r1 = committed_round(wh, "night-2", "mstep", 1)
    assert r1 is not None and committed_round(wh, "night-2", "mstep", 2) is None
    ip_before = wh.version("item_paths")

    logs: list[str] = []
    res = run_train(spark, wh, cfg, ray_cfg, "night-2", log=logs.append)
    assert any("round 1/3: already committed" in line for line in logs)
    assert not any(line.startswith("round 0: the reranker") for line in logs)   # not retrained
    assert committed_round(wh, "night-2", "mstep", 1) == r1            # round 1 was not redone
    assert res.table_versions["item_paths"] > ip_before
    assert runs.latest(wh, "train", "night-2").status == "succeeded"
