"""load_views against real DuckDB files with the contract's schema, and diff's rules."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from sferp.compare import InventoryRow, OrderRow, RecordRow, Views, diff, load_views
from sferp.events import RawMessage
from sferp.reference import ReferenceConfig, compute

T0 = 1_764_309_600_000  # 2025-11-28 06:00:00 UTC

# CONTRACT §3.1, column for column.
CONTRACT_DDL = """
CREATE TABLE records (
    source VARCHAR, entity VARCHAR, record_key VARCHAR, deleted BOOLEAN, fields JSON,
    version VARCHAR, event_time TIMESTAMP, PRIMARY KEY (source, entity, record_key));
CREATE TABLE inventory_live (
    sku VARCHAR PRIMARY KEY, on_hand BIGINT, allocated BIGINT, sf_open_demand BIGINT,
    available_to_promise BIGINT, updated_at TIMESTAMP);
CREATE TABLE order_status (
    sf_order_id VARCHAR PRIMARY KEY, order_number VARCHAR, account_id VARCHAR,
    erp_order_no VARCHAR, sf_status VARCHAR, erp_status VARCHAR, stage VARCHAR,
    sf_total DECIMAL(18,2), erp_total DECIMAL(18,2), amount_matches BOOLEAN,
    activated_at TIMESTAMP, invoiced_at TIMESTAMP, quote_to_cash_s DOUBLE,
    updated_at TIMESTAMP);
CREATE TABLE reconciliation_exceptions (
    kind VARCHAR, key VARCHAR, detail VARCHAR, first_seen TIMESTAMP, last_seen TIMESTAMP,
    open BOOLEAN, PRIMARY KEY (kind, key));
CREATE TABLE flow_stats (
    topic VARCHAR PRIMARY KEY, consumed BIGINT, applied BIGINT, duplicates BIGINT, late BIGINT,
    dead_lettered BIGINT, ignored BIGINT);
CREATE TABLE dead_letters (
    topic VARCHAR, partition INTEGER, "offset" BIGINT, reason VARCHAR, raw VARCHAR);
"""

ORDER = "801000000000001AAA"


def write_views(
    path: Path,
    views: Views,
    *,
    noise: int = 0,
    closed: tuple[tuple[str, str], ...] = (),
) -> None:
    """Write views as a flow's writer would; `noise` varies the informational columns."""
    stamp = T0 + noise
    con = duckdb.connect(str(path))
    con.execute(CONTRACT_DDL)

    def insert(sql: str, rows: list[tuple]) -> None:
        if rows:
            con.executemany(sql, rows)

    insert(
        "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, epoch_ms(?::BIGINT))",
        [
            (*key, row.deleted, json.dumps(row.fields), row.version, row.event_time_ms)
            for key, row in views.records.items()
        ],
    )
    insert(
        "INSERT INTO inventory_live VALUES (?, ?, ?, ?, ?, epoch_ms(?::BIGINT))",
        [(sku, *row, stamp) for sku, row in views.inventory_live.items()],
    )
    insert(
        "INSERT INTO order_status VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " epoch_ms(?::BIGINT), epoch_ms(?::BIGINT), ?, epoch_ms(?::BIGINT))",
        [(key, *row, stamp) for key, row in views.order_status.items()],
    )
    exceptions = [(k, key, f"detail {noise}", True) for k, key in views.open_exceptions]
    exceptions += [(k, key, "old", False) for k, key in closed]
    insert(
        "INSERT INTO reconciliation_exceptions VALUES"
        " (?, ?, ?, epoch_ms(?::BIGINT), epoch_ms(?::BIGINT), ?)",
        [(k, key, detail, stamp, stamp + 1, is_open) for k, key, detail, is_open in exceptions],
    )
    insert(
        "INSERT INTO flow_stats VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                topic,
                s["consumed"],
                s["applied"],
                s["duplicates"],
                noise,
                s["dead_lettered"],
                s["ignored"],
            )
            for topic, s in views.flow_stats.items()
        ],
    )
    insert("INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?)", sorted(views.dead_letters))
    con.close()


