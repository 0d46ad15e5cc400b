"""Hand-written cases pinning each rule of CONTRACT §2 and docs/semantics.md in the reference."""

from __future__ import annotations

import base64
import itertools
import json
from collections import Counter
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sferp.compare import STAT_COLUMNS, InventoryRow, Views, diff
from sferp.events import RawMessage
from sferp.reference import ReferenceConfig, compute, normalize_id

T0 = 1_764_309_600_000  # 2025-11-28T06:00:00Z
MIN = 60_000
SF = "sf.cdc"
ITEMS = "erp.public.items"
INV = "erp.public.inventory"
SO = "erp.public.sales_orders"
TOPIC_OF = {"items": ITEMS, "inventory": INV, "sales_orders": SO}

ORDER = "801000000000001AAA"
ORDER2 = "801000000000002AAA"
ITEM = "802000000000001AAA"
ITEM2 = "802000000000002AAA"
PRODUCT = "01t000000000001AAA"
PRODUCT2 = "01t000000000002AAA"
ACCOUNT = "001000000000001AAA"

SF_FIELDS = {
    "Product2": ("ProductCode", "Name", "IsActive"),
    "Account": ("Name", "ERP_Customer_Number__c"),
    "Order": ("AccountId", "OrderNumber", "Status", "TotalAmount", "EffectiveDate"),
    "OrderItem": ("OrderId", "Product2Id", "Quantity", "UnitPrice"),
}


def v(ms: int) -> str:
    """records.version of a Salesforce event built with cnum=1, seq=1."""
    return f"{ms}:1:1"


class Feed:
    """Builds raw messages in arrival order, numbering offsets per topic."""

    def __init__(self) -> None:
        self.messages: list[RawMessage] = []
        self._offsets: Counter[str] = Counter()
        self._tx = itertools.count(1)

    def raw(self, topic: str, value: bytes | None, key: bytes | None = None) -> RawMessage:
        msg = RawMessage(topic, 0, self._offsets[topic], key, value, -1)
        self._offsets[topic] += 1
        self.messages.append(msg)
        return msg

    def again(self, msg: RawMessage) -> RawMessage:
        """A redelivered copy of a message (new offset, same bytes)."""
        return self.raw(msg.topic, msg.value, msg.key)

    def sf(
        self,
        entity: str,
        change_type: str,
        ids: str | list[str],
        ts: int,
        *,
        tx: str | None = None,
        cnum: int = 1,
        seq: int = 1,
        changed: list[str] | None = None,
        nulled: list[str] | None = None,
        form: str = "wrapped",
        header: dict | None = None,
        **fields: object,
    ) -> RawMessage:
        ids = [ids] if isinstance(ids, str) else ids
        head = {
            "entityName": entity,
            "recordIds": ids,
            "changeType": change_type,
            "changeOrigin": "com/salesforce/api/rest/62.0",
            "transactionKey": tx or f"tx-{next(self._tx)}",
            "sequenceNumber": seq,
            "commitTimestamp": ts,
            "commitNumber": cnum,
            "commitUser": "005000000000001AAA",
            "changedFields": (list(fields) if change_type == "UPDATE" else [])
            if changed is None
            else changed,
            "nulledFields": nulled or [],
            "diffFields": [],
        }
        head.update(header or {})
        if form == "wrapped":
            value = {
                "replayId": "0000000000004711",
                "payload": {"ChangeEventHeader": head, **fields},
            }
        elif form == "bare":
            value = {"ChangeEventHeader": head, **fields}
        else:  # Confluent flat: every field of the object present, null when unchanged
            value = {"Id": ids[0] if ids else None, "ReplayId": "4711", "ChangeEventHeader": head}
            value.update(dict.fromkeys(SF_FIELDS.get(entity, ()), None))
            value.update(fields)
            value.update({"_ObjectType": f"{entity}ChangeEvent", "_EventType": "x"})
        return self.raw(SF, json.dumps(value).encode())

    def erp(
        self,
        table: str,
        op: str,
        row: dict | None,
        *,
        lsn: int,
        ts: int,
        key: dict | None = None,
        schema: dict | None = None,
        before: dict | None = None,
    ) -> RawMessage:
        envelope = {
            "before": row if op == "d" else before,
            "after": None if op == "d" else row,
            "source": {
                "version": "2.7.3.Final",
                "connector": "postgresql",
                "name": "erp",
                "ts_ms": ts,
                "snapshot": "false",
                "db": "erp",
                "schema": "public",
                "table": table,
                "txId": lsn,
                "lsn": lsn,
            },
            "op": op,
            "ts_ms": ts + 123,
        }
        value = envelope if schema is None else {"schema": schema, "payload": envelope}
        raw_key = None if key is None else json.dumps(key).encode()
        return self.raw(TOPIC_OF[table], json.dumps(value).encode(), raw_key)

    def views(self, config: ReferenceConfig | None = None) -> Views:
        return run(self.messages, config)


def run(messages: list[RawMessage], config: ReferenceConfig | None = None) -> Views:
    """compute(), checking the flow_stats identity every time."""
    views = compute(messages, config)
    counted = Counter(m.topic for m in messages)
    for topic, stats in views.flow_stats.items():
        assert stats["consumed"] == counted[topic]
        assert stats["consumed"] == (
            stats["applied"] + stats["duplicates"] + stats["dead_lettered"] + stats["ignored"]
        )
    return views


def rec(views: Views, entity: str, key: str):
    source = "erp" if entity in TOPIC_OF else "salesforce"
    return views.records[(source, entity, key)]


def stats(views: Views, topic: str = SF) -> dict[str, int]:
    return views.flow_stats[topic]


def reasons(views: Views) -> list[str]:
    return sorted(row[3] for row in views.dead_letters)


def b64(unscaled: int) -> str:
    size = (unscaled.bit_length() + 8) // 8
    return base64.b64encode(unscaled.to_bytes(size, "big", signed=True)).decode()


def decimal_schema(column: str, scale: int) -> dict:
    """A Debezium envelope schema declaring one column as a Kafka Connect Decimal."""
    row = {
        "type": "struct",
        "optional": True,
        "fields": [
            {"type": "string", "optional": False, "field": "sku"},
            {
                "type": "bytes",
                "optional": True,
                "name": "org.apache.kafka.connect.data.Decimal",
                "version": 1,
                "parameters": {"scale": str(scale), "connect.decimal.precision": "10"},
                "field": column,
            },
        ],
    }
    return {
        "type": "struct",
        "fields": [{**row, "field": "before"}, {**row, "field": "after"}],
        "name": "erp.public.items.Envelope",
    }


# --- Salesforce Ids --------------------------------------------------------------------------


