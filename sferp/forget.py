"""`sferp forget`: erase one data subject from a stopped flow's views file (GDPR erasure).

    sferp forget (--salesforce-id ID | --erp-key KEY) [--table T] [--views PATH]
                 [--config FILE] [--tombstones] [--bootstrap HOST:PORT] [--no-compact] [--json]

What is removed, in one DuckDB transaction (docs/data-protection.md, "Erasure"):

- `records`: the named record (Salesforce: every entity with that Id, compared in
  the 18-character form; ERP: the record key, in every ERP table or `--table`);
- view rows keyed by it: `order_status` (an Order Id), `inventory_live` (an ERP
  item's sku), and `reconciliation_exceptions` whose key is the Id, the order_no or
  the sku;
- `dead_letters` whose raw payload mentions it (as a whole token);
- `audit_log` rows of the removed rows, and rows whose key or lineage mention it;
- the same rows in the writer's undo log (`sferp_sink.undo_*`), so a resume cannot
  bring them back, and the Kafka mirror's entries (`<views>.kafka.sqlite3`) for
  the removed reconciled.* keys; with `--tombstones` a tombstone is produced for
  each of those keys.

Then, since DuckDB may keep deleted values in freed blocks of the file, the file
is rewritten (`COPY FROM DATABASE` into a new file that replaces it; `--no-compact`
skips this) and its bytes are scanned for uncompressed copies of the identifier.

Other records that merely *reference* the subject (an Order's AccountId) are
other subjects' data: they are counted, not changed. One `erase` row in audit_log
(without the identifier) records that an erasure happened and what it removed.

The flow must be stopped: a running flow holds the file's write lock (exit 1 with
one line saying so). Not erased here: the input topics, the recovery snapshots and
values already consumed from reconciled.* (see the documentation).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson

from sferp.config import ConfigError, load_settings
from sferp.connectors.duckdb_schema import AUDIT_TABLE, INTERNAL_SCHEMA, quote
from sferp.duckdb_connect import connect
from sferp.sfid import to18
from sferp.usage import OneLineParser
from sferp.views_file import open_stopped, rewrite, tables

INTERNAL = INTERNAL_SCHEMA
ERP_SINGLE_KEYS = {"items": "sku", "sales_orders": "order_no"}
ERP_TABLES = ("items", "inventory", "sales_orders")


class ForgetError(Exception):
    """Erasure impossible (file missing, locked); `code` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        """Keep the one-line message and the exit code."""
        super().__init__(message)
        self.code = code


def _mention(values: list[str]) -> str:
    """RE2 pattern: any of `values` as a whole token (not inside a longer id or number)."""
    alts = "|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True))
    return f"(^|[^0-9A-Za-z_-])({alts})([^0-9A-Za-z_-]|$)"


class Subject:
    """What identifies the data subject in each table."""

    def __init__(
        self, *, salesforce_id: str | None = None, erp_key: str | None = None, table: str = ""
    ) -> None:
        """From `--salesforce-id` or `--erp-key` (`--table` limits ERP tables)."""
        if (salesforce_id is None) == (erp_key is None):
            raise ConfigError("give exactly one of --salesforce-id and --erp-key")
        if table and table not in ERP_TABLES:
            raise ConfigError(f"--table: unknown ERP table {table!r} ({', '.join(ERP_TABLES)})")
        self.records: list[tuple[str, str | None, str]] = []  # (source, entity or None, key)
        self.order_ids: list[str] = []
        self.skus: list[str] = []
        self.exception_keys: list[str] = []
        if salesforce_id is not None:
            sid = salesforce_id.strip()
            if not sid or not sid.isascii() or not sid.isalnum() or len(sid) not in (15, 18):
                raise ConfigError("--salesforce-id: expected a 15- or 18-character Salesforce Id")
            sid = to18(sid)
            self.label = f"Salesforce Id {sid}"
            self.records = [("salesforce", None, sid)]
            self.order_ids = [sid]
            self.exception_keys = [sid]
            self.tokens = [sid, sid[:15]]
            return
        text = erp_key.strip() if erp_key else ""
        if not text:
            raise ConfigError("--erp-key: empty")
        tables = [table] if table else list(ERP_TABLES)
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            if text.startswith("{"):  # meant as a JSON key: a typo must not match by substring
                raise ConfigError(
                    "--erp-key: starts like a JSON key but is not valid JSON"
                ) from None
            obj = None
        if isinstance(obj, dict):
            if not obj or not all(isinstance(v, str | int) for v in obj.values()):
                raise ConfigError("--erp-key: a JSON key maps column names to strings or integers")
            rk = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()
            self.records = [("erp", t, rk) for t in tables]
            values = [str(v) for v in obj.values()]
            if len(obj) == 1:
                ((col, val),) = obj.items()
                self._single(col, str(val), tables)
        else:
            values = [text]
            for t in tables:
                col = ERP_SINGLE_KEYS.get(t)
                if col is None:
                    continue
                self.records.append(("erp", t, orjson.dumps({col: text}).decode()))
                if text.isdigit() and str(int(text)) == text:
                    self.records.append(("erp", t, orjson.dumps({col: int(text)}).decode()))
                self._single(col, text, [t])
        self.label = f"ERP key {text}"
        self.tokens = values

    def _single(self, col: str, value: str, tables: list[str]) -> None:
        if col == "sku" and "items" in tables:
            self.skus.append(value)
            self.exception_keys.append(value)
        if col == "order_no" and "sales_orders" in tables:
            self.exception_keys.append(value)


