"""Fuzzing the decoder: random bytes, random JSON, and mutations of valid messages of every form.

Properties: decode_batch never raises, accounts for every message exactly once
(Changes with primary=True + DeadLetters + Ignored == messages), keeps input
order and coordinates, produces well-formed Changes, and agrees with the
independent reference model (`sferp.reference.decode`) on every message the
two are meant to agree on.

Also: the limits of docs/semantics.md §1 (size, depth, field count) at their
edges, a bulk mutation fuzzer over the generator's traffic (every Salesforce
form, both Debezium envelopes, Kafka keys, tombstones), and memory that stays
bounded on hostile input.

`SFERP_FUZZ_EXAMPLES=N` sets the number of examples per hypothesis test (default
300) and `SFERP_FUZZ_MESSAGES=N` the number of messages of the bulk fuzzer
(default 20,000); `make fuzz` raises both. Examples and mutations are new on
every run, except under `CI=true`, which replays fixed ones (conftest.py). The
number of messages decoded is printed at the end of the module (`pytest -s`).
"""

from __future__ import annotations

import base64
import copy
import gc
import json
import os
import random
import re
import string
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sferp.operators.decode import DecodeConfig, decode_batch
from sferp.operators.decode_common import REASONS, TOO_MANY_FIELDS, raw_text
from sferp.operators.decode_erp import NUMERIC_COLUMNS, PRIMARY_KEYS
from sferp.operators.decode_salesforce import (
    ENTITY_FIELDS,
    NUMERIC_FIELDS,
    REFERENCE_FIELDS,
)

from sferp import reference
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
)