def test_normalize_id_known_pairs():
    assert normalize_id("001A0000006Vm9r") == "001A0000006Vm9rIAC"
    # chunks 00150 / 00000 / Gv7qJ: upper-case at positions 0 and 4 of the last -> 17 -> R
    assert normalize_id("0015000000Gv7qJ") == "0015000000Gv7qJAAR"
    assert normalize_id("001A0000006Vm9rIAC") == "001A0000006Vm9rIAC"
    assert normalize_id("abc") == "abc"
    assert normalize_id("001A0000006Vm9-") == "001A0000006Vm9-"
    assert normalize_id(None) is None


def test_15_char_ids_are_normalised_in_keys_references_and_links():
    f = Feed()
    f.sf("Order", "CREATE", "801000000000003", T0, AccountId="001A0000006Vm9r", Status="Draft")
    f.sf("OrderItem", "CREATE", "802000000000003", T0, OrderId="801000000000003", Quantity=1)
    f.erp("sales_orders", "c", {"order_no": "SO-1", "sf_order_id": "801000000000003"}, lsn=1, ts=T0)
    views = f.views()
    order_id = normalize_id("801000000000003")
    assert order_id == "801000000000003AAA"
    assert rec(views, "Order", order_id).fields["AccountId"] == "001A0000006Vm9rIAC"
    assert rec(views, "OrderItem", "802000000000003AAA").fields["OrderId"] == order_id
    assert views.order_status[order_id].erp_order_no == "SO-1"
    assert views.order_status[order_id].account_id == "001A0000006Vm9rIAC"
    # the ERP row is stored as sent
    assert rec(views, "sales_orders", '{"order_no":"SO-1"}').fields["sf_order_id"] == (
        "801000000000003"
    )
    assert not views.open_exceptions


# --- Salesforce merge ------------------------------------------------------------------------


def test_field_level_merge_keeps_newest_value_per_field():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, OrderNumber="00000100", Status="Draft", TotalAmount=100)
    f.sf("Order", "UPDATE", ORDER, T0 + 3 * MIN, Status="Activated")
    # a late partial update, older than the Status change, newer than the CREATE
    f.sf("Order", "UPDATE", ORDER, T0 + 2 * MIN, Status="Draft", TotalAmount="120.50")
    views = f.views()
    row = rec(views, "Order", ORDER)
    assert row.fields["Status"] == "Activated"
    assert row.fields["TotalAmount"] == "120.50"
    assert row.fields["OrderNumber"] == "00000100"
    assert row.version == v(T0 + 3 * MIN) and row.event_time_ms == T0 + 3 * MIN
    assert not row.deleted
    assert views.order_status[ORDER].sf_total == Decimal("120.50")


def test_order_key_is_timestamp_then_commit_number_then_sequence():
    f = Feed()
    f.sf("Order", "UPDATE", ORDER, T0, cnum=9, seq=9, Status="A")
    f.sf("Order", "UPDATE", ORDER, T0 + 1, cnum=1, seq=1, Status="B")  # newer timestamp wins
    f.sf("Order", "UPDATE", ORDER, T0, cnum=9, seq=9, TotalAmount=1)
    f.sf("Order", "UPDATE", ORDER, T0 + 5, cnum=2, seq=1, OrderNumber="x")
    f.sf("Order", "UPDATE", ORDER, T0 + 5, cnum=1, seq=7, OrderNumber="y")  # lower commitNumber
    f.sf("Order", "UPDATE", ORDER, T0 + 5, cnum=2, seq=0, OrderNumber="z")  # lower sequence
    row = rec(f.views(), "Order", ORDER)
    assert row.fields["Status"] == "B"
    assert row.fields["OrderNumber"] == "x"
    assert row.version == f"{T0 + 5}:2:1"


def test_equal_order_keys_resolved_by_larger_identity_in_any_arrival_order():
    for txs in (("tx-a", "tx-b"), ("tx-b", "tx-a")):
        f = Feed()
        for tx in txs:
            f.sf("Order", "UPDATE", ORDER, T0, tx=tx, Status=tx)
        assert rec(f.views(), "Order", ORDER).fields["Status"] == "tx-b"


def test_create_sets_absent_contract_fields_to_null():
    f = Feed()
    f.sf("Order", "UPDATE", ORDER, T0, TotalAmount=5, Description="old")
    f.sf("Order", "CREATE", ORDER, T0 + MIN, OrderNumber="7", Custom__c=None)
    row = rec(f.views(), "Order", ORDER)
    assert row.fields == {
        "OrderNumber": "7",
        "Custom__c": None,
        "AccountId": None,
        "Status": None,
        "TotalAmount": None,
        "EffectiveDate": None,
        "Description": "old",  # not a contract field: untouched by the CREATE
    }


def test_delete_then_older_update_stays_deleted_but_merges_fields():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated", TotalAmount=10)
    f.sf("Order", "DELETE", ORDER, T0 + 2 * MIN)
    f.sf("Order", "UPDATE", ORDER, T0 + MIN, TotalAmount=11)
    views = f.views()
    row = rec(views, "Order", ORDER)
    assert row.deleted
    assert row.fields["TotalAmount"] == 11 and row.fields["Status"] == "Activated"
    assert row.version == v(T0 + 2 * MIN)
    assert ORDER not in views.order_status
    # a newer update after the delete does not bring it back either
    f.sf("Order", "UPDATE", ORDER, T0 + 3 * MIN, TotalAmount=12)
    views = f.views()
    assert rec(views, "Order", ORDER).deleted and ORDER not in views.order_status


def test_delete_only_record_has_no_fields():
    f = Feed()
    f.sf("Account", "DELETE", ACCOUNT, T0)
    row = rec(f.views(), "Account", ACCOUNT)
    assert row.deleted and row.fields == {} and row.version == v(T0)


def test_undelete_restores_and_older_undelete_does_not():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Draft", OrderNumber="1")
    f.sf("Order", "DELETE", ORDER, T0 + MIN)
    f.sf("Order", "UNDELETE", ORDER, T0 + 2 * MIN, Status="Activated")
    views = f.views()
    row = rec(views, "Order", ORDER)
    assert not row.deleted
    assert row.fields["Status"] == "Activated" and row.fields["OrderNumber"] is None
    assert views.order_status[ORDER].sf_status == "Activated"

    g = Feed()
    g.sf("Order", "CREATE", ORDER, T0, Status="Draft")
    g.sf("Order", "DELETE", ORDER, T0 + 2 * MIN)
    g.sf("Order", "UNDELETE", ORDER, T0 + MIN, Status="Draft")
    assert rec(g.views(), "Order", ORDER).deleted


def test_multi_record_event_applies_to_each_and_counts_once():
    f = Feed()
    msg = f.sf("Order", "UPDATE", [ORDER2, ORDER], T0, Status="Cancelled")
    f.again(msg)
    views = f.views()
    assert rec(views, "Order", ORDER).fields == {"Status": "Cancelled"}
    assert rec(views, "Order", ORDER2).fields == {"Status": "Cancelled"}
    assert stats(views) == {
        "consumed": 2,
        "applied": 1,
        "duplicates": 1,
        "dead_lettered": 0,
        "ignored": 0,
    }


