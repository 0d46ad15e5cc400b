"""The decoder: every input form of CONTRACT §1 to canonical changes, per docs/semantics.md §1."""

from __future__ import annotations

import base64
import copy
import json
from decimal import Decimal
from typing import Any

import orjson
import pytest
from sferp.operators.decode import DecodeConfig, decode_batch
from sferp.operators.decode_common import RAW_LIMIT, REASONS, raw_text

from sferp.events import (
    CREATE,
    DELETE,
    ERP,
    GAP,
    SALESFORCE,
    UNDELETE,
    UPDATE,
    UPSERT,
    Change,
    DeadLetter,
    Ignored,
    RawMessage,
    version_string,
)
from sferp.sfid import normalize_id, suffix, to18

SF = "sf.cdc"
ITEMS = "erp.public.items"
INV = "erp.public.inventory"
SO = "erp.public.sales_orders"
CFG = DecodeConfig(topics={SF: "salesforce", ITEMS: "items", INV: "inventory", SO: "sales_orders"})

TX = "00049d1c-54b5-4a9a-87c3-0cc2b1b1e6a2"
ORDER_ID = "801000000000001AAA"
TS = 1764309600000
COMMIT = 11650042213


def raw(topic: str, value: Any, *, key: Any = None, offset: int = 7, partition: int = 2):
    """A RawMessage; dicts/lists are JSON-encoded, bytes and None pass through."""
    if value is not None and not isinstance(value, bytes):
        value = json.dumps(value).encode()
    if key is not None and not isinstance(key, bytes):
        key = json.dumps(key).encode()
    return RawMessage(topic, partition, offset, key, value, 1)


def decode(topic: str, value: Any, **kw) -> list:
    return decode_batch([raw(topic, value, **kw)], CFG)


def one(topic: str, value: Any, **kw):
    out = decode(topic, value, **kw)
    assert len(out) == 1, out
    return out[0]


def reason(topic: str, value: Any, **kw) -> str:
    out = one(topic, value, **kw)
    assert type(out) is DeadLetter, out
    assert (out.topic, out.partition, out.offset) == (topic, kw.get("partition", 2), 7)
    return out.reason


# --- Salesforce builders ---------------------------------------------------------------------


def header(**kw) -> dict[str, Any]:
    h = {
        "entityName": "Order",
        "recordIds": [ORDER_ID],
        "changeType": "UPDATE",
        "changeOrigin": "com/salesforce/api/rest/62.0",
        "transactionKey": TX,
        "sequenceNumber": 1,
        "commitTimestamp": TS,
        "commitNumber": COMMIT,
        "commitUser": "005000000000001AAA",
        "changedFields": ["Status", "LastModifiedDate"],
        "nulledFields": [],
        "diffFields": [],
    }
    h.update(kw)
    return {k: v for k, v in h.items() if v is not _DROP}


_DROP = object()


def wrapped(h: dict, **fields) -> dict:
    return {"replayId": "0000000000004711", "payload": {"ChangeEventHeader": h, **fields}}


def bare(h: dict, **fields) -> dict:
    return {"ChangeEventHeader": h, **fields}


def flat(h: dict, entity_fields: tuple[str, ...], **fields) -> dict:
    ids = h.get("recordIds")
    doc = {"Id": ids[0] if isinstance(ids, list) and ids else None, "ReplayId": "4711"}
    doc["ChangeEventHeader"] = h
    doc.update(dict.fromkeys(entity_fields))
    doc.update(fields)
    doc["_ObjectType"] = f"{h.get('entityName')}ChangeEvent"
    doc["_EventType"] = "Zx0IEn6y0mBbKv5cRvyaQw"
    return doc


ORDER_FIELDS = ("AccountId", "OrderNumber", "Status", "TotalAmount", "EffectiveDate")


def sf_change(value: Any) -> Change:
    out = one(SF, value)
    assert type(out) is Change, out
    return out


# --- Salesforce Ids --------------------------------------------------------------------------


def _suffix_by_reversed_bits(id15: str) -> str:
    """The checksum as Salesforce's documentation computes it: reversed chunks as binary."""
    out = ""
    for i in range(3):
        chunk = id15[i * 5 : i * 5 + 5][::-1]
        bits = "".join("1" if c.isupper() and c.isascii() else "0" for c in chunk)
        out += "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[int(bits, 2)]
    return out


@pytest.mark.parametrize(
    "id15, id18",
    [
        ("001A0000006Vm9r", "001A0000006Vm9rIAC"),
        ("0015000000Gv7qJ", "0015000000Gv7qJAAR"),
        ("000000000000000", "000000000000000AAA"),
        ("ABCDEABCDEABCDE", "ABCDEABCDEABCDE555"),
        # upper case at bits 1+3 (10 -> K), 0+2+4 (21 -> V), 1+3 (K)
        ("aBcDeFgHiJkLmNo", "aBcDeFgHiJkLmNoKVK"),
    ],
)
def test_to18_known_pairs(id15, id18):
    assert to18(id15) == id18
    assert to18(id15) == id18  # cached path
    assert suffix(id15) == id18[15:] == _suffix_by_reversed_bits(id15)


def test_to18_matches_documented_algorithm_on_many_ids():
    import random

    rng = random.Random(5)
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    for _ in range(2000):
        id15 = "".join(rng.choice(alphabet) for _ in range(15))
        assert to18(id15) == id15 + _suffix_by_reversed_bits(id15)


@pytest.mark.parametrize(
    "value",
    ["801000000000001AAA", "abc", "", "8010000000000012", "001A0000006Vm9-", "001A0000006Vm9é"],
)
def test_to18_leaves_other_values_alone(value):
    assert to18(value) == value
    assert normalize_id(value) == value


# --- steps 1-5, shared by all topics ---------------------------------------------------------


@pytest.mark.parametrize("topic", [SF, ITEMS, INV, SO])
def test_tombstone_is_ignored_on_every_topic(topic):
    out = one(topic, None)
    assert out == Ignored(topic, 2, 7, "tombstone", None)


def test_unknown_topic_is_a_caller_bug():
    with pytest.raises(ValueError, match="not configured"):
        decode_batch([raw("elsewhere", {"a": 1})], CFG)


