"""`dr evaluate`: the paper's protocol on a train run's test users, with a report in <warehouse>/reports/<run_id>/.

It reads exactly what the run recorded in `runs` (samples_train / eval_users / item_paths
versions, the checkpoint trained against that item_paths version, the retrieval beam chosen
for the budget) and reports P/R/F@k for DR, brute force, the ANN peer (HNSW, IVF), popularity,
item-CF and EASE (its lambda chosen on the validation users), items scored per user, recall
against items scored (DR's beam sweep beside the ANN sweeps), the path-size histogram and the
M-step objective per EM round.
"""
from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dr_model.config import DRConfig
from dr_model.evaluation import evaluate_users
from dr_model.index import PathIndex
from dr_model.model import DRModel
from dr_model.vocab import Vocab

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


def report_dir(wh: Warehouse, run_id: str) -> Path:
    """A run's report folder: <warehouse>/reports/<run_id>, owned by no table (a table's full vacuum
    deletes every file under its root that its log does not name, so `runs/` would lose it)."""
    return Path(wh.root) / "reports" / run_id


def evaluation_task(wh: Warehouse, run: runs.RunRecord, cfg: DRConfig, users: Any, valid: Any, beam: int,
                    peers: Any) -> dict[str, Any]:
    """The report's model half (DR's beam sweep, brute force, the ANN peer, the peers' lists judged) under
    `cfg` (the run's, overrides applied), run inside one Spark task: the model, the assignment and the faiss
    indexes live there, never on the driver."""
    from spark_udfs.beam_udf import set_task_threads

    from .peers import in_model_indices

    set_task_threads()
    model, item_ids, assign, _ = load_run_model(wh, run)
    return evaluate_users(model, item_ids, PathIndex.build(assign), users, cfg, valid=valid, beam=beam,
                          peers=in_model_indices(peers, Vocab(item_ids)))


def run_evaluate(spark: Any, wh: Warehouse, run_id: str | None = None, overrides: list[str] | None = None,
                 role: int = 2, log=_log) -> dict[str, Any]:
    """Evaluate `run_id` (default: the latest succeeded train run) -> report dict; writes report files.

    The driver holds the evaluation users, the peers' top-k lists and the report: O(evaluation users).
    The classical peers run on Spark over samples_train (jobs/peers.py); the model's half runs in one
    Spark task (evaluation_task), which holds the model (item rows up to model.item_rows), the
    assignment [V, J] and, up to eval.ann_max_items, the reranker's item vectors and one faiss index at
    a time: ~V (8 d + 8 ann_hnsw_m) bytes with HNSW's graph. EASE's Gram reaches the driver only up to
    eval.ease_max_items (dense, as EASE needs).
    """
    from ray_trainers.checkpoint import check_pairing, read_meta
    from ray_trainers.estep_data import load_item_paths

    from .peers import spark_peers
    from .split import load_eval_users

    run = runs.latest(wh, "train", run_id, status="succeeded")
    if run is None:
        which = f"run {run_id!r}" if run_id else "any run"
        raise LookupError(f"no succeeded train run for {which} in {wh.root}: run `dr train` first")
    tv = run.table_versions
    meta = read_meta(run.checkpoint)
    check_pairing(meta, run.checkpoint, tv["item_paths"])    # refused here, not deep inside a Spark task
    cfg = DRConfig.from_dict(meta.config)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    V = wh.rows("item_paths", tv["item_paths"]) // cfg.model.J   # J rows an item, from the Delta log: no item read
    users, valid = load_eval_users(wh, tv["eval_users"], role), load_eval_users(wh, tv["eval_users"], 1)
    beam = retrieval_beam(run, cfg, overrides)
    log(f"run {run.run_id}: {len(users)} {'test' if role == 2 else 'validation'} users, {V} items, beam {beam}")
    # an incremental run's samples_train is one night's: the peers learn from the last full night's
    sv = tv.get("full_samples_train", tv["samples_train"])
    gram_vocab = Vocab(load_item_paths(wh, tv["item_paths"], cfg.model.J)[0]) if V <= cfg.eval.ease_max_items else None
    peers = spark_peers(spark, wh.read_spark(spark, "samples_train", sv), users, cfg.eval.k, gram_vocab)
    log("peers' lists computed; DR, brute force and the ANN peer in one Spark task")
    sc = spark.sparkContext
    args = sc.broadcast((wh, run, cfg, users, valid, beam, peers))
    try:
        report = sc.parallelize([0], 1).map(lambda _: evaluation_task(*args.value)).collect()[0]
    finally:
        args.destroy()
    report["budget"] = run.metrics.get("budget")
    report["alpha_used"] = run.metrics.get("alpha")
    report["run_id"] = run.run_id
    report["table_versions"] = tv
    report["objective_per_round"] = [
        {"round": r["round"], "objective": r["mstep"][-1]["objective"], "alpha": r["mstep"][-1].get("alpha"),
         "path_size": r["mstep"][-1].get("path_size"), "max_path_size": r["mstep"][-1]["max_path_size"]}
        for r in run.metrics.get("rounds", []) if r.get("mstep")]
    report["report_files"] = write_report(wh, run.run_id, report)
    log(f"report written to {report_dir(wh, run.run_id)}")
    return report


def write_report(wh: Warehouse, run_id: str, report: dict[str, Any]) -> list[str]:
    """evaluation.json and evaluation.html into report_dir -> their paths."""
    out = report_dir(wh, run_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "evaluation.html").write_text(render_html(report))
    return [str(out / "evaluation.json"), str(out / "evaluation.html")]


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


