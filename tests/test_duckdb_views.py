"""The DuckDB views writer: schema, bulk upserts, commits, crash rollback, a real Bytewax flow."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import bytewax.operators as op
import duckdb
import orjson
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import init_db_dir
from bytewax.testing import TestingSource, run_main
from sferp.connectors import duckdb_views
from sferp.connectors.duckdb_schema import PRIMARY_KEYS, TABLES, create_tables
from sferp.connectors.duckdb_views import (
    DuckDBViewsSink,
    ResumeError,
    ViewsWriterPartition,
    bind_columns,
)

T0 = 1_764_309_600_000  # 2025-11-28T06:00:00Z in ms

# CONTRACT §3.1, written out here on purpose (not derived from the module under test).
EXPECTED_SCHEMA = {
    "records": [
        ("source", "VARCHAR"),
        ("entity", "VARCHAR"),
        ("record_key", "VARCHAR"),
        ("deleted", "BOOLEAN"),
        ("fields", "JSON"),
        ("version", "VARCHAR"),
        ("event_time", "TIMESTAMP"),
    ],
    "flow_stats": [
        ("topic", "VARCHAR"),
        ("consumed", "BIGINT"),
        ("applied", "BIGINT"),
        ("duplicates", "BIGINT"),
        ("late", "BIGINT"),
        ("dead_lettered", "BIGINT"),
        ("ignored", "BIGINT"),
    ],
    "dead_letters": [
        ("topic", "VARCHAR"),
        ("partition", "INTEGER"),
        ("offset", "BIGINT"),
        ("reason", "VARCHAR"),
        ("raw", "VARCHAR"),
    ],
    "inventory_live": [
        ("sku", "VARCHAR"),
        ("on_hand", "BIGINT"),
        ("allocated", "BIGINT"),
        ("sf_open_demand", "BIGINT"),
        ("available_to_promise", "BIGINT"),
        ("updated_at", "TIMESTAMP"),
    ],
    "order_status": [
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
    ],
    "reconciliation_exceptions": [
        ("kind", "VARCHAR"),
        ("key", "VARCHAR"),
        ("detail", "VARCHAR"),
        ("first_seen", "TIMESTAMP"),
        ("last_seen", "TIMESTAMP"),
        ("open", "BOOLEAN"),
    ],
}
EXPECTED_PKS = {
    "records": ["source", "entity", "record_key"],
    "flow_stats": ["topic"],
    "dead_letters": ["topic", "partition", "offset"],
    "inventory_live": ["sku"],
    "order_status": ["sf_order_id"],
    "reconciliation_exceptions": ["kind", "key"],
}


def ts(ms: int) -> datetime:
    """What DuckDB returns for a TIMESTAMP written as `ms`."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def inv(sku: str, on_hand: int, allocated: int = 0, demand: int = 0, at: int = T0) -> tuple:
    return (sku, on_hand, allocated, demand, on_hand - allocated - demand, at)


def rec(key: str, fields: dict[str, Any], version: str = "1:1:1", deleted: bool = False) -> tuple:
    return ("salesforce", "Order", key, deleted, orjson.dumps(fields).decode(), version, T0)


def order(oid: str, total: str | None, status: str = "Activated") -> tuple:
    amount = None if total is None else Decimal(total)
    return (
        oid,
        "0001",
        "001A",
        None,
        status,
        None,
        "BOOKED",
        amount,
        None,
        None,
        T0,
        None,
        None,
        T0 + 5,
    )


def writer(path: Path, resume: int | None = None, **kw: Any) -> ViewsWriterPartition:
    kw.setdefault("commit_interval_s", 0)
    kw.setdefault("serve_queries", False)
    return ViewsWriterPartition(str(path), resume, **kw)


