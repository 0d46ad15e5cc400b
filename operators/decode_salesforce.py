"""Salesforce CDC events (contract §1.1) in any of their three forms to canonical changes.

Wrapped (`{"replayId", "payload": {...}}`), bare (the payload object) and flat
(Confluent's schemaless form, unchanged fields present as null) all come down
to one body object holding `ChangeEventHeader` and the field values; the rules
of docs/semantics.md §1.1 then apply to that body, whatever the form.
"""

from __future__ import annotations

from typing import Any

from sferp.operators.decode_common import (
    AMOUNT,
    BAD_HEADER,
    BAD_NUMBER,
    IGNORED_ENTITY,
    MISSING_HEADER,
    QUANTITY,
    TOO_MANY_FIELDS,
    ReparseExact,
    dead_letter,
    exact_number_text,
    ignored_event_time,
    in_view_range,
    is_big_integral,
    is_decimal_string,
)

from sferp.events import (
    CREATE,
    DELETE,
    GAP,
    SALESFORCE,
    UNDELETE,
    UPDATE,
    Change,
    Ignored,
    RawMessage,
    event_time_in_range,
)
from sferp.sfid import normalize_id

__all__ = [
    "CHANGE_TYPES",
    "ENTITY_FIELDS",
    "METADATA_KEYS",
    "NUMERIC_FIELDS",
    "REFERENCE_FIELDS",
    "decode_salesforce",
]

# The §1 fields of each entity used by the views.
ENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "Product2": ("ProductCode", "Name", "IsActive"),
    "Account": ("Name", "ERP_Customer_Number__c"),
    "Order": ("AccountId", "OrderNumber", "Status", "TotalAmount", "EffectiveDate"),
    "OrderItem": ("OrderId", "Product2Id", "Quantity", "UnitPrice"),
}
# Checked in this order (docs/semantics.md §1.1).
NUMERIC_FIELDS: dict[str, tuple[str, ...]] = {
    "Product2": (),
    "Account": (),
    "Order": ("TotalAmount",),
    "OrderItem": ("Quantity", "UnitPrice"),
}
# Numeric fields the typed view columns read, and what they must fit (decode_common).
BOUNDED_FIELDS: dict[str, float] = {"TotalAmount": AMOUNT, "Quantity": QUANTITY}
# Salesforce Id references, normalised to 18 characters.
REFERENCE_FIELDS: dict[str, tuple[str, ...]] = {
    "Product2": (),
    "Account": (),
    "Order": ("AccountId",),
    "OrderItem": ("OrderId", "Product2Id"),
}
METADATA_KEYS = frozenset(
    {"ChangeEventHeader", "Id", "ReplayId", "replayId", "_ObjectType", "_EventType"}
)
_METADATA_BUT_HEADER = ("Id", "ReplayId", "replayId", "_ObjectType", "_EventType")
# The entity name is kept too: every record's state and row hold the one shared
# string instead of the copy each parsed message carries (~60 bytes a record).
_SPECS = {e: (ENTITY_FIELDS[e], NUMERIC_FIELDS[e], REFERENCE_FIELDS[e], e) for e in ENTITY_FIELDS}