EXAMPLES = int(os.environ.get("SFERP_FUZZ_EXAMPLES", "300"))
BULK_MESSAGES = int(os.environ.get("SFERP_FUZZ_MESSAGES", "20000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SF = "sf.cdc"
ERP_TOPICS = {"items": "erp.public.items", "inventory": "erp.public.inventory"}
ERP_TOPICS["sales_orders"] = "erp.public.sales_orders"
ROLES = {SF: "salesforce", **{t: table for table, t in ERP_TOPICS.items()}}
CFG = DecodeConfig(topics=ROLES, max_message_bytes=4096)
REF_CFG = reference.ReferenceConfig(topics=ROLES, max_message_bytes=4096)
TOPICS = sorted(ROLES)

SF_OPS = {CREATE, UPDATE, DELETE, UNDELETE, GAP}
CHANGE_TYPES = [
    "CREATE",
    "UPDATE",
    "DELETE",
    "UNDELETE",
    "GAP_CREATE",
    "GAP_UPDATE",
    "GAP_DELETE",
    "GAP_UNDELETE",
    "GAP_OVERFLOW",
]
ALNUM = string.ascii_letters + string.digits
I64 = 2**63 - 1

# --- strategies ------------------------------------------------------------------------------

ints = st.integers(-I64, I64)
floats = st.floats(allow_nan=False, allow_infinity=False)
decimal_strings = st.decimals(allow_nan=False, allow_infinity=False, places=None).map(str)
json_scalars = st.none() | st.booleans() | ints | floats | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
sf_ids = (
    st.text(alphabet=ALNUM, min_size=15, max_size=15)
    | st.text(alphabet=ALNUM, min_size=18, max_size=18)
    | st.sampled_from(["801000000000001", "801000000000001AAA", "x", "801-00000000001"])
)
amounts = st.none() | ints | floats | decimal_strings | st.sampled_from(["12.50", "abc", "", True])
field_values = json_scalars | amounts | sf_ids


@st.composite
def sf_documents(draw: Any) -> dict:
    """A Salesforce CDC event in one of the three forms, mostly valid."""
    entity = draw(st.sampled_from([*ENTITY_FIELDS, *ENTITY_FIELDS, "Lead"]))
    change_type = draw(st.sampled_from([*CHANGE_TYPES, *CHANGE_TYPES[:4], "UPDATE"]))
    min_ids = 0 if change_type == "GAP_OVERFLOW" else 1
    ids = draw(st.lists(sf_ids, min_size=min_ids, max_size=3))
    names = [*ENTITY_FIELDS.get(entity, ("Name", "Email")), "Description", "Extra__c"]
    fields = draw(st.dictionaries(st.sampled_from(names), field_values, max_size=6))
    name_lists = st.lists(st.sampled_from([*names, "Id"]), max_size=4)
    header: dict[str, Any] = {
        "entityName": entity,
        "recordIds": ids,
        "changeType": change_type,
        "changeOrigin": "com/salesforce/api/rest/62.0",
        "transactionKey": draw(st.uuids()).hex,
        "sequenceNumber": draw(st.integers(0, 10)),
        "commitTimestamp": draw(st.integers(0, 2 * 10**12)),
        "commitNumber": draw(st.integers(0, 10**12)),
        "commitUser": "005000000000001AAA",
        "diffFields": [],
    }
    for list_name in ("changedFields", "nulledFields"):
        if draw(st.booleans()):
            header[list_name] = draw(name_lists)
    form = draw(st.sampled_from(["wrapped", "bare", "flat"]))
    if form == "wrapped":
        return {"replayId": "0000000000004711", "payload": {"ChangeEventHeader": header, **fields}}
    if form == "bare":
        return {"ChangeEventHeader": header, **fields}
    doc = {"Id": ids[0] if ids else None, "ReplayId": "4711", "ChangeEventHeader": header}
    doc.update(dict.fromkeys(ENTITY_FIELDS.get(entity, ())))
    doc.update(fields)
    doc.update({"_ObjectType": entity + "ChangeEvent", "_EventType": "x"})
    return doc


def _b64(unscaled: int) -> str:
    n = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(n, "big", signed=True)).decode()


@st.composite
def erp_documents(draw: Any) -> tuple[str, Any, dict]:
    """(table, Kafka key object or None, Debezium envelope), plain or schema-wrapped."""
    table = draw(st.sampled_from(sorted(PRIMARY_KEYS)))
    op = draw(st.sampled_from(["c", "u", "r", "c", "u", "d", "d", "t", "m"]))
    wrapped = draw(st.booleans())
    scales = {c: draw(st.integers(0, 6)) for c in NUMERIC_COLUMNS[table]}
    row: dict[str, Any] = {}
    for col in PRIMARY_KEYS[table]:
        row[col] = draw(st.text(max_size=10) | ints | st.none() | floats | st.booleans())
    for col in NUMERIC_COLUMNS[table]:
        if wrapped and draw(st.booleans()):
            row[col] = _b64(draw(st.integers(-(10**12), 10**12)))
        else:
            row[col] = draw(amounts | st.text(max_size=6))
    row["status"] = draw(st.sampled_from(["OPEN", "INVOICED", None]))
    source = {
        "connector": "postgresql",
        "ts_ms": draw(st.integers(0, 2 * 10**12)),
        "table": draw(st.sampled_from([table, "other", None])),
        "lsn": draw(st.integers(0, 2**40)),
    }
    env: dict[str, Any] = {"op": op, "source": source, "ts_ms": source["ts_ms"] + 5}
    env["before"] = row if op == "d" else draw(st.none() | st.just(row))
    env["after"] = None if op == "d" else row
    key = None
    if draw(st.booleans()):
        key = {c: draw(st.text(max_size=6) | ints) for c in PRIMARY_KEYS[table]}
        if draw(st.booleans()):
            key = {"schema": {"type": "struct"}, "payload": key}
    if not wrapped:
        return table, key, env
    columns = [
        {
            "type": "bytes",
            "name": "org.apache.kafka.connect.data.Decimal",
            "parameters": {"scale": str(scales[c]), "connect.decimal.precision": "12"},
            "field": c,
        }
        for c in NUMERIC_COLUMNS[table]
    ]
    columns += [{"type": "string", "field": c} for c in PRIMARY_KEYS[table]]
    schema = {
        "type": "struct",
        "fields": [
            {"type": "struct", "fields": columns, "field": "before"},
            {"type": "struct", "fields": columns, "field": "after"},
        ],
    }
    return table, key, {"schema": schema, "payload": env}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


@st.composite
def mutated(draw: Any, base: st.SearchStrategy, keep_schema: bool = False) -> Any:
    """A document with 1-3 random structural edits (replace, delete, wrap, stringify)."""
    doc = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if not (keep_schema and p[:1] == ("schema",))]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "wrap", "stringify", "null"]))
        if not path:
            if action == "replace":
                doc = draw(json_values)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if action == "delete":
            del parent[last]
        elif action == "replace":
            parent[last] = draw(json_values)
        elif action == "wrap":
            parent[last] = [parent[last]]
        elif action == "stringify":
            parent[last] = json.dumps(parent[last])
        else:
            parent[last] = None
    return doc