def read_tables(path: Path) -> dict[str, set[tuple]]:
    """Every view table's rows, read from the closed file (read-only)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: set(con.execute(f'SELECT * FROM "{t}"').fetchall()) for t in TABLES}
    finally:
        con.close()


def crash() -> None:
    """Collect a partition the caller dropped without close(), as a killed worker ends.

    Nothing pending is committed: only what the writer committed before survives.
    """
    gc.collect()


def test_schema_matches_contract(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    writer(path).close()
    con = duckdb.connect(str(path), read_only=True)
    for table, cols in EXPECTED_SCHEMA.items():
        got = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        assert got == cols, table
        pk = con.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() "
            "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
            [table],
        ).fetchall()
        assert [list(r[0]) for r in pk] == [EXPECTED_PKS[table]], table
    main_tables = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    }
    assert main_tables == set(EXPECTED_SCHEMA)
    con.close()
    assert {t: list(c) for t, c in TABLES.items()} == {
        t: [c for c, _ in cols] for t, cols in EXPECTED_SCHEMA.items()
    }
    assert {t: list(k) for t, k in PRIMARY_KEYS.items()} == EXPECTED_PKS


def test_create_tables_is_idempotent() -> None:
    con = duckdb.connect()
    create_tables(con)
    con.execute("INSERT INTO flow_stats VALUES ('t', 1, 1, 0, 0, 0, 0)")
    create_tables(con)
    assert con.execute("SELECT count(*) FROM flow_stats").fetchone() == (1,)


def test_upsert_delete_and_coalescing(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path)
    w.write_batch(
        [
            {"inventory_live": {("A",): inv("A", 10), ("B",): inv("B", 5)}},
            {"inventory_live": {("A",): inv("A", 11), ("C",): inv("C", 1)}},  # later wins
            {"inventory_live": {("C",): None}},  # deleted in the same batch
            {"records": {("salesforce", "Order", "801"): rec("801", {"Status": "Draft"})}},
            {"order_status": {("801",): order("801", "12.35")}},
            {"_meta": {("lat",): (1,)}, "_future": {("x",): None}},  # reserved names ignored
        ]
    )
    assert w.commits == 1  # one commit for the whole batch
    w.write_batch(
        [
            {"inventory_live": {("B",): None, ("D",): inv("D", 7, 2, 1, T0 + 1)}},
            {"inventory_live": {("B",): inv("B", 6)}},  # delete then re-insert: row exists
            {"inventory_live": {("nope",): None}},  # deleting a missing row is fine
        ]
    )
    w.close()
    got = read_tables(path)
    assert got["inventory_live"] == {
        ("A", 11, 0, 0, 11, ts(T0)),
        ("B", 6, 0, 0, 6, ts(T0)),
        ("D", 7, 2, 1, 4, ts(T0 + 1)),
    }
    ((src, ent, key, deleted, fields, version, et),) = got["records"]
    assert (src, ent, key, deleted, version, et) == (
        "salesforce",
        "Order",
        "801",
        False,
        "1:1:1",
        ts(T0),
    )
    assert orjson.loads(fields) == {"Status": "Draft"}
    (o,) = got["order_status"]
    # DECIMAL(18,2) exact (no float on the way). Rounding half-even is the flow's job:
    # DuckDB's cast of a 3-place value would round half away from zero.
    assert o[7] == Decimal("12.35") and isinstance(o[7], Decimal)
    assert o[10] == ts(T0) and o[13] == ts(T0 + 5)


def test_unknown_table_fails_loudly(tmp_path: Path) -> None:
    w = writer(tmp_path / "v.duckdb")
    with pytest.raises(ValueError, match="unknown view table"):
        w.write_batch([{"inventory": {("A",): None}}])
    w.close()


def test_on_commit_receives_meta(tmp_path: Path) -> None:
    seen: list[list[Any]] = []
    w = writer(tmp_path / "v.duckdb", on_commit=seen.append)
    w.write_batch([{"_meta": {("t",): (1,)}, "flow_stats": {("a",): ("a", 1, 1, 0, 0, 0, 0)}}])
    w.write_batch([{"_meta": {("t",): (2,)}}, {"_meta": {("t",): (3,)}}])
    w.close()
    assert seen[0] == [{("t",): (1,)}]
    assert seen[1] == [{("t",): (2,)}, {("t",): (3,)}]


def test_commits_on_interval_snapshot_and_close(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, commit_interval_s=3600)
    w.write_batch([{"flow_stats": {("a",): ("a", 1, 1, 0, 0, 0, 0)}}])
    assert w.commits == 0  # within the interval: pending only
    seq = w.snapshot()
    assert w.commits == 1 and seq > 0
    assert w.snapshot() == seq  # nothing new: same position, no commit
    w.write_batch([{"flow_stats": {("b",): ("b", 2, 2, 0, 0, 0, 0)}}])
    w.close()  # close commits what is pending
    assert {r[0] for r in read_tables(path)["flow_stats"]} == {"a", "b"}


def test_duckdb_memory_is_bounded_by_the_setting(tmp_path: Path) -> None:
    """DuckDB's own default (80 % of the machine) is replaced by `views.memory_limit_mb`."""
    limit = "SELECT current_setting('memory_limit')"
    w = ViewsWriterPartition(str(tmp_path / "a.duckdb"), None, serve_queries=False)
    try:
        assert w._con.execute(limit).fetchone()[0] == "244.1 MiB"  # 256 MB
    finally:
        w.close()
    sink = DuckDBViewsSink(str(tmp_path / "b.duckdb"), memory_limit_mb=1024, serve_queries=False)
    w = sink.build_part("views", "views", None)
    try:
        assert w._con.execute(limit).fetchone()[0] == "976.5 MiB"  # 1024 MB
    finally:
        w.close()


