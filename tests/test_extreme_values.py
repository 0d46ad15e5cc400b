"""Extreme values: numbers beyond what the typed view columns hold are `bad_number`
(docs/semantics.md §1), and integers beyond 64 bits stay exact in text columns and keys.

An amount must round into DECIMAL(18,2); a quantity is below 10^15 so its sums fit
BIGINT. Before this rule an Order with TotalAmount 1e26 stopped the flow (the orders
stage's rounding raised) and one of 12345678901234567.25 failed the views' commit.
"""

from __future__ import annotations

import base64
import json

import pytest
from flowkit import run_in_memory
from hypothesis import given, settings
from hypothesis import strategies as st
from sferp.operators.decode import DecodeConfig, decode_batch
from test_pathological_input import ORDER, SF, SO, T0, erp_event, sf_event, to_messages

from sferp import reference
from sferp.compare import diff
from sferp.events import Change, DeadLetter, RawMessage
from sferp.reference import compute

INV = "erp.public.inventory"
ROLES = {SF: "salesforce", INV: "inventory", SO: "sales_orders"}
CFG = DecodeConfig(topics=ROLES)
REF = reference.ReferenceConfig(topics=ROLES)

AMOUNT_EDGE = [
    (9999999999999998.0, "ok"),  # the largest double below 1e16
    ("9999999999999999.99", "ok"),
    ("9999999999999999.994", "ok"),  # rounds down to .99
    ("9999999999999999.995", "bad"),  # rounds (half-even) to 10^16
    ("-9999999999999999.995", "bad"),
    (10**16 - 1, "ok"),
    (10**16, "bad"),
    (1e16, "bad"),
    (1e26, "bad"),
    ("1E+16", "bad"),
    ("1e999999999", "bad"),
    (2**70, "bad"),  # beyond 64 bits: read exactly
    ("0.001", "ok"),
    (-5, "ok"),
]
QUANTITY_EDGE = [
    (10**15 - 1, "ok"),
    (10**15, "bad"),
    (-(10**15), "bad"),
    (999999999999999.9, "ok"),
    (1e15, "bad"),
    ("999999999999999.999999", "ok"),
    ("1000000000000000.0", "bad"),
    (2.5, "ok"),
]


def _sf(entity: str, rid: str, **fields) -> RawMessage:
    doc = sf_event("CREATE", rid, T0, 0, entity, **fields)
    return RawMessage(SF, 0, 7, json.dumps(rid).encode(), json.dumps(doc).encode(), -1)


def _erp(topic: str, table: str, row: dict) -> RawMessage:
    doc = erp_event("c", table, row, 1_000)
    return RawMessage(topic, 0, 7, None, json.dumps(doc).encode(), -1)


def _order(total) -> RawMessage:
    return _sf("Order", ORDER, Status="Draft", TotalAmount=total, OrderNumber="1")


def _item(qty) -> RawMessage:
    return _sf("OrderItem", "802000000000001AAA", OrderId=ORDER, Product2Id=None, Quantity=qty)


def _so(total) -> RawMessage:
    row = {"order_no": "SO-1", "sf_order_id": ORDER, "status": "OPEN", "total_amount": total}
    return _erp(SO, "sales_orders", row)


def _inv(on_hand, allocated=0) -> RawMessage:
    row = {"sku": "S1", "warehouse": "W1", "qty_on_hand": on_hand, "qty_allocated": allocated}
    return _erp(INV, "inventory", row)


def _outcome(msg: RawMessage) -> str:
    (out,) = decode_batch([msg], CFG)
    if type(out) is DeadLetter:
        assert out.reason == "bad_number", out.reason
        return "bad"
    assert type(out) is Change
    return "ok"


def _ref_outcome(msg: RawMessage) -> str:
    r = reference.decode(msg, REF)
    return "bad" if getattr(r, "reason", None) == "bad_number" else "ok"


@pytest.mark.parametrize("value, want", AMOUNT_EDGE)
def test_amounts_at_the_edge_of_decimal_18_2(value, want):
    assert _outcome(_order(value)) == want
    assert _outcome(_so(value)) == want
    assert _ref_outcome(_order(value)) == want and _ref_outcome(_so(value)) == want


@pytest.mark.parametrize("value, want", QUANTITY_EDGE)
def test_quantities_below_ten_to_the_fifteen(value, want):
    assert _outcome(_item(value)) == want
    assert _outcome(_inv(value)) == want
    assert _outcome(_inv(0, value)) == want
    assert _ref_outcome(_item(value)) == want and _ref_outcome(_inv(value)) == want


