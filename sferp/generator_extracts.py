"""Scheduled ERP extract files from the synthetic world (`sferp generate --extracts DIR`).

The same simulation as the CDC generator (sferp.generator_sim) runs; instead
of sending the chosen ERP tables' changes to Kafka as Debezium events, it
keeps the ERP's table state and exports it on a schedule, as ERPs without
CDC do: full snapshots and deltas of the rows changed since the previous
export, in CSV (some gzipped), Parquet and JSONL, named by the default rule
of README "Batch extracts". A few exports fail as they do in real life (a
truncated CSV, a truncated Parquet file, a renamed column, a garbage line) and
are followed by a good retry. Salesforce CDC and the ERP tables not exported
still go to Kafka or JSONL as usual.

Alongside, it computes the change events a correct extract reader must
derive from those files (`ExtractWorld.events`): a plain Python comparison of
each applied file with the state the previous applied files left, written
from the README's rules and independent of the reader's DuckDB code. The
tests feed them to the reference model as Debezium messages and compare.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from sferp.duckdb_connect import connect
from sferp.events import RawMessage
from sferp.generator import GeneratedMessage, GeneratorConfig, partition_for
from sferp.generator_forms import ERP_ROLES
from sferp.generator_mix import mix
from sferp.generator_sim import Simulation

__all__ = [
    "EXTRACT_TABLES",
    "ExtractFileInfo",
    "ExtractGenerator",
    "ExtractWorld",
    "ORDER_BASE",
    "write_extracts",
]

EXTRACT_TABLES = ("items", "inventory", "sales_orders")
ORDER_BASE = 10**9  # order key = export sequence * ORDER_BASE + row number (README)
DELETE_COLUMN = "_deleted"

MIN = 60_000
TICK = 10 * MIN  # the exporter's scheduler wakes every 10 simulated minutes
FIRST_EXPORT = MIN  # right after the ERP's initial load
# table -> (full snapshot every, delta every or None), in simulated ms
SCHEDULE: dict[str, tuple[int, int | None]] = {
    "items": (120 * MIN, 30 * MIN),  # item master: full every 2 h, deltas every 30 min
    "inventory": (30 * MIN, None),  # stock: a full snapshot every 30 min
    "sales_orders": (180 * MIN, 10 * MIN),  # orders: deltas every 10 min, full every 3 h
}
# (table, n-th export of that table) -> how that export goes wrong (then it is retried)
FAULTS: dict[tuple[str, int], str] = {
    ("items", 2): "bad_header",
    ("inventory", 3): "truncated_csv",
    ("inventory", 7): "truncated_parquet",
    ("sales_orders", 4): "garbage_line",
}
RETRY_DELAY = MIN

# Column types as the ERP stores them (decimals in integer cents).
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "items": (
        ("sku", "text"),
        ("description", "text"),
        ("list_price", "cents"),
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
        ("total_amount", "cents"),
        ("currency", "text"),
    ),
}
KEYS: dict[str, tuple[str, ...]] = {
    "items": ("sku",),
    "inventory": ("sku", "warehouse"),
    "sales_orders": ("order_no",),
}
_PARQUET_TYPES = {"text": "VARCHAR", "int": "BIGINT", "cents": "DECIMAL(18,2)", "bool": "BOOLEAN"}


class ExtractFileInfo(NamedTuple):
    """One written extract file."""

    name: str
    table: str
    kind: str  # full or delta
    seq: int
    export_ms: int
    fmt: str  # csv, csv.gz, parquet, jsonl
    rows: int
    fault: str | None  # how it is malformed, None when good


class ExtractEvent(NamedTuple):
    """A change a correct reader derives from the files."""

    table: str
    op: str  # "u" (create or update) or "d"
    order: int
    export_ms: int
    image: dict[str, Any]


@dataclass
class ExtractWorld:
    """What `ExtractGenerator` wrote and what a correct reader must make of it."""

    directory: str
    tables: tuple[str, ...]
    files: list[ExtractFileInfo] = field(default_factory=list)
    events: list[ExtractEvent] = field(default_factory=list)

    def equivalent_messages(self, topics: dict[str, str]) -> list[RawMessage]:
        """The events as Debezium messages (lsn = order key, ts_ms = export time).

        `topics` maps each table to its ERP topic; the reference model fed
        with these gives the views a flow fed with the files must give.
        """
        out: list[RawMessage] = []
        offsets: dict[str, int] = {}
        for ev in self.events:
            topic = topics[ev.table]
            key = {c: ev.image[c] for c in KEYS[ev.table]}
            env = {
                "before": ev.image if ev.op == "d" else None,
                "after": None if ev.op == "d" else ev.image,
                "source": {"table": ev.table, "lsn": ev.order, "ts_ms": ev.export_ms},
                "op": "d" if ev.op == "d" else "c",
                "ts_ms": ev.export_ms,
            }
            off = offsets.get(topic, 0)
            offsets[topic] = off + 1
            out.append(
                RawMessage(
                    topic,
                    0,
                    off,
                    orjson.dumps(key, option=orjson.OPT_SORT_KEYS),
                    orjson.dumps(env),
                    -1,
                )
            )
        return out

    def dead_letters(self) -> set[tuple[str, int, int, str]]:
        """`(topic, partition, offset, raw)` of the dead letter each malformed file must give."""
        return {(f"extract:{f.table}", 0, f.seq, f.name) for f in self.files if f.fault}


def _cents_text(c: int) -> str:
    sign = "-" if c < 0 else ""
    c = abs(c)
    return f"{sign}{c // 100}.{c % 100:02d}"


def _canonical(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """The row image a reader stores: decimals as text, empty text as null."""
    out: dict[str, Any] = {}
    for name, typ in COLUMNS[table]:
        v = row.get(name)
        if v is None:
            out[name] = None
        elif typ == "cents":
            out[name] = _cents_text(v)
        elif typ == "text":
            out[name] = None if v == "" else str(v)
        elif typ == "bool":
            out[name] = bool(v)
        else:
            out[name] = int(v)
        if out[name] == "":
            out[name] = None
    return out


def _key(table: str, row: dict[str, Any]) -> str:
    return orjson.dumps({c: row[c] for c in KEYS[table]}, option=orjson.OPT_SORT_KEYS).decode()


def _stamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")


class _Table:
    """The ERP's copy of one table and what changed since its last export."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: dict[tuple, dict[str, Any]] = {}
        self.changed: dict[tuple, str] = {}  # pk -> "u" or "d" since the last export
        self.exports = 0
        self.seq = 0
        self.consumer: dict[str, dict[str, Any]] = {}  # what a reader holds: key -> image

    def apply(self, op: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        image = after if after is not None else before
        assert image is not None
        pk = tuple(image[c] for c in KEYS[self.name])
        if op == "d":
            self.rows.pop(pk, None)
            self.changed[pk] = "d"
        else:
            self.rows[pk] = dict(after or {})
            self.changed[pk] = "u"


class ExtractGenerator:
    """Runs the simulation once: Kafka messages out, extract files written as it goes.

    Iterate `labelled()` (or `messages()`) for the messages of the roles not
    exported, exactly as `sferp.generator.generate_labelled` would produce
    them minus the exported ERP tables; the files are complete and `world`
    is filled when the iteration ends.
    """

    def __init__(
        self,
        cfg: GeneratorConfig,
        out_dir: str | os.PathLike[str],
        tables: tuple[str, ...] = EXTRACT_TABLES,
    ) -> None:
        unknown = [t for t in tables if t not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown ERP table {unknown[0]!r}; known: {', '.join(COLUMNS)}")
        self.cfg = cfg
        self.dir = Path(out_dir)
        self.tables = tuple(t for t in EXTRACT_TABLES if t in tables)
        self.faults = cfg.bad > 0
        self.world = ExtractWorld(str(self.dir), self.tables)
        self._t: dict[str, _Table] = {t: _Table(t) for t in self.tables}
        self._next_tick = cfg.base_time_ms + FIRST_EXPORT
        self._first = self._next_tick
        self._last_ms = cfg.base_time_ms

    # -- the simulation's ERP, observed ----------------------------------------------------------

    def _hook(self, sim: Simulation) -> None:
        erp = sim.erp
        transaction, snapshot = erp.transaction, erp.snapshot

        def on_transaction(ts: int, changes: list[tuple[str, str, Any, Any]]) -> None:
            self._advance(ts)
            for table, op, before, after in changes:
                if table in self._t:
                    self._t[table].apply(op, before, after)
            transaction(ts, changes)

        def on_snapshot(ts: int, tables: list[tuple[str, list[dict[str, Any]]]]) -> None:
            self._advance(ts)
            for table, rows in tables:
                if table in self._t:
                    for row in rows:
                        self._t[table].apply("c", None, row)
            snapshot(ts, tables)

        erp.transaction = on_transaction  # type: ignore[method-assign]
        erp.snapshot = on_snapshot  # type: ignore[method-assign]

    def _advance(self, ts: int) -> None:
        """Run every export scheduled before `ts` (changes at `ts` come after them)."""
        self._last_ms = max(self._last_ms, ts)
        while self._next_tick < ts:
            t = self._next_tick
            since = t - self._first
            for name in self.tables:
                full_every, delta_every = SCHEDULE[name]
                if since % full_every == 0:
                    self._export(name, "full", t)
                elif delta_every and since % delta_every == 0:
                    self._export(name, "delta", t)
            self._next_tick += TICK

    def labelled(self) -> Iterator[tuple[GeneratedMessage, str]]:
        """The Kafka messages of the roles not exported, with their expected outcome."""
        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        sim = Simulation(cfg.orders, cfg.seed, cfg.base_time_ms)
        self._hook(sim)
        dropped = {ERP_ROLES[t] for t in self.tables}
        events = (e for e in sim.events() if e[0] not in dropped)
        for role, key, value, label in mix(events, cfg.duplicates, cfg.disorder, cfg.bad, cfg.seed):
            msg = GeneratedMessage(
                cfg.topics[role], partition_for(key, value, cfg.partitions), key, value
            )
            yield msg, label
        # Every export due until the end, then a final full snapshot of every table.
        end = max(self._last_ms, sim.now)
        self._advance(end + 1)
        final = self._next_tick
        for name in self.tables:
            self._export(name, "full", final)

    def messages(self) -> Iterator[GeneratedMessage]:
        """Like `labelled`, without the labels."""
        for msg, _ in self.labelled():
            yield msg

    def run(self) -> ExtractWorld:
        """Write every file (discarding the Kafka messages); return the world."""
        for _ in self.labelled():
            pass
        return self.world

    # -- exports ---------------------------------------------------------------------------------

    def _export(self, name: str, kind: str, at: int) -> None:
        t = self._t[name]
        t.exports += 1
        if kind == "full":
            rows = [(dict(r), False) for r in t.rows.values()]
        else:
            rows = []
            for pk, how in t.changed.items():
                if how == "d":
                    rows.append(({c: v for c, v in zip(KEYS[name], pk, strict=True)}, True))
                else:
                    rows.append((dict(t.rows[pk]), False))
        t.changed = {}
        fault = FAULTS.get((name, t.exports)) if self.faults else None
        if fault is not None:
            self._write(t, kind, at, rows, fault)
            at += RETRY_DELAY  # the operator re-runs the export
        self._write(t, kind, at, rows, None)

    def _format(self, t: _Table, kind: str, fault: str | None) -> str:
        if fault == "truncated_parquet":
            return "parquet"
        if fault in ("truncated_csv", "bad_header"):
            return "csv"
        if fault == "garbage_line":
            return "jsonl"
        if t.name == "items":
            return ("csv", "jsonl")[t.seq % 2]
        if t.name == "inventory":
            return ("csv", "csv.gz", "parquet")[t.seq % 3]
        return "parquet" if kind == "full" else ("jsonl", "csv")[t.seq % 2]

    def _write(
        self,
        t: _Table,
        kind: str,
        at: int,
        rows: list[tuple[dict[str, Any], bool]],
        fault: str | None,
    ) -> None:
        t.seq += 1
        fmt = self._format(t, kind, fault)
        name = f"{t.name}.{kind}.{t.seq:06d}.{_stamp(at)}.{fmt}"
        path = self.dir / name
        columns = [c for c, _ in COLUMNS[t.name]]
        if kind == "delta":
            columns.append(DELETE_COLUMN)
        if fmt == "parquet":
            _write_parquet(path, t.name, columns, rows)
        elif fmt == "jsonl":
            _write_jsonl(path, t.name, columns, rows, fault == "garbage_line")
        else:
            header = list(columns)
            if fault == "bad_header":
                header[header.index(COLUMNS[t.name][2][0])] += "_old"
            _write_csv(path, t.name, header, columns, rows, gz=fmt == "csv.gz")
        if fault == "truncated_csv":
            _truncate_mid_row(path)
        elif fault == "truncated_parquet":
            with open(path, "r+b") as f:
                f.truncate(max(1, os.path.getsize(path) // 2))
        self.world.files.append(
            ExtractFileInfo(name, t.name, kind, t.seq, at, fmt, len(rows), fault)
        )
        if fault is None:
            self._expect(t, kind, at, rows)

    def _expect(
        self, t: _Table, kind: str, at: int, rows: list[tuple[dict[str, Any], bool]]
    ) -> None:
        """The events a correct reader derives from this (good) file, per README."""
        base = t.seq * ORDER_BASE
        consumer = t.consumer
        ev = self.world.events
        present: set[str] = set()
        for rn, (row, deleted) in enumerate(rows, 1):
            key = _key(t.name, row)
            if deleted:
                if kind == "delta" and key in consumer:
                    ev.append(ExtractEvent(t.name, "d", base + rn, at, consumer.pop(key)))
                continue
            present.add(key)
            image = _canonical(t.name, row)
            if consumer.get(key) != image:
                consumer[key] = image
                ev.append(ExtractEvent(t.name, "u", base + rn, at, image))
        if kind == "full":
            gone = sorted(k for k in consumer if k not in present)
            for i, key in enumerate(gone, 1):
                ev.append(ExtractEvent(t.name, "d", base + len(rows) + i, at, consumer.pop(key)))


def _cell(typ: str, v: Any) -> str:
    if v is None:
        return ""
    if typ == "cents":
        return _cents_text(v)
    if typ == "bool":
        return "true" if v else "false"
    return str(v)


def _write_csv(
    path: Path,
    table: str,
    header: list[str],
    columns: list[str],
    rows: list[tuple[dict[str, Any], bool]],
    gz: bool,
) -> None:
    types = dict(COLUMNS[table])
    opener: Any = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for row, deleted in rows:
            w.writerow(
                [
                    ("true" if deleted else "false")
                    if c == DELETE_COLUMN
                    else _cell(types[c], row.get(c))
                    for c in columns
                ]
            )


def _write_jsonl(
    path: Path,
    table: str,
    columns: list[str],
    rows: list[tuple[dict[str, Any], bool]],
    garbage: bool,
) -> None:
    types = dict(COLUMNS[table])
    with open(path, "wb") as f:
        for i, (row, deleted) in enumerate(rows):
            if garbage and i == len(rows) // 2:
                f.write(b'{"order_no": 1, "status": "OP\n')  # a line cut by a failed write
            doc: dict[str, Any] = {}
            for c in columns:
                if c == DELETE_COLUMN:
                    doc[c] = deleted
                    continue
                v = row.get(c)
                doc[c] = _cents_text(v) if types[c] == "cents" and v is not None else v
            f.write(orjson.dumps(doc) + b"\n")
        if garbage and not rows:
            f.write(b"{not json\n")


def _write_parquet(
    path: Path, table: str, columns: list[str], rows: list[tuple[dict[str, Any], bool]]
) -> None:

    types = dict(COLUMNS[table])
    decl = ", ".join(
        f'"{c}" ' + ("BOOLEAN" if c == DELETE_COLUMN else _PARQUET_TYPES[types[c]]) for c in columns
    )
    con = connect()
    try:
        con.execute(f"CREATE TABLE x ({decl})")
        data = []
        for row, deleted in rows:
            vals = []
            for c in columns:
                if c == DELETE_COLUMN:
                    vals.append(deleted)
                    continue
                v = row.get(c)
                if v is not None and types[c] == "cents":
                    v = Decimal(v).scaleb(-2)
                vals.append(v)
            data.append(vals)
        if data:
            marks = ", ".join("?" for _ in columns)
            con.executemany(f"INSERT INTO x VALUES ({marks})", data)
        target = str(path).replace("'", "''")
        con.execute(f"COPY x TO '{target}' (FORMAT parquet)")
    finally:
        con.close()


def _truncate_mid_row(path: Path) -> None:
    """Cut the file a few bytes into a row in its middle, as an interrupted write leaves it."""
    data = path.read_bytes()
    starts = [i + 1 for i, b in enumerate(data[:-1]) if b == 0x0A]
    if len(starts) < 2:
        path.write_bytes(data[: max(1, len(data) - 3)])
        return
    cut = starts[len(starts) // 2] + 3
    path.write_bytes(data[:cut])


def write_extracts(
    cfg: GeneratorConfig,
    out_dir: str | os.PathLike[str],
    tables: tuple[str, ...] = EXTRACT_TABLES,
) -> ExtractWorld:
    """Write the extract files of `tables` for this world; return what was written."""
    return ExtractGenerator(cfg, out_dir, tables).run()
