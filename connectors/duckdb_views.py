"""The single DuckDB writer that materialises the views, with an undo log for crash recovery.

`DuckDBViewsSink` is a Bytewax `FixedPartitionedSink` with exactly one partition, so
exactly one worker in the whole cluster opens the views file read-write (DuckDB
allows one writing process). Items are `(key, ViewDelta)` pairs; the key is not used
(every item goes to the one partition).

A `ViewDelta` maps a table name to `{primary key tuple: full row tuple or None}`;
None deletes the row. Rows are in the column order of `duckdb_schema.TABLES`;
TIMESTAMP columns arrive as int milliseconds since the epoch (UTC), `records.fields`
as a compact JSON string, amounts as `Decimal`. Table names starting with `_` are
reserved: `_meta` values are handed to the optional `on_commit` callback after their
commit (latency samples, for example); other `_` names are ignored.

Writes are coalesced (the latest row per key wins) and committed in bulk: per commit
and table one statement saves before-images, one deletes, one upserts, each reading
the batch from Python lists bound as parameters (DuckDB unnests them; no per-row
statements, no pandas or pyarrow needed). Commits happen when `commit_interval_s` has elapsed (in
`write_batch`, or from a background flusher when items stop arriving), on every
`snapshot()` and on `close()`.

Delivery guarantee: exactly-once view state across crashes, given a replaying
upstream. Each commit has a sequence number, and before changing rows it saves
their before-images (or "absent") in an undo table in the same DuckDB transaction.
`snapshot()` commits and returns the last commit's sequence number; `build_part`
with that number rolls back every later commit (their before-images, earliest per
key) in one transaction before writing anything, so the tables equal their state
at the snapshot and the replay rebuilds the rest. Without resume state a run starts
fresh: the tables are emptied.

Undo retention: before-images are kept per snapshot interval (only the first
change of a key after a snapshot is saved: that is all a rollback to a snapshot
needs). Entries older than the `keep_snapshots`-th newest snapshot (default 3) are
pruned at each snapshot, so the file stays bounded while Bytewax can still resume
from any of the last `keep_snapshots` snapshots (it resumes from an older one when
the newest was not completed on every worker). A resume state older than that, or
newer than the file (a replaced or deleted views file), is refused with an error.

While the partition runs it serves read-only queries on a local HTTP endpoint
(see `query_server`), so `sferp query` works while the flow holds the write lock.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import duckdb
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from sferp.connectors.audit_log import LINEAGE, AuditLog, AuditSettings
from sferp.connectors.duckdb_params import json_or_lists
from sferp.connectors.duckdb_schema import (
    INTERNAL_SCHEMA,
    PRIMARY_KEYS,
    SCHEMA,
    TABLES,
    create_tables,
    quote,
    schema_problems,
)
from sferp.connectors.query_server import SERVER_MAX_ROWS, QueryServer

from sferp.duckdb_connect import connect, quiet
from sferp.logfmt import first_line
from sferp.priority import call_lowered, lower_this_thread

RowValue = str | int | bool | Decimal | float | None
ViewDelta = dict[str, dict[tuple[RowValue, ...], tuple[RowValue, ...] | None]]
"""Table name -> {primary key tuple: full row tuple in column order, or None to delete}."""

log = logging.getLogger("sferp.views")

_ROLLBACK = "_sferp_rb"
_FEW = 2000  # batches up to this many keys per table look up before-images by row id
# Rows per bulk statement. DuckDB parses a statement's parameters and builds its
# vectors outside its memory limit, so one statement over a large commit spikes the
# resident memory; the flow's peak RSS is set by such spikes. Measured on a
# 1,000,000-record initial load: peak RSS 2.33-2.39 GB in chunks of 10,000 rows,
# 2.46-2.56 GB in one statement per table, in the same time.
_CHUNK_ROWS = 10_000

# DuckDB connection settings of the writer: no file access beyond the database itself
# (queries served by the writer cannot read or write other files).
WRITER_CONFIG: dict[str, Any] = {"enable_external_access": False}
# DuckDB's own default is 80 % of the machine's memory, kept as cache beside the
# flow's state. Measured on a 1,000,000-record initial load (24 GB machine): peak
# RSS 2.93 GB with DuckDB's default, 2.78 GB at 512 MB, 2.56 GB at 256 MB, in the
# same time (DuckDB evicts table and index blocks to the file; queries spill).
DEFAULT_MEMORY_LIMIT_MB = 256
# DuckDB checkpoints (rewrites the changed row groups of every table into the file)
# inside the commit that takes its write-ahead log past `checkpoint_threshold`
# (16 MB by default). A live flow's commits update rows all over the tables, so
# each checkpoint rewrites most of them: at 11,000 events/s that was a checkpoint
# every 3-5 commits and 46 % of the writer's time. Measured by replaying the 165
# commits of a live run: 27.9-29.4 s at 16 MB, 19.5-20.0 s at 64 MB, 18.3 s at
# 128 MB, 19.7 s at 256 MB; at 1 GB the commits ran out of DuckDB's memory (changes
# not yet checkpointed stay in memory). So: a quarter of the memory limit, at least
# DuckDB's default.
CHECKPOINT_SHARE = 4


def checkpoint_threshold_mb(memory_limit_mb: int) -> int:
    """The writer's checkpoint threshold for a DuckDB memory limit (see CHECKPOINT_SHARE)."""
    return max(16, memory_limit_mb // CHECKPOINT_SHARE)


# Pending rows beyond which the worker commits inline instead of leaving it to
# the flusher thread: bounds the memory of a writer that falls behind. The flusher
# runs at a lower priority (`flow.background_nice`), so during a catch-up it falls
# behind: a 1,000,000-record initial load peaked at 1,438-1,490 MiB with 500,000
# here and 1,376-1,424 MiB with 200,000 (1,389-1,433 MiB at equal priorities), in
# 67-69 s instead of 70-72 s. Live commits carry 20,000-45,000 rows at 80 % load.
_BACKLOG_ROWS = 200_000


class ResumeError(RuntimeError):
    """The views file cannot be brought to the state this run's recovery snapshot names.

    Also raised for a file whose view tables do not match the schema.
    """


def _undo_table(table: str) -> str:
    return f"{INTERNAL_SCHEMA}.{quote('undo_' + table)}"


def _pk_match(left: str, right: str, table: str) -> str:
    return " AND ".join(f"{left}.{quote(c)} = {right}.{quote(c)}" for c in PRIMARY_KEYS[table])


def _unnest_expr(col: str, ty: str, n: int, as_json: bool = False) -> str:
    """Expression that turns parameter $n into a typed column of the batch.

    $n is a Python list, or with `as_json` the JSON text of that list (see `bind_columns`).
    """
    if as_json:
        if ty == "TIMESTAMP":
            return f"epoch_ms(unnest(from_json(${n}, '[\"BIGINT\"]'))) AS {quote(col)}"
        if ty == "JSON" or ty.startswith("DECIMAL"):  # decimals travel as strings
            inner = f"unnest(from_json(${n}, '[\"VARCHAR\"]'))"
            return f"CAST({inner} AS {ty}) AS {quote(col)}"
        return f"unnest(from_json(${n}, '[\"{ty}\"]')) AS {quote(col)}"
    if ty == "TIMESTAMP":
        return f"epoch_ms(unnest(${n}::BIGINT[])) AS {quote(col)}"
    if ty == "JSON":
        return f"CAST(unnest(${n}::VARCHAR[]) AS JSON) AS {quote(col)}"
    return f"unnest(${n}::{ty}[]) AS {quote(col)}"


def bind_columns(rows: Iterable[tuple[Any, ...]]) -> tuple[bool, list[Any]]:
    """Column parameters of a batch of rows: `(True, JSON texts)`, else `(False, lists)`
    (see connectors/duckdb_params.py)."""
    return json_or_lists(zip(*rows, strict=True))


class _Bulk:
    """The bulk statements of one table for one parameter form (lists or JSON texts)."""

    def __init__(self, table: str, as_json: bool) -> None:
        cols = SCHEMA[table]
        types = dict(cols)
        pk = PRIMARY_KEYS[table]
        t = quote(table)
        undo = _undo_table(table)

        def expr(c: str, n: int) -> str:
            return _unnest_expr(c, types[c], n, as_json)

        keys = "SELECT " + ", ".join(expr(c, n) for n, c in enumerate(pk, 2))
        first_pk = quote(pk[0])
        image = ", ".join(f"k.{quote(c)}" if c in pk else f"cur.{quote(c)}" for c, _ in cols)

        # Before-images of every key the batch touches, only the first time the key is
        # touched after the latest snapshot (`base`, $1): a rollback never stops between.
        # No index on the undo tables: maintaining one cost more than this anti-join.
        def save_undo(current: str) -> str:
            return (
                f"INSERT INTO {undo} SELECT $1, cur.{first_pk} IS NOT NULL, {image} "
                f"FROM ({keys}) k LEFT JOIN {current} cur ON {_pk_match('cur', 'k', table)} "
                f"WHERE NOT EXISTS (SELECT 1 FROM {undo} u WHERE u.base = $1 "
                f"AND {_pk_match('u', 'k', table)})"
            )

        self.save_undo = save_undo(t)
        # For small batches the current rows are found by row id first: the scan then
        # reads the key columns of every row but the other columns of the matches only
        # (measured: 26 instead of 36 ms for a small commit next to 200k records rows;
        # for 50k-row batches the plain join is 10-15 % cheaper).
        self.save_undo_few = save_undo(
            f"(SELECT * FROM {t} WHERE rowid IN (SELECT r.rowid FROM {t} r "
            f"SEMI JOIN ({keys}) kk ON {_pk_match('r', 'kk', table)}))"
        )
        del_keys = "SELECT " + ", ".join(expr(c, n) for n, c in enumerate(pk, 1))
        self.delete = f"DELETE FROM {t} USING ({del_keys}) d WHERE {_pk_match(t, 'd', table)}"
        self.upsert = f"INSERT OR REPLACE INTO {t} SELECT " + ", ".join(
            expr(c, n) for n, (c, _) in enumerate(cols, 1)
        )


class _TableSql:
    """Pre-rendered statements of one table (built once per partition)."""

    def __init__(self, table: str) -> None:
        cols = SCHEMA[table]
        pk = PRIMARY_KEYS[table]
        t = quote(table)
        undo = _undo_table(table)
        col_list = ", ".join(quote(c) for c, _ in cols)
        pk_list = ", ".join(quote(c) for c in pk)
        self.bulk = {False: _Bulk(table, False), True: _Bulk(table, True)}
        self.undo_ddl = (
            f"CREATE TABLE IF NOT EXISTS {undo} (base BIGINT NOT NULL, present BOOLEAN NOT NULL, "
            + ", ".join(f"{quote(c)} {ty}" for c, ty in cols)
            + ")"
        )
        # Rollback to snapshot N: the earliest before-image per key among bases >= N.
        self.rb_load = (
            f"CREATE OR REPLACE TEMP TABLE {_ROLLBACK} AS SELECT * FROM {undo} WHERE base >= ? "
            f"QUALIFY row_number() OVER (PARTITION BY {pk_list} ORDER BY base) = 1"
        )
        self.rb_delete = (
            f"DELETE FROM {t} USING {_ROLLBACK} r "
            f"WHERE NOT r.present AND {_pk_match(t, 'r', table)}"
        )
        self.rb_restore = (
            f"INSERT OR REPLACE INTO {t} SELECT {col_list} FROM {_ROLLBACK} WHERE present"
        )
        self.rb_forget = f"DELETE FROM {undo} WHERE base >= ?"
        self.prune = f"DELETE FROM {undo} WHERE base < ?"
        self.clear_undo = f"DELETE FROM {undo}"
        self.clear = f"DELETE FROM {t}"


class DuckDBViewsSink(FixedPartitionedSink[ViewDelta, int]):
    """Materialise ViewDelta items into a DuckDB file, through one writer.

    One partition (`"views"`): the worker that owns it is the only DuckDB writer in
    the cluster, and serves `sferp query` for as long as it runs. Resume state is
    the sequence number of the last commit; with it, commits after that snapshot
    are undone on resume, so the views are exactly those of a run without crash.
    """

    def __init__(
        self,
        path: str,
        *,
        commit_interval_s: float = 0.25,
        keep_snapshots: int = 3,
        serve_queries: bool = True,
        query_max_rows: int = SERVER_MAX_ROWS,
        query_timeout_s: float = 30.0,
        on_commit: Callable[[list[Any]], None] | None = None,
        writer: bool = True,
        undo: bool = True,
        audit: AuditSettings | None = None,
        protect: Any = None,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
        nice: int = 0,
    ) -> None:
        """Store the settings; nothing is opened before `build_part`.

        `undo=False` skips the undo log, for runs without a recovery store (which
        always start fresh); such a file then refuses any later resume state.

        `on_commit` receives, after each commit, the `_meta` values of the items that
        commit contained (empty list when there were none). `writer=False` makes this
        process list no partition, so that in a multi-process cluster the writer
        lives in the process chosen for it (the one with the views file).

        `audit` keeps the `audit_log` table (connectors/audit_log.py); `protect` (a
        `sferp.protect.Protector`) encrypts the configured fields of each commit.
        `memory_limit_mb` bounds DuckDB's memory in the writer's process (`views.memory_limit_mb`).
        `nice` lowers the priority of the commit thread and DuckDB's threads by that
        much (`flow.background_nice`, sferp/priority.py).
        """
        if commit_interval_s < 0:
            raise ValueError("commit_interval_s must be >= 0")
        if keep_snapshots < 1:
            raise ValueError("keep_snapshots must be >= 1")
        if query_max_rows < 1 or query_timeout_s <= 0:
            raise ValueError("query_max_rows and query_timeout_s must be positive")
        self.path = path
        self.commit_interval_s = commit_interval_s
        self.keep_snapshots = keep_snapshots
        self.serve_queries = serve_queries
        self.query_max_rows = query_max_rows
        self.query_timeout_s = query_timeout_s
        self.on_commit = on_commit
        self.writer = writer
        self.undo = undo
        self.audit = audit
        self.protect = protect
        self.memory_limit_mb = memory_limit_mb
        self.nice = nice

    def list_parts(self) -> list[str]:
        """The single partition (when this process may write); built on exactly one worker."""
        return ["views"] if self.writer else []

    def part_fn(self, item_key: str) -> int:
        """Every item goes to the one partition."""
        return 0

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> ViewsWriterPartition:
        """Open the file, roll back to `resume_state` (or empty it) and start serving."""
        return ViewsWriterPartition(
            self.path,
            resume_state,
            commit_interval_s=self.commit_interval_s,
            keep_snapshots=self.keep_snapshots,
            serve_queries=self.serve_queries,
            query_max_rows=self.query_max_rows,
            query_timeout_s=self.query_timeout_s,
            on_commit=self.on_commit,
            undo=self.undo,
            audit=self.audit,
            protect=self.protect,
            memory_limit_mb=self.memory_limit_mb,
            nice=self.nice,
        )


class ViewsWriterPartition(StatefulSinkPartition[ViewDelta, int]):
    """The open views file: coalesces deltas, commits them in bulk with undo records."""

    def __init__(
        self,
        path: str,
        resume_state: int | None,
        *,
        commit_interval_s: float = 0.25,
        keep_snapshots: int = 3,
        serve_queries: bool = True,
        query_max_rows: int = SERVER_MAX_ROWS,
        query_timeout_s: float = 30.0,
        on_commit: Callable[[list[Any]], None] | None = None,
        undo: bool = True,
        audit: AuditSettings | None = None,
        protect: Any = None,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
        nice: int = 0,
    ) -> None:
        """Open `path` read-write, recover it to `resume_state`, start the query endpoint.

        With `nice` > 0, DuckDB's threads and the commit thread run that much lower in
        priority than the worker (sferp/priority.py); commits the worker makes itself
        (snapshots, a backlog) keep the worker's priority.
        """
        self.path = path
        self._undo = undo
        self._audit = AuditLog(audit) if audit is not None else None
        self._protect = protect  # sferp.protect.Protector or None (nothing encrypted)
        self._interval = commit_interval_s
        self._keep = keep_snapshots
        self._on_commit = on_commit
        self._sql = {t: _TableSql(t) for t in SCHEMA}
        self._pending: dict[str, dict[tuple[Any, ...], tuple[Any, ...] | None]] = {}
        self._meta: list[Any] = []
        self._lock = threading.Lock()  # the connection: one commit at a time, in order
        self._plock = threading.Lock()  # the pending rows
        self._due = threading.Event()  # a commit is due (set by write_batch)
        self._error: BaseException | None = None
        self._closed = False
        self.commits = 0  # commits made by this partition (for tests and metrics)
        self._memory_limit_mb = memory_limit_mb
        self._con = call_lowered(lambda: _connect_writer(path, memory_limit_mb), nice)
        try:
            self._seq, self._base = self._open(resume_state)
        except BaseException:
            self._con.close()
            raise
        self._last_commit = time.monotonic()
        self._server: QueryServer | None = None
        if serve_queries:
            self._server = QueryServer(
                quiet(self._con.cursor()),
                path,
                max_rows=query_max_rows,
                timeout_s=query_timeout_s,
            )
            self._server.start()
        self._stop = threading.Event()
        if commit_interval_s > 0:
            flusher = threading.Thread(
                target=_flush_loop,
                args=(weakref.ref(self), self._stop, self._due, commit_interval_s, nice),
                name="sferp-views-flusher",
                daemon=True,
            )
            flusher.start()

    # -- recovery -------------------------------------------------------------------

    def _open(self, resume_state: int | None) -> tuple[int, int]:
        """Create the schema, then roll back to `resume_state` or empty the tables.

        Returns (last commit seq, base snapshot seq of the next commits).
        """
        con = self._con
        con.execute("BEGIN")
        try:
            create_tables(con)
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {INTERNAL_SCHEMA}")
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {INTERNAL_SCHEMA}.state "
                "(id INTEGER PRIMARY KEY, seq BIGINT NOT NULL)"
            )
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {INTERNAL_SCHEMA}.snapshots "
                "(seq BIGINT PRIMARY KEY, taken_at TIMESTAMP)"
            )
            for sql in self._sql.values():
                con.execute(sql.undo_ddl)
            con.execute(f"INSERT OR IGNORE INTO {INTERNAL_SCHEMA}.state VALUES (1, 0)")
            problems = schema_problems(con)
            if problems:
                raise ResumeError(f"{self.path} is not a views file of this version: {problems}")
            (seq,) = con.execute(f"SELECT seq FROM {INTERNAL_SCHEMA}.state").fetchone()
            snaps = [
                r[0]
                for r in con.execute(
                    f"SELECT seq FROM {INTERNAL_SCHEMA}.snapshots ORDER BY seq"
                ).fetchall()
            ]
            if self._audit is not None:  # drops the undone commits' rows (same transaction)
                self._audit.on_open(con, resume_state, seq + 1)
            if resume_state is None:
                # A new run without recovery state rebuilds the views from scratch.
                for sql in self._sql.values():
                    con.execute(sql.clear)
                    con.execute(sql.clear_undo)
                con.execute(f"DELETE FROM {INTERNAL_SCHEMA}.snapshots")
            else:
                n = int(resume_state)
                if n not in snaps:
                    if n > seq:
                        why = f"the file's last commit is {seq}: it was replaced or deleted"
                    elif not snaps:
                        why = "the run that wrote it kept no undo log"
                    else:
                        kept = snaps[0] if snaps else seq
                        why = f"its undo log reaches back to snapshot {kept} only"
                    raise ResumeError(
                        f"cannot bring {self.path} back to snapshot {n}: {why}; "
                        "rebuild the views with a new recovery dir and views file"
                    )
                for sql in self._sql.values():
                    con.execute(sql.rb_load, [n])
                    con.execute(sql.rb_delete)
                    con.execute(sql.rb_restore)
                    con.execute(sql.rb_forget, [n])
                con.execute(f"DROP TABLE IF EXISTS {_ROLLBACK}")
                con.execute(f"DELETE FROM {INTERNAL_SCHEMA}.snapshots WHERE seq > ?", [n])
            # The recovered (or empty) state is a new position of its own: later commits
            # are undone by a resume from it or from any older snapshot still kept.
            seq += 1
            con.execute(f"UPDATE {INTERNAL_SCHEMA}.state SET seq = ?", [seq])
            self._record_snapshot(seq)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return seq, seq

    def _record_snapshot(self, seq: int) -> None:
        """Remember a snapshot position and prune undo entries no resume can need."""
        if not self._undo:
            return
        con = self._con
        con.execute(
            f"INSERT OR IGNORE INTO {INTERNAL_SCHEMA}.snapshots VALUES (?, ?)",
            [seq, datetime.now(UTC).replace(tzinfo=None)],
        )
        row = con.execute(
            f"SELECT seq FROM {INTERNAL_SCHEMA}.snapshots ORDER BY seq DESC "
            f"LIMIT 1 OFFSET {self._keep - 1}"
        ).fetchone()
        if row is not None:
            cutoff = row[0]
            for sql in self._sql.values():
                con.execute(sql.prune, [cutoff])
            con.execute(f"DELETE FROM {INTERNAL_SCHEMA}.snapshots WHERE seq < ?", [cutoff])

    # -- writing --------------------------------------------------------------------

    def write_batch(self, values: list[ViewDelta]) -> None:
        """Coalesce the deltas (later wins per key); a commit is due when the interval elapsed.

        The commit itself runs on the flusher thread: DuckDB releases the GIL
        while it writes, so the dataflow keeps computing meanwhile. Only when the
        pending rows grow past `_BACKLOG_ROWS` (the writer falls behind) does the
        worker commit inline, which bounds memory.
        """
        self._raise_background_error()
        with self._plock:
            pending = self._pending
            for delta in values:
                for table, changes in delta.items():
                    if table[0] == "_":
                        if table == "_meta":
                            self._meta.append(changes)
                        elif table == LINEAGE and self._audit is not None:
                            pending.setdefault(LINEAGE, {}).update(changes)
                        continue
                    if table not in TABLES:
                        raise ValueError(f"unknown view table {table!r}")
                    current = pending.get(table)
                    if current is None:
                        pending[table] = dict(changes)
                    else:
                        current.update(changes)
            backlog = sum(len(c) for c in pending.values())
        if backlog > _BACKLOG_ROWS or self._interval <= 0:
            with self._lock:
                self._commit_locked(snapshot=False)
        elif time.monotonic() - self._last_commit >= self._interval:
            self._due.set()

    def snapshot(self) -> int:
        """Commit pending work; the last commit's sequence number is the resume state.

        Without the undo log (no recovery store) no resume state is ever used: the
        commit is left to the flusher instead of stalling the dataflow for it
        (measured: the worker spent ~10 % of its time waiting here in live runs).
        """
        self._raise_background_error()
        if not self._undo and self._interval > 0:
            self._due.set()
            return self._seq
        with self._lock:
            self._commit_locked(snapshot=True)
            return self._seq

    def close(self) -> None:
        """Commit what is pending, stop the query endpoint and close the file."""
        if self._closed:
            return
        self._stop.set()
        self._due.set()
        try:
            with self._lock:
                if self._error is None:
                    self._commit_locked(snapshot=False)
        finally:
            self._closed = True
            if self._server is not None:
                self._server.stop()
            self._con.close()
        self._raise_background_error()

    def flush_if_due(self) -> float:
        """Commit pending work when the commit interval elapsed (called by the flusher).

        Returns the seconds until the next commit may start: 0 when rows came during
        a commit that outlasted the interval, so the flusher goes on at once.
        """
        if not self._pending and not self._meta:
            return self._interval
        with self._lock:
            if self._closed:
                return self._interval
            if time.monotonic() - self._last_commit >= self._interval:
                try:
                    self._commit_locked(snapshot=False)
                except BaseException as exc:  # surfaced on the worker thread
                    self._error = exc
                    return self._interval
        return max(0.0, self._last_commit + self._interval - time.monotonic())

    def _raise_background_error(self) -> None:
        if self._error is not None:
            raise RuntimeError("committing the views failed") from self._error

    def _commit_locked(self, *, snapshot: bool) -> None:
        """One transaction: undo images, deletes and upserts of all pending tables.

        Called with `_lock` held, which orders commits; the pending rows are taken
        under `_plock`, so the worker can keep adding rows during the commit.
        With `snapshot`, also records the resulting position as a snapshot (and prunes).
        """
        with self._plock:
            pending, meta = self._pending, self._meta
            self._pending, self._meta = {}, []
        # The interval runs from when a commit took its rows, not from when it ended:
        # rows that came during a commit longer than the interval go in the next one
        # at once instead of waiting another interval. Live runs at 80 % load, three
        # alternating pairs: view latency p99 4.4-4.9 s against 4.9-6.0 s.
        self._last_commit = time.monotonic()
        lineage = pending.pop(LINEAGE, None)  # audit only: lineage of view rows
        if self._protect is not None and pending:
            self._protect.protect_delta(pending)  # encrypt configured fields, in bulk
        new_snapshot = snapshot and self._base != (self._seq + 1 if pending else self._seq)
        if not pending and not new_snapshot:
            if meta and self._on_commit is not None:
                self._on_commit(meta)
            return
        con = self._con
        seq = self._seq + 1 if pending else self._seq
        con.execute("BEGIN")
        try:
            if self._audit is not None and pending:
                self._audit.write(con, pending, lineage, seq)  # before the rows change
            for table, changes in pending.items():
                self._apply(table, changes)
            if pending:
                con.execute(f"UPDATE {INTERNAL_SCHEMA}.state SET seq = ?", [seq])
            if new_snapshot:
                self._record_snapshot(seq)
            con.execute("COMMIT")
        except BaseException as exc:
            # Said here, in one line: raised in a sink, the error ends the worker
            # with a Rust panic that does not show it.
            log.error("%s", self._commit_failure(exc))
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # the connection is unusable; the error above is what matters
            raise
        self._seq = seq
        if new_snapshot:
            self._base = seq
        if pending:
            self.commits += 1
        if self._on_commit is not None:
            self._on_commit(meta)

    def _commit_failure(self, exc: BaseException) -> str:
        text = f"committing the views to {self.path} failed: {first_line(exc)}"
        if isinstance(exc, duckdb.OutOfMemoryException):
            text += (
                f" (DuckDB's memory limit is views.memory_limit_mb = {self._memory_limit_mb};"
                " raise it)"
            )
        return text

    def _apply(self, table: str, changes: dict[tuple[Any, ...], tuple[Any, ...] | None]) -> None:
        """Undo images, deletes and upserts of one table, in bulk statements of `_CHUNK_ROWS`."""
        if len(changes) <= _CHUNK_ROWS:
            self._apply_chunk(table, changes)
            return
        items = list(changes.items())
        for i in range(0, len(items), _CHUNK_ROWS):
            # Keys are distinct, so chunks never touch the same row: same result, in
            # the same transaction, as one statement over all of them.
            self._apply_chunk(table, dict(items[i : i + _CHUNK_ROWS]))

    def _apply_chunk(
        self, table: str, changes: dict[tuple[Any, ...], tuple[Any, ...] | None]
    ) -> None:
        """Undo images, deletes and upserts of some rows of one table: one statement each."""
        if not changes:  # a delta may name a table without rows (nothing to bind)
            return
        bulk = self._sql[table].bulk
        con = self._con
        if self._undo:
            as_json, keys = bind_columns(changes)
            sql = bulk[as_json]
            undo = sql.save_undo_few if len(changes) <= _FEW else sql.save_undo
            con.execute(undo, [self._base, *keys])
        ups = [row for row in changes.values() if row is not None]
        if len(ups) < len(changes):
            as_json, keys = bind_columns([key for key, row in changes.items() if row is None])
            con.execute(bulk[as_json].delete, keys)
        if ups:
            as_json, columns = bind_columns(ups)
            con.execute(bulk[as_json].upsert, columns)