SERIES_COLORS = {"dr": "#4a7bd0", "hnsw": "#d0704a", "ivf": "#4aa05a"}


def recall_cost_series(report: dict[str, Any]) -> dict[str, list[tuple[float, float, str]]]:
    """{series: [(items scored per user, recall, label), ...]}: DR's beam sweep and the ANN sweeps."""
    out = {"dr": [(v["items_scored_per_user"], v["recall"], f"beam {b}") for b, v in report["dr_recall_by_beam"].items()]}
    for kind, knob in (("hnsw", "ef"), ("ivf", "nprobe")):
        pts = (report.get("ann_sweep") or {}).get(kind)
        if pts:
            out[kind] = [(p["items_scored_per_user"], p["recall"], f"{knob} {p[knob]}") for p in pts]
    return out


def _lines(title: str, series: dict[str, list[tuple[float, float, str]]], x_label: str, y_label: str,
           ref: tuple[str, float] | None = None) -> str:
    """An SVG line chart, log-x, one polyline per series (data-series=name) and a dashed reference line."""
    w, h, left, right, top, bottom = 640, 360, 60, 110, 30, 46
    xs = [x for pts in series.values() for x, _, _ in pts]
    ys = [y for pts in series.values() for _, y, _ in pts] + ([ref[1]] if ref else [])
    if not xs:
        return ""
    # log10 of items scored; a point that scored nothing sits at 1 item (log 0)
    lx = [np.log10(max(x, 1.0)) for x in xs]
    x0, x1 = np.floor(min(lx)), np.ceil(max(lx))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = max(max(ys) * 1.05, 1e-6)

    def px(x: float) -> float:
        return left + (w - left - right) * (np.log10(max(x, 1.0)) - x0) / (x1 - x0)

    def py(y: float) -> float:
        return h - bottom - (h - top - bottom) * y / y1

    parts = [f'<text x="4" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#333"/>']
    for e in range(int(x0), int(x1) + 1):
        x = px(10.0 ** e)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#ddd"/>'
                     f'<text x="{x:.1f}" y="{h - bottom + 16}" font-size="11" text-anchor="middle">{10 ** e:g}</text>')
    for i in range(5):
        y = y1 * i / 4
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" font-size="11" text-anchor="end">{y:.3f}</text>')
    parts.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 8}" font-size="12" text-anchor="middle">{html.escape(x_label)}</text>'
                 f'<text x="14" y="{(top + h - bottom) / 2:.0f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + h - bottom) / 2:.0f})">{html.escape(y_label)}</text>')
    if ref:
        y = py(ref[1])
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#888" stroke-dasharray="5,4"/>'
                     f'<text x="{w - right + 4}" y="{y + 4:.1f}" font-size="11">{html.escape(ref[0])}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = SERIES_COLORS.get(name, "#777")
        pts = sorted(pts)
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in pts)
        dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{html.escape(name)} '
                       f'{html.escape(lab)}: recall {y:.4f}, {x:.0f} items</title></circle>' for x, y, lab in pts)
        parts.append(f'<g data-series="{html.escape(name)}"><polyline points="{coords}" fill="none" stroke="{color}" '
                     f'stroke-width="2"/>{dots}</g>'
                     f'<rect x="{w - right + 8}" y="{top + 18 * i}" width="12" height="3" fill="{color}"/>'
                     f'<text x="{w - right + 24}" y="{top + 18 * i + 5}" font-size="12">{html.escape(name.upper())}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">{"".join(parts)}</svg>'


def _speed_table(report: dict[str, Any]) -> str:
    """Users/s and items scored per user of DR, brute force and the ANN peer at its target recall."""
    a, ups = report.get("ann") or {}, report.get("users_per_s") or {}
    if "skipped" in a:
        return f"<p>ANN peer skipped: {html.escape(a['skipped'])}</p>"
    rows = [("DR", f"beam {report['beam']}", report["items_scored_per_user"], ups.get("dr"), report["methods"]["dr"]["recall"]),
            ("brute force", "all items", report["catalog_size"], ups.get("brute_force"), report["methods"]["brute_force"]["recall"])]
    for kind, knob in (("hnsw", "ef"), ("ivf", "nprobe")):
        if kind in a:
            at = a[kind]
            note = "" if at["reached_target"] else " (largest; below the target)"
            rows.append((kind.upper(), f"{knob} {at[knob]}{note}", at["items_scored_per_user"], at["users_per_s"],
                         report["methods"][kind]["recall"]))
    body = "".join(f"<tr><td>{n}</td><td>{html.escape(s)}</td><td>{x:.0f}</td>"
                   f"<td>{'' if u is None else f'{u:.0f}'}</td><td>{r:.4f}</td></tr>" for n, s, x, u, r in rows)
    return (f"<p>Speed on {report.get('threads', '?')} threads (users/s include encoding the user); "
            f"the ANN indexes at their cheapest setting reaching the target recall {(report.get('ann') or {}).get('target_recall', float('nan')):.4f} "
            f"(DR's, or brute force's when DR's is higher).</p>"
            f"<table border='1' cellpadding='4'><tr><th>method</th><th>setting</th><th>items scored per user</th>"
            f"<th>users/s</th><th>R@{report['k']}</th></tr>{body}</table>")


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline SVG charts: no script, no network)."""
    k = report["k"]
    m = report["methods"]
    charts = [
        _lines(f"Recall@{k} against items scored per user", recall_cost_series(report),
               "items scored per user (log scale)", f"recall@{k}",
               ("brute force", m["brute_force"]["recall"]) if "brute_force" in m else None),
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
            + _speed_table(report) + "".join(f"<div>{c}</div>" for c in charts) + "</body></html>")