@pytest.mark.parametrize("form", ["wrapped", "bare", "flat"])
def test_all_three_salesforce_forms(form):
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, form=form, OrderNumber="1", Status="Draft", TotalAmount=9)
    # flat form: unchanged fields arrive as null and must not be applied
    f.sf("Order", "UPDATE", ORDER, T0 + MIN, form=form, changed=["Status"], Status="Activated")
    views = f.views()
    row = rec(views, "Order", ORDER)
    assert row.fields["Status"] == "Activated"
    assert row.fields["TotalAmount"] == 9 and row.fields["OrderNumber"] == "1"
    assert set(row.fields) == set(SF_FIELDS["Order"])  # no metadata keys
    assert views.order_status[ORDER].stage == "BOOKED"
    assert stats(views)["applied"] == 2


def test_update_changes_exactly_changed_and_nulled_fields():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, OrderNumber="1", Status="Draft", TotalAmount=9)
    f.sf(
        "Order",
        "UPDATE",
        ORDER,
        T0 + MIN,
        changed=["Status", "EffectiveDate"],
        nulled=["TotalAmount"],
        Status="Activated",
        OrderNumber="not a change",
    )
    row = rec(f.views(), "Order", ORDER)
    assert row.fields["Status"] == "Activated"
    assert row.fields["EffectiveDate"] is None  # named but absent from the body
    assert row.fields["TotalAmount"] is None
    assert row.fields["OrderNumber"] == "1"


@pytest.mark.parametrize("changed", [[], "missing"])
def test_update_without_changed_fields_applies_non_null_body_fields(changed):
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, OrderNumber="1", Status="Draft", TotalAmount=9)
    msg = f.sf("Order", "UPDATE", ORDER, T0 + MIN, changed=[], Status="Activated", TotalAmount=None)
    if changed == "missing":
        obj = json.loads(msg.value)
        del obj["payload"]["ChangeEventHeader"]["changedFields"]
        f.messages[-1] = msg._replace(value=json.dumps(obj).encode())
    row = rec(f.views(), "Order", ORDER)
    assert row.fields["Status"] == "Activated" and row.fields["TotalAmount"] == 9


def test_nulled_fields_are_changes_even_without_changed_fields():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, OrderNumber="1", Status="Draft", EffectiveDate="2026-11-02")
    f.sf("Order", "UPDATE", ORDER, T0 + MIN, changed=[], nulled=["EffectiveDate"], Status="Draft")
    row = rec(f.views(), "Order", ORDER)
    assert row.fields["EffectiveDate"] is None and row.fields["OrderNumber"] == "1"


# --- ERP merge -------------------------------------------------------------------------------


def test_erp_highest_lsn_image_wins():
    f = Feed()
    key = {"sku": "SKU-1", "warehouse": "DAL1"}
    f.erp("inventory", "u", {**key, "qty_on_hand": 7, "qty_allocated": 1}, lsn=10, ts=T0 + MIN)
    f.erp("inventory", "c", {**key, "qty_on_hand": 5, "qty_allocated": 0}, lsn=5, ts=T0)
    views = f.views()
    row = rec(views, "inventory", '{"sku":"SKU-1","warehouse":"DAL1"}')
    assert row.fields["qty_on_hand"] == 7 and row.version == "10"
    assert row.event_time_ms == T0 + MIN and not row.deleted
    assert views.inventory_live == {"SKU-1": InventoryRow(7, 1, 0, 6)}


def test_erp_delete_with_highest_lsn_removes_row_and_keeps_fields():
    f = Feed()
    key = {"sku": "SKU-1", "warehouse": "DAL1"}
    f.erp("inventory", "c", {**key, "qty_on_hand": 5, "qty_allocated": 0}, lsn=5, ts=T0)
    f.erp("inventory", "d", key, lsn=20, ts=T0 + 2 * MIN)
    f.erp("inventory", "u", {**key, "qty_on_hand": 9, "qty_allocated": 0}, lsn=10, ts=T0 + MIN)
    views = f.views()
    row = rec(views, "inventory", '{"sku":"SKU-1","warehouse":"DAL1"}')
    assert row.deleted and row.version == "20" and row.event_time_ms == T0 + 2 * MIN
    assert row.fields["qty_on_hand"] == 9  # the highest non-delete image
    assert views.inventory_live == {}


def test_erp_delete_only_keeps_before_image():
    f = Feed()
    f.erp("items", "d", {"sku": "SKU-1", "description": "x"}, lsn=3, ts=T0)
    row = rec(f.views(), "items", '{"sku":"SKU-1"}')
    assert row.deleted and row.fields == {"sku": "SKU-1", "description": "x"}


def test_debezium_ops_snapshot_tombstone_truncate_message():
    f = Feed()
    f.erp("items", "r", {"sku": "SKU-1", "list_price": 3}, lsn=1, ts=T0)
    f.raw(ITEMS, None, b'{"sku":"SKU-1"}')  # tombstone
    f.erp("items", "t", {"sku": "SKU-1"}, lsn=2, ts=T0 + 10 * MIN)
    f.erp("items", "m", {"sku": "SKU-1"}, lsn=3, ts=T0 + 10 * MIN)
    f.erp("items", "x", {"sku": "SKU-1"}, lsn=4, ts=T0 + 20 * MIN)
    views = f.views()
    assert not rec(views, "items", '{"sku":"SKU-1"}').deleted
    assert stats(views, ITEMS) == {
        "consumed": 5,
        "applied": 1,
        "duplicates": 0,
        "dead_lettered": 1,
        "ignored": 3,
    }
    assert reasons(views) == ["bad_envelope"]
    # t and m move the clock (ignored events, not dead letters); tombstones and
    # dead letters do not.
    assert views.now_ms == T0 + 10 * MIN


def test_an_erp_truncate_ages_hand_offs_like_any_event():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated")
    f.erp("items", "m", None, lsn=1, ts=T0 + 10 * MIN)
    assert f.views().open_exceptions == set()
    f.erp("items", "t", None, lsn=2, ts=T0 + 20 * MIN)
    views = f.views()
    assert views.now_ms == T0 + 20 * MIN
    assert views.open_exceptions == {("HANDOFF_OVERDUE", ORDER)}


def test_erp_primary_key_from_message_key_plain_and_schema_wrapped():
    f = Feed()
    f.erp("sales_orders", "d", {"status": "OPEN"}, lsn=4, ts=T0, key={"order_no": "SO-1"})
    wrapped = {"schema": {"type": "struct"}, "payload": {"order_no": 42}}
    f.erp("sales_orders", "u", {"order_no": None, "status": "OPEN"}, lsn=5, ts=T0, key=wrapped)
    f.erp("sales_orders", "u", {"status": "OPEN"}, lsn=6, ts=T0)
    f.erp("sales_orders", "u", {"order_no": 1.5}, lsn=7, ts=T0, key={"order_no": "SO-2"})
    f.erp("sales_orders", "u", {"order_no": True}, lsn=8, ts=T0)
    f.raw(SO, f.messages[2].value, b"not json")
    views = f.views()
    assert rec(views, "sales_orders", '{"order_no":"SO-1"}').deleted
    assert not rec(views, "sales_orders", '{"order_no":42}').deleted
    assert reasons(views) == ["missing_primary_key"] * 4


