"""ERP extract files as change events: naming, change detection, quarantine, order, restarts.

Everything runs against real files and real DuckDB state files; the source
partitions are driven through Bytewax's partition interface (the same calls
the dataflow makes), and the whole flow is checked against the reference
model on a generated world.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import pytest
from flowkit import renumber, run_in_memory
from sferp.connectors.erp_extracts import (
    ORDER_BASE,
    ErpExtractSource,
    ExtractStateError,
    FileNaming,
    scan,
)
from sferp.operators.extract_routing import ExtractBatch, make_extract_router
from sferp.operators.facts import CHANGES, GLOBAL_IN, TICK
from sferp.operators.routing import SHARDS

from sferp.compare import diff
from sferp.events import DELETE, UPSERT, RawMessage
from sferp.generator import GeneratorConfig
from sferp.generator_extracts import ExtractGenerator
from sferp.reference import ReferenceConfig, compute

INV = ("sku", "warehouse", "qty_on_hand", "qty_allocated")
ERP_TOPICS = {
    "items": "erp.public.items",
    "inventory": "erp.public.inventory",
    "sales_orders": "erp.public.sales_orders",
}


# --- helpers ---------------------------------------------------------------------------------


def write_csv(path: Path, rows, header=INV) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])
    return path


def write_jsonl(path: Path, rows, header=INV) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(orjson.dumps(dict(zip(header, r, strict=True))) + b"\n")
    return path


def write_parquet(path: Path, rows) -> Path:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE t (sku VARCHAR, warehouse VARCHAR, qty_on_hand INTEGER, qty_allocated BIGINT)"
    )
    if rows:
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", [list(r) for r in rows])
    con.execute(f"COPY t TO '{path}' (FORMAT parquet)")
    con.close()
    return path


def name(kind: str, seq: int, minute: int, ext: str = "csv", table: str = "inventory") -> str:
    return f"{table}.{kind}.{seq:06d}.20261102T08{minute:02d}00Z.{ext}"


def source(d: Path, state: Path, **kw) -> ErpExtractSource:
    kw.setdefault("bounded", True)
    kw.setdefault("settle_s", 0)
    kw.setdefault("poll_interval_s", 0.01)
    return ErpExtractSource(d, state_dir=state, **kw)


def part_of(src: ErpExtractSource, table: str = "inventory", resume=None):
    return src.build_part("extracts_in", table, resume)


def pump(part, *, until=None, timeout=30.0) -> list[ExtractBatch]:
    """Call next_batch as Bytewax would until the partition ends (or `until(batches)`)."""
    out: list[ExtractBatch] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = part.next_batch()
        except StopIteration:
            return out
        out.extend(got)
        if until is not None and until(out):
            return out
        if not got:
            time.sleep(0.005)
    raise AssertionError("partition did not finish in time")


def changes(batches):
    return [c for b in batches for c in b.changes]


def dead(batches):
    return [d for b in batches for d in b.dead_letters]


def key(sku, wh):
    return json.dumps({"sku": sku, "warehouse": wh}, separators=(",", ":"))


def inv(sku, wh, on_hand, allocated):
    return {"sku": sku, "warehouse": wh, "qty_on_hand": on_hand, "qty_allocated": allocated}


def summary(chs):
    return [(c.op, c.key, c.order[0], c.fields) for c in chs]


ROWS1 = [("A", "DAL1", 10, 1), ("B", "DAL1", 5, 0), ("C", "RNO1", 7, 2)]
ROWS2 = [("A", "DAL1", 10, 1), ("C", "RNO1", 8, 2), ("D", "ATL2", 1, None)]


# --- naming ----------------------------------------------------------------------------------


def test_naming_rule_sequence_timestamp_and_custom_patterns(tmp_path):
    n = FileNaming()
    assert n.parse("items.full.000042.20261102T080000Z.csv") == (
        "items",
        "full",
        42,
        1793606400000,
        "csv",
    )
    # timestamp only: the sequence is the export time in epoch seconds
    assert n.parse("inventory.delta.20261102T080000123Z.jsonl.gz") == (
        "inventory",
        "delta",
        1793606400,
        1793606400123,
        "jsonl",
    )
    assert n.parse("sales_orders.delta.7.parquet") == ("sales_orders", "delta", 7, None, "parquet")
    for bad in ("items.full.csv", "items.snapshot.1.csv", "items.full.1.txt", "x.full.1.csv~"):
        assert n.parse(bad) is None
    custom = FileNaming(r"ERP_(?P<table>[a-z_]+)_(?P<kind>FULL|DELTA)_(?P<seq>\d+)\.csv", "auto")
    assert custom.parse("ERP_items_DELTA_12.csv") == ("items", "delta", 12, None, "csv")
    with pytest.raises(ValueError):
        FileNaming(r"(?P<table>\w+)\.(?P<kind>full)\.csv")  # neither seq nor ts

    # without a timestamp in the name, the export time is the file's modification time
    p = write_csv(tmp_path / "inventory.full.3.csv", ROWS1)
    os.utime(p, ns=(1_700_000_000_123_000_000, 1_700_000_000_123_000_000))
    write_csv(tmp_path / "inventory.full.1.csv", ROWS1)
    write_csv(tmp_path / "items.full.2.csv", [], header=("sku",))
    (tmp_path / "inventory").mkdir()
    write_csv(tmp_path / "inventory" / "inventory.delta.2.csv", ROWS1)
    found = scan(str(tmp_path), "inventory", n)
    assert [(f.name, f.seq) for f in found] == [
        ("inventory.full.1.csv", 1),
        ("inventory.delta.2.csv", 2),
        ("inventory.full.3.csv", 3),
    ]
    assert found[-1].export_ms == 1_700_000_000_123


def test_settings_section_validates_and_reads_the_environment(tmp_path):
    from sferp.config import ConfigError, load_settings

    assert load_settings(environ={}).erp_extracts.path == ""  # disabled by default
    s = load_settings(
        environ={
            "SFERP_ERP_EXTRACTS__PATH": str(tmp_path),
            "SFERP_ERP_EXTRACTS__TABLES": "inventory, items",
            "SFERP_ERP_EXTRACTS__BAD_ROW_TOLERANCE": "0.01",
        }
    )
    assert (s.erp_extracts.tables, s.erp_extracts.bad_row_tolerance) == (
        ["inventory", "items"],
        0.01,
    )
    bad = {
        "SFERP_ERP_EXTRACTS__TABLES": "items,stock",
        "SFERP_ERP_EXTRACTS__FILE_PATTERN": r"(?P<table>\w+)\.(?P<kind>full)\.csv",
        "SFERP_ERP_EXTRACTS__FORMAT": "xlsx",
        "SFERP_ERP_EXTRACTS__BAD_ROW_TOLERANCE": "1",
        "SFERP_ERP_EXTRACTS__POLL": "3",
    }
    for name, value in bad.items():
        with pytest.raises(ConfigError) as e:
            load_settings(environ={name: value})
        assert "erp_extracts" in str(e.value).lower() and "\n" not in str(e.value)


# --- change detection ------------------------------------------------------------------------


def test_full_snapshot_then_delta(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    write_csv(d / name("full", 2, 30), ROWS2)
    write_jsonl(
        d / name("delta", 3, 45, "jsonl"),
        [("A", "DAL1", 11, 1, False), ("C", "RNO1", None, None, True), ("Z", "X", 1, 1, True)],
        header=(*INV, "_deleted"),
    )
    batches = pump(part_of(source(d, tmp_path / "state")))
    chs = changes(batches)
    base1, base2, base3 = ORDER_BASE, 2 * ORDER_BASE, 3 * ORDER_BASE
    assert summary(chs) == [
        # full 1: every row is new
        ("upsert", key("A", "DAL1"), base1 + 1, inv("A", "DAL1", 10, 1)),
        ("upsert", key("B", "DAL1"), base1 + 2, inv("B", "DAL1", 5, 0)),
        ("upsert", key("C", "RNO1"), base1 + 3, inv("C", "RNO1", 7, 2)),
        # full 2: C changed, D new (row numbers 2, 3); B absent: deleted after the rows
        ("upsert", key("C", "RNO1"), base2 + 2, inv("C", "RNO1", 8, 2)),
        ("upsert", key("D", "ATL2"), base2 + 3, inv("D", "ATL2", 1, None)),
        ("delete", key("B", "DAL1"), base2 + 4, inv("B", "DAL1", 5, 0)),
        # delta 3: A updated; C deleted (its last image); Z unknown: nothing to delete
        ("upsert", key("A", "DAL1"), base3 + 1, inv("A", "DAL1", 11, 1)),
        ("delete", key("C", "RNO1"), base3 + 2, inv("C", "RNO1", 8, 2)),
    ]
    for c in chs:
        assert (c.source, c.entity, c.topic, c.partition, c.primary) == (
            "erp",
            "inventory",
            "extract:inventory",
            0,
            True,
        )
        assert c.identity == f"erp|inventory|{c.key}|{c.order[0]}"
        assert c.op in (UPSERT, DELETE)
    minute = {c.order[0] // ORDER_BASE: c.event_time for c in chs}
    assert minute == {1: 1793606400000, 2: 1793608200000, 3: 1793609100000}
    assert dead(batches) == []


def test_unchanged_reexport_emits_nothing_whatever_the_format(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    write_parquet(d / name("full", 2, 10, "parquet"), ROWS1)
    with gzip.open(d / name("full", 3, 20, "csv.gz"), "wt", newline="") as f:
        f.write("qty_allocated,sku,extra,qty_on_hand,warehouse\n")  # other column order, extras
        for sku, wh, on_hand, alloc in reversed(ROWS1):
            f.write(f"{alloc},{sku},x,{on_hand},{wh}\n")
    write_jsonl(d / name("full", 4, 30, "jsonl"), ROWS1)
    part = part_of(source(d, tmp_path / "state"))
    batches = pump(part)
    assert [c.order[0] // ORDER_BASE for c in changes(batches)] == [1, 1, 1]
    assert part.snapshot()["seq"] == 4  # all four applied


def test_formats_give_identical_events(tmp_path):
    rows = [("A", "DAL1", 10, 1), ("B", "RNO1", None, 0), ("C", "ATL2", 3, None)]
    writers = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}
    seen = {}
    for ext, write in writers.items():
        d = tmp_path / ext
        d.mkdir()
        write(d / name("full", 1, 0, ext), rows)
        seen[ext] = summary(changes(pump(part_of(source(d, tmp_path / f"state-{ext}")))))
    assert seen["csv"] == seen["jsonl"] == seen["parquet"]
    assert len(seen["csv"]) == 3


def test_items_and_sales_orders_types(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(
        d / name("full", 1, 0, table="items"),
        [("SKU-1", 'Valve, "steel"', "12.50", "true"), ("SKU-2", "", " 7 ", "f")],
        header=("sku", "description", "list_price", "active"),
    )
    so_header = ("order_no", "sf_order_id", "customer_no", "status", "total_amount", "currency")
    write_jsonl(
        d / name("delta", 1, 0, "jsonl", table="sales_orders"),
        [
            (400123, "801000000000001AAA", "C-1", "OPEN", "99.90", "USD"),
            (7, "", None, "OPEN", 1.5, None),
        ],
        header=so_header,
    )
    src = source(d, tmp_path / "state", tables=["items", "sales_orders"])
    items = changes(pump(part_of(src, "items")))
    assert [c.key for c in items] == ['{"sku":"SKU-1"}', '{"sku":"SKU-2"}']
    assert [c.fields for c in items] == [
        {"sku": "SKU-1", "description": 'Valve, "steel"', "list_price": "12.50", "active": True},
        {"sku": "SKU-2", "description": None, "list_price": "7", "active": False},
    ]
    orders = changes(pump(part_of(src, "sales_orders")))
    # order_no is an integer column: the key is exactly the one Debezium events get
    assert [c.key for c in orders] == ['{"order_no":400123}', '{"order_no":7}']
    assert orders[1].fields == {
        "order_no": 7,
        "sf_order_id": None,
        "customer_no": None,
        "status": "OPEN",
        "total_amount": "1.5",
        "currency": None,
    }


# --- malformed files -------------------------------------------------------------------------


@pytest.mark.parametrize("defect", ["truncated_csv", "truncated_parquet", "bad_header", "dup_key"])
def test_malformed_file_is_quarantined_cursor_stays_next_good_file_applies(tmp_path, defect):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    if defect == "truncated_csv":
        bad = write_csv(d / name("full", 2, 10), ROWS2)
        data = bad.read_bytes()
        bad.write_bytes(data[: data.rindex(b"\nD,") + 4])  # cut inside the last row: "D,A"
    elif defect == "truncated_parquet":
        bad = write_parquet(d / name("full", 2, 10, "parquet"), ROWS2)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif defect == "bad_header":
        bad = write_csv(d / name("full", 2, 10), ROWS2, header=("sku", "wh", *INV[2:]))
    else:
        bad = write_csv(d / name("full", 2, 10), ROWS2 + [("A", "DAL1", 3, 3)])
    write_csv(d / name("full", 3, 20), ROWS2)
    part = part_of(source(d, tmp_path / "state"))

    batches = pump(part, until=lambda bs: dead(bs))
    (dl,) = dead(batches)
    assert (dl.topic, dl.partition, dl.offset, dl.raw) == ("extract:inventory", 0, 2, bad.name)
    assert dl.reason.startswith("bad_extract: ")
    snap = part.snapshot()
    assert snap["seq"] == 1 and snap["pending"] is None  # the cursor did not move
    assert bad.name in snap["quarantined"]
    assert [c.order[0] // ORDER_BASE for c in changes(batches)] == [1, 1, 1]

    rest = pump(part)
    assert dead(rest) == []
    # file 3 is compared with file 1 (the quarantined file changed nothing)
    assert [(c.op, c.key) for c in changes(rest)] == [
        ("upsert", '{"sku":"C","warehouse":"RNO1"}'),
        ("upsert", '{"sku":"D","warehouse":"ATL2"}'),
        ("delete", '{"sku":"B","warehouse":"DAL1"}'),
    ]
    assert part.snapshot()["seq"] == 3 and part.snapshot()["quarantined"] == {}


def test_quarantined_file_is_retried_when_rewritten(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    bad = write_csv(d / name("full", 1, 0), ROWS1, header=("sku", "wh", *INV[2:]))
    part = part_of(source(d, tmp_path / "state", bounded=False))
    assert len(dead(pump(part, until=lambda bs: dead(bs)))) == 1
    # polling again does not dead-letter the same file twice
    again = []
    t_end = time.monotonic() + 0.3
    while time.monotonic() < t_end:
        again.extend(part.next_batch())
    assert again == []
    write_csv(bad, ROWS1)  # fixed in place
    fixed = pump(part, until=lambda bs: len(changes(bs)) == 3)
    assert dead(fixed) == [] and part.snapshot()["seq"] == 1
    part.close()


def test_bad_rows_within_tolerance_are_dead_letters_and_keep_their_rows(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    write_csv(
        d / name("full", 2, 10), [("A", "DAL1", "ten", 1), ("B", "DAL1", 6, 0), ("C", "RNO1", 7, 2)]
    )
    part = part_of(source(d, tmp_path / "state", bad_row_tolerance=0.5))
    batches = pump(part)
    (dl,) = dead(batches)
    assert dl.reason == "bad_extract_row: bad number in qty_on_hand"
    assert dl.offset == 2 * ORDER_BASE + 1 and dl.raw.startswith(name("full", 2, 10) + " #1: ")
    second = [c for c in changes(batches) if c.order[0] // ORDER_BASE == 2]
    # B changed; A (unusable row, readable key) is neither updated nor deleted
    assert [(c.op, c.key) for c in second] == [("upsert", '{"sku":"B","warehouse":"DAL1"}')]

    # with the default tolerance (0) the same file is quarantined
    part0 = part_of(source(d, tmp_path / "state0"))
    (dl0,) = dead(pump(part0))
    assert (
        dl0.reason == "bad_extract: 1 of 3 rows unusable (first: row 1: bad number in qty_on_hand)"
    )


# --- export order and restarts ---------------------------------------------------------------


def test_older_export_arriving_late_is_skipped_and_counted(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 5, 0), ROWS1)
    write_csv(d / name("full", 6, 10), ROWS2)
    part = part_of(source(d, tmp_path / "state", bounded=False))
    pump(part, until=lambda bs: part.snapshot()["seq"] == 6)
    write_csv(d / name("full", 4, 5), ROWS1)  # an older export, delivered late
    late = pump(part, until=lambda bs: any(b.skipped for b in bs))
    assert sum(b.skipped for b in late) == 1 and changes(late) == [] and dead(late) == []
    assert part.snapshot()["seq"] == 6
    # counted once, not at every poll
    t_end = time.monotonic() + 0.3
    more = []
    while time.monotonic() < t_end:
        more.extend(part.next_batch())
    assert more == []
    part.close()
    route = make_extract_router(live=False, max_future_skew_ms=0)
    (gi,) = [p for _, p in route(late[0]) if p[0] == GLOBAL_IN]
    assert gi[1].stats == {"extract:inventory": [1, 0, 0, 0, 0, 1]}


def straight_run(d: Path, state: Path, **kw):
    return summary(changes(pump(part_of(source(d, state, **kw)))))


def test_restart_between_files_resumes_without_duplicates(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    first_src = source(d, tmp_path / "state")
    a = part_of(first_src)
    got = changes(pump(a))
    snap = a.snapshot()
    a.close()
    write_csv(d / name("full", 2, 10), ROWS2)
    write_jsonl(d / name("delta", 3, 20, "jsonl"), [("A", "DAL1", 1, 1)])
    b = part_of(first_src, resume=snap)
    got += changes(pump(b))
    b.close()
    ids = [c.identity for c in got]
    assert len(ids) == len(set(ids))
    assert summary(got) == straight_run(d, tmp_path / "fresh")


def test_restart_inside_a_file_continues_after_the_last_emitted_event(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rows = [(f"S{i:02d}", "DAL1", i, 0) for i in range(10)]
    write_csv(d / name("full", 1, 0), rows)
    write_csv(d / name("full", 2, 10), rows[3:] + [("NEW", "RNO1", 1, 1)])
    src = source(d, tmp_path / "state", batch_size=3)
    a = part_of(src)
    got = changes(pump(a, until=lambda bs: len(changes(bs)) >= 3))
    assert len(got) == 3
    snap = a.snapshot()
    assert snap["pending"] == (1, name("full", 1, 0), 3) and snap["seq"] is None
    a.close()
    b = part_of(src, resume=snap)
    got += changes(pump(b))
    assert summary(got) == straight_run(d, tmp_path / "fresh")
    assert len({c.identity for c in got}) == len(got) == 10 + 1 + 3


def test_resume_rolls_back_state_written_after_the_snapshot(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    write_csv(d / name("full", 2, 10), ROWS2)
    src = source(d, tmp_path / "state")
    a = part_of(src)
    first = pump(a, until=lambda bs: a.snapshot()["seq"] == 1)
    snap1 = a.snapshot()
    second = changes(pump(a))  # applied and committed to the state, then the process dies
    a.close()
    assert second
    b = part_of(src, resume=snap1)
    again = changes(pump(b))
    assert summary(again) == summary(second)
    assert changes(first)


def test_resume_with_lost_state_fails_loudly(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    a = part_of(source(d, tmp_path / "state"))
    pump(a)
    snap = a.snapshot()
    a.close()
    with pytest.raises(ExtractStateError, match="Rebuild from scratch"):
        part_of(source(d, tmp_path / "other-state"), resume=snap)


# --- routing into the merge shards -----------------------------------------------------------


def test_router_payloads_match_the_kafka_router(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / name("full", 1, 0), ROWS1)
    (batch,) = [b for b in pump(part_of(source(d, tmp_path / "state"))) if b.changes]
    out = make_extract_router(live=False, max_future_skew_ms=0)(batch)
    payloads = [p for _, p in out if p[0] == CHANGES]
    assert sum(len(p[2]) for p in payloads) == 3
    for dest, p in out:
        if p[0] == CHANGES:
            _, tp, chs, stamps = p
            assert tp == ("extract:inventory", 0) and dest.startswith("m")
            assert stamps == [batch.export_ms] * len(chs)
    ticks = [(dest, p) for dest, p in out if p[0] == TICK]
    assert len(ticks) == SHARDS
    assert all(p[1] == {("extract:inventory", 0): batch.export_ms} for _, p in ticks)
    (gi,) = [p[1] for dest, p in out if dest == "g"]
    assert gi.clock == batch.export_ms and gi.stats == {} and gi.dead_letters == []
    # live: an export stamped far in the future is applied but does not move the clock
    future = batch._replace(export_ms=int(time.time() * 1000) + 3_600_000)
    live_out = make_extract_router(live=True, max_future_skew_ms=300_000)(future)
    assert not [p for _, p in live_out if p[0] in (TICK, GLOBAL_IN)]
    assert all(p[3] == [-1] * len(p[2]) for _, p in live_out if p[0] == CHANGES)


# --- the whole flow against the reference model ----------------------------------------------


def _without_extract_counters(v):
    return dataclasses.replace(
        v,
        flow_stats={},
        late={},
        dead_letters={x for x in v.dead_letters if not x[0].startswith("extract:")},
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_flow_fed_by_extracts_equals_reference_fed_by_equivalent_changes(tmp_path, workers):
    cfg = GeneratorConfig(orders=400, seed={1: 11, 2: 13}[workers])
    gen = ExtractGenerator(cfg, tmp_path / "extracts")
    msgs = renumber(
        [RawMessage(m.topic, m.partition, 0, m.key, m.value, -1) for m in gen.messages()]
    )
    world = gen.world
    assert {f.fault for f in world.files} >= {
        None,
        "truncated_csv",
        "truncated_parquet",
        "bad_header",
        "garbage_line",
    }
    # some rows disappear from a full snapshot: deletes detected by absence
    kinds = {(f.table, f.seq): f.kind for f in world.files}
    assert [
        e for e in world.events if e.op == "d" and kinds[e.table, e.order // ORDER_BASE] == "full"
    ]
    assert not [m for m in msgs if m.topic in ERP_TOPICS.values()]

    expected = compute(msgs + world.equivalent_messages(ERP_TOPICS))
    views = run_in_memory(
        msgs,
        tmp_path / "views.duckdb",
        workers=workers,
        env={"SFERP_ERP_EXTRACTS__PATH": str(tmp_path / "extracts")},
    )
    assert diff(_without_extract_counters(expected), _without_extract_counters(views)) == []
    assert {r for r in views.records if r[0] == "erp"}, "the ERP side came from the extracts"
    got_dead = {
        (t, p, o, raw) for t, p, o, reason, raw in views.dead_letters if t.startswith("extract:")
    }
    assert got_dead == world.dead_letters()
    for table, topic in ERP_TOPICS.items():
        s = views.flow_stats[f"extract:{table}"]
        assert s["applied"] == expected.flow_stats[topic]["applied"]
        assert s["duplicates"] == 0
        assert s["consumed"] == s["applied"] + s["dead_lettered"] + s["ignored"]
        assert views.flow_stats[topic]["consumed"] == 0


def test_generate_cli_writes_extracts_and_leaves_their_topics_empty(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sferp",
            "generate",
            "--out",
            str(tmp_path / "jsonl"),
            "--extracts",
            str(tmp_path / "ext"),
            "--extract-tables",
            "items,inventory",
            "--orders",
            "150",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "extract files (" in r.stdout
    assert (tmp_path / "jsonl" / "erp.public.inventory.jsonl").read_bytes() == b""
    assert (tmp_path / "jsonl" / "erp.public.sales_orders.jsonl").read_bytes() != b""
    names = sorted(p.name for p in (tmp_path / "ext").iterdir())
    assert {n.split(".")[0] for n in names} == {"items", "inventory"}
    assert all(FileNaming().parse(n) for n in names)
    lines = (tmp_path / "jsonl" / "sf.cdc.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["partition"] >= 0


# --- end to end: broker + `sferp run`, hybrid CDC and extracts -------------------------------

ROLES = ("sf_cdc", "erp_items", "erp_inventory", "erp_sales_orders")
OUTPUTS = ("out_inventory", "out_orders", "out_exceptions", "dlq")


def _sferp(*args, timeout=300, **kw):
    return subprocess.run(
        [sys.executable, "-m", "sferp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@pytest.fixture
def hybrid(topics, tmp_path):
    """Topics, a config with [erp_extracts], and a hybrid world: CDC for orders, files for stock."""
    names = topics({role: 2 for role in ROLES} | {role: 1 for role in OUTPUTS})
    ext = tmp_path / "extracts"
    config = tmp_path / "sferp.toml"
    lines = ["[topics]"] + [f'{role} = "{n}"' for role, n in names.items()]
    lines += ["[erp_extracts]", f'path = "{ext}"', 'tables = ["items", "inventory"]']
    lines += ["poll_interval_s = 0.2", "settle_s = 0"]
    config.write_text("\n".join(lines) + "\n")
    cfg = GeneratorConfig(
        orders=300, seed=5, partitions=2, topics={role: names[role] for role in ROLES}
    )
    gen = ExtractGenerator(cfg, ext, ("items", "inventory"))
    produced = list(gen.messages())
    msgs = renumber([RawMessage(m.topic, m.partition, 0, m.key, m.value, -1) for m in produced])
    topics_of = {"items": names["erp_items"], "inventory": names["erp_inventory"]}
    roles = dict(zip(ROLES, ("salesforce", "items", "inventory", "sales_orders"), strict=True))
    ref_cfg = ReferenceConfig(topics={names[r]: role for r, role in roles.items()})
    expected = compute(msgs + gen.world.equivalent_messages(topics_of), ref_cfg)
    return names, config, cfg, produced, gen.world, expected


def test_hybrid_run_with_restart_between_extracts_equals_reference(broker, hybrid, tmp_path):
    from sferp.compare import load_views
    from sferp.generator import produce

    names, config, cfg, produced, world, expected = hybrid
    produce(cfg, broker.bootstrap, create_topics=False, messages=produced)
    ext = Path(world.directory)
    later = tmp_path / "later"
    later.mkdir()
    cut = sorted(f.export_ms for f in world.files)[len(world.files) // 2]
    for f in world.files:
        if f.export_ms > cut:
            (ext / f.name).rename(later / f.name)
    views = tmp_path / "views.duckdb"
    common = ["--config", str(config), "--bootstrap", broker.bootstrap, "--views", str(views)]
    recovery = ["--recovery-dir", str(tmp_path / "recovery"), "--until-caught-up"]
    r = _sferp("run", *common, *recovery)
    assert r.returncode == 0, r.stderr[-3000:]
    half = load_views(views)
    assert 0 < half.flow_stats["extract:inventory"]["applied"]
    for p in later.iterdir():
        p.rename(ext / p.name)
    r = _sferp("run", *common, *recovery)  # resumes from the recovery store
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_views(views)
    assert diff(_without_extract_counters(expected), _without_extract_counters(got)) == []
    for table in ("items", "inventory"):
        s = got.flow_stats[f"extract:{table}"]
        assert s["applied"] == sum(1 for e in world.events if e.table == table)
        assert s["duplicates"] == 0
    # sales orders came from Kafka (CDC) and were linked to Salesforce orders as usual
    assert got.flow_stats[names["erp_sales_orders"]]["applied"] > 0
    assert any(row.erp_order_no for row in got.order_status.values())


def test_live_run_picks_up_new_extracts_and_stops_cleanly(broker, hybrid, tmp_path):
    names, config, cfg, produced, world, expected = hybrid
    ext = Path(world.directory)
    held = tmp_path / "held"
    held.mkdir()
    for p in ext.iterdir():
        p.rename(held / p.name)
    views = tmp_path / "views.duckdb"
    env = dict(os.environ, SFERP_FLOW__SNAPSHOT_INTERVAL_S="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sferp",
            "run",
            "--config",
            str(config),
            "--bootstrap",
            broker.bootstrap,
            "--views",
            str(views),
            "--recovery-dir",
            str(tmp_path / "rec"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = sorted(held.glob("inventory.full.*"))[0]
        first.rename(ext / first.name)  # a file dropped while the flow runs

        def inventory_rows():
            r = _sferp(
                "query",
                "SELECT count(*) AS n FROM records WHERE entity = 'inventory'",
                "--views",
                str(views),
                "--format",
                "json",
                timeout=60,
            )
            return r.returncode == 0 and json.loads(r.stdout)[0]["n"] > 0

        deadline = time.monotonic() + 90
        while not inventory_rows():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the new extract was not applied"
            time.sleep(0.5)
    finally:
        proc.send_signal(15)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


def test_extract_path_that_is_not_a_directory_is_a_configuration_error(broker, topics, tmp_path):
    names = topics({role: 1 for role in ROLES})
    config = tmp_path / "sferp.toml"
    lines = ["[topics]"] + [f'{role} = "{n}"' for role, n in names.items()]
    lines += ["[erp_extracts]", f'path = "{tmp_path / "missing"}"']
    config.write_text("\n".join(lines) + "\n")
    r = _sferp(
        "run",
        "--config",
        str(config),
        "--bootstrap",
        broker.bootstrap,
        "--until-caught-up",
        "--views",
        str(tmp_path / "v.duckdb"),
        timeout=120,
    )
    assert r.returncode == 2
    assert "erp_extracts.path" in r.stderr and "Traceback" not in r.stderr


# --- memory on a large extract (make test-slow) ----------------------------------------------


@pytest.mark.slow
def test_two_million_row_extract_stays_under_1_gb(tmp_path):
    rows = 2_000_000
    r = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("extract_rss_probe.py")),
            str(tmp_path),
            str(rows),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    print(line)
    got = dict(kv.split("=") for kv in line.split())
    # first file: every row new; re-export: 1 % changed, 0.1 % gone
    assert int(got["upserts"]) == rows + rows // 100
    assert int(got["deletes"]) == rows // 1000
    assert float(got["peak_rss_mb"]) < 1024, line


def test_numbers_beyond_the_view_columns_are_bad_rows(tmp_path):
    """The Debezium decoder's ranges (docs/semantics.md "Ranges") hold for extract rows too."""
    d = tmp_path / "in"
    d.mkdir()
    write_csv(
        d / name("full", 1, 0),
        [
            ("A", "W1", 10**15 - 1, 0),
            ("B", "W1", 10**15, 0),
            ("C", "W1", 0, -(2**63)),  # BIGINT's smallest: no abs() overflow
            ("D", "W1", 1, 2),
        ],
    )
    so_header = ("order_no", "sf_order_id", "customer_no", "status", "total_amount", "currency")
    write_jsonl(
        d / name("delta", 1, 0, "jsonl", table="sales_orders"),
        [
            (1, "", None, "OPEN", "9999999999999999.994", None),
            (2, "", None, "OPEN", "9999999999999999.995", None),
            (3, "", None, "OPEN", "1e30", None),
            (4, "", None, "OPEN", 12.5, None),
            (5, "", None, "OPEN", "99999999999999999999999999999999999999999", None),
        ],
        header=so_header,
    )
    src = source(d, tmp_path / "state", tables=["inventory", "sales_orders"],
                 bad_row_tolerance=0.9)  # fmt: skip
    inv = pump(part_of(src, "inventory"))
    assert [c.key for c in changes(inv)] == [
        '{"sku":"A","warehouse":"W1"}',
        '{"sku":"D","warehouse":"W1"}',
    ]
    assert [dl.reason for dl in dead(inv)] == [
        "bad_extract_row: bad number in qty_on_hand",
        "bad_extract_row: bad number in qty_allocated",
    ]
    so = pump(part_of(src, "sales_orders"))
    assert [c.key for c in changes(so)] == ['{"order_no":1}', '{"order_no":4}']
    assert [dl.reason for dl in dead(so)] == ["bad_extract_row: bad number in total_amount"] * 3


def test_a_modification_time_beyond_the_event_time_range_is_clamped():
    """A file system accepts any time, a TIMESTAMP column does not (a views commit with
    such a time failed, and the file was read again at every restart)."""
    from sferp.connectors.erp_extracts import _event_time

    from sferp.events import EVENT_TIME_MAX_MS, EVENT_TIME_MIN_MS

    assert _event_time(10**16) == EVENT_TIME_MAX_MS
    assert _event_time(-(10**16)) == EVENT_TIME_MIN_MS
    assert _event_time(1_764_309_600_000) == 1_764_309_600_000
