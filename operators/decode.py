"""Decode raw Kafka messages into canonical changes, dead letters or ignored messages.

One input message gives exactly one outcome: a DeadLetter, an Ignored, or one
or more Changes of which exactly one has `primary=True` (a Salesforce event
naming several records fans out to one Change per record). The checks and
their order follow docs/semantics.md §1; the form-specific rules live in
`decode_salesforce` and `decode_erp`.

This is the per-message hot path: orjson parses, the standard library only
steps in for the rare valid JSON orjson refuses, and no exception is raised
for a well-formed message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from sferp.operators.decode_common import (
    IGNORED_ENTITY,
    IGNORED_MESSAGE,
    IGNORED_TOMBSTONE,
    IGNORED_TRUNCATE,
    NOT_AN_OBJECT,
    REASONS,
    TOO_DEEP,
    TOO_LARGE,
    ReparseExact,
    dead_letter,
    deeper_than,
    holds_big_integral,
    parse_json_fallback,
    raw_text,
)
from sferp.operators.decode_erp import ERP_TABLES, decode_erp
from sferp.operators.decode_salesforce import decode_salesforce
from sferp.operators.sf_images import writeback_echo

from sferp.events import Change, DeadLetter, Ignored, RawMessage

IGNORED_ECHO = "writeback_echo"  # a CDC echo of sferp's own Salesforce write-back

__all__ = [
    "IGNORED_ECHO",
    "IGNORED_ENTITY",
    "IGNORED_MESSAGE",
    "IGNORED_TOMBSTONE",
    "IGNORED_TRUNCATE",
    "REASONS",
    "ROLES",
    "DecodeConfig",
    "decode_batch",
    "decode_one",
    "raw_text",
]

SALESFORCE_ROLE = "salesforce"
ROLES = frozenset({SALESFORCE_ROLE, *ERP_TABLES})

Outcome = Change | DeadLetter | Ignored


@dataclass(frozen=True)
class DecodeConfig:
    """Which topic carries what, and the size, nesting and width limits of docs/semantics.md §1.

    `topics` maps a topic name to its role: "salesforce", "items", "inventory"
    or "sales_orders".
    """

    topics: dict[str, str] = field(default_factory=dict)
    max_message_bytes: int = 1_048_576
    max_depth: int = 64
    max_fields: int = 1000  # fields of a body or row image, names in changedFields + nulledFields
    # (client id, write-back field names): CDC echoes of sferp's own write-back
    # are ignored (operators/sf_images.py, writeback_echo).
    writeback_echo: tuple[str, frozenset[str]] | None = None

    def __post_init__(self) -> None:
        bad = {t: r for t, r in self.topics.items() if r not in ROLES}
        if bad:
            raise ValueError(f"unknown topic roles {bad}; expected one of {sorted(ROLES)}")
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        if self.max_depth < 1:
            raise ValueError("max_depth must be positive")
        if self.max_fields < 1:
            raise ValueError("max_fields must be positive")


_new = tuple.__new__
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


def decode_batch(msgs: list[RawMessage], cfg: DecodeConfig) -> list[Outcome]:
    """Decode messages in input order; raises ValueError for a topic not in `cfg.topics`.

    Multi-record Salesforce events contribute several consecutive Changes, the
    first with `primary=True`; every other message contributes one outcome.
    """
    roles = cfg.topics
    max_bytes = cfg.max_message_bytes
    max_depth = cfg.max_depth
    max_fields = cfg.max_fields
    echo = cfg.writeback_echo
    out: list[Outcome] = []
    append = out.append
    for msg in msgs:
        role = roles.get(msg.topic)
        if role is None:
            raise ValueError(f"message from topic {msg.topic!r}, which is not configured")
        value = msg.value
        if value is None:
            append(_new(Ignored, (msg.topic, msg.partition, msg.offset, IGNORED_TOMBSTONE, None)))
            continue
        if len(value) > max_bytes:
            append(dead_letter(msg, TOO_LARGE))
            continue
        try:
            obj = _loads(value)
        except _JSONDecodeError:
            obj, reason = parse_json_fallback(value)
            if reason is not None:
                append(dead_letter(msg, reason))
                continue
        if value.count(b"{") + value.count(b"[") > max_depth and deeper_than(obj, max_depth):
            append(dead_letter(msg, TOO_DEEP))
            continue
        if type(obj) is not dict:
            append(dead_letter(msg, NOT_AN_OBJECT))
            continue
        try:
            if role == SALESFORCE_ROLE:
                result = decode_salesforce(obj, msg, max_fields)
            else:
                result = decode_erp(obj, msg, role, max_depth, max_fields)
        except ReparseExact:
            result = _decode_exact(msg, role, max_depth, max_fields)
        else:
            kind = type(result)
            fields = result[7] if kind is Change else result[0][7] if kind is list else None
            if fields and holds_big_integral(fields.values()):
                result = _decode_exact(msg, role, max_depth, max_fields)
        if echo is not None and role == SALESFORCE_ROLE and type(result) is not DeadLetter:
            ts = writeback_echo(obj, echo[0], echo[1])
            if ts is not None:
                result = _new(Ignored, (msg.topic, msg.partition, msg.offset, IGNORED_ECHO, ts))
        if type(result) is list:
            out.extend(result)
        else:
            append(result)
    return out


def _decode_exact(
    msg: RawMessage, role: str, max_depth: int, max_fields: int
) -> Outcome | list[Change]:
    """Decode again from a standard-library parse, which keeps integers beyond 64 bits exact."""
    obj, reason = parse_json_fallback(msg.value)  # type: ignore[arg-type]
    if reason is not None:  # cannot happen for text orjson accepted; kept total
        return dead_letter(msg, reason)
    try:
        if role == SALESFORCE_ROLE:
            return decode_salesforce(obj, msg, max_fields)
        return decode_erp(obj, msg, role, max_depth, max_fields)
    except ReparseExact as exc:  # a double where an integer is required, truly
        return dead_letter(msg, exc.args[0])


def decode_one(msg: RawMessage, cfg: DecodeConfig) -> list[Outcome]:
    """Decode a single message (convenience for tests and tools)."""
    return decode_batch([msg], cfg)
