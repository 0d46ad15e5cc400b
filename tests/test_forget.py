"""`sferp forget`: erasure of one subject from a stopped flow's views file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import pytest
from flowkit import run_in_memory
from kafka import KafkaConsumer, TopicPartition
from protectkit import world
from sferp.connectors.audit_log import AuditSettings
from sferp.connectors.duckdb_views import ViewsWriterPartition
from sferp.connectors.kafka_outputs import KafkaMirror, mirror_path


def sferp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sferp", *args], capture_output=True, text=True, timeout=timeout
    )


def mentions(path: Path, token: str) -> dict[str, int]:
    """Rows per table.column (all schemas) whose text mentions `token` as a whole token."""
    pattern = f"(^|[^0-9A-Za-z_-]){re.escape(token)}([^0-9A-Za-z_-]|$)"
    con = duckdb.connect(str(path), read_only=True)
    out: dict[str, int] = {}
    try:
        for schema, table, col in con.execute(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns"
        ).fetchall():
            (n,) = con.execute(
                f'SELECT count(*) FROM "{schema}"."{table}" '
                f'WHERE regexp_matches(CAST("{col}" AS VARCHAR), ?)',
                [pattern],
            ).fetchone()
            if n:
                out[f"{schema}.{table}.{col}"] = n
    finally:
        con.close()
    return out


@pytest.fixture(scope="module")
def flow_views(tmp_path_factory) -> Path:
    """The views of the generated world, with its audit log (written once per module)."""
    path = tmp_path_factory.mktemp("forget") / "views.duckdb"
    run_in_memory(list(world()), path, batch=200, env={})
    return path


def test_forget_salesforce_order_everywhere_and_reports_counts(flow_views, tmp_path) -> None:
    path = tmp_path / "views.duckdb"
    shutil.copy(flow_views, path)
    con = duckdb.connect(str(path), read_only=True)
    # an Order with a view row, an exception and a dead letter that mentions it
    oid, n_exc, n_dl = con.execute(
        'SELECT o.sf_order_id, count(DISTINCT e.kind), count(DISTINCT d."offset") '
        "FROM order_status o JOIN reconciliation_exceptions e ON e.key = o.sf_order_id "
        "JOIN dead_letters d ON contains(d.raw, o.sf_order_id) "
        "GROUP BY ALL ORDER BY 1 LIMIT 1"
    ).fetchone()
    n_audit = con.execute(
        "SELECT count(*) FROM audit_log WHERE contains(row_key, ?) "
        "OR contains(CAST(lineage AS VARCHAR), ?) OR row_key IN (SELECT topic || ':' || "
        "partition || ':' || \"offset\" FROM dead_letters WHERE contains(raw, ?))",
        [oid, oid, oid],
    ).fetchone()[0]
    con.close()
    before = mentions(path, oid)
    assert before["main.order_status.sf_order_id"] == 1 and n_audit > 0
    r = sferp("forget", "--salesforce-id", oid[:15], "--views", str(path), "--json")
    assert r.returncode == 0, r.stderr
    report = orjson.loads(r.stdout)
    assert report["removed"] == {
        "records": 1,
        "order_status": 1,
        "inventory_live": 0,
        "reconciliation_exceptions": n_exc,
        "dead_letters": n_dl,
        "audit_log": n_audit,
    }
    assert report["compacted"] is True
    assert ["reconciled.orders", oid] in report["kafka_keys"]
    exc_keys = [k for t, k in report["kafka_keys"] if t == "reconciled.exceptions"]
    assert len(exc_keys) == n_exc and all(k.endswith(f":{oid}") for k in exc_keys)
    after = mentions(path, oid)
    # what is left: other records that reference the Order (OrderItems, ERP sales orders)
    assert set(after) <= {"main.records.fields"}, after
    assert after.get("main.records.fields", 0) == report["references_left"].get("records", 0)
    con = duckdb.connect(str(path), read_only=True)
    erase = con.execute("SELECT CAST(lineage AS VARCHAR) FROM audit_log WHERE action = 'erase'")
    (lin,) = erase.fetchone()
    con.close()
    assert oid not in lin and orjson.loads(lin)["removed"]["order_status"] == 1
    # idempotent: a second run finds nothing more
    again = orjson.loads(
        sferp("forget", "--salesforce-id", oid, "--views", str(path), "--json").stdout
    )
    assert sum(again["removed"].values()) == 0


def test_forget_erp_key_removes_record_and_exceptions(flow_views, tmp_path) -> None:
    path = tmp_path / "views.duckdb"
    shutil.copy(flow_views, path)
    con = duckdb.connect(str(path), read_only=True)
    (order_no,) = con.execute(
        "SELECT e.key FROM reconciliation_exceptions e JOIN records r "
        "ON r.entity = 'sales_orders' AND r.record_key = '{\"order_no\":' || e.key || '}' "
        "WHERE e.kind = 'ORPHAN_ERP_ORDER' ORDER BY 1 LIMIT 1"
    ).fetchone()
    con.close()
    r = sferp("forget", "--erp-key", order_no, "--views", str(path), "--json")
    assert r.returncode == 0, r.stderr
    report = orjson.loads(r.stdout)
    assert report["removed"]["records"] == 1
    assert report["removed"]["reconciliation_exceptions"] == 1
    assert ["reconciled.exceptions", f"ORPHAN_ERP_ORDER:{order_no}"] in report["kafka_keys"]
    con = duckdb.connect(str(path), read_only=True)
    left = con.execute(
        "SELECT count(*) FROM records WHERE entity = 'sales_orders' AND record_key = ?",
        [f'{{"order_no":{order_no}}}'],
    ).fetchone()[0]
    audit_left = con.execute(
        "SELECT count(*) FROM audit_log WHERE contains(row_key, ?)", [f":{order_no}"]
    ).fetchone()[0]
    con.close()
    assert left == 0 and audit_left == 0


def test_forget_refuses_while_a_flow_holds_the_file(tmp_path) -> None:
    path = tmp_path / "views.duckdb"
    ViewsWriterPartition(str(path), None, commit_interval_s=0, serve_queries=False).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('ok', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        t = time.monotonic()
        r = sferp("forget", "--salesforce-id", "001000000000001AAA", "--views", str(path))
        assert r.returncode == 1 and time.monotonic() - t < 30
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "running flow" in lines[0] and "stop the flow" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    r = sferp("forget", "--salesforce-id", "not-an-id", "--views", str(path))
    assert r.returncode == 2 and "--salesforce-id" in r.stderr


def _order(oid: str, number: str) -> tuple:
    return (oid, number, None, None, "Draft", None, "DRAFT", None, None, None, None, None, None, 1)


def _record(oid: str, marker: str) -> tuple:
    fields = orjson.dumps({"Description": marker, "Status": "Draft"}).decode()
    return ("salesforce", "Order", oid, False, fields, "1:1:1", 1_700_000_000_000)


def test_forget_clears_undo_log_and_file_bytes_so_nothing_comes_back(tmp_path) -> None:
    path = tmp_path / "views.duckdb"
    oid, marker = "801QZX00000ABCDAAA", "ZQXJ-UNIQUE-MARKER-7f3a9c0e5b"
    kw = {"commit_interval_s": 0, "serve_queries": False, "undo": True, "audit": AuditSettings()}
    w = ViewsWriterPartition(str(path), None, **kw)
    filler = {
        ("salesforce", "Order", f"801{i:015d}"): _record(f"801{i:015d}", f"filler {i}")
        for i in range(2, 3000)
    }
    w.write_batch([{"records": filler}])
    w.write_batch(
        [
            {
                "records": {("salesforce", "Order", oid): _record(oid, marker)},
                "order_status": {(oid,): _order(oid, marker)},
            }
        ]
    )
    snap = w.snapshot()
    # changed after the snapshot: the undo log keeps the before-images with the marker
    w.write_batch(
        [
            {
                "records": {("salesforce", "Order", oid): _record(oid, "changed")},
                "order_status": {(oid,): _order(oid, "changed")},
            }
        ]
    )
    w.close()
    assert marker.encode() in path.read_bytes()  # the test can see it when it is there
    kept = tmp_path / "kept.duckdb"
    shutil.copy(path, kept)
    r = sferp("forget", "--salesforce-id", oid, "--views", str(path), "--json")
    assert r.returncode == 0, r.stderr
    report = orjson.loads(r.stdout)
    assert report["undo_log"] == 4 and report["traces_in_file"] is False  # 2 per snapshot
    assert marker.encode() not in path.read_bytes()
    # a resume from the snapshot rolls back to it: without the erasure, the subject
    # comes back from the undo log; after it, it does not
    for p, present in ((kept, 1), (path, 0)):
        w = ViewsWriterPartition(str(p), snap, **kw)
        got = w._con.execute("SELECT count(*) FROM records WHERE record_key = ?", [oid])
        assert got.fetchone()[0] == present
        w.close()
    assert mentions(path, oid) == {}


def test_forget_tombstones_the_kafka_keys_and_the_mirror(broker, topics, tmp_path) -> None:
    names = topics({"out_orders": 1, "out_exceptions": 1, "out_inventory": 1})
    config = tmp_path / "sferp.toml"
    config.write_text("[topics]\n" + "".join(f'{r} = "{n}"\n' for r, n in names.items()))
    path = tmp_path / "views.duckdb"
    oid = "801000000000009AAA"
    w = ViewsWriterPartition(str(path), None, commit_interval_s=0, serve_queries=False)
    w.write_batch([{"order_status": {(oid,): _order(oid, "0009")}}])
    w.close()
    mirror = KafkaMirror(mirror_path(str(path)))
    mirror.record({(names["out_orders"], oid.encode()): b'{"sf_order_id":"x"}'})
    mirror.close()
    r = sferp(
        "forget",
        "--salesforce-id",
        oid,
        "--views",
        str(path),
        "--config",
        str(config),
        "--tombstones",
        "--bootstrap",
        broker.bootstrap,
    )
    assert r.returncode == 0, r.stderr
    assert "tombstones sent for 1 key(s)" in r.stdout
    assert re.search(r"kafka mirror\s+2 row\(s\) removed", r.stdout), r.stdout
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    tp = TopicPartition(names["out_orders"], 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    got = []
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        got = [m for ms in c.poll(timeout_ms=500).values() for m in ms]
    c.close()
    assert [(m.key.decode(), m.value) for m in got] == [(oid, None)]
    assert KafkaMirror(mirror_path(str(path))).values() == {}


def test_forget_needs_a_views_file(tmp_path) -> None:
    r = sferp("forget", "--salesforce-id", "001000000000001AAA", "--views", str(tmp_path / "x"))
    assert r.returncode == 2 and "no views file" in r.stderr
    assert os.path.exists(tmp_path / "x") is False


def test_a_broken_json_erp_key_is_refused_not_matched_as_text(tmp_path) -> None:
    """'{"order_no":' is a substring of every sales order's key: it must not be read as one."""
    r = sferp("forget", "--erp-key", '{"order_no":', "--views", str(tmp_path / "x"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--erp-key" in lines[0], r.stderr
