"""Read-only SQL over the views: statement checks, bounded execution, and the writer's endpoint.

DuckDB lets one process open a file read-write, or many read-only, never both. So
while a flow runs, the writer process answers queries itself: `QueryServer` is a
small HTTP server on 127.0.0.1 (ephemeral port) in a daemon thread, announced in
`<views path>.endpoint` (JSON with pid, port and a random token; mode 0600, removed
on stop). Every request must carry the token in the `X-Sferp-Token` header and runs
on its own cursor inside a read-only transaction: a consistent snapshot of committed
data (DuckDB's MVCC), which never blocks the writer.

Statements are checked with DuckDB's own parser (one statement; SELECT, EXPLAIN of a
read-only statement, and a few metadata PRAGMAs and CALLs). A SELECT is then walked in
DuckDB's own syntax tree (`json_serialize_sql`) for table functions with side effects
(`checkpoint()`, `enable_logging()`, `query('...')` which would run unchecked SQL...),
which are refused wherever they appear. The read-only transaction is the next line of
defence: it refuses writes hidden in a SELECT, such as a data modifying CTE; and both
the writer's connection and the read-only file connection have DuckDB's external access
off, so no query reads or writes other files or URLs. Results are cut at a row limit
and queries are interrupted after a time limit.

Protocol: `POST /query` with `{"sql": ..., "max_rows": n, "timeout_s": t}` (both
optional, capped by the server's own limits: `SERVER_MAX_ROWS` by default, so that one
query cannot take the flow's memory); the answer is
`{"columns", "types", "rows", "truncated"}` (200) or `{"error", "kind"}` with kind
`refused`, `sql` or `timeout` (400). Values are encoded by `encode_value`.
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
import os
import re
import secrets
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from uuid import UUID

import duckdb
import orjson

from sferp.duckdb_connect import connect, quiet

TOKEN_HEADER = "X-Sferp-Token"
# The most rows one answer of a running writer carries (the rows are built in its memory).
SERVER_MAX_ROWS = 1_000_000
MAX_REQUEST_BYTES = 1 << 20
STOP_WAIT_S = 10.0  # how long `stop` waits for interrupted queries to hand their cursors back
STOP_POLL_S = 0.05  # how often `stop` interrupts them again meanwhile

# PRAGMAs (and their table-function forms `pragma_<name>`) that only read metadata.
READ_ONLY_PRAGMAS = frozenset(
    {
        "table_info",
        "show",
        "show_tables",
        "show_tables_expanded",
        "show_databases",
        "database_list",
        "database_size",
        "storage_info",
        "metadata_info",
        "version",
        "platform",
        "functions",
        "collations",
        "user_agent",
    }
)

# Table functions that do something besides reading: checkpoints, logging and
# profiling switches, extension and resource registration, scans of raw process
# pointers, and the ones that run SQL given as a string (never checked here).
SIDE_EFFECT_TABLE_FUNCTIONS = frozenset(
    {
        "checkpoint",
        "force_checkpoint",
        "enable_logging",
        "disable_logging",
        "truncate_duckdb_logs",
        "enable_profiling",
        "disable_profiling",
        "add_grammar_extension",
        "remove_grammar_extension",
        "register_external_resource",
        "register_external_resource_type",
        "create_external_resource",
        "deregister_external_resource",
        "destroy_external_resource",
        "query",
        "json_execute_serialized_sql",
        "arrow_scan",
        "arrow_scan_dumb",
        "python_arrow_scan",
        "pandas_scan",
        "python_map_function",
    }
)

_EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(?:analy[sz]e\s+)?(?:\([^)]*\)\s*)?", re.I)
_PRAGMA_NAME = re.compile(r"^\s*pragma\s+([a-z_][a-z0-9_]*)", re.I)
_CALL_NAME = re.compile(r"^\s*call\s+([a-z_][a-z0-9_]*)\s*\(", re.I)


class RefusedStatement(ValueError):
    """The SQL is not a single read-only statement."""


class ServerStopping(Exception):
    """The endpoint is shutting down and takes no new queries."""


class QueryTimeout(RuntimeError):
    """The query ran longer than its time limit and was interrupted."""


class QueryResult(NamedTuple):
    """A bounded query result with values already encoded by `encode_value`."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool


def endpoint_path(views_path: str) -> str:
    """Where the writer announces its query endpoint for a views file."""
    return os.fspath(views_path) + ".endpoint"


def check_read_only(sql: str) -> None:
    """Raise RefusedStatement unless `sql` is exactly one read-only statement.

    Parse errors propagate as `duckdb.ParserException`.
    """
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1:
        raise RefusedStatement(f"expected exactly one statement, got {len(statements)}")
    _check_statement(statements[0])


