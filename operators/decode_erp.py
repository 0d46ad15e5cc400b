"""Debezium change events from the ERP (contract §1.2) to canonical changes.

Schemaless and schema-wrapped envelopes are accepted; in the schema-wrapped form
Debezium's precise decimals (base64 of the unscaled value, scale in the schema)
are decoded to decimal strings, as its `decimal.handling.mode=string` would have
sent them, so downstream code sees one representation.
"""

from __future__ import annotations

import re
from typing import Any

from sferp.operators.decode_common import (
    AMOUNT,
    BAD_ENVELOPE,
    BAD_NUMBER,
    IGNORED_MESSAGE,
    IGNORED_TRUNCATE,
    MAX_ABS_SCALE,
    MISSING_PRIMARY_KEY,
    QUANTITY,
    TOO_MANY_FIELDS,
    ReparseExact,
    dead_letter,
    decode_base64_decimal,
    deeper_than,
    dumps_compact_sorted,
    exact_number_text,
    ignored_event_time,
    in_view_range,
    is_big_integral,
    is_decimal_string,
    parse_json_fallback,
)

from sferp.events import DELETE, ERP, UPSERT, Change, Ignored, RawMessage, event_time_in_range

__all__ = ["ERP_TABLES", "NUMERIC_COLUMNS", "PRIMARY_KEYS", "decode_erp"]

PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "items": ("sku",),
    "inventory": ("sku", "warehouse"),
    "sales_orders": ("order_no",),
}
# Checked in this order (docs/semantics.md §1.2).
NUMERIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "items": ("list_price",),
    "inventory": ("qty_on_hand", "qty_allocated"),
    "sales_orders": ("total_amount",),
}
# Numeric columns the typed view columns read, and what they must fit (decode_common).
BOUNDED_COLUMNS: dict[str, float] = {
    "total_amount": AMOUNT,
    "qty_on_hand": QUANTITY,
    "qty_allocated": QUANTITY,
}
ERP_TABLES = frozenset(PRIMARY_KEYS)

DECIMAL_LOGICAL = "org.apache.kafka.connect.data.Decimal"
_OPS = {"c": UPSERT, "u": UPSERT, "r": UPSERT, "d": DELETE}
_SCALE = re.compile(r"-?[0-9]{1,6}")
_new = tuple.__new__


def _bad_int(msg: RawMessage, value: object) -> Any:
    if is_big_integral(value):
        raise ReparseExact(BAD_ENVELOPE)
    return dead_letter(msg, BAD_ENVELOPE)


def _message_key(key: bytes | None, max_depth: int) -> dict[str, Any] | None:
    """The Kafka key as an object (schema wrapping removed), or None when it is not one.

    The key is held to the value's rules: valid JSON, nested at most `max_depth`.
    """
    if key is None:
        return None
    obj, reason = parse_json_fallback(key)  # exact integers; rare path
    if reason is not None or type(obj) is not dict or deeper_than(obj, max_depth):
        return None
    payload = obj.get("payload")
    if type(payload) is dict and "schema" in obj:
        return payload
    return obj


def decimal_scale(schema: object, column: str) -> int | None:
    """The scale of `column` when the envelope schema declares it a Connect Decimal, else None."""
    if type(schema) is not dict:
        return None
    parts = schema.get("fields")
    if type(parts) is not list:
        return None
    for part in parts:
        if type(part) is dict and part.get("field") == "after":
            columns = part.get("fields")
            if type(columns) is not list:
                return None
            for col in columns:
                if type(col) is dict and col.get("field") == column:
                    if col.get("name") != DECIMAL_LOGICAL:
                        return None
                    params = col.get("parameters")
                    if type(params) is not dict:
                        return None
                    scale = params.get("scale")
                    if type(scale) is str and _SCALE.fullmatch(scale):
                        scale = int(scale)
                    if type(scale) is not int or abs(scale) > MAX_ABS_SCALE:
                        return None
                    return scale
            return None
    return None


