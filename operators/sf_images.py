"""Salesforce API records (polled or re-read) as canonical changes, and the write-back echo rule.

Pure functions shared by the polling source, the gap re-read and the decoder;
no I/O, so every rule here is tested without a server.

Order keys (docs/semantics.md §1.1 orders CDC events by `(commitTimestamp,
commitNumber, sequenceNumber)`):

- A **polled image** of a record whose `SystemModstamp` is S (ms) has order
  `(S, 0, 0)`. Salesforce stamps S when the transaction writes the row, before
  it commits, so the CDC event of that same transaction has a commitTimestamp
  >= S and sorts after (or, on a full tie, wins by identity): both carry the
  same values, so nothing changes. A CDC event of an *earlier* transaction
  committed in the same millisecond as S would also sort after the image and
  briefly put back its older values for the fields it changed, until the CDC
  event of the later transaction (commitTimestamp >= S, larger commitNumber)
  arrives and sets them again. Ties therefore always go to CDC.
- A **re-read** triggered by a gap event with order G has order `G + (1,)`:
  immediately after the gap, before any later CDC event. The image stands in
  for the changes the gap lost; CDC events committed after the gap still win
  for the fields they set, so once they have all arrived the record is exact.
  Its `records.version` has four parts (`commitTimestamp:commitNumber:seq:1`).
  It travels as a non-primary copy of the gap message (same topic, partition
  and offset): the gap message is what was consumed, the re-read is how it was
  applied, so flow_stats counts the message once.

Event time of an image is its `SystemModstamp` (the latest moment the state it
shows was written), so `activated_at` from a polled image is the time of the
poll-visible modification, at or after the real activation.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sferp.operators.decode_salesforce import ENTITY_FIELDS, NUMERIC_FIELDS, REFERENCE_FIELDS

from sferp.events import DELETE, IMAGE, RESYNCED, SALESFORCE, Change, version_string
from sferp.sfid import to18

__all__ = [
    "POLL_PARTITIONS",
    "POLL_TOPIC",
    "SYSTEM_FIELDS",
    "bulk_soql",
    "coerce_csv",
    "delta_soql",
    "ids_soql",
    "image_fields",
    "parse_datetime_ms",
    "poll_change",
    "resync_change",
    "select_fields",
    "soql_datetime",
    "valid_id",
    "writeback_echo",
]

# flow_stats row of everything read from the Salesforce API (polls and re-reads).
POLL_TOPIC = "salesforce.api"
# Partition numbers of that pseudo topic: one per polled object.
POLL_PARTITIONS = {"Product2": 0, "Account": 1, "Order": 2, "OrderItem": 3}

# Fields every update touches; an echo may list them besides the write-back fields.
SYSTEM_FIELDS = frozenset({"LastModifiedDate", "LastModifiedById", "SystemModstamp"})

_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?\Z")
_DT = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?\Z")


def valid_id(value: object) -> bool:
    """A 15- or 18-character alphanumeric Id (anything else never reaches a SOQL string)."""
    return isinstance(value, str) and _ID.match(value) is not None


def parse_datetime_ms(text: str) -> int:
    """`2026-11-28T06:00:00.000+0000` (REST), `...Z` (Bulk CSV, CDC) -> ms since the epoch."""
    m = _DT.match(text)
    if m is None:
        raise ValueError(f"not a Salesforce dateTime: {text!r}")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    ms = int((frac or "0").ljust(3, "0")[:3])
    dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
    epoch_ms = int(dt.timestamp()) * 1000 + ms
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        epoch_ms -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60) * 1000
    return epoch_ms


def soql_datetime(ms: int) -> str:
    """A SOQL dateTime literal, floored to the second (SOQL compares whole seconds).

    Times before 1970 are sent as 1970-01-01T00:00:00Z: a gap event's look-back from an
    early event time reached year 0, which `datetime` cannot hold (and Salesforce has
    no records before 1970); the year is padded to four digits, which %Y does not do.
    """
    t = datetime.fromtimestamp(max(0, ms // 1000), UTC)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


def select_fields(entity: str) -> list[str]:
    """What a poll or re-read fetches: Id, the ordering and deletion columns, the §1 fields."""
    return ["Id", "SystemModstamp", "IsDeleted", *ENTITY_FIELDS[entity]]


def delta_soql(entity: str, since_ms: int | None) -> str:
    """Records of `entity` modified at or after `since_ms` (all when None), oldest first.

    `Id` breaks ties so pages are stable; run it with queryAll to see deletions.
    """
    where = "" if since_ms is None else f" WHERE SystemModstamp >= {soql_datetime(since_ms)}"
    return (
        f"SELECT {', '.join(select_fields(entity))} FROM {entity}{where} "
        "ORDER BY SystemModstamp, Id"
    )


def bulk_soql(entity: str) -> str:
    """Every record of `entity`, for a Bulk API 2.0 job (which takes no ORDER BY or LIMIT:
    they would disable its chunking)."""
    return f"SELECT {', '.join(select_fields(entity))} FROM {entity}"


def ids_soql(entity: str, ids: list[str]) -> str:
    """Records of `entity` with these Ids (at most a few hundred: the URL carries them)."""
    bad = [i for i in ids if not valid_id(i)]
    if bad:
        raise ValueError(f"not Salesforce Ids: {bad[:3]}")
    quoted = ", ".join(f"'{i}'" for i in ids)
    return f"SELECT {', '.join(select_fields(entity))} FROM {entity} WHERE Id IN ({quoted})"


def image_fields(entity: str, record: dict[str, Any]) -> dict[str, Any]:
    """The §1 fields of an API record, normalised as the CDC decoder does them."""
    fields = {name: record.get(name) for name in ENTITY_FIELDS[entity]}
    for name in REFERENCE_FIELDS[entity]:
        v = fields[name]
        if type(v) is str:
            fields[name] = to18(v)
    return fields


def _image(
    entity: str,
    record: dict[str, Any],
    order: tuple[int, ...],
    identity: str,
    position: tuple[str, int, int, bool],
) -> Change:
    modstamp = parse_datetime_ms(record["SystemModstamp"])
    op = DELETE if record.get("IsDeleted") else IMAGE
    topic, partition, offset, primary = position
    return Change(
        SALESFORCE,
        entity,
        to18(record["Id"]),
        op,
        order,
        modstamp,
        identity,
        image_fields(entity, record),
        topic,
        partition,
        offset,
        primary,
    )


def poll_change(entity: str, record: dict[str, Any]) -> Change:
    """A polled record: IMAGE (DELETE when `IsDeleted`), order `(SystemModstamp, 0, 0)`.

    Identity `sfapi|<entity>|<Id>|<SystemModstamp ms>`: the same record read again
    by an overlapping poll is a duplicate for the flow's de-duplication.
    """
    ms = parse_datetime_ms(record["SystemModstamp"])
    rid = to18(record["Id"])
    position = (POLL_TOPIC, POLL_PARTITIONS[entity], 0, True)
    return _image(entity, record, (ms, 0, 0), f"sfapi|{entity}|{rid}|{ms}", position)


def resync_change(entity: str, rid: str, record: dict[str, Any] | None, gap: Change) -> Change:
    """A record re-read because of `gap`; order `gap.order + (1,)`, a non-primary copy of it.

    Not found at all (purged, or never visible to the integration user): a DELETE
    without fields at the gap's event time.
    """
    order = (*gap.order, 1)
    identity = f"sfapi|{entity}|{rid}|resync|{version_string(gap.order)}"
    position = (gap.topic, gap.partition, gap.offset, False)
    if record is None:
        return Change(
            SALESFORCE, entity, rid, DELETE, order, gap.event_time, identity, None, *position
        )
    return _image(entity, record, order, identity, position)


def resynced_marker(gap: Change) -> Change:
    """The marker that `gap` (a GAP_OVERFLOW, key `<entity>:*`) has been re-read in full.

    It sorts right after the gap, like the images it follows, and is a non-primary
    copy (flow_stats counts the gap message once).
    """
    identity = f"sfapi|{gap.entity}|*|resynced|{version_string(gap.order)}"
    return Change(
        SALESFORCE,
        gap.entity,
        gap.key,
        RESYNCED,
        (*gap.order, 1),
        gap.event_time,
        identity,
        None,
        gap.topic,
        gap.partition,
        gap.offset,
        False,
    )


def coerce_csv(entity: str, row: dict[str, str]) -> dict[str, Any]:
    """A Bulk API 2.0 CSV row typed like the REST JSON of the same record.

    CSV has no types and writes null as an empty string: numeric §1 fields become
    floats (REST sends doubles), `IsActive`/`IsDeleted` booleans, empty strings None.
    """
    out: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items()}
    for name in NUMERIC_FIELDS[entity]:
        v = out.get(name)
        if v is not None:
            out[name] = float(v)
    for name in ("IsActive", "IsDeleted"):
        v = out.get(name)
        if v is not None:
            out[name] = v.lower() == "true"
    return out


def writeback_echo(obj: dict[str, Any], client_id: str, fields: frozenset[str]) -> int | None:
    """The commitTimestamp of a CDC event that only echoes sferp's own write-back, else None.

    An echo is an UPDATE whose `changeOrigin` names `client=<client_id>` and whose
    changed and nulled fields are all write-back fields (plus the system fields
    every update touches). An event that also changed anything else (a trigger or
    flow in the same transaction) is not an echo and is applied as usual.
    """
    body = obj.get("payload")
    if type(body) is not dict:
        body = obj
    h = body.get("ChangeEventHeader")
    if type(h) is not dict or h.get("changeType") != "UPDATE":
        return None
    origin = h.get("changeOrigin")
    if type(origin) is not str or f"client={client_id}" not in origin.split(";"):
        return None
    changed = h.get("changedFields")
    if type(changed) is not list or not changed:
        return None
    allowed = fields | SYSTEM_FIELDS
    if not all(type(f) is str and f in allowed for f in changed):
        return None
    nulled = h.get("nulledFields") or []
    if type(nulled) is not list or not all(type(f) is str and f in fields for f in nulled):
        return None
    ts = h.get("commitTimestamp")
    return ts if type(ts) is int else None
