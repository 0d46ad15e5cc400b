"""Delivery faults laid over the simulated stream: duplicates, disorder and malformed messages.

Real pipelines redeliver (at-least-once bridges and connectors), reorder
(several producers, retries) and occasionally carry garbage. This stage adds
exactly that, with its own seeded RNG so that the knobs never change the
underlying business events:

- duplicates: exact byte copies of a message that was already delivered,
  re-delivered within a few hundred messages;
- disorder: a message held back and delivered up to a few hundred positions
  later;
- bad: malformed messages of several kinds, each labelled with the dead-letter
  reason the flow must give it (docs/semantics.md §1).

Nothing is held for more than `HOLD_MAX_MS` of event time, so a copy always
arrives well inside the one-hour de-duplication window and stays a duplicate.
The requested fractions are met over the output by a feedback rule (the
probability of adding a message grows with the shortfall), so they hold within
a fraction of a percent even for small runs.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from typing import Any

import orjson

from sferp.generator_forms import APPLIED, ERP_KEYS, SF_ROLE, FastRandom, compact_json, uuid4

__all__ = ["mix", "Labelled", "DUPLICATE", "BAD_KINDS"]

DUPLICATE = "duplicate"
DUP_MAX_DELAY = 250  # positions
DISORDER_MAX_SHIFT = 250  # positions
HOLD_MAX_MS = 10 * 60 * 1000  # event time
TOO_LARGE_MAX = 5
TOO_LARGE_BYTES = 1_150_000
_NEVER = 1 << 62

# (role, key, value, label)
Labelled = tuple[str, bytes | None, bytes | None, str]

# kind -> dead-letter reason
BAD_KINDS: dict[str, str] = {
    "not_json": "not_json",
    "truncated": "not_json",
    "json_array": "not_an_object",
    "missing_header": "missing_header",
    "bad_number": "bad_number",
    "missing_primary_key": "missing_primary_key",
    "invalid_utf8": "not_json",
    "bad_change_type": "bad_header",
    "too_large": "too_large",
}
_SF_KINDS = ("not_json", "truncated", "json_array", "missing_header", "invalid_utf8")
_SF_KINDS += ("bad_change_type",)
_ERP_KINDS = ("not_json", "truncated", "json_array", "bad_number", "missing_primary_key")
_ERP_KINDS += ("invalid_utf8",)
_FIRST_KINDS = tuple(BAD_KINDS)
_SF_ONLY = frozenset({"missing_header", "bad_change_type", "too_large"})
_ERP_ONLY = frozenset({"bad_number", "missing_primary_key"})
_TABLE_OF_ROLE = {"erp_items": "items", "erp_inventory": "inventory"}
_TABLE_OF_ROLE["erp_sales_orders"] = "sales_orders"
_BAD_NUMBERS = {"items": ("list_price", "N/A"), "inventory": ("qty_on_hand", "lots")}
_BAD_NUMBERS["sales_orders"] = ("total_amount", "12,50")


def _draw(rng: random.Random, rate: float, deficit: float) -> int:
    """How many extra messages to add now: about `rate`, more while behind the target."""
    x = rate + 0.2 * (deficit - rate)
    if x <= 0:
        return 0
    n = int(x)
    return n + (1 if rng.random() < x - n else 0)


class _BadFactory:
    """Builds malformed messages from recently delivered good ones."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.templates: dict[str, tuple[bytes | None, bytes]] = {}
        self.too_large = 0
        self.cycle = 0

    def make(self, role: str) -> Labelled | None:
        """A malformed message, usually on `role` (the topic of a recent message).

        The first few cover every kind once (when a suitable template exists);
        after that kinds are random, over-size ones rare and capped.
        """
        rng = self._rng
        templates = self.templates
        if role not in templates:
            return None
        kind = ""
        if self.cycle < len(_FIRST_KINDS):
            want = _FIRST_KINDS[self.cycle]
            if want in _SF_ONLY:
                ok = [SF_ROLE] if SF_ROLE in templates else []
            elif want in _ERP_ONLY:
                ok = [r for r in sorted(templates) if r != SF_ROLE]
            else:
                ok = [role]
            if ok:
                kind, role = want, (role if role in ok else rng.choice(ok))
                self.cycle += 1
        if not kind:
            if role == SF_ROLE and self.too_large < TOO_LARGE_MAX and rng.random() < 1 / 2000:
                kind = "too_large"
            else:
                kind = rng.choice(_SF_KINDS if role == SF_ROLE else _ERP_KINDS)
        if kind == "too_large":
            self.too_large += 1
        key, value = templates[role]
        return role, *self._build(kind, role, key, value), "dead_letter:" + BAD_KINDS[kind]

    def _build(self, kind: str, role: str, key: bytes | None, value: bytes) -> tuple[Any, bytes]:
        rng = self._rng
        if kind == "not_json":
            ref = uuid4(rng)
            choice = rng.randrange(3)
            if choice == 0:
                return key, (
                    b"<html><head><title>502 Bad Gateway</title></head><body><center>"
                    b"<h1>502 Bad Gateway</h1></center><hr><center>request "
                    + ref.encode()
                    + b"</center></body></html>"
                )
            if choice == 1 and role != SF_ROLE:
                return key, (
                    b'{"before":null,"after":{"qty_on_hand":NaN,"ref":"'
                    + ref.encode()
                    + b'"},"op":"u"}'
                )
            return key, b"Internal Server Error (ref " + ref.encode() + b")"
        if kind == "truncated":
            return key, value[: rng.randint(max(1, len(value) // 4), len(value) - 2)]
        if kind == "json_array":
            return key, b"[" + value + b"]"
        if kind == "invalid_utf8":
            i = value.find(b'":"')
            if i < 0:
                return key, b"\xff\xfe" + value
            return key, value[: i + 3] + b"Caf\xe9 M\xfcller " + value[i + 3 :]
        doc = orjson.loads(value)
        if role == SF_ROLE:
            body = doc["payload"] if isinstance(doc.get("payload"), dict) else doc
            if kind == "missing_header":
                del body["ChangeEventHeader"]
            elif kind == "bad_change_type":
                body["ChangeEventHeader"]["changeType"] = rng.choice(("UPSERT", "update", "MERGE"))
            else:  # too_large: an attachment pasted into a long text field
                unit = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. "
                body["Description"] = unit * (TOO_LARGE_BYTES // len(unit) + 1)
            return key, compact_json(doc)
        env = doc["payload"] if "schema" in doc and isinstance(doc.get("payload"), dict) else doc
        table = _TABLE_OF_ROLE[role]
        if env.get("after") is None:
            env["after"], env["before"], env["op"] = env["before"], None, "u"
        if kind == "bad_number":
            column, text = _BAD_NUMBERS[table]
            env["after"][column] = text
            return key, compact_json(doc)
        for column in ERP_KEYS[table]:
            env["after"].pop(column, None)
        return None, compact_json(doc)


def mix(
    events: Iterator[tuple[str, bytes | None, bytes | None, str, int]],
    duplicates: float,
    disorder: float,
    bad: float,
    seed: int,
) -> Iterator[Labelled]:
    """Lay duplicates, disorder and malformed messages over `events`, in delivery order."""
    rng = FastRandom(f"sferp-generator/mix/{seed}")
    keep = 1.0 - duplicates - bad
    r_dup = duplicates / keep
    r_bad = bad / keep
    bads = _BadFactory(rng)
    good = n_dup = n_bad = 0
    out_n = 0
    tie = 0
    held: list[tuple[int, int, tuple[Any, ...]]] = []
    recent: list[tuple[Any, ...]] = []
    recent_i = 0
    now = 0
    deadline = _NEVER
    templates = bads.templates
    push, pop = heapq.heappush, heapq.heappop
    rand, randint = rng.random, rng.randint

    def deliver(item: tuple[Any, ...]) -> None:
        nonlocal recent_i
        if item[3] == APPLIED and item[2] is not None:
            templates[item[0]] = (item[1], item[2])
            if len(recent) < 256:
                recent.append(item)
            else:
                recent[recent_i] = item
                recent_i = (recent_i + 1) & 255

    for item in events:
        if item[4] > now:
            now = item[4]
            if now > deadline:
                # A quiet stretch: something held may now trail by more than HOLD_MAX_MS.
                # Recompute the true deadline; if it has passed, release everything held
                # before this newer message.
                deadline = min((h[2][4] for h in held), default=_NEVER) + HOLD_MAX_MS
                if now > deadline:
                    while held:
                        x = pop(held)[2]
                        out_n += 1
                        deliver(x)
                        yield x[0], x[1], x[2], x[3]
                    deadline = _NEVER
        ready: list[tuple[Any, ...]] = []
        if disorder and rand() < disorder:
            tie += 1
            push(held, (out_n + randint(1, DISORDER_MAX_SHIFT), tie, item))
            deadline = min(deadline, item[4] + HOLD_MAX_MS)
        else:
            ready.append(item)
        good += 1
        if r_dup:
            n = _draw(rng, r_dup, r_dup * good - n_dup)
            for _ in range(n):
                if not recent:
                    break
                orig = recent[int(len(recent) * rand())]
                if now - orig[4] > HOLD_MAX_MS:
                    orig = recent[recent_i - 1] if len(recent) == 256 else recent[-1]
                    if now - orig[4] > HOLD_MAX_MS:
                        break  # a quiet stretch: no copy would stay inside the window
                tie += 1
                copy = (orig[0], orig[1], orig[2], DUPLICATE, orig[4])
                push(held, (out_n + randint(1, DUP_MAX_DELAY), tie, copy))
                deadline = min(deadline, orig[4] + HOLD_MAX_MS)
                n_dup += 1
        if r_bad:
            n = _draw(rng, r_bad, r_bad * good - n_bad)
            for _ in range(n):
                if not recent:
                    break
                b = bads.make(recent[int(len(recent) * rand())][0])
                if b is None:
                    break
                ready.append((*b, now))
                n_bad += 1
        for x in ready:
            out_n += 1
            deliver(x)
            yield x[0], x[1], x[2], x[3]
        while held and held[0][0] <= out_n:
            x = pop(held)[2]
            out_n += 1
            deliver(x)
            yield x[0], x[1], x[2], x[3]
    while held:
        x = pop(held)[2]
        deliver(x)
        yield x[0], x[1], x[2], x[3]