def test_config_rejects_unknown_roles():
    with pytest.raises(ValueError):
        DecodeConfig(topics={"t": "orders"})


def test_too_large_is_checked_before_json_and_uses_the_configured_limit():
    small = DecodeConfig(topics={SF: "salesforce"}, max_message_bytes=100)
    edge = b'{"x":"' + b"a" * 92 + b'"}'
    assert len(edge) == 100
    [at_limit] = decode_batch([raw(SF, edge)], small)
    assert at_limit.reason == "missing_header"  # not too large: exactly the limit
    [over] = decode_batch([raw(SF, edge + b" ")], small)
    assert over.reason == "too_large"
    [bad_and_big] = decode_batch([raw(SF, b"\xff" * 200)], small)
    assert bad_and_big.reason == "too_large"


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"   ",
        b"{",
        b'{"a": 1} x',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": nan}',
        b"{'a': 1}",
        b'{"a": 01}',
        b'{"a": "\x01"}',
        b'{"a": "\xff"}',
        b'{"a": "\xc0\xaf"}',  # overlong encoding
        b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate
        b'\xef\xbb\xbf{"a": 1}',  # BOM
        b'{"a": "\\ud800"}',  # escaped lone surrogate
        b'{"a": "\\udc00x"}',
        b'{"a": 1,}',
        b'{"a": ' + b"9" * 4301 + b"}",  # beyond Python's integer digit limit
        '{"a": 1}'.encode("utf-16"),
    ],
)
def test_not_json(value):
    for topic in (SF, INV):
        assert reason(topic, value) == "not_json"


def test_valid_json_that_orjson_refuses_is_accepted():
    # A surrogate pair is fine; a 400-digit integer is kept exact (orjson reads it as infinity).
    big = 10**400 + 7
    body = (
        b'{"ChangeEventHeader": '
        + orjson.dumps(header(changeType="CREATE"))
        + b', "Name": "\\ud83d\\ude00", "Description": '
        + str(big).encode()
        + b', "Status": "Draft"}'
    )
    ch = sf_change(body)
    assert ch.fields["Name"] == "\U0001f600"
    assert ch.fields["Description"] == big


def test_number_overflowing_a_double_is_json_but_not_a_valid_amount():
    body = orjson.dumps(bare(header(changeType="CREATE"))).replace(
        b"}}", b'}, "TotalAmount": 1e400}'
    )
    assert body.endswith(b"1e400}")
    assert reason(SF, body) == "bad_number"
    other = body.replace(b'"TotalAmount"', b'"Description"')
    ch = sf_change(other)
    assert ch.fields["Description"] == float("inf")


def _nested(depth: int, leaf: bytes = b"1", kind: str = "list") -> bytes:
    if kind == "list":
        return b"[" * depth + leaf + b"]" * depth
    return b'{"a":' * depth + leaf + b"}" * depth


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_depth_limit_is_64_levels(kind):
    # 64 levels: fine (and then not an object, or missing a header); 65: too deep.
    assert reason(SF, _nested(64, kind=kind)) == (
        "not_an_object" if kind == "list" else "missing_header"
    )
    assert reason(SF, _nested(65, kind=kind)) == "too_deep"
    # Deep inside an otherwise valid event.
    doc = wrapped(header(), Status="Activated")
    doc["payload"]["Description"] = orjson.loads(_nested(62, kind=kind))  # levels 3..64
    assert type(sf_change(doc)) is Change
    doc["payload"]["Description"] = orjson.loads(_nested(63, kind=kind))
    assert reason(SF, doc) == "too_deep"


def test_depth_counts_containers_not_brackets_inside_strings():
    doc = wrapped(header(), Status="Activated", Description="[" * 500 + "{" * 500)
    assert type(sf_change(doc)) is Change


def test_very_deep_documents_are_too_deep_when_valid_and_not_json_otherwise():
    assert reason(INV, _nested(5000)) == "too_deep"
    assert reason(INV, _nested(5000, kind="dict")) == "too_deep"
    assert reason(INV, _nested(5000, leaf=b"NaN")) == "not_json"
    assert reason(INV, _nested(5000)[:-1]) == "not_json"
    assert reason(INV, _nested(5000) + b"]") == "not_json"
    assert reason(INV, _nested(5000, leaf=b'"\\ud800"')) == "not_json"
    assert reason(INV, _nested(2000, leaf=b'{"a": [1, 2.5e3, "x\\n", true, null], "b": {}}')) == (
        "too_deep"
    )


def test_not_json_comes_before_too_deep_and_too_deep_before_not_an_object():
    assert reason(SF, _nested(100, leaf=b"NaN")) == "not_json"
    assert reason(SF, _nested(100)) == "too_deep"


@pytest.mark.parametrize("value", [b"[]", b'"text"', b"1", b"null", b"true", b"[{}]"])
def test_not_an_object(value):
    for topic in (SF, ITEMS):
        assert reason(topic, value) == "not_an_object"


def test_raw_text_replaces_invalid_utf8_and_cuts_at_65536_bytes():
    assert raw_text(b"ab\xffc") == "ab\ufffdc"
    out = one(SF, b'{"a": "\xff"}')
    assert out.reason == "not_json" and out.raw == '{"a": "\ufffd"}'
    big = b"x" * (RAW_LIMIT - 1) + "é".encode() + b"tail"  # é straddles the cut
    small = DecodeConfig(topics={SF: "salesforce"}, max_message_bytes=1000)
    [dl] = decode_batch([raw(SF, big)], small)
    assert dl.reason == "too_large"
    assert dl.raw == "x" * (RAW_LIMIT - 1) + "\ufffd"
    assert len(dl.raw.encode("utf-8")) == RAW_LIMIT + 2  # the replacement char is 3 bytes
    exact = b"y" * (RAW_LIMIT + 10)
    [dl] = decode_batch([raw(SF, exact)], small)
    assert dl.raw == "y" * RAW_LIMIT


# --- Salesforce: forms -----------------------------------------------------------------------


