"""Validated, frozen configuration for the Deep Retrieval core.

One TOML file (sections named like the dataclasses below) plus CLI overrides
(`section.field=value`) build a `DRConfig`; every value is checked on construction
so a bad config fails before any data is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping


# Sections of the config file that size the engines, read by the jobs, outside DRConfig and its hash.
CLUSTER_SECTIONS = ("spark",)


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the field."""


def _check(cond: bool, name: str, rule: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}' = {value!r}: must be {rule}")


@dataclass(frozen=True)
class ModelConfig:
    """Structure model, encoder and reranker shapes."""

    K: int = 50                 # nodes per layer
    D: int = 3                  # layers (path length)
    J: int = 3                  # paths per item
    item_dim: int = 64          # item embedding size in the behaviour encoder
    user_dim: int = 64          # user embedding size (encoder output)
    node_dim: int = 32          # per-layer path-node embedding size
    hidden: int = 128           # hidden width of each layer's MLP
    rerank_dim: int = 64        # reranker item embedding size
    encoder: str = "mean"       # "mean" | "gru"
    seq_len: int = 20           # behaviour sequence length L (padded/truncated)
    # Rows per item table (dr_model.item_table): catalogs up to this size get one exact row per
    # item; larger ones keep exact rows for the item_exact_share x item_rows most frequent items
    # and compose the others' from quotient-remainder rows, so memory follows this, not V.
    item_rows: int = 524_288
    item_exact_share: float = 0.5
    tie_item_tables: bool = False   # the reranker's output table = its encoder's input table (needs item_dim == rerank_dim)

    def __post_init__(self) -> None:
        for name in ("K", "D", "J", "item_dim", "user_dim", "node_dim", "hidden", "rerank_dim", "seq_len", "item_rows"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"model.{name}", "an integer >= 1", v)
        _check(self.K >= 2, "model.K", ">= 2", self.K)
        _check(isinstance(self.item_rows, int) and self.item_rows >= 4, "model.item_rows", "an integer >= 4",
               self.item_rows)
        _check(0 <= self.item_exact_share < 1, "model.item_exact_share", "in [0, 1)", self.item_exact_share)
        _check(isinstance(self.tie_item_tables, bool), "model.tie_item_tables", "true or false", self.tie_item_tables)
        _check(not self.tie_item_tables or self.item_dim == self.rerank_dim, "model.tie_item_tables",
               "false unless model.item_dim == model.rerank_dim", self.tie_item_tables)
        _check(self.encoder in ("mean", "gru"), "model.encoder", "'mean' or 'gru'", self.encoder)
        _check(self.K ** self.D < 2 ** 62, "model.K/D", "such that K**D fits in int64", (self.K, self.D))
        _check(self.J <= self.K ** self.D, "model.J", "<= K**D", self.J)

    @property
    def num_paths(self) -> int:
        return self.K ** self.D


