"""`dr evaluate`: the paper's protocol on a train run's test users, with a report in the run's folder.

It reads exactly what the run recorded in `runs` (samples_train / eval_users / item_paths
versions, the checkpoint trained against that item_paths version, the retrieval beam chosen
for the budget) and reports P/R/F@k for DR, brute force, popularity, item-CF and EASE (its
lambda chosen on the validation users), items scored per user, DR recall against beam size,
the path-size histogram and the M-step objective per EM round.
"""
from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dr_model.config import DRConfig
from dr_model.evaluation import EvalUsers, evaluate_users
from dr_model.index import PathIndex
from dr_model.model import DRModel

from . import runs
from .tables import Warehouse


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def load_run_model(wh: Warehouse, run: runs.RunRecord) -> tuple[DRModel, np.ndarray, np.ndarray, DRConfig]:
    """(model, item ids [V], paths [V, J], config) of a succeeded train run, paired by item_paths version."""
    from ray_trainers.checkpoint import load_checkpoint
    from ray_trainers.estep import load_item_paths

    ip_v = run.table_versions["item_paths"]
    ck = load_checkpoint(run.checkpoint, ip_v)        # refuses a checkpoint trained against other paths
    cfg = DRConfig.from_dict(ck.meta.config)
    item_ids, assign = load_item_paths(wh, ip_v, cfg.model.J)
    if not np.array_equal(item_ids, ck.item_ids):
        raise ValueError(f"checkpoint {run.checkpoint} and item_paths v{ip_v} disagree on the item set")
    model = DRModel(cfg.model, len(item_ids))
    model.load_state_dict(ck.model_state)
    model.eval()
    return model, item_ids, assign, cfg


def retrieval_beam(run: runs.RunRecord, cfg: DRConfig, overrides: list[str] | None = None) -> int:
    """The beam a train run chose for its budget, unless `--set search.beam=...` asks for another."""
    if any(o.strip().startswith("search.beam=") for o in overrides or []):
        return cfg.search.beam
    return int(run.metrics.get("retrieval_beam") or cfg.search.beam)


def run_dir(wh: Warehouse, run_id: str) -> Path:
    return Path(wh.root) / "runs" / run_id


def run_evaluate(wh: Warehouse, run_id: str | None = None, overrides: list[str] | None = None,
                 role: int = 2, log=_log) -> dict[str, Any]:
    """Evaluate `run_id` (default: the latest succeeded train run) -> report dict; writes report files."""
    from .split import load_split

    run = runs.latest(wh, "train", run_id, status="succeeded")
    if run is None:
        which = f"run {run_id!r}" if run_id else "any run"
        raise LookupError(f"no succeeded train run for {which} in {wh.root}: run `dr train` first")
    model, item_ids, assign, cfg = load_run_model(wh, run)
    index = PathIndex.build(assign)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    tv = run.table_versions
    split = load_split(wh, tv["samples_train"], tv["eval_users"])
    users, valid = EvalUsers.of(split, role), EvalUsers.of(split, 1)
    beam = retrieval_beam(run, cfg, overrides)
    log(f"run {run.run_id}: {len(users)} {'test' if role == 2 else 'validation'} users, "
        f"{len(item_ids)} items, beam {beam}")
    report = evaluate_users(model, item_ids, index, users, cfg, train=(split.train_user, split.train_target),
                            valid=valid, beam=beam)
    report["budget"] = run.metrics.get("budget")
    report["alpha_used"] = run.metrics.get("alpha")
    report["run_id"] = run.run_id
    report["table_versions"] = tv
    report["objective_per_round"] = [
        {"round": r["round"], "objective": r["mstep"][-1]["objective"], "alpha": r["mstep"][-1].get("alpha"),
         "path_size": r["mstep"][-1].get("path_size"), "max_path_size": r["mstep"][-1]["max_path_size"]}
        for r in run.metrics.get("rounds", []) if r.get("mstep")]
    out = run_dir(wh, run.run_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "evaluation.html").write_text(render_html(report))
    report["report_files"] = [str(out / "evaluation.json"), str(out / "evaluation.html")]
    log(f"report written to {out}")
    return report


def _bars(title: str, labels: list[str], values: list[float], fmt: str = "{:.4f}") -> str:
    """A horizontal SVG bar chart (no plotting dependency needed for a report)."""
    w, row, pad = 520, 22, 150
    top = max(values) if values and max(values) > 0 else 1.0
    rows = []
    for i, (lab, v) in enumerate(zip(labels, values)):
        bw = (w - pad - 70) * (v / top)
        y = 28 + i * row
        rows.append(f'<text x="4" y="{y + 14}" font-size="12">{html.escape(lab)}</text>'
                    f'<rect x="{pad}" y="{y}" width="{bw:.1f}" height="{row - 6}" fill="#4a7bd0"/>'
                    f'<text x="{pad + bw + 4:.1f}" y="{y + 14}" font-size="12">{fmt.format(v)}</text>')
    h = 36 + row * len(labels)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
            f'<text x="4" y="16" font-size="14" font-weight="bold">{html.escape(title)}</text>{"".join(rows)}</svg>')


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page with bar charts."""
    k = report["k"]
    m = report["methods"]
    charts = [
        _bars(f"Recall@{k}", list(m), [v["recall"] for v in m.values()]),
        _bars(f"F-measure@{k}", list(m), [v["f1"] for v in m.values()]),
        _bars(f"DR recall@{k} by beam size", [f"B={b} ({v['items_scored_per_user']:.0f} items)" for b, v in report["dr_recall_by_beam"].items()],
              [v["recall"] for v in report["dr_recall_by_beam"].values()]),
        _bars("Paths by number of items", list(report["path_sizes"]["histogram"]),
              [float(x) for x in report["path_sizes"]["histogram"].values()], "{:.0f}"),
    ]
    obj = report.get("objective_per_round") or []
    if obj:
        charts.append(_bars("M-step objective per EM round (shifted to >= 0)", [f"round {o['round']}" for o in obj],
                            [o["objective"] - min(x["objective"] for x in obj) for o in obj], "{:.1f}"))
    table = "".join(f"<tr><td>{html.escape(n)}</td><td>{v['precision']:.4f}</td><td>{v['recall']:.4f}</td>"
                    f"<td>{v['f1']:.4f}</td></tr>" for n, v in m.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>DR evaluation {html.escape(str(report.get('run_id')))}</title></head>"
            f"<body style='font-family:sans-serif'><h1>Deep Retrieval evaluation: run {html.escape(str(report.get('run_id')))}</h1>"
            f"<p>{report['users']} users, catalog {report['catalog_size']} items, DR scored "
            f"{report['items_scored_per_user']:.1f} items per user ({report['fraction_of_catalog_scored']:.1%}); "
            f"DR recall / brute force = {report['dr_recall_over_brute_force']:.3f}</p>"
            f"<table border='1' cellpadding='4'><tr><th>method</th><th>P@{k}</th><th>R@{k}</th><th>F@{k}</th></tr>{table}</table>"
            + "".join(f"<div>{c}</div>" for c in charts) + "</body></html>")