def test_the_three_forms_decode_to_the_same_change():
    h = header()
    forms = [
        wrapped(h, Status="Activated", LastModifiedDate="2026-11-28T06:00:00.000Z"),
        bare(h, Status="Activated", LastModifiedDate="2026-11-28T06:00:00.000Z"),
        flat(h, ORDER_FIELDS, Status="Activated", LastModifiedDate="2026-11-28T06:00:00.000Z"),
    ]
    expected = Change(
        SALESFORCE,
        "Order",
        ORDER_ID,
        UPDATE,
        (TS, COMMIT, 1),
        TS,
        f"sf|Order|{TX}|1|{ORDER_ID}",
        {"Status": "Activated", "LastModifiedDate": "2026-11-28T06:00:00.000Z"},
        SF,
        2,
        7,
        True,
    )
    for doc in forms:
        assert sf_change(doc) == expected


def test_contract_example_verbatim():
    text = b"""{"replayId": "0000000000004711",
 "payload": {
   "ChangeEventHeader": {
     "entityName": "Order", "recordIds": ["801000000000001AAA"],
     "changeType": "UPDATE", "changeOrigin": "com/salesforce/api/rest/62.0",
     "transactionKey": "00049d1c-54b5-4a9a-87c3-0cc2b1b1e6a2", "sequenceNumber": 1,
     "commitTimestamp": 1764309600000, "commitNumber": 11650042213,
     "commitUser": "005000000000001AAA",
     "changedFields": ["Status", "LastModifiedDate"], "nulledFields": [], "diffFields": []},
   "Status": "Activated",
   "LastModifiedDate": "2026-11-28T06:00:00.000Z"}}"""
    ch = sf_change(text)
    assert ch.identity == "sf|Order|00049d1c-54b5-4a9a-87c3-0cc2b1b1e6a2|1|801000000000001AAA"
    assert version_string(ch.order) == "1764309600000:11650042213:1"
    assert ch.event_time == 1764309600000
    assert ch.fields == {"Status": "Activated", "LastModifiedDate": "2026-11-28T06:00:00.000Z"}


def test_wrapped_form_wins_when_payload_is_an_object():
    doc = wrapped(header(), Status="Activated")
    doc["ChangeEventHeader"] = "ignored, the payload is the body"
    assert sf_change(doc).fields == {"Status": "Activated", "LastModifiedDate": None}


@pytest.mark.parametrize(
    "doc",
    [
        {"Status": "Activated"},
        {"payload": {"Status": "Activated"}},  # wrapped body without a header
        {"payload": "x", "Status": "Activated"},
        {"payload": {"ChangeEventHeader": None}},
        {"payload": {"ChangeEventHeader": [1]}},
        {"ChangeEventHeader": "h"},
        {"ChangeEventHeader": None},
    ],
)
def test_missing_header(doc):
    assert reason(SF, doc) == "missing_header"


def test_bare_form_under_a_non_object_payload():
    doc = bare(header(), Status="Activated", payload=[1])
    assert sf_change(doc).fields["Status"] == "Activated"


# --- Salesforce: header checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"entityName": _DROP},
        {"entityName": 5},
        {"entityName": None},
        {"changeType": _DROP},
        {"changeType": "update"},
        {"changeType": "MERGE"},
        {"changeType": ["UPDATE"]},
        {"commitTimestamp": _DROP},
        {"commitTimestamp": "1764309600000"},
        {"commitTimestamp": 1764309600000.0},
        {"commitTimestamp": True},
        {"sequenceNumber": None},
        {"sequenceNumber": 1.5},
        {"sequenceNumber": False},
        {"commitNumber": _DROP},
        {"commitNumber": "11650042213"},
        {"transactionKey": _DROP},
        {"transactionKey": 12},
        {"recordIds": _DROP},
        {"recordIds": []},
        {"recordIds": ORDER_ID},
        {"recordIds": [ORDER_ID, 5]},
        {"recordIds": [None]},
    ],
)
def test_bad_header(change):
    for doc in (wrapped(header(**change), Status="x"), flat(header(**change), ORDER_FIELDS)):
        assert reason(SF, doc) == "bad_header"


def test_an_unused_entity_is_ignored_whatever_the_rest_of_its_header():
    """CONTRACT §1.1: events of other entities are never dead-lettered."""
    lead = Ignored(SF, 2, 7, "entity", None)
    assert one(SF, bare(header(entityName="Lead", commitTimestamp="x"))) == lead
    assert one(SF, bare(header(entityName="Lead", commitTimestamp=1.5))) == lead
    assert one(SF, bare(header(entityName="Lead", changeType="MERGE"))) == lead._replace(
        event_time=TS
    )
    assert one(SF, bare(header(entityName="Lead", recordIds=[]))).why == "entity"
    assert one(SF, bare(header(entityName="Lead", commitNumber=None))).why == "entity"
    out = one(SF, bare(header(entityName="Lead", changedFields=5, commitTimestamp=123)))
    assert out == Ignored(SF, 2, 7, "entity", 123)
    # Outside the event-time range (years 1 to 9999): no time, as for any other non-time.
    for far in (2**70, 10**17, 253_402_300_800_000, -62_135_596_800_001):
        assert one(SF, bare(header(entityName="Lead", commitTimestamp=far))) == lead
    last = 253_402_300_799_999
    assert one(SF, bare(header(entityName="Lead", commitTimestamp=last))).event_time == last
    assert one(SF, bare(header(entityName="Lead", commitTimestamp=1e308))) == lead
    # Without a readable entity name it is not known to be another entity.
    assert reason(SF, bare(header(entityName=None))) == "bad_header"
    assert reason(SF, bare(header(entityName=7, commitTimestamp="x"))) == "bad_header"


@pytest.mark.parametrize("entity", ["Lead", "Contact", "order", "Opportunity", ""])
def test_other_entities_are_ignored_with_their_event_time(entity):
    for change_type in ("CREATE", "UPDATE", "DELETE", "GAP_UPDATE", "GAP_OVERFLOW"):
        doc = wrapped(header(entityName=entity, changeType=change_type), TotalAmount="junk")
        assert one(SF, doc) == Ignored(SF, 2, 7, "entity", TS)


def test_gap_overflow_may_name_no_records():
    ch = sf_change(bare(header(changeType="GAP_OVERFLOW", recordIds=[])))
    assert (ch.key, ch.op, ch.fields, ch.primary) == ("Order:*", GAP, None, True)
    assert ch.identity == f"sf|Order|{TX}|1|"