@dataclass(frozen=True)
class SearchConfig:
    """Beam search for retrieval (B) and for item->path scores (S), and the retrieval budget.

    `items_per_user` is the cost a user pays: how many items DR reranks per user. The M-step
    sizes the paths for it (alpha is calibrated so a beam of `beam` paths holds about that
    many items) and training ends by choosing the retrieval beam whose mean number of items
    scored on the validation users fits it. 0 = auto: min(V / 22, 9 * sqrt(V)), never below
    5 * eval.k: 4.5% of a small catalog (22x cheaper than brute force), growing like sqrt(V)
    past 40,000 items (an IVF index with sqrt(V) lists probing nine of them scores as many);
    the paper sizes the beam to return 5-10x the final top-N, hence the floor.

    The budget is a ceiling: the retrieval beam is the smallest within it whose reranked
    validation recall@k reaches `recall_target` x brute force's (dr_model.beam_choice); past
    that point a bigger beam costs items for recall the reranker cannot add. 0 = the largest
    beam the budget allows. `recall_confidence`: "reaches" holds with this one-sided confidence
    over the validation users (a paired bound, so a small validation set climbs to a larger beam).
    The recall is measured at `top_n`, the depth `dr candidates` serves, so the beam is chosen for
    the lists it will fill.
    """

    beam: int = 10              # B: paths per user that the path sizes are planned for
    score_paths: int = 10       # S: paths kept per training pair and per item in s[v,c]
    batch_size: int = 1024      # users per beam-search call
    items_per_user: int = 0     # retrieval budget (items reranked per user); 0 = auto (see above)
    recall_target: float = 0.98  # retrieval beam: the cheapest reaching this share of brute force's recall
    recall_confidence: float = 0.95  # ... with this one-sided confidence over the validation users (0: point estimate)
    top_n: int = 100            # candidates per user `dr candidates` writes; the beam's recall is measured at this depth

    def __post_init__(self) -> None:
        _check(isinstance(self.beam, int) and self.beam >= 1, "search.beam", "an integer >= 1", self.beam)
        _check(isinstance(self.score_paths, int) and self.score_paths >= 1, "search.score_paths", "an integer >= 1", self.score_paths)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "search.batch_size", "an integer >= 1", self.batch_size)
        _check(isinstance(self.items_per_user, int) and self.items_per_user >= 0, "search.items_per_user",
               "an integer >= 0 (0 = auto)", self.items_per_user)
        target = self.recall_target
        _check(isinstance(target, (int, float)) and not isinstance(target, bool) and 0 <= target <= 2, "search.recall_target",
               "a number in [0, 2] (a share of brute force's validation recall; 0 = the budget's beam)",
               self.recall_target)
        _check(isinstance(self.top_n, int) and not isinstance(self.top_n, bool) and self.top_n >= 1, "search.top_n",
               "an integer >= 1 (candidates per user)", self.top_n)
        conf = self.recall_confidence
        _check(isinstance(conf, (int, float)) and not isinstance(conf, bool) and 0 <= conf < 1,
               "search.recall_confidence", "a number in [0, 1) (one-sided confidence that the beam reaches "
               "recall_target on users beyond the validation sample; 0 = the point estimate)", conf)

    def budget(self, num_items: int, k: int) -> int:
        """Items DR may score per user for a catalog of num_items (the configured or the auto budget)."""
        if self.items_per_user:
            return self.items_per_user
        return max(int(min(num_items / 22, 9 * math.sqrt(max(num_items, 1)))), 5 * k)

    def target_path_size(self, num_items: int, k: int) -> float:
        """Traffic-weighted path size the M-step calibrates alpha for: budget / beam (at least 1)."""
        return max(self.budget(num_items, k) / self.beam, 1.0)


@dataclass(frozen=True)
class MStepConfig:
    """Penalized coordinate descent: f(n) = n**power / power, weight alpha.

    alpha "auto" (default): calibrated every round so the traffic-weighted path size meets
    search.target_path_size (dr_model.calibrate); a number fixes it (the paper's way).
    explore: per item, that many extra candidate paths next to its best one in code space
    (same first D-1 codes), scored explore_score x its best score, so the penalty can move
    items off a crowded path onto light ones the beam never emitted (0 = off, the paper).
    """

    alpha: float | str = "auto"
    penalty_power: float = 4.0
    rounds: int = 5             # coordinate-descent sweeps per M-step
    block_size: int = 4096      # items updated together by the fast kernel
    damping: bool = True        # undo in-block moves that earlier block moves made losing (see mstep.py)
    # Keep an item's current paths unless the greedy picks strictly improve the objective.
    # The paper's J greedy picks can pick a worse set than the item already has (J >= 2,
    # strong penalty); with this test every coordinate step is non-decreasing. False = the paper.
    improving_only: bool = True
    explore: int = 2
    explore_score: float = 0.5

    def __post_init__(self) -> None:
        _check(self.alpha == "auto" or (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                        and self.alpha >= 0), "mstep.alpha", "\"auto\" or a number >= 0", self.alpha)
        _check(self.penalty_power > 1, "mstep.penalty_power", "> 1 (f must be strictly convex)", self.penalty_power)
        _check(isinstance(self.rounds, int) and self.rounds >= 1, "mstep.rounds", "an integer >= 1", self.rounds)
        _check(isinstance(self.block_size, int) and self.block_size >= 1, "mstep.block_size", "an integer >= 1", self.block_size)
        _check(isinstance(self.explore, int) and self.explore >= 0, "mstep.explore", "an integer >= 0", self.explore)
        _check(0 < self.explore_score < 1, "mstep.explore_score", "in (0, 1)", self.explore_score)

    @property
    def auto_alpha(self) -> bool:
        return self.alpha == "auto"