def _check_statement(st: duckdb.Statement) -> None:
    kind = st.type
    if kind == duckdb.StatementType.SELECT:
        _check_table_functions(st.query)
        return
    if kind == duckdb.StatementType.EXPLAIN:
        inner, found = _EXPLAIN_PREFIX.subn("", st.query, count=1)
        inner_statements = duckdb.extract_statements(inner) if found and inner.strip() else []
        if len(inner_statements) != 1:
            raise RefusedStatement("EXPLAIN must start the statement and name one statement")
        _check_statement(inner_statements[0])
        return
    if kind == duckdb.StatementType.PRAGMA:
        m = _PRAGMA_NAME.match(st.query)
        if m and m.group(1).lower() in READ_ONLY_PRAGMAS:
            return
        raise RefusedStatement("only metadata PRAGMAs are allowed: " + _allowed())
    if kind == duckdb.StatementType.CALL:
        m = _CALL_NAME.match(st.query)
        name = m.group(1).lower() if m else ""
        if name.startswith("pragma_") and name[len("pragma_") :] in READ_ONLY_PRAGMAS:
            return
        if name.startswith("duckdb_"):
            return
        raise RefusedStatement("only metadata CALLs are allowed: " + _allowed())
    raise RefusedStatement(f"{kind.name} statements are not allowed: " + _allowed())


_SERIALIZER_LOCK = threading.Lock()
_serializer: duckdb.DuckDBPyConnection | None = None


def _syntax_tree(sql: str) -> Any:
    """DuckDB's own syntax tree of one SELECT statement, as JSON (nothing is executed)."""
    global _serializer
    with _SERIALIZER_LOCK:
        if _serializer is None:
            _serializer = connect(":memory:", config={"enable_external_access": False})
        row = _serializer.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    return orjson.loads(row[0]) if row else None


def _check_table_functions(sql: str) -> None:
    """Refuse a SELECT that calls a table function with side effects, wherever it appears."""
    tree = _syntax_tree(sql)
    if type(tree) is not dict or tree.get("error"):
        why = tree.get("error_message", "") if type(tree) is dict else ""
        raise RefusedStatement(f"cannot check this statement ({why or 'no syntax tree'})")
    stack = [tree]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            if node.get("type") == "TABLE_FUNCTION":
                fn = node.get("function")
                name = fn.get("function_name") if type(fn) is dict else None
                if type(name) is str and name.lower() in SIDE_EFFECT_TABLE_FUNCTIONS:
                    raise RefusedStatement(
                        f"the table function {name.lower()}() is not allowed: " + _allowed()
                    )
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)


def _allowed() -> str:
    return "the views are read-only here (SELECT, EXPLAIN, DESCRIBE, SHOW, metadata PRAGMAs)"


def encode_value(value: Any) -> Any:
    """Turn a DuckDB result value into a JSON value (the wire and output encoding).

    Decimals become strings (exact, scale kept: "12.50"); TIMESTAMP values, which
    the views store in UTC, become ISO 8601 with a `Z` ("2026-11-28T06:00:00.123Z");
    values with a time zone keep their offset; dates and times ISO 8601; intervals
    as seconds (number); blobs as hex; UUIDs as strings; non-finite floats as
    strings; integers beyond 64 bits (HUGEINT) as strings; lists and structs element
    by element.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 63) else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime):
        spec = "milliseconds" if value.microsecond % 1000 == 0 else "microseconds"
        if value.tzinfo is None:
            return value.isoformat(timespec=spec) + "Z"
        return value.isoformat(timespec=spec)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    return str(value)


def execute_read_only(
    cur: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int | None, timeout_s: float
) -> QueryResult:
    """Check and run one read-only statement on `cur`; at most `max_rows` rows (None: all).

    Runs inside a read-only transaction that is rolled back afterwards, and
    interrupts the query after `timeout_s` seconds (QueryTimeout).
    """
    check_read_only(sql)
    timed_out = threading.Event()

    def interrupt() -> None:
        timed_out.set()
        cur.interrupt()

    timer = threading.Timer(timeout_s, interrupt)
    timer.daemon = True
    cur.execute("BEGIN TRANSACTION READ ONLY")
    try:
        timer.start()
        try:
            cur.execute(sql)
            description = cur.description or []
            if not description:
                raw = []
            elif max_rows is None:
                raw = cur.fetchall()
            else:
                raw = cur.fetchmany(max_rows + 1)
        except duckdb.InterruptException as exc:
            raise QueryTimeout(f"query interrupted after {timeout_s:g} s") from exc
        except duckdb.Error:
            if timed_out.is_set():
                raise QueryTimeout(f"query interrupted after {timeout_s:g} s") from None
            raise
    finally:
        timer.cancel()
        try:
            cur.execute("ROLLBACK")
        except duckdb.Error:
            pass
    truncated = max_rows is not None and len(raw) > max_rows
    rows = [[encode_value(v) for v in row] for row in raw[:max_rows]]
    return QueryResult(
        columns=[d[0] for d in description],
        types=[str(d[1]) for d in description],
        rows=rows,
        truncated=truncated,
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, owner: QueryServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Requests are not logged (they can be frequent; errors go to the client)."""

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, orjson.dumps(body))

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        """Only POST /query exists."""
        self._reply(404, {"error": "use POST /query", "kind": "usage"})

    def do_POST(self) -> None:
        """Run one read-only query on a fresh cursor."""
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body_bytes = self.rfile.read(length) if 0 < length <= MAX_REQUEST_BYTES else b""
        given = self.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), owner.token.encode()):
            self._reply(401, {"error": "missing or wrong token", "kind": "auth"})
            return
        if self.path != "/query":
            self._reply(404, {"error": "use POST /query", "kind": "usage"})
            return
        try:
            body = orjson.loads(body_bytes)
            sql = body["sql"]
            max_rows = int(body.get("max_rows", owner.max_rows))
            timeout_s = float(body.get("timeout_s", owner.timeout_s))
            if not isinstance(sql, str) or max_rows < 1 or not timeout_s > 0:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._reply(
                400,
                {
                    "error": 'expected {"sql": str, "max_rows": int, "timeout_s": float}',
                    "kind": "usage",
                },
            )
            return
        try:
            cur = owner.new_cursor()
        except ServerStopping as exc:
            self._reply(503, {"error": str(exc), "kind": "stopping"})
            return
        try:
            res = execute_read_only(
                cur,
                sql,
                max_rows=min(max_rows, owner.max_rows),
                timeout_s=min(timeout_s, owner.timeout_s),
            )
        except RefusedStatement as exc:
            self._reply(400, {"error": str(exc), "kind": "refused"})
        except QueryTimeout as exc:
            why = str(exc)
            if timeout_s > owner.timeout_s:  # the caller asked for longer
                why += (
                    " (the running flow's limit; run longer queries on a copy of the views "
                    "file or with the flow stopped)"
                )
            self._reply(400, {"error": why, "kind": "timeout"})
        except duckdb.Error as exc:
            self._reply(400, {"error": str(exc), "kind": "sql"})
        except Exception as exc:  # a bug here must not take the writer's process down
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}", "kind": "internal"})
        else:
            try:
                data = orjson.dumps(res._asdict())
            except TypeError as exc:
                self._reply(500, {"error": f"cannot encode the result: {exc}", "kind": "internal"})
            else:
                self._send(200, data)
        finally:
            owner.release(cur)