# --- Salesforce: changes by type -------------------------------------------------------------


def test_create_is_a_full_image_without_metadata():
    h = header(changeType="CREATE", changedFields=[])
    doc = flat(
        h,
        ORDER_FIELDS,
        Status="Draft",
        TotalAmount=120.5,
        EffectiveDate="2026-11-28",
        Description=None,
        CreatedDate="2026-11-28T06:00:00.000Z",
    )
    doc["replayId"] = "99"
    ch = sf_change(doc)
    assert ch.op == CREATE
    assert ch.fields == {
        "AccountId": None,
        "OrderNumber": None,
        "Status": "Draft",
        "TotalAmount": 120.5,
        "EffectiveDate": "2026-11-28",
        "Description": None,
        "CreatedDate": "2026-11-28T06:00:00.000Z",
    }


@pytest.mark.parametrize("change_type, op", [("CREATE", CREATE), ("UNDELETE", UNDELETE)])
def test_create_and_undelete_fill_absent_entity_fields_with_null(change_type, op):
    h = header(entityName="OrderItem", changeType=change_type, recordIds=["802000000000001AAA"])
    ch = sf_change(wrapped(h, Quantity=3, Extra__c="x", Flag__c=None))
    assert ch.op == op
    assert ch.fields == {
        "Quantity": 3,
        "Extra__c": "x",
        "Flag__c": None,
        "OrderId": None,
        "Product2Id": None,
        "UnitPrice": None,
    }
    for entity, expected in {
        "Product2": {"ProductCode": None, "Name": None, "IsActive": None},
        "Account": {"Name": None, "ERP_Customer_Number__c": None},
    }.items():
        ch = sf_change(bare(header(entityName=entity, changeType=change_type)))
        assert ch.fields == expected


def test_update_takes_exactly_changed_and_nulled_fields():
    h = header(changedFields=["Status", "OrderNumber"], nulledFields=["EffectiveDate"])
    doc = flat(h, ORDER_FIELDS, Status="Activated", TotalAmount=5, Description="not a change")
    ch = sf_change(doc)
    assert ch.fields == {"Status": "Activated", "OrderNumber": None, "EffectiveDate": None}


def test_update_change_list_may_name_metadata_and_compound_names():
    h = header(changedFields=["Id", "BillingAddress.City", "Status"])
    ch = sf_change(flat(h, ORDER_FIELDS, Status="Draft"))
    assert ch.fields == {"Id": None, "BillingAddress.City": None, "Status": "Draft"}


@pytest.mark.parametrize("changed", [[], _DROP])
def test_update_without_changed_fields_uses_non_null_body_fields_and_nulled_fields(changed):
    h = header(changedFields=changed, nulledFields=["TotalAmount", "EffectiveDate"])
    doc = flat(h, ORDER_FIELDS, Status="Activated", Description="d", TotalAmount=None)
    ch = sf_change(doc)
    # CONTRACT §1.1: the fields named in nulledFields are changes in every case.
    assert ch.fields == {
        "Status": "Activated",
        "Description": "d",
        "TotalAmount": None,
        "EffectiveDate": None,
    }
    doc2 = wrapped(header(changedFields=changed, nulledFields=_DROP), OrderNumber=0, Status=None)
    assert sf_change(doc2).fields == {"OrderNumber": 0}


@pytest.mark.parametrize(
    "change",
    [
        {"changedFields": "Status"},
        {"changedFields": None},  # present, but not a list
        {"changedFields": ["Status", 3]},
        {"nulledFields": {"a": 1}},
        {"nulledFields": None},
        {"nulledFields": [None]},
        {"changedFields": [], "nulledFields": 1},
    ],
)
def test_update_with_broken_change_lists_is_bad_header(change):
    assert reason(SF, wrapped(header(**change), Status="Activated")) == "bad_header"


def test_change_lists_are_only_checked_for_updates():
    doc = wrapped(header(changeType="CREATE", changedFields="junk", nulledFields=None))
    assert sf_change(doc).op == CREATE


def test_delete_and_gaps_carry_no_fields():
    ch = sf_change(flat(header(changeType="DELETE"), ORDER_FIELDS, TotalAmount="junk"))
    assert (ch.op, ch.fields) == (DELETE, None)
    for t in ("GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE"):
        ch = sf_change(wrapped(header(changeType=t), TotalAmount="junk", Status="x"))
        assert (ch.op, ch.fields, ch.key) == (GAP, None, ORDER_ID)


def test_multi_record_event_fans_out_sorted_with_one_primary():
    ids = ["801000000000003AAA", "801000000000001", "801000000000002AAA", "801000000000001AAA"]
    h = header(recordIds=ids, changedFields=["Status"], sequenceNumber=4)
    out = decode(SF, wrapped(h, Status="Cancelled"))
    norm = sorted(normalize_id(i) for i in ids)
    assert norm[0] == norm[1] == "801000000000001AAA"
    assert [c.key for c in out] == [
        "801000000000001AAA",
        "801000000000002AAA",
        "801000000000003AAA",
    ]
    assert [c.primary for c in out] == [True, False, False]
    identity = f"sf|Order|{TX}|4|{','.join(norm)}"
    for c in out:
        assert c.identity == identity
        assert (c.op, c.order, c.fields, c.offset) == (
            UPDATE,
            (TS, COMMIT, 4),
            {"Status": "Cancelled"},
            7,
        )


def test_gap_events_fan_out_and_overflow_is_one_change_per_entity():
    ids = ["801000000000002AAA", "801000000000001AAA"]
    out = decode(SF, bare(header(changeType="GAP_UPDATE", recordIds=ids)))
    assert [(c.key, c.op, c.fields, c.primary) for c in out] == [
        ("801000000000001AAA", GAP, None, True),
        ("801000000000002AAA", GAP, None, False),
    ]
    out = decode(SF, bare(header(changeType="GAP_OVERFLOW", recordIds=ids)))
    assert [(c.key, c.primary) for c in out] == [("Order:*", True)]
    assert out[0].identity == f"sf|Order|{TX}|1|801000000000001AAA,801000000000002AAA"


