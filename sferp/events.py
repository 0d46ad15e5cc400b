"""Types shared by operators and connectors: raw messages, canonical changes, dead letters.

They are plain tuples (NamedTuple) because they are created once per message on
the hot path: cheap to build, cheap to pickle into Bytewax snapshots.
"""

from __future__ import annotations

from typing import Any, NamedTuple

SALESFORCE = "salesforce"
ERP = "erp"

# Canonical operations.
CREATE = "create"  # Salesforce CREATE: full image of the entity's fields
UPDATE = "update"  # Salesforce UPDATE: exactly the changed fields
DELETE = "delete"  # Salesforce DELETE or Debezium `d`
UNDELETE = "undelete"  # Salesforce UNDELETE: full image
UPSERT = "upsert"  # Debezium c/u/r (and extract rows): whole row image
GAP = "gap"  # Salesforce GAP_*: the record must be re-read
IMAGE = "image"  # a full record image read from the Salesforce API (poll or re-read)
RESYNCED = "resynced"  # a GAP_OVERFLOW's entity was re-read: closes `<entity>:*` (no record)

LIFECYCLE_OPS = frozenset({CREATE, DELETE, UNDELETE, IMAGE})

# Event times (ms since the epoch) a view's TIMESTAMP column and the ISO texts of the
# Kafka outputs can hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z. An event
# time outside is bad input (docs/semantics.md, "Ranges"); DuckDB refused such a
# time in the commit, which stopped the flow at the same message on every restart.
EVENT_TIME_MIN_MS = -62_135_596_800_000
EVENT_TIME_MAX_MS = 253_402_300_799_999


def event_time_in_range(ms: int) -> bool:
    """True when the integer `ms` is a representable event time."""
    return EVENT_TIME_MIN_MS <= ms <= EVENT_TIME_MAX_MS


class RawMessage(NamedTuple):
    """One Kafka message as the source yields it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int  # broker/producer timestamp, -1 when unknown


class Change(NamedTuple):
    """One change to one record, whatever form or system it came from.

    `order` sorts changes of one record: `(commitTimestamp, commitNumber,
    sequenceNumber)` for Salesforce, `(lsn,)` for the ERP. `identity` is the
    de-duplication identity of the *message* (shared by the records a
    multi-record event fans out to); `primary` is true on exactly one of those
    copies, the one that accounts for the message in flow_stats.
    """

    source: str
    entity: str
    key: str
    op: str
    order: tuple[int, ...]
    event_time: int  # ms since the epoch, UTC
    identity: str
    fields: dict[str, Any] | None
    topic: str
    partition: int
    offset: int
    primary: bool = True


class DeadLetter(NamedTuple):
    """A message that could not be used, with a reason code (docs/semantics.md §1)."""

    topic: str
    partition: int
    offset: int
    reason: str
    raw: str


class Ignored(NamedTuple):
    """A legitimate message that plays no part in the views (other entity, tombstone...)."""

    topic: str
    partition: int
    offset: int
    why: str
    event_time: int | None  # feeds the clock when known


def version_string(order: tuple[int, ...]) -> str:
    """Render an order key as the `records.version` column does."""
    return ":".join(str(x) for x in order)
