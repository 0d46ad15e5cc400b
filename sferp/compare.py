"""The views in a normalized, comparable form: load them from DuckDB and diff two of them.

`Views` holds exactly what CONTRACT §2 makes deterministic (plus the informational
`late` counts and the final clock), in plain Python values: timestamps as
milliseconds since the epoch (UTC), DECIMAL as `Decimal`, JSON parsed. The
reference model produces one, `load_views` reads one from a views file written
by the flow, and `diff` says how two differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import orjson

from sferp.duckdb_connect import connect

__all__ = ["InventoryRow", "OrderRow", "RecordRow", "Views", "diff", "load_views"]

STAT_COLUMNS = ("consumed", "applied", "duplicates", "dead_lettered", "ignored")
FLOAT_TOLERANCE = 1e-6


class RecordRow(NamedTuple):
    """A `records` row without its key (source, entity, record_key)."""

    deleted: bool
    fields: dict[str, Any]
    version: str
    event_time_ms: int | None


class InventoryRow(NamedTuple):
    """An `inventory_live` row without its key (sku) and `updated_at`."""

    on_hand: int
    allocated: int
    sf_open_demand: int
    available_to_promise: int


class OrderRow(NamedTuple):
    """An `order_status` row without its key (sf_order_id) and `updated_at`."""

    order_number: str | None
    account_id: str | None
    erp_order_no: str | None
    sf_status: str | None
    erp_status: str | None
    stage: str | None
    sf_total: Decimal | None
    erp_total: Decimal | None
    amount_matches: bool | None
    activated_at_ms: int | None
    invoiced_at_ms: int | None
    quote_to_cash_s: float | None


@dataclass
class Views:
    """Every CONTRACT §3.1 view, normalized for comparison."""

    records: dict[tuple[str, str, str], RecordRow]  # (source, entity, record_key) -> row
    inventory_live: dict[str, InventoryRow]  # sku -> row
    order_status: dict[str, OrderRow]  # sf_order_id -> row
    open_exceptions: set[tuple[str, str]]  # (kind, key) of the open rows
    flow_stats: dict[str, dict[str, int]]  # topic -> STAT_COLUMNS -> count
    late: dict[str, int]  # topic -> late count (informational)
    dead_letters: set[tuple[str, int, int, str, str]]  # (topic, partition, offset, reason, raw)
    now_ms: int | None = None  # the flow's clock at the end; None when unknown


# --- Loading from DuckDB ---------------------------------------------------------------------

_QUERIES = {
    "records": (
        "SELECT source, entity, record_key, deleted, fields, version, epoch_ms(event_time)"
        " FROM records"
    ),
    "inventory_live": (
        "SELECT sku, on_hand, allocated, sf_open_demand, available_to_promise FROM inventory_live"
    ),
    "order_status": (
        "SELECT sf_order_id, order_number, account_id, erp_order_no, sf_status, erp_status,"
        " stage, sf_total, erp_total, amount_matches, epoch_ms(activated_at),"
        " epoch_ms(invoiced_at), quote_to_cash_s FROM order_status"
    ),
    "reconciliation_exceptions": ('SELECT kind, "key" FROM reconciliation_exceptions WHERE "open"'),
    "flow_stats": (
        "SELECT topic, consumed, applied, duplicates, dead_lettered, ignored, late FROM flow_stats"
    ),
    "dead_letters": 'SELECT topic, "partition", "offset", reason, raw FROM dead_letters',
}


def _parse_json_cell(text: Any) -> Any:
    """A JSON column value: parsed, NULL as {} (a record with no fields)."""
    if text is None:
        return {}
    if not isinstance(text, str | bytes):
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def load_views(path: str | Path) -> Views:
    """Read a views DuckDB file (read-only) into the normalized form.

    Raises ValueError when a table of CONTRACT §3.1 is missing or lacks a column.
    """
    con = connect(str(path), read_only=True)
    try:
        present = {
            row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()
        }
        present |= {
            row[0] for row in con.execute("SELECT view_name FROM duckdb_views()").fetchall()
        }
        missing = sorted(set(_QUERIES) - present)
        if missing:
            raise ValueError(f"{path}: missing table(s): {', '.join(missing)}")
        rows: dict[str, list[tuple]] = {}
        for table, query in _QUERIES.items():
            try:
                rows[table] = con.execute(query).fetchall()
            except duckdb.Error as exc:
                raise ValueError(
                    f"{path}: table {table} does not match the contract: {exc}"
                ) from exc
    finally:
        con.close()

    flow_stats: dict[str, dict[str, int]] = {}
    late: dict[str, int] = {}
    for topic, *counts, late_count in rows["flow_stats"]:
        flow_stats[topic] = dict(zip(STAT_COLUMNS, counts, strict=True))
        late[topic] = late_count
    return Views(
        records={
            (source, entity, key): RecordRow(deleted, _parse_json_cell(fields), version, ms)
            for source, entity, key, deleted, fields, version, ms in rows["records"]
        },
        inventory_live={sku: InventoryRow(*rest) for sku, *rest in rows["inventory_live"]},
        order_status={order_id: OrderRow(*rest) for order_id, *rest in rows["order_status"]},
        open_exceptions={(kind, key) for kind, key in rows["reconciliation_exceptions"]},
        flow_stats=flow_stats,
        late=late,
        dead_letters={tuple(row) for row in rows["dead_letters"]},
        now_ms=None,
    )


# --- Comparing -------------------------------------------------------------------------------


def _json_equal(a: Any, b: Any) -> bool:
    """JSON value equality that, unlike ==, tells booleans from numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _cell_equal(a: Any, b: Any) -> bool:
    """Equality of two view cells: floats within FLOAT_TOLERANCE, bools never equal to 0/1."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=FLOAT_TOLERANCE)
    return a == b


def _fields_diff(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    if not isinstance(expected, dict) or not isinstance(actual, dict):
        return f"expected {expected!r}, got {actual!r}"
    parts = []
    for name in sorted(set(expected) | set(actual), key=str):
        if name not in actual:
            parts.append(f"{name} missing (expected {expected[name]!r})")
        elif name not in expected:
            parts.append(f"{name} unexpected ({actual[name]!r})")
        elif not _json_equal(expected[name], actual[name]):
            parts.append(f"{name} expected {expected[name]!r}, got {actual[name]!r}")
    return "; ".join(parts)


def _rows_diff(
    table: str, expected: dict[Any, tuple], actual: dict[Any, tuple], out: list[str]
) -> None:
    """Differences between two keyed tables of NamedTuple rows, one line per row."""
    for key in sorted(set(expected) | set(actual), key=repr):
        if key not in actual:
            out.append(f"{table} {key!r}: missing, expected {expected[key]!r}")
            continue
        if key not in expected:
            out.append(f"{table} {key!r}: unexpected row {actual[key]!r}")
            continue
        want, got = expected[key], actual[key]
        problems = []
        for column, a, b in zip(want._fields, want, got, strict=True):
            if column == "fields":
                if not (isinstance(a, dict) and isinstance(b, dict) and _json_equal(a, b)):
                    problems.append(f"fields: {_fields_diff(a, b)}")
            elif not _cell_equal(a, b):
                problems.append(f"{column} expected {a!r}, got {b!r}")
        if problems:
            out.append(f"{table} {key!r}: " + "; ".join(problems))


def diff(expected: Views, actual: Views, limit: int = 20) -> list[str]:
    """Human-readable differences over the deterministic part (CONTRACT §2); [] when equal.

    Not compared: updated_at, first_seen, last_seen, detail, closed exceptions, late.
    A flow_stats topic missing on one side equals an all-zero row on the other; the
    clocks are compared only when both are known. At most `limit` lines, plus one
    line counting the rest.
    """
    out: list[str] = []
    _rows_diff("records", expected.records, actual.records, out)
    _rows_diff("inventory_live", expected.inventory_live, actual.inventory_live, out)
    _rows_diff("order_status", expected.order_status, actual.order_status, out)

    for kind, key in sorted(expected.open_exceptions - actual.open_exceptions):
        out.append(f"reconciliation_exceptions ({kind}, {key}): expected open, not open")
    for kind, key in sorted(actual.open_exceptions - expected.open_exceptions):
        out.append(f"reconciliation_exceptions ({kind}, {key}): open, not expected")

    zero = dict.fromkeys(STAT_COLUMNS, 0)
    for topic in sorted(set(expected.flow_stats) | set(actual.flow_stats)):
        want = expected.flow_stats.get(topic, zero)
        got = actual.flow_stats.get(topic, zero)
        problems = [
            f"{column} expected {want.get(column, 0)}, got {got.get(column, 0)}"
            for column in STAT_COLUMNS
            if want.get(column, 0) != got.get(column, 0)
        ]
        if problems:
            out.append(f"flow_stats {topic}: " + "; ".join(problems))

    for row in sorted(expected.dead_letters - actual.dead_letters):
        out.append(f"dead_letters: missing {_short(row)}")
    for row in sorted(actual.dead_letters - expected.dead_letters):
        out.append(f"dead_letters: unexpected {_short(row)}")

    if (
        expected.now_ms is not None
        and actual.now_ms is not None
        and expected.now_ms != actual.now_ms
    ):
        out.append(f"now_ms expected {expected.now_ms}, got {actual.now_ms}")

    if len(out) > limit:
        return out[:limit] + [f"... and {len(out) - limit} more differences"]
    return out


def _short(row: tuple[str, int, int, str, str]) -> str:
    topic, partition, offset, reason, raw = row
    text = raw if len(raw) <= 80 else raw[:77] + "..."
    return f"{topic}:{partition}:{offset} {reason} {text!r}"