def test_ids_and_reference_fields_are_normalised():
    h = header(entityName="OrderItem", changeType="CREATE", recordIds=["802000000000001"])
    doc = wrapped(
        h, OrderId="801000000000001", Product2Id="01t5000000Gv7qJ", Other__c="001A0000006Vm9r"
    )
    ch = sf_change(doc)
    assert ch.key == "802000000000001AAA"
    assert ch.identity.endswith("|802000000000001AAA")
    assert ch.fields["OrderId"] == "801000000000001AAA"
    assert ch.fields["Product2Id"] == "01t5000000Gv7qJAAR"
    assert ch.fields["Other__c"] == "001A0000006Vm9r"  # not a reference field of §1
    h = header(changedFields=["AccountId"])
    assert sf_change(bare(h, AccountId="001A0000006Vm9r")).fields == {
        "AccountId": "001A0000006Vm9rIAC"
    }
    h = header(entityName="Account", changeType="CREATE", recordIds=["001A0000006Vm9r"])
    ch = sf_change(bare(h, Name="001A0000006Vm9r"))
    assert (ch.key, ch.fields["Name"]) == ("001A0000006Vm9rIAC", "001A0000006Vm9r")
    # Other lengths and non-alphanumeric 15-character values are kept as they are.
    h = header(changedFields=["AccountId"], recordIds=["801-00000000001"])
    ch = sf_change(bare(h, AccountId="0010000000001"))
    assert (ch.key, ch.fields["AccountId"]) == ("801-00000000001", "0010000000001")


def test_integers_beyond_64_bits_in_fields_are_exact():
    # As the reference model keeps them (records.fields, views): orjson reads such an integer
    # as a double, so the message is parsed again with the standard library.
    # (Numeric fields no typed view column reads: TotalAmount and the quantities this
    # large are beyond their columns' range, bad_number in test_extreme_values.py.)
    big = 10**30 + 1
    h = header(
        entityName="OrderItem", recordIds=["802000000000001AAA"], changedFields=["UnitPrice"]
    )
    ch = sf_change(raw(SF, wrapped(h, UnitPrice=big)).value)
    assert ch.fields == {"UnitPrice": big} and type(ch.fields["UnitPrice"]) is int
    row = {"sku": "S", "list_price": -(2**63) - 1}  # orjson: the double -2**63
    assert (
        erp_change(ITEMS, envelope(after=row, table="items")).fields["list_price"] == -(2**63) - 1
    )
    # Anywhere in the fields: an unused field, nested in lists and objects, a text column.
    h = header(changedFields=["LastModifiedDate", "Extra__c"])
    ch = sf_change(wrapped(h, LastModifiedDate=big, Extra__c={"a": [1, {"b": -big}]}))
    assert ch.fields == {"LastModifiedDate": big, "Extra__c": {"a": [1, {"b": -big}]}}
    row = {"sku": "S", "name": "n", "list_price": 1, "note": [2**64]}
    assert erp_change(ITEMS, envelope(after=row, table="items")).fields["note"] == [2**64]
    # A double literal stays a double, however large and integral: nothing to make exact.
    text = orjson.dumps(wrapped(h, LastModifiedDate=0, Extra__c=None))
    ch = sf_change(text.replace(b'"LastModifiedDate":0', b'"LastModifiedDate":1e25'))
    assert ch.fields["LastModifiedDate"] == 1e25 and type(ch.fields["LastModifiedDate"]) is float


def test_big_integers_in_the_header_are_exact():
    big = 2**70 + 1
    text = orjson.dumps(bare(header(commitNumber=0), Status="x")).replace(
        b'"commitNumber":0', b'"commitNumber":' + str(big).encode()
    )
    ch = sf_change(text)
    assert ch.order == (TS, big, 1)
    assert version_string(ch.order) == f"{TS}:{big}:1"
    assert reason(SF, text.replace(str(big).encode(), b"1e21")) == "bad_header"


# --- Salesforce: numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [0, -3, 12.5, "12.50", "-0.5", "1E+3", "7", None, 10**16 - 1, -(10**16) + 1]
)
def test_valid_amounts(value):
    h = header(changedFields=["TotalAmount"])
    assert sf_change(wrapped(h, TotalAmount=value)).fields == {"TotalAmount": value}


@pytest.mark.parametrize("value", [2**63, -(2**63)])
def test_integers_at_64_bits_are_valid_where_no_view_column_reads_them(value):
    h = header(entityName="OrderItem", changeType="CREATE")
    assert sf_change(wrapped(h, Quantity=1, UnitPrice=value)).fields["UnitPrice"] == value
    assert reason(SF, wrapped(header(changedFields=["TotalAmount"]), TotalAmount=value)) == (
        "bad_number"
    )


@pytest.mark.parametrize(
    "value", ["abc", "", "NaN", "Infinity", "-inf", True, False, [1], {"a": 1}]
)
def test_bad_amounts(value):
    h = header(changedFields=["TotalAmount"])
    assert reason(SF, wrapped(h, TotalAmount=value)) == "bad_number"
    h = header(entityName="OrderItem", changeType="CREATE")
    assert reason(SF, wrapped(h, Quantity=1, UnitPrice=value)) == "bad_number"
    assert reason(SF, wrapped(h, Quantity=value, UnitPrice=2)) == "bad_number"


def test_numbers_are_only_checked_when_among_the_changes():
    h = header(changedFields=["Status"])
    assert sf_change(flat(h, ORDER_FIELDS, Status="x", TotalAmount="junk")).fields == {
        "Status": "x"
    }
    h = header(entityName="Account", changeType="CREATE")
    assert sf_change(bare(h, TotalAmount="junk")).fields["TotalAmount"] == "junk"


def test_header_problems_come_before_number_problems():
    h = header(changedFields=["TotalAmount"], sequenceNumber="1")
    assert reason(SF, wrapped(h, TotalAmount="junk")) == "bad_header"


# --- ERP -------------------------------------------------------------------------------------


def source(table: str = "inventory", lsn: int = 24023128, ts_ms: int = TS, **kw) -> dict:
    s = {
        "version": "2.7.3.Final",
        "connector": "postgresql",
        "name": "erp",
        "ts_ms": ts_ms,
        "snapshot": "false",
        "db": "erp",
        "schema": "public",
        "table": table,
        "txId": 5551,
        "lsn": lsn,
    }
    s.update(kw)
    return {k: v for k, v in s.items() if v is not _DROP}