def test_erp_decimals_numbers_strings_and_base64():
    f = Feed()
    schema = decimal_schema("list_price", 2)
    f.erp("items", "c", {"sku": "A", "list_price": b64(1250)}, lsn=1, ts=T0, schema=schema)
    f.erp("items", "c", {"sku": "B", "list_price": b64(-5)}, lsn=2, ts=T0, schema=schema)
    f.erp("items", "c", {"sku": "C", "list_price": "12.5"}, lsn=3, ts=T0)
    f.erp("items", "c", {"sku": "D", "list_price": 12.5}, lsn=4, ts=T0)
    f.erp("items", "c", {"sku": "E", "list_price": None}, lsn=5, ts=T0)
    f.erp("items", "c", {"sku": "F", "list_price": b64(1250)}, lsn=6, ts=T0)  # no schema
    f.erp("items", "c", {"sku": "G", "list_price": "abc"}, lsn=7, ts=T0, schema=schema)
    f.erp("items", "c", {"sku": "H", "list_price": True}, lsn=8, ts=T0)
    f.erp("items", "c", {"sku": "I", "list_price": "NaN"}, lsn=9, ts=T0)
    f.erp("items", "c", {"sku": "J", "list_price": [1]}, lsn=10, ts=T0)
    f.erp("items", "d", {"sku": "K", "list_price": "junk"}, lsn=11, ts=T0)  # deletes unchecked
    views = f.views()
    price = {k[2]: r.fields["list_price"] for k, r in views.records.items()}
    assert price == {
        '{"sku":"A"}': "12.50",
        '{"sku":"B"}': "-0.05",
        '{"sku":"C"}': "12.5",
        '{"sku":"D"}': 12.5,
        '{"sku":"E"}': None,
        '{"sku":"K"}': "junk",
    }
    assert reasons(views) == ["bad_number"] * 5


def test_inventory_numeric_columns_checked_in_order_and_sales_order_totals():
    f = Feed()
    f.erp("inventory", "c", {"sku": "A", "warehouse": "W", "qty_allocated": "x"}, lsn=1, ts=T0)
    f.erp("sales_orders", "c", {"order_no": "S", "total_amount": {"v": 1}}, lsn=2, ts=T0)
    f.erp("sales_orders", "c", {"order_no": "T", "total_amount": "1e15"}, lsn=3, ts=T0)
    assert reasons(f.views()) == ["bad_number"] * 2  # 1e15 fits DECIMAL(18,2)
    f.erp("sales_orders", "c", {"order_no": "U", "total_amount": "1e400"}, lsn=4, ts=T0)
    assert reasons(f.views()) == ["bad_number"] * 3  # a finite decimal, but beyond the column


def test_big_integers_beyond_64_bits_are_exact():
    f = Feed()
    lsn = 2**70 + 1
    f.erp("items", "c", {"sku": "A", "list_price": 10**30 + 1}, lsn=lsn, ts=T0)
    row = rec(f.views(), "items", '{"sku":"A"}')
    assert row.version == str(lsn) and row.fields["list_price"] == 10**30 + 1


# --- Salesforce numbers ----------------------------------------------------------------------


def test_salesforce_numbers_and_bad_number():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, TotalAmount="abc")
    f.sf("OrderItem", "CREATE", ITEM, T0, Quantity=True)
    f.sf("OrderItem", "UPDATE", ITEM, T0, UnitPrice="Infinity")
    f.sf("OrderItem", "UPDATE", ITEM2, T0, Quantity=" 2.5 ", UnitPrice=3)
    f.sf("OrderItem", "UPDATE", ITEM2, T0 + 1, changed=["UnitPrice"], UnitPrice=4, Quantity="x")
    f.sf("Product2", "CREATE", PRODUCT, T0, ProductCode="A", Quantity="not checked here")
    views = f.views()
    assert reasons(views) == ["bad_number"] * 3
    assert rec(views, "OrderItem", ITEM2).fields == {"Quantity": " 2.5 ", "UnitPrice": 4}
    assert ("salesforce", "Order", ORDER) not in views.records


def test_rounding_half_even():
    f = Feed()
    amounts = {ORDER: 10.005, ORDER2: "10.015", "801000000000003AAA": "10.025"}
    for order_id, amount in amounts.items():
        f.sf("Order", "CREATE", order_id, T0, Status="Draft", TotalAmount=amount)
    f.erp("sales_orders", "c", {"order_no": "1", "sf_order_id": ORDER, "total_amount": "10.015"},
          lsn=1, ts=T0)  # fmt: skip
    views = f.views()
    totals = {k: r.sf_total for k, r in views.order_status.items()}
    assert totals == {
        ORDER: Decimal("10.00"),
        ORDER2: Decimal("10.02"),
        "801000000000003AAA": Decimal("10.02"),
    }
    assert views.order_status[ORDER].erp_total == Decimal("10.02")


# --- Dead letters ----------------------------------------------------------------------------


def _header(**changes: object) -> dict:
    head = {
        "entityName": "Order",
        "recordIds": [ORDER],
        "changeType": "UPDATE",
        "transactionKey": "t",
        "sequenceNumber": 1,
        "commitTimestamp": T0,
        "commitNumber": 1,
    }
    head.update(changes)
    return {key: value for key, value in head.items() if value != "<drop>"}


DEAD_SF = [
    (b"{", "not_json"),
    (b"\xff{}", "not_json"),
    (b'{"a": NaN}', "not_json"),
    (b'{"a": Infinity}', "not_json"),
    (b"\xef\xbb\xbf{}", "not_json"),
    (b"", "not_json"),
    (b'{"a": "\\ud800"}', "not_json"),  # an escaped lone surrogate is not UTF-8 text
    (b'{"\\udc00": 1}', "not_json"),
    (b'{"a": "\\ud83d\\ude00", "b": 1e400}', "missing_header"),  # a pair is fine
    (b"[1]", "not_an_object"),
    (b'"x"', "not_an_object"),
    (b"{}", "missing_header"),
    (b'{"payload": {"Status": "x"}}', "missing_header"),
    (b'{"ChangeEventHeader": null}', "missing_header"),
    (b'{"ChangeEventHeader": []}', "missing_header"),
    (json.dumps({"ChangeEventHeader": _header(entityName=5)}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(changeType="MERGE")}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(changeType=["UPDATE"])}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(commitTimestamp="1")}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(commitTimestamp=1.0)}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(commitTimestamp=True)}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(sequenceNumber=None)}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(commitNumber="<drop>")}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(transactionKey=1)}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(recordIds=[])}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(recordIds=ORDER)}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(recordIds=[1])}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(changedFields="Status")}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(nulledFields=[None])}).encode(), "bad_header"),
    (json.dumps({"ChangeEventHeader": _header(changedFields=None)}).encode(), "bad_header"),
]