def _count_delete(con: duckdb.DuckDBPyConnection, table: str, where: str, params: list) -> int:
    (n,) = con.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()
    if n:
        con.execute(f"DELETE FROM {table} WHERE {where}", params)
    return int(n)


def _records_where(s: Subject) -> tuple[str, list]:
    parts, params = [], []
    for source, entity, key in s.records:
        if entity is None:
            parts.append("(source = ? AND record_key = ?)")
            params += [source, key]
        else:
            parts.append("(source = ? AND entity = ? AND record_key = ?)")
            params += [source, entity, key]
    return " OR ".join(parts) or "false", params


def _in(column: str, values: list[str]) -> tuple[str, list]:
    if not values:
        return "false", []
    return f"{quote(column)} IN ({', '.join('?' for _ in values)})", list(values)


def forget(
    views_path: str,
    subject: Subject,
    *,
    topics: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Erase `subject` from the views file; return the report (counts per table and more).

    `topics`: the reconciled.* topic names (`inventory`, `orders`, `exceptions`), to
    name the Kafka keys whose latest values held the subject.
    """
    topics = topics or {
        "inventory": "reconciled.inventory",
        "orders": "reconciled.orders",
        "exceptions": "reconciled.exceptions",
    }
    if not os.path.exists(views_path):
        raise ForgetError(f"no views file at {views_path} (pass --views)", 2)
    con = open_stopped(views_path, "forget", ForgetError)
    report: dict[str, Any] = {"subject": subject.label, "removed": {}, "undo_log": 0}
    removed: dict[str, int] = report["removed"]
    with rewrite(con):
        present = tables(con)
        mention = _mention(subject.tokens)
        rec_where, rec_params = _records_where(subject)
        exc_where, exc_params = _in("key", subject.exception_keys)
        ord_where, ord_params = _in("sf_order_id", subject.order_ids)
        sku_where, sku_params = _in("sku", subject.skus)
        dl_where = "regexp_matches(raw, ?)"
        per_table = {
            "records": (rec_where, rec_params),
            "order_status": (ord_where, ord_params),
            "inventory_live": (sku_where, sku_params),
            "reconciliation_exceptions": (exc_where, exc_params),
            "dead_letters": (dl_where, [mention]),
        }
        # the Kafka keys and audit row keys of the rows about to go
        kafka_keys: list[tuple[str, str]] = []
        row_keys: list[str] = []
        if ("main", "order_status") in present:
            for (k,) in con.execute(
                f"SELECT sf_order_id FROM order_status WHERE {ord_where}", ord_params
            ).fetchall():
                kafka_keys.append((topics["orders"], k))
                row_keys.append(k)
        if ("main", "inventory_live") in present:
            for (k,) in con.execute(
                f"SELECT sku FROM inventory_live WHERE {sku_where}", sku_params
            ).fetchall():
                kafka_keys.append((topics["inventory"], k))
                row_keys.append(k)
        if ("main", "reconciliation_exceptions") in present:
            for kind, k in con.execute(
                f"SELECT kind, key FROM reconciliation_exceptions WHERE {exc_where}", exc_params
            ).fetchall():
                kafka_keys.append((topics["exceptions"], f"{kind}:{k}"))
                row_keys.append(f"{kind}:{k}")
        if ("main", "records") in present:
            row_keys += [
                f"{a}:{b}:{c}"
                for a, b, c in con.execute(
                    f"SELECT source, entity, record_key FROM records WHERE {rec_where}",
                    rec_params,
                ).fetchall()
            ]
        if ("main", "dead_letters") in present:
            row_keys += [
                f"{a}:{b}:{c}"
                for a, b, c in con.execute(
                    f'SELECT topic, partition, "offset" FROM dead_letters WHERE {dl_where}',
                    [mention],
                ).fetchall()
            ]
        for table, (where, params) in per_table.items():
            if ("main", table) in present:
                removed[table] = _count_delete(con, quote(table), where, params)
            undo = f"undo_{table}"
            if (INTERNAL, undo) in present:
                report["undo_log"] += _count_delete(con, f"{INTERNAL}.{quote(undo)}", where, params)
        if ("main", AUDIT_TABLE) in present:
            rk_where, rk_params = _in("row_key", row_keys)
            removed[AUDIT_TABLE] = _count_delete(
                con,
                AUDIT_TABLE,
                f"{rk_where} OR regexp_matches(coalesce(row_key, ''), ?) "
                "OR regexp_matches(coalesce(CAST(lineage AS VARCHAR), ''), ?)",
                [*rk_params, mention, mention],
            )
        # references from other subjects' rows: reported, not changed
        refs: dict[str, int] = {}
        if ("main", "records") in present:
            (refs["records"],) = con.execute(
                "SELECT count(*) FROM records WHERE regexp_matches(CAST(fields AS VARCHAR), ?)",
                [mention],
            ).fetchone()
        if ("main", "order_status") in present:
            (refs["order_status"],) = con.execute(
                "SELECT count(*) FROM order_status WHERE regexp_matches(concat_ws(' ', "
                "account_id, erp_order_no, order_number), ?)",
                [mention],
            ).fetchone()
        report["references_left"] = {k: int(v) for k, v in refs.items() if v}
        if ("main", AUDIT_TABLE) in present:
            con.execute(
                f"INSERT INTO {AUDIT_TABLE} VALUES (?, '*', NULL, 'erase', CAST(? AS JSON), "
                "NULL, ?, NULL)",
                [
                    datetime.now(UTC).replace(tzinfo=None),
                    orjson.dumps({"removed": removed, "undo_log": report["undo_log"]}).decode(),
                    f"sferp forget {socket.gethostname()}:{os.getpid()}",
                ],
            )
    report["kafka_mirror"] = _forget_mirror(f"{views_path}.kafka.sqlite3", kafka_keys)
    report["kafka_keys"] = [list(k) for k in kafka_keys]
    report["traces_in_file"] = _traces(views_path, subject.tokens)
    return report


def _forget_mirror(path: str, keys: list[tuple[str, str]]) -> int:
    """Drop the removed keys from the Kafka mirror and its undo rows; the rows removed."""
    if not keys or not os.path.exists(path):
        return 0
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        n = 0
        for topic, key in keys:
            for table in ("mirror", "undo"):
                cur = con.execute(
                    f"DELETE FROM {table} WHERE topic = ? AND key = ?", [topic, key.encode()]
                )
                n += cur.rowcount
        con.execute("COMMIT")
        con.execute("VACUUM")
    finally:
        con.close()
    return n


def _traces(path: str, tokens: list[str]) -> bool:
    """Whether the identifier's bytes still occur in the file (free blocks, WAL)."""
    needles = [t.encode() for t in tokens if len(t) >= 4]
    for p in (path, f"{path}.wal"):
        try:
            data = Path(p).read_bytes()
        except OSError:
            continue
        if any(n in data for n in needles):
            return True
    return False


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


def compact(path: str) -> None:
    """Rewrite the file into a new one (no free blocks), then replace it."""
    tmp = f"{path}.compact.tmp"
    Path(tmp).unlink(missing_ok=True)
    con = connect()
    try:
        con.execute(f"ATTACH '{_sql_str(path)}' AS src")
        con.execute(f"ATTACH '{_sql_str(tmp)}' AS dst")
        con.execute("COPY FROM DATABASE src TO dst")
        con.execute("DETACH src")
        con.execute("DETACH dst")
    finally:
        con.close()
    os.replace(tmp, path)


def _send_tombstones(settings: Any, keys: list[tuple[str, str]]) -> int:
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap.split(","), **settings.kafka_client_config()
    )
    try:
        for topic, key in keys:
            producer.send(topic, key=key.encode(), value=None)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)
    return len(keys)


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"forgot {report['subject']} in {report['views']}:"]
    for table, n in report["removed"].items():
        lines.append(f"  {table:<26} {n:>6} row(s) removed")
    lines.append(f"  {'undo log (sferp_sink)':<26} {report['undo_log']:>6} row(s) removed")
    lines.append(f"  {'kafka mirror':<26} {report['kafka_mirror']:>6} row(s) removed")
    refs = report["references_left"]
    if refs:
        what = ", ".join(f"{n} {t} row(s)" for t, n in refs.items())
        lines.append(f"left in place: {what} that reference it (other subjects' data)")
    keys = report["kafka_keys"]
    if keys:
        sent = report.get("tombstones_sent")
        if sent:
            lines.append(f"kafka: tombstones sent for {sent} key(s) of reconciled.*")
        else:
            shown = ", ".join(f"{t}:{k}" for t, k in keys[:5])
            lines.append(
                f"kafka: {len(keys)} reconciled.* key(s) still hold its last values ({shown}"
                f"{', ...' if len(keys) > 5 else ''}); run with --tombstones before restarting"
                " the flow, or tombstone them yourself"
            )
    if report.get("compacted"):
        lines.append("file: rewritten, so freed blocks keep no deleted bytes")
    else:
        lines.append("file: not rewritten (--no-compact): freed blocks may keep deleted bytes")
    if report["traces_in_file"]:
        lines.append(
            "file: the identifier still occurs uncompressed in its bytes "
            + ("(in the rows that reference it)" if refs else "(freed blocks)")
        )
    lines.append(
        "not erased here: the input topics, the recovery snapshots, and the copies "
        "consumers already read (see docs/data-protection.md)"
    )
    return "\n".join(lines)