@st.composite
def byte_mutations(draw: Any, base: bytes) -> bytes:
    """Truncate, flip, insert or delete bytes of an encoded message."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "cut":
            del data[pos:]
        elif action == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    return bytes(data)


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


sf_messages = st.tuples(st.just(SF), st.none(), sf_documents().map(encode))
erp_messages = erp_documents().map(
    lambda t: (ERP_TOPICS[t[0]], None if t[1] is None else encode(t[1]), encode(t[2]))
)
valid_messages = sf_messages | erp_messages


def mutated_messages(keep_schema: bool = False) -> st.SearchStrategy:
    sf = st.tuples(st.just(SF), st.none(), mutated(sf_documents(), keep_schema).map(encode))
    erp = erp_documents().flatmap(
        lambda t: st.tuples(
            st.just(ERP_TOPICS[t[0]]),
            st.just(None if t[1] is None else encode(t[1])),
            mutated(st.just(t[2]), keep_schema).map(encode),
        )
    )
    return sf | erp


random_bytes = st.tuples(st.sampled_from(TOPICS), st.none() | st.binary(max_size=32), st.binary())
random_json = st.tuples(st.sampled_from(TOPICS), st.none(), json_values.map(encode) | st.just(None))
garbled = valid_messages.flatmap(
    lambda m: st.tuples(st.just(m[0]), st.just(m[1]), byte_mutations(m[2]))
)
any_message = valid_messages | mutated_messages() | random_bytes | random_json | garbled


DECODED = {"messages": 0, "examples": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    started = time.monotonic()
    yield
    print(
        f"\ndecoder fuzz: {DECODED['messages']:,} messages in {DECODED['examples']:,} "
        f"batches, {time.monotonic() - started:.1f} s"
    )


def as_raw(batch: list[tuple[str, bytes | None, bytes | None]]) -> list[RawMessage]:
    DECODED["messages"] += len(batch)
    DECODED["examples"] += 1
    return [
        RawMessage(topic, i % 3, 1000 + i, key, value, -1)
        for i, (topic, key, value) in enumerate(batch)
    ]


# --- the properties --------------------------------------------------------------------------


def check_change(ch: Change, msg: RawMessage) -> None:
    assert (ch.topic, ch.partition, ch.offset) == (msg.topic, msg.partition, msg.offset)
    assert all(type(x) is int for x in ch.order)
    if ch.source == SALESFORCE:
        assert ROLES[msg.topic] == "salesforce"
        assert ch.op in SF_OPS and ch.entity in ENTITY_FIELDS
        assert len(ch.order) == 3 and ch.event_time == ch.order[0]
        assert ch.identity.startswith(f"sf|{ch.entity}|")
        assert not (len(ch.key) == 15 and ch.key.isascii() and ch.key.isalnum())
        if ch.op in (GAP, DELETE):
            assert ch.fields is None
        else:
            assert type(ch.fields) is dict
            for name in REFERENCE_FIELDS[ch.entity]:
                v = ch.fields.get(name)
                assert not (type(v) is str and len(v) == 15 and v.isascii() and v.isalnum())
            for name in NUMERIC_FIELDS[ch.entity]:
                v = ch.fields.get(name)
                assert type(v) in (type(None), int, float, str)
        if ch.op in (CREATE, UNDELETE):
            assert set(ENTITY_FIELDS[ch.entity]) <= set(ch.fields)
    else:
        assert ch.source == ERP and ch.op in (UPSERT, DELETE)
        assert ch.entity == ROLES[msg.topic]
        assert len(ch.order) == 1 and type(ch.event_time) is int
        assert type(ch.fields) is dict
        pk = json.loads(ch.key)
        assert sorted(pk) == sorted(PRIMARY_KEYS[ch.entity])
        assert ch.key == json.dumps(pk, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert ch.identity.endswith(f"|{ch.key}|{ch.order[0]}") and ch.identity.startswith("erp|")


def check_batch(msgs: list[RawMessage], out: list) -> None:
    """One outcome per message, in order, with the message's coordinates."""
    assert len([o for o in out if type(o) is not Change or o.primary]) == len(msgs)
    index = -1
    primary: Any = None
    for o in out:
        if type(o) is Change and not o.primary:  # a further record of the same event
            assert type(primary) is Change and primary.identity == o.identity
            assert (o.order, o.op, o.fields) == (primary.order, primary.op, primary.fields)
            assert o.key > primary.key
            check_change(o, msgs[index])
            continue
        index += 1
        msg = msgs[index]
        primary = o
        assert (o.topic, o.partition, o.offset) == (msg.topic, msg.partition, msg.offset)
        if type(o) is DeadLetter:
            assert o.reason in REASONS
            assert o.raw == raw_text(msg.value)
        elif type(o) is Ignored:
            assert o.why in ("tombstone", "entity", "op_t", "op_m")
            assert (o.why == "tombstone") == (msg.value is None)
        else:
            assert type(o) is Change
            check_change(o, msg)
    assert index == len(msgs) - 1