INV_ROW = {"sku": "SKU-00042", "warehouse": "DAL1", "qty_on_hand": 120, "qty_allocated": 10}


def envelope(op: str = "u", before: Any = None, after: Any = INV_ROW, **src) -> dict:
    return {
        "before": before,
        "after": after,
        "source": source(**src),
        "op": op,
        "ts_ms": TS + 123,
    }


def erp_change(topic: str, value: Any, **kw) -> Change:
    out = one(topic, value, **kw)
    assert type(out) is Change, out
    return out


def test_contract_debezium_example():
    ch = erp_change(INV, envelope())
    rk = '{"sku":"SKU-00042","warehouse":"DAL1"}'
    assert ch == Change(
        ERP,
        "inventory",
        rk,
        UPSERT,
        (24023128,),
        TS,
        f"erp|inventory|{rk}|24023128",
        INV_ROW,
        INV,
        2,
        7,
        True,
    )
    assert version_string(ch.order) == "24023128"


@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_upserts_carry_the_after_image(op):
    before = {**INV_ROW, "qty_on_hand": 1}
    ch = erp_change(INV, envelope(op, before=before))
    assert (ch.op, ch.fields) == (UPSERT, INV_ROW)


def test_delete_carries_the_before_image_and_skips_number_checks():
    before = {"sku": "SKU-00042", "warehouse": "DAL1", "qty_on_hand": "junk", "qty_allocated": None}
    ch = erp_change(INV, envelope("d", before=before, after=None))
    assert (ch.op, ch.fields) == (DELETE, before)
    assert ch.key == '{"sku":"SKU-00042","warehouse":"DAL1"}'


@pytest.mark.parametrize("op", ["t", "m"])
def test_truncate_and_logical_messages_are_ignored_and_feed_the_clock(op):
    ts = source()["ts_ms"]
    assert one(SO, {"op": op, "source": source()}) == Ignored(SO, 2, 7, f"op_{op}", ts)
    # Never a dead letter: without a usable source.ts_ms they have no event time.
    assert one(SO, {"op": op}) == Ignored(SO, 2, 7, f"op_{op}", None)
    for bad in ("x", None, {"ts_ms": "1"}, {"ts_ms": 1.5}, {"ts_ms": True}):
        assert one(SO, {"op": op, "source": bad}) == Ignored(SO, 2, 7, f"op_{op}", None)
    # Beyond the event-time range (years 1 to 9999, 64 bits or not): no time.
    for big in (-(2**70), 2**64 + 1, 10**17, 253_402_300_800_000):
        assert one(SO, {"op": op, "source": {"ts_ms": big}}) == Ignored(SO, 2, 7, f"op_{op}", None)
    # A float literal that orjson and the standard library both read as a float: no time.
    assert one(SO, {"op": op, "source": {"ts_ms": 1e308}}) == Ignored(SO, 2, 7, f"op_{op}", None)


@pytest.mark.parametrize(
    "change",
    [
        {"op": _DROP},
        {"op": None},
        {"op": 1},
        {"op": "x"},
        {"op": "C"},
        {"op": ""},
        {"source": _DROP},
        {"source": "erp"},
        {"source": None},
        {"source": source(lsn=_DROP)},
        {"source": source(lsn="24023128")},
        {"source": source(lsn=1.0)},
        {"source": source(lsn=True)},
        {"source": source(ts_ms=_DROP)},
        {"source": source(ts_ms=None)},
        {"source": source(ts_ms="1")},
        {"after": None},
        {"after": _DROP},
        {"after": [INV_ROW]},
        {"op": "d"},  # before is null
        {"op": "d", "before": "row"},
    ],
)
def test_bad_envelope(change):
    env = envelope()
    env.update(change)
    env = {k: v for k, v in env.items() if v is not _DROP}
    assert reason(INV, env) == "bad_envelope"
    assert reason(INV, {"schema": {"type": "struct"}, "payload": env}) == "bad_envelope"


def test_payload_without_schema_is_not_the_wrapped_form():
    assert reason(INV, {"payload": envelope()}) == "bad_envelope"
    assert erp_change(INV, {"schema": None, "payload": envelope()}).fields == INV_ROW


def test_the_configured_table_names_the_entity_and_source_table_the_identity():
    ch = erp_change(INV, envelope(table="inventory_v2"))
    assert ch.entity == "inventory"
    assert ch.identity == 'erp|inventory_v2|{"sku":"SKU-00042","warehouse":"DAL1"}|24023128'
    for missing in (_DROP, "", None, 5):
        ch = erp_change(INV, envelope(table=missing))
        assert ch.identity.startswith("erp|inventory|")


def test_primary_key_from_the_message_key_when_missing_in_the_image():
    before = {"sku": None, "warehouse": "DAL1"}
    env = envelope("d", before=before, after=None)
    ch = erp_change(INV, env, key={"sku": "SKU-9", "warehouse": "IGNORED"})
    assert ch.key == '{"sku":"SKU-9","warehouse":"DAL1"}'
    assert ch.fields == before  # the image is kept as it arrived
    wrapped_key = {"schema": {"type": "struct"}, "payload": {"sku": "SKU-9", "warehouse": "W"}}
    ch = erp_change(INV, envelope("d", before={"qty_on_hand": 1}, after=None), key=wrapped_key)
    assert ch.key == '{"sku":"SKU-9","warehouse":"W"}'


@pytest.mark.parametrize(
    "key",
    [
        None,
        b"SKU-9",
        b'{"sku": NaN}',
        {"sku": None},
        {"sku": 1.5},
        {"sku": True},
        {"sku": ["SKU-9"]},
        {"other": "SKU-9"},
        ["SKU-9"],
        {"payload": {"sku": "SKU-9"}},  # not schema-wrapped: no sku at the top
        orjson.loads(b'{"sku": "SKU-9", "x": ' + _nested(70) + b"}"),  # key too deep
    ],
)
def test_missing_primary_key(key):
    env = envelope("u", after={"description": "d"}, table="items")
    assert reason(ITEMS, env, key=key) == "missing_primary_key"


