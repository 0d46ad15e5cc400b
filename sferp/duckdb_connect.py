"""DuckDB connections without the progress bar.

DuckDB draws a progress bar on standard output for any statement that runs longer
than two seconds: inside `sferp query --format json|csv` output, and into the
flow's log (emptying a big views file, a long commit or checkpoint, a slow query
served by the writer). Every connection sferp opens goes through here.
"""

from __future__ import annotations

from typing import Any

import duckdb


def quiet(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """`con` (a connection or cursor) with the progress bar off; a session setting."""
    con.execute("SET enable_progress_bar = false")
    return con


def connect(
    path: str = ":memory:", *, read_only: bool = False, config: dict[str, Any] | None = None
) -> duckdb.DuckDBPyConnection:
    """`duckdb.connect` with the progress bar off."""
    return quiet(duckdb.connect(path, read_only=read_only, config=config or {}))