def cli_forget(argv: list[str]) -> int:
    """`sferp forget`; returns the exit code."""
    ap = OneLineParser(
        prog="sferp forget",
        description="Erase one data subject from a stopped flow's views file (GDPR erasure).",
    )
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--salesforce-id", help="a Salesforce record Id (15 or 18 characters)")
    who.add_argument(
        "--erp-key",
        help='an ERP record key: its JSON form ({"order_no":"SO-1"}) or a single key value',
    )
    ap.add_argument("--table", default="", help="only this ERP table (items, inventory, ...)")
    ap.add_argument("--views", help="views file (default: views.path)")
    ap.add_argument("--config", help="TOML configuration file (views path, topic names, Kafka)")
    ap.add_argument(
        "--tombstones",
        action="store_true",
        help="produce a tombstone for each removed reconciled.* key (kafka settings)",
    )
    ap.add_argument("--bootstrap", help="Kafka bootstrap HOST:PORT for --tombstones")
    ap.add_argument(
        "--no-compact",
        action="store_true",
        help="do not rewrite the file (freed blocks may then keep deleted bytes)",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    overrides: dict[str, dict[str, Any]] = {}
    if args.views:
        overrides["views"] = {"path": args.views}
    if args.bootstrap:
        overrides["kafka"] = {"bootstrap": args.bootstrap}
    settings = load_settings(args.config, overrides=overrides)
    subject = Subject(salesforce_id=args.salesforce_id, erp_key=args.erp_key, table=args.table)
    t = settings.topics
    path = settings.views.path
    try:
        report = forget(
            path,
            subject,
            topics={
                "inventory": t.out_inventory,
                "orders": t.out_orders,
                "exceptions": t.out_exceptions,
            },
        )
        if not args.no_compact:
            compact(path)  # freed blocks may keep deleted bytes: rewrite the file
            report["compacted"] = True
            report["traces_in_file"] = _traces(path, subject.tokens)
    except ForgetError as exc:
        print(f"sferp forget: {exc}", file=sys.stderr)
        return exc.code
    report["views"] = path
    if args.tombstones and report["kafka_keys"]:
        report["tombstones_sent"] = _send_tombstones(
            settings, [(a, b) for a, b in report["kafka_keys"]]
        )
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(report))
    return 0