@pytest.mark.parametrize("bad", [1.5, True, ["a"], {"a": 1}])
def test_primary_key_of_the_wrong_type_in_the_image(bad):
    env = envelope(after={"sku": bad}, table="items")
    assert reason(ITEMS, env, key={"sku": "SKU-1"}) == "missing_primary_key"


def test_integer_and_big_integer_primary_keys():
    row = {"order_no": 1001, "status": "OPEN", "total_amount": "10.00"}
    ch = erp_change(SO, envelope(after=row, table="sales_orders"))
    assert ch.key == '{"order_no":1001}'
    assert ch.identity == 'erp|sales_orders|{"order_no":1001}|24023128'
    big = 2**80
    text = orjson.dumps(envelope(after={**row, "order_no": 0}, table="sales_orders"))
    text = text.replace(b'"order_no":0', b'"order_no":' + str(big).encode())
    ch = erp_change(SO, text)
    assert ch.key == f'{{"order_no":{big}}}' and ch.fields["order_no"] == big
    text = orjson.dumps(envelope(lsn=0)).replace(b'"lsn":0', b'"lsn":' + str(big).encode())
    assert erp_change(INV, text).order == (big,)


def test_record_key_is_compact_sorted_json_like_the_standard_library():
    row = {"warehouse": 'Zürich "1"\n', "sku": "é\u2028\x7f/\\", "qty_on_hand": 1}
    ch = erp_change(INV, envelope(after=row))
    pk = {"sku": row["sku"], "warehouse": row["warehouse"]}
    assert ch.key == json.dumps(pk, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(ch.key) == pk


def test_primary_key_is_checked_before_numbers():
    env = envelope(after={"qty_on_hand": "junk"})
    assert reason(INV, env) == "missing_primary_key"


@pytest.mark.parametrize("value", [0, 5, -2, 1.25, "12.50", "-7", "1e3", None, 2**64 - 1])
def test_erp_valid_numbers_are_kept_as_they_arrived(value):
    row = {**INV_ROW, "qty_on_hand": value}
    if value == 2**64 - 1:  # beyond a quantity's range (test_extreme_values.py)
        assert reason(INV, envelope(after=row)) == "bad_number"
    else:
        assert erp_change(INV, envelope(after=row)).fields == row
    row = {"sku": "S", "list_price": value}
    assert erp_change(ITEMS, envelope(after=row, table="items")).fields == row


@pytest.mark.parametrize("value", ["", "abc", "NaN", "inf", True, [1], {"v": 1}, "BOI="])
def test_erp_bad_numbers(value):
    assert reason(INV, envelope(after={**INV_ROW, "qty_allocated": value})) == "bad_number"
    assert reason(INV, envelope(after={**INV_ROW, "qty_on_hand": value})) == "bad_number"
    row = {"order_no": "SO-1", "total_amount": value}
    assert reason(SO, envelope(after=row, table="sales_orders")) == "bad_number"


def test_erp_non_numeric_columns_are_not_checked():
    row = {"sku": "S", "description": "NaN", "active": "yes", "list_price": None}
    assert erp_change(ITEMS, envelope(after=row, table="items")).fields == row


# --- ERP: schema-wrapped, precise decimals ----------------------------------------------------


def _decimal_field(name: str, scale: Any) -> dict:
    return {
        "type": "bytes",
        "optional": True,
        "name": "org.apache.kafka.connect.data.Decimal",
        "version": 1,
        "parameters": {"scale": scale, "connect.decimal.precision": "12"},
        "field": name,
    }


def items_schema(scale: Any = "2", price_field: dict | None = None) -> dict:
    def row(which: str) -> dict:
        return {
            "type": "struct",
            "fields": [
                {"type": "string", "optional": False, "field": "sku"},
                {"type": "string", "optional": True, "field": "description"},
                price_field or _decimal_field("list_price", scale),
                {"type": "boolean", "optional": True, "field": "active"},
            ],
            "optional": True,
            "name": "erp.public.items.Value",
            "field": which,
        }

    return {
        "type": "struct",
        "fields": [
            row("before"),
            row("after"),
            {"type": "struct", "fields": [], "field": "source"},
        ],
        "optional": False,
        "name": "erp.public.items.Envelope",
    }


def b64(unscaled: int, nbytes: int | None = None) -> str:
    n = nbytes or max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(n, "big", signed=True)).decode()


def items_msg(price: Any, scale: Any = "2", schema: dict | None = None, op: str = "r") -> dict:
    row = {"sku": "SKU-1", "description": "Widget", "list_price": price, "active": True}
    env = envelope(op, after=row, table="items")
    return {"schema": schema or items_schema(scale), "payload": env}


@pytest.mark.parametrize(
    "unscaled, scale, text",
    [
        (1250, "2", "12.50"),
        (-1250, "2", "-12.50"),
        (0, "2", "0.00"),
        (-1, "2", "-0.01"),
        (5, "0", "5"),
        (127, 0, "127"),
        (128, "0", "128"),  # needs a sign byte
        (-128, "0", "-128"),
        (123456, "3", "123.456"),
        (5, "10", "0.0000000005"),
        (12, "-2", "1200"),
        (2**70, "4", str(Decimal(2**70) / 10**4)),
    ],
)
def test_base64_decimals_are_decoded_with_their_scale(unscaled, scale, text):
    ch = erp_change(ITEMS, items_msg(b64(unscaled), scale))
    assert ch.fields["list_price"] == text
    assert Decimal(text) == Decimal(unscaled).scaleb(-int(scale))
    assert ch.fields["sku"] == "SKU-1" and ch.op == UPSERT


def test_base64_with_redundant_sign_bytes():
    assert erp_change(ITEMS, items_msg(b64(1250, 8))).fields["list_price"] == "12.50"
    assert erp_change(ITEMS, items_msg(b64(-1250, 8))).fields["list_price"] == "-12.50"


def test_base64_is_decoded_only_where_the_schema_declares_a_decimal():
    price = b64(1250)  # "BOI="
    plain = {"type": "string", "optional": True, "field": "list_price"}
    assert reason(ITEMS, items_msg(price, schema=items_schema(price_field=plain))) == "bad_number"
    assert reason(ITEMS, items_msg(price)["payload"]) == "bad_number"  # schemaless
    for bad_scale in (None, "x", "2.5", 2.0, ["2"], "99999999"):
        assert reason(ITEMS, items_msg(price, scale=bad_scale)) == "bad_number"
    no_params = _decimal_field("list_price", "2")
    del no_params["parameters"]
    assert (
        reason(ITEMS, items_msg(price, schema=items_schema(price_field=no_params))) == "bad_number"
    )
    assert reason(ITEMS, items_msg(price, schema=["not", "a", "schema"])) == "bad_number"