def test_snapshot_without_undo_log_does_not_wait_for_the_commit(tmp_path: Path) -> None:
    # No recovery store: nothing resumes from the position, so the dataflow does not
    # stall on the commit; the flusher makes it within the interval.
    path = tmp_path / "v.duckdb"
    w = writer(path, commit_interval_s=0.2, undo=False)
    w.write_batch([{"flow_stats": {("a",): ("a", 1, 1, 0, 0, 0, 0)}}])
    opened_at = w._seq
    with w._lock:  # a commit in progress on the flusher
        t0 = time.monotonic()
        assert w.snapshot() == opened_at
        assert time.monotonic() - t0 < 0.1
    deadline = time.monotonic() + 5
    while w.commits == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.commits == 1
    w.close()
    assert {r[0] for r in read_tables(path)["flow_stats"]} == {"a"}
    # With the undo log, the snapshot is the commit (exactly-once resume needs it).
    w = writer(tmp_path / "u.duckdb", commit_interval_s=3600)
    opened_at = w._seq
    w.write_batch([{"flow_stats": {("a",): ("a", 1, 1, 0, 0, 0, 0)}}])
    assert w.snapshot() == opened_at + 1 and w.commits == 1
    w.close()


def test_background_flush_commits_when_items_stop(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, commit_interval_s=0.2, serve_queries=True)
    w.write_batch([{"flow_stats": {("a",): ("a", 1, 1, 0, 0, 0, 0)}}])
    assert w.commits == 0  # the interval has not elapsed since the file was opened
    deadline = time.monotonic() + 5
    while w.commits == 0 and time.monotonic() < deadline:  # no further write_batch call
        time.sleep(0.02)
    assert w.commits == 1
    from sferp.query import fetch  # the committed row is visible to readers

    assert fetch("SELECT topic FROM flow_stats", str(path), max_rows=10, timeout_s=5).rows == [
        ["a"]
    ]
    w.close()


# -- crash consistency --------------------------------------------------------------------