@dataclass(frozen=True)
class TrainConfig:
    """E-step optimisation and the EM schedule.

    Schedule (the paper's shape, lengths picked by the data): EM round 0 trains the reranker
    (and, with init_paths "random", the structure model) for at most joint_epochs; the initial
    paths are then built ("embeddings": balanced hierarchical k-means of the reranker's item
    embeddings, dr_model.init_paths; "random": balanced random paths); each of the em_rounds
    rounds trains the structure model alone (reranker frozen) for at most structure_epochs,
    then scores s[v,c] and runs the M-step. Every phase stops early once the validation
    users' recall@k has not improved for `patience` epochs (0: always the maximum).
    The reranker learns each sample's next `rerank_targets` items of the user (the target and the
    ones after it, one softmax each): the task it serves is the user's next several items, and
    the extra targets regularize small datasets. 1 = the paper's next item only.
    """

    em_rounds: int = 3          # R: E-step -> scores -> M-step repetitions after round 0
    joint_epochs: int = 30      # at most, round 0 (reranker and, with random init, structure)
    structure_epochs: int = 10  # at most, per round (reranker frozen, structure model only)
    patience: int = 3           # early stopping on the validation users (0 = off)
    min_delta: float = 0.002    # relative recall gain that counts as an improvement
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    negatives: int = 256        # sampled-softmax negatives per batch (shared)
    rerank_targets: int = 5     # the reranker's targets per sample: the next W items of the user
    # Exact softmax (dense item tables) up to this catalog size; above it sampled softmax with
    # sparse item tables: a step reads and updates the rows it touched only (dr_model.optim).
    full_softmax_max_items: int = 10_000
    init_paths: str = "embeddings"          # "embeddings" | "random"
    # A given start (an earlier structure) whose path size is above this many times the target
    # is collapsed: it is re-seeded from the reranker's embeddings (an automatic night runs full).
    # 0: never. Measured by dr_model.calibrate.start_path_size.
    collapse_factor: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("em_rounds", "batch_size", "negatives", "rerank_targets"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"train.{name}", "an integer >= 1", v)
        for name in ("joint_epochs", "structure_epochs", "patience", "full_softmax_max_items", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"train.{name}", "an integer >= 0", v)
        _check(self.structure_epochs >= 1, "train.structure_epochs", ">= 1", self.structure_epochs)
        _check(self.lr > 0, "train.lr", "> 0", self.lr)
        _check(self.min_delta >= 0, "train.min_delta", ">= 0", self.min_delta)
        _check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        _check(self.collapse_factor == 0 or self.collapse_factor > 1, "train.collapse_factor", "0 (off) or > 1",
               self.collapse_factor)
        _check(self.init_paths in ("embeddings", "random"), "train.init_paths", "'embeddings' or 'random'",
               self.init_paths)
        _check(self.init_paths == "random" or self.joint_epochs >= 1, "train.joint_epochs",
               ">= 1 with init_paths 'embeddings' (the reranker's embeddings place the items)", self.joint_epochs)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol."""

    k: int = 10                 # metrics @k
    exclude_history: bool = True    # never recommend an item from the user's input half (all methods)
    beam_sweep: tuple[int, ...] = (5, 10, 25, 50)   # DR recall against beam size
    ease_max_items: int = 10_000    # EASE inverts a dense V x V matrix: skipped above this catalog size
    # The ANN peer (dr_model.ann): faiss HNSW and IVF over the reranker's own item vectors.
    # Its HNSW build is O(V log V) graph inserts on the evaluation's threads: skipped above this.
    ann_max_items: int = 2_000_000
    ann_hnsw_m: int = 32            # HNSW graph degree
    ann_ef_construction: int = 128  # HNSW build beam
    ann_ef_sweep: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)    # HNSW efSearch, increasing
    ann_nlist: int = 0              # IVF lists; 0 = 4 sqrt(V), at least 39 items per list
    ann_nprobe_sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # IVF lists probed, increasing

    def __post_init__(self) -> None:
        _check(isinstance(self.k, int) and self.k >= 1, "eval.k", "an integer >= 1", self.k)
        _check(isinstance(self.ease_max_items, int) and self.ease_max_items >= 0, "eval.ease_max_items",
               "an integer >= 0", self.ease_max_items)
        _check(isinstance(self.exclude_history, bool), "eval.exclude_history", "true or false", self.exclude_history)
        object.__setattr__(self, "beam_sweep", tuple(self.beam_sweep))
        _check(all(isinstance(b, int) and b >= 1 for b in self.beam_sweep), "eval.beam_sweep", "a list of integers >= 1", self.beam_sweep)
        for name in ("ann_max_items", "ann_nlist"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"eval.{name}", "an integer >= 0", v)
        for name in ("ann_hnsw_m", "ann_ef_construction"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 2, f"eval.{name}", "an integer >= 2", v)
        for name in ("ann_ef_sweep", "ann_nprobe_sweep"):
            v = tuple(getattr(self, name))
            object.__setattr__(self, name, v)
            # increasing, so the first setting that reaches a recall is the cheapest one
            _check(len(v) > 0 and all(isinstance(x, int) and x >= 1 for x in v) and all(a < b for a, b in zip(v, v[1:])),
                   f"eval.{name}", "a non-empty increasing list of integers >= 1", v)


@dataclass(frozen=True)
class SplitConfig:
    """The paper's protocol: which events count, which users are held out."""

    rating_threshold: float = 4.0   # keep events with rating >= this
    min_events: int = 10            # keep users with at least this many kept events
    test_users: int = 1000
    valid_users: int = 1000
    # Small datasets: never hold out more than this share of the eligible users (test and
    # validation are scaled down together, and the split logs the sizes it used).
    max_heldout_fraction: float = 0.4
    seed: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.min_events, int) and self.min_events >= 2, "split.min_events", "an integer >= 2", self.min_events)
        _check(0 < self.max_heldout_fraction < 1, "split.max_heldout_fraction", "in (0, 1)", self.max_heldout_fraction)
        for name in ("test_users", "valid_users", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"split.{name}", "an integer >= 0", v)


