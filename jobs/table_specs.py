"""Table schemas (DESIGN.md §3): every Delta table's Arrow schema, partition column and row key."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


def _field(name: str, typ: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_ID = pa.int64()
_IDS = pa.list_(pa.int64())

# ---------------------------------------------------------------------------------------
# Schemas (DESIGN.md §3). Times are int64 seconds since the epoch (UTC) unless typed.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    """A table's name, Arrow schema, partition column (at most one), row key and file group column.

    file_group: consecutive rows with the same value of this column never end up in two data
    files (a writer rolls its file only where the value changes; jobs.staging), so a reader
    of one file sees whole groups (path_scores: an item's whole list).
    """

    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    file_group: str | None = None

    def __post_init__(self) -> None:
        if len(self.partition_by) > 1:
            raise ValueError(f"table {self.name}: at most one partition column is supported")
        missing = [c for c in (*self.partition_by, *self.key, *([self.file_group] if self.file_group else []))
                   if c not in self.schema.names]
        if missing:
            raise ValueError(f"table {self.name}: columns {missing} are not in its schema")

    @property
    def file_schema(self) -> pa.Schema:
        """Schema of the data files: partition columns live in the path, not in the file."""
        return pa.schema([f for f in self.schema if f.name not in self.partition_by])


TABLES: dict[str, TableSpec] = {t.name: t for t in [
    TableSpec("interactions", pa.schema([
        _field("user_id", _ID, False), _field("item_id", _ID, False),
        _field("ts", pa.int64(), False),            # event time, seconds since epoch (UTC)
        _field("event", pa.string(), False),        # view | click | cart | purchase | rating
        _field("weight", pa.float32(), False),
        _field("rating", pa.float32()),             # explicit rating when the source has one
        _field("batch_id", pa.string(), False),     # ingest batch that brought the row
        _field("date", pa.date32(), False),         # UTC day of ts (partition)
    ]), partition_by=("date",)),
    TableSpec("interactions_quarantine", pa.schema([
        _field("batch_id", pa.string(), False),
        _field("rule", pa.string(), False),         # the first validation rule the row broke
        _field("field", pa.string(), False),        # the input column that broke it
        _field("detail", pa.string()),              # the offending value / reason
        _field("raw", pa.string(), False),          # the whole input row as JSON
        _field("source", pa.string()),              # input file
    ])),
    TableSpec("items", pa.schema([
        _field("item_id", _ID, False), _field("title", pa.string()), _field("category", pa.string()),
    ]), key=("item_id",)),
    TableSpec("path_scores", pa.schema([
        _field("item_id", _ID, False), _field("path", pa.int64(), False),
        _field("score", pa.float64(), False), _field("n_v", pa.float64(), False),   # decayed in streaming mode
    ]), key=("item_id", "path"), file_group="item_id"),
    TableSpec("item_paths", pa.schema([
        _field("item_id", _ID, False), _field("slot", pa.int32(), False),
        _field("path", pa.int64(), False), _field("score", pa.float64()),
    ]), key=("item_id", "slot")),
    TableSpec("path_index", pa.schema([
        _field("path", pa.int64(), False), _field("item_id", _ID, False),
        _field("slot", pa.int32(), False), _field("score", pa.float64()),
    ]), key=("path", "item_id")),
    TableSpec("candidates", pa.schema([
        _field("user_id", _ID, False), _field("rank", pa.int32(), False), _field("item_id", _ID, False),
        _field("score", pa.float32()), _field("run_id", pa.string(), False),
        _field("run_date", pa.date32(), False),
        _field("user_key", pa.string()), _field("item_key", pa.string()),   # original ids (null: integer ids)
    ]), partition_by=("run_date",), key=("run_id", "user_id", "rank")),
    # String user / item keys -> dense int64 ids, per kind from 0 (jobs/id_dictionary.py); never rewritten.
    TableSpec("id_dictionary", pa.schema([
        _field("kind", pa.string(), False),         # user | item
        _field("key", pa.string(), False),          # the original id, trimmed
        _field("id", _ID, False),
        _field("batch_id", pa.string(), False),     # ingest batch that brought the key
    ]), key=("kind", "key")),
    TableSpec("runs", pa.schema([
        _field("run_id", pa.string(), False), _field("job", pa.string(), False),
        _field("status", pa.string(), False),       # started | succeeded | failed
        _field("ts", pa.timestamp("us", tz="UTC"), False),
        _field("config_hash", pa.string()),
        _field("table_versions", pa.string()),      # JSON {table: version}
        _field("checkpoint", pa.string()),          # URI of the model checkpoint
        _field("metrics", pa.string()),             # JSON
    ])),
    # Split (jobs/split.py): histories are the <= L previous items, left-padded with -1 to L.
    TableSpec("samples_train", pa.schema([
        _field("user_id", _ID, False), _field("pos", pa.int32(), False),   # 0-based event index
        _field("hist", _IDS, False), _field("target", _ID, False),
        _field("next", _IDS, False),                # target + the user's next items (<= train.rerank_targets)
    ]), key=("user_id", "pos")),
    TableSpec("eval_users", pa.schema([
        _field("user_id", _ID, False), _field("role", pa.int8(), False),   # 1 validation, 2 test
        _field("hist", _IDS, False),                # last <= L items of the first half
        _field("n_input", pa.int32(), False),       # events in the first half (n // 2)
        _field("input", _IDS, False),               # the whole first half, in time order (baselines)
        _field("truth", _IDS, False),               # second half, in time order
    ]), key=("user_id",)),
    # Catalog items without interactions given paths by `dr backfill cold-items` (jobs/cold_items.py).
    TableSpec("cold_item_paths", pa.schema([
        _field("item_id", _ID, False), _field("slot", pa.int32(), False), _field("path", pa.int64(), False),
        _field("method", pa.string(), False),           # category | least_loaded (older rows: neighbor)
        _field("neighbor_item_id", _ID, False),         # its category's item nearest the category mean (-1: none)
        _field("item_paths_version", pa.int64(), False), _field("run_id", pa.string(), False),
    ]), key=("item_id", "slot")),
    # ... and their reranker vectors (category mean, else global mean); read by the serving bundle.
    TableSpec("cold_item_vectors", pa.schema([
        _field("item_id", _ID, False), _field("embedding", pa.list_(pa.float32()), False),
        _field("bias", pa.float64(), False),
        _field("item_paths_version", pa.int64(), False), _field("run_id", pa.string(), False),
    ]), key=("item_id",)),
    # Activity state kept night over night (jobs/user_state.py): last L kept events per user, last event per item.
    TableSpec("user_state", pa.schema([
        _field("user_id", _ID, False), _field("items", _IDS, False),   # last <= L kept items, time order
        _field("ts", pa.list_(pa.int64()), False),                       # their event times
        _field("n_events", pa.int64(), False), _field("last_ts", pa.int64(), False),
    ]), key=("user_id",)),
    TableSpec("item_state", pa.schema([
        _field("item_id", _ID, False), _field("last_ts", pa.int64(), False), _field("n_events", pa.int64(), False),
    ]), key=("item_id",)),
    # Synthetic ground truth (jobs/datasets.py): user -> planted interest clusters.
    TableSpec("synthetic_truth", pa.schema([
        _field("user_id", _ID, False), _field("slot", pa.int32(), False), _field("cluster", pa.int64(), False),
    ]), key=("user_id", "slot")),
]}


def spec(table: str) -> TableSpec:
    """The TableSpec of a known table (clear error otherwise)."""
    try:
        return TABLES[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; known: {sorted(TABLES)}") from None