class Model:
    """The expected table contents, kept in Python next to the writer."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[tuple, tuple]] = {t: {} for t in TABLES}

    def apply(self, delta: dict[str, dict[tuple, tuple | None]]) -> None:
        for table, changes in delta.items():
            for k, row in changes.items():
                if row is None:
                    self.tables[table].pop(k, None)
                else:
                    self.tables[table][k] = row

    def expected(self) -> dict[str, set[tuple]]:
        """Rows as DuckDB returns them (TIMESTAMP columns as datetimes)."""
        out: dict[str, set[tuple]] = {}
        for t, rows in self.tables.items():
            types = [ty for _, ty in EXPECTED_SCHEMA[t]]
            out[t] = {
                tuple(
                    ts(v) if ty == "TIMESTAMP" and v is not None else v
                    for v, ty in zip(row, types, strict=True)
                )
                for row in rows.values()
            }
        return out


def random_delta(rng: random.Random, step: int) -> dict[str, dict[tuple, tuple | None]]:
    """Upserts and deletes over a small key space, so keys are created, changed and removed."""
    delta: dict[str, dict[tuple, tuple | None]] = {
        "inventory_live": {},
        "flow_stats": {},
        "reconciliation_exceptions": {},
    }
    for _ in range(rng.randint(1, 8)):
        sku = f"SKU-{rng.randint(0, 15)}"
        if rng.random() < 0.3:
            delta["inventory_live"][(sku,)] = None
        else:
            delta["inventory_live"][(sku,)] = inv(sku, rng.randint(0, 100), at=T0 + step)
    topic = rng.choice(["sf.cdc", "erp.public.items"])
    delta["flow_stats"][(topic,)] = (topic, step, step, 0, 0, 0, 0)
    key = ("UNKNOWN_SKU", f"SKU-{rng.randint(0, 5)}")
    delta["reconciliation_exceptions"][key] = (
        None if rng.random() < 0.4 else (*key, f"d{step}", T0, T0 + step, rng.random() < 0.5)
    )
    return delta


def test_crash_rolls_back_to_snapshot(tmp_path: Path) -> None:
    """Write, snapshot (N), write more (new, updated, deleted rows), crash, resume with N."""
    path = tmp_path / "v.duckdb"
    model = Model()
    w = writer(path)
    first = {
        "inventory_live": {("A",): inv("A", 1), ("B",): inv("B", 2), ("C",): inv("C", 3)},
        "records": {("salesforce", "Order", "1"): rec("1", {"Status": "Draft"})},
        "dead_letters": {("sf.cdc", 0, 7): ("sf.cdc", 0, 7, "not_json", "{")},
    }
    w.write_batch([first])
    model.apply(first)
    n = w.snapshot()
    at_n = model.expected()
    later = [
        {"inventory_live": {("A",): inv("A", 100), ("B",): None, ("X",): inv("X", 9)}},
        {"inventory_live": {("X",): inv("X", 10), ("C",): None, ("Y",): inv("Y", 1)}},
        {
            "records": {
                ("salesforce", "Order", "1"): rec("1", {"Status": "Activated"}, "2:1:1"),
                ("salesforce", "Order", "2"): rec("2", {}),
            }
        },
        {"dead_letters": {("sf.cdc", 0, 7): None, ("sf.cdc", 0, 8): ("sf.cdc", 0, 8, "x", "")}},
        {
            "reconciliation_exceptions": {
                ("ORPHAN_ERP_ORDER", "9"): ("ORPHAN_ERP_ORDER", "9", "", T0, T0, True)
            }
        },
    ]
    for delta in later:  # one commit each (commit_interval_s=0)
        w.write_batch([delta])
    assert w.commits == 1 + len(later)
    w.write_batch([{"inventory_live": {("Z",): inv("Z", 1)}}])  # committed, never snapshotted
    del w
    crash()
    w2 = writer(path, n)
    w2.close()
    got = read_tables(path)
    assert got["inventory_live"] == at_n["inventory_live"]
    assert got["dead_letters"] == {("sf.cdc", 0, 7, "not_json", "{")}
    assert got["reconciliation_exceptions"] == set()
    (row,) = got["records"]
    assert orjson.loads(row[4]) == {"Status": "Draft"} and row[5] == "1:1:1"


@pytest.mark.parametrize("chunk_rows", [None, 700])
def test_crash_rollback_of_large_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_rows: int | None
) -> None:
    """Batches above the small-batch threshold take the other before-image statement.

    With `chunk_rows`, each table's rows go in several statements of one transaction:
    the rows and the rollback are the same.
    """
    if chunk_rows is not None:
        monkeypatch.setattr(duckdb_views, "_CHUNK_ROWS", chunk_rows)
    path = tmp_path / "v.duckdb"
    w = writer(path)
    base = {("salesforce", "Order", f"{i:05d}"): rec(f"{i:05d}", {"n": i}) for i in range(3000)}
    w.write_batch([{"records": base}])
    n = w.snapshot()
    changed: dict[tuple, tuple | None] = {
        ("salesforce", "Order", f"{i:05d}"): rec(f"{i:05d}", {"n": -i}, "2:2:2")
        for i in range(1500, 4500)  # half updates, half new rows
    }
    changed.update({("salesforce", "Order", f"{i:05d}"): None for i in range(0, 1000)})
    w.write_batch([{"records": changed}])
    w.write_batch([{"records": changed}])  # a second commit over the same keys
    expected = {**base, **changed}
    assert {(r[2], r[4], r[5]) for r in _live_tables(w)["records"]} == {
        (k[2], row[4], row[5]) for k, row in expected.items() if row is not None
    }
    del w
    crash()
    w = writer(path, n)
    got = _live_tables(w)["records"]
    w.close()
    assert {(r[2], r[4], r[5]) for r in got} == {(k[2], row[4], row[5]) for k, row in base.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_crashes_resume_exactly(tmp_path: Path, seed: int) -> None:
    """Random deltas, snapshots and crashes; each resume from a kept snapshot is exact."""
    rng = random.Random(seed)
    path = tmp_path / "v.duckdb"
    model = Model()
    states: dict[int, dict[str, dict[tuple, tuple]]] = {}
    w = writer(path)
    states[w.snapshot()] = {t: dict(r) for t, r in model.tables.items()}
    step = 0
    for _crash_round in range(4):
        for _ in range(rng.randint(2, 5)):
            for _ in range(rng.randint(1, 4)):
                step += 1
                batch = [random_delta(rng, step) for _ in range(rng.randint(1, 3))]
                w.write_batch(batch)
                for d in batch:
                    model.apply(d)
            states[w.snapshot()] = {t: dict(r) for t, r in model.tables.items()}
        for _ in range(rng.randint(0, 3)):  # committed after the last snapshot
            step += 1
            d = random_delta(rng, step)
            w.write_batch([d])
        del w
        crash()
        kept = sorted(states)[-3:]  # the newest snapshots are always resumable
        resume = rng.choice(kept)
        w = writer(path, resume)
        model.tables = {t: dict(r) for t, r in states[resume].items()}
        assert _live_tables(w) == model.expected(), f"resume from {resume}"
        # The timeline after `resume` is gone; its position is a new snapshot.
        states = {s: v for s, v in states.items() if s <= resume}
        states[w.snapshot()] = {t: dict(r) for t, r in model.tables.items()}
    w.close()


def _live_tables(w: ViewsWriterPartition) -> dict[str, set[tuple]]:
    con = w._con
    return {t: set(con.execute(f'SELECT * FROM "{t}"').fetchall()) for t in TABLES}


def test_resume_none_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path)
    w.write_batch([{"inventory_live": {("A",): inv("A", 1)}}])
    old = w.snapshot()
    w.close()
    w = writer(path, None)
    assert _live_tables(w)["inventory_live"] == set()
    assert w.snapshot() > old  # positions never repeat across runs
    w.close()
    with pytest.raises(ResumeError):
        writer(path, old)  # the fresh start forgot the old run's snapshots


def test_resume_refuses_unknown_positions(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, keep_snapshots=2)
    seqs = []
    for i in range(5):
        w.write_batch([{"inventory_live": {("A",): inv("A", i)}}])
        seqs.append(w.snapshot())
    w.close()
    with pytest.raises(ResumeError, match="reaches back"):
        writer(path, seqs[0])  # pruned
    with pytest.raises(ResumeError, match="replaced or deleted"):
        writer(path, seqs[-1] + 100)  # a recovery state newer than the file
    w = writer(path, seqs[-2])  # still kept
    assert _live_tables(w)["inventory_live"] == {inv_row("A", 3)}
    w.close()
    os.remove(path)
    with pytest.raises(ResumeError, match="replaced or deleted"):
        writer(path, seqs[-1])  # the views file was deleted but the recovery dir kept


def inv_row(sku: str, n: int) -> tuple:
    return (sku, n, 0, 0, n, ts(T0))


def test_without_undo_log_resume_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, undo=False)
    w.write_batch([{"inventory_live": {("A",): inv("A", 1)}}])
    n = w.snapshot()
    w.write_batch([{"inventory_live": {("B",): inv("B", 1)}}])
    w.close()
    assert read_tables(path)["inventory_live"] == {inv_row("A", 1), inv_row("B", 1)}
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT count(*) FROM sferp_sink.undo_inventory_live").fetchone() == (0,)
    con.close()
    with pytest.raises(ResumeError, match="no undo log"):
        writer(path, n)


def test_undo_log_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, keep_snapshots=3)
    undo_sizes = []
    for cycle in range(30):
        for c in range(3):  # three commits per snapshot interval, same hot keys + new keys
            hot = {(f"H{i}",): inv(f"H{i}", cycle * 10 + c) for i in range(20)}
            new = {(f"N{cycle}-{c}-{i}",): inv(f"N{cycle}-{c}-{i}", 1) for i in range(5)}
            w.write_batch([{"inventory_live": hot | new}])
        w.snapshot()
        undo_sizes.append(
            w._con.execute("SELECT count(*) FROM sferp_sink.undo_inventory_live").fetchone()[0]
        )
    # Per interval: 20 hot keys saved once (not once per commit) + 15 new keys; the
    # entries of at most `keep_snapshots` intervals are kept.
    assert max(undo_sizes) <= 3 * (20 + 15)
    assert undo_sizes[-1] == undo_sizes[10]
    snaps = w._con.execute("SELECT count(*) FROM sferp_sink.snapshots").fetchone()[0]
    assert snaps == 3
    w.close()


def test_real_process_kill_recovers(tmp_path: Path) -> None:
    """A writer process killed with SIGKILL after uncommitted-to-snapshot commits."""
    path = tmp_path / "v.duckdb"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from sferp.connectors.duckdb_views import ViewsWriterPartition
        w = ViewsWriterPartition({str(path)!r}, None, commit_interval_s=0, serve_queries=False)
        row = lambda s, n: (s, n, 0, 0, n, {T0})
        w.write_batch([{{"inventory_live": {{("A",): row("A", 1), ("B",): row("B", 2)}}}}])
        print(w.snapshot(), flush=True)
        w.write_batch([{{"inventory_live": {{("A",): None, ("T",): row("T", 5)}}}}])
        w.write_batch([{{"inventory_live": {{("B",): row("B", 3)}}}}])
        w.write_batch([{{"inventory_live": {{("A",): None, ("T",): row("T", 5)}}}}])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    n = int(proc.stdout.strip())
    w = writer(path, n)
    assert _live_tables(w)["inventory_live"] == {inv_row("A", 1), inv_row("B", 2)}
    w.close()


# -- a real Bytewax flow ------------------------------------------------------------------


FLOW_SCRIPT = """
import os, signal, sys
from datetime import timedelta
import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSource, run_main
from sferp.connectors import duckdb_views as dv

