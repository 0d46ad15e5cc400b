"""The audit trail: who changed which view row, when, from which source events.

`audit_log` (schema in `duckdb_schema.AUDIT_COLUMNS`) is written by the single
DuckDB writer (`duckdb_views.ViewsWriterPartition`) in the transaction of the
commit it describes, with one bulk statement per commit: the coalesced rows of the
commit are bound as Python lists and unnested, exactly like the view upserts
(action `upsert` or `delete`). One row per view row a commit changes (the writer coalesces
a row's changes within a commit into its latest version), for `records`,
`order_status`, `inventory_live`, `reconciliation_exceptions` and `dead_letters`;
`flow_stats` counters are not audited (they change with every batch).

Lineage: for `order_status` and `inventory_live` rows, the identities the view
stages attached to the row (the same as the `lineage` of the reconciled.* record),
carried to the writer in the reserved delta table `_lineage`
(`{(table, primary key): lineage}`, see `LineageTap`). For `records` rows, the
applied event that produced the version: ERP `erp|<table>|<record_key>|<lsn>` (the
event's identity), Salesforce `sf|<entity>|<record Id>@<version>` where the version
is `commitTimestamp:commitNumber:sequenceNumber` (records does not keep the
transactionKey); for `dead_letters` the input coordinates. Exceptions carry no lineage (NULL).

Crash recovery: each audit row stores the commit's sequence number; when the writer
resumes from snapshot n it undoes the later commits and deletes their audit rows
(`seq > n`) in the same transaction, so the replay's rows are not doubled. A fresh
start (no resume state) empties the views but keeps the audit history, adding one
`truncate` row per table it emptied. Retention: rows older than
`retention_days` (0: forever) are deleted when the writer opens and at most every
`prune_every_s` at a commit.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import orjson
from sferp.connectors.duckdb_params import json_or_lists
from sferp.connectors.duckdb_schema import (
    AUDIT_COLUMNS,
    AUDIT_TABLE,
    PRIMARY_KEYS,
    SCHEMA,
    audit_ddl,
    quote,
)

LINEAGE = "_lineage"  # reserved delta table: {(view table, primary key): lineage dict or None}
AUDITED = ("records", "order_status", "inventory_live", "reconciliation_exceptions", "dead_letters")
# position of the row's event time (records.event_time, updated_at, last_seen)
_EVENT_TIME = {
    "records": 6,
    "order_status": 13,
    "inventory_live": 5,
    "reconciliation_exceptions": 4,
}
_TRACKED = ("order_status", "inventory_live")  # view rows whose stages attach lineage


@dataclass(frozen=True)
class AuditSettings:
    """How the writer keeps the audit log."""

    retention_days: int = 90  # 0: keep forever
    prune_every_s: float = 600.0


def worker_id() -> str:
    """The writer process, as audit rows name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _branch(table: str, first: int, as_json: bool = False) -> tuple[str, int]:
    """One table's part of the audit statement, its parameters numbered from `first`.

    Parameters, in order: the primary key columns, `up` (False: a delete), then
    `version` (records), `lin` (lineage: order_status, inventory_live),
    `et` (event time ms: all but dead_letters). Row keys and the lineage of records
    and dead letters are computed here, in SQL, rather than row by row in Python.
    With `as_json` each parameter is the JSON text of its column (lineage as JSON
    values), else a Python list (lineage as JSON texts); see `AuditLog.write`.
    """
    types = dict(SCHEMA[table])
    pk = PRIMARY_KEYS[table]
    cols = []
    n = first

    def column(ty: str, name: str) -> str:
        if as_json:
            return f"unnest(from_json(${n}, '[\"{ty}\"]')) AS {name}"
        return f"unnest(${n}::{ty}[]) AS {name}"

    for i, c in enumerate(pk):
        cols.append(column(types[c], f"k{i}"))
        n += 1
    extra = ["up"] + (["ver"] if table == "records" else [])
    extra += ["lin"] if table in _TRACKED else []
    extra += ["et"] if table in _EVENT_TIME else []
    kinds = {"up": "BOOLEAN", "ver": "VARCHAR", "et": "BIGINT"}
    kinds["lin"] = "JSON" if as_json else "VARCHAR"  # lineage objects, or their texts
    for name in extra:
        cols.append(column(kinds[name], name))
        n += 1
    keys = [
        f"k.k{i}" if types[c] == "VARCHAR" else f"CAST(k.k{i} AS VARCHAR)" for i, c in enumerate(pk)
    ]
    rk = keys[0] if len(keys) == 1 else " || ':' || ".join(keys)
    if table == "records":
        lin = (
            "CASE WHEN k.up THEN json_object(k.k0, CASE WHEN k.k0 = 'erp' "
            "THEN 'erp|' || k.k1 || '|' || k.k2 || '|' || k.ver "
            "ELSE 'sf|' || k.k1 || '|' || k.k2 || '@' || k.ver END) END"
        )
    elif table == "dead_letters":
        lin = f"json_object('input', {rk})"
    elif table in _TRACKED:
        lin = "CAST(k.lin AS JSON)"
    else:
        lin = "CAST(NULL AS JSON)"
    et = "k.et" if table in _EVENT_TIME else "CAST(NULL AS BIGINT)"
    # Whether an upserted row existed before is not looked up: that is a join with
    # the whole table at every commit, whose cost grows with the table (in a live
    # flow at 10,000 events/s it raised the p99 view latency from 1.27 s to 1.8 s).
    sql = (
        f"SELECT '{table}' AS t, {rk} AS rk, CASE WHEN k.up THEN 'upsert' ELSE 'delete' END "
        f"AS action, {lin} AS lin, {et} AS et FROM (SELECT {', '.join(cols)}) k"
    )
    return sql, n