def test_decimal_strings_and_numbers_pass_in_a_decimal_column():
    assert erp_change(ITEMS, items_msg("12.50")).fields["list_price"] == "12.50"
    assert erp_change(ITEMS, items_msg(12.5)).fields["list_price"] == 12.5
    assert erp_change(ITEMS, items_msg(None)).fields["list_price"] is None


@pytest.mark.parametrize(
    "price", ["", "B", "BOI", "BO I=", "!!!!", "BOI=\n", "A" * 2000, "é", "BOI=é", "AB=C"]
)
def test_invalid_base64_in_a_decimal_column_is_bad_number(price):
    assert reason(ITEMS, items_msg(price)) == "bad_number"


def test_base64_that_is_also_a_decimal_string_is_read_as_base64():
    # "1234" is valid base64 (bytes d7 6d f8) and a valid decimal string.
    unscaled = int.from_bytes(base64.b64decode("1234"), "big", signed=True)
    assert erp_change(ITEMS, items_msg("1234")).fields["list_price"] == str(
        Decimal(unscaled).scaleb(-2)
    )


def test_schema_wrapped_delete_leaves_the_before_image_alone():
    env = envelope("d", before={"sku": "SKU-1", "list_price": "BOI="}, after=None, table="items")
    ch = erp_change(ITEMS, {"schema": items_schema(), "payload": env})
    assert ch.fields == {"sku": "SKU-1", "list_price": "BOI="}


# --- batches ---------------------------------------------------------------------------------


def test_batch_keeps_input_order_and_one_outcome_per_message():
    msgs = [
        raw(SF, wrapped(header(recordIds=["801000000000002AAA", ORDER_ID]), Status="x"), offset=0),
        raw(INV, None, offset=1),
        raw(SO, b"nope", offset=2),
        raw(INV, envelope(), offset=3),
        raw(SF, bare(header(entityName="Lead")), offset=4),
    ]
    out = decode_batch(msgs, CFG)
    assert [(type(o).__name__, o.offset) for o in out] == [
        ("Change", 0),
        ("Change", 0),
        ("Ignored", 1),
        ("DeadLetter", 2),
        ("Change", 3),
        ("Ignored", 4),
    ]
    assert decode_batch([], CFG) == []


def test_decoding_twice_gives_equal_results():
    msgs = [
        raw(SF, wrapped(header(changeType="CREATE"), Status="Draft", Id="x")),
        raw(SF, flat(header(changeType="UNDELETE"), ORDER_FIELDS)),
        raw(ITEMS, items_msg(b64(1250))),
    ]
    first = decode_batch(msgs, CFG)
    assert decode_batch(msgs, CFG) == first
    assert decode_batch(copy.deepcopy(msgs), CFG) == first


def test_every_reason_code_is_reachable():
    seen = {
        reason(SF, b"x" * 2_000_000),
        reason(SF, b"{"),
        reason(SF, _nested(65)),
        reason(SF, b"[]"),
        reason(SF, {}),
        reason(SF, bare(header(changeType="x"))),
        reason(SF, wrapped(header(changedFields=["TotalAmount"]), TotalAmount="x")),
        reason(INV, {"op": 1}),
        reason(INV, envelope(after={})),
        reason(SF, bare(header(), **{f"F{i}__c": i for i in range(1001)})),
    }
    assert seen == REASONS


def test_generated_stream_decodes_as_labelled():
    """The simulation's own labels (applied/ignored) agree with the decoder on every message."""
    from sferp.generator_forms import APPLIED, ERP_ROLES, SF_ROLE
    from sferp.generator_sim import Simulation

    topics = {SF_ROLE: SF, ERP_ROLES["items"]: ITEMS, ERP_ROLES["inventory"]: INV}
    topics[ERP_ROLES["sales_orders"]] = SO
    msgs, labels = [], []
    for i, (role, key, value, label, _ms) in enumerate(Simulation(40, 3, TS).events()):
        msgs.append(RawMessage(topics[role], 0, i, key, value, -1))
        labels.append(label)
    out = decode_batch(msgs, CFG)
    primary = [o for o in out if type(o) is not Change or o.primary]
    assert len(primary) == len(msgs) > 500
    kinds = {type(o).__name__ for o in primary}
    assert "DeadLetter" not in kinds
    for o, label in zip(primary, labels, strict=True):
        assert (type(o) is Change) == (label == APPLIED), (o, label)


@pytest.mark.parametrize(
    "raw, value, text",
    [
        (b'{"q":0.12500000000000001}', 0.125, "0.12500000000000001"),
        (b'{"q" : \n -1.2345678901234567e5}', -123456.78901234567, "-123456.78901234567"),
        (b'{"q":1.5}', 1.5, None),  # a double holds it
        (b'{"q":0.1250000000000000000}', 0.125, None),  # trailing zeros: exact already
        (b'{"q":0.000000000000001}', 1e-15, None),  # leading zeros are not significant
        (b'{"before":{"q":0.125},"after":{"q":0.12500000000000001}}', 0.125, "0.12500000000000001"),
        (b'{"q":["q",0.1],"x":{"q":0.12500000000000001}}', 0.125, "0.12500000000000001"),
        # two different texts with one double: which one was meant is not known
        (b'{"a":{"q":0.12500000000000001},"b":{"q":0.125000000000000001}}', 0.125, None),
        (b'{"q":1.0000000000000001e999}', float("inf"), None),  # beyond any double anyway
        (b'{"q":"0.12500000000000001"}', 0.125, None),  # a string is no number
        (b'{"q":10000000000000000000000000001}', 1e28, None),  # integers: re-parsed exactly
    ],
)
def test_a_number_a_double_cannot_hold_is_read_from_its_text(raw, value, text):
    from sferp.operators.decode_common import exact_number_text

    assert exact_number_text(raw, "q", value) == text