class QueryServer:
    """Serve read-only queries on a DuckDB database from inside the writer's process.

    `root` is a cursor of the writer's connection, used only to create one cursor
    per request. The endpoint file lets `sferp query` find the server.
    """

    def __init__(
        self,
        root: duckdb.DuckDBPyConnection,
        views_path: str,
        *,
        max_rows: int = SERVER_MAX_ROWS,
        timeout_s: float = 30.0,
    ) -> None:
        """Remember where to serve from; `start()` opens the socket."""
        self._root = root
        # Cursors of queries in flight: DuckDB refuses to close a connection while a
        # cursor made from it runs a query (ResourceInUseException), so `stop` ends them.
        self._cursor_lock = threading.Condition()
        self._active: set[duckdb.DuckDBPyConnection] = set()
        self._stopping = False
        self.views_path = os.fspath(views_path)
        self.endpoint = endpoint_path(self.views_path)
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self.token = secrets.token_urlsafe(32)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (after `start()`)."""
        assert self._httpd is not None
        return self._httpd.server_address[1]

    def new_cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the served database (thread-safe); hand it back with `release`.

        Raises ServerStopping once `stop` began.
        """
        with self._cursor_lock:
            if self._stopping:
                raise ServerStopping("the flow is stopping")
            cur = quiet(self._root.cursor())
            self._active.add(cur)
            return cur

    def release(self, cur: duckdb.DuckDBPyConnection) -> None:
        """Close a cursor from `new_cursor` once its query is over."""
        try:
            cur.close()
        finally:
            with self._cursor_lock:
                self._active.discard(cur)
                self._cursor_lock.notify_all()

    def start(self) -> None:
        """Bind 127.0.0.1 on an ephemeral port, serve in a daemon thread, write the endpoint."""
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="sferp-query-server",
            daemon=True,
        )
        self._thread.start()
        info = {"pid": os.getpid(), "host": "127.0.0.1", "port": self.port, "token": self.token}
        tmp = f"{self.endpoint}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, orjson.dumps(info))
        finally:
            os.close(fd)
        os.replace(tmp, self.endpoint)

    def stop(self) -> None:
        """Remove the endpoint file (if it is still ours) and stop serving."""
        try:
            with open(self.endpoint, "rb") as f:
                ours = orjson.loads(f.read()).get("token") == self.token
        except (OSError, ValueError):
            ours = False
        if ours:
            try:
                os.unlink(self.endpoint)
            except FileNotFoundError:
                pass
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._cursor_lock:
            self._stopping = True
            # Queries in flight end with an interruption. Interrupting a cursor that
            # runs nothing does nothing, and a handler may be between `new_cursor`
            # and its query (seen under load: the query then ran on and the close
            # failed), so interrupt again until every cursor is handed back.
            deadline = time.monotonic() + STOP_WAIT_S
            while self._active and time.monotonic() < deadline:
                for cur in list(self._active):
                    try:
                        cur.interrupt()
                    except duckdb.Error:  # already closed: it is being handed back
                        pass
                self._cursor_lock.wait(timeout=STOP_POLL_S)
            self._root.close()
