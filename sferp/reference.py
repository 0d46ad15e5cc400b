"""Reference model: every view of CONTRACT §3.1 computed in one batch from raw messages.

This is the oracle the dataflow is checked against. It is written from the
contract and docs/semantics.md alone, as a plain loop over the messages in
arrival order followed by a from-scratch computation of the views, so that a
disagreement with the incremental dataflow points at a real bug on one side.
Correctness and readability come before speed; it still handles a million
messages in well under a minute.
"""

from __future__ import annotations

import base64
import binascii
import gc
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

import orjson

from sferp.compare import STAT_COLUMNS, InventoryRow, OrderRow, RecordRow, Views
from sferp.events import (
    CREATE,
    DELETE,
    ERP,
    EVENT_TIME_MAX_MS,
    EVENT_TIME_MIN_MS,
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

__all__ = ["ReferenceConfig", "compute", "decode", "normalize_id", "STAT_COLUMNS"]

# --- Contract constants (CONTRACT §1, docs/semantics.md §1) ---------------------------------

SF_FIELDS: dict[str, tuple[str, ...]] = {
    "Product2": ("ProductCode", "Name", "IsActive"),
    "Account": ("Name", "ERP_Customer_Number__c"),
    "Order": ("AccountId", "OrderNumber", "Status", "TotalAmount", "EffectiveDate"),
    "OrderItem": ("OrderId", "Product2Id", "Quantity", "UnitPrice"),
}
SF_NUMERIC: dict[str, tuple[str, ...]] = {
    "Order": ("TotalAmount",),
    "OrderItem": ("Quantity", "UnitPrice"),
}
SF_REFERENCES: dict[str, tuple[str, ...]] = {
    "Order": ("AccountId",),
    "OrderItem": ("OrderId", "Product2Id"),
}
SF_METADATA = frozenset(
    {"ChangeEventHeader", "Id", "ReplayId", "replayId", "_ObjectType", "_EventType"}
)
SF_CHANGE_TYPES: dict[str, str] = {
    "CREATE": CREATE,
    "UPDATE": UPDATE,
    "DELETE": DELETE,
    "UNDELETE": UNDELETE,
    "GAP_CREATE": GAP,
    "GAP_UPDATE": GAP,
    "GAP_DELETE": GAP,
    "GAP_UNDELETE": GAP,
    "GAP_OVERFLOW": GAP,
}

ERP_TABLES = ("items", "inventory", "sales_orders")
ERP_KEYS: dict[str, tuple[str, ...]] = {
    "items": ("sku",),
    "inventory": ("sku", "warehouse"),
    "sales_orders": ("order_no",),
}
ERP_NUMERIC: dict[str, tuple[str, ...]] = {
    "items": ("list_price",),
    "inventory": ("qty_on_hand", "qty_allocated"),
    "sales_orders": ("total_amount",),
}
KAFKA_DECIMAL = "org.apache.kafka.connect.data.Decimal"

MAX_DEPTH = 64
RAW_LIMIT = 65536


_ID15 = re.compile(r"[0-9A-Za-z]{15}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ID_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
# Decimal arithmetic for sums and rounding: wide enough that no sum is rounded early.
_CTX = Context(prec=200, rounding=ROUND_HALF_EVEN)
_CENT = Decimal("0.01")
_ONE = Decimal(1)
_BIG_FLOAT = 9.2e18  # orjson turns integers outside 64 bits into floats at least this large


@dataclass(frozen=True)
class ReferenceConfig:
    """The settings the views depend on (config sections [topics] and [flow])."""

    topics: dict[str, str]  # topic name -> "salesforce" | "items" | "inventory" | "sales_orders"
    dedup_window_s: int = 3600
    allowed_lateness_s: int = 30
    handoff_sla_s: int = 900
    max_message_bytes: int = 1048576
    max_fields: int = 1000

    @classmethod
    def default(cls) -> ReferenceConfig:
        """The contract's default topic names and flow settings."""
        return cls(
            topics={
                "sf.cdc": SALESFORCE,
                "erp.public.items": "items",
                "erp.public.inventory": "inventory",
                "erp.public.sales_orders": "sales_orders",
            }
        )


# --- Decoding: one message to changes, a dead letter or an ignored message ------------------


class _Dead(Exception):
    """Raised while decoding a message that must be dead-lettered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalize_id(value: Any) -> Any:
    """Return the 18-character form of a 15-character Salesforce Id; anything else unchanged.

    The suffix encodes, for each 5-character chunk, which characters are upper-case
    letters (bit i for character i), as an index into A-Z0-5.
    """
    if type(value) is not str or len(value) != 15 or not _ID15.fullmatch(value):
        return value
    suffix = ""
    for start in (0, 5, 10):
        bits = 0
        for i, char in enumerate(value[start : start + 5]):
            if "A" <= char <= "Z":
                bits |= 1 << i
        suffix += _ID_SUFFIX[bits]
    return value + suffix


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_int(text: str) -> int:
    return int(Decimal(text))  # no limit on the number of digits, unlike int(str)


_EXACT_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_exact_int)


_JSON_TOKEN = re.compile(
    r"[ \t\n\r]*(?:(?P<p>[{}\[\]:,])"
    r'|(?P<s>"(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")'
    r"|(?P<v>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null))"
)


def _is_json_text(text: str) -> bool:
    """Whether `text` is valid JSON, checked without recursion (for very deep documents)."""
    stack: list[str] = []
    expect = "value"
    pos = 0
    while True:
        match = _JSON_TOKEN.match(text, pos)
        if match is None:
            return expect == "end" and text[pos:].strip(" \t\n\r") == ""
        pos = match.end()
        punct, string, scalar = match.group("p", "s", "v")
        after_value = "comma_or_close" if stack else "end"
        if expect in ("value", "value_or_close"):
            if punct == "]" and expect == "value_or_close":
                stack.pop()
                expect = "comma_or_close" if stack else "end"
            elif punct in ("{", "["):
                stack.append(punct)
                expect = "key_or_close" if punct == "{" else "value_or_close"
            elif string is not None or scalar is not None:
                expect = after_value
            else:
                return False
        elif expect in ("key", "key_or_close"):
            if string is not None:
                expect = "colon"
            elif punct == "}" and expect == "key_or_close":
                stack.pop()
                expect = "comma_or_close" if stack else "end"
            else:
                return False
        elif expect == "colon":
            if punct != ":":
                return False
            expect = "value"
        elif expect == "comma_or_close":
            top = stack[-1]
            if punct == ",":
                expect = "key" if top == "{" else "value"
            elif punct == ("}" if top == "{" else "]"):
                stack.pop()
                expect = "comma_or_close" if stack else "end"
            else:
                return False
        else:  # a token after the complete document
            return False


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether a string (key or value) holds an escaped lone surrogate: not UTF-8 text."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if type(node) is str:
            if _SURROGATE.search(node):
                return True
        elif type(node) is dict:
            stack.extend(node)
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return False


def _parse_exact(value: bytes) -> Any:
    """Parse with the standard library: exact big integers, NaN/Infinity rejected.

    Escaped lone surrogates ("\\ud800") are rejected as not_json: the decoded text would not
    be valid UTF-8, and no view could hold it.
    """
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise _Dead("not_json") from None
    try:
        obj = _EXACT_JSON.decode(text)
    except RecursionError:
        raise _Dead("too_deep" if _is_json_text(text) else "not_json") from None
    except ValueError:  # json.JSONDecodeError included
        raise _Dead("not_json") from None
    if _has_lone_surrogate(obj):
        raise _Dead("not_json")
    return obj


def _scan(obj: Any) -> tuple[int, bool]:
    """Container nesting depth (stops counting past MAX_DEPTH) and whether a huge float occurs."""
    if type(obj) is float:
        return 0, abs(obj) >= _BIG_FLOAT
    if type(obj) is not dict and type(obj) is not list:
        return 0, False
    depth = 0
    big = False
    stack = [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if level > depth:
            depth = level
            if depth > MAX_DEPTH:
                return depth, big
        for item in node.values() if type(node) is dict else node:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, level + 1))
            elif kind is float and (item >= _BIG_FLOAT or item <= -_BIG_FLOAT):
                big = True
    return depth, big


def _parse_json(value: bytes) -> Any:
    """Parse a message value as JSON (steps 3-4 of docs/semantics.md §1); raise _Dead.

    orjson first; the standard library for what orjson rejects but may be valid JSON
    and when orjson may have turned an integer beyond 64 bits into a float.
    """
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        obj = _parse_exact(value)
    depth, big = _scan(obj)
    if big and depth <= MAX_DEPTH:
        obj = _parse_exact(value)
    if depth > MAX_DEPTH:
        raise _Dead("too_deep")
    return obj


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_time(value: Any) -> bool:
    """An integer event time a TIMESTAMP column holds (years 1 to 9999)."""
    return type(value) is int and EVENT_TIME_MIN_MS <= value <= EVENT_TIME_MAX_MS


def _is_str_list(value: Any) -> bool:
    return type(value) is list and all(type(x) is str for x in value)


# The largest magnitudes the typed view columns take (docs/semantics.md §1): an
# amount once rounded to cents fits DECIMAL(18,2); a quantity is below 10^15.
_VIEW_LIMITS = {
    "TotalAmount": Decimal("1E16"),
    "total_amount": Decimal("1E16"),
    "Quantity": Decimal("1E15"),
    "qty_on_hand": Decimal("1E15"),
    "qty_allocated": Decimal("1E15"),
}
_AMOUNTS = frozenset({"TotalAmount", "total_amount"})


def _fits_view(name: str, value: Any) -> bool:
    """A number (per `_is_number`) within the range of the view column `name` feeds."""
    limit = _VIEW_LIMITS.get(name)
    if limit is None:
        return True
    exact = Decimal(repr(value)) if type(value) is float else Decimal(value)
    if exact.adjusted() >= 17:  # too large to round to cents within the context
        return False
    if name in _AMOUNTS:  # rounded half-even to cents first
        exact = exact.quantize(_CENT, context=_CTX)
    return abs(exact) < limit


_PLAIN_DECIMAL = re.compile(
    r"[ \t\n\r]*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?[ \t\n\r]*"
)


def _exact_text(raw: bytes, name: str, value: Any) -> Any:
    """`value`, or the exact text of the number sent for `name` when a double cannot hold it.

    A JSON number with more than 15 significant digits (zeros at either end aside),
    whose double is `value`, is kept as its text in plain notation: amounts are exact
    decimals parsed from the JSON text (CONTRACT §2). Texts that disagree keep the
    double; exponents beyond 400 leave a double's range either way.
    """
    if type(value) is not float or not math.isfinite(value):
        return value
    pattern = (
        re.escape(json.dumps(name).encode())
        + rb"\s*:\s*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
    )
    texts = set()
    for number in re.findall(pattern, raw):
        mantissa, e, exponent = number.lower().partition(b"e")
        if not e and b"." not in mantissa:
            continue  # an integer literal: kept exact by the standard library's parse
        digits = mantissa.lstrip(b"-").replace(b".", b"").strip(b"0")
        if len(digits) > 15 and abs(int(exponent or b"0")) <= 400 and float(number) == value:
            texts.add(number.decode())
    if len(texts) != 1:
        return value
    return format(Decimal(texts.pop()), "f")


def _is_number(value: Any) -> bool:
    """A JSON number (not bool, finite) or a string parsing as a finite decimal."""
    kind = type(value)
    if kind is int:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is str:  # plain ASCII decimal syntax (docs/semantics.md §1)
        return _PLAIN_DECIMAL.fullmatch(value) is not None
    return False


def _decode_sf(obj: dict, msg: RawMessage, max_fields: int) -> list[Change] | Ignored:
    payload = obj.get("payload")
    if type(payload) is dict:
        body = payload
    elif "ChangeEventHeader" in obj:
        body = obj
    else:
        raise _Dead("missing_header")
    header = body.get("ChangeEventHeader")
    if type(header) is not dict:
        raise _Dead("missing_header")

    entity = header.get("entityName")
    if type(entity) is str and entity not in SF_FIELDS:
        # Another entity: ignored whatever the rest of its header says (CONTRACT §1.1).
        commit_ts = header.get("commitTimestamp")
        event_time = commit_ts if _is_time(commit_ts) else None
        return Ignored(msg.topic, msg.partition, msg.offset, "entity", event_time)
    change_type = header.get("changeType")
    commit_ts = header.get("commitTimestamp")
    seq = header.get("sequenceNumber")
    commit_no = header.get("commitNumber")
    tx_key = header.get("transactionKey")
    record_ids = header.get("recordIds")
    if (
        type(entity) is not str
        or type(change_type) is not str
        or change_type not in SF_CHANGE_TYPES
        or not _is_time(commit_ts)
        or not _is_int(seq)
        or not _is_int(commit_no)
        or type(tx_key) is not str
        or not _is_str_list(record_ids)
        or (not record_ids and change_type != "GAP_OVERFLOW")
    ):
        raise _Dead("bad_header")

    op = SF_CHANGE_TYPES[change_type]
    body_fields = {k: v for k, v in body.items() if k not in SF_METADATA}
    if len(body_fields) > max_fields:
        raise _Dead("too_many_fields")
    changes: dict[str, Any] | None
    if op in (CREATE, UNDELETE):
        changes = dict(body_fields)
        for name in SF_FIELDS[entity]:
            changes.setdefault(name, None)
    elif op == UPDATE:
        changed = header.get("changedFields")
        nulled = header.get("nulledFields")
        if ("changedFields" in header and not _is_str_list(changed)) or (
            "nulledFields" in header and not _is_str_list(nulled)
        ):
            raise _Dead("bad_header")
        if len(changed or []) + len(nulled or []) > max_fields:
            raise _Dead("too_many_fields")
        if changed:
            changes = {name: body_fields.get(name) for name in changed + (nulled or [])}
        else:
            changes = {k: v for k, v in body_fields.items() if v is not None}
            changes.update({name: body_fields.get(name) for name in nulled or []})
    else:
        changes = None

    if changes:
        for name in SF_NUMERIC.get(entity, ()):
            value = changes.get(name)
            if type(value) is float:
                value = changes[name] = _exact_text(msg.value, name, value)
            if value is not None and not (_is_number(value) and _fits_view(name, value)):
                raise _Dead("bad_number")
        for name in SF_REFERENCES.get(entity, ()):
            if name in changes:
                changes[name] = normalize_id(changes[name])

    ids = sorted(normalize_id(r) for r in record_ids)
    identity = f"sf|{entity}|{tx_key}|{seq}|{','.join(ids)}"
    keys = [f"{entity}:*"] if change_type == "GAP_OVERFLOW" else list(dict.fromkeys(ids))
    order = (commit_ts, commit_no, seq)
    return [
        Change(
            SALESFORCE,
            entity,
            key,
            op,
            order,
            commit_ts,
            identity,
            changes,
            msg.topic,
            msg.partition,
            msg.offset,
            i == 0,
        )
        for i, key in enumerate(keys)
    ]


def _decimal_scales(schema: Any, image_name: str) -> dict[str, int]:
    """Columns the Debezium schema declares as Kafka Connect Decimal, with their scales."""
    scales: dict[str, int] = {}
    if type(schema) is not dict or type(schema.get("fields")) is not list:
        return scales
    for part in schema["fields"]:
        if type(part) is not dict or part.get("field") != image_name:
            continue
        columns = part.get("fields")
        for column in columns if type(columns) is list else ():
            if type(column) is not dict or column.get("name") != KAFKA_DECIMAL:
                continue
            params = column.get("parameters")
            scale = params.get("scale") if type(params) is dict else None
            if type(scale) is str and re.fullmatch(r"-?[0-9]+", scale):
                scale = int(scale)
            if type(scale) is int and type(column.get("field")) is str:
                scales[column["field"]] = scale
    return scales


def _decode_base64_decimal(text: str, scale: int) -> str | None:
    """Debezium's precise decimal (base64 of the big-endian two's-complement unscaled value)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw:
        return None
    unscaled = int.from_bytes(raw, "big", signed=True)
    return format(Decimal(f"{unscaled}E{-scale}"), "f")


def _message_key(key: bytes | None) -> dict:
    """The Kafka message key as a JSON object (schema wrapping removed), or {}."""
    if key is None:
        return {}
    try:
        obj = _parse_json(key)
    except _Dead:
        return {}
    if type(obj) is not dict:
        return {}
    if type(obj.get("payload")) is dict and "schema" in obj:
        obj = obj["payload"]
    return obj


def _compact_json(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _decode_erp(obj: dict, msg: RawMessage, table: str, max_fields: int) -> list[Change] | Ignored:
    if type(obj.get("payload")) is dict and "schema" in obj:
        envelope, schema = obj["payload"], obj["schema"]
    else:
        envelope, schema = obj, None

    op = envelope.get("op")
    if type(op) is not str:
        raise _Dead("bad_envelope")
    if op in ("t", "m"):  # ignored; `source.ts_ms`, when there is one, moves the clock
        source = envelope.get("source")
        ts_ms = source.get("ts_ms") if type(source) is dict else None
        event_time = ts_ms if _is_time(ts_ms) else None
        return Ignored(msg.topic, msg.partition, msg.offset, f"op_{op}", event_time)
    if op not in ("c", "u", "d", "r"):
        raise _Dead("bad_envelope")
    source = envelope.get("source")
    if (
        type(source) is not dict
        or not _is_int(source.get("lsn"))
        or not _is_time(source.get("ts_ms"))
    ):
        raise _Dead("bad_envelope")
    image_name = "before" if op == "d" else "after"
    image = envelope.get(image_name)
    if type(image) is not dict:
        raise _Dead("bad_envelope")
    if len(image) > max_fields:
        raise _Dead("too_many_fields")

    primary_key: dict[str, Any] = {}
    message_key: dict | None = None
    for column in ERP_KEYS[table]:
        value = image.get(column)
        if value is None:
            if message_key is None:
                message_key = _message_key(msg.key)
            value = message_key.get(column)
        if type(value) is not str and type(value) is not int:
            raise _Dead("missing_primary_key")
        primary_key[column] = value

    if op != "d":
        scales = _decimal_scales(schema, image_name) if schema is not None else {}
        for column in ERP_NUMERIC[table]:
            value = image.get(column)
            if value is None:
                continue
            if type(value) is str and column in scales:
                decoded = _decode_base64_decimal(value, scales[column])
                if decoded is not None:
                    if not _fits_view(column, decoded):
                        raise _Dead("bad_number")
                    image = {**image, column: decoded}
                    continue
            if type(value) is float:  # (a number's text is no base64, whatever its digits)
                exact = _exact_text(msg.value, column, value)
                if exact is not value:
                    image = {**image, column: exact}
                    value = exact
            if not (_is_number(value) and _fits_view(column, value)):
                raise _Dead("bad_number")

    record_key = _compact_json(primary_key)
    source_table = source.get("table")
    id_table = source_table if type(source_table) is str and source_table else table
    lsn = source["lsn"]
    return [
        Change(
            ERP,
            table,
            record_key,
            DELETE if op == "d" else UPSERT,
            (lsn,),
            source["ts_ms"],
            f"erp|{id_table}|{record_key}|{lsn}",
            image,
            msg.topic,
            msg.partition,
            msg.offset,
        )
    ]


def _raw_text(value: bytes) -> str:
    return value[:RAW_LIMIT].decode("utf-8", errors="replace")


def decode(msg: RawMessage, config: ReferenceConfig) -> list[Change] | DeadLetter | Ignored:
    """Classify one message: its changes (one per record), a dead letter, or ignored."""
    kind = config.topics.get(msg.topic)
    if kind is None:
        raise ValueError(f"message from a topic that is not configured: {msg.topic!r}")
    value = msg.value
    if value is None:
        return Ignored(msg.topic, msg.partition, msg.offset, "tombstone", None)
    try:
        if len(value) > config.max_message_bytes:
            raise _Dead("too_large")
        obj = _parse_json(value)
        if type(obj) is not dict:
            raise _Dead("not_an_object")
        if kind == SALESFORCE:
            return _decode_sf(obj, msg, config.max_fields)
        return _decode_erp(obj, msg, kind, config.max_fields)
    except _Dead as dead:
        return DeadLetter(msg.topic, msg.partition, msg.offset, dead.reason, _raw_text(value))


# --- Merged state ----------------------------------------------------------------------------

Rank = tuple[tuple[int, ...], str]  # (order key, identity): the total order of changes


@dataclass
class _SfRecord:
    fields: dict[str, tuple[Rank, Any]] = field(default_factory=dict)
    lifecycle: tuple[Rank, str] | None = None  # latest CREATE/UNDELETE/DELETE
    latest: tuple[Rank, int] | None = None  # latest applied non-gap change and its event time


@dataclass
class _ErpRecord:
    latest: tuple[Rank, str, int] | None = None  # (rank, op, event time) of the highest lsn
    image: tuple[Rank, dict] | None = None  # highest non-delete image
    deleted_image: tuple[Rank, dict] | None = None  # highest delete's `before` image


@dataclass
class _State:
    config: ReferenceConfig
    sf: dict[tuple[str, str], _SfRecord] = field(default_factory=dict)
    erp: dict[tuple[str, str], _ErpRecord] = field(default_factory=dict)
    gaps: dict[tuple[str, str], Rank] = field(default_factory=dict)
    activated: dict[str, int] = field(default_factory=dict)  # Order Id -> earliest time
    invoiced: dict[str, int] = field(default_factory=dict)  # sales_orders key -> earliest time
    seen: dict[str, int] = field(default_factory=dict)  # identity -> event time
    clock: int | None = None
    # The clock of each partition: forgetting a de-duplication identity is judged
    # by the clock of the partition its copies arrive on (docs/semantics.md §2).
    partition_clock: dict[tuple[str, int], int] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)
    dead_letters: set[tuple[str, int, int, str, str]] = field(default_factory=set)

    def tick(self, event_time: int | None, msg: RawMessage | None = None) -> None:
        if event_time is not None and (self.clock is None or event_time > self.clock):
            self.clock = event_time
        if event_time is not None and msg is not None:
            tp = (msg.topic, msg.partition)
            if event_time > self.partition_clock.get(tp, event_time - 1):
                self.partition_clock[tp] = event_time

    def consume(self, msg: RawMessage) -> None:
        """Account for one message and apply it (docs/semantics.md §1-§2)."""
        stats = self.stats.setdefault(msg.topic, dict.fromkeys(STAT_COLUMNS, 0))
        self.late.setdefault(msg.topic, 0)
        stats["consumed"] += 1
        outcome = decode(msg, self.config)
        if type(outcome) is DeadLetter:
            stats["dead_lettered"] += 1
            self.dead_letters.add(tuple(outcome))
            return
        if type(outcome) is Ignored:
            stats["ignored"] += 1
            self.tick(outcome.event_time, msg)
            return
        first = outcome[0]
        remembered = self.seen.get(first.identity)
        window_ms = self.config.dedup_window_s * 1000
        # The partition's clock, this message included (it cannot make a copy expire:
        # a copy carries its original's event time).
        partition_clock = max(
            self.partition_clock.get((msg.topic, msg.partition), first.event_time),
            first.event_time,
        )
        if remembered is not None and partition_clock <= remembered + window_ms:
            stats["duplicates"] += 1
            self.tick(first.event_time, msg)
            return
        stats["applied"] += 1
        if (
            self.clock is not None
            and self.clock - first.event_time > self.config.allowed_lateness_s * 1000
        ):
            self.late[msg.topic] += 1
        self.seen[first.identity] = first.event_time
        for change in outcome:
            if change.source == SALESFORCE:
                self.apply_sf(change)
            else:
                self.apply_erp(change)
        self.tick(first.event_time, msg)

    def apply_sf(self, change: Change) -> None:
        rank = (change.order, change.identity)
        entity, key = change.entity, change.key
        if change.op == GAP:
            current = self.gaps.get((entity, key))
            if current is None or rank > current:
                self.gaps[(entity, key)] = rank
            return
        record = self.sf.get((entity, key))
        if record is None:
            record = self.sf[(entity, key)] = _SfRecord()
        if record.latest is None or rank > record.latest[0]:
            record.latest = (rank, change.event_time)
        if change.op != UPDATE and (record.lifecycle is None or rank > record.lifecycle[0]):
            record.lifecycle = (rank, change.op)
        for name, value in (change.fields or {}).items():
            current = record.fields.get(name)
            if current is None or rank > current[0]:
                record.fields[name] = (rank, value)
        if entity == "Order" and change.fields and change.fields.get("Status") == "Activated":
            earliest = self.activated.get(key)
            if earliest is None or change.event_time < earliest:
                self.activated[key] = change.event_time

    def apply_erp(self, change: Change) -> None:
        rank = (change.order, change.identity)
        record = self.erp.get((change.entity, change.key))
        if record is None:
            record = self.erp[(change.entity, change.key)] = _ErpRecord()
        if record.latest is None or rank > record.latest[0]:
            record.latest = (rank, change.op, change.event_time)
        if change.op == UPSERT:
            if record.image is None or rank > record.image[0]:
                record.image = (rank, change.fields)
            if change.entity == "sales_orders" and change.fields.get("status") == "INVOICED":
                earliest = self.invoiced.get(change.key)
                if earliest is None or change.event_time < earliest:
                    self.invoiced[change.key] = change.event_time
        elif record.deleted_image is None or rank > record.deleted_image[0]:
            record.deleted_image = (rank, change.fields)


# --- Views -----------------------------------------------------------------------------------


def _decimal(value: Any) -> Decimal | None:
    """An exact decimal from a stored JSON value (numbers via their shortest repr)."""
    if value is None:
        return None
    if type(value) is float:
        return Decimal(repr(value))
    return Decimal(value)


def _cents(value: Any) -> Decimal | None:
    amount = _decimal(value)
    return None if amount is None else amount.quantize(_CENT, context=_CTX)


def _whole(total: Decimal) -> int:
    return int(total.quantize(_ONE, context=_CTX))


def _text(value: Any) -> str | None:
    """A stored value as a VARCHAR cell: strings as they are, other values as compact JSON."""
    if value is None or type(value) is str:
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _lookup(mapping: dict[str, Any], key: Any) -> Any:
    """mapping[key] for a string key (stored references may be any JSON value), else None."""
    return mapping.get(key) if type(key) is str else None


def _key_column(record_key: str, column: str) -> Any:
    """One primary-key column of an ERP record key (compact JSON)."""
    return _EXACT_JSON.decode(record_key)[column]


def _sf_fields(record: _SfRecord) -> dict[str, Any]:
    return {name: value for name, (_, value) in record.fields.items()}


def _build_views(state: _State) -> Views:
    config = state.config
    now = state.clock

    # records, and the live (present, not deleted) subset per entity / table
    records: dict[tuple[str, str, str], RecordRow] = {}
    live_sf: dict[str, dict[str, dict[str, Any]]] = {entity: {} for entity in SF_FIELDS}
    for (entity, key), sf_record in state.sf.items():
        fields = _sf_fields(sf_record)
        deleted = sf_record.lifecycle is not None and sf_record.lifecycle[1] == DELETE
        (order, _), event_time = sf_record.latest
        records[(SALESFORCE, entity, key)] = RecordRow(
            deleted, fields, version_string(order), event_time
        )
        if not deleted:
            live_sf[entity][key] = fields
    live_erp: dict[str, dict[str, tuple[Rank, dict]]] = {table: {} for table in ERP_TABLES}
    for (table, key), erp_record in state.erp.items():
        rank, op, event_time = erp_record.latest
        image = erp_record.image or erp_record.deleted_image
        records[(ERP, table, key)] = RecordRow(
            op == DELETE, dict(image[1]), version_string(rank[0]), event_time
        )
        if op != DELETE:
            live_erp[table][key] = (rank, image[1])

    # order link: Order Id -> sales_orders record key
    candidates: dict[str, list[tuple[bool, Rank, str]]] = {}
    for key, (rank, row) in live_erp["sales_orders"].items():
        target = row.get("sf_order_id")
        if type(target) is str and target != "":
            candidates.setdefault(normalize_id(target), []).append(
                (row.get("status") != "CANCELLED", rank, key)
            )
    link = {target: max(rows)[2] for target, rows in candidates.items()}
    orders = live_sf["Order"]

    open_exceptions: set[tuple[str, str]] = set()
    for key, (_, row) in live_erp["sales_orders"].items():
        target = row.get("sf_order_id")
        if target is None or target == "":
            continue
        if type(target) is not str or normalize_id(target) not in orders:
            order_no = _key_column(key, "order_no")
            open_exceptions.add(("ORPHAN_ERP_ORDER", str(order_no)))

    # order_status
    order_status: dict[str, OrderRow] = {}
    sla_ms = config.handoff_sla_s * 1000
    for order_id, order in orders.items():
        sf_status = _text(order.get("Status"))
        sf_total = _cents(order.get("TotalAmount"))
        activated_at = state.activated.get(order_id)
        linked = link.get(order_id)
        erp_order_no = erp_status = erp_total = amount_matches = invoiced_at = None
        if linked is not None:
            row = live_erp["sales_orders"][linked][1]
            erp_order_no = str(_key_column(linked, "order_no"))
            erp_status = _text(row.get("status"))
            erp_total = _cents(row.get("total_amount"))
            if sf_total is not None and erp_total is not None:
                amount_matches = abs(sf_total - erp_total) <= _CENT
            invoiced_at = state.invoiced.get(linked)
        if sf_status == "Cancelled" or erp_status == "CANCELLED":
            stage = "CANCELLED"
        elif linked is not None:
            stage = erp_status
        elif sf_status == "Activated":
            stage = "BOOKED"
        else:
            stage = "DRAFT"
        quote_to_cash = None
        if activated_at is not None and invoiced_at is not None:
            quote_to_cash = (invoiced_at - activated_at) / 1000
        order_status[order_id] = OrderRow(
            _text(order.get("OrderNumber")),
            _text(order.get("AccountId")),
            erp_order_no,
            sf_status,
            erp_status,
            stage,
            sf_total,
            erp_total,
            amount_matches,
            activated_at,
            invoiced_at,
            quote_to_cash,
        )
        if amount_matches is False:
            open_exceptions.add(("AMOUNT_MISMATCH", order_id))
        if (
            sf_status == "Activated"
            and linked is None
            and activated_at is not None
            and now is not None
            and now - activated_at > sla_ms
        ):
            open_exceptions.add(("HANDOFF_OVERDUE", order_id))

    # demand and unknown skus from live OrderItems of live Orders
    product_sku = {
        product_id: product["ProductCode"]
        for product_id, product in live_sf["Product2"].items()
        if type(product.get("ProductCode")) is str and product["ProductCode"] != ""
    }
    item_skus = {str(_key_column(key, "sku")) for key in live_erp["items"]}
    demand: dict[str, Decimal] = {}
    for item in live_sf["OrderItem"].values():
        order_id = item.get("OrderId")
        sku = _lookup(product_sku, item.get("Product2Id"))
        if sku is None or _lookup(orders, order_id) is None:
            continue
        if sku not in item_skus:
            open_exceptions.add(("UNKNOWN_SKU", sku))
        if orders[order_id].get("Status") == "Activated" and order_id not in link:
            quantity = _decimal(item.get("Quantity")) or Decimal(0)
            demand[sku] = _CTX.add(demand.get(sku, Decimal(0)), quantity)

    # inventory_live
    stock: dict[str, list[Decimal]] = {}
    for key, (_, row) in live_erp["inventory"].items():
        sku = str(_key_column(key, "sku"))
        totals = stock.setdefault(sku, [Decimal(0), Decimal(0)])
        totals[0] = _CTX.add(totals[0], _decimal(row.get("qty_on_hand")) or Decimal(0))
        totals[1] = _CTX.add(totals[1], _decimal(row.get("qty_allocated")) or Decimal(0))
    inventory_live: dict[str, InventoryRow] = {}
    for sku in set(stock) | set(demand):
        open_demand = _whole(demand.get(sku, Decimal(0)))
        if sku not in stock and open_demand <= 0:
            continue
        on_hand, allocated = (_whole(x) for x in stock.get(sku, [Decimal(0), Decimal(0)]))
        inventory_live[sku] = InventoryRow(
            on_hand, allocated, open_demand, on_hand - allocated - open_demand
        )

    # SF_RESYNC_NEEDED: a gap newer than the record's latest lifecycle event
    for (entity, key), gap_rank in state.gaps.items():
        sf_record = state.sf.get((entity, key))
        lifecycle = sf_record.lifecycle if sf_record is not None else None
        if lifecycle is None or gap_rank > lifecycle[0]:
            open_exceptions.add(("SF_RESYNC_NEEDED", key))

    flow_stats = {topic: dict.fromkeys(STAT_COLUMNS, 0) for topic in config.topics}
    late = dict.fromkeys(config.topics, 0)
    for topic, counts in state.stats.items():
        flow_stats[topic] = dict(counts)
        late[topic] = state.late[topic]

    return Views(
        records=records,
        inventory_live=inventory_live,
        order_status=order_status,
        open_exceptions=open_exceptions,
        flow_stats=flow_stats,
        late=late,
        dead_letters=set(state.dead_letters),
        now_ms=now,
    )


def compute(messages: Iterable[RawMessage], config: ReferenceConfig | None = None) -> Views:
    """Compute every view from raw messages given in arrival order.

    Arrival order matters only for copies that arrive after the de-duplication window
    (applied again instead of counted as duplicates) and for the `late` counts.
    """
    state = _State(config or ReferenceConfig.default())
    # The state is millions of small acyclic objects: the cyclic garbage collector only
    # rescans them (measured: it doubles the run time), so it is paused meanwhile.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for msg in messages:
            state.consume(msg)
        return _build_views(state)
    finally:
        if was_enabled:
            gc.enable()