execution, path, rec_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
built = dv.ViewsWriterPartition.__init__

def init(self, p, resume_state, **kw):
    print("resume", resume_state, flush=True)
    built(self, p, resume_state, **kw)

dv.ViewsWriterPartition.__init__ = init

def to_delta(i):
    if i == 3 and execution == 1:  # the first execution writes a transient row, then dies
        return ("v", {"inventory_live": {("TRANSIENT",): ("TRANSIENT", 1, 0, 0, 1, 0)},
                      "_meta": {("kill",): (1,)}})
    return ("v", {"inventory_live": {(f"S{i}",): (f"S{i}", i, 0, 0, i, 0)},
                  "flow_stats": {("t",): ("t", i, i, 0, 0, 0, 0)}})

def on_commit(meta):  # dies right after the transient row's commit, before any snapshot
    if any(("kill",) in m for m in meta):
        os.kill(os.getpid(), signal.SIGKILL)

flow = Dataflow("views_crash")
items = op.input("inp", flow, TestingSource([1, 2, 3, 4, 5], batch_size=1))
sink = dv.DuckDBViewsSink(path, commit_interval_s=0, on_commit=on_commit)
op.output("views", op.map("delta", items, to_delta), sink)
run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(rec_dir))
"""


def test_bytewax_flow_killed_and_resumed(tmp_path: Path) -> None:
    """A real flow with recovery, killed after an unsnapshotted commit, then resumed.

    The first execution writes a transient row and is killed right after that commit;
    the resumed execution replays the item differently (as a replay after a crash
    may), so the transient row must not survive.
    """
    path, rec_dir, script = tmp_path / "v.duckdb", tmp_path / "recovery", tmp_path / "flow.py"
    rec_dir.mkdir()
    init_db_dir(rec_dir, 1)
    script.write_text(FLOW_SCRIPT)
    cmd = [sys.executable, str(script), "1", str(path), str(rec_dir)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert ("TRANSIENT", 1, 0, 0, 1, ts(0)) in read_tables(path)["inventory_live"]
    assert os.path.exists(str(path) + ".endpoint")  # left behind by the killed writer
    cmd[2] = "2"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    resumed_from = second.stdout.split()[-1]
    assert resumed_from != "None"  # resumed from a snapshot, not rebuilt from scratch
    got = read_tables(path)
    assert got["inventory_live"] == {(f"S{i}", i, 0, 0, i, ts(0)) for i in range(1, 6)}
    assert got["flow_stats"] == {("t", 5, 5, 0, 0, 0, 0)}
    assert not os.path.exists(str(path) + ".endpoint")  # removed on a clean close


def test_bytewax_flow_without_recovery(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    deltas = [("k", {"flow_stats": {("t",): ("t", i, i, 0, 0, 0, 0)}}) for i in range(1, 51)]
    flow = Dataflow("views_plain")
    op.output(
        "views",
        op.input("inp", flow, TestingSource(deltas, batch_size=7)),
        DuckDBViewsSink(str(path)),
    )
    run_main(flow)
    assert read_tables(path)["flow_stats"] == {("t", 50, 50, 0, 0, 0, 0)}
    assert not os.path.exists(str(path) + ".endpoint")  # removed on close


# -- parameter forms ----------------------------------------------------------------------

AWKWARD_TEXT = ['quote " backslash \\ tab \t nl \n', "é ü 漢 🙂 \u2028 \x7f", "", "null", "1.0"]


def _every_type_delta(n: int) -> dict:
    orders, recs, excs = {}, {}, {}
    for i in range(n):
        text = AWKWARD_TEXT[i % len(AWKWARD_TEXT)] + str(i)
        oid = f"801{i:015d}"
        total = None if i % 7 == 0 else Decimal(f"{i * 37 % 100000}.{i % 100:02d}")
        orders[(oid,)] = (
            oid, text, None if i % 3 else "001A", str(i), "Activated", None, "BOOKED",
            total, Decimal("-0.01") if i % 2 else None, i % 2 == 0,
            T0 + i, None if i % 5 else T0 - 1, (i * 0.1) if i % 4 else None, T0 + 5,
        )  # fmt: skip
        fields = {"Name": text, "Amount": i / 3, "Big": 2**62 + i, "Nested": [None, True]}
        recs[("salesforce", "Order", oid)] = rec(oid, fields, version=f"{i}:1:1")
        excs[("amount_mismatch", text)] = ("amount_mismatch", text, text, T0, T0 + i, i % 2 == 0)
    return {"order_status": orders, "records": recs, "reconciliation_exceptions": excs}


def test_json_and_list_parameters_write_identical_rows(tmp_path: Path, monkeypatch) -> None:
    """Batches go as JSON texts; the list form (the fallback) must write the same rows."""
    delta = _every_type_delta(300)
    as_json, _ = bind_columns(delta["order_status"].values())
    assert as_json
    w = writer(tmp_path / "json.duckdb")
    w.write_batch([delta])
    w.close()
    monkeypatch.setattr(
        "sferp.connectors.duckdb_views.bind_columns",
        lambda rows: (False, [list(c) for c in zip(*rows, strict=True)]),
    )
    w = writer(tmp_path / "lists.duckdb")
    w.write_batch([delta])
    w.close()
    by_json, by_lists = (
        read_tables(tmp_path / "json.duckdb"),
        read_tables(tmp_path / "lists.duckdb"),
    )
    assert by_json == by_lists
    assert len(by_json["order_status"]) == 300 and len(by_json["records"]) == 300
    row = next(r for r in by_json["order_status"] if r[0] == "801000000000000001")
    assert row[7] == Decimal("37.01") and row[8] == Decimal("-0.01") and row[12] == 0.1
    assert row[10] == ts(T0 + 1) and row[11] is None and row[1] == AWKWARD_TEXT[1] + "1"


def test_values_beyond_json_go_as_lists() -> None:
    assert bind_columns([("a", 1), ("b", 2)]) == (True, ['["a","b"]', "[1,2]"])
    assert bind_columns([(Decimal("1.50"), None)]) == (True, ['["1.50"]', "[null]"])
    # orjson refuses integers beyond 64 bits and lone surrogates: the batch goes as lists.
    assert bind_columns([("a", 2**64), ("b", 1)]) == (False, [["a", "b"], [2**64, 1]])
    assert bind_columns([("\ud800",)])[0] is False


def _large_commit(n: int) -> dict[tuple, tuple | None]:
    return {
        ("salesforce", "Order", f"{i:07d}"): rec(f"{i:07d}", {"n": i, "pad": "x" * 400})
        for i in range(n)
    }


def test_large_commits_fit_a_small_memory_limit_in_chunks(tmp_path: Path) -> None:
    """100,000 rows commit within DuckDB's smallest allowed limit (64 MB) in chunks."""
    w = writer(tmp_path / "v.duckdb", memory_limit_mb=64)
    rows = _large_commit(100_000)
    w.write_batch([{"records": rows}])
    (count,) = w._con.execute("SELECT count(*) FROM records").fetchone()
    w.close()
    assert count == len(rows)


