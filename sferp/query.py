"""`sferp query`: read-only SQL over the views, while a flow runs or when it is stopped.

While a flow runs, its DuckDB writer holds the file's write lock and answers queries
on the endpoint it announces in `<views>.endpoint` (see
`sferp.connectors.query_server`). When no live endpoint answers (no file, a dead
pid, a refused connection), the views file is opened read-only instead. Either way
the statement must be a single read-only statement, results are cut at `max_rows` when
one is given (a running flow's endpoint caps an answer at 1,000,000 rows) and queries
are interrupted after a time limit.

Output formats: `table` (aligned columns, NULL shown as NULL), `csv` (header row;
NULL as an empty field) and `json` (a list of objects). Values are encoded the same
way in every format: decimals as strings with their scale ("12.50", exact, never a
binary float), timestamps as ISO 8601 in UTC ("2026-11-28T06:00:00.123Z"), and in
`json` the JSON column `records.fields` as nested JSON.

Exit codes: 0 success; 2 a refused statement, an SQL error, a missing views file or
bad arguments (one line on stderr); 1 anything else (timeout, file locked by a flow
without an endpoint, an unreachable endpoint that claims to be alive).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import os
import socket
import sys
import time
from typing import Any, TextIO

import duckdb
import orjson

from sferp.connectors.query_server import (
    TOKEN_HEADER,
    QueryResult,
    QueryTimeout,
    RefusedStatement,
    endpoint_path,
    execute_read_only,
)
from sferp.duckdb_connect import connect
from sferp.usage import MAX_ROWS, OneLineParser, int_between, timeout_seconds

DEFAULT_VIEWS = "data/views.duckdb"
FORMATS = ("table", "csv", "json")
CONNECT_TIMEOUT_S = 2.0
# How long `sferp query` waits for a writer that holds the views file to announce
# its endpoint (it does so once the views are open and ready; see `fetch`).
STARTING_WRITER_WAIT_S = 10.0

_NUMERIC_PREFIXES = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "UHUGEINT",
    "FLOAT",
    "DOUBLE",
    "DECIMAL",
)


class QueryFailed(Exception):
    """A query could not be answered; `code` is the exit code to use."""

    def __init__(self, message: str, code: int) -> None:
        """Keep the one-line message and the exit code."""
        super().__init__(message)
        self.code = code


def run_query(
    sql: str,
    views_path: str,
    fmt: str = "table",
    max_rows: int | None = None,
    *,
    timeout_s: float = 30.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run one read-only statement against the views and print the result; the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if fmt not in FORMATS:
        print(f"sferp query: unknown format {fmt!r} (use table, csv or json)", file=err)
        return 2
    if max_rows is not None and max_rows < 1:
        print("sferp query: max rows must be at least 1", file=err)
        return 2
    try:
        result = fetch(sql, views_path, max_rows=max_rows, timeout_s=timeout_s)
    except QueryFailed as exc:
        print(f"sferp query: {exc}", file=err)
        return exc.code
    render(result, fmt, out)
    if result.truncated:
        n = len(result.rows)
        why = "--max-rows" if max_rows is not None and n >= max_rows else "the running flow's limit"
        print(f"sferp query: output cut at {n:,} rows (row limit: {why})", file=err)
    return 0


class _Locked(QueryFailed):
    """The views file is held by a writer whose query endpoint is not (yet) up."""


def fetch(
    sql: str,
    views_path: str,
    *,
    max_rows: int | None,
    timeout_s: float,
    wait_s: float = STARTING_WRITER_WAIT_S,
) -> QueryResult:
    """Answer `sql` through the running writer when there is one, else from the file.

    A writer holds the file from the moment it opens it, but announces its query
    endpoint only once the views are ready (after a restart it first undoes or
    replays what the last run left): while the file is locked and no endpoint is
    announced, wait up to `wait_s` for one.
    """
    deadline = time.monotonic() + wait_s
    while True:
        live = _read_endpoint(views_path)
        if live is not None:
            answered = _query_endpoint(live, sql, max_rows=max_rows, timeout_s=timeout_s)
            if answered is not None:
                return answered
        try:
            return _query_file(sql, views_path, max_rows=max_rows, timeout_s=timeout_s)
        except _Locked as exc:
            if time.monotonic() >= deadline:
                raise QueryFailed(f"{exc} (waited {wait_s:g} s for one)", exc.code) from exc
        time.sleep(0.1)


def _read_endpoint(views_path: str) -> dict[str, Any] | None:
    """The endpoint announced for `views_path`, if its process is still alive."""
    try:
        with open(endpoint_path(views_path), "rb") as f:
            info = orjson.loads(f.read())
        pid, port, token = int(info["pid"]), int(info["port"]), str(info["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # stale: the writer died without removing it
    except PermissionError:
        pass  # alive, owned by another user
    return {"host": str(info.get("host", "127.0.0.1")), "port": port, "token": token}


def _query_endpoint(
    live: dict[str, Any], sql: str, *, max_rows: int | None, timeout_s: float
) -> QueryResult | None:
    """Ask the writer; None when nothing listens there (the caller falls back to the file)."""
    conn = http.client.HTTPConnection(live["host"], live["port"], timeout=CONNECT_TIMEOUT_S)
    try:
        try:
            conn.connect()
        except OSError:
            return None
        assert conn.sock is not None
        conn.sock.settimeout(timeout_s + 30.0)
        request: dict[str, Any] = {"sql": sql, "timeout_s": timeout_s}
        if max_rows is not None:  # else the server's own cap
            request["max_rows"] = max_rows
        body = orjson.dumps(request)
        try:
            conn.request(
                "POST",
                "/query",
                body=body,
                headers={"Content-Type": "application/json", TOKEN_HEADER: live["token"]},
            )
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, socket.timeout):
                raise QueryFailed("the flow's query endpoint did not answer in time", 1) from exc
            raise QueryFailed(f"the flow's query endpoint failed: {exc}", 1) from exc
    finally:
        conn.close()
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise QueryFailed(f"unexpected answer from the query endpoint ({resp.status})", 1) from exc
    if resp.status == 200:
        return QueryResult(
            columns=payload["columns"],
            types=payload["types"],
            rows=payload["rows"],
            truncated=bool(payload["truncated"]),
        )
    kind = payload.get("kind")
    message = _one_line(str(payload.get("error", f"HTTP {resp.status}")))
    if kind == "refused":
        raise QueryFailed(f"refused: {message}", 2)
    if kind == "sql":
        raise QueryFailed(message, 2)
    raise QueryFailed(message, 1)


def _query_file(
    sql: str, views_path: str, *, max_rows: int | None, timeout_s: float
) -> QueryResult:
    """Open the views file read-only (the flow is stopped) and run the statement."""
    if not os.path.exists(views_path):
        raise QueryFailed(f"no views file at {views_path} (run a flow first, or pass --views)", 2)
    try:
        con = connect(views_path, read_only=True, config={"enable_external_access": False})
    except duckdb.Error as exc:
        text = str(exc)
        if "lock" in text.lower():
            raise _Locked(
                f"{views_path} is locked by a running writer that serves no query endpoint", 1
            ) from exc
        raise QueryFailed(f"cannot open {views_path}: {_one_line(text)}", 1) from exc
    try:
        return execute_read_only(con, sql, max_rows=max_rows, timeout_s=timeout_s)
    except RefusedStatement as exc:
        raise QueryFailed(f"refused: {exc}", 2) from exc
    except QueryTimeout as exc:
        raise QueryFailed(str(exc), 1) from exc
    except duckdb.Error as exc:
        raise QueryFailed(_one_line(str(exc)), 2) from exc
    finally:
        con.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- output ------------------------------------------------------------------------------


def render(result: QueryResult, fmt: str, out: TextIO) -> None:
    """Print a result as `table`, `csv` or `json`."""
    if fmt == "json":
        _render_json(result, out)
    elif fmt == "csv":
        _render_csv(result, out)
    else:
        _render_table(result, out)


def _text(value: Any, null: str) -> str:
    if value is None:
        return null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return orjson.dumps(value).decode()
    return str(value)


def _render_table(result: QueryResult, out: TextIO) -> None:
    if not result.columns:
        print("OK", file=out)
        return
    cells = [
        [_text(v, "NULL").replace("\n", "\\n").replace("\r", "\\r") for v in row]
        for row in result.rows
    ]
    widths = [len(c) for c in result.columns]
    for row in cells:
        for i, c in enumerate(row):
            if len(c) > widths[i]:
                widths[i] = len(c)
    right = [t.startswith(_NUMERIC_PREFIXES) for t in result.types]
    header = " | ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True))
    print(header.rstrip(), file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for row in cells:
        line = " | ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        )
        print(line.rstrip(), file=out)
    n = len(result.rows)
    more = "+" if result.truncated else ""
    print(f"({n}{more} row{'s' if n != 1 else ''})", file=out)


def _render_csv(result: QueryResult, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow([_text(v, "") for v in row])


def _render_json(result: QueryResult, out: TextIO) -> None:
    json_cols = [i for i, t in enumerate(result.types) if t == "JSON"]
    objects = []
    for row in result.rows:
        values = list(row)
        for i in json_cols:
            if isinstance(values[i], str):
                try:
                    values[i] = orjson.loads(values[i])
                except orjson.JSONDecodeError:
                    pass
        objects.append(dict(zip(result.columns, values, strict=True)))
    out.write(orjson.dumps(objects, option=orjson.OPT_INDENT_2).decode())
    out.write("\n")


# -- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `sferp query` argument parser."""
    parser = OneLineParser(
        prog="sferp query",
        description="Run one read-only SQL statement against the views "
        "(through the running flow, or from the file when it is stopped).",
    )
    parser.add_argument("sql", help='one read-only statement, e.g. "SELECT * FROM inventory_live"')
    parser.add_argument(
        "--views",
        default=os.environ.get("SFERP_VIEWS__PATH", DEFAULT_VIEWS),
        help="views file (default: $SFERP_VIEWS__PATH or %(default)s)",
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format")
    parser.add_argument(
        "--max-rows",
        type=int_between(1, MAX_ROWS),
        default=None,
        help="row limit (default: none; a running flow answers at most 1,000,000 rows)",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=30.0,
        help="seconds before the query is interrupted",
    )
    return parser


def cli_query(argv: list[str]) -> int:
    """`sferp query "SQL" [--views PATH] [--format table|csv|json]`; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage (0 for --help)
        return int(exc.code or 0)
    return run_query(args.sql, args.views, args.format, args.max_rows, timeout_s=args.timeout)
