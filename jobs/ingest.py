"""`dr ingest`: validate a batch of interactions and append it to Delta in one pass.

Input: Parquet, CSV or Delta, with mappable column names. Every input row ends in exactly
one place: `interactions` (valid) or `interactions_quarantine` (with the first rule it broke:
schema_drift, null_id, non_integer_id, ts_unparsable, ts_out_of_range, unknown_event,
bad_weight, bad_rating, duplicate). Counts are checked to add up to the input before any
commit. Each table gets one commit carrying the watermark (ingest, batch_id), so re-ingesting
a batch adds nothing; the quarantine is committed first, so a crash between the two commits
is completed (not duplicated) by re-running the same batch.

String ids (`ids="string"`): user and item ids are taken as string keys and mapped to dense
int64 ids through `id_dictionary` (jobs/id_dictionary.py), whose commit for the batch comes
before the other two. A warehouse holds one kind of id: integer batches are refused once a
dictionary exists, string batches when integer interactions exist without one.

Inputs without timestamps (`no_timestamps="file-order"`): each event's ts is its position in
the input (files by path, rows in file order) after the warehouse's latest ts: an order, not a
time, so later batches sort after earlier ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import id_dictionary
from .id_dictionary import IdDictionaryError
from .tables import CommitMeta, Warehouse, delta_to_spark

Format = Literal["parquet", "csv", "delta"]
CORRUPT = "_corrupt_record"
FILE, ORDER = "_file", "_order"          # added to the input by with_file_order
ROUTES = {"good": "interactions", "bad": "interactions_quarantine"}
RULES = ("schema_drift", "null_id", "non_integer_id", "ts_unparsable", "ts_out_of_range",
         "unknown_event", "bad_weight", "bad_rating", "duplicate")


class IngestError(RuntimeError):
    """The batch cannot be ingested at all; no table was changed."""


@dataclass(frozen=True)
class ColumnMap:
    """Input column name for each interactions field; None = use the field's own name if present."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    ts: str = "ts"
    event: str | None = None
    weight: str | None = None
    rating: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "ColumnMap":
        """'user_id=uid,ts=timestamp' -> ColumnMap."""
        if not text:
            return cls()
        pairs = dict(p.split("=", 1) for p in text.split(",") if p.strip())
        unknown = set(pairs) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"--map: unknown field(s) {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        return cls(**{k.strip(): v.strip() for k, v in pairs.items()})


@dataclass(frozen=True)
class IngestConfig:
    """Validation rules."""

    events: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating")
    default_event: str = "rating"           # when the input has no event column
    min_ts: int = 1                         # seconds; ts <= 0 is a "missing" sentinel
    max_future_s: int = 86_400              # ts later than ingest time + this is out of range
    ts_unit: Literal["s", "ms"] = "s"       # unit of integer timestamps
    extra_columns: Literal["error", "ignore"] = "error"   # unmapped input columns (schema drift)
    ids: Literal["integer", "string"] = "integer"          # string: keys mapped through id_dictionary
    no_timestamps: Literal["error", "file-order"] = "error"   # input without a ts column

    def __post_init__(self) -> None:
        if self.ids not in ("integer", "string"):
            raise ValueError(f"ingest ids must be 'integer' or 'string', got {self.ids!r}")
        if self.no_timestamps not in ("error", "file-order"):
            raise ValueError(f"ingest no_timestamps must be 'error' or 'file-order', got {self.no_timestamps!r}")

    def hash(self, cols: ColumnMap) -> str:
        # Fields added later count only when set, so an integer batch hashes as it always did.
        cfg = {k: v for k, v in asdict(self).items() if k not in _LATER or v != _LATER[k]}
        return hashlib.sha256(json.dumps([cfg, asdict(cols)], sort_keys=True).encode()).hexdigest()[:16]


