"""The evaluation report: its HTML charts, and its folder surviving a full vacuum of every table; no Spark."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable

from dr_model.evaluation import format_report
from jobs import runs
from jobs.evaluate import render_html, report_dir, write_report
from jobs.tables import TABLES, CommitMeta, Warehouse
from ray_trainers.checkpoint import run_dir as checkpoint_dir

SVG = "{http://www.w3.org/2000/svg}"


def _report() -> dict:
    """A report as evaluate_users + run_evaluate shape it, with made-up numbers."""
    prf = lambda r: {"precision": r / 2, "recall": r, "f1": r / 1.5}    # noqa: E731
    return {
        "k": 10, "users": 100, "catalog_size": 5000, "beam": 10, "items_scored_per_user": 210.0,
        "fraction_of_catalog_scored": 0.042, "dr_recall_over_brute_force": 0.98, "run_id": "r1", "threads": 2,
        "methods": {"dr": prf(0.196), "brute_force": prf(0.2), "hnsw": prf(0.197), "ivf": prf(0.199),
                    "popularity": prf(0.1), "item_cf": prf(0.15)},
        "users_per_s": {"dr": 900.0, "brute_force": 300.0},
        "dr_recall_by_beam": {"5": {"recall": 0.18, "items_scored_per_user": 105.0, "users_per_s": 1500.0},
                              "10": {"recall": 0.196, "items_scored_per_user": 210.0, "users_per_s": 900.0},
                              "25": {"recall": 0.2, "items_scored_per_user": 520.0, "users_per_s": 500.0}},
        "ann": {"threads": 2, "target_recall": 0.196,
                "hnsw": {"ef": 64, "reached_target": True, "build_s": 0.5, "users_per_s": 2000.0,
                         "items_scored_per_user": 800.0, "m": 32},
                "ivf": {"nprobe": 256, "reached_target": False, "build_s": 0.2, "users_per_s": 400.0,
                        "items_scored_per_user": 3000.0, "nlist": 282}},
        "ann_sweep": {"hnsw": [{"ef": e, "recall": r, "items_scored_per_user": x, "users_per_s": 1000.0}
                               for e, r, x in [(16, 0.15, 300.0), (64, 0.197, 800.0), (256, 0.2, 2400.0)]],
                      "ivf": [{"nprobe": n, "recall": r, "items_scored_per_user": x, "users_per_s": 500.0}
                              for n, r, x in [(1, 0.08, 18.0), (16, 0.17, 290.0), (256, 0.19, 3000.0), (282, 0.2, 5000.0)]]},
        "path_sizes": {"nonempty_paths": 900, "num_paths": 1000, "max": 40, "mean": 16.7,
                       "histogram": {"<=8": 100, "<=16": 500, "<=32": 290, "<=64": 10}},
        "objective_per_round": [{"round": r, "objective": o, "alpha": 0.1, "path_size": 16.0, "max_path_size": 40}
                                for r, o in [(1, -900.0), (2, -850.0), (3, -840.0)]],
    }


def test_html_report_charts_recall_against_items_scored_for_dr_hnsw_and_ivf() -> None:
    page = render_html(_report())
    assert "<script" not in page and "://" not in page.replace("http://www.w3.org/2000/svg", "")   # opens offline
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg .*?</svg>", page, flags=re.S)]    # each chart is well-formed SVG
    chart = next(s for s in svgs if s.find(f"{SVG}g[@data-series]") is not None)
    series = {g.get("data-series"): g for g in chart.iter(f"{SVG}g") if g.get("data-series")}
    assert set(series) == {"dr", "hnsw", "ivf"}
    npts = {name: len(g.find(f"{SVG}polyline").get("points").split()) for name, g in series.items()}
    assert npts == {"dr": 3, "hnsw": 3, "ivf": 4}
    # log x: items scored 18 -> 5000 span the 10..10^4 decades, one tick label each
    ticks = {t.text for t in chart.iter(f"{SVG}text")}
    assert {"10", "100", "1000", "10000"} <= ticks
    # the path-size histogram and the objective per EM round are still there
    assert "Paths by number of items" in page and "objective per EM round" in page
    assert "ef 64" in page and "nprobe 256 (largest; below the target)" in page
    text = format_report(_report())     # the console report names the tuned settings and the speeds
    assert "HNSW at ef=64 (reaches min(DR, brute force) recall 0.1960)" in text and "IVF at nprobe=256 (largest setting" in text


def test_reports_and_checkpoints_survive_a_full_vacuum_of_every_table(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "warehouse")
    for status in ("started", "succeeded"):
        runs.record(wh, runs.RunRecord("r1", "train", status, runs.now()))
    items = pa.table({"item_id": pa.array([1, 2], pa.int64()), "title": ["a", "b"], "category": ["x", "y"]})
    wh.write_arrow("items", items, CommitMeta(job="test", run_id="r1"))
    wh.write_arrow("items", items, CommitMeta(job="test", run_id="r2"), mode="overwrite")    # a file to vacuum
    files = [Path(f) for f in write_report(wh, "r1", _report())]
    assert all(f.parent == report_dir(wh, "r1") for f in files)
    ckpt = Path(checkpoint_dir(wh.root, "r1")) / "estep-round-0000" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    stray = Path(wh.uri("runs")) / "r1" / "evaluation.json"       # where reports used to go
    stray.parent.mkdir()
    stray.write_text("{}")

    vacuumed = {}
    for name in TABLES:
        if wh.exists(name):
            vacuumed[name] = DeltaTable(wh.uri(name)).vacuum(retention_hours=0, enforce_retention_duration=False,
                                                            dry_run=False, full=True)
    assert set(vacuumed) == {"runs", "items"} and vacuumed["items"]    # the vacuum did delete files
    assert not stray.exists()                   # the reason reports moved: a table's full vacuum takes it
    assert all(f.exists() for f in files) and ckpt.exists()
    assert wh.read_arrow("items").num_rows == 2 and len(runs.history(wh)) == 2