CHANGE_TYPES: dict[str, str] = {
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

_new = tuple.__new__


def _bad_int(msg: RawMessage, value: object) -> Any:
    if is_big_integral(value):
        raise ReparseExact(BAD_HEADER)
    return dead_letter(msg, BAD_HEADER)


def _is_str_list(value: object) -> bool:
    if type(value) is not list:
        return False
    for x in value:
        if type(x) is not str:
            return False
    return True


def _body_fields(b: dict[str, Any]) -> int:
    """The number of fields in a body: its keys other than the metadata keys."""
    n = len(b)
    for k in METADATA_KEYS:
        if k in b:
            n -= 1
    return n


def decode_salesforce(o: dict[str, Any], msg: RawMessage, max_fields: int = 1000) -> Any:
    """Decode one parsed CDC event: a Change, a list of Changes, a DeadLetter or an Ignored.

    Several Changes come back when the event names several records: one per
    distinct normalised Id, sorted, sharing identity and `fields` (read-only);
    only the first has `primary=True`. A body with more than `max_fields`
    fields, or `changedFields` and `nulledFields` naming more than that
    together, is a `too_many_fields` dead letter. May raise ReparseExact (see
    there).
    """
    b = o.get("payload")
    if type(b) is dict:
        h = b.get("ChangeEventHeader")
    elif "ChangeEventHeader" in o:
        b = o
        h = o["ChangeEventHeader"]
    else:
        return dead_letter(msg, MISSING_HEADER)
    if type(h) is not dict:
        return dead_letter(msg, MISSING_HEADER)

    # Header checks, in the documented order.
    entity = h.get("entityName")
    if type(entity) is not str:
        return dead_letter(msg, BAD_HEADER)
    spec = _SPECS.get(entity)
    if spec is None:  # another entity: legitimate traffic, never a dead letter (CONTRACT §1.1)
        ts = ignored_event_time(h.get("commitTimestamp"))
        return _new(Ignored, (msg.topic, msg.partition, msg.offset, IGNORED_ENTITY, ts))
    change_type = h.get("changeType")
    if type(change_type) is not str:
        return dead_letter(msg, BAD_HEADER)
    op = CHANGE_TYPES.get(change_type)
    if op is None:
        return dead_letter(msg, BAD_HEADER)
    ts = h.get("commitTimestamp")
    if type(ts) is not int:
        return _bad_int(msg, ts)
    if not event_time_in_range(ts):
        return dead_letter(msg, BAD_HEADER)
    seq = h.get("sequenceNumber")
    if type(seq) is not int:
        return _bad_int(msg, seq)
    commit = h.get("commitNumber")
    if type(commit) is not int:
        return _bad_int(msg, commit)
    tx = h.get("transactionKey")
    if type(tx) is not str:
        return dead_letter(msg, BAD_HEADER)
    record_ids = h.get("recordIds")
    if not _is_str_list(record_ids) or (not record_ids and change_type != "GAP_OVERFLOW"):
        return dead_letter(msg, BAD_HEADER)

    used, numeric, references, entity = spec
    if len(b) > max_fields and _body_fields(b) > max_fields:
        return dead_letter(msg, TOO_MANY_FIELDS)

    # Changes by type.
    fields: dict[str, Any] | None
    if op is UPDATE:
        changed = h.get("changedFields")
        nulled = h.get("nulledFields")
        # Present (even as null) but not a list of strings: a broken header.
        if (changed is not None or "changedFields" in h) and not _is_str_list(changed):
            return dead_letter(msg, BAD_HEADER)
        if (nulled is not None or "nulledFields" in h) and not _is_str_list(nulled):
            return dead_letter(msg, BAD_HEADER)
        if (changed or nulled) and len(changed or ()) + len(nulled or ()) > max_fields:
            return dead_letter(msg, TOO_MANY_FIELDS)
        # Explicit loops: cheaper than comprehensions on Python 3.11.
        fields = {}
        if changed:
            get = b.get
            for k in changed:
                fields[k] = None if k in METADATA_KEYS else get(k)
            if nulled:
                for k in nulled:
                    fields[k] = None if k in METADATA_KEYS else get(k)
        else:
            for k, v in b.items():
                if v is not None and k not in METADATA_KEYS:
                    fields[k] = v
            if nulled:  # named as nulled: a change whatever changedFields says
                get = b.get
                for k in nulled:
                    fields[k] = None if k in METADATA_KEYS else get(k)
    elif op is CREATE or op is UNDELETE:
        # The body is this message's own freshly parsed object: reuse it.
        fields = b
        del fields["ChangeEventHeader"]
        for k in _METADATA_BUT_HEADER:
            if k in fields:
                del fields[k]
        for k in used:
            if k not in fields:
                fields[k] = None
    else:  # DELETE and GAP_* carry no fields
        fields = None

    if fields is not None:
        for k in numeric:
            v = fields.get(k)
            if v is None:
                continue
            t = type(v)
            if t is float and v - v == 0.0:  # v - v == 0.0: finite
                text = exact_number_text(msg.value, k, v)  # type: ignore[arg-type]
                if text is not None:
                    v = fields[k] = text
                    t = str
            if t is int or (t is float and v - v == 0.0):
                kind = BOUNDED_FIELDS.get(k)
                if kind is None or -kind < v < kind:
                    continue
            elif t is str and is_decimal_string(v):
                kind = BOUNDED_FIELDS.get(k)
                if kind is None or in_view_range(v, kind):
                    continue
            return dead_letter(msg, BAD_NUMBER)
        for k in references:
            v = fields.get(k)
            if type(v) is str and len(v) == 15:
                fields[k] = normalize_id(v)

    # Identity, order, keys.
    topic = msg.topic
    partition = msg.partition
    offset = msg.offset
    order = (ts, commit, seq)
    if len(record_ids) == 1:
        rid = normalize_id(record_ids[0])
        identity = f"sf|{entity}|{tx}|{seq}|{rid}"
        if change_type == "GAP_OVERFLOW":
            rid = entity + ":*"
        return _new(
            Change,
            (
                SALESFORCE,
                entity,
                rid,
                op,
                order,
                ts,
                identity,
                fields,
                topic,
                partition,
                offset,
                True,
            ),
        )
    ids = sorted([normalize_id(r) for r in record_ids])
    identity = f"sf|{entity}|{tx}|{seq}|{','.join(ids)}"
    if change_type == "GAP_OVERFLOW":
        keys = [entity + ":*"]
    else:
        keys = sorted(set(ids))
    out = []
    primary = True
    for key in keys:
        out.append(
            _new(
                Change,
                (
                    SALESFORCE,
                    entity,
                    key,
                    op,
                    order,
                    ts,
                    identity,
                    fields,
                    topic,
                    partition,
                    offset,
                    primary,
                ),
            )
        )
        primary = False
    return out