def test_an_unused_entity_with_a_broken_header_is_ignored_not_dead_lettered():
    f = Feed()
    f.raw(
        SF, json.dumps({"ChangeEventHeader": _header(entityName="Contact", recordIds=[])}).encode()
    )
    f.raw(
        SF,
        json.dumps({"ChangeEventHeader": _header(entityName="Lead", commitTimestamp="x")}).encode(),
    )
    views = f.views()
    assert views.dead_letters == set()
    assert stats(views)["ignored"] == 2
    assert views.now_ms == T0  # the Contact's integer commitTimestamp; the Lead has none


@pytest.mark.parametrize(("value", "reason"), DEAD_SF)
def test_salesforce_dead_letter_reasons(value, reason):
    f = Feed()
    f.raw(SF, value)
    views = f.views()
    assert views.dead_letters == {(SF, 0, 0, reason, value.decode("utf-8", "replace"))}
    assert stats(views)["dead_lettered"] == 1
    assert views.now_ms is None and views.records == {}


def _envelope(**changes: object) -> bytes:
    env = {"op": "c", "after": {"sku": "A"}, "source": {"lsn": 1, "ts_ms": T0}}
    env.update(changes)
    return json.dumps(env).encode()


DEAD_ERP = [
    (_envelope(op=None), "bad_envelope"),
    (_envelope(op="x"), "bad_envelope"),
    (_envelope(source=None), "bad_envelope"),
    (_envelope(source={"lsn": "1", "ts_ms": T0}), "bad_envelope"),
    (_envelope(source={"lsn": 1}), "bad_envelope"),
    (_envelope(source={"lsn": 1, "ts_ms": False}), "bad_envelope"),
    (_envelope(after=None), "bad_envelope"),
    (_envelope(after=[]), "bad_envelope"),
    (_envelope(op="d", before=None), "bad_envelope"),
    (_envelope(after={"list_price": 1}), "missing_primary_key"),
    (_envelope(after={"sku": "A", "list_price": "1,5"}), "bad_number"),
    (json.dumps({"schema": {}, "payload": None, "op": "c"}).encode(), "bad_envelope"),
]


@pytest.mark.parametrize(("value", "reason"), DEAD_ERP)
def test_erp_dead_letter_reasons(value, reason):
    f = Feed()
    f.raw(ITEMS, value)
    assert reasons(f.views()) == [reason]


def test_too_large_and_raw_truncation():
    config = ReferenceConfig(topics={SF: "salesforce"}, max_message_bytes=100_000)
    big = b"\xff" + b"x" * 99_999
    f = Feed()
    f.raw(SF, big)
    f.raw(SF, big + b"y")
    f.raw(SF, b"\xe2\x82" + b"x" * 70_000)
    views = f.views(config)
    by_offset = {row[2]: row for row in views.dead_letters}
    assert by_offset[0][3] == "not_json" and by_offset[1][3] == "too_large"
    assert by_offset[1][4] == "\ufffd" + "x" * 65_535  # first 65,536 bytes, decoded
    assert by_offset[2][4] == "\ufffd" + "x" * 65_534


def test_nesting_depth_limit():
    def nested(depth: int, valid: bool = True) -> bytes:
        inner = "[" * (depth - 1) + "]" * (depth - 1 if valid else depth - 2)
        return b'{"a":' + inner.encode() + b"}"

    f = Feed()
    f.raw(SF, nested(64))  # 64 levels: deep enough, then judged by its shape
    f.raw(SF, nested(65))
    f.raw(SF, nested(3000))  # beyond what the parsers recurse into
    f.raw(SF, nested(3000, valid=False))
    assert [r[3] for r in sorted(f.views().dead_letters)] == [
        "missing_header",
        "too_deep",
        "too_deep",
        "not_json",
    ]


def test_other_entities_are_ignored_but_feed_the_clock():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Draft")
    f.sf("Contact", "CREATE", "003000000000001AAA", T0 + 5 * MIN, LastName="x")
    f.sf("Opportunity", "GAP_OVERFLOW", [], T0 + 6 * MIN)
    views = f.views()
    assert stats(views)["ignored"] == 2 and stats(views)["applied"] == 1
    assert {k[1] for k in views.records} == {"Order"}
    assert views.now_ms == T0 + 6 * MIN
    assert not views.open_exceptions


def test_unknown_topic_is_an_error():
    with pytest.raises(ValueError, match="not configured"):
        compute([RawMessage("other", 0, 0, None, b"{}", -1)])


# --- Duplicates, window, lateness ------------------------------------------------------------


def test_duplicates_across_forms_share_one_identity():
    f = Feed()
    f.sf("Order", "UPDATE", ORDER, T0, tx="t1", Status="Draft")
    f.sf("Order", "UPDATE", ORDER, T0, tx="t1", Status="Draft", form="flat")
    f.sf("Order", "UPDATE", ORDER, T0, tx="t1", Status="Draft", form="bare")
    f.erp("items", "c", {"sku": "A"}, lsn=1, ts=T0)
    f.erp("items", "c", {"sku": "A"}, lsn=1, ts=T0, schema={"type": "struct"})
    views = f.views()
    assert stats(views)["duplicates"] == 2 and stats(views)["applied"] == 1
    assert stats(views, ITEMS)["duplicates"] == 1


def test_dedup_window_expiry():
    window = 3600 * 1000
    f = Feed()
    first = f.erp("items", "c", {"sku": "A"}, lsn=1, ts=T0)
    f.erp("items", "c", {"sku": "B"}, lsn=2, ts=T0 + window)  # clock at exactly et + window
    f.again(first)  # still remembered: duplicate
    f.erp("items", "c", {"sku": "C"}, lsn=3, ts=T0 + window + 1)  # clock passes et + window
    f.again(first)  # forgotten: applied again, changes nothing but counters
    f.again(first)  # its event time is still past the window: applied again
    views = f.views()
    assert stats(views, ITEMS) == {
        "consumed": 6,
        "applied": 5,
        "duplicates": 1,
        "dead_lettered": 0,
        "ignored": 0,
    }
    assert views.late[ITEMS] == 2  # the re-applied copies are an hour behind the clock
    assert not rec(views, "items", '{"sku":"A"}').deleted


def test_shorter_window_from_config():
    config = ReferenceConfig(topics={ITEMS: "items"}, dedup_window_s=60)
    f = Feed()
    first = f.erp("items", "c", {"sku": "A"}, lsn=1, ts=T0)
    f.erp("items", "c", {"sku": "B"}, lsn=2, ts=T0 + MIN + 1)
    f.again(first)
    assert stats(f.views(config), ITEMS)["duplicates"] == 0