def _lone_surrogate_escape(value: bytes | None) -> bool:
    """Documented difference: escaped lone surrogates are not_json here, text to the reference."""
    try:
        json.dumps(json.loads(value or b""), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    except RecursionError:  # too deep to parse here: any surrogate escape in the text
        return re.search(rb"\\u[dD][89a-fA-F]", value or b"") is not None
    except ValueError:
        return False
    return False


def check_against_reference(msgs: list[RawMessage], out: list) -> None:
    ours: list[list] = []
    for o in out:
        if type(o) is Change and not o.primary:
            ours[-1].append(o)
        else:
            ours.append([o])
    for msg, mine in zip(msgs, ours, strict=True):
        r = reference.decode(msg, REF_CFG)
        expected = r if isinstance(r, list) else [r]
        if mine != expected and _lone_surrogate_escape(msg.value):
            assert type(mine[0]) is DeadLetter and mine[0].reason == "not_json"
            continue
        assert mine == expected, msg


@FUZZ
@given(st.lists(any_message, max_size=12))
def test_any_batch_is_accounted_for(batch):
    msgs = as_raw(batch)
    check_batch(msgs, decode_batch(msgs, CFG))


@FUZZ
@given(st.lists(random_bytes, min_size=1, max_size=8))
def test_random_bytes(batch):
    msgs = as_raw(batch)
    out = decode_batch(msgs, CFG)
    check_batch(msgs, out)


@FUZZ
@given(st.lists(valid_messages, min_size=1, max_size=8))
def test_valid_messages_agree_with_the_reference(batch):
    msgs = as_raw(batch)
    out = decode_batch(msgs, CFG)
    check_batch(msgs, out)
    check_against_reference(msgs, out)


@FUZZ
@given(st.lists(mutated_messages(keep_schema=True) | random_json, min_size=1, max_size=6))
def test_mutated_messages_agree_with_the_reference(batch):
    # Schemas are left intact here: the reference decodes any declared scale, and a
    # mutated scale of 10**9 would make it (by design, not the decoder) print a
    # gigabyte-long decimal.
    msgs = as_raw(batch)
    out = decode_batch(msgs, CFG)
    check_batch(msgs, out)
    check_against_reference(msgs, out)


@FUZZ
@given(st.lists(garbled, min_size=1, max_size=6))
def test_garbled_bytes_agree_with_the_reference(batch):
    msgs = as_raw(batch)
    out = decode_batch(msgs, CFG)
    check_batch(msgs, out)
    check_against_reference(msgs, out)


@FUZZ
@given(st.integers(-(2**200), 2**200), st.integers(0, 30))
def test_base64_decimals_match_plain_notation(unscaled, scale):
    """Decoded precise decimals equal Debezium's string mode, built here digit by digit."""
    digits = str(abs(unscaled)).rjust(scale + 1, "0")
    text = ("-" if unscaled < 0 else "") + (
        digits[:-scale] + "." + digits[-scale:] if scale else digits
    )
    row = {"sku": "S", "list_price": _b64(unscaled)}
    col = {
        "type": "bytes",
        "name": "org.apache.kafka.connect.data.Decimal",
        "parameters": {"scale": str(scale)},
        "field": "list_price",
    }
    schema = {"type": "struct", "fields": [{"type": "struct", "fields": [col], "field": "after"}]}
    env = {"op": "c", "after": row, "source": {"lsn": 1, "ts_ms": 2, "table": "items"}}
    msg = RawMessage(
        ERP_TOPICS["items"], 0, 0, None, encode({"schema": schema, "payload": env}), -1
    )
    [ch] = decode_batch([msg], CFG)
    assert ch.fields["list_price"] == text


# --- the field-count limit -------------------------------------------------------------------

SF_METADATA = {"ChangeEventHeader", "Id", "ReplayId", "replayId", "_ObjectType", "_EventType"}
NARROW = 8
CFG_NARROW = DecodeConfig(topics=ROLES, max_message_bytes=4096, max_fields=NARROW)


def width(msg: RawMessage) -> int:
    """What the field limit counts (docs/semantics.md §1), worked out here from the JSON."""
    o = json.loads(msg.value or b"")
    if ROLES[msg.topic] == "salesforce":
        b = o["payload"] if type(o.get("payload")) is dict else o
        n = sum(1 for k in b if k not in SF_METADATA)
        h = b.get("ChangeEventHeader")
        if type(h) is dict and h.get("changeType") == "UPDATE":
            lists = [h.get("changedFields"), h.get("nulledFields")]
            if all(x is None or type(x) is list for x in lists):
                n = max(n, sum(len(x or ()) for x in lists))
        return n
    e = o["payload"] if type(o.get("payload")) is dict and "schema" in o else o
    image = e.get("before") if e.get("op") == "d" else e.get("after")
    return len(image) if type(image) is dict else 0


def _groups(out: list) -> list[list]:
    groups: list[list] = []
    for o in out:
        if type(o) is Change and not o.primary:
            groups[-1].append(o)
        else:
            groups.append([o])
    return groups


def check_with_limit(msgs: list[RawMessage], out: list, limit: int, ref_cfg: Any) -> None:
    """Agreement with the reference model, which has no field limit: where the decoder says
    `too_many_fields`, the message is too wide and the reference finds nothing wrong before
    the limit's step; where the reference applies a message, it is within the limit."""
    for msg, mine in zip(msgs, _groups(out), strict=True):
        r = reference.decode(msg, ref_cfg)
        expected = r if isinstance(r, list) else [r]
        first = expected[0]
        if type(mine[0]) is DeadLetter and mine[0].reason == TOO_MANY_FIELDS:
            assert width(msg) > limit, msg
            if ROLES[msg.topic] == "salesforce":
                later = {"bad_number", "bad_header"}
            else:
                later = {"missing_primary_key", "bad_number"}
            assert type(first) is Change or (type(first) is DeadLetter and first.reason in later), (
                msg,
                first,
            )
            if type(first) is DeadLetter and first.reason == "bad_header":
                assert b'"UPDATE"' in (msg.value or b""), msg  # only UPDATE lists come later
            continue
        if type(first) is Change:
            assert width(msg) <= limit, ("applied although too wide", msg)
        if mine != expected and _lone_surrogate_escape(msg.value):
            assert type(mine[0]) is DeadLetter and mine[0].reason == "not_json"
            continue
        assert mine == expected, msg


@st.composite
def wide_messages(draw: Any) -> tuple[str, bytes | None, bytes]:
    """Valid-looking messages with a few fields more or less than NARROW."""
    extra = {f"X{i}__c": draw(json_scalars) for i in range(draw(st.integers(0, NARROW + 4)))}
    if draw(st.booleans()):
        doc = draw(sf_documents())
        body = doc["payload"] if "payload" in doc else doc
        body.update(extra)
        header = body["ChangeEventHeader"]
        if header["changeType"] == "UPDATE" and draw(st.booleans()):
            names = [f"X{i}__c" for i in range(draw(st.integers(0, NARROW + 3)))]
            header["changedFields"] = names
            header["nulledFields"] = draw(st.lists(st.sampled_from(["A", "B"]), max_size=4))
        return SF, None, encode(doc)
    table, key, env = draw(erp_documents())
    e = env["payload"] if "schema" in env else env
    image = e["before"] if e["op"] == "d" else e["after"]
    if type(image) is dict:
        image.update(extra)
    return ERP_TOPICS[table], None if key is None else encode(key), encode(env)


@FUZZ
@given(st.lists(wide_messages() | mutated_messages(keep_schema=True), min_size=1, max_size=8))
def test_field_limit_is_enforced_exactly(batch):
    msgs = as_raw(batch)
    out = decode_batch(msgs, CFG_NARROW)
    check_batch(msgs, out)
    check_with_limit(msgs, out, NARROW, REF_CFG)


# --- size and depth at their edges -----------------------------------------------------------


@st.composite
def edge_messages(draw: Any) -> tuple[str, bytes | None, bytes]:
    """A valid message padded to within a few bytes of the size limit, or nested around the
    depth limit (64) or around the parsers' recursion limits (about 1,000)."""
    topic, key, value = draw(valid_messages)
    doc = json.loads(value)
    target = doc.get("payload") if type(doc.get("payload")) is dict else doc
    if draw(st.booleans()):
        target["Pad__c"] = ""
        room = 4096 + draw(st.integers(-3, 3)) - len(encode(doc))
        target["Pad__c"] = "x" * max(0, room)
    else:
        depth = draw(st.integers(58, 68) | st.integers(990, 1100))
        leaf = draw(json_scalars)
        nested: Any = leaf
        for i in range(depth):
            nested = [nested] if i % 3 else {"k": nested}
        target["Deep__c"] = nested
    value = encode(doc)
    if draw(st.integers(0, 4)) == 0:
        value = draw(byte_mutations(value))
    return topic, key, value


@FUZZ
@given(st.lists(edge_messages(), min_size=1, max_size=4))
def test_size_and_depth_limits_at_their_edges(batch):
    msgs = as_raw(batch)
    out = decode_batch(msgs, CFG)
    check_batch(msgs, out)
    check_against_reference(msgs, out)


# --- bulk mutation fuzzing of the generator's traffic ---------------------------------------

BULK_BYTES = 8192
BULK_LIMIT = 40
BULK_CFG = DecodeConfig(topics=ROLES, max_message_bytes=BULK_BYTES, max_fields=BULK_LIMIT)
BULK_REF = reference.ReferenceConfig(topics=ROLES, max_message_bytes=BULK_BYTES)
SPECIAL: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64,
    -(2**70),
    10**400,
    1e308,
    -0.0,
    0.1,
    "",
    "x" * 300,
    "12.50",
    "1e999",
    "NaN",
    "\ud800",
    [],
    {},
    [[[]]],
    {"a": {"b": [None]}},
    "801000000000001",
    "801000000000001AAA",
    "SKU-1",
]


