"""`dr plan`: a night's wall time per stage from the catalog's size, the config and measured per-core rates.

Each stage costs fixed seconds (a command or an E-step phase starting) plus its work divided by
(rate per core x cores x efficiency); the rates are the benchmarks' figures in plan_rates.toml,
with their dates. Work per stage follows what the jobs do:

  ingest       the night's new interaction rows
  split        every interaction row (full) / the new rows (incremental)
  state        user_state + item_state from the same rows
  E-step       samples x epochs; a full night trains at most joint_epochs + (em_rounds + 1) x
               structure_epochs epochs (early stopping only shortens it), an incremental night
               2 x incremental.epochs over the new samples
  scores       samples beam-searched per EM round (an incremental night: the new samples, once)
  M-step       items x mstep.rounds per EM round
  paths        initial paths + path index: items x J rows
  candidates   users x the retrieval budget (items scored per user)
  evaluate     the catalog through the peers (HNSW + IVF builds dominate; eval users are a fixed few thousand);
               above eval.ann_max_items no ANN peer is built and brute force / DR's sweep over the
               catalog remain (rate `eval_items`, falling back to the HNSW rate where a rates file lacks it)

`items` are the items the model trains (those with interactions): cold items are a backfill.

Not a nightly stage: `dr backfill cold-items` (the backfill DAG, run when items arrive without
interactions) reads the whole catalog and item_paths; `backfill_cold_items` predicts it from its own
rate (optional in a rates file).

Fixed costs: one per command start and per E-step phase (Ray Train's start and rendezvous); the
scores and M-step rates are whole-job rates, their Spark job starts included.

Efficiency: Spark's jobs ran 1.67x faster on 2 cores than on 1 (0.835 per core); the model applies
`efficiency` (default 0.8) to every stage at every core count: no stage is assumed to scale better
than it did here, and none is modelled as serial (the driver holds no catalog-sized state).
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from dr_model.config import ConfigError, DRConfig

RATES = Path(__file__).with_name("plan_rates.toml")
NIGHT_S = 7200.0


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str
    date: str


@dataclass(frozen=True)
class Workload:
    items: int
    users: int
    interactions: int
    new_interactions: int       # the night's increment (ingest; an incremental night trains on it)

    def __post_init__(self) -> None:
        for name in ("items", "users", "interactions", "new_interactions"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"plan: {name} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class Stage:
    name: str
    work: float                 # units of its rate
    rate: str                   # key in plan_rates.toml
    starts: int                 # fixed costs paid (command starts, E-step phases)

    def seconds(self, rates: dict[str, Rate], cores: int, efficiency: float) -> float:
        return self.starts * rates["fixed"].value + self.work / (rates[self.rate].value * cores * efficiency)


def load_rates(path: str | Path | None = None) -> dict[str, Rate]:
    with open(path or RATES, "rb") as fh:
        raw = tomllib.load(fh)
    need = {"ingest_rows", "split_rows", "state_rows", "estep_samples", "scores_pairs", "mstep_item_rounds",
            "path_rows", "retrieval_item_scores", "hnsw_build_items", "fixed"}
    missing = need - set(raw)
    if missing:
        raise ConfigError(f"rates file {path or RATES}: missing {sorted(missing)}")
    rates = {k: Rate(float(v["value"]), v["unit"], v["source"], str(v["date"])) for k, v in raw.items()}
    bad = [k for k, r in rates.items() if r.value <= 0]
    if bad:
        raise ConfigError(f"rates file {path or RATES}: {bad} must be > 0")
    return rates


def stages(w: Workload, cfg: DRConfig, mode: str = "full", evaluate: bool = True,
           rates: dict[str, Rate] | None = None) -> list[Stage]:
    """The night's stages with their work, in the order the nightly DAG runs them."""
    t, m = cfg.train, cfg.model
    budget = cfg.search.budget(w.items, cfg.eval.k)
    if mode == "full":
        rows, samples = w.interactions, w.interactions
        epochs = t.joint_epochs + (t.em_rounds + 1) * t.structure_epochs
        phases, rounds = t.em_rounds + 2, t.em_rounds
        scored = samples * rounds
    elif mode == "incremental":
        rows, samples = w.new_interactions, w.new_interactions
        epochs, phases, rounds = 2 * cfg.incremental.epochs, 3, 1
        scored = samples
    else:
        raise ConfigError(f"plan: mode must be 'full' or 'incremental', got {mode!r}")
    out = [
        Stage("ingest", w.new_interactions, "ingest_rows", 1),
        Stage("split", rows, "split_rows", 1),
        Stage("state", rows, "state_rows", 0),
        Stage("estep", samples * epochs, "estep_samples", phases),
        # whole-job rates (a Spark job's own start is in them): no fixed cost per round
        Stage("scores", scored, "scores_pairs", 0),
        Stage("mstep", w.items * cfg.mstep.rounds * rounds, "mstep_item_rounds", 0),
        Stage("paths", w.items * m.J * (2 if mode == "full" else 1), "path_rows", 0),
        Stage("candidates", w.users * budget, "retrieval_item_scores", 1),
    ]
    if evaluate:
        ann = w.items <= cfg.eval.ann_max_items or "eval_items" not in (rates or {})
        out.append(Stage("evaluate", w.items, "hnsw_build_items" if ann else "eval_items", 1))
    return out


def predict(w: Workload, cfg: DRConfig, cores: int, rates: dict[str, Rate], mode: str = "full",
            efficiency: float = 0.8, evaluate: bool = True) -> dict[str, float]:
    """{stage: seconds} plus 'total'."""
    if cores < 1:
        raise ConfigError(f"plan: cores must be >= 1, got {cores}")
    if not 0 < efficiency <= 1:
        raise ConfigError(f"plan: efficiency must be in (0, 1], got {efficiency}")
    secs = {s.name: s.seconds(rates, cores, efficiency) for s in stages(w, cfg, mode, evaluate, rates)}
    secs["total"] = sum(secs.values())
    return secs


def cores_for(w: Workload, cfg: DRConfig, rates: dict[str, Rate], budget_s: float = NIGHT_S, mode: str = "full",
              efficiency: float = 0.8, evaluate: bool = True) -> int | None:
    """Fewest cores whose night fits budget_s (None: the fixed costs alone exceed it)."""
    st = stages(w, cfg, mode, evaluate, rates)
    fixed = sum(s.starts for s in st) * rates["fixed"].value
    core_s = sum(s.work / rates[s.rate].value for s in st) / efficiency
    if fixed >= budget_s:
        return None
    return max(1, math.ceil(core_s / (budget_s - fixed)))


def backfill_cold_items(items: int, cores: int, rates: dict[str, Rate], efficiency: float = 0.8) -> float | None:
    """Seconds of `dr backfill cold-items` over a catalog of `items` (None: the rates have no such rate)."""
    if "cold_items_catalog" not in rates:
        return None
    return Stage("cold_items", items, "cold_items_catalog", 3).seconds(rates, cores, efficiency)


def scaled(w: Workload, items: int) -> Workload:
    """The same shape (users, interactions, increment per item) at another catalog size."""
    f = items / w.items
    return Workload(items, max(1, round(w.users * f)), max(1, round(w.interactions * f)),
                    max(1, round(w.new_interactions * f)))
