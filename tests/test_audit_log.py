"""The audit_log table: one row per view change with lineage, crash rollback, retention."""

from __future__ import annotations

import gc
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import orjson
import pytest
from flowkit import run_in_memory
from protectkit import world
from sferp.connectors.audit_log import AuditSettings
from sferp.connectors.duckdb_schema import AUDIT_COLUMNS
from sferp.connectors.duckdb_views import ViewsWriterPartition

T0 = 1_793_000_000_000


def writer(path: Path, resume=None, **kw) -> ViewsWriterPartition:
    kw.setdefault("audit", AuditSettings())
    return ViewsWriterPartition(str(path), resume, commit_interval_s=0, serve_queries=False, **kw)


def audit(path: Path, where: str = "true") -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(
            "SELECT table_name, row_key, action, CAST(lineage AS VARCHAR), seq FROM audit_log "
            f"WHERE {where} ORDER BY seq, table_name, row_key"
        ).fetchall()
    finally:
        con.close()


def order_row(oid: str, stage: str, t: int = T0) -> tuple:
    return (oid, "0001", "001A", None, "Draft", None, stage, None, None, None, None, None, None, t)


def rec(key: str, version: str, source: str = "salesforce", entity: str = "Order") -> tuple:
    return (source, entity, key, False, '{"Status":"Draft"}', version, T0)


def test_upserts_and_deletes_with_lineage_in_one_commit_each(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path)
    lin = {"salesforce": "sf|Order|tx1|1|801A", "erp": "erp|sales_orders|{}|7"}
    w.write_batch(
        [
            {
                "order_status": {("801A",): order_row("801A", "DRAFT")},
                "_lineage": {("order_status", ("801A",)): lin},
                "records": {("salesforce", "Order", "801A"): rec("801A", "1:2:3")},
                "dead_letters": {("sf.cdc", 0, 5): ("sf.cdc", 0, 5, "not_json", "x")},
            }
        ]
    )
    w.write_batch([{"order_status": {("801A",): order_row("801A", "BOOKED")}}])
    w.write_batch([{"order_status": {("801A",): None}}])
    w.write_batch([{"flow_stats": {("t",): ("t", 1, 1, 0, 0, 0, 0)}}])  # counters: not audited
    w.close()
    rows = audit(path)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("dead_letters", "sf.cdc:0:5", "upsert"),
        ("order_status", "801A", "upsert"),
        ("records", "salesforce:Order:801A", "upsert"),
        ("order_status", "801A", "upsert"),
        ("order_status", "801A", "delete"),
    ]
    assert orjson.loads(rows[1][3]) == lin
    assert orjson.loads(rows[2][3]) == {"salesforce": "sf|Order|801A@1:2:3"}
    assert orjson.loads(rows[0][3]) == {"input": "sf.cdc:0:5"}
    assert rows[4][3] is None  # a delete carries no lineage
    seqs = [r[4] for r in rows]
    assert seqs[0] == seqs[1] == seqs[2] < seqs[3] < seqs[4]  # one seq per commit
    con = duckdb.connect(str(path), read_only=True)
    cols = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'audit_log' ORDER BY ordinal_position"
    ).fetchall()
    at, worker, et = con.execute(
        "SELECT \"at\", worker, event_time FROM audit_log WHERE table_name = 'records'"
    ).fetchone()
    con.close()
    assert cols == list(AUDIT_COLUMNS)
    assert abs(datetime.utcnow() - at) < timedelta(minutes=5)
    assert ":" in worker and et == datetime.utcfromtimestamp(T0 / 1000)


def test_audit_off_creates_no_table(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, audit=None)
    w.write_batch([{"records": {("salesforce", "Order", "801A"): rec("801A", "1:1:1")}}])
    w.close()
    con = duckdb.connect(str(path), read_only=True)
    names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    con.close()
    assert "audit_log" not in names and "records" in names


