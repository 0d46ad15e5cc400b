"""The DuckDB views schema of CONTRACT §3.1: table names, columns, types and primary keys.

One place defines the schema so that the writer, the query tests and anything that
builds rows (the flow's view stage) agree on column order. Timestamps are naive
`TIMESTAMP` values in UTC; amounts are `DECIMAL(18,2)`; `records.fields` is `JSON`.

Note that `offset` (in `dead_letters`) is a reserved word in DuckDB's SQL: queries
must quote it, as in `SELECT "offset" FROM dead_letters`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the schema is plain data: importing it does not load DuckDB
    import duckdb

# Table -> ((column, DuckDB type), ...) in the contract's column order.
SCHEMA: dict[str, tuple[tuple[str, str], ...]] = {
    "records": (
        ("source", "VARCHAR"),
        ("entity", "VARCHAR"),
        ("record_key", "VARCHAR"),
        ("deleted", "BOOLEAN"),
        ("fields", "JSON"),
        ("version", "VARCHAR"),
        ("event_time", "TIMESTAMP"),
    ),
    "flow_stats": (
        ("topic", "VARCHAR"),
        ("consumed", "BIGINT"),
        ("applied", "BIGINT"),
        ("duplicates", "BIGINT"),
        ("late", "BIGINT"),
        ("dead_lettered", "BIGINT"),
        ("ignored", "BIGINT"),
    ),
    "dead_letters": (
        ("topic", "VARCHAR"),
        ("partition", "INTEGER"),
        ("offset", "BIGINT"),
        ("reason", "VARCHAR"),
        ("raw", "VARCHAR"),
    ),
    "inventory_live": (
        ("sku", "VARCHAR"),
        ("on_hand", "BIGINT"),
        ("allocated", "BIGINT"),
        ("sf_open_demand", "BIGINT"),
        ("available_to_promise", "BIGINT"),
        ("updated_at", "TIMESTAMP"),
    ),
    "order_status": (
        ("sf_order_id", "VARCHAR"),
        ("order_number", "VARCHAR"),
        ("account_id", "VARCHAR"),
        ("erp_order_no", "VARCHAR"),
        ("sf_status", "VARCHAR"),
        ("erp_status", "VARCHAR"),
        ("stage", "VARCHAR"),
        ("sf_total", "DECIMAL(18,2)"),
        ("erp_total", "DECIMAL(18,2)"),
        ("amount_matches", "BOOLEAN"),
        ("activated_at", "TIMESTAMP"),
        ("invoiced_at", "TIMESTAMP"),
        ("quote_to_cash_s", "DOUBLE"),
        ("updated_at", "TIMESTAMP"),
    ),
    "reconciliation_exceptions": (
        ("kind", "VARCHAR"),
        ("key", "VARCHAR"),
        ("detail", "VARCHAR"),
        ("first_seen", "TIMESTAMP"),
        ("last_seen", "TIMESTAMP"),
        ("open", "BOOLEAN"),
    ),
}

# Table -> column names, in order (the order of a row tuple sent to the writer).
TABLES: dict[str, tuple[str, ...]] = {t: tuple(c for c, _ in cols) for t, cols in SCHEMA.items()}

# Table -> primary key column names, in order (the order of a key tuple).
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "records": ("source", "entity", "record_key"),
    "flow_stats": ("topic",),
    "dead_letters": ("topic", "partition", "offset"),
    "inventory_live": ("sku",),
    "order_status": ("sf_order_id",),
    "reconciliation_exceptions": ("kind", "key"),
}

# Table -> names of the TIMESTAMP columns (sent to the writer as int ms since the epoch).
TIMESTAMP_COLUMNS: dict[str, tuple[str, ...]] = {
    t: tuple(c for c, ty in cols if ty == "TIMESTAMP") for t, cols in SCHEMA.items()
}


# The audit trail (docs/data-protection.md): append-only, one row per view row
# changed by a commit. Not a view of CONTRACT §3.1, so not in SCHEMA: the writer
# neither clears it on a fresh start nor keeps before-images of it; a resume
# deletes the rows of the commits it undoes (`seq` is the commit's number).
# Note that `at` is a reserved word in DuckDB's SQL: queries must quote it ("at").
AUDIT_TABLE = "audit_log"
AUDIT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("at", "TIMESTAMP"),  # commit wall time, UTC
    ("table_name", "VARCHAR"),
    ("row_key", "VARCHAR"),  # the row's Kafka key form; records: source:entity:record_key
    ("action", "VARCHAR"),  # insert, update, delete; truncate (fresh start), erase (forget)
    ("lineage", "JSON"),  # source event identities that produced this version
    ("event_time", "TIMESTAMP"),  # of the row's latest change (NULL for deletes)
    ("worker", "VARCHAR"),  # host:pid of the writer
    ("seq", "BIGINT"),  # the writer's commit sequence number
)


# The writer's own tables (sequence, snapshots, undo log, run id) live in this schema.
INTERNAL_SCHEMA = "sferp_sink"


def audit_ddl() -> str:
    """`CREATE TABLE IF NOT EXISTS audit_log (...)` (no primary key: append-only)."""
    cols = ", ".join(f"{quote(c)} {ty}" for c, ty in AUDIT_COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} ({cols})"


def quote(name: str) -> str:
    """Quote an identifier for DuckDB (several column names are SQL keywords)."""
    return '"' + name.replace('"', '""') + '"'


def table_ddl(table: str, name: str | None = None, *, temp: bool = False) -> str:
    """`CREATE TABLE IF NOT EXISTS` statement of one view table (optionally under another name)."""
    cols = ", ".join(f"{quote(c)} {ty}" for c, ty in SCHEMA[table])
    pk = ", ".join(quote(c) for c in PRIMARY_KEYS[table])
    kind = "TEMP TABLE" if temp else "TABLE"
    return f"CREATE {kind} IF NOT EXISTS {quote(name or table)} ({cols}, PRIMARY KEY ({pk}))"


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create every view table that does not exist yet (existing tables are left alone)."""
    for table in SCHEMA:
        con.execute(table_ddl(table))


def schema_problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Differences between the view tables in `con` and SCHEMA (empty when they match).

    Compares column names, order and types through information_schema, and primary
    keys through duckdb_constraints(), so an old or foreign file is noticed before
    anything is written to it.
    """
    problems: list[str] = []
    for table, cols in SCHEMA.items():
        found = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        if not found:
            problems.append(f"table {table} is missing")
            continue
        if [(c, t) for c, t in found] != list(cols):
            problems.append(f"table {table} has columns {found}, expected {list(cols)}")
        pk = con.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() "
            "WHERE schema_name = 'main' AND table_name = ? AND constraint_type = 'PRIMARY KEY'",
            [table],
        ).fetchall()
        if [tuple(r[0]) for r in pk] != [PRIMARY_KEYS[table]]:
            problems.append(f"table {table} has primary key {pk}, expected {PRIMARY_KEYS[table]}")
    return problems