_LATER = {"ids": "integer", "no_timestamps": "error"}


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did; input_rows == ingested + sum(quarantined.values()) unless skipped."""

    batch_id: str
    input_rows: int
    ingested: int
    quarantined: dict[str, int]
    skipped: bool
    versions: dict[str, int]
    ignored_columns: tuple[str, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped:
            return f"batch {self.batch_id}: already ingested (interactions v{self.versions.get('interactions')}); nothing added"
        q = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items()) if v) or "none"
        ids = ""
        if "id_dictionary" in self.versions:
            new = self.extra.get("new_keys", {})
            ids = (f", id_dictionary v{self.versions['id_dictionary']} (+{new.get('user', 0)} users, "
                   f"+{new.get('item', 0)} items)")
        return (f"batch {self.batch_id}: input {self.input_rows} rows = ingested {self.ingested} + quarantined "
                f"{sum(self.quarantined.values())} ({q}); interactions v{self.versions['interactions']}, "
                f"interactions_quarantine v{self.versions['interactions_quarantine']}{ids}; {self.seconds:.1f}s")


def _log(msg: str) -> None:
    print(f"[ingest] {msg}", file=sys.stderr, flush=True)


def detect_format(path: str) -> Format:
    """delta if the folder has a _delta_log, csv for *.csv (or a folder of them), else parquet."""
    p = Path(path)
    if (p / "_delta_log").is_dir():
        return "delta"
    if p.suffix.lower() in (".csv", ".tsv") or (p.is_dir() and any(p.glob("*.csv"))):
        return "csv"
    return "parquet"


def default_batch_id(path: str, fmt: Format) -> str:
    """Content-addressed batch id: the input's files with sizes and mtimes (or the Delta version)."""
    p = Path(path).resolve()
    if not p.exists():
        raise IngestError(f"cannot read input {path}: no such file or folder")
    if fmt == "delta":
        from deltalake import DeltaTable
        sig = f"{p}@v{DeltaTable(str(p)).version()}"
    else:
        files = sorted(x for x in ([p] if p.is_file() else p.rglob("*")) if x.is_file() and not x.name.startswith((".", "_")))
        sig = json.dumps([[str(f.relative_to(p.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    return f"{fmt}-{hashlib.sha256(sig.encode()).hexdigest()[:16]}"


def read_input(spark: Any, path: str, fmt: Format) -> Any:
    """The raw input as a Spark DataFrame (CSV: all strings, malformed rows flagged in _corrupt_record)."""
    from pyspark.sql.types import StringType, StructField, StructType

    try:
        if fmt == "delta":
            from deltalake import DeltaTable
            return delta_to_spark(spark, DeltaTable(path), path)
        if fmt == "csv":
            header = spark.read.option("header", True).csv(path).columns
            schema = StructType([StructField(c, StringType()) for c in header] + [StructField(CORRUPT, StringType())])
            return (spark.read.option("header", True).option("mode", "PERMISSIVE")
                    .option("columnNameOfCorruptRecord", CORRUPT).schema(schema).csv(path))
        if fmt == "parquet":
            return spark.read.option("mergeSchema", True).parquet(path)
    except Exception as e:  # Spark/delta-rs errors are long: keep the first line
        raise IngestError(f"cannot read {fmt} input {path}: {str(e).strip().splitlines()[0][:500]}") from e
    raise IngestError(f"unknown input format {fmt!r}; use parquet, csv or delta")


def _resolve_columns(raw_cols: list[str], cols: ColumnMap, cfg: IngestConfig) -> tuple[dict[str, str], tuple[str, ...]]:
    """{field: input column} for the fields present; unmapped input columns (schema drift)."""
    present = [c for c in raw_cols if c not in (CORRUPT, FILE, ORDER)]
    file_order = cfg.no_timestamps == "file-order"
    mapping: dict[str, str] = {}
    for name in ColumnMap.__dataclass_fields__:
        given = getattr(cols, name)
        col = given if given is not None else name
        if name == "ts" and file_order:
            if col in present:
                raise IngestError(f"--no-timestamps file-order: the input has a column {col!r} for field 'ts'; "
                                  f"drop the flag to use its times, or the column to order events by the input")
            continue
        if col in present:
            mapping[name] = col
        elif given is not None or name in ("user_id", "item_id", "ts"):
            hint = (" (or pass --no-timestamps file-order to order events by their position in the input)"
                    if name == "ts" else "")
            raise IngestError(f"schema drift: input has no column {col!r} for field {name!r}; "
                              f"input columns are {present}; map it with --map {name}=<column>{hint}")
    extra = tuple(c for c in present if c not in mapping.values())
    if extra and cfg.extra_columns == "error":
        raise IngestError(f"schema drift: unexpected input column(s) {list(extra)} (mapped: {mapping}); "
                          f"map them, or pass --extra-columns ignore to drop them")
    return mapping, extra


def _int_value(c: Any, dtype: Any) -> tuple[Any, Any]:
    """(bigint value or null, True where the raw value is present but not an integer)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DecimalType, DoubleType, FloatType, IntegralType

    if isinstance(dtype, IntegralType):
        return c.cast("bigint"), F.lit(False)
    if isinstance(dtype, (DoubleType, FloatType, DecimalType)):
        d = c.cast("double")
        ok = (d == F.floor(d)) & (F.abs(d) < 9.2e18)
        return F.when(ok, d.cast("decimal(20,0)").try_cast("bigint")), c.isNotNull() & ~F.coalesce(ok, F.lit(False))
    s = F.trim(c.cast("string"))
    v = F.when(s.rlike(r"^[+-]?[0-9]+(\.0*)?$"), F.regexp_replace(s, r"\.0*$", "").try_cast("bigint"))
    return v, c.isNotNull() & (s != "") & v.isNull()


def _ts_value(c: Any, dtype: Any, cfg: IngestConfig) -> Any:
    """Event time in seconds (bigint) or null when unparsable."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DateType, StringType, TimestampNTZType, TimestampType

    if isinstance(dtype, (TimestampType, TimestampNTZType, DateType)):
        return F.unix_seconds(c.cast("timestamp"))
    v, _ = _int_value(c, dtype)
    if cfg.ts_unit == "ms":
        v = F.floor(v / 1000).cast("bigint")
    if isinstance(dtype, StringType):
        # Not an integer: try an ISO-8601 / Spark timestamp string.
        v = F.coalesce(v, F.unix_seconds(F.try_to_timestamp(F.trim(c))))
    return v


def _id_value(c: Any, dtype: Any, cfg: IngestConfig) -> tuple[Any, Any]:
    """(id value or null, True where it breaks non_integer_id): bigint, or the trimmed string key."""
    from pyspark.sql import functions as F

    if cfg.ids == "string":
        s = F.trim(c.cast("string"))
        return F.when(s != "", s), F.lit(False)
    return _int_value(c, dtype)


def with_file_order(spark: Any, raw: Any) -> tuple[Any, int]:
    """(raw + _file, _order: each row's 0-based position in the input, files by path then row order; rows).

    Spark's monotonically_increasing_id is (read partition << 33) + row within it; a file's
    splits are read in offset order, so inside one (file, partition) group the low bits follow
    the file's rows. Counting the groups — O(input splits) rows to the driver — gives each
    group's first position; no global sort and no window over one partition.
    """
    from pyspark.sql import functions as F

    low = (1 << 33) - 1
    df = raw.select("*", F.input_file_name().alias(FILE), F.monotonically_increasing_id().alias("_mono"))
    groups = (df.groupBy(FILE, F.shiftright("_mono", 33).alias("_part"))
              .agg(F.count(F.lit(1)).alias("n"), F.min(F.col("_mono").bitwiseAND(low)).alias("lo")).collect())
    starts, pos = [], 0
    for g in sorted(groups, key=lambda g: (g[FILE], g["_part"])):
        starts.append((g[FILE], g["_part"], pos - g["lo"]))
        pos += g["n"]
    first = spark.createDataFrame(starts, f"{FILE} string, _part long, _start long")
    out = (df.join(F.broadcast(first), (df[FILE] == first[FILE]) & (F.shiftright(df["_mono"], 33) == first["_part"]))
           .select(*[df[f"`{c}`"] for c in raw.columns], df[FILE],
                   (first["_start"] + df["_mono"].bitwiseAND(low)).alias(ORDER)))
    return out, pos


def validate(raw: Any, mapping: dict[str, str], batch_id: str, cfg: IngestConfig, now_s: int,
             ts_base: int | None = None) -> Any:
    """raw input -> one DataFrame with _route ('good'|'bad') and both tables' columns.

    String ids: the id columns are user_key / item_key (trimmed strings), mapped later. Without a
    ts column (file order): ts = ts_base + the row's _order.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    dtypes = dict((f.name, f.dataType) for f in raw.schema.fields)
    inputs = [c for c in raw.columns if c not in (CORRUPT, FILE, ORDER)]
    col = {k: F.col(f"`{v}`") for k, v in mapping.items()}
    uid, u_bad = _id_value(col["user_id"], dtypes[mapping["user_id"]], cfg)
    iid, i_bad = _id_value(col["item_id"], dtypes[mapping["item_id"]], cfg)
    in_order = "ts" not in mapping
    if in_order and (ts_base is None or ORDER not in raw.columns):
        raise ValueError("validate: an input without ts needs with_file_order's _order and a ts_base")
    ts = ((F.lit(ts_base) + F.col(ORDER)).cast("bigint") if in_order
          else _ts_value(col["ts"], dtypes[mapping["ts"]], cfg))
    event = F.lower(F.trim(col["event"].cast("string"))) if "event" in col else F.lit(cfg.default_event)
    weight = col["weight"].try_cast("float") if "weight" in col else F.lit(1.0).cast("float")
    rating = col["rating"].try_cast("float") if "rating" in col else F.lit(None).cast("float")
    w_bad = (F.isnan(weight) | (weight < 0) | weight.isNull()) if "weight" in col else F.lit(False)
    r_bad = (col["rating"].isNotNull() & (rating.isNull() | F.isnan(rating))) if "rating" in col else F.lit(False)
    corrupt = F.col(CORRUPT).isNotNull() if CORRUPT in raw.columns else F.lit(False)

    def raw_of(name: str) -> Any:
        return col[name].cast("string") if name in col else F.lit(None).cast("string")

    # (rule, field, broken?, detail): the first rule a row breaks is the one recorded.
    rules = [
        ("schema_drift", "*", corrupt, F.lit("malformed record (wrong number of fields)")),
        ("null_id", "user_id", col["user_id"].isNull() | (F.trim(raw_of("user_id")) == ""), F.lit("null")),
        ("null_id", "item_id", col["item_id"].isNull() | (F.trim(raw_of("item_id")) == ""), F.lit("null")),
        ("non_integer_id", "user_id", u_bad, raw_of("user_id")),
        ("non_integer_id", "item_id", i_bad, raw_of("item_id")),
        # A ts made from the input order is a position, not a time: no time rule applies to it.
        ("ts_unparsable", "ts", F.lit(False) if in_order else ts.isNull(), F.coalesce(raw_of("ts"), F.lit("null"))),
        ("ts_out_of_range", "ts", F.lit(False) if in_order else (ts < cfg.min_ts) | (ts > now_s + cfg.max_future_s),
         F.concat(raw_of("ts"), F.lit(f" not in [{cfg.min_ts}, {now_s + cfg.max_future_s}]"))),
        ("unknown_event", "event", event.isNull() | ~event.isin(*cfg.events), F.coalesce(raw_of("event"), F.lit("null"))),
        ("bad_weight", "weight", w_bad, raw_of("weight")),
        ("bad_rating", "rating", r_bad, raw_of("rating")),
    ]
    rule = field_ = detail = None
    for name, fld, broken, det in reversed(rules):
        rule = F.when(broken, F.lit(name)).otherwise(rule if rule is not None else F.lit(None).cast("string"))
        field_ = F.when(broken, F.lit(fld)).otherwise(field_ if field_ is not None else F.lit(None).cast("string"))
        detail = F.when(broken, det).otherwise(detail if detail is not None else F.lit(None).cast("string"))
    df = raw.select(
        *[F.col(f"`{c}`") for c in raw.columns],
        # before any shuffle, which would lose it (with_file_order took it on the scan already)
        (F.col(FILE) if FILE in raw.columns else F.input_file_name()).alias("_source"),
        uid.alias("_uid"), iid.alias("_iid"), ts.alias("_ts"), event.alias("_event"),
        weight.alias("_weight"), rating.alias("_rating"),
        rule.alias("_rule"), field_.alias("_field"), detail.cast("string").alias("_detail"))
    # Exact duplicates of the whole input row: keep the first, quarantine the others.
    dup_rank = F.row_number().over(Window.partitionBy(*[F.col(f"`{c}`") for c in inputs]).orderBy(F.lit(1)))
    df = df.withColumn("_dup", dup_rank > 1)
    is_bad = F.col("_rule").isNotNull() | F.col("_dup")
    ids = ("user_key", "item_key") if cfg.ids == "string" else ("user_id", "item_id")
    return df.select(
        F.when(is_bad, "bad").otherwise("good").alias("_route"),
        F.col("_uid").alias(ids[0]), F.col("_iid").alias(ids[1]), F.col("_ts").alias("ts"),
        F.col("_event").alias("event"), F.col("_weight").alias("weight"), F.col("_rating").alias("rating"),
        F.lit(batch_id).alias("batch_id"),
        F.expr("date_from_unix_date(CAST(floor(_ts / 86400) AS INT))").alias("date"),   # UTC day, tz-independent
        F.coalesce(F.col("_rule"), F.when(F.col("_dup"), "duplicate")).alias("rule"),
        F.coalesce(F.col("_field"), F.when(F.col("_dup"), "*")).alias("field"),
        F.coalesce(F.col("_detail"), F.when(F.col("_dup"), "exact duplicate of another input row")).alias("detail"),
        F.when(is_bad, F.to_json(F.struct(*[F.col(f"`{c}`") for c in raw.columns if c not in (FILE, ORDER)])))
        .alias("raw"),
        F.col("_source").alias("source"))


def _already_ingested(wh: Warehouse, batch_id: str) -> IngestResult | None:
    """The skipped result when both tables carry this batch's watermark, else None."""
    if not all(wh.watermark(t, "ingest", batch_id) for t in ROUTES.values()):
        return None
    return IngestResult(batch_id, 0, 0, {}, True, {t: wh.committed_version(t, "ingest", batch_id) for t in ROUTES.values()})


def check_id_mode(wh: Warehouse, cfg: IngestConfig) -> None:
    """One kind of id per warehouse: refuse a batch whose mode differs from the warehouse's."""
    has_dictionary = wh.exists(id_dictionary.TABLE)
    if cfg.ids == "integer" and has_dictionary:
        raise IngestError(f"--ids integer: this warehouse maps string ids through {id_dictionary.TABLE} (its "
                          f"interactions hold dictionary ids, which integer ids would collide with); "
                          f"ingest with --ids string, or into another warehouse")
    if cfg.ids == "string" and not has_dictionary and wh.exists("interactions"):
        raise IngestError(f"--ids string: this warehouse's interactions were ingested with integer ids (there is "
                          f"no {id_dictionary.TABLE}); ingest with --ids integer, or into another warehouse")


def latest_ts(wh: Warehouse) -> int:
    """The warehouse's latest interaction ts (0 when it has none), from the Delta log's statistics."""
    return int(wh.column_max("interactions", "ts") or 0) if wh.exists("interactions") else 0


def ingest_dataframe(spark: Any, wh: Warehouse, raw: Any, batch_id: str, cols: ColumnMap = ColumnMap(),
                     cfg: IngestConfig = IngestConfig(), source: str = "dataframe") -> IngestResult:
    """Validate `raw` and commit it (good rows -> interactions, bad -> quarantine); idempotent per batch_id.

    String ids: the batch's new keys are committed to id_dictionary first (module docstring).
    """
    t0 = time.time()
    meta = CommitMeta("ingest", batch_id, config_hash=cfg.hash(cols), watermark=1, extra={"source": source})
    if (done := _already_ingested(wh, batch_id)) is not None:
        return done
    check_id_mode(wh, cfg)
    mapping, extra = _resolve_columns(raw.columns, cols, cfg)
    now_s = int(time.time())
    extra_md: dict[str, Any] = {}
    assigned = None
    _log(f"batch {batch_id}: counting input rows")
    try:
        if cfg.no_timestamps == "file-order":
            extra_md["ts_base"] = ts_base = latest_ts(wh) + 1
            raw, input_rows = with_file_order(spark, raw)
        else:
            ts_base, input_rows = None, raw.count()
        _log(f"batch {batch_id}: {input_rows} input rows; validating and writing files")
        checked = validate(raw, mapping, batch_id, cfg, now_s, ts_base)
        if cfg.ids == "string":
            keys = id_dictionary.batch_keys(checked.filter(checked["_route"] == "good"))
            assigned = id_dictionary.assign_ids(spark, wh, keys, batch_id, extra={"source": source}, log=_log)
            checked = id_dictionary.with_ids(spark, wh, checked, assigned.version)
            extra_md["id_dictionary_version"] = assigned.version
        staged = wh.stage_spark(checked, ROUTES, route_col="_route")
    except (IngestError, IdDictionaryError):
        raise
    except Exception as e:
        changed = ("no table was changed" if assigned is None else
                   f"{id_dictionary.TABLE} v{assigned.version} holds the batch's ids; running the batch again "
                   f"completes it")
        raise IngestError(f"cannot read input {source}: {str(e).strip().splitlines()[0][:500]} ({changed})") from e
    good, bad = staged["interactions"], staged["interactions_quarantine"]
    counts = dict.fromkeys(RULES, 0)
    if bad.files:
        rules = pq.read_table([f"{wh.uri(bad.table)}/{f.path}" for f in bad.files], columns=["rule"]).column("rule")
        counts.update({r["values"]: r["counts"] for r in pc.value_counts(rules).to_pylist()})
    if good.rows + bad.rows != input_rows:
        raise IngestError(f"batch {batch_id}: {input_rows} input rows but {good.rows} valid + {bad.rows} quarantined "
                          f"were written (input changed while reading?); nothing committed")
    extra_md = {"input_rows": input_rows, "quarantined": bad.rows, "now_s": now_s, **extra_md}
    m = CommitMeta(meta.job, meta.run_id, config_hash=meta.config_hash, watermark=1, extra={**meta.extra, **extra_md})
    rq = wh.commit(bad, m)       # quarantine first: see the module docstring
    ri = wh.commit(good, m)
    versions = {"interactions": ri.version, "interactions_quarantine": rq.version}
    if assigned is not None:
        versions[id_dictionary.TABLE] = assigned.version
    return IngestResult(batch_id, input_rows, good.rows, {k: v for k, v in counts.items() if v}, ri.skipped,
                        versions, ignored_columns=extra, seconds=time.time() - t0,
                        extra={"new_keys": dict(assigned.new_keys), "id_attempts": assigned.attempts}
                        if assigned is not None else {})


def ingest_path(spark: Any, wh: Warehouse, path: str, fmt: Format | None = None, batch_id: str | None = None,
                cols: ColumnMap = ColumnMap(), cfg: IngestConfig = IngestConfig()) -> IngestResult:
    """Read Parquet / CSV / Delta at `path` and ingest it (batch id defaults to the input's content id)."""
    if not os.path.exists(path) and "://" not in path:
        raise IngestError(f"cannot read input {path}: no such file or folder (no table was changed)")
    fmt = fmt or detect_format(path)
    batch_id = batch_id or default_batch_id(path, fmt)
    if (done := _already_ingested(wh, batch_id)) is not None:   # before reading anything
        return done
    return ingest_dataframe(spark, wh, read_input(spark, path, fmt), batch_id, cols, cfg, source=str(path))
