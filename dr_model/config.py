"""Validated, frozen configuration for the Deep Retrieval core.

One TOML file (sections named like the dataclasses below) plus CLI overrides
(`section.field=value`) build a `DRConfig`; every value is checked on construction
so a bad config fails before any data is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping


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

    def __post_init__(self) -> None:
        for name in ("K", "D", "J", "item_dim", "user_dim", "node_dim", "hidden", "rerank_dim", "seq_len"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"model.{name}", "an integer >= 1", v)
        _check(self.K >= 2, "model.K", ">= 2", self.K)
        _check(self.encoder in ("mean", "gru"), "model.encoder", "'mean' or 'gru'", self.encoder)
        _check(self.K ** self.D < 2 ** 62, "model.K/D", "such that K**D fits in int64", (self.K, self.D))
        _check(self.J <= self.K ** self.D, "model.J", "<= K**D", self.J)

    @property
    def num_paths(self) -> int:
        return self.K ** self.D


@dataclass(frozen=True)
class SearchConfig:
    """Beam search for retrieval (B) and for item->path scores (S)."""

    beam: int = 25              # B: paths kept per user at retrieval
    score_paths: int = 10       # S: paths kept per training pair and per item in s[v,c]
    batch_size: int = 1024      # users per beam-search call

    def __post_init__(self) -> None:
        _check(isinstance(self.beam, int) and self.beam >= 1, "search.beam", "an integer >= 1", self.beam)
        _check(isinstance(self.score_paths, int) and self.score_paths >= 1, "search.score_paths", "an integer >= 1", self.score_paths)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "search.batch_size", "an integer >= 1", self.batch_size)


@dataclass(frozen=True)
class MStepConfig:
    """Penalized coordinate descent: f(n) = n**power / power, weight alpha."""

    alpha: float = 3e-5
    penalty_power: float = 4.0
    rounds: int = 3             # coordinate-descent sweeps per M-step
    block_size: int = 4096      # items updated together by the fast kernel
    decay: float = 0.999        # eta, streaming merge of s[v,c] across nights
    damping: bool = True        # undo in-block moves that earlier block moves made losing (see mstep.py)
    # Keep an item's current paths unless the greedy picks strictly improve the objective.
    # The paper's J greedy picks can pick a worse set than the item already has (J >= 2,
    # strong penalty); with this test every coordinate step is non-decreasing. False = the paper.
    improving_only: bool = True

    def __post_init__(self) -> None:
        _check(self.alpha >= 0, "mstep.alpha", ">= 0", self.alpha)
        _check(self.penalty_power > 1, "mstep.penalty_power", "> 1 (f must be strictly convex)", self.penalty_power)
        _check(isinstance(self.rounds, int) and self.rounds >= 1, "mstep.rounds", "an integer >= 1", self.rounds)
        _check(isinstance(self.block_size, int) and self.block_size >= 1, "mstep.block_size", "an integer >= 1", self.block_size)
        _check(0 < self.decay <= 1, "mstep.decay", "in (0, 1]", self.decay)


@dataclass(frozen=True)
class TrainConfig:
    """E-step optimisation and the EM schedule."""

    em_rounds: int = 3          # R: E-step -> scores -> M-step repetitions
    joint_epochs: int = 2       # structure model + reranker together (paper: 2)
    structure_epochs: int = 2   # then reranker frozen, structure model only (paper: 2)
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    negatives: int = 256        # sampled-softmax negatives per batch (shared)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("em_rounds", "batch_size", "negatives"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"train.{name}", "an integer >= 1", v)
        for name in ("joint_epochs", "structure_epochs", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"train.{name}", "an integer >= 0", v)
        _check(self.lr > 0, "train.lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol."""

    k: int = 10                 # metrics @k
    exclude_history: bool = True    # never recommend an item from the user's input half (all methods)
    beam_sweep: tuple[int, ...] = (5, 10, 25, 50)   # DR recall against beam size

    def __post_init__(self) -> None:
        _check(isinstance(self.k, int) and self.k >= 1, "eval.k", "an integer >= 1", self.k)
        _check(isinstance(self.exclude_history, bool), "eval.exclude_history", "true or false", self.exclude_history)
        object.__setattr__(self, "beam_sweep", tuple(self.beam_sweep))
        _check(all(isinstance(b, int) and b >= 1 for b in self.beam_sweep), "eval.beam_sweep", "a list of integers >= 1", self.beam_sweep)


@dataclass(frozen=True)
class SplitConfig:
    """The paper's protocol: which events count, which users are held out."""

    rating_threshold: float = 4.0   # keep events with rating >= this
    min_events: int = 10            # keep users with at least this many kept events
    test_users: int = 1000
    valid_users: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.min_events, int) and self.min_events >= 2, "split.min_events", "an integer >= 2", self.min_events)
        for name in ("test_users", "valid_users", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"split.{name}", "an integer >= 0", v)


@dataclass(frozen=True)
class DRConfig:
    """Everything the core needs; one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    mstep: MStepConfig = field(default_factory=MStepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

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
                data = {k: dict(v) for k, v in tomllib.load(fh).items()}
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
    "EvalConfig", "SplitConfig", "DRConfig", "replace",
]
