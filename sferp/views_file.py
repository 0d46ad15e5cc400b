"""Offline edits of a stopped flow's views file (`sferp forget`, `sferp rekey`).

Both open the file exclusively (DuckDB's file lock: a running flow or a reader
makes the open fail), change it in one transaction and checkpoint it, so that the
rewritten pages, not only the write-ahead log, hold the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import duckdb

from sferp.duckdb_connect import connect


def open_stopped(
    path: str, command: str, error: Callable[[str], Exception]
) -> duckdb.DuckDBPyConnection:
    """Open `path` read-write; raise `error(message)` when a flow (or a query) holds it."""
    try:
        return connect(path, config={"enable_external_access": False})
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise error(
                f"{path} is in use by a running flow (or a query); stop the flow "
                f"(SIGTERM: it flushes and snapshots), run sferp {command}, then start it again"
            ) from None
        raise


def tables(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """Every (schema, table) of the file."""
    return {
        (r[0], r[1])
        for r in con.execute("SELECT schema_name, table_name FROM duckdb_tables()").fetchall()
    }


@contextmanager
def rewrite(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction over the body: committed and checkpointed, or rolled back; then closed."""
    try:
        con.execute("BEGIN")
        yield con
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:  # no transaction open (BEGIN or COMMIT failed)
            pass
        raise
    finally:
        con.close()
