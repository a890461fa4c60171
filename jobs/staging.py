"""Staging: Parquet data files written into a table folder, not yet committed (executor and driver, same code).

A staged file is invisible until the warehouse commits a Delta log entry naming it; a job
that dies before that leaves orphans for `vacuum` (jobs/tables.py).
"""
from __future__ import annotations

import json
import math
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.table_specs import spec


@dataclass(frozen=True)
class StagedFile:
    """One data file written into a table folder, not yet committed."""

    path: str                       # relative to the table root
    size: int
    partition_values: Mapping[str, str | None]
    num_records: int
    stats: str                      # Delta stats JSON


@dataclass(frozen=True)
class Staged:
    """The files staged for one table by one write, and the notes its tasks returned with them."""

    table: str
    files: tuple[StagedFile, ...]
    notes: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return sum(f.num_records for f in self.files)


# ---------------------------------------------------------------------------------------
# Staging: write Parquet files into a table folder (executor- and driver-side, same code)
# ---------------------------------------------------------------------------------------

_META_SCHEMA = pa.schema([
    ("table", pa.string()), ("path", pa.string()), ("size", pa.int64()),
    ("partition_values", pa.string()), ("num_records", pa.int64()), ("stats", pa.string()), ("note", pa.string()),
])
META_DDL = ("table string, path string, size long, partition_values string, num_records long, stats string, "
            "note string")
_MAX_ROWS_PER_FILE = 4_000_000
# a Parquet row group per this many buffered rows (or bytes, whichever first): Spark hands a task
# Arrow batches of spark.sql.execution.arrow.maxRecordsPerBatch rows, and one row group per batch
# made readers pay per-group overhead (pyarrow read path_scores 4x slower at 20,000-row groups);
# a sink buffers at most _ROW_GROUP_BYTES over all its open files (a task writing many date
# partitions flushes its largest buffer first), plus one batch
_ROW_GROUP_ROWS = 1 << 20
_ROW_GROUP_BYTES = 64 << 20


def _partition_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return str(value)


class _StatsAcc:
    """Delta per-file statistics (numRecords, nullCount, min/max of numeric and date columns)."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows = 0
        self.nulls = {f.name: 0 for f in schema}
        self.mins: dict[str, Any] = {}
        self.maxs: dict[str, Any] = {}

    def add(self, tbl: pa.Table) -> None:
        self.rows += tbl.num_rows
        for f in self.schema:
            col = tbl.column(f.name)
            self.nulls[f.name] += col.null_count
            t = f.type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_date32(t)):
                continue
            mm = pc.min_max(col).as_py()
            lo, hi = mm["min"], mm["max"]
            if lo is None or (isinstance(lo, float) and not (math.isfinite(lo) and math.isfinite(hi))):
                continue
            self.mins[f.name] = lo if f.name not in self.mins else min(self.mins[f.name], lo)
            self.maxs[f.name] = hi if f.name not in self.maxs else max(self.maxs[f.name], hi)

    def json(self) -> str:
        enc = {k: _partition_str(v) if isinstance(v, date) else v for k, v in self.mins.items()}
        enc_max = {k: _partition_str(v) if isinstance(v, date) else v for k, v in self.maxs.items()}
        return json.dumps({"numRecords": self.rows, "minValues": enc, "maxValues": enc_max, "nullCount": self.nulls})


class _FileSink:
    """Writes conforming Arrow data into one table folder: one open file per partition value."""

    def __init__(self, table: str, uri: str, tag: str) -> None:
        self.spec = spec(table)
        self.table = table
        self.fs, self.root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
        self.tag = tag
        self.open: dict[str | None, tuple[pq.ParquetWriter, str, _StatsAcc, dict[str, str | None]]] = {}
        self.pending: dict[str | None, list[pa.Table]] = {}
        self.pending_bytes: dict[str | None, int] = {}
        self.last_group: dict[str | None, Any] = {}      # file_group value of the open file's last row
        self.done: list[StagedFile] = []

    def _new_file(self, pvalues: dict[str, str | None]) -> tuple[pq.ParquetWriter, str, _StatsAcc, dict[str, str | None]]:
        parts = [f"{k}={urllib.parse.quote(v if v is not None else '__HIVE_DEFAULT_PARTITION__', safe='-_.')}"
                 for k, v in pvalues.items()]
        rel = "/".join([*parts, f"part-{self.tag}-{uuid.uuid4().hex[:12]}.parquet"])
        full = f"{self.root.rstrip('/')}/{rel}"
        self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        writer = pq.ParquetWriter(full, self.spec.file_schema, filesystem=self.fs, compression="snappy")
        return writer, rel, _StatsAcc(self.spec.file_schema), pvalues

    def write(self, tbl: pa.Table) -> None:
        """tbl must already have the table's schema (see conform)."""
        if tbl.num_rows == 0:
            return
        if not self.spec.partition_by:
            self._write_part(None, {}, tbl)
            return
        pcol = self.spec.partition_by[0]
        col = tbl.column(pcol)
        for value in pc.unique(col).to_pylist():
            sub = tbl.filter(pc.is_null(col) if value is None else pc.equal(col, pa.scalar(value, col.type)))
            pv = _partition_str(value)
            self._write_part(pv, {pcol: pv}, sub)

    def _write_part(self, key: str | None, pvalues: dict[str, str | None], tbl: pa.Table) -> None:
        data = tbl.select(self.spec.file_schema.names)
        while data.num_rows:
            if key not in self.open:
                self.open[key] = self._new_file(pvalues)
            n = self._rows_to_file(key, data)
            if n:
                self._append(key, data.slice(0, n))
            data = data.slice(n)
            acc = self.open[key][2]
            if data.num_rows or (acc.rows >= _MAX_ROWS_PER_FILE and not self.spec.file_group):
                self._close(key)

    def _rows_to_file(self, key: str | None, data: pa.Table) -> int:
        """How many leading rows of data go into the open file before it rolls (all: it does not roll here).

        Without a file group the file rolls after the batch that fills it; with one, at the first
        change of the group's value once the file is full (spec.file_group).
        """
        acc, group = self.open[key][2], self.spec.file_group
        room = _MAX_ROWS_PER_FILE - acc.rows
        if group is None or room >= data.num_rows:
            return data.num_rows
        col = data.column(group).to_numpy()
        last = self.last_group.get(key)
        change = np.flatnonzero(np.r_[last is not None and col[0] != last, col[1:] != col[:-1]])
        after = change[change >= max(room, 0)]
        return int(after[0]) if after.size else data.num_rows

    def _append(self, key: str | None, data: pa.Table) -> None:
        buf = self.pending.setdefault(key, [])
        buf.append(data)
        self.pending_bytes[key] = self.pending_bytes.get(key, 0) + data.nbytes
        self.open[key][2].add(data)
        if self.spec.file_group:
            self.last_group[key] = data.column(self.spec.file_group)[-1].as_py()
        if sum(t.num_rows for t in buf) >= _ROW_GROUP_ROWS:
            self._flush(key)
        while sum(self.pending_bytes.values()) >= _ROW_GROUP_BYTES:
            self._flush(max(self.pending_bytes, key=self.pending_bytes.__getitem__))

    def _flush(self, key: str | None) -> None:
        buf = self.pending.pop(key, [])
        self.pending_bytes.pop(key, None)
        if buf:
            self.open[key][0].write_table(pa.concat_tables(buf), row_group_size=_ROW_GROUP_ROWS)

    def _close(self, key: str | None) -> None:
        self._flush(key)
        writer, rel, acc, pv = self.open.pop(key)
        self.last_group.pop(key, None)
        writer.close()
        size = self.fs.get_file_info(f"{self.root.rstrip('/')}/{rel}").size
        self.done.append(StagedFile(rel, int(size), dict(pv), acc.rows, acc.json()))

    def close(self) -> list[StagedFile]:
        for key in list(self.open):
            self._close(key)
        return self.done


