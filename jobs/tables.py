"""The Delta table layer (DESIGN.md §3, §7): atomic commits with metadata, pinned reads.

Writes are two-phase. *Stage*: Parquet data files are written into the table folder (by
Spark executors in `mapInArrow`, or by the driver for small Arrow data); staged files are
invisible because no Delta log entry names them. *Commit*: the driver checks every staged
file exists with the reported size, then commits them as ONE delta-rs transaction whose
commitInfo carries (job, run_id, round, config_hash). A job that dies between the two phases
leaves the table at its previous version; its orphan files are removed by `vacuum`.

Idempotency: a commit may carry a watermark `Transaction(app_id="job:run_id", version=w)`;
a later write with the same (job, run_id) and watermark <= the stored one is skipped.
Reads pin a version through delta-rs and hand Spark exactly that version's files.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

from jobs import faults
# schemas and staging live in their own modules; their names stay importable from here
from jobs.staging import META_DDL, Staged, StagedFile, _FileSink, _stage_task, conform, list_array  # noqa: F401
from jobs.table_specs import TABLES, TableSpec, spec  # noqa: F401

Mode = Literal["append", "overwrite"]
Version = int | datetime | None
# executor-side: a task's Arrow batches of df -> the rows to write, and str notes (Warehouse.stage_spark)
Transform = Callable[[Iterator[pa.RecordBatch]], Iterator["pa.RecordBatch | str"]]


# ---------------------------------------------------------------------------------------
# Commit metadata and results
# ---------------------------------------------------------------------------------------


class CommitError(RuntimeError):
    """A commit was refused before touching the log (e.g. a staged file is missing)."""


class VersionConflict(CommitError):
    """A commit made on top of an expected version found the table moved on; nothing was committed."""


@dataclass(frozen=True)
class CommitMeta:
    """What every commit records; `watermark` makes the write idempotent per (job, run_id)."""

    job: str
    run_id: str
    round: int | None = None
    config_hash: str | None = None
    watermark: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def app_id(self) -> str:
        return f"{self.job}:{self.run_id}"

    def custom_metadata(self, commit_id: str) -> dict[str, Any]:
        md: dict[str, Any] = {"dr.job": self.job, "dr.run_id": self.run_id, "dr.commit_id": commit_id}
        if self.round is not None:
            md["dr.round"] = int(self.round)
        if self.config_hash is not None:
            md["dr.config_hash"] = self.config_hash
        if self.watermark is not None:
            md["dr.watermark"] = int(self.watermark)
        md.update({f"dr.{k}": v for k, v in self.extra.items()})
        return md


@dataclass(frozen=True)
class CommitResult:
    """Outcome of a write: the table version it made (or found, when skipped)."""

    table: str
    version: int
    skipped: bool
    files: int
    rows: int


@dataclass(frozen=True)
class VersionInfo:
    """One entry of a table's history with the project's commit metadata."""

    version: int
    timestamp_ms: int
    operation: str
    job: str | None
    run_id: str | None
    round: int | None
    config_hash: str | None
    metadata: Mapping[str, Any]


# ---------------------------------------------------------------------------------------
# The warehouse
# ---------------------------------------------------------------------------------------


class Warehouse:
    """All tables under one root URI (a local folder by default)."""

    def __init__(self, root: str | Path) -> None:
        root = str(root)
        self.root = root if "://" in root else str(Path(root).resolve())

    def uri(self, table: str) -> str:
        spec(table)
        return f"{self.root.rstrip('/')}/{table}"

    # -- state ---------------------------------------------------------------------------

    def _table(self, table: str, version: Version = None) -> DeltaTable:
        try:
            dt = DeltaTable(self.uri(table), version=version if isinstance(version, int) else None)
        except TableNotFoundError:
            raise FileNotFoundError(f"table {table!r} does not exist under {self.root}") from None
        if isinstance(version, datetime):
            dt.load_as_version(version)
        return dt

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(table))

    def version(self, table: str) -> int | None:
        """Latest version, or None when the table does not exist yet."""
        return self._table(table).version() if self.exists(table) else None

    def watermark(self, table: str, job: str, run_id: str) -> int | None:
        """Highest watermark committed for (job, run_id), or None."""
        if not self.exists(table):
            return None
        return self._table(table).transaction_version(f"{job}:{run_id}")

    def _already_done(self, table: str, meta: CommitMeta) -> bool:
        if meta.watermark is None:
            return False
        wm = self.watermark(table, meta.job, meta.run_id)
        return wm is not None and wm >= meta.watermark

    def committed_version(self, table: str, job: str, run_id: str) -> int | None:
        """The latest version committed by (job, run_id), or None."""
        if not self.exists(table):
            return None
        mine = [v.version for v in self.versions(table) if (v.job, v.run_id) == (job, run_id)]
        return mine[-1] if mine else None

    def _skipped(self, table: str, meta: CommitMeta) -> CommitResult:
        # The version the earlier (job, run_id) commit made: what this write would have produced.
        v = self.committed_version(table, meta.job, meta.run_id)
        return CommitResult(table, self._table(table).version() if v is None else v, True, 0, 0)

    def versions(self, table: str) -> list[VersionInfo]:
        """Every version, oldest first, with the commit metadata this layer recorded."""
        if not self.exists(table):
            raise FileNotFoundError(f"table {table!r} does not exist under {self.root}")
        out = []
        for v, h in self._commit_infos(table):
            out.append(VersionInfo(
                version=v, timestamp_ms=int(h.get("timestamp", 0)),
                operation=str(h.get("operation", "")), job=h.get("dr.job"), run_id=h.get("dr.run_id"),
                round=h.get("dr.round"), config_hash=h.get("dr.config_hash"),
                metadata={k: v for k, v in h.items() if k.startswith("dr.")}))
        return out

    # -- writes --------------------------------------------------------------------------

    def stage_spark(self, df: Any, tables: str | Mapping[str, str], route_col: str | None = None,
                    transform: Transform | None = None, barrier: bool = False) -> dict[str, Staged]:
        """Executors write df's rows as Parquet into table folders; returns staged files per table.

        `tables` is one table name, or {route value: table} with `route_col` naming the column
        whose value picks each row's table (one pass over df for several tables). `transform`
        (Arrow batches -> Arrow batches) makes the rows in the writing task itself from df's
        batches, so they never pass through the JVM; a str it yields comes back in Staged.notes.
        barrier: the writing stage is a barrier stage (all its tasks at once: the transform may
        exchange data between them).
        """
        targets = {tables: tables} if isinstance(tables, str) else dict(tables)
        if (route_col is None) != isinstance(tables, str):
            raise ValueError("stage_spark: give one table, or a {value: table} map together with route_col")
        uris = {v: (t, self.uri(t)) for v, t in targets.items()}
        tag = uuid.uuid4().hex[:8]
        meta_rows = df.mapInArrow(lambda it: _stage_task(transform(it) if transform else it, uris, route_col, tag),
                                  META_DDL, barrier=barrier).collect()   # one small row per file
        files: dict[str, list[StagedFile]] = {t: [] for t in targets.values()}
        notes: dict[str, list[str]] = {t: [] for t in targets.values()}
        for r in meta_rows:
            if r["note"] is not None:
                notes[r["table"]].append(r["note"])
                continue
            files[r["table"]].append(StagedFile(r["path"], r["size"], json.loads(r["partition_values"]),
                                                r["num_records"], r["stats"]))
        return {t: Staged(t, tuple(fs), tuple(notes[t])) for t, fs in files.items()}

    def stage_arrow(self, table: str, data: pa.Table | pd.DataFrame | Iterable[pa.Table | pd.DataFrame]) -> Staged:
        """The driver writes Arrow/pandas data (or an iterable of chunks, streamed) as staged files."""
        sink = _FileSink(table, self.uri(table), f"d{uuid.uuid4().hex[:8]}")
        chunks = [data] if isinstance(data, (pa.Table, pd.DataFrame)) else data
        for chunk in chunks:
            sink.write(conform(table, chunk))
        return Staged(table, tuple(sink.close()))

    def _verify(self, staged: Staged) -> None:
        if not staged.files:
            return
        uri = self.uri(staged.table)
        fs, root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
        infos = fs.get_file_info([f"{root}/{f.path}" for f in staged.files])
        bad = [(f.path, f.size, i.size) for f, i in zip(staged.files, infos)
               if i.type != pafs.FileType.File or i.size != f.size]
        if bad:
            raise CommitError(f"table {staged.table}: {len(bad)} staged file(s) missing or of the wrong size, "
                              f"nothing committed; first: {bad[0][0]} (expected {bad[0][1]} bytes, found {bad[0][2]})")

    def commit(self, staged: Staged, meta: CommitMeta, mode: Mode = "append",
               expected_version: int | None = None) -> CommitResult:
        """Verify the staged files and commit them as ONE Delta transaction; returns its version.

        With `expected_version` (-1: the table must not exist yet) the commit lands only as the
        version right after it: delta-rs's conflict retries are off, and a table that has moved
        on raises VersionConflict with nothing committed (optimistic concurrency, see
        jobs/id_dictionary.py). Without it, concurrent appends are rebased as before.
        """
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be 'append' or 'overwrite', got {mode!r}")
        table = staged.table
        if self._already_done(table, meta):
            return self._skipped(table, meta)
        self._verify(staged)
        if expected_version is not None and (expected_version < 0) == self.exists(table):
            # The table exists where it should not, or vanished; a version that moved on is
            # delta-rs's to find (below), at the commit itself.
            raise VersionConflict(f"table {table}: expected version {expected_version}, found "
                                  f"{self.version(table)}; nothing committed")
        sp = spec(table)
        faults.at_commit(table, "before")
        now = int(time.time() * 1000)
        actions = [AddAction(f.path, f.size, dict(f.partition_values), now, True, f.stats) for f in staged.files]
        commit_id = uuid.uuid4().hex
        uri = self.uri(table)
        created = False
        if not self.exists(table):
            try:
                # No retries: a create that loses a race must not be rebased onto the winner's
                # table (delta-rs would commit a second metaData action with a new table id).
                create_table_with_add_actions(uri, Schema.from_arrow(sp.schema), actions, mode="error",
                                              partition_by=list(sp.partition_by) or None, name=table,
                                              commit_properties=self._props(meta, commit_id, retries=0))
                created = True
            except Exception:
                if not self.exists(table):   # a real failure, not a concurrent creator winning
                    raise
                if expected_version is not None:
                    raise VersionConflict(f"table {table}: created by a concurrent writer; nothing committed") from None
        if not created and expected_version is None:
            self._add_missing_columns(table)
            DeltaTable(uri).create_write_transaction(actions, mode, sp.schema, partition_by=list(sp.partition_by) or None,
                                                     commit_properties=self._props(meta, commit_id))
        elif not created:
            try:
                DeltaTable(uri, version=expected_version).create_write_transaction(
                    actions, mode, sp.schema, partition_by=list(sp.partition_by) or None,
                    commit_properties=self._props(meta, commit_id, retries=0))
            except CommitFailedError:
                if self.version(table) == expected_version:   # not a lost race: a real failure
                    raise
                raise VersionConflict(f"table {table}: version {expected_version + 1} was committed by a "
                                      f"concurrent writer; nothing committed") from None
        faults.at_commit(table, "after")
        return CommitResult(table, self._find_commit(table, commit_id), False, len(actions), staged.rows)

    def _add_missing_columns(self, table: str) -> None:
        # A nullable column added to a spec after the table was created: delta-rs would commit
        # files carrying it but keep the old schema, and readers would drop the column.
        dt = self._table(table)
        have = set(pa.schema(dt.schema().to_arrow()).names)
        missing = [f for f in spec(table).schema if f.name not in have and f.nullable]
        if missing:
            dt.alter.add_columns(list(Schema.from_arrow(pa.schema(missing)).fields), commit_properties=CommitProperties(
                custom_metadata={"dr.job": "schema", "dr.run_id": "add_columns:" + ",".join(f.name for f in missing)}))

    @staticmethod
    def _props(meta: CommitMeta, commit_id: str, retries: int | None = None) -> CommitProperties:
        return CommitProperties(
            custom_metadata=meta.custom_metadata(commit_id), max_commit_retries=retries,
            app_transactions=[Transaction(meta.app_id, int(meta.watermark))] if meta.watermark is not None else None)

    def _commit_infos(self, table: str, last: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        """(version, commitInfo) read from the log's commit files, oldest first.

        Read directly: delta-rs's history() numbers entries from its snapshot version and
        mis-numbers them when other writers commit while it lists.
        """
        log = f"{self.uri(table)}/_delta_log"
        fs, root = pafs.FileSystem.from_uri(log) if "://" in log else (pafs.LocalFileSystem(), log)
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
        versions = sorted(int(n[:20]) for n in names if len(n) == 25 and n.endswith(".json") and n[:20].isdigit())
        out = []
        for v in versions[-last:] if last else versions:
            with fs.open_input_stream(f"{root}/{v:020d}.json") as fh:
                lines = fh.read().decode().splitlines()
            actions = [json.loads(x) for x in lines if x.strip()]
            info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
            out.append((v, info))
        return out

    def _find_commit(self, table: str, commit_id: str) -> int:
        # Concurrent writers may commit after us: find our own version by its commit id.
        for v, info in reversed(self._commit_infos(table, last=200)):
            if info.get("dr.commit_id") == commit_id:
                return v
        raise CommitError(f"table {table}: committed, but commit {commit_id} is not in the last 200 versions")

    def write_spark(self, table: str, df: Any, meta: CommitMeta, mode: Mode = "append",
                    transform: Transform | None = None) -> CommitResult:
        """Executors write df (or `transform` of its batches, stage_spark) as Parquet, the driver commits
        them in one transaction."""
        if self._already_done(table, meta):
            return self._skipped(table, meta)
        if transform is None:
            sch = spec(table).schema
            missing = [n for n in sch.names if n not in df.columns]
            if missing:
                raise ValueError(f"table {table}: DataFrame lacks columns {missing} (has {df.columns})")
            df = df.select(*sch.names)
        return self.commit(self.stage_spark(df, table, transform=transform)[table], meta, mode)

    def write_arrow(self, table: str, data: pa.Table | pd.DataFrame | Iterable[pa.Table | pd.DataFrame],
                    meta: CommitMeta, mode: Mode = "append") -> CommitResult:
        """Write driver-side data (a table or an iterable of chunks) in one transaction."""
        if self._already_done(table, meta):
            return self._skipped(table, meta)
        return self.commit(self.stage_arrow(table, data), meta, mode)

    def merge(self, table: str, data: pa.Table | pd.DataFrame, meta: CommitMeta) -> CommitResult:
        """Upsert by the table's key in one transaction (update matched rows, insert the rest)."""
        sp = spec(table)
        if not sp.key:
            raise ValueError(f"table {table} has no key to merge on")
        src = conform(table, data)
        dup = src.group_by(list(sp.key)).aggregate([([], "count_all")]).filter(pc.field("count_all") > 1)
        if dup.num_rows:
            raise ValueError(f"merge into {table}: {dup.num_rows} key(s) appear more than once in the source, "
                             f"e.g. {dup.slice(0, 1).to_pylist()[0]}")
        if not self.exists(table):
            return self.write_arrow(table, src, meta)
        if self._already_done(table, meta):
            return self._skipped(table, meta)
        commit_id = uuid.uuid4().hex
        props = self._props(meta, commit_id)
        pred = " AND ".join(f"t.{k} = s.{k}" for k in sp.key)
        faults.at_commit(table, "before")
        (self._table(table).merge(src, pred, source_alias="s", target_alias="t", commit_properties=props)
         .when_matched_update_all().when_not_matched_insert_all().execute())
        faults.at_commit(table, "after")
        return CommitResult(table, self._find_commit(table, commit_id), False, 0, src.num_rows)

    def vacuum(self, table: str, retention_hours: int = 168) -> list[str]:
        """Delete unreferenced files older than the retention (orphans of killed jobs included).

        A retention shorter than the longest running write would delete that write's staged files.
        """
        return self._table(table).vacuum(retention_hours=retention_hours, dry_run=False,
                                         enforce_retention_duration=False, full=True)

    # -- reads ---------------------------------------------------------------------------

    def rows(self, table: str, version: Version = None) -> int:
        """Rows of a table version, from its Delta log's file statistics (no data read)."""
        acts = pa.table(self._table(table, version).get_add_actions(flatten=True))
        return int(pc.sum(acts.column("num_records")).as_py() or 0)

    def column_max(self, table: str, column: str, version: Version = None) -> Any:
        """Largest non-null value of a column (None: no rows), from the log's file statistics when all have it."""
        acts = pa.table(self._table(table, version).get_add_actions(flatten=True))
        stat = f"max.{column}"
        if stat in acts.column_names and not acts.column(stat).null_count:
            return pc.max(acts.column(stat)).as_py()
        # Files written without statistics (another writer): read the column, one batch at a time.
        best = None
        for b in self.batches(table, version, columns=[column]):
            m = pc.max(b.column(0)).as_py()
            best = m if best is None or (m is not None and m > best) else best
        return best

    def files(self, table: str, version: Version = None) -> list[str]:
        """Absolute URIs of the data files of one version."""
        return self._table(table, version).file_uris()

    def dataset(self, table: str, version: Version = None) -> pads.Dataset:
        """A pinned version as a pyarrow Dataset over exactly its files (partition values from the paths).

        Not delta-rs's to_pyarrow_dataset: its Python filesystem handler leaves Arrow threads that
        abort the interpreter at exit ("terminate called without an active exception", 3 exits in 4
        after a read here; apache/arrow#34314, delta-io/delta-rs#2184). Our tables carry no deletion
        vectors or column mapping, so the files and the schema are the whole table.
        """
        dt = self._table(table, version)
        schema = pa.schema(dt.schema().to_arrow())
        uri = self.uri(table)
        fs, base = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
        files = [f.split("://", 1)[1] if "://" in f else f for f in dt.file_uris()]
        parts = list(dt.metadata().partition_columns)
        partitioning = pads.partitioning(pa.schema([schema.field(c) for c in parts]), flavor="hive") if parts else None
        return pads.dataset(files, schema=schema, format="parquet", filesystem=fs, partitioning=partitioning,
                            partition_base_dir=base if parts else None)

    def read_arrow(self, table: str, version: Version = None, columns: list[str] | None = None) -> pa.Table:
        """The table at a pinned version (latest by default) as Arrow."""
        return self.dataset(table, version).to_table(columns=columns)

    def batches(self, table: str, version: Version = None, columns: list[str] | None = None,
                filter: Any = None, batch_size: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """The table at a pinned version, streamed batch by batch (memory: one batch), optionally filtered."""
        yield from self.dataset(table, version).to_batches(columns=columns, filter=filter, batch_size=batch_size)

    def read_spark(self, spark: Any, table: str, version: Version = None,
                   partitions: list[tuple[str, str, Any]] | None = None) -> Any:
        """The table at a pinned version as a Spark DataFrame over exactly that version's files (only
        those of the matching partitions, e.g. [("date", "=", "2026-11-03")]: the rest are never listed)."""
        return delta_to_spark(spark, self._table(table, version), self.uri(table), partitions)


def delta_to_spark(spark: Any, dt: DeltaTable, uri: str, partitions: list[tuple[str, str, Any]] | None = None) -> Any:
    """A loaded (pinned) DeltaTable as a Spark DataFrame over exactly its files; any Delta table."""
    from pyspark.sql.pandas.types import from_arrow_schema

    arrow_schema = pa.schema(dt.schema().to_arrow())
    sschema = from_arrow_schema(arrow_schema)
    files = dt.file_uris(file_pruning_predicate=partitions) if partitions else dt.file_uris()
    if not files:
        return spark.createDataFrame([], sschema)
    # basePath makes Spark read partition values (date=...) from the paths, typed by sschema.
    df = spark.read.schema(sschema).option("basePath", uri).parquet(*files)
    return df.select(*arrow_schema.names)
