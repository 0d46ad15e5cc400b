"""Small scenarios where the contract's wording decides, run through the real flow and
the reference model: both must give the same views, and the views what CONTRACT says."""

from __future__ import annotations

import json
from decimal import Decimal

import duckdb
import pytest
from flowkit import run_in_memory
from test_pathological_input import ITEMS, ORDER, SF, SO, T0, erp_event, sf_event, to_messages

from sferp.compare import diff
from sferp.reference import compute

MIN = 60_000
ITEM = "802000000000001AAA"
PRODUCT = "01t000000000001AAA"


def flow_and_reference(items, tmp_path):
    msgs = to_messages(items)
    views = run_in_memory(msgs, tmp_path / "views.duckdb")
    expected = compute(msgs)
    assert diff(expected, views) == []
    return views


def activated_order_with_one_item(product_code) -> list:
    return [
        (SF, PRODUCT, sf_event("CREATE", PRODUCT, T0, 0, "Product2", ProductCode=product_code)),
        (SF, ORDER, sf_event("CREATE", ORDER, T0, 1, Status="Activated", OrderNumber="1")),
        (
            SF,
            ITEM,
            sf_event(
                "CREATE", ITEM, T0, 2, "OrderItem", OrderId=ORDER, Product2Id=PRODUCT, Quantity=3
            ),
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("code, sku", [("S1", "S1"), (42, None), (True, None), ("", None)])
def test_only_a_text_product_code_names_a_sku(code, sku, tmp_path):
    """Salesforce sends ProductCode as text; anything else names no ERP sku."""
    items = activated_order_with_one_item(code)
    items.append((ITEMS, {"sku": 42}, erp_event("c", "items", {"sku": 42}, 5)))
    views = flow_and_reference(items, tmp_path)
    if sku is None:
        assert views.inventory_live == {}
    else:
        assert views.inventory_live[sku].sf_open_demand == 3


def test_a_truncate_in_the_erp_ages_hand_offs(tmp_path):
    items = activated_order_with_one_item("S1")
    truncate = {"op": "t", "source": {"table": "sales_orders", "ts_ms": T0 + 20 * MIN}}
    items.append((SO, None, truncate))
    views = flow_and_reference(items, tmp_path)
    assert ("HANDOFF_OVERDUE", ORDER) in views.open_exceptions
    assert views.flow_stats[SO]["ignored"] == 1


def test_another_entity_with_a_broken_header_is_ignored(tmp_path):
    lead = sf_event("CREATE", "00Q000000000001AAA", T0, 0, "Lead", LastName="x")
    del lead["payload"]["ChangeEventHeader"]["commitNumber"]
    lead["payload"]["ChangeEventHeader"]["changeType"] = "CONVERT"
    views = flow_and_reference([(SF, None, lead)], tmp_path)
    assert views.dead_letters == set() and views.flow_stats[SF]["ignored"] == 1


def test_nulled_fields_apply_without_changed_fields(tmp_path):
    create = sf_event("CREATE", ORDER, T0, 0, Status="Draft", EffectiveDate="2026-11-02")
    update = sf_event("UPDATE", ORDER, T0 + MIN, 0, Status="Draft")
    update["payload"]["ChangeEventHeader"]["changedFields"] = []
    update["payload"]["ChangeEventHeader"]["nulledFields"] = ["EffectiveDate"]
    views = flow_and_reference([(SF, ORDER, create), (SF, ORDER, update)], tmp_path)
    (fields,) = [r.fields for k, r in views.records.items() if k[1] == "Order"]
    assert fields["EffectiveDate"] is None, json.dumps(fields)


FIRST_MS, LAST_MS = -62_135_596_800_000, 253_402_300_799_999  # years 1 and 9999, UTC


@pytest.mark.parametrize(
    "ts, dead",
    [
        (LAST_MS, False),
        (LAST_MS + 1, True),
        (FIRST_MS, False),
        (FIRST_MS - 1, True),
        (10**17, True),  # DuckDB's TIMESTAMP refused this one in the commit
        (2**70, True),  # beyond 64 bits: re-read exactly, then out of range
    ],
)
def test_an_event_time_no_timestamp_column_holds_is_a_dead_letter(ts, dead, tmp_path):
    """Such a message stopped the flow at its views commit, on every restart."""
    product = sf_event("CREATE", PRODUCT, ts, 0, "Product2", ProductCode="S1")
    item = erp_event("c", "items", {"sku": "S1", "list_price": 1}, 7)
    item["source"]["ts_ms"] = ts
    order = sf_event("CREATE", ORDER, T0, 1, Status="Draft", OrderNumber="1")
    views = flow_and_reference(
        [(SF, PRODUCT, product), (ITEMS, {"sku": "S1"}, item), (SF, ORDER, order)], tmp_path
    )
    reasons = {(topic, reason) for topic, _, _, reason, _ in views.dead_letters}
    entities = {key[1] for key in views.records}
    if dead:
        assert reasons == {(SF, "bad_header"), (ITEMS, "bad_envelope")}
        assert entities == {"Order"}  # the valid change after them still applies
    else:
        assert reasons == set() and entities == {"Product2", "items", "Order"}


@pytest.mark.parametrize("ts, overdue", [(T0 + 20 * MIN, True), (10**17, False), (2**70, False)])
def test_an_ignored_event_moves_the_clock_only_with_a_time_in_range(ts, overdue, tmp_path):
    items = activated_order_with_one_item("S1")
    lead = sf_event("CREATE", "00Q000000000001AAA", ts, 0, "Lead", LastName="x")
    truncate = {"op": "t", "source": {"table": "sales_orders", "ts_ms": ts}}
    items += [(SF, None, lead), (SO, None, truncate)]
    views = flow_and_reference(items, tmp_path)
    assert (("HANDOFF_OVERDUE", ORDER) in views.open_exceptions) is overdue
    assert views.dead_letters == set()
    assert views.flow_stats[SF]["ignored"] == 1 and views.flow_stats[SO]["ignored"] == 1


@pytest.mark.parametrize(
    "text, ok", [("12", True), (" 12.50 ", True), ("1.2E+1", True), ("١٢", False), ("1_000", False)]
)
def test_a_decimal_string_is_plain_ascii_decimal_syntax(text, ok, tmp_path):
    """Python's Decimal() also read other scripts' digits and underscores as numbers."""
    row = {"sku": "S1", "warehouse": "W1", "qty_on_hand": text, "qty_allocated": 0}
    views = flow_and_reference(
        [
            (
                "erp.public.inventory",
                {"sku": "S1", "warehouse": "W1"},
                erp_event("c", "inventory", row, 3),
            )
        ],
        tmp_path,
    )
    if ok:
        assert views.dead_letters == set() and views.inventory_live["S1"].on_hand > 0
    else:
        assert {r[3] for r in views.dead_letters} == {"bad_number"} and views.inventory_live == {}


def test_json_numbers_are_the_exact_decimals_of_their_text(tmp_path):
    """CONTRACT §2: amounts are exact decimals parsed from the JSON text. orjson reads
    0.12500000000000001 as the double 0.125, which rounds to 0.12, not 0.13."""
    items = activated_order_with_one_item("S1")
    items[1][2]["payload"]["TotalAmount"] = "@TOTAL@"
    items[2][2]["payload"]["Quantity"] = "@QTY@"
    items.append((ITEMS, {"sku": "S1"}, erp_event("c", "items", {"sku": "S1"}, 5)))
    other = "801000000000002AAA"  # linked to the ERP order; ORDER keeps its open demand
    items.append((SF, other, sf_event("CREATE", other, T0, 3, Status="Activated")))
    before = {"order_no": "SO-1", "sf_order_id": other, "status": "OPEN", "total_amount": 7.5}
    after = dict(before, total_amount="@ERP@")
    update = erp_event("u", "sales_orders", after, 9)
    update["before"] = before
    items.append((SO, {"order_no": "SO-1"}, update))
    msgs = to_messages(items)
    texts = {
        b'"@TOTAL@"': b"0.12500000000000001",
        b'"@QTY@"': b"0.50000000000000001",
        b'"@ERP@"': b"1.2345678901234565e13",
    }
    for i, m in enumerate(msgs):
        value = m.value
        for placeholder, text in texts.items():
            value = value.replace(placeholder, text)
        msgs[i] = m._replace(value=value)
    views = run_in_memory(msgs, tmp_path / "views.duckdb")
    assert diff(compute(msgs), views) == []
    assert views.order_status[ORDER].sf_total == Decimal("0.13")  # the double: 0.12
    erp_total = views.order_status[other].erp_total
    assert erp_total == Decimal("12345678901234.56")  # ...565 exactly; the double ...564
    assert views.inventory_live["S1"].sf_open_demand == 1  # 0.5 would round to 0
    order = views.records[("salesforce", "Order", ORDER)].fields
    assert order["TotalAmount"] == "0.12500000000000001"  # kept as its text


@pytest.mark.parametrize("sf_order_id, shown", [(["x"], '["x"]'), (5, "5")])
def test_an_orphan_named_by_a_value_that_is_no_id_shows_that_value(sf_order_id, shown, tmp_path):
    """Such an ERP order names no Order, so it is an orphan; its detail showed an internal
    marker (a NUL character) before the value."""
    row = {"order_no": "SO-1", "sf_order_id": sf_order_id, "status": "OPEN", "total_amount": 1}
    items = [(SO, {"order_no": "SO-1"}, erp_event("c", "sales_orders", row, 4))]
    views = flow_and_reference(items, tmp_path)
    assert views.open_exceptions == {("ORPHAN_ERP_ORDER", "SO-1")}
    with duckdb.connect(str(tmp_path / "views.duckdb"), read_only=True) as con:
        (detail,) = con.execute("SELECT detail FROM reconciliation_exceptions").fetchone()
    assert detail == f"sf_order_id {shown} names no live Salesforce Order"