def decode_erp(
    o: dict[str, Any], msg: RawMessage, table: str, max_depth: int = 64, max_fields: int = 1000
) -> Any:
    """Decode one parsed Debezium event of `table`: a Change, a DeadLetter or an Ignored.

    Upserts carry the `after` image (base64 decimals replaced by decimal
    strings), deletes the `before` image; an image with more than `max_fields`
    columns is a `too_many_fields` dead letter. May raise ReparseExact (see
    there).
    """
    payload = o.get("payload")
    if type(payload) is dict and "schema" in o:
        e = payload
        schema = o["schema"]
        wrapped = True
    else:
        e = o
        schema = None
        wrapped = False

    op = e.get("op")
    if type(op) is not str:
        return dead_letter(msg, BAD_ENVELOPE)
    cop = _OPS.get(op)
    if cop is None:
        if op == "t" or op == "m":  # ignored, never dead letters; their time moves the clock
            why = IGNORED_TRUNCATE if op == "t" else IGNORED_MESSAGE
            source = e.get("source")
            ts = ignored_event_time(source.get("ts_ms") if type(source) is dict else None)
            return _new(Ignored, (msg.topic, msg.partition, msg.offset, why, ts))
        return dead_letter(msg, BAD_ENVELOPE)
    source = e.get("source")
    if type(source) is not dict:
        return dead_letter(msg, BAD_ENVELOPE)
    lsn = source.get("lsn")
    if type(lsn) is not int:
        return _bad_int(msg, lsn)
    ts = source.get("ts_ms")
    if type(ts) is not int:
        return _bad_int(msg, ts)
    if not event_time_in_range(ts):
        return dead_letter(msg, BAD_ENVELOPE)
    row = e.get("after") if cop is UPSERT else e.get("before")
    if type(row) is not dict:
        return dead_letter(msg, BAD_ENVELOPE)
    if len(row) > max_fields:
        return dead_letter(msg, TOO_MANY_FIELDS)

    # Primary key: from the row image, else from the Kafka key.
    pk: dict[str, Any] = {}
    key_obj: dict[str, Any] | None | bool = False
    for col in PRIMARY_KEYS[table]:
        v = row.get(col)
        if v is None:
            if key_obj is False:
                key_obj = _message_key(msg.key, max_depth)
            v = key_obj.get(col) if key_obj else None
        elif is_big_integral(v):
            raise ReparseExact(MISSING_PRIMARY_KEY)
        t = type(v)
        if t is not str and t is not int:
            return dead_letter(msg, MISSING_PRIMARY_KEY)
        pk[col] = v

    if cop is UPSERT:
        for col in NUMERIC_COLUMNS[table]:
            v = row.get(col)
            if v is None:
                continue
            t = type(v)
            if t is float and v - v == 0.0:  # finite
                text = exact_number_text(msg.value, col, v)  # type: ignore[arg-type]
                if text is not None:
                    v = row[col] = text
                    t = str
                ok = True
            elif t is int:
                ok = True
            elif t is str:
                ok = False
                if wrapped:
                    scale = decimal_scale(schema, col)
                    if scale is not None:
                        text = decode_base64_decimal(v, scale)
                        if text is not None:
                            v = row[col] = text
                            ok = True
                if not ok:
                    ok = is_decimal_string(v)
            else:
                ok = False
            if ok:
                kind = BOUNDED_COLUMNS.get(col)
                if kind is None or (-kind < v < kind if t is not str else in_view_range(v, kind)):
                    continue
            return dead_letter(msg, BAD_NUMBER)

    record_key = dumps_compact_sorted(pk)
    source_table = source.get("table")
    if type(source_table) is not str or not source_table:
        source_table = table
    return _new(
        Change,
        (
            ERP,
            table,
            record_key,
            cop,
            (lsn,),
            ts,
            f"erp|{source_table}|{record_key}|{lsn}",
            row,
            msg.topic,
            msg.partition,
            msg.offset,
            True,
        ),
    )