def test_late_counting():
    f = Feed()
    f.sf("Order", "UPDATE", ORDER, T0 + MIN, Status="Draft")
    f.erp("items", "c", {"sku": "A"}, lsn=1, ts=T0 + 30_000)  # exactly 30 s behind: on time
    f.erp("items", "c", {"sku": "B"}, lsn=2, ts=T0 + 29_999)  # more than 30 s behind: late
    dup = f.sf("Order", "UPDATE", ORDER, T0, Status="Activated")  # late, still applied
    f.again(dup)  # duplicates are not late
    f.raw(SF, b"junk")
    views = f.views()
    assert views.late == {SF: 1, ITEMS: 1, INV: 0, SO: 0}
    assert rec(views, "Order", ORDER).fields["Status"] == "Draft"
    assert views.order_status[ORDER].activated_at_ms == T0


# --- Views -----------------------------------------------------------------------------------


def test_activated_at_and_invoiced_at_are_earliest_times():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0 + 5 * MIN, Status="Draft", TotalAmount=10)
    f.sf("Order", "UPDATE", ORDER, T0 + 9 * MIN, Status="Draft")
    f.sf("Order", "UPDATE", ORDER, T0 + 6 * MIN, Status="Activated")
    f.sf("Order", "UPDATE", ORDER, T0 + 7 * MIN, Status="Activated")
    # Status in the body but not among the changes does not count
    f.sf("Order", "UPDATE", ORDER, T0 + 1 * MIN, changed=["TotalAmount"], Status="Activated",
         TotalAmount=10)  # fmt: skip
    so = {"order_no": "SO-1", "sf_order_id": ORDER, "total_amount": 10}
    f.erp("sales_orders", "c", {**so, "status": "OPEN"}, lsn=1, ts=T0 + 10 * MIN)
    f.erp("sales_orders", "u", {**so, "status": "INVOICED"}, lsn=4, ts=T0 + 25 * MIN)
    f.erp("sales_orders", "u", {**so, "status": "SHIPPED"}, lsn=3, ts=T0 + 20 * MIN)
    f.erp("sales_orders", "u", {**so, "status": "INVOICED"}, lsn=5, ts=T0 + 30 * MIN)
    f.erp("sales_orders", "d", {**so, "status": "INVOICED"}, lsn=2, ts=T0 + 15 * MIN)
    row = f.views().order_status[ORDER]
    assert row.activated_at_ms == T0 + 6 * MIN
    assert row.invoiced_at_ms == T0 + 25 * MIN  # deletes do not count
    assert row.quote_to_cash_s == 19 * 60.0
    assert row.sf_status == "Draft" and row.erp_status == "INVOICED"
    assert row.stage == "INVOICED" and row.amount_matches is True


def test_link_choice_among_several_erp_orders():
    def so(no: str, status: str, lsn: int, target: str = ORDER) -> None:
        f.erp("sales_orders", "c", {"order_no": no, "sf_order_id": target, "status": status},
              lsn=lsn, ts=T0)  # fmt: skip

    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated", TotalAmount=1)
    so("A", "OPEN", 5)
    so("B", "CANCELLED", 9)
    so("C", "ALLOCATED", 7)
    so("D", "OPEN", 8)
    f.erp("sales_orders", "d", {"order_no": "D"}, lsn=10, ts=T0)  # not live: not a candidate
    views = f.views()
    assert views.order_status[ORDER].erp_order_no == "C"
    assert views.order_status[ORDER].stage == "ALLOCATED"
    assert not {kind for kind, _ in views.open_exceptions} & {"ORPHAN_ERP_ORDER"}

    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated")
    so("A", "CANCELLED", 5)
    so("B", "CANCELLED", 9)
    row = f.views().order_status[ORDER]
    assert row.erp_order_no == "B" and row.stage == "CANCELLED" and row.erp_total is None


def test_stage_rules():
    cases = [
        ("Draft", None, "DRAFT"),
        ("Activated", None, "BOOKED"),
        ("Cancelled", None, "CANCELLED"),
        ("Cancelled", "SHIPPED", "CANCELLED"),
        ("Activated", "CANCELLED", "CANCELLED"),
        ("Draft", "SHIPPED", "SHIPPED"),
    ]
    for sf_status, erp_status, stage in cases:
        f = Feed()
        f.sf("Order", "CREATE", ORDER, T0, Status=sf_status)
        if erp_status:
            f.erp("sales_orders", "c", {"order_no": 1, "sf_order_id": ORDER, "status": erp_status},
                  lsn=1, ts=T0)  # fmt: skip
        assert f.views().order_status[ORDER].stage == stage, (sf_status, erp_status)


def test_amount_mismatch_exception():
    for erp_total, matches in (("100.01", True), ("99.99", True), ("100.02", False), (None, None)):
        f = Feed()
        f.sf("Order", "CREATE", ORDER, T0, Status="Activated", TotalAmount=100)
        f.erp("sales_orders", "c", {"order_no": 1, "sf_order_id": ORDER, "total_amount": erp_total},
              lsn=1, ts=T0)  # fmt: skip
        views = f.views()
        row = views.order_status[ORDER]
        assert row.amount_matches is matches and row.erp_order_no == "1"
        assert (("AMOUNT_MISMATCH", ORDER) in views.open_exceptions) is (matches is False)


def test_orphan_erp_orders():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated")
    f.sf("Order", "CREATE", ORDER2, T0, Status="Activated")
    f.sf("Order", "DELETE", ORDER2, T0 + 1)
    rows = [
        ({"order_no": 42, "sf_order_id": "801000000000009AAA"}, True),  # unknown order
        ({"order_no": "S2", "sf_order_id": ORDER2}, True),  # deleted order
        ({"order_no": "S3", "sf_order_id": None}, False),
        ({"order_no": "S4", "sf_order_id": ""}, False),
        ({"order_no": "S5"}, False),
        ({"order_no": "S6", "sf_order_id": ORDER}, False),
    ]
    for lsn, (row, _) in enumerate(rows):
        f.erp("sales_orders", "c", row, lsn=lsn, ts=T0)
    f.erp("sales_orders", "c", {"order_no": "S7", "sf_order_id": "X"}, lsn=90, ts=T0)
    f.erp("sales_orders", "d", {"order_no": "S7", "sf_order_id": "X"}, lsn=91, ts=T0)
    views = f.views()
    orphans = {key for kind, key in views.open_exceptions if kind == "ORPHAN_ERP_ORDER"}
    assert orphans == {"42", "S2"}
    assert ORDER2 not in views.order_status  # linked but deleted: no row