def sample_views() -> Views:
    return Views(
        records={
            ("salesforce", "Order", ORDER): RecordRow(
                False,
                {"Status": "Activated", "TotalAmount": 100.5, "IsX": True, "N": None, "L": [1]},
                f"{T0}:5:1",
                T0,
            ),
            ("erp", "items", '{"sku":"SKU-1"}'): RecordRow(
                True, {"sku": "SKU-1", "list_price": "12.50"}, "42", T0 + 1
            ),
        },
        inventory_live={"SKU-1": InventoryRow(10, 2, 3, 5), "SKU-2": InventoryRow(0, 0, 1, -1)},
        order_status={
            ORDER: OrderRow(
                "00000100",
                "001000000000001AAA",
                "SO-1",
                "Activated",
                "INVOICED",
                "INVOICED",
                Decimal("100.50"),
                Decimal("100.49"),
                True,
                T0,
                T0 + 90_500,
                90.5,
            ),
            "801000000000002AAA": OrderRow(
                None, None, None, "Draft", None, "DRAFT", None, None, None, None, None, None
            ),
        },
        open_exceptions={("UNKNOWN_SKU", "SKU-2"), ("HANDOFF_OVERDUE", ORDER)},
        flow_stats={
            "sf.cdc": {
                "consumed": 5,
                "applied": 3,
                "duplicates": 1,
                "dead_lettered": 1,
                "ignored": 0,
            },
            "erp.public.items": {
                "consumed": 1,
                "applied": 1,
                "duplicates": 0,
                "dead_lettered": 0,
                "ignored": 0,
            },
        },  # fmt: skip
        late={"sf.cdc": 0, "erp.public.items": 0},
        dead_letters={("sf.cdc", 0, 4, "not_json", "{\ufffd")},
        now_ms=None,
    )


def test_load_views_normalizes_contract_types(tmp_path):
    path = tmp_path / "views.duckdb"
    con = duckdb.connect(str(path))
    con.execute(CONTRACT_DDL)
    con.execute(
        "INSERT INTO records VALUES ('salesforce', 'Order', ?, false, '{\"a\": 1.5, \"b\": true}',"
        " '1:2:3', TIMESTAMP '2025-11-28 06:00:00.123')",
        [ORDER],
    )
    con.execute(
        "INSERT INTO order_status VALUES (?, '1', NULL, NULL, 'Activated', NULL, 'BOOKED', 10.005,"
        " NULL, NULL, TIMESTAMP '2025-11-28 06:00:00', NULL, NULL, now())",
        [ORDER],
    )
    con.execute("INSERT INTO inventory_live VALUES ('S', 1, 2, 3, -4, NULL)")
    con.execute(
        "INSERT INTO reconciliation_exceptions VALUES ('AMOUNT_MISMATCH', 'x', 'd', NULL, NULL,"
        " true), ('UNKNOWN_SKU', 'S', 'd', NULL, NULL, false)"
    )
    con.execute("INSERT INTO flow_stats VALUES ('sf.cdc', 10, 6, 1, 4, 2, 1)")
    con.execute("INSERT INTO dead_letters VALUES ('sf.cdc', 3, 77, 'too_large', 'xyz')")
    con.close()

    views = load_views(path)
    assert views.records == {
        ("salesforce", "Order", ORDER): RecordRow(False, {"a": 1.5, "b": True}, "1:2:3", T0 + 123)
    }
    row = views.order_status[ORDER]
    assert row.sf_total == Decimal("10.01") and isinstance(row.sf_total, Decimal)  # DuckDB rounds
    assert row.activated_at_ms == T0 and row.invoiced_at_ms is None
    assert views.inventory_live == {"S": InventoryRow(1, 2, 3, -4)}
    assert views.open_exceptions == {("AMOUNT_MISMATCH", "x")}
    assert views.flow_stats == {
        "sf.cdc": {"consumed": 10, "applied": 6, "duplicates": 1, "dead_lettered": 2, "ignored": 1}
    }
    assert views.late == {"sf.cdc": 4}
    assert views.dead_letters == {("sf.cdc", 3, 77, "too_large", "xyz")}
    assert views.now_ms is None
    # opened read-only and closed again: a writer can open the file afterwards
    duckdb.connect(str(path)).close()


def test_round_trip_is_equal_and_ignores_informational_columns(tmp_path):
    views = sample_views()
    write_views(tmp_path / "a.duckdb", views, noise=0)
    write_views(tmp_path / "b.duckdb", views, noise=12345, closed=(("ORPHAN_ERP_ORDER", "S9"),))
    a, b = load_views(tmp_path / "a.duckdb"), load_views(tmp_path / "b.duckdb")
    assert diff(views, a) == []
    assert diff(a, b) == []
    assert b.late == {"sf.cdc": 12345, "erp.public.items": 12345}


def test_round_trip_of_reference_output(tmp_path):
    def raw(topic: str, offset: int, value: object) -> RawMessage:
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        return RawMessage(topic, 0, offset, None, data, -1)

    header = {
        "entityName": "Order",
        "recordIds": [ORDER],
        "changeType": "CREATE",
        "transactionKey": "t",
        "sequenceNumber": 1,
        "commitTimestamp": T0,
        "commitNumber": 1,
    }
    messages = [
        raw("sf.cdc", 0, {"payload": {"ChangeEventHeader": header, "Status": "Activated",
                                      "TotalAmount": 12.5, "Flag__c": False}}),
        raw("sf.cdc", 1, b"\xff"),
        raw("erp.public.sales_orders", 0, {
            "op": "c", "source": {"lsn": 7, "ts_ms": T0 + 61_000},
            "after": {"order_no": 5, "sf_order_id": ORDER, "status": "INVOICED",
                      "total_amount": "12.49"}}),
    ]  # fmt: skip
    expected = compute(messages, ReferenceConfig.default())
    assert expected.order_status[ORDER].quote_to_cash_s == 61.0
    path = tmp_path / "views.duckdb"
    write_views(path, expected)
    actual = load_views(path)
    assert diff(expected, actual) == []
    assert actual.order_status[ORDER].erp_order_no == "5"
    assert actual.dead_letters == {("sf.cdc", 0, 1, "not_json", "\ufffd")}


