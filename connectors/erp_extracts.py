"""ERP extract files (scheduled full and delta exports) as a Bytewax source of canonical changes.

Many ERPs cannot stream change data capture; they drop scheduled extracts
instead: a nightly full export of the item master, an hourly inventory
snapshot, a delta export of changed sales orders. This source watches a
directory of such files and turns them into the same canonical changes the
Debezium decoder makes (`Change(source="erp", entity=<table>, op=UPSERT or
DELETE, ...)`), so the rest of the flow cannot tell extracts from CDC.

- File names carry table, kind (`full` or `delta`), export sequence and/or
  export timestamp (`FileNaming`); a table's files are applied in export order.
- Change detection runs in DuckDB: a full snapshot is compared with the
  table's previous state by primary key and an MD5 hash of the canonical row
  image (creates/updates for new or changed rows, deletes for absent ones); a
  delta applies its rows (deletes where its delete column marks them). Rows
  equal to the current state produce nothing, so an unchanged re-export emits
  no events.
- A file is applied whole or not at all: a malformed file (bad header, too
  many unusable rows, duplicate primary keys in a full snapshot, unreadable or
  truncated) becomes one dead letter and the table's cursor does not move. An
  export older than the last applied one is skipped and counted as ignored.
- Memory stays bounded: files are read, compared and stored by DuckDB (which
  spills to disk beyond `memory_limit_mb`), and results reach Python in pages
  of `batch_size` rows.

The previous state lives in one DuckDB file per table under `state_dir`, with
the history of superseded rows, so it can be rolled back to whatever file a
resume snapshot names (history older than the `keep_snapshots`-th newest
snapshot is pruned, as the views writer does with its undo log).

Delivery: one partition per table, its snapshot holds the last applied file
and, mid-file, how many of the file's events were emitted. A resume rolls the
table state back to that file, recomputes the interrupted file's events
(deterministically) and continues after the last emitted one: no event is
lost or emitted twice with respect to the snapshot (exactly-once into the
flow's state, which is snapshotted together with this position).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from sferp.operators.decode_common import EXACT_LIMITS, RAW_LIMIT, dumps_compact_sorted
from sferp.operators.decode_erp import BOUNDED_COLUMNS, PRIMARY_KEYS
from sferp.operators.extract_routing import ExtractBatch, extract_topic

from sferp.config import DEFAULT_EXTRACT_PATTERN
from sferp.duckdb_connect import connect
from sferp.events import (
    DELETE,
    ERP,
    EVENT_TIME_MAX_MS,
    EVENT_TIME_MIN_MS,
    UPSERT,
    Change,
    DeadLetter,
)

__all__ = [
    "DEFAULT_FILE_PATTERN",
    "ERP_EXTRACT_TABLES",
    "ExtractFile",
    "ErpExtractSource",
    "ExtractStateError",
    "FileNaming",
    "ORDER_BASE",
    "TABLE_COLUMNS",
]

log = logging.getLogger("sferp.extracts")

# The columns of each ERP table (CONTRACT §1.2) and how a value is read:
# text (empty is null), int (a whole number; stored as a JSON integer), decimal
# (a finite decimal; stored as its text, as Debezium's string mode sends it),
# bool (true/false, t/f, 1/0, yes/no; stored as a JSON boolean).
TABLE_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "items": (
        ("sku", "text"),
        ("description", "text"),
        ("list_price", "decimal"),
        ("active", "bool"),
    ),
    "inventory": (
        ("sku", "text"),
        ("warehouse", "text"),
        ("qty_on_hand", "int"),
        ("qty_allocated", "int"),
    ),
    "sales_orders": (
        ("order_no", "int"),
        ("sf_order_id", "text"),
        ("customer_no", "text"),
        ("status", "text"),
        ("total_amount", "decimal"),
        ("currency", "text"),
    ),
}
ERP_EXTRACT_TABLES = tuple(TABLE_COLUMNS)

# Order key of an extract event: export sequence * ORDER_BASE + row number, so
# every event of a file sorts after every event of an earlier file.
ORDER_BASE = 10**9
MAX_SEQUENCE = (2**63 - 1) // ORDER_BASE - 1

DEFAULT_FILE_PATTERN = DEFAULT_EXTRACT_PATTERN  # sferp.config, README "Batch extracts"

_INT_RE = r"^[+-]?[0-9]+(\.0*)?$"
_DECIMAL_RE = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_FORMATS = {
    "csv": "csv",
    "csv.gz": "csv",
    "tsv": "csv",
    "parquet": "parquet",
    "pq": "parquet",
    "jsonl": "jsonl",
    "jsonl.gz": "jsonl",
    "ndjson": "jsonl",
    "json": "jsonl",
}


class ExtractStateError(RuntimeError):
    """The table state cannot be brought back to the file a resume snapshot names."""


class ExtractFile(NamedTuple):
    """One extract file as found in the directory."""

    path: str
    name: str
    table: str
    kind: str  # "full" or "delta"
    seq: int  # export sequence: from the name, else the export time in epoch seconds
    export_ms: int  # export time: from the name, else the file's modification time
    fmt: str  # csv, parquet or jsonl
    size: int
    mtime_ns: int


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _parse_ts(text: str) -> int:
    """`YYYYMMDDTHHMMSS[mmm]Z` as epoch milliseconds (UTC)."""
    dt = datetime.strptime(text[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    ms = int(text[15:18]) if len(text) == 19 else 0
    return int(dt.timestamp()) * 1000 + ms


class FileNaming:
    """The naming rule: a regular expression matched against the whole file name.

    Named groups: `table` (an ERP table), `kind` (`full` or `delta`), and at
    least one of `seq` (the export sequence, digits) and `ts` (the export time,
    `YYYYMMDDTHHMMSSZ` or `YYYYMMDDTHHMMSSmmmZ`, UTC); optionally `ext` (the
    format, else taken from the name's suffix). Without `seq` the sequence is
    the export time in epoch seconds; without `ts` the export time is the
    file's modification time.
    """

    def __init__(self, pattern: str = DEFAULT_FILE_PATTERN, fmt: str = "auto") -> None:
        self.regex = re.compile(pattern)
        groups = self.regex.groupindex
        if "table" not in groups or "kind" not in groups:
            raise ValueError("the file pattern needs the named groups 'table' and 'kind'")
        if "seq" not in groups and "ts" not in groups:
            raise ValueError("the file pattern needs a named group 'seq' or 'ts' (or both)")
        if fmt not in ("auto", "csv", "parquet", "jsonl"):
            raise ValueError(f"unknown extract format {fmt!r}")
        self.fmt = fmt

    def parse(self, name: str) -> tuple[str, str, int | None, int | None, str] | None:
        """`(table, kind, seq, ts_ms, fmt)` for an extract file name, else None."""
        m = self.regex.fullmatch(name)
        if m is None:
            return None
        g = m.groupdict()
        kind = (g.get("kind") or "").lower()
        if kind not in ("full", "delta"):
            return None
        seq = int(g["seq"]) if g.get("seq") else None
        ts_ms = None
        if g.get("ts"):
            try:
                ts_ms = _parse_ts(g["ts"])
            except ValueError:
                return None
        if seq is None and ts_ms is None:
            return None
        if seq is None:
            seq = ts_ms // 1000  # type: ignore[operator]
        if not 0 <= seq <= MAX_SEQUENCE:
            return None
        fmt = self.fmt
        if fmt == "auto":
            ext = (g.get("ext") or "").lower()
            if not ext:
                parts = name.lower().split(".")
                ext = ".".join(parts[-2:]) if parts[-1] == "gz" else parts[-1]
            fmt = _FORMATS.get(ext, "")
            if not fmt:
                return None
        return g["table"], kind, seq, ts_ms, fmt


def scan(directory: str, table: str, naming: FileNaming) -> list[ExtractFile]:
    """The extract files of `table` in `directory` (and `directory/<table>/`), in export order.

    Export order is by sequence; for equal sequences a full snapshot comes
    before a delta, then by name.
    """
    found: list[ExtractFile] = []
    for where in (directory, os.path.join(directory, table)):
        try:
            entries = list(os.scandir(where))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            parsed = naming.parse(e.name)
            if parsed is None or parsed[0] != table:
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            if not e.is_file():
                continue
            _, kind, seq, ts_ms, fmt = parsed
            export_ms = ts_ms if ts_ms is not None else _event_time(st.st_mtime_ns // 1_000_000)
            found.append(
                ExtractFile(
                    e.path, e.name, table, kind, seq, export_ms, fmt, st.st_size, st.st_mtime_ns
                )
            )
    found.sort(key=lambda f: (f.seq, f.kind != "full", f.name))
    return found


# --- the table state in DuckDB ----------------------------------------------------------------


class Applied(NamedTuple):
    """A file whose changes are computed and committed to the table state."""

    rows: int  # data rows read (good and bad)
    upserts: int
    deletes: int
    bad: int  # unusable rows (dead letters; within the tolerance)
    pending: int  # rows of the pending table: dead letters first, then events


class Quarantined(NamedTuple):
    """A file that is not applied, and why."""

    reason: str


class _Reject(Exception):
    """The file is malformed; the message is the reason."""


def _read_csv_header(path: str, delimiter: str) -> list[str]:
    opener: Any = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            header = next(csv.reader(text, delimiter=delimiter), None)
    except UnicodeDecodeError:
        raise _Reject("header is not UTF-8") from None
    except (OSError, EOFError, csv.Error) as e:
        raise _Reject(f"unreadable: {_first_line(str(e))}") from None
    if not header:
        raise _Reject("empty file (no header)")
    return [h.strip() for h in header]


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


class TableState:
    """One table's extract state in its own DuckDB file: current rows and their history.

    `cur(k, h, img, seq_from)` holds the live rows (primary key as JSON, MD5 of
    the image, the image, the sequence of the file that set it);
    `hist(..., seq_to)` the rows superseded or deleted by a later file, kept
    so the state can be rolled back to an earlier file; `applied` logs every
    applied file. `pending` holds the outcome of the file being applied,
    dead letters first, then events in order-key order.
    """

    def __init__(self, path: Path, table: str, memory_limit_mb: int = 256) -> None:
        self.path = path
        self.table = table
        self.memory_limit_mb = memory_limit_mb
        self.columns = TABLE_COLUMNS[table]
        self.pk = PRIMARY_KEYS[table]
        self.con: duckdb.DuckDBPyConnection | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the state file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f"{self.path.stem}.tmp"
        con = connect(
            str(self.path),
            config={
                "memory_limit": f"{self.memory_limit_mb}MB",
                "temp_directory": str(tmp),
                "preserve_insertion_order": True,
            },
        )
        con.execute(
            "CREATE TABLE IF NOT EXISTS cur (k VARCHAR, h UHUGEINT, img VARCHAR, seq_from BIGINT)"
        )
        con.execute(
            "CREATE TABLE IF NOT EXISTS hist "
            "(k VARCHAR, h UHUGEINT, img VARCHAR, seq_from BIGINT, seq_to BIGINT)"
        )
        con.execute(
            "CREATE TABLE IF NOT EXISTS applied (seq BIGINT, name VARCHAR, kind VARCHAR, "
            "export_ms BIGINT, rows BIGINT, upserts BIGINT, deletes BIGINT, bad BIGINT)"
        )
        con.execute("CREATE TABLE IF NOT EXISTS meta (pruned_upto BIGINT)")
        self.con = con

    def close(self) -> None:
        """Close the state file."""
        if self.con is not None:
            self.con.close()
            self.con = None

    def _c(self) -> duckdb.DuckDBPyConnection:
        assert self.con is not None, "state not open"
        return self.con

    # -- positions ----------------------------------------------------------------------------

    def rollback(self, seq: int | None) -> None:
        """Bring the state back to just after the file with sequence `seq` (None: empty)."""
        con = self._c()
        if seq is None:
            con.execute("BEGIN")
            for t in ("cur", "hist", "applied", "meta"):
                con.execute(f"DELETE FROM {t}")
            con.execute("COMMIT")
            return
        pruned = con.execute("SELECT max(pruned_upto) FROM meta").fetchone()[0]
        known = con.execute("SELECT count(*) FROM applied WHERE seq = ?", [seq]).fetchone()[0]
        last = con.execute("SELECT max(seq) FROM applied").fetchone()[0]
        if not known or (pruned is not None and seq < pruned):
            why = (
                f"its history reaches back to export {pruned} only"
                if known
                else f"it knows no applied export {seq} (last applied: {last})"
            )
            raise ExtractStateError(
                f"cannot bring the extract state {self.path} back to export {seq} of "
                f"{self.table!r}: {why}; the state directory belongs to another run or was "
                "lost. Rebuild from scratch with a new recovery directory and views file."
            )
        con.execute("BEGIN")
        con.execute("DELETE FROM cur WHERE seq_from > ?", [seq])
        con.execute(
            "INSERT INTO cur SELECT k, h, img, seq_from FROM hist "
            "WHERE seq_from <= $1 AND seq_to > $1",
            [seq],
        )
        con.execute("DELETE FROM hist WHERE seq_to > ?", [seq])
        con.execute("DELETE FROM applied WHERE seq > ?", [seq])
        con.execute("COMMIT")

    def prune(self, upto: int) -> None:
        """Forget history no rollback to export `upto` or later can need."""
        con = self._c()
        con.execute("BEGIN")
        con.execute("DELETE FROM hist WHERE seq_to <= ?", [upto])
        con.execute("DELETE FROM meta")
        con.execute("INSERT INTO meta VALUES (?)", [upto])
        con.execute("COMMIT")

    def live_rows(self) -> int:
        """How many rows the table has now."""
        return int(self._c().execute("SELECT count(*) FROM cur").fetchone()[0])

    # -- applying a file ------------------------------------------------------------------------

    def apply(
        self,
        f: ExtractFile,
        *,
        bad_row_tolerance: float = 0.0,
        delete_column: str = "_deleted",
        csv_delimiter: str = ",",
    ) -> Applied | Quarantined:
        """Validate `f`, compute its changes against the current state and commit them.

        The changes (and the dead letters of tolerated bad rows) are left in
        `pending` for `page`. A malformed file changes nothing.
        """
        con = self._c()
        try:
            has_del, rejects = self._stage(f, delete_column, csv_delimiter)
            return self._diff(f, has_del, rejects, bad_row_tolerance)
        except _Reject as e:
            return Quarantined(str(e))
        except duckdb.OutOfMemoryException as e:
            # Not the file's fault: fail loudly instead of quarantining a good file.
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise RuntimeError(
                f"{f.name}: DuckDB ran out of memory with erp_extracts.memory_limit_mb = "
                f"{self.memory_limit_mb} (and its spill directory): {_first_line(str(e))}"
            ) from e
        except duckdb.Error as e:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            return Quarantined(f"unreadable: {_first_line(str(e).replace(f.path, f.name))}")
        finally:
            for t in ("raw", "rows", "rej", "rej_scan", "rej_lines"):
                try:
                    con.execute(f"DROP TABLE IF EXISTS {t}")
                except duckdb.Error:
                    pass

    def _stage(self, f: ExtractFile, delete_column: str, delimiter: str) -> tuple[bool, bool]:
        """Load the file into temp table `raw`: `_bad`, `_raw`, one VARCHAR per column, `_del`.

        Returns (has a delete column, has a CSV rejects table).
        """
        con = self._c()
        names = [c for c, _ in self.columns]
        path = _sql_str(f.path)
        if f.fmt == "csv":
            header = _read_csv_header(f.path, delimiter)
            seen: set[str] = set()
            for h in header:
                if h in seen:
                    raise _Reject(f"bad header: duplicate column {h!r}")
                seen.add(h)
            missing = [c for c in names if c not in seen]
            if missing:
                raise _Reject(f"bad header: missing column {missing[0]!r}")
            has_del = delete_column in seen
            pos = {h: i for i, h in enumerate(header)}
            cols = "{" + ", ".join(f"'c{i}': 'VARCHAR'" for i in range(len(header))) + "}"
            picked = [f"c{pos[c]} AS {_ident(c)}" for c in names]
            if has_del:
                picked.append(f"c{pos[delete_column]} AS _del")
            raw_json = "json_object(" + ", ".join(f"{_sql_str(c)}, c{pos[c]}" for c in names) + ")"
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE raw AS SELECT NULL::VARCHAR AS _bad, "
                f"{raw_json} AS _raw, {', '.join(picked)} FROM read_csv({path}, header=true, "
                f"auto_detect=false, columns={cols}, delim={_sql_str(delimiter)}, quote='\"', "
                "escape='\"', ignore_errors=true, store_rejects=true, rejects_table='rej', "
                "rejects_scan='rej_scan')"
            )
            return has_del, True
        if f.fmt == "parquet":
            described = con.execute(f"DESCRIBE SELECT * FROM read_parquet({path})").fetchall()
            present = {r[0] for r in described}
            missing = [c for c in names if c not in present]
            if missing:
                raise _Reject(f"bad header: missing column {missing[0]!r}")
            has_del = delete_column in present
            picked = [f"CAST({_ident(c)} AS VARCHAR) AS {_ident(c)}" for c in names]
            if has_del:
                picked.append(f"CAST({_ident(delete_column)} AS VARCHAR) AS _del")
            inner = ", ".join(picked)
            raw_json = (
                "json_object(" + ", ".join(f"{_sql_str(c)}, {_ident(c)}" for c in names) + ")"
            )
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE raw AS SELECT NULL::VARCHAR AS _bad, {raw_json} "
                f"AS _raw, * FROM (SELECT {inner} FROM read_parquet({path}))"
            )
            return has_del, False
        # JSONL: one object per line; read lines as text so bad lines keep their text.
        all_cols = names + [delete_column]
        paths = ", ".join(_sql_str(f'$."{c}"') for c in all_cols)
        con.execute(
            "CREATE OR REPLACE TEMP TABLE rawlines AS SELECT line, json_valid(line) AS ok FROM "
            f"read_csv({path}, columns={{'line': 'VARCHAR'}}, header=false, auto_detect=false, "
            "delim=E'\\x01', quote='', escape='', ignore_errors=true) "
            "WHERE line IS NOT NULL AND trim(line) <> ''"
        )
        try:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE rawj AS SELECT line, ok, "
                "CASE WHEN ok THEN json_type(line) END AS t, "
                f"CASE WHEN ok THEN json_extract_string(line, [{paths}]) END AS v, "
                f"CASE WHEN ok THEN json_type(line, [{paths}]) END AS ty FROM rawlines"
            )
        finally:
            con.execute("DROP TABLE IF EXISTS rawlines")
        try:
            n_obj, *present_counts = con.execute(
                "SELECT count(*) FILTER (WHERE t = 'OBJECT'), "
                + ", ".join(
                    f"count(*) FILTER (WHERE t = 'OBJECT' AND ty[{i + 1}] IS NOT NULL)"
                    for i in range(len(all_cols))
                )
                + " FROM rawj"
            ).fetchone()
            if n_obj:
                for c, n in zip(names, present_counts, strict=False):
                    if n == 0:
                        raise _Reject(f"bad header: column {c!r} missing in every row")
            has_del = bool(n_obj) and present_counts[-1] > 0
            nested = " OR ".join(
                f"ty[{i + 1}] IN ('OBJECT', 'ARRAY')" for i in range(len(all_cols))
            )
            picked = [f"v[{i + 1}] AS {_ident(c)}" for i, c in enumerate(names)]
            if has_del:
                picked.append(f"v[{len(all_cols)}] AS _del")
            con.execute(
                "CREATE OR REPLACE TEMP TABLE raw AS SELECT CASE WHEN NOT ok THEN 'not JSON' "
                "WHEN t <> 'OBJECT' THEN 'not a JSON object' "
                f"WHEN {nested} THEN 'a value is not a scalar' END AS _bad, line AS _raw, "
                f"{', '.join(picked)} FROM rawj"
            )
        finally:
            con.execute("DROP TABLE IF EXISTS rawj")
        return has_del, False

    def _rows_sql(self, has_del: bool) -> str:
        """Canonical rows from `raw`: rn, bad (reason or NULL), k (NULL if unreadable), img, del."""
        inner = ["rowid + 1 AS rn", "_bad", "_raw"]
        checks: list[str] = []
        image: list[str] = []
        key_ok: list[str] = []
        typed: dict[str, str] = {}
        for i, (name, typ) in enumerate(self.columns):
            q = _ident(name)
            v = f"v{i}"
            if typ == "text":
                inner.append(f"nullif({q}, '') AS {v}")
                typed[name] = v
                ok = f"{v} IS NOT NULL"
            else:
                inner.append(f"nullif(trim({q}), '') AS {v}")
                if typ == "int":
                    valid = (
                        f"(regexp_full_match({v}, '{_INT_RE}') "
                        f"AND TRY_CAST({v} AS BIGINT) IS NOT NULL"
                        f"{_range_sql(name, f'TRY_CAST({v} AS HUGEINT)')})"
                    )
                    typed[name] = f"TRY_CAST({v} AS BIGINT)"
                    what = "number"
                elif typ == "decimal":
                    valid = (
                        f"(regexp_full_match({v}, '{_DECIMAL_RE}')"
                        f"{_range_sql(name, f'TRY_CAST({v} AS DECIMAL(38,20))')})"
                    )
                    typed[name] = v
                    what = "number"
                else:
                    valid = f"(TRY_CAST({v} AS BOOLEAN) IS NOT NULL)"
                    typed[name] = f"TRY_CAST({v} AS BOOLEAN)"
                    what = "boolean"
                checks.append(f"WHEN {v} IS NOT NULL AND NOT {valid} THEN 'bad {what} in {name}'")
                ok = f"{v} IS NOT NULL AND {valid}"
            image.append(f"{_sql_str(name)}, {typed[name]}")
            if name in self.pk:
                key_ok.append(f"({ok})")
        pk_checks = []
        for c in self.pk:
            i = [n for n, _ in self.columns].index(c)
            pk_checks.append(f"WHEN v{i} IS NULL THEN 'missing primary key {c}'")
        if has_del:
            inner.append("nullif(trim(_del), '') AS vdel")
            checks.append(
                "WHEN vdel IS NOT NULL AND TRY_CAST(vdel AS BOOLEAN) IS NULL THEN 'bad delete flag'"
            )
            deleted = "coalesce(TRY_CAST(vdel AS BOOLEAN), false)"
        else:
            deleted = "false"
        pairs = ", ".join(f"{_sql_str(c)}, {typed[c]}" for c in sorted(self.pk))
        key_json = f"CAST(json_object({pairs}) AS VARCHAR)"
        bad = "CASE WHEN _bad IS NOT NULL THEN _bad " + " ".join(pk_checks + checks) + " END"
        return (
            f"SELECT rn, bad, CASE WHEN bad IS NULL THEN img END AS img, k, del, "
            f"CASE WHEN bad IS NOT NULL THEN _raw END AS raw FROM (SELECT rn, _raw, {bad} AS bad, "
            f"CASE WHEN _bad IS NULL AND {' AND '.join(key_ok)} THEN {key_json} END AS k, "
            f"CAST(json_object({', '.join(image)}) AS VARCHAR) AS img, {deleted} AS del "
            f"FROM (SELECT {', '.join(inner)} FROM raw))"
        )

    def _diff(
        self, f: ExtractFile, has_del: bool, rejects: bool, tolerance: float
    ) -> Applied | Quarantined:
        con = self._c()
        con.execute(f"CREATE OR REPLACE TEMP TABLE rows AS {self._rows_sql(has_del)}")
        if rejects:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE rej_lines AS SELECT line, "
                "'unparsable CSV row (' || lower(any_value(error_type)) || ')' AS reason, "
                "any_value(csv_line) AS raw FROM rej GROUP BY line"
            )
        else:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE rej_lines (line BIGINT, reason VARCHAR, raw VARCHAR)"
            )
        n_rows, n_bad, keyless = con.execute(
            "SELECT count(*), count(bad), count(*) FILTER (WHERE bad IS NOT NULL AND k IS NULL) "
            "FROM rows"
        ).fetchone()
        n_rej = con.execute("SELECT count(*) FROM rej_lines").fetchone()[0]
        total = n_rows + n_rej
        bad = n_bad + n_rej
        if total >= ORDER_BASE:
            raise _Reject(f"too many rows ({total}; at most {ORDER_BASE - 1} per file)")
        if bad > tolerance * total:
            first = con.execute(
                "SELECT * FROM (SELECT 'line ' || line AS at, reason FROM rej_lines "
                "ORDER BY line LIMIT 1) UNION ALL SELECT * FROM (SELECT 'row ' || rn, bad "
                "FROM rows WHERE bad IS NOT NULL ORDER BY rn LIMIT 1)"
            ).fetchone()
            raise _Reject(f"{bad} of {total} rows unusable (first: {first[0]}: {first[1]})")
        full = f.kind == "full"
        if full:
            dup = con.execute(
                "SELECT k FROM rows WHERE bad IS NULL AND NOT del GROUP BY k "
                "HAVING count(*) > 1 ORDER BY k LIMIT 1"
            ).fetchone()
            if dup is not None:
                raise _Reject(f"duplicate primary key {dup[0]}")
        base = f.seq * ORDER_BASE
        # Deltas may repeat a key: its last row wins.
        good = "SELECT * FROM rows WHERE bad IS NULL" + (
            "" if full else " QUALIFY row_number() OVER (PARTITION BY k ORDER BY rn DESC) = 1"
        )
        parts = [
            # creates and updates: new keys, or a different image
            f"SELECT 1 AS grp, {base} + g.rn AS ord, 'u' AS op, g.k, md5_number(g.img) AS h, "
            "g.img FROM good g LEFT JOIN cur c ON c.k = g.k "
            "WHERE NOT g.del AND (c.k IS NULL OR c.h <> md5_number(g.img))",
        ]
        if not full:
            # deletes marked in a delta, of rows the state has (image: the last one known)
            parts.append(
                f"SELECT 1, {base} + g.rn, 'd', c.k, NULL, c.img FROM good g "
                "JOIN cur c ON c.k = g.k WHERE g.del"
            )
        elif not keyless:
            # deletes by absence: live rows the snapshot does not hold; rows whose line
            # was unusable (but had a readable key) keep their state.
            parts.append(
                f"SELECT 1, {base} + {n_rows} + row_number() OVER (ORDER BY c.k), 'd', c.k, "
                "NULL, c.img FROM cur c WHERE NOT EXISTS (SELECT 1 FROM rows r "
                "WHERE r.k = c.k AND (r.bad IS NOT NULL OR NOT r.del))"
            )
        else:
            log.warning(
                "%s: %d unusable rows without a readable key: no deletes by absence from this file",
                f.name,
                keyless,
            )
        dead = (
            "SELECT 0 AS grp, row_number() OVER (ORDER BY src, pos) AS ord, 'x' AS op, "
            "reason AS k, NULL::UHUGEINT AS h, raw AS img FROM (SELECT 0 AS src, line AS pos, "
            "reason, raw FROM rej_lines UNION ALL SELECT 1, rn, bad, raw FROM rows "
            "WHERE bad IS NOT NULL)"
        )
        con.execute("BEGIN")
        con.execute(
            f"CREATE OR REPLACE TABLE pending AS WITH good AS ({good}) SELECT ord, op, k, h, img "
            f"FROM ({dead} UNION ALL {' UNION ALL '.join(parts)}) ORDER BY grp, ord"
        )
        ups, dels = con.execute(
            "SELECT count(*) FILTER (WHERE op = 'u'), count(*) FILTER (WHERE op = 'd') FROM pending"
        ).fetchone()
        con.execute(
            "INSERT INTO hist SELECT c.k, c.h, c.img, c.seq_from, ? FROM cur c "
            "WHERE c.k IN (SELECT k FROM pending WHERE op <> 'x')",
            [f.seq],
        )
        con.execute("DELETE FROM cur WHERE k IN (SELECT k FROM pending WHERE op <> 'x')")
        con.execute("INSERT INTO cur SELECT k, h, img, ? FROM pending WHERE op = 'u'", [f.seq])
        con.execute(
            "INSERT INTO applied VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [f.seq, f.name, f.kind, f.export_ms, total, ups, dels, bad],
        )
        con.execute("COMMIT")
        return Applied(total, ups, dels, bad, ups + dels + bad)

    def drop_pending(self) -> None:
        """Forget the applied file's outcome once it was emitted (a resume recomputes it)."""
        self._c().execute("DROP TABLE IF EXISTS pending")

    def page(self, start: int, n: int) -> list[tuple[int, str, str, str]]:
        """Rows `start` .. `start + n - 1` of `pending`: (ord, op, k, img)."""
        return (
            self._c()
            .execute(
                "SELECT ord, op, k, img FROM pending WHERE rowid >= ? AND rowid < ? ORDER BY rowid",
                [start, start + n],
            )
            .fetchall()
        )


# --- the Bytewax source -----------------------------------------------------------------------


class _Settings(NamedTuple):
    directory: str
    naming: FileNaming
    state_dir: str
    poll_interval_s: float
    bad_row_tolerance: float
    delete_column: str
    csv_delimiter: str
    memory_limit_mb: int
    settle_s: float
    batch_size: int
    bounded: bool
    recovery: bool
    keep_snapshots: int
    stop_event: threading.Event | None


class _Current:
    """The file whose pending rows are being emitted."""

    __slots__ = ("file", "total", "next", "applied")

    def __init__(self, file: ExtractFile, total: int, nxt: int, applied: Applied | None) -> None:
        self.file = file
        self.total = total
        self.next = nxt
        self.applied = applied


class _TablePartition(StatefulSourcePartition[ExtractBatch, dict]):
    """The extract files of one table, applied one at a time in export order."""

    def __init__(self, table: str, cfg: _Settings, resume: dict | None) -> None:
        self.table = table
        self.topic = extract_topic(table)
        self.cfg = cfg
        st = resume or {}
        self.cursor: int | None = st.get("seq")
        self.cursor_name: str | None = st.get("name")
        self.quarantined: dict[str, tuple[int, int, int]] = dict(st.get("quarantined") or {})
        self.resume_pending: tuple[int, str, int] | None = st.get("pending")
        self.pk = PRIMARY_KEYS[table]
        self.state = TableState(Path(cfg.state_dir) / f"{table}.duckdb", table, cfg.memory_limit_mb)
        self.state.open()
        try:
            self.state.rollback(self.cursor)
        except BaseException:
            self.state.close()
            raise
        self.seen: set[str] | None = None
        self.current: _Current | None = None
        self.job: Future | None = None
        self.job_file: tuple[ExtractFile, int] | None = None
        self.prune_to: int | None = None
        self.snapshots: deque[int | None] = deque(maxlen=cfg.keep_snapshots)
        self.next_scan = 0.0
        self.wait_s = cfg.poll_interval_s
        self.finished = False
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"sferp-extract-{table}")

    # -- Bytewax interface ----------------------------------------------------------------------

    def next_batch(self) -> list[ExtractBatch]:
        if self.current is not None:
            if self._stopping():
                raise StopIteration
            return self._emit()
        if self.job is not None:
            if not self.job.done():
                if self._stopping():
                    raise StopIteration  # close() waits for the job; a resume redoes it
                return []
            return self._finish_job()
        if self._stopping() or self.finished:
            raise StopIteration
        now = time.monotonic()
        if now < self.next_scan:
            return []
        files = scan(self.cfg.directory, self.table, self.cfg.naming)
        skipped = self._count_stale(files)
        self.wait_s = self.cfg.poll_interval_s
        nxt = self._pick(files)
        out = [ExtractBatch(self.table, [], None, [], skipped)] if skipped else []
        if nxt is None:
            if self.cfg.bounded:
                self.finished = True
            else:
                self.next_scan = now + self.wait_s
            return out
        f, skip = nxt
        self.job_file = (f, skip)
        self.job = self.executor.submit(self._apply, f, self.prune_to)
        self.prune_to = None
        return out

    def next_awake(self) -> datetime | None:
        if self.current is not None:
            return None
        now = datetime.now(UTC)
        if self.job is not None:
            return now + timedelta(milliseconds=20)
        wait = self.next_scan - time.monotonic()
        return now + timedelta(seconds=max(0.0, min(wait, 1.0)))

    def snapshot(self) -> dict:
        pending = None
        if self.current is not None:
            f = self.current.file
            pending = (f.seq, f.name, self.current.next)
        elif self.job_file is not None and self.job_file[1] > 0:
            f, emitted = self.job_file  # resuming inside this file: keep its position
            pending = (f.seq, f.name, emitted)
        elif self.resume_pending is not None:
            pending = self.resume_pending
        self.snapshots.append(self.cursor)
        if len(self.snapshots) == self.snapshots.maxlen and self.snapshots[0] is not None:
            self.prune_to = self.snapshots[0]
        return {
            "v": 1,
            "seq": self.cursor,
            "name": self.cursor_name,
            "pending": pending,
            "quarantined": dict(self.quarantined),
        }

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.state.close()

    # -- internals ------------------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self.cfg.stop_event is not None and self.cfg.stop_event.is_set()

    def _count_stale(self, files: list[ExtractFile]) -> int:
        """Count exports not newer than the cursor that appeared since the previous scan."""
        names = {f.name for f in files}
        stale = 0
        if self.seen is not None and self.cursor is not None:
            for f in files:
                if f.seq <= self.cursor and f.name not in self.seen:
                    stale += 1
                    log.warning(
                        "%s: export %d is not newer than the last applied export %d (%s): skipped",
                        f.name,
                        f.seq,
                        self.cursor,
                        self.cursor_name,
                    )
        self.seen = names
        return stale

    def _pick(self, files: list[ExtractFile]) -> tuple[ExtractFile, int] | None:
        """The next file to apply and how many of its pending rows were already emitted."""
        if self.resume_pending is not None:
            seq, name, emitted = self.resume_pending
            self.resume_pending = None
            for f in files:
                if f.name == name and f.seq == seq:
                    return f, emitted
            log.error(
                "%s: the export being applied at the last snapshot is gone; its remaining "
                "changes are lost until the next full export",
                name,
            )
        settle_ns = 0 if self.cfg.bounded else int(self.cfg.settle_s * 1e9)
        now_ns = time.time_ns()
        for f in files:
            if self.cursor is not None and f.seq <= self.cursor:
                continue
            q = self.quarantined.get(f.name)
            if q is not None and q == (f.seq, f.size, f.mtime_ns):
                continue
            if settle_ns and now_ns - f.mtime_ns < settle_ns:
                # Perhaps still being written: wait for it, keeping export order.
                self.wait_s = min(self.wait_s, (settle_ns - (now_ns - f.mtime_ns)) / 1e9)
                return None
            return f, 0
        return None

    def _apply(self, f: ExtractFile, prune_to: int | None) -> Applied | Quarantined:
        if prune_to is not None:
            self.state.prune(prune_to)
        started = time.monotonic()
        result = self.state.apply(
            f,
            bad_row_tolerance=self.cfg.bad_row_tolerance,
            delete_column=self.cfg.delete_column,
            csv_delimiter=self.cfg.csv_delimiter,
        )
        if isinstance(result, Applied):
            if not self.cfg.recovery:
                self.state.prune(f.seq)  # no snapshot can ask for an older state
            log.info(
                "%s: %d rows, %d upserts, %d deletes, %d unusable rows, compared in %.1f s",
                f.name,
                result.rows,
                result.upserts,
                result.deletes,
                result.bad,
                time.monotonic() - started,
            )
        return result

    def _finish_job(self) -> list[ExtractBatch]:
        assert self.job is not None and self.job_file is not None
        job, (f, skip) = self.job, self.job_file
        self.job = self.job_file = None
        result = job.result()  # a bug (not bad input) raises here, loudly
        if isinstance(result, Quarantined):
            log.warning("%s: quarantined: %s", f.name, result.reason)
            self.quarantined[f.name] = (f.seq, f.size, f.mtime_ns)
            dl = DeadLetter(self.topic, 0, f.seq, f"bad_extract: {result.reason}", f.name)
            return [ExtractBatch(self.table, [], None, [dl])]
        self.current = _Current(f, result.pending, skip, result)
        return self._emit()

    def _emit(self) -> list[ExtractBatch]:
        cur = self.current
        assert cur is not None
        f = cur.file
        rows = self.state.page(cur.next, self.cfg.batch_size) if cur.next < cur.total else []
        cur.next += len(rows)
        changes: list[Change] = []
        dead: list[DeadLetter] = []
        table, topic, pk = self.table, self.topic, self.pk
        base = f.seq * ORDER_BASE
        loads = orjson.loads
        new = tuple.__new__
        for ord_, op, k, img in rows:
            if op == "x":
                text = f"{f.name} #{ord_}: {img or ''}"
                raw = text.encode()[:RAW_LIMIT].decode("utf-8", "replace")
                dead.append(DeadLetter(topic, 0, base + ord_, f"bad_extract_row: {k}", raw))
                continue
            fields = loads(img)
            key = dumps_compact_sorted({c: fields[c] for c in pk})
            changes.append(
                new(
                    Change,
                    (
                        ERP,
                        table,
                        key,
                        UPSERT if op == "u" else DELETE,
                        (ord_,),
                        f.export_ms,
                        f"erp|{table}|{key}|{ord_}",
                        fields,
                        topic,
                        0,
                        ord_,
                        True,
                    ),
                )
            )
        if cur.next >= cur.total:
            self.state.drop_pending()
            self.current = None
            self.cursor = f.seq
            self.cursor_name = f.name
            self.quarantined = {n: q for n, q in self.quarantined.items() if q[0] > f.seq}
        if not changes and not dead:
            return []
        return [ExtractBatch(table, changes, f.export_ms if changes else None, dead)]