def test_unknown_sku_exception():
    f = Feed()
    f.sf("Product2", "CREATE", PRODUCT, T0, ProductCode="SKU-1")
    f.sf("Product2", "CREATE", PRODUCT2, T0, ProductCode="SKU-2")
    f.sf("Order", "CREATE", ORDER, T0, Status="Draft")
    f.sf("Order", "CREATE", ORDER2, T0, Status="Draft")
    f.sf("Order", "DELETE", ORDER2, T0 + 1)
    f.sf("OrderItem", "CREATE", ITEM, T0, OrderId=ORDER, Product2Id=PRODUCT, Quantity=1)
    f.sf("OrderItem", "CREATE", ITEM2, T0, OrderId=ORDER2, Product2Id=PRODUCT2, Quantity=1)
    assert f.views().open_exceptions == {("UNKNOWN_SKU", "SKU-1")}
    f.erp("items", "c", {"sku": "SKU-1"}, lsn=1, ts=T0)
    assert f.views().open_exceptions == set()
    f.erp("items", "d", {"sku": "SKU-1"}, lsn=2, ts=T0)
    assert f.views().open_exceptions == {("UNKNOWN_SKU", "SKU-1")}
    f.sf("Product2", "DELETE", PRODUCT, T0 + 2)  # the item now maps to no sku
    assert f.views().open_exceptions == set()


def test_handoff_overdue_uses_the_clock():
    sla = 900_000
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated")
    f.sf("Order", "CREATE", ORDER2, T0, Status="Draft")
    f.sf("Account", "UPDATE", ACCOUNT, T0 + sla, Name="x")
    assert f.views().open_exceptions == set()  # exactly the SLA: not yet
    f.erp("items", "c", {"sku": "A"}, lsn=1, ts=T0 + sla + 1)
    views = f.views()
    assert views.now_ms == T0 + sla + 1
    assert views.open_exceptions == {("HANDOFF_OVERDUE", ORDER)}
    f.erp("sales_orders", "c", {"order_no": "1", "sf_order_id": ORDER}, lsn=1, ts=T0)
    assert f.views().open_exceptions == set()
    config = ReferenceConfig(topics=ReferenceConfig.default().topics, handoff_sla_s=10)
    g = Feed()
    g.sf("Order", "CREATE", ORDER, T0, Status="Activated")
    g.sf("Account", "UPDATE", ACCOUNT, T0 + 10_001, Name="x")
    assert g.views(config).open_exceptions == {("HANDOFF_OVERDUE", ORDER)}


def test_sf_resync_needed_opens_on_gaps_and_closes_on_newer_lifecycle():
    f = Feed()
    gap = f.sf("Order", "GAP_UPDATE", [ORDER, ORDER2], T0 + MIN)
    f.sf("Order", "UPDATE", ORDER, T0 + 2 * MIN, Status="Draft")  # updates do not close it
    f.sf("Order", "CREATE", ORDER2, T0, Status="Draft")  # older create does not close it
    f.sf("Product2", "GAP_OVERFLOW", [], T0 + 3 * MIN)
    views = f.views()
    assert views.open_exceptions == {
        ("SF_RESYNC_NEEDED", ORDER),
        ("SF_RESYNC_NEEDED", ORDER2),
        ("SF_RESYNC_NEEDED", "Product2:*"),
    }
    assert stats(views)["applied"] == 4
    assert rec(views, "Order", ORDER).version == v(T0 + 2 * MIN)  # gaps set no version
    assert rec(views, "Order", ORDER2).version == v(T0)
    f.sf("Order", "DELETE", ORDER, T0 + 5 * MIN)
    f.sf("Order", "UNDELETE", ORDER2, T0 + 5 * MIN)
    f.again(gap)
    assert f.views().open_exceptions == {("SF_RESYNC_NEEDED", "Product2:*")}


def test_gap_alone_creates_no_record():
    f = Feed()
    f.sf("Order", "GAP_CREATE", ORDER, T0)
    views = f.views()
    assert views.records == {} and views.open_exceptions == {("SF_RESYNC_NEEDED", ORDER)}


def test_sf_open_demand_and_inventory_rows():
    f = Feed()
    f.sf("Product2", "CREATE", PRODUCT, T0, ProductCode="SKU-1")
    f.sf("Product2", "CREATE", PRODUCT2, T0, ProductCode="SKU-2")
    f.sf("Product2", "CREATE", "01t000000000003AAA", T0, ProductCode="")
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated")
    f.sf("Order", "CREATE", ORDER2, T0, Status="Draft")

    def item(item_id: str, order: str, product: str, qty: object) -> None:
        f.sf("OrderItem", "CREATE", item_id, T0, OrderId=order, Product2Id=product, Quantity=qty)

    item("802000000000001AAA", ORDER, PRODUCT, 0.5)
    item("802000000000002AAA", ORDER, PRODUCT, "2")
    item("802000000000003AAA", ORDER, PRODUCT, None)
    item("802000000000004AAA", ORDER2, PRODUCT2, 5)  # draft order: no demand
    item("802000000000005AAA", ORDER, "01t000000000003AAA", 5)  # no sku
    item("802000000000006AAA", ORDER, PRODUCT2, 3.5)
    item("802000000000007AAA", ORDER, PRODUCT2, 1)
    f.sf("OrderItem", "DELETE", "802000000000007AAA", T0 + 1)
    for lsn, (wh, qty) in enumerate((("DAL1", 10), ("NYC1", "2.5"))):
        row = {"sku": "SKU-2", "warehouse": wh, "qty_on_hand": qty, "qty_allocated": 1}
        f.erp("inventory", "c", row, lsn=lsn, ts=T0)
    f.erp("inventory", "c", {"sku": "SKU-3", "warehouse": "DAL1"}, lsn=50, ts=T0)
    views = f.views()
    assert views.inventory_live == {
        "SKU-1": InventoryRow(0, 0, 2, -2),  # 2.5 rounds half-even to 2
        "SKU-2": InventoryRow(12, 2, 4, 6),  # 12.5 -> 12, 3.5 -> 4
        "SKU-3": InventoryRow(0, 0, 0, 0),
    }
    # linking the order to a live ERP order removes its demand, and SKU-1's row with it
    f.erp("sales_orders", "c", {"order_no": "1", "sf_order_id": ORDER}, lsn=99, ts=T0)
    assert set(f.views().inventory_live) == {"SKU-2", "SKU-3"}
    assert f.views().inventory_live["SKU-2"].sf_open_demand == 0


def test_half_unit_demand_makes_no_row():
    f = Feed()
    f.sf("Product2", "CREATE", PRODUCT, T0, ProductCode="SKU-1")
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated")
    f.sf("OrderItem", "CREATE", ITEM, T0, OrderId=ORDER, Product2Id=PRODUCT, Quantity="0.5")
    assert f.views().inventory_live == {}


def test_amounts_round_before_matching():
    f = Feed()
    f.sf("Order", "CREATE", ORDER, T0, Status="Activated", TotalAmount="10.005")
    f.erp("sales_orders", "c", {"order_no": 1, "sf_order_id": ORDER, "total_amount": "10.015"},
          lsn=1, ts=T0)  # fmt: skip
    row = f.views().order_status[ORDER]
    assert (row.sf_total, row.erp_total) == (Decimal("10.00"), Decimal("10.02"))
    assert row.amount_matches is False


# --- Order independence ----------------------------------------------------------------------