def test_diff_reports_each_kind_of_difference():
    expected = sample_views()
    actual = copy.deepcopy(expected)
    key = ("salesforce", "Order", ORDER)
    actual.records[key].fields["IsX"] = 1  # a number is not a boolean
    del actual.records[("erp", "items", '{"sku":"SKU-1"}')]
    actual.inventory_live["SKU-3"] = InventoryRow(1, 0, 0, 1)
    actual.order_status[ORDER] = expected.order_status[ORDER]._replace(
        quote_to_cash_s=90.501, erp_total=Decimal("100.48")
    )
    actual.open_exceptions = {("UNKNOWN_SKU", "SKU-2"), ("AMOUNT_MISMATCH", ORDER)}
    actual.flow_stats["sf.cdc"]["duplicates"] = 2
    actual.dead_letters = set()
    actual.late = {"sf.cdc": 99}
    actual.now_ms = T0
    expected.now_ms = T0 + 1

    lines = diff(expected, actual, limit=100)
    text = "\n".join(lines)
    assert (
        "records ('salesforce', 'Order', '801000000000001AAA'): fields: IsX expected True" in text
    )
    assert "records ('erp', 'items', '{\"sku\":\"SKU-1\"}'): missing" in text
    assert "inventory_live 'SKU-3': unexpected row" in text
    assert "quote_to_cash_s expected 90.5, got 90.501" in text
    assert "erp_total expected Decimal('100.49'), got Decimal('100.48')" in text
    assert "(HANDOFF_OVERDUE, 801000000000001AAA): expected open" in text
    assert "(AMOUNT_MISMATCH, 801000000000001AAA): open, not expected" in text
    assert "flow_stats sf.cdc: duplicates expected 1, got 2" in text
    assert "dead_letters: missing sf.cdc:0:4 not_json" in text
    assert "now_ms expected" in text
    assert "late" not in text
    assert len(lines) == 9  # one line per row, set member, topic or clock


def test_diff_tolerances_and_strictness():
    expected = sample_views()
    actual = copy.deepcopy(expected)
    actual.order_status[ORDER] = expected.order_status[ORDER]._replace(
        quote_to_cash_s=90.5 + 5e-7, sf_total=Decimal("100.5")
    )
    actual.records[("salesforce", "Order", ORDER)].fields["TotalAmount"] = Decimal("100.5")
    assert diff(expected, actual) != []  # a Decimal is not a JSON value
    actual.records[("salesforce", "Order", ORDER)].fields["TotalAmount"] = 100.5
    assert diff(expected, actual) == []
    none_vs_zero = copy.deepcopy(expected)
    none_vs_zero.order_status["801000000000002AAA"] = expected.order_status[
        "801000000000002AAA"
    ]._replace(quote_to_cash_s=0.0)
    assert len(diff(expected, none_vs_zero)) == 1
    flipped = copy.deepcopy(expected)
    flipped.records[("erp", "items", '{"sku":"SKU-1"}')] = expected.records[
        ("erp", "items", '{"sku":"SKU-1"}')
    ]._replace(deleted=False)
    assert diff(expected, flipped) == [
        "records ('erp', 'items', '{\"sku\":\"SKU-1\"}'): deleted expected True, got False"
    ]


def test_diff_flow_stats_missing_topic_equals_zero_row_and_limit():
    expected = sample_views()
    actual = copy.deepcopy(expected)
    actual.flow_stats["erp.public.inventory"] = dict.fromkeys(
        ("consumed", "applied", "duplicates", "dead_lettered", "ignored"), 0
    )
    assert diff(expected, actual) == []
    actual.inventory_live = {f"X{i}": InventoryRow(i, 0, 0, i) for i in range(30)}
    lines = diff(expected, actual, limit=5)
    assert len(lines) == 6 and lines[-1] == "... and 27 more differences"


def test_missing_table_or_column_is_an_error(tmp_path):
    path = tmp_path / "partial.duckdb"
    con = duckdb.connect(str(path))
    con.execute(CONTRACT_DDL)
    con.execute("DROP TABLE dead_letters")
    con.close()
    with pytest.raises(ValueError, match="missing table.*dead_letters"):
        load_views(path)

    path = tmp_path / "renamed.duckdb"
    con = duckdb.connect(str(path))
    con.execute(CONTRACT_DDL)
    con.execute("ALTER TABLE order_status RENAME COLUMN quote_to_cash_s TO q2c")
    con.close()
    with pytest.raises(ValueError, match="order_status"):
        load_views(path)