# The ranges of the Debezium decoder (decode_common.EXACT_LIMITS, docs/semantics.md
# "Ranges"), as SQL over the cast value: an amount below 9,999,999,999,999,999.995
# (it then rounds into DECIMAL(18,2)), a quantity below 10^15. DECIMAL(38,20) holds
# every amount in range to 20 places (a longer one is rounded at the 20th place
# before the comparison); anything larger does not cast, so it is out of range too.


def _event_time(mtime_ms: int) -> int:
    """A file's modification time as an event time, clamped into the event-time range
    (docs/semantics.md, "Ranges"): a file system accepts any time, a TIMESTAMP does not."""
    return min(max(mtime_ms, EVENT_TIME_MIN_MS), EVENT_TIME_MAX_MS)


def _range_sql(column: str, cast: str) -> str:
    """` AND <the cast value is in range>` for a column the typed views read, else ''."""
    kind = BOUNDED_COLUMNS.get(column)
    if kind is None:
        return ""
    return f" AND coalesce(abs({cast}) < {EXACT_LIMITS[kind]}, false)"


class ErpExtractSource(FixedPartitionedSource[ExtractBatch, dict]):
    """ERP extract files in a directory, one partition per table, as batches of changes.

    Emits `ExtractBatch` items (operators/extract_routing.py) of up to
    `batch_size` changes. Each table's files are applied in export order;
    the snapshot holds the last applied file (and the position inside a file
    being emitted), the table state is rolled back to it on resume: exactly
    once into the flow's snapshotted state. Bounded (`bounded=True`): every
    file present is applied, then the partition ends. `stop_event` ends every
    partition at the next batch (the resume continues inside the file).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        tables: Iterable[str] = ERP_EXTRACT_TABLES,
        state_dir: str | os.PathLike[str],
        file_pattern: str = DEFAULT_FILE_PATTERN,
        fmt: str = "auto",
        poll_interval_s: float = 10.0,
        bad_row_tolerance: float = 0.0,
        delete_column: str = "_deleted",
        csv_delimiter: str = ",",
        memory_limit_mb: int = 256,
        settle_s: float = 2.0,
        batch_size: int = 2000,
        bounded: bool = False,
        recovery: bool = True,
        keep_snapshots: int = 3,
        stop_event: threading.Event | None = None,
    ) -> None:
        tables = list(tables)
        unknown = [t for t in tables if t not in TABLE_COLUMNS]
        if unknown:
            raise ValueError(f"unknown ERP table {unknown[0]!r}; known: {list(TABLE_COLUMNS)}")
        if not os.path.isdir(directory):
            raise ValueError(f"not a directory: {os.fspath(directory)}")
        if not 0.0 <= bad_row_tolerance < 1.0:
            raise ValueError("bad_row_tolerance must be a fraction in [0, 1)")
        if len(csv_delimiter) != 1:
            raise ValueError("csv_delimiter must be one character")
        if batch_size < 1 or keep_snapshots < 1 or memory_limit_mb < 16:
            raise ValueError("batch_size and keep_snapshots must be >= 1, memory_limit_mb >= 16")
        self._tables = tables
        self._cfg = _Settings(
            os.fspath(directory),
            FileNaming(file_pattern, fmt),
            os.fspath(state_dir),
            poll_interval_s,
            bad_row_tolerance,
            delete_column,
            csv_delimiter,
            memory_limit_mb,
            settle_s,
            batch_size,
            bounded,
            recovery,
            keep_snapshots,
            stop_event,
        )

    @property
    def topics(self) -> tuple[str, ...]:
        """The pseudo-topics of the tables read (flow_stats rows)."""
        return tuple(extract_topic(t) for t in self._tables)

    def list_parts(self) -> list[str]:
        """One partition per table."""
        return list(self._tables)

    def build_part(self, step_id: str, for_part: str, resume_state: dict | None) -> _TablePartition:
        """Open the table's state, rolled back to the resume position."""
        return _TablePartition(for_part, self._cfg, resume_state)


def source_from_settings(
    ex: Any,
    *,
    views_path: str,
    bounded: bool,
    recovery: bool,
    batch_size: int,
    stop_event: threading.Event | None,
) -> ErpExtractSource:
    """The source for an `[erp_extracts]` settings section (sferp.config.ErpExtractSettings).

    The table state defaults to `<views file>.extracts/`, next to the views it feeds.
    """
    from sferp.config import ConfigError

    if not os.path.isdir(ex.path):
        raise ConfigError(f"erp_extracts.path: not a directory: {ex.path}")
    state_dir = ex.state_dir or f"{views_path}.extracts"
    return ErpExtractSource(
        ex.path,
        tables=ex.tables,
        state_dir=state_dir,
        file_pattern=ex.file_pattern,
        fmt=ex.format,
        poll_interval_s=ex.poll_interval_s,
        bad_row_tolerance=ex.bad_row_tolerance,
        delete_column=ex.delete_column,
        csv_delimiter=ex.csv_delimiter,
        memory_limit_mb=ex.memory_limit_mb,
        settle_s=ex.settle_s,
        batch_size=batch_size,
        bounded=bounded,
        recovery=recovery,
        stop_event=stop_event,
    )