_ORDERS = ["801000000000001AAA", "801000000000002AAA", "801000000000003"]
_PRODUCTS = ["01t000000000001AAA", "01t000000000002AAA"]
_ITEMS = ["802000000000001AAA", "802000000000002AAA", "802000000000003AAA"]
_IDS = {"Order": _ORDERS, "Product2": _PRODUCTS, "OrderItem": _ITEMS}
_VALUES = {
    "Status": ["Draft", "Activated", "Activated", "Cancelled"],
    "TotalAmount": ["100.00", 100.005, 99, None],
    "OrderNumber": ["1", "2"],
    "ProductCode": ["SKU-1", "SKU-2", ""],
    "OrderId": [*_ORDERS, "801000000000001"],
    "Product2Id": _PRODUCTS,
    "Quantity": [1, 2.5, "3", None],
}
# sales order -> the Order it usually names (S3 names whatever it likes)
_SALES_ORDERS = {"S1": _ORDERS[0], "S2": "801000000000003", "S3": None}


@st.composite
def sf_event(draw: st.DrawFn) -> tuple:
    """A Salesforce event on a small universe of records, at one of four times."""
    entity = draw(st.sampled_from(["Order", "Order", "Order", "OrderItem", "Product2"]))
    ids = draw(st.lists(st.sampled_from(_IDS[entity]), min_size=1, max_size=2, unique=True))
    kind = draw(st.sampled_from(["CREATE", "UPDATE", "UPDATE", "DELETE", "UNDELETE", "GAP_UPDATE"]))
    names = [n for n in SF_FIELDS[entity] if n in _VALUES]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, min_size=1))
    fields = {n: draw(st.sampled_from(_VALUES[n])) for n in chosen}
    if kind in ("DELETE", "GAP_UPDATE"):
        fields = {}
    ts = T0 + draw(st.integers(0, 3)) * 10 * MIN
    # small ranges, so that equal order keys of different events occur
    order = {"cnum": draw(st.integers(0, 2)), "seq": draw(st.integers(0, 2))}
    return ("sf", entity, kind, ids, ts, order, fields)


@st.composite
def erp_event(draw: st.DrawFn) -> tuple:
    """A Debezium event on a small universe of rows, at one of four times."""
    table = draw(st.sampled_from(["items", "inventory", "sales_orders", "sales_orders"]))
    op = draw(st.sampled_from(["c", "u", "u", "d", "r"]))
    sku = draw(st.sampled_from(["SKU-1", "SKU-2"]))
    if table == "items":
        row = {"sku": sku, "list_price": draw(st.sampled_from([1, "2.50"]))}
    elif table == "inventory":
        row = {
            "sku": sku,
            "warehouse": draw(st.sampled_from(["A", "B"])),
            "qty_on_hand": draw(st.sampled_from([0, 5, "7.5"])),
            "qty_allocated": draw(st.sampled_from([0, 1])),
        }
    else:
        order_no = draw(st.sampled_from(sorted(_SALES_ORDERS)))
        target = _SALES_ORDERS[order_no]
        if target is None or draw(st.integers(0, 4)) == 0:
            target = draw(st.sampled_from([*_ORDERS, None, ""]))
        row = {
            "order_no": order_no,
            "sf_order_id": target,
            "status": draw(st.sampled_from(["OPEN", "INVOICED", "INVOICED", "CANCELLED"])),
            "total_amount": draw(st.sampled_from(["100.00", 99, None])),
        }
    ts = T0 + draw(st.integers(0, 3)) * 10 * MIN
    return ("erp", table, op, row, ts)


scenarios = st.lists(st.one_of(sf_event(), erp_event()), min_size=10, max_size=60)


def _build(events: list[tuple]) -> Feed:
    """Messages for the events (distinct identities), plus ignored and dead-lettered ones."""
    f = Feed()
    for index, event in enumerate(events):
        if event[0] == "sf":
            _, entity, kind, ids, ts, order, fields = event
            f.sf(entity, kind, ids, ts, tx=f"tx{index}", **order, **fields)
        else:
            _, table, op, row, ts = event
            f.erp(table, op, row, lsn=index + 1, ts=ts)
    f.sf("Contact", "CREATE", "003000000000001AAA", T0, Name="ignored")
    f.raw(SF, b"not json")
    f.raw(INV, None)
    return f


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=scenarios, data=st.data())
def test_shuffling_and_duplicating_does_not_change_the_views(events, data):
    base_feed = _build(events)
    base = run(base_feed.messages)
    assert all(s["duplicates"] == 0 for s in base.flow_stats.values())

    # redelivered copies (all within the window: the events span 30 minutes), then shuffle
    copies = data.draw(st.lists(st.sampled_from(base_feed.messages[: len(events)]), max_size=10))
    extra = Feed()
    extra._offsets = Counter(base_feed._offsets)
    for msg in copies:
        extra.again(msg)
    other = run(data.draw(st.permutations(base_feed.messages + extra.messages)))

    copied = Counter(m.topic for m in copies)
    for topic, counts in other.flow_stats.items():
        expected = dict(base.flow_stats[topic])
        expected["consumed"] += copied[topic]
        expected["duplicates"] += copied[topic]
        assert counts == expected
    other.flow_stats = base.flow_stats
    assert diff(base, other, limit=1000) == []
    assert base.now_ms == other.now_ms


def test_property_scenario_is_not_trivial():
    """A fixed scenario of the generator's universe exercises demand and exceptions at once."""
    zero = {"cnum": 0, "seq": 0}
    events = [
        ("sf", "Product2", "CREATE", [_PRODUCTS[0]], T0, zero, {"ProductCode": "SKU-1"}),
        ("sf", "Order", "CREATE", [_ORDERS[0]], T0, zero,
         {"Status": "Activated", "TotalAmount": "100.00"}),
        ("sf", "OrderItem", "CREATE", [_ITEMS[0]], T0, zero,
         {"OrderId": _ORDERS[0], "Product2Id": _PRODUCTS[0], "Quantity": 2}),
        ("erp", "inventory", "c", {"sku": "SKU-1", "warehouse": "A", "qty_on_hand": 5}, T0),
        ("erp", "sales_orders", "c", {"order_no": "S2", "sf_order_id": _ORDERS[2]}, T0),
        ("sf", "Order", "GAP_UPDATE", [_ORDERS[1]], T0 + 30 * MIN, zero, {}),
    ]  # fmt: skip
    views = run(_build(events).messages)
    assert views.inventory_live == {"SKU-1": InventoryRow(5, 0, 2, 3)}
    assert views.open_exceptions == {
        ("UNKNOWN_SKU", "SKU-1"),
        ("ORPHAN_ERP_ORDER", "S2"),
        ("HANDOFF_OVERDUE", _ORDERS[0]),
        ("SF_RESYNC_NEEDED", _ORDERS[1]),
    }
    assert set(STAT_COLUMNS) == set(views.flow_stats[SF])