@dataclass(frozen=True)
class IncrementalConfig:
    """`dr train --mode incremental`: what a night learns from the interactions since the last run.

    s[v,c] and n_v decay by decay_per_day ** (days between the data ends of the two runs), so
    forgetting follows time, not the number of nights (0.98: a day-old score weighs 0.98, a
    month-old one 0.55). An item whose last interaction is older than item_ttl_days before the
    night's data end leaves the vocabulary, item_paths and s[v,c] (0 = items never age out).
    Each tower trains `epochs` epochs on the night's samples (a joint phase, then the structure
    model against the night's new paths).
    """

    decay_per_day: float = 0.98
    item_ttl_days: float = 365.0
    epochs: int = 2

    def __post_init__(self) -> None:
        _check(0 < self.decay_per_day <= 1, "incremental.decay_per_day", "in (0, 1]", self.decay_per_day)
        _check(self.item_ttl_days >= 0, "incremental.item_ttl_days", ">= 0 (0 = never)", self.item_ttl_days)
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "incremental.epochs", "an integer >= 1", self.epochs)

    def decay(self, days: float) -> float:
        """eta for a merge across `days` days of data (at least one day's worth)."""
        return float(self.decay_per_day ** max(days, 0.0))


@dataclass(frozen=True)
class DRConfig:
    """Everything the core needs; one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    mstep: MStepConfig = field(default_factory=MStepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)

    def __post_init__(self) -> None:
        _check(self.search.score_paths >= self.model.J, "search.score_paths", f">= model.J ({self.model.J})", self.search.score_paths)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short stable hash of every value; stored with each table commit."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> "DRConfig":
        sections = {f.name: f.type for f in fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(sections)}")
        kwargs = {}
        for f in fields(cls):
            sec_cls = type(getattr(cls(), f.name))
            values = dict(data.get(f.name, {}))
            known = {x.name for x in fields(sec_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"unknown field(s) {sorted(bad)} in config section '{f.name}'; known: {sorted(known)}")
            kwargs[f.name] = sec_cls(**values)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "DRConfig":
        """Read a TOML file (optional) and apply `section.field=value` overrides."""
        data: dict[str, dict[str, Any]] = {}
        if path is not None:
            with open(path, "rb") as fh:
                # [spark] holds cluster settings (jobs.cli_common.spark_conf), not the model's
                data = {k: dict(v) for k, v in tomllib.load(fh).items() if k not in CLUSTER_SECTIONS}
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ConfigError(f"override {item!r}: expected section.field=value")
            data.setdefault(section, {})[name] = _parse_value(raw.strip())
        return cls.from_dict(data)

    def with_overrides(self, overrides: list[str]) -> "DRConfig":
        data = self.to_dict()
        for item in overrides:
            key, _, raw = item.partition("=")
            section, _, name = key.strip().partition(".")
            data.setdefault(section, {})[name] = _parse_value(raw.strip())
        return DRConfig.from_dict(data)


def _parse_value(raw: str) -> Any:
    """Parse an override value with TOML's rules (bare words become strings)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


__all__ = [
    "ConfigError", "ModelConfig", "SearchConfig", "MStepConfig", "TrainConfig",
    "EvalConfig", "SplitConfig", "IncrementalConfig", "DRConfig", "replace",
]
