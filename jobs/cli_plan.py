"""`dr plan`: predicted wall time per stage of a night, and the cores a 2-hour night needs at 10^8 and 10^9 items."""
from __future__ import annotations

import argparse
import json

from jobs.cli_common import config_options


def _plan(args: argparse.Namespace) -> int:
    from dr_model.config import DRConfig
    from jobs.plan import NIGHT_S, Workload, backfill_cold_items, cores_for, load_rates, predict, scaled

    cfg = DRConfig.load(args.config, args.set)
    rates = load_rates(args.rates)
    new = args.new_interactions or max(1, args.interactions // 30)
    w = Workload(args.items, args.users, args.interactions, new)
    kw = {"efficiency": args.efficiency, "evaluate": not args.no_evaluate}
    out: dict = {"items": w.items, "users": w.users, "interactions": w.interactions, "new_interactions": new,
                 "cores": args.cores, "efficiency": args.efficiency, "night_s": NIGHT_S}
    for mode in ("full", "incremental"):
        secs = predict(w, cfg, args.cores, rates, mode, **kw)
        out[f"{mode}_total_s"] = round(secs.pop("total"), 1)
        out[f"{mode}_stages_s"] = {k: round(v, 1) for k, v in secs.items()}
    out["cores_for_night"] = {f"{n:.0e}".replace("+0", ""): {m: cores_for(scaled(w, int(n)), cfg, rates, mode=m, **kw)
                                                              for m in ("full", "incremental")}
                              for n in (1e8, 1e9)}
    cold = backfill_cold_items(w.items, args.cores, rates, args.efficiency)
    out["backfill_cold_items_s"] = None if cold is None else round(cold, 1)
    out["rates"] = {k: {"value": r.value, "unit": r.unit, "date": r.date} for k, r in rates.items()}
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"{w.items:,} items, {w.users:,} users, {w.interactions:,} interactions ({new:,} new a night), "
          f"{args.cores} cores at efficiency {args.efficiency}:")
    for mode in ("full", "incremental"):
        stages = ", ".join(f"{k} {v:,.0f}s" for k, v in out[f"{mode}_stages_s"].items())
        print(f"  {mode:11s} night {out[f'{mode}_total_s'] / 3600:6.2f} h: {stages}")
    if cold is not None:
        print(f"  backfill cold-items over the catalog (not nightly): {cold:,.0f}s")
    for n, need in out["cores_for_night"].items():
        print(f"  cores for a {NIGHT_S / 3600:.0f}-hour night at {n} items (same shape): "
              f"full {need['full']}, incremental {need['incremental']}")
    print("  rates: " + "; ".join(f"{k} {r.value:,.0f} ({r.date})" for k, r in rates.items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict a night's wall time per stage and the cores a 2-hour night needs",
                       description="Cost model: each stage's wall time = fixed starts + work / (measured per-core "
                                   "rate x cores x efficiency). Rates: jobs/plan_rates.toml (each with the "
                                   "benchmark and date it came from). The config (--config/--set) sets the "
                                   "schedule: epochs, EM rounds, M-step rounds, J, the retrieval budget.")
    config_options(p)
    p.add_argument("--items", type=int, required=True,
                   help="items the model trains: those with interactions (the rest are cold items, a backfill)")
    p.add_argument("--users", type=int, required=True, help="users to generate candidates for")
    p.add_argument("--interactions", type=int, required=True, help="interactions in the training history")
    p.add_argument("--new-interactions", type=int, default=None,
                   help="interactions ingested a night (default: interactions / 30)")
    p.add_argument("--cores", type=int, default=2, help="cores of the cluster (default 2)")
    p.add_argument("--efficiency", type=float, default=0.8,
                   help="parallel efficiency per core (default 0.8; measured 0.835 on 2 cores for the Spark jobs)")
    p.add_argument("--rates", default=None, help="a rates TOML of your own cluster (default: jobs/plan_rates.toml)")
    p.add_argument("--no-evaluate", action="store_true", help="leave the nightly evaluation out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan)
