"""`dr plan`: the cost model's arithmetic, its rates file and its command line; no Spark."""
from __future__ import annotations

import json
import re

import pytest

from dr_model.config import DRConfig
from jobs.cli import main
from jobs.plan import NIGHT_S, Workload, backfill_cold_items, cores_for, load_rates, predict, scaled, stages

W = Workload(items=1_000_000, users=100_000, interactions=10_000_000, new_interactions=300_000)


def test_every_rate_has_a_unit_a_source_and_a_date():
    for key, r in load_rates().items():
        assert r.value > 0 and r.unit and r.source, key
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.date), (key, r.date)


def test_work_follows_the_schedule_and_the_catalog():
    cfg = DRConfig()
    full = {s.name: s for s in stages(W, cfg, "full")}
    t = cfg.train
    assert full["estep"].work == W.interactions * (t.joint_epochs + (t.em_rounds + 1) * t.structure_epochs)
    assert full["mstep"].work == W.items * cfg.mstep.rounds * t.em_rounds
    assert full["candidates"].work == W.users * cfg.search.budget(W.items, cfg.eval.k)
    inc = {s.name: s for s in stages(W, cfg, "incremental")}
    assert inc["estep"].work == W.new_interactions * 2 * cfg.incremental.epochs
    assert inc["ingest"].work == full["ingest"].work == W.new_interactions


def test_more_cores_shorten_only_the_work():
    rates, cfg = load_rates(), DRConfig()
    one, four = predict(W, cfg, 1, rates), predict(W, cfg, 4, rates)
    fixed = sum(s.starts for s in stages(W, cfg)) * rates["fixed"].value
    assert (one["total"] - fixed) == pytest.approx(4 * (four["total"] - fixed))
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))


def test_cores_for_a_night_fit_it_and_one_fewer_does_not():
    rates, cfg = load_rates(), DRConfig()
    big = scaled(W, 100_000_000)
    assert big.interactions == 1_000_000_000 and big.users == 10_000_000
    for mode in ("full", "incremental"):
        c = cores_for(big, cfg, rates, mode=mode)
        assert predict(big, cfg, c, rates, mode)["total"] <= NIGHT_S
        if c > 1:
            assert predict(big, cfg, c - 1, rates, mode)["total"] > NIGHT_S


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="items must be an integer >= 1"):
        Workload(0, 1, 1, 1)
    with pytest.raises(ValueError, match="cores must be >= 1"):
        predict(W, DRConfig(), 0, load_rates())


def test_the_command_prints_one_json_object(capsys, tmp_path):
    assert main(["plan", "--items", "1000000", "--users", "100000", "--interactions", "10000000",
                 "--cores", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["full_stages_s"]) >= {"split", "estep", "scores", "mstep", "candidates"}
    assert out["full_total_s"] == pytest.approx(sum(out["full_stages_s"].values()), rel=1e-3)
    assert set(out["cores_for_night"]) == {"1e8", "1e9"}
    assert out["rates"]["estep_samples"]["date"]
    assert out["backfill_cold_items_s"] == pytest.approx(backfill_cold_items(10 ** 6, 8, load_rates()), abs=0.1)
    bad = tmp_path / "rates.toml"
    bad.write_text('[fixed]\nvalue = 1\nunit = "s"\nsource = "x"\ndate = "2026-12-01"\n')
    assert main(["plan", "--items", "10", "--users", "10", "--interactions", "10", "--rates", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rates file" in err and "missing" in err


def test_the_cold_items_backfill_follows_the_catalog_and_is_optional():
    rates = load_rates()
    fixed = 3 * rates["fixed"].value
    small, big = backfill_cold_items(10 ** 6, 2, rates), backfill_cold_items(10 ** 7, 2, rates)
    assert big - fixed == pytest.approx(10 * (small - fixed))
    assert backfill_cold_items(10 ** 6, 2, {k: r for k, r in rates.items() if k != "cold_items_catalog"}) is None


def test_evaluate_above_the_ann_limit_builds_no_index():
    rates, cfg = load_rates(), DRConfig()
    big = Workload(cfg.eval.ann_max_items + 1, 1000, 10_000, 1000)
    small = Workload(cfg.eval.ann_max_items, 1000, 10_000, 1000)
    assert {s.name: s.rate for s in stages(big, cfg, rates=rates)}["evaluate"] == "eval_items"
    assert {s.name: s.rate for s in stages(small, cfg, rates=rates)}["evaluate"] == "hnsw_build_items"
    without = {k: r for k, r in rates.items() if k != "eval_items"}     # an older rates file: the HNSW rate
    assert {s.name: s.rate for s in stages(big, cfg, rates=without)}["evaluate"] == "hnsw_build_items"