def list_array(rows: np.ndarray, pad: int | None = None, dtype: Any = np.int64) -> pa.ListArray:
    """[n, w] matrix -> list<dtype> array of n rows (int64 by default); with `pad`, the pad entries are left out."""
    rows = np.asarray(rows, dtype=dtype)
    keep = np.ones(rows.shape, dtype=bool) if pad is None else rows != pad
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows[keep]))


def conform(table: str, data: pa.Table | pa.RecordBatch | pd.DataFrame) -> pa.Table:
    """Select and cast data to the table's exact schema (clear error on missing columns / nulls)."""
    sch = spec(table).schema
    if isinstance(data, pd.DataFrame):
        data = pa.Table.from_pandas(data, preserve_index=False)
    elif isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    missing = [n for n in sch.names if n not in data.column_names]
    if missing:
        raise ValueError(f"table {table}: input lacks columns {missing} (has {data.column_names})")
    data = data.select(sch.names)
    for f in sch:
        if not f.nullable and data.column(f.name).null_count:
            raise ValueError(f"table {table}: column {f.name!r} has {data.column(f.name).null_count} nulls but is NOT NULL")
    return data.cast(sch)


def _stage_task(batches: Iterator[pa.RecordBatch | str], targets: Mapping[str, tuple[str, str]],
                route_col: str | None, tag: str) -> Iterator[pa.RecordBatch]:
    """Executor body: route each batch's rows to their tables' sinks; yield one row per file.

    A str among the batches is a note for the driver (Staged.notes of the first target table):
    it comes back as a row of its own, with no file.
    """
    from pyspark import TaskContext

    ctx = TaskContext.get()
    task_tag = f"{tag}-{ctx.partitionId():05d}-{ctx.attemptNumber()}" if ctx else tag
    sinks = {value: _FileSink(table, uri, task_tag) for value, (table, uri) in targets.items()}
    notes = []
    for batch in batches:
        if isinstance(batch, str):
            notes.append((next(iter(targets.values()))[0], None, 0, "{}", 0, "", batch))
            continue
        if route_col is None:
            (value,) = sinks
            sinks[value].write(conform(sinks[value].table, batch))
            continue
        route = batch.column(route_col)
        for value, sink in sinks.items():
            sub = batch.filter(pc.equal(route, value))
            if sub.num_rows:
                sink.write(conform(sink.table, sub))
    rows = [(s.table, f.path, f.size, json.dumps(dict(f.partition_values)), f.num_records, f.stats, None)
            for s in sinks.values() for f in s.close()] + notes
    if rows:
        yield pa.RecordBatch.from_arrays([pa.array(c, t.type) for c, t in zip(zip(*rows), _META_SCHEMA)],
                                         schema=_META_SCHEMA)