def test_crash_rollback_removes_the_undone_commits_audit_rows(tmp_path: Path) -> None:
    """A resume undoes the commits after the snapshot and their audit rows; the replay
    then writes them once: the log equals that of a run without the crash."""

    def batches():
        return [
            [{"records": {("salesforce", "Order", "801A"): rec("801A", "1:1:1")}}],
            [{"records": {("salesforce", "Order", "801B"): rec("801B", "1:1:2")}}],
            [{"records": {("salesforce", "Order", "801A"): rec("801A", "2:1:1")}}],
            [{"order_status": {("801C",): order_row("801C", "DRAFT")}}],
        ]

    clean = tmp_path / "clean.duckdb"
    w = writer(clean, undo=True)
    for b in batches():
        w.write_batch(b)
    w.close()

    crashed = tmp_path / "crashed.duckdb"
    b = batches()
    w = writer(crashed, undo=True)
    w.write_batch(b[0])
    snap = w.snapshot()
    w.write_batch(b[1])
    w.write_batch(b[2])
    del w  # killed: no close, nothing more committed
    gc.collect()
    before = audit(crashed)
    assert [r[1] for r in before if r[4] > snap] == [
        "salesforce:Order:801B",
        "salesforce:Order:801A",
    ]
    w = writer(crashed, snap, undo=True)
    seqs = [r[0] for r in w._con.execute("SELECT seq FROM audit_log").fetchall()]
    assert seqs and max(seqs) <= snap  # the orphans are gone before the replay writes
    for batch in b[1:]:
        w.write_batch(batch)
    w.close()

    def shape(rows):
        return Counter((t, k, a, lin) for t, k, a, lin, _ in rows)

    assert shape(audit(crashed)) == shape(audit(clean))
    assert len(audit(crashed)) == 4


def test_fresh_start_keeps_history_and_records_the_truncate(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path)
    w.write_batch([{"records": {("salesforce", "Order", "801A"): rec("801A", "1:1:1")}}])
    w.close()
    w = writer(path)  # no resume state: the views start empty
    w.close()
    rows = audit(path)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("records", "salesforce:Order:801A", "upsert"),
        ("records", None, "truncate"),
    ]
    assert orjson.loads(rows[1][3]) == {"rows": 1}


def _age(path: Path, days: int, where: str) -> None:
    con = duckdb.connect(str(path))
    con.execute(f'UPDATE audit_log SET "at" = "at" - INTERVAL \'{days} days\' WHERE {where}')
    con.close()


@pytest.mark.parametrize("retention, kept", [(90, 1), (0, 2)])
def test_retention_prunes_old_rows_at_open(tmp_path: Path, retention: int, kept: int) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, undo=True)
    w.write_batch([{"records": {("salesforce", "Order", "801A"): rec("801A", "1:1:1")}}])
    w.write_batch([{"records": {("salesforce", "Order", "801B"): rec("801B", "1:1:2")}}])
    snap = w.snapshot()
    w.close()
    _age(path, 91, "row_key LIKE '%801A'")
    w = writer(path, snap, undo=True, audit=AuditSettings(retention_days=retention))
    w.close()
    assert len(audit(path)) == kept