def _statement(tables: tuple[str, ...], as_json: bool = False) -> str:
    parts = []
    n = 4  # $1 at, $2 worker, $3 seq
    for t in tables:
        sql, n = _branch(t, n, as_json)
        parts.append(sql)
    return (
        f"INSERT INTO {AUDIT_TABLE} ({', '.join(quote(c) for c, _ in AUDIT_COLUMNS)}) "
        "SELECT $1, u.t, u.rk, u.action, u.lin, epoch_ms(u.et), $2, $3 "
        f"FROM ({' UNION ALL '.join(parts)}) u"
    )


class AuditLog:
    """Writes the audit rows of the views writer's commits (owned by one partition)."""

    def __init__(self, settings: AuditSettings | None = None, worker: str | None = None) -> None:
        """Settings (retention) and the worker name written into each row."""
        self.settings = settings or AuditSettings()
        self.worker = worker or worker_id()
        self._statements: dict[tuple[tuple[str, ...], bool], str] = {}
        self._last_prune = 0.0
        self.rows_written = 0

    # -- opening and resuming -----------------------------------------------------------

    def on_open(self, con: duckdb.DuckDBPyConnection, resume_state: int | None, seq: int) -> None:
        """Within the writer's opening transaction, before it rolls back or empties the views.

        Resuming from snapshot `resume_state` deletes the audit rows of the commits
        that are undone; a fresh start records a `truncate` row (sequence `seq`, the
        recovered position) for every view it is about to empty.
        """
        con.execute(audit_ddl())
        found = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
            [AUDIT_TABLE],
        ).fetchall()
        if [tuple(r) for r in found] != list(AUDIT_COLUMNS):
            raise ValueError(
                f"table {AUDIT_TABLE} has columns {found}, expected {list(AUDIT_COLUMNS)}"
            )
        if resume_state is not None:
            con.execute(f"DELETE FROM {AUDIT_TABLE} WHERE seq > ?", [int(resume_state)])
        else:
            at = _now()
            for table in AUDITED:
                (n,) = con.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()
                if n:
                    con.execute(
                        f"INSERT INTO {AUDIT_TABLE} VALUES (?, ?, NULL, 'truncate', "
                        "CAST(? AS JSON), NULL, ?, ?)",
                        [at, table, orjson.dumps({"rows": n}).decode(), self.worker, seq],
                    )
        self.prune(con)

    # -- commits -------------------------------------------------------------------------

    def write(
        self,
        con: duckdb.DuckDBPyConnection,
        pending: dict[str, dict[tuple, tuple | None]],
        lineage: dict[tuple[str, tuple], Any] | None,
        seq: int,
    ) -> None:
        """Insert the audit rows of one commit, before its changes are applied.

        `pending` holds the commit's rows per table (None deletes), `lineage` the
        lineage of view rows by (table, primary key).
        """
        tables = tuple(t for t in AUDITED if pending.get(t))
        if not tables:
            return
        lineage = lineage or {}
        rows_n = 0
        columns: list[list[Any]] = []
        lineages: list[int] = []  # positions of lineage columns (objects until bound)
        for table in tables:
            changes = pending[table]
            keys = list(changes)
            rows = list(changes.values())
            columns.extend(map(list, zip(*keys, strict=True)))
            columns.append([r is not None for r in rows])
            if table == "records":
                columns.append([None if r is None else r[5] for r in rows])
            elif table in _TRACKED:
                lineages.append(len(columns))
                get = lineage.get
                columns.append(
                    [
                        None if r is None else get((table, k))
                        for k, r in zip(keys, rows, strict=True)
                    ]
                )
            pos = _EVENT_TIME.get(table)
            if pos is not None:
                columns.append([None if r is None else r[pos] for r in rows])
            rows_n += len(keys)
        # JSON texts where they can be, as the views rows (connectors/duckdb_params.py);
        # as lists, the lineage objects go as their JSON texts.
        as_json, bound = json_or_lists(columns)
        if not as_json:
            dumps = orjson.dumps
            for i in lineages:
                bound[i] = [None if lin is None else dumps(lin).decode() for lin in bound[i]]
        key = (tables, as_json)
        sql = self._statements.get(key)
        if sql is None:
            sql = self._statements[key] = _statement(tables, as_json)
        con.execute(sql, [_now(), self.worker, seq, *bound])
        self.rows_written += rows_n
        if self.settings.retention_days and (
            time.monotonic() - self._last_prune >= self.settings.prune_every_s
        ):
            self.prune(con)

    def prune(self, con: duckdb.DuckDBPyConnection) -> None:
        """Delete the rows older than the retention period (none with retention 0)."""
        self._last_prune = time.monotonic()
        days = self.settings.retention_days
        if not days:
            return
        cutoff = _now() - timedelta(days=days)
        con.execute(f'DELETE FROM {AUDIT_TABLE} WHERE "at" < ?', [cutoff])


class LineageTap:
    """Wraps the coordinator: adds the lineage of view rows to its DuckDB delta.

    The view stages attach lineage to `order_status` and `inventory_live` rows; the
    coordinator puts it into Kafka values only. This proxy reads it from the
    coordinator's inputs (a dict entry per changed view row) and hands it to the
    writer as the delta's reserved `_lineage` table. Everything else is the
    coordinator's (attribute access is delegated).
    """

    def __init__(self, inner: Any) -> None:
        """Wrap a `Coordinator`."""
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def process(self, inputs: list) -> tuple[dict, list]:
        """The coordinator's output, its delta with `_lineage` for the changed view rows."""
        lin: dict[tuple[str, tuple], Any] = {}
        for gi in inputs:
            rows = gi.rows
            if not rows:
                continue
            for table in _TRACKED:
                changes = rows.get(table)
                if changes:
                    for pk, row in changes.items():
                        lin[(table, pk)] = None if row is None else row[-2]
        delta, kafka = self.inner.process(inputs)
        if lin:
            delta[LINEAGE] = lin
        return delta, kafka

    def tick(self) -> tuple[dict, list]:
        """The coordinator's clock tick (exceptions only: no view lineage)."""
        return self.inner.tick()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