NEST = "\x00nest\x00"
NEST_JSON = json.dumps(NEST).encode()


def _bulk_seeds() -> list[RawMessage]:
    from sferp.demo import generated_messages
    from sferp.generator import GeneratorConfig

    cfg = GeneratorConfig(orders=40, duplicates=0.05, disorder=0.2, bad=0.05, seed=11)
    seeds = [m for m in generated_messages(cfg) if m.topic in ROLES]
    assert {m.topic for m in seeds} == set(ROLES)
    return seeds


def _dict_nodes(node: Any, path: tuple = ()) -> list[tuple]:
    out = []
    if type(node) is dict:
        out.append(path)
        for k, v in node.items():
            if path or k != "schema":
                out.extend(_dict_nodes(v, (*path, k)))
    elif type(node) is list:
        for i, v in enumerate(node):
            out.extend(_dict_nodes(v, (*path, i)))
    return out


def _at(doc: Any, path: tuple) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _mutate_doc(rng: random.Random, doc: Any) -> Any:
    """One structural edit anywhere but in the Debezium schema."""
    paths = [p for p in _paths(doc) if p[:1] != ("schema",)]
    path = rng.choice(paths)
    op = rng.randrange(9)
    if not path:
        return copy.deepcopy(rng.choice(SPECIAL)) if op == 0 else doc
    parent, last = _at(doc, path[:-1]), path[-1]
    if op == 0:
        parent[last] = copy.deepcopy(rng.choice(SPECIAL))
    elif op == 1:
        del parent[last]
    elif op == 2:
        parent[last] = [parent[last]]
    elif op == 3:
        parent[last] = json.dumps(parent[last])
    elif op == 4:
        parent[last] = None
    elif op == 5 and type(parent) is dict:  # rename the key
        parent[rng.choice(["Id", "payload", "schema", "op", "after", "x"])] = parent.pop(last)
    elif op == 6:  # widen a container to around the field limit
        node = _at(doc, rng.choice(_dict_nodes(doc) or [()]))
        if type(node) is dict:
            for i in range(BULK_LIMIT - len(node) + rng.randint(-2, 3)):
                node[f"W{i}"] = rng.choice(SPECIAL[:16])
    elif op == 7:  # long update lists
        header = _at(doc, path[:-1])
        if type(header) is dict:
            header["changedFields"] = [f"F{i}" for i in range(BULK_LIMIT + rng.randint(-3, 3))]
    else:  # nested deeply: the placeholder becomes nested arrays once encoded
        parent[last] = NEST
    return doc