def test_retention_prunes_at_commits(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    w = writer(path, audit=AuditSettings(retention_days=1, prune_every_s=0))
    w.write_batch([{"records": {("salesforce", "Order", "801A"): rec("801A", "1:1:1")}}])
    w._con.execute('UPDATE audit_log SET "at" = "at" - INTERVAL \'2 days\'')
    w.write_batch([{"records": {("salesforce", "Order", "801B"): rec("801B", "1:1:2")}}])
    w.close()
    assert [r[1] for r in audit(path)] == ["salesforce:Order:801B"]


def test_flow_audits_every_view_row_with_its_lineage(tmp_path: Path, monkeypatch) -> None:
    # commit whenever 300 rows are pending: many commits, so rows are updated and deleted
    monkeypatch.setattr("sferp.connectors.duckdb_views._BACKLOG_ROWS", 300)
    path = tmp_path / "views.duckdb"
    views = run_in_memory(list(world()), path, batch=200, env={})
    con = duckdb.connect(str(path), read_only=True)
    try:
        latest = {
            (t, k): (a, None if lin is None else orjson.loads(lin))
            for t, k, a, lin in con.execute(
                "SELECT table_name, row_key, arg_max(action, seq), "
                "CAST(arg_max(lineage, seq) AS VARCHAR) FROM audit_log "
                "WHERE row_key IS NOT NULL GROUP BY ALL"
            ).fetchall()
        }
        commits = con.execute("SELECT count(DISTINCT seq) FROM audit_log").fetchone()[0]
        actions = dict(
            con.execute("SELECT action, count(*) FROM audit_log GROUP BY ALL").fetchall()
        )
        exc = con.execute("SELECT kind || ':' || key FROM reconciliation_exceptions").fetchall()
    finally:
        con.close()
    assert commits > 5 and actions["upsert"] > 100 and actions["delete"] > 0
    for (source, entity, key), row in views.records.items():
        action, lin = latest[("records", f"{source}:{entity}:{key}")]
        assert action == "upsert"
        expect = (
            f"erp|{entity}|{key}|{row.version}"
            if source == "erp"
            else f"sf|{entity}|{key}@{row.version}"
        )
        assert lin == {source: expect}
    for oid in views.order_status:
        action, lin = latest[("order_status", oid)]
        assert action != "delete" and lin["salesforce"].startswith("sf|Order|")
        assert lin["salesforce"].endswith(oid)
    for sku in views.inventory_live:
        action, lin = latest[("inventory_live", sku)]
        assert action != "delete" and lin  # erp and/or salesforce identities
    for (k,) in exc:
        assert latest[("reconciliation_exceptions", k)][0] == "upsert"
    for topic, part, off, _, _ in views.dead_letters:
        assert latest[("dead_letters", f"{topic}:{part}:{off}")] == (
            "upsert",
            {"input": f"{topic}:{part}:{off}"},
        )
    gone = [k for (t, k), (a, _) in latest.items() if t == "order_status" and a == "delete"]
    assert not set(gone) & set(views.order_status)


class _NoJsonLists:
    """orjson for the column binding, except that lists cannot be written (as for a
    column holding an integer beyond 64 bits): every audit column then goes as a list."""

    @staticmethod
    def dumps(value, *args, **kwargs):
        if isinstance(value, list):
            raise TypeError("not JSON")
        return orjson.dumps(value, *args, **kwargs)


@pytest.mark.parametrize("as_json", [True, False])
def test_audit_rows_are_the_same_whether_bound_as_json_or_as_lists(
    tmp_path: Path, monkeypatch, as_json: bool
) -> None:
    """Columns go to DuckDB as JSON texts (parsed without the GIL); a commit with a
    value JSON cannot hold exactly goes as Python lists, with the same rows."""
    from sferp.connectors import duckdb_params

    if not as_json:
        monkeypatch.setattr(duckdb_params, "orjson", _NoJsonLists)
    key = "801A"
    path = tmp_path / "v.duckdb"
    w = writer(path)
    lin = {"salesforce": f"sf|Order|tx1|1|{key}", "erp": None}
    w.write_batch(
        [
            {
                "order_status": {(key,): order_row(key, "DRAFT"), ("802B",): None},
                "_lineage": {("order_status", (key,)): lin},
                "records": {("salesforce", "Order", key): rec(key, "1:2:3")},
                "inventory_live": {("SKU-1",): ("SKU-1", 5, 1, 1, 3, T0)},
                "dead_letters": {("sf.cdc", 2, 7): ("sf.cdc", 2, 7, "not_json", "x")},
            }
        ]
    )
    forms = {form for _, form in w._audit._statements}
    w.close()
    assert forms == {as_json}
    rows = audit(path)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("dead_letters", "sf.cdc:2:7", "upsert"),
        ("inventory_live", "SKU-1", "upsert"),
        ("order_status", "801A", "upsert"),
        ("order_status", "802B", "delete"),
        ("records", "salesforce:Order:801A", "upsert"),
    ]
    got = [None if r[3] is None else orjson.loads(r[3]) for r in rows]
    assert got == [
        {"input": "sf.cdc:2:7"},
        None,  # no lineage attached to it
        lin,
        None,  # a delete carries no lineage
        {"salesforce": "sf|Order|801A@1:2:3"},
    ]