def test_a_failed_commit_is_logged_in_one_line_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Raised in a sink, the error ends the worker in a panic that hides it: the log says it."""
    monkeypatch.setattr(duckdb_views, "_CHUNK_ROWS", 10**9)  # one statement: out of memory
    w = writer(tmp_path / "v.duckdb", memory_limit_mb=64)
    with caplog.at_level("ERROR", logger="sferp.views"), pytest.raises(duckdb.OutOfMemoryException):
        w.write_batch([{"records": _large_commit(100_000)}])
    (line,) = [r.getMessage() for r in caplog.records if r.name == "sferp.views"]
    assert "committing the views to" in line and "Out of Memory" in line
    assert "views.memory_limit_mb = 64" in line and "\n" not in line
    # The transaction was rolled back: the writer still commits what fits.
    w.write_batch([{"records": _large_commit(10)}])
    (count,) = w._con.execute("SELECT count(*) FROM records").fetchone()
    w.close()
    assert count == 10


def _wal_mb(path: Path) -> float:
    wal = Path(str(path) + ".wal")
    return wal.stat().st_size / 2**20 if wal.exists() else 0.0


@pytest.mark.parametrize("memory_limit_mb", [256, 64])
def test_checkpoints_wait_for_a_quarter_of_the_memory_limit(
    tmp_path: Path, memory_limit_mb: int
) -> None:
    """The write-ahead log grows to a quarter of `views.memory_limit_mb` (at least
    DuckDB's 16 MB) before a commit checkpoints: checkpoints rewrite the tables."""
    path = tmp_path / "v.duckdb"
    w = writer(path, memory_limit_mb=memory_limit_mb, undo=False)
    threshold = duckdb_views.checkpoint_threshold_mb(memory_limit_mb)
    sizes = []
    for i in range(10):  # ~4.5 MB of log per commit
        rows = {
            ("salesforce", "Order", f"{i}-{j:05d}"): rec(f"{i}-{j:05d}", {"pad": "x" * 400})
            for j in range(10_000)
        }
        w.write_batch([{"records": rows}])
        sizes.append(_wal_mb(path))
    (count,) = w._con.execute("SELECT count(*) FROM records").fetchone()
    w.close()
    assert count == 100_000
    assert threshold == (64 if memory_limit_mb == 256 else 16)
    assert max(sizes) < threshold + 8, sizes  # checkpointed once past the threshold
    if threshold > 16:
        assert max(sizes) > 24, sizes  # not at DuckDB's own 16 MB
    else:
        restarted = any(b < a for a, b in zip(sizes, sizes[1:], strict=False))
        assert restarted, sizes  # checkpointed: the log started again


def test_rows_that_came_during_a_long_commit_commit_right_after_it(
    tmp_path: Path, monkeypatch
) -> None:
    """The commit interval runs from the start of the previous commit: when a commit
    outlasts it, the rows that came meanwhile do not wait another interval."""
    w = writer(tmp_path / "v.duckdb", commit_interval_s=1.0, undo=False)
    slow = threading.Event()
    apply = w._apply

    def slow_apply(table: str, changes: dict) -> None:
        if not slow.is_set():
            slow.set()
            time.sleep(1.5)
        apply(table, changes)

    monkeypatch.setattr(w, "_apply", slow_apply)
    w._last_commit = time.monotonic() - 2  # the first commit is due at once
    w.write_batch([{"flow_stats": {("a",): ("a", 1, 1, 0, 0, 0, 0)}}])
    assert slow.wait(5)
    started = time.monotonic()
    w.write_batch([{"flow_stats": {("b",): ("b", 2, 2, 0, 0, 0, 0)}}])  # during the commit
    while w.commits < 2 and time.monotonic() - started < 10:
        time.sleep(0.01)
    took = time.monotonic() - started
    w.close()
    assert w.commits == 2
    # The first commit ends ~1.5 s after it started; from its end, another interval
    # (1 s) would have passed before the second one.
    assert took < 2.2, took


def test_a_writer_that_falls_behind_commits_inline_past_the_backlog(
    tmp_path: Path, monkeypatch
) -> None:
    """The flusher (lower priority) may lag: past `_BACKLOG_ROWS` pending rows the worker
    commits itself, so pending rows (memory) stay bounded; below it, nothing waits."""
    monkeypatch.setattr(duckdb_views, "_BACKLOG_ROWS", 100)
    path = tmp_path / "v.duckdb"
    w = writer(path, commit_interval_s=3600)  # the flusher would not commit for an hour
    rows = {(f"k{i}",): (f"k{i}", 1, 1, 0, 0, 0, 0) for i in range(100)}
    w.write_batch([{"flow_stats": rows}])
    assert w.commits == 0 and len(w._pending["flow_stats"]) == 100
    w.write_batch([{"flow_stats": {("x",): ("x", 1, 1, 0, 0, 0, 0)}}])
    assert w.commits == 1 and not w._pending
    w.close()
    assert len(read_tables(path)["flow_stats"]) == 101