def _mutate_bytes(rng: random.Random, data: bytes, other: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(b) + 1)
        op = rng.randrange(7)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos:pos] = rng.choice([b"\xff", b"\xef\xbb\xbf", b"\\ud800", b"{", b"]", b'"', b","])
        elif op == 2:
            del b[pos : pos + rng.randint(1, 8)]
        elif op == 3:
            del b[pos:]
        elif op == 4:  # splice with another message
            b[pos:] = other[rng.randrange(len(other) + 1) :]
        elif op == 5:  # a duplicate key
            b[1:1] = b'"op":"x","payload":null,'
        else:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(b)


def _mutate_key(rng: random.Random, key: bytes | None) -> bytes | None:
    return rng.choice(
        [
            None,
            b"",
            b"garbage",
            b'{"sku": null, "warehouse": 1.5, "order_no": true}',
            b'{"schema": {}, "payload": {"sku": "SKU-9", "warehouse": "W", "order_no": 7}}',
            b"[" * 70 + b"]" * 70,
            b'{"sku": ' + b"9" * 30 + b"}",
            key,
        ]
    )


def bulk_mutations(seeds: list[RawMessage], n: int, seed: int) -> list[RawMessage]:
    """`n` messages: the seeds, mutated in structure, bytes, key, or size, and tombstones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        m = rng.choice(seeds)
        key, value = m.key, m.value
        r = rng.random()
        if r < 0.03:
            value = None
        elif r < 0.45 and value is not None:
            try:
                doc = json.loads(value)
            except (ValueError, RecursionError):
                doc = None
            if doc is not None:
                for _ in range(rng.randint(1, 3)):
                    doc = _mutate_doc(rng, doc)
                value = json.dumps(doc, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode(
                    "utf-8", "surrogatepass"
                )
                depth = rng.choice([rng.randint(60, 66), rng.randint(990, 1100)])
                value = value.replace(NEST_JSON, b"[" * depth + b"0" + b"]" * depth)
        elif r < 0.8 and value is not None:
            value = _mutate_bytes(rng, value, rng.choice(seeds).value or b"")
        elif r < 0.9:
            key = _mutate_key(rng, key)
        elif value is not None:  # right at the size limit
            value = value + b" " * max(0, BULK_BYTES - len(value) + rng.randint(-2, 2))
        out.append(RawMessage(m.topic, m.partition, i, key, value, -1))
    return out


CI_SEED = 1045526919  # fixed under CI (see conftest.py); it once found integers beyond 64 bits


def test_bulk_mutations_of_generated_traffic():
    seeds = _bulk_seeds()
    seed = int(os.environ.get("SFERP_FUZZ_SEED", "0")) or (
        CI_SEED if os.environ.get("CI") else random.randrange(1, 2**31)
    )
    msgs = bulk_mutations(seeds, BULK_MESSAGES, seed)
    DECODED["messages"] += len(msgs)
    reasons: set[str] = set()
    for i in range(0, len(msgs), 64):
        batch = msgs[i : i + 64]
        out = decode_batch(batch, BULK_CFG)
        try:
            check_batch(batch, out)
            check_with_limit(batch, out, BULK_LIMIT, BULK_REF)
        except AssertionError as exc:
            raise AssertionError(
                f"bulk fuzz failed; reproduce with SFERP_FUZZ_SEED={seed}"
            ) from exc
        reasons |= {o.reason for o in out if type(o) is DeadLetter}
    if BULK_MESSAGES >= 5000:  # the mutations reach every limit and most reasons
        assert {"too_large", "too_deep", "too_many_fields", "not_json", "bad_header"} <= reasons


# --- memory ----------------------------------------------------------------------------------

MIB = 1 << 20
_HEADER = {
    "entityName": "Order",
    "recordIds": ["801000000000001AAA"],
    "changeType": "CREATE",
    "transactionKey": "t",
    "sequenceNumber": 1,
    "commitTimestamp": 1,
    "commitNumber": 1,
}


def _fit(prefix: bytes, unit: bytes, suffix: bytes = b"", size: int = MIB) -> bytes:
    return prefix + unit * ((size - len(prefix) - len(suffix)) // len(unit)) + suffix


HOSTILE = {
    "open brackets": _fit(b"", b"["),
    "open objects": _fit(b"", b'{"a":'),
    "wide object": json.dumps({"ChangeEventHeader": _HEADER})[:-1].encode()
    + b"".join(b',"k%07d":0' % i for i in range((MIB - 300) // 13))
    + b"}",
    "huge changedFields": _fit(
        json.dumps({"ChangeEventHeader": {**_HEADER, "changeType": "UPDATE"}})[:-2].encode()
        + b',"changedFields":["Status"',
        b',"Status"',
        b"]}}",
    ),
    "1 MB string": _fit(
        json.dumps({"ChangeEventHeader": _HEADER})[:-1].encode() + b',"D":"', b"x", b'"}'
    ),
}


def _peak(msgs: list[RawMessage], cfg: DecodeConfig) -> tuple[int, list]:
    gc.collect()
    tracemalloc.start()
    try:
        out = decode_batch(msgs, cfg)
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_on_hostile_input():
    """One hostile 1 MiB message costs a bounded multiple of its size while it is decoded;
    a batch of them does not add up (a dead letter keeps 64 KiB of raw text, no more)."""
    cfg = DecodeConfig(topics=ROLES)
    peaks = {}
    for name, value in HOSTILE.items():
        assert len(value) <= MIB, name
        peak, [o] = _peak([RawMessage(SF, 0, 0, None, value, -1)], cfg)
        peaks[name] = peak
        assert peak < 32 * MIB, (name, peak)
        if name != "1 MB string":
            assert type(o) is DeadLetter, (name, o)
    batch = [RawMessage(SF, 0, i, None, HOSTILE["wide object"], -1) for i in range(10)]
    peak_2, _ = _peak(batch[:2], cfg)
    peak_10, out = _peak(batch, cfg)
    assert [o.reason for o in out] == ["too_many_fields"] * 10
    # the previous message's parse is freed while the next one is parsed: at most two at once
    assert peak_2 < 2.5 * peaks["wide object"], (peak_2, peaks)
    assert peak_10 < peak_2 + 8 * 2 * RAW_TEXT_BYTES, (peak_10, peak_2)


RAW_TEXT_BYTES = 65_536 + 100  # a dead letter's raw text (ASCII), with its str header


def test_a_long_number_in_a_decimal_column_is_its_text_not_base64():
    """Found by the mutation fuzzer: a JSON number with more digits than a double holds,
    in a column the schema declares as Kafka Connect Decimal, is kept as its exact text;
    the reference once took that text (only digits) for base64."""
    value = (
        b'{"schema": {"type": "struct", "fields": [{"type": "struct", "fields": [{"type": '
        b'"bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": '
        b'"0"}, "field": "list_price"}, {"type": "string", "field": "sku"}], "field": '
        b'"after"}]}, "payload": {"op": "c", "source": {"ts_ms": 0, "table": "items", '
        b'"lsn": 0}, "before": null, "after": {"sku": "S", "list_price": 2.3472252676380112e+299}}}'
    )
    msg = RawMessage("erp.public.items", 1, 1001, None, value, -1)
    out = decode_batch([msg], CFG)
    check_against_reference([msg], out)
    assert out[0].fields["list_price"] == "23472252676380112" + "0" * 283