def test_fields_no_view_column_reads_keep_any_finite_number():
    big = _sf("OrderItem", "802000000000001AAA", OrderId=ORDER, Quantity=1, UnitPrice=1e300)
    assert _outcome(big) == "ok"
    row = {"sku": "S1", "description": "d", "list_price": "1e400", "active": True}
    (out,) = decode_batch([_erp("erp.public.items", "items", row)], DecodeConfig(
        topics={"erp.public.items": "items"}))  # fmt: skip
    assert type(out) is Change


def test_a_base64_decimal_is_checked_once_decoded():
    def msg(unscaled: int) -> RawMessage:
        field = {"type": "bytes", "optional": True, "name": "org.apache.kafka.connect.data.Decimal",
                 "version": 1, "parameters": {"scale": "2"}, "field": "total_amount"}  # fmt: skip
        value = {"type": "struct", "fields": [field], "optional": True, "field": "after"}
        schema = {"type": "struct", "fields": [value], "optional": False}
        n = (unscaled.bit_length() + 8) // 8
        text = base64.b64encode(unscaled.to_bytes(n, "big", signed=True)).decode()
        row = {"order_no": "SO-1", "sf_order_id": ORDER, "status": "OPEN", "total_amount": text}
        doc = {"schema": schema, "payload": erp_event("c", "sales_orders", row, 1_000)}
        return RawMessage(SO, 0, 7, None, json.dumps(doc).encode(), -1)

    assert _outcome(msg(10**18 - 1)) == "ok"  # 9999999999999999.99
    assert _outcome(msg(10**18)) == "bad"  # 10^16.00
    assert _ref_outcome(msg(10**18 - 1)) == "ok" and _ref_outcome(msg(10**18)) == "bad"


_numbers = st.one_of(
    st.integers(-(10**17), 10**17),
    st.floats(-1e17, 1e17),
    st.decimals(min_value=-(10**17), max_value=10**17, places=3).map(str),
    st.sampled_from([10**15, 10**16, 10**15 - 1, 10**16 - 1, 1e15, 1e16]),
    st.sampled_from(["9999999999999999.995", "9999999999999999.985", "999999999999999.9999"]),
)


@settings(max_examples=300, deadline=None)
@given(_numbers, st.sampled_from([_order, _item, _so, _inv]))
def test_the_decoder_and_the_reference_agree_on_any_number(value, build):
    msg = build(value)
    assert _outcome(msg) == _ref_outcome(msg)


def test_the_flow_keeps_running_and_dead_letters_the_out_of_range_events(tmp_path):
    """Huge values end in `dead_letters`; the views hold everything else, as the reference."""
    huge = sf_event("CREATE", ORDER, T0, 0, Status="Draft", TotalAmount=1e26, OrderNumber="1")
    items = [(SF, ORDER, huge)]
    other = "801000000000002AAA"
    items.append((SF, other, sf_event("CREATE", other, T0 + 1, 0, Status="Draft",
                                      TotalAmount="12.50", OrderNumber="2")))  # fmt: skip
    row = {"order_no": "SO-1", "sf_order_id": other, "customer_no": "C1", "status": "OPEN",
           "total_amount": "12345678901234567.25", "currency": "USD"}  # fmt: skip
    items.append((SO, {"order_no": "SO-1"}, erp_event("c", "sales_orders", row, 50_000)))
    msgs = to_messages(items)
    views = run_in_memory(msgs, tmp_path / "v.duckdb")
    assert {(d[0], d[3]) for d in views.dead_letters} == {(SF, "bad_number"), (SO, "bad_number")}
    assert list(views.order_status) == [other]
    assert diff(compute(msgs), views) == []


def test_integers_beyond_64_bits_in_text_columns_and_keys(tmp_path):
    """orjson neither writes nor exactly reads them: a Status of [2**64] used to stop the flow,
    and an orphan ERP order numbered 2**70 was closed under the key "1.1805916207174113e+21"."""
    big = 2**70
    items = [
        (SO, {"order_no": big}, erp_event("c", "sales_orders", {
            "order_no": big, "sf_order_id": ORDER, "status": "OPEN", "total_amount": 1}, 10)),
        (SF, ORDER, sf_event("CREATE", ORDER, T0 + 5, 0, Status=[2**64], TotalAmount=1,
                             OrderNumber=big)),
    ]  # fmt: skip
    before = run_in_memory(to_messages(items[:1]), tmp_path / "a.duckdb")
    assert before.open_exceptions == {("ORPHAN_ERP_ORDER", str(big))}
    msgs = to_messages(items)
    views = run_in_memory(msgs, tmp_path / "b.duckdb", batch=1)  # opened, then resolved
    assert views.open_exceptions == set(), "the orphan is resolved under its own key"
    row = views.order_status[ORDER]
    assert f"[{2**64}]" in row and str(big) in row
    assert diff(compute(msgs), views) == []