def _connect_writer(
    path: str, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB, wait_s: float = 10.0
) -> duckdb.DuckDBPyConnection:
    """Open the views file read-write, waiting up to `wait_s` for a reader to let go.

    `sferp query` on a stopped flow opens the file read-only for a moment; a flow
    (re)starting just then would otherwise fail on DuckDB's file lock.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            config = {
                **WRITER_CONFIG,
                "memory_limit": f"{memory_limit_mb}MB",
                "checkpoint_threshold": f"{checkpoint_threshold_mb(memory_limit_mb)}MB",
            }
            return connect(path, config=config)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _flush_loop(
    ref: weakref.ref[ViewsWriterPartition],
    stop: threading.Event,
    due: threading.Event,
    every: float,
    nice: int = 0,
) -> None:
    """Commit pending rows when a commit is due, or when items stop arriving."""
    lower_this_thread(nice)
    wait = every
    while not stop.is_set():
        due.wait(wait)
        due.clear()
        if stop.is_set():
            return
        part = ref()
        if part is None:
            return
        wait = part.flush_if_due()
        del part


def write_views_file(path: str, deltas: Iterable[ViewDelta]) -> None:
    """Replace the contents of a views file with `deltas` (tools and tests, no dataflow)."""
    part = ViewsWriterPartition(path, None, commit_interval_s=0, serve_queries=False)
    try:
        part.write_batch(list(deltas))
    finally:
        part.close()
