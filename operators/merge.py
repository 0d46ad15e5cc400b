"""The merge stage: de-duplicate, merge changes into record state, emit facts.

One Bytewax key per merge shard (operators/routing.py). Per shard: the
de-duplication window, the merged state of the shard's records (CONTRACT §2:
field-level last-writer-wins for Salesforce, whole-image by lsn for the ERP,
tombstones an older update cannot undo), the gap markers, and the counters.
At the end of each batch every record that changed is rendered once: its
`records` row for the coordinator and its fact for the view stages.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from sferp.events import (
    DELETE,
    GAP,
    LIFECYCLE_OPS,
    RESYNCED,
    SALESFORCE,
    UPSERT,
    Change,
    version_string,
)
from sferp.sfid import to18

from .dedupe import DedupWindow
from .facts import (
    FACTS,
    GLOBAL_IN,
    TICK,
    ErpItemFact,
    ErpOrderFact,
    ExceptionFact,
    GlobalInput,
    InventoryFact,
    ItemFact,
    OrderFact,
    ProductFact,
)
from .routing import GLOBAL, ORDERS, PRODUCTS, SKUS, shard
from .slots import compact_pickle

# Stats vector positions, shared with the coordinator.
CONSUMED, APPLIED, DUPLICATES, LATE, DEAD, IGNORED = range(6)

_SORTED = orjson.OPT_SORT_KEYS


@compact_pickle
class SfRecord:
    """Merged state of one Salesforce record.

    Between batches a record is packed (`pack`): its fields are kept as the
    compact JSON text its `records` row was rendered from, and when every field
    was set by the same change, one `base` stamp replaces the per-field stamps.
    That is a third of the memory of live dicts; `apply` unpacks on demand.
    """

    __slots__ = (
        "fields",
        "stamps",
        "base",
        "lc_stamp",
        "lc_deleted",
        "top",
        "event_time",
        "identity",
        "activated_at",
        "routed",
    )

    def __init__(self) -> None:
        self.fields: dict[str, Any] | str = {}  # str: packed (compact JSON)
        self.stamps: dict[str, tuple] | None = {}  # field -> (order, identity) that set it
        self.base: tuple | None = None  # packed: the stamp of every field (stamps is None)
        self.lc_stamp: tuple | None = None  # latest lifecycle event
        self.lc_deleted = False
        self.top: tuple | None = None  # latest applied event of any kind
        self.event_time = 0
        self.identity = ""
        self.activated_at: int | None = None
        self.routed: str | None = None  # where its fact was last sent (OrderItem: OrderId)

    def apply(self, ch: Change) -> None:
        """Merge one change (CONTRACT §2, docs/semantics.md §3)."""
        stamp = (ch.order, ch.identity)
        if ch.fields and self.top is None and not self.fields:
            # A new record (most changes of a backlog): every field is from this
            # change, so it starts in the packed form's one stamp for all fields.
            self.fields = dict(ch.fields)
            self.stamps = None
            self.base = stamp
        elif ch.fields:
            fields, stamps = self.unpacked()
            if self.top is None or stamp > self.top:  # newer than every field: all win
                fields.update(ch.fields)
                stamps.update(dict.fromkeys(ch.fields, stamp))
            else:
                for name, value in ch.fields.items():
                    old = stamps.get(name)
                    if old is None or stamp > old:
                        fields[name] = value
                        stamps[name] = stamp
        if (
            ch.fields
            and ch.fields.get("Status") == "Activated"
            and (self.activated_at is None or ch.event_time < self.activated_at)
        ):
            self.activated_at = ch.event_time
        if ch.op in LIFECYCLE_OPS and (self.lc_stamp is None or stamp > self.lc_stamp):
            self.lc_stamp = stamp
            self.lc_deleted = ch.op == DELETE
        if self.top is None or stamp > self.top:
            self.top = stamp
            self.event_time = ch.event_time
        self.identity = ch.identity

    @property
    def live(self) -> bool:
        """Present and not deleted."""
        return not self.lc_deleted

    def unpacked(self) -> tuple[dict[str, Any], dict[str, tuple]]:
        """The fields and their stamps as dicts (unpacking a packed record)."""
        fields = self.fields
        if type(fields) is str:
            fields = self.fields = orjson.loads(fields)
        stamps = self.stamps
        if stamps is None:
            stamps = self.stamps = dict.fromkeys(fields, self.base)
        return fields, stamps  # type: ignore[return-value]

    def pack(self, text: str) -> None:
        """Keep the fields as `text` (their compact JSON) until the next change."""
        self.fields = text
        stamps = self.stamps
        if stamps:
            it = iter(stamps.values())
            first = next(it)
            for v in it:
                if v is not first:
                    return
            self.base = first
            self.stamps = None


@compact_pickle
class ErpRecord:
    """Merged state of one ERP row: the image with the highest lsn wins."""

    __slots__ = (
        "image",
        "image_stamp",
        "del_image",
        "del_lsn",
        "top",
        "deleted",
        "event_time",
        "identity",
        "invoiced_at",
        "routed",
    )

    def __init__(self) -> None:
        self.image: dict[str, Any] | str | None = None  # str: packed (compact JSON)
        self.image_stamp: tuple = ()
        self.del_image: dict[str, Any] | str | None = None
        self.del_lsn = -1
        self.top: tuple | None = None
        self.deleted = False
        self.event_time = 0
        self.identity = ""
        self.invoiced_at: int | None = None
        self.routed: str | None = None

    def apply(self, ch: Change) -> None:
        """Merge one change."""
        lsn = ch.order[0]
        stamp = (ch.order, ch.identity)
        if ch.op == UPSERT:
            if self.image is None or stamp > self.image_stamp:
                self.image = ch.fields
                self.image_stamp = stamp
            if (ch.fields or {}).get("status") == "INVOICED" and (
                self.invoiced_at is None or ch.event_time < self.invoiced_at
            ):
                self.invoiced_at = ch.event_time
        elif self.del_image is None or lsn > self.del_lsn:
            self.del_image = ch.fields or {}
            self.del_lsn = lsn
        if self.top is None or stamp > self.top:
            self.top = stamp
            self.deleted = ch.op == DELETE
            self.event_time = ch.event_time
        self.identity = ch.identity

    @property
    def live(self) -> bool:
        """Present and not deleted."""
        return not self.deleted

    def current_fields(self) -> dict[str, Any]:
        """The row's last image (a deleted row keeps it)."""
        image = self.image if self.image is not None else self.del_image
        if image is None:
            return {}
        if type(image) is str:
            return orjson.loads(image)  # type: ignore[no-any-return]
        return image

    def pack(self, text: str) -> None:
        """Keep the current image as `text` (its compact JSON); images are replaced whole."""
        if self.image is not None:
            self.image = text
        elif self.del_image is not None:
            self.del_image = text


def fields_json(fields: dict[str, Any]) -> str:
    """Compact JSON with sorted keys; exact for integers beyond 64 bits (orjson refuses them)."""
    try:
        return orjson.dumps(fields, option=_SORTED).decode()
    except TypeError:
        # Non-finite floats become null, as orjson writes them.
        clean = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in fields.items()
        }
        return json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)


def _s(value: Any) -> str | None:
    """A key column as a string (ERP keys may be integers)."""
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


class MergeState:
    """Everything one merge shard remembers (pickled into Bytewax snapshots)."""

    __slots__ = ("dedup", "records", "gaps", "clock", "partition_clocks")

    def __init__(self, window_ms: int) -> None:
        self.dedup = DedupWindow(window_ms)
        self.records: dict[tuple[str, str, str], SfRecord | ErpRecord] = {}
        # resync key -> [gap stamp, open emitted?, event_time(, stamp of a RESYNCED marker)]
        self.gaps: dict[str, list] = {}
        self.clock = 0  # the largest partition clock this shard has heard of
        self.partition_clocks: dict[tuple[str, int], int] = {}


class Merger:
    """The merge logic of one shard, free of Bytewax so it can be tested directly."""

    def __init__(self, state: MergeState, lateness_ms: int) -> None:
        self.state = state
        self.lateness_ms = lateness_ms

    def process(self, payloads: list[tuple]) -> list[tuple[str, tuple]]:
        """Apply a batch of payloads; return (destination shard, payload) items."""
        st = self.state
        records = st.records
        dedup = st.dedup
        lateness = self.lateness_ms
        stats: dict[str, list[int]] = {}
        dirty: dict[tuple[str, str, str], SfRecord | ErpRecord] = {}
        dirty_gaps: set[str] = set()
        pclock = st.partition_clocks
        check = dedup.check_and_add
        gaps = st.gaps
        for payload in payloads:
            if payload[0] == TICK:
                for tp, c in payload[1].items():
                    if c > pclock.get(tp, -1):
                        pclock[tp] = c
                    if c > st.clock:
                        st.clock = c
                continue
            _, tp, changes, stamps = payload
            clock = pclock.get(tp, -1)
            consumed = applied = duplicates = late = 0
            for ch, stamp in zip(changes, stamps, strict=True):
                if stamp > clock:
                    clock = stamp
                if ch.primary:
                    consumed += 1
                    if check(ch.identity, ch.event_time, clock, tp):
                        duplicates += 1
                        continue
                    applied += 1
                    if ch.event_time < clock - lateness:
                        late += 1
                # Copies of one multi-record event may share a shard: each copy
                # but the primary is remembered under its own record key too.
                elif check(f"{ch.identity}|{ch.key}", ch.event_time, clock, tp):
                    continue
                if ch.op == GAP:
                    self._gap(ch, dirty_gaps)
                    continue
                if ch.op == RESYNCED:  # a whole entity re-read after a GAP_OVERFLOW
                    g = gaps.get(ch.key)
                    stamp = (ch.order, ch.identity)
                    if g is not None and (len(g) < 4 or stamp > g[3]):
                        g[3:] = [stamp]
                        dirty_gaps.add(ch.key)
                    continue
                rkey = (ch.source, ch.entity, ch.key)
                rec = records.get(rkey)
                if rec is None:
                    rec = records[rkey] = SfRecord() if ch.source == SALESFORCE else ErpRecord()
                rec.apply(ch)
                dirty[rkey] = rec
                if gaps and ch.key in gaps:
                    dirty_gaps.add(ch.key)
            pclock[tp] = clock
            if clock > st.clock:
                st.clock = clock
            if consumed:
                s = stats.get(tp[0])
                if s is None:
                    s = stats[tp[0]] = [0, 0, 0, 0, 0, 0]
                s[CONSUMED] += consumed
                s[APPLIED] += applied
                s[DUPLICATES] += duplicates
                s[LATE] += late
        if st.dedup.window_ms:
            dedup.expire(pclock)
        return self._render(stats, dirty, dirty_gaps)

    def _gap(self, ch: Change, dirty_gaps: set[str]) -> None:
        stamp = (ch.order, ch.identity)
        g = self.state.gaps.get(ch.key)
        if g is None:
            self.state.gaps[ch.key] = [stamp, False, ch.event_time]
        elif stamp > g[0]:
            g[0] = stamp
            g[2] = ch.event_time
        dirty_gaps.add(ch.key)

    def _render(
        self,
        stats: dict[str, list[int]],
        dirty: dict[tuple[str, str, str], SfRecord | ErpRecord],
        dirty_gaps: set[str],
    ) -> list[tuple[str, tuple]]:
        rows: dict[tuple, tuple | None] = {}
        out_facts: dict[str, list] = {}
        exceptions: list[ExceptionFact] = []

        def send(dest: str, fact: Any) -> None:
            lst = out_facts.get(dest)
            if lst is None:
                out_facts[dest] = [fact]
            else:
                lst.append(fact)

        dumps = orjson.dumps
        for rkey, rec in dirty.items():
            source, entity, key = rkey
            if source == SALESFORCE:
                fields = rec.unpacked()[0]
                deleted = rec.lc_deleted
            else:
                fields = rec.current_fields()
                deleted = rec.deleted
            try:
                text = dumps(fields, option=_SORTED).decode()
                packable = True
            except TypeError:  # beyond JSON's reach (non-finite, huge ints): stays a dict
                text = fields_json(fields)
                packable = False
            rows[rkey] = (
                source,
                entity,
                key,
                deleted,
                text,
                version_string(rec.top[0]),
                rec.event_time,
            )
            _facts(entity, source, key, rec, send, fields)
            if packable:
                rec.pack(text)
        for key in dirty_gaps:
            g = self.state.gaps[key]
            recs = [] if key.endswith(":*") else _records_with_key(self.state, key)
            resynced = len(g) > 3 and g[3] > g[0]
            is_open = not resynced and not any(
                r.lc_stamp is not None and r.lc_stamp > g[0] for r in recs
            )
            if is_open != g[1] or is_open:
                exceptions.append(
                    ExceptionFact(
                        "SF_RESYNC_NEEDED",
                        key,
                        is_open,
                        "gap event: record must be re-read from Salesforce"
                        if is_open
                        else "closed by a successful re-read of the entity"
                        if resynced
                        else "closed by a newer create, undelete or delete",
                        max([g[2]] + [r.event_time for r in recs]),
                    )
                )
                g[1] = is_open
            if not is_open:
                del self.state.gaps[key]
        out: list[tuple[str, tuple]] = [(dest, (FACTS, lst)) for dest, lst in out_facts.items()]
        if stats or rows or exceptions:
            body = GlobalInput(stats, None, [], {"records": rows}, exceptions, [], [])
            out.append((GLOBAL, (GLOBAL_IN, body)))
        return out


def _records_with_key(state: MergeState, key: str) -> list[SfRecord]:
    """The Salesforce records with this Id (gaps are rare, so a lookup per entity is fine)."""
    found = []
    for entity in ("Product2", "Account", "Order", "OrderItem"):
        rec = state.records.get((SALESFORCE, entity, key))
        if rec is not None:
            found.append(rec)
    return found


def _facts(entity: str, source: str, key: str, rec: Any, send: Any, f: dict[str, Any]) -> None:
    """Render the view-relevant fact of one changed record (fields `f`) and route it."""
    if source == SALESFORCE:
        live = rec.live
        if entity == "Order":
            send(
                shard(ORDERS, key),
                OrderFact(
                    key,
                    live,
                    f.get("Status"),
                    f.get("AccountId"),
                    f.get("OrderNumber"),
                    f.get("TotalAmount"),
                    rec.activated_at,
                    rec.event_time,
                    rec.identity,
                ),
            )
        elif entity == "OrderItem":
            order_id = _s(f.get("OrderId"))
            if rec.routed is not None and rec.routed != order_id:
                send(
                    shard(ORDERS, rec.routed),
                    ItemFact(key, rec.routed, False, None, None, rec.event_time, rec.identity),
                )
            rec.routed = order_id
            if order_id:
                send(
                    shard(ORDERS, order_id),
                    ItemFact(
                        key,
                        order_id,
                        live,
                        _s(f.get("Product2Id")),
                        f.get("Quantity"),
                        rec.event_time,
                        rec.identity,
                    ),
                )
        elif entity == "Product2":
            code = f.get("ProductCode")
            sku = _s(code) if live and code not in (None, "") else None
            send(shard(PRODUCTS, key), ProductFact(key, sku, rec.event_time, rec.identity))
        return
    live = rec.live
    if entity == "sales_orders":
        raw = f.get("sf_order_id")
        if raw is None or raw == "":
            sf_id = None  # never linked, never an orphan
        elif isinstance(raw, str):
            sf_id = to18(raw)
        else:  # not an Id at all: names no Order, so it is an orphan
            sf_id = "\x00" + orjson.dumps(raw).decode()
        order_no = _s(f.get("order_no"))
        if order_no is None:
            order_no = _s(orjson.loads(key).get("order_no")) or key
        if rec.routed is not None and rec.routed != sf_id:
            send(
                shard(ORDERS, rec.routed),
                ErpOrderFact(
                    key, order_no, rec.routed, False, None, None, 0, None, rec.event_time, ""
                ),
            )
        rec.routed = sf_id
        if sf_id:
            send(
                shard(ORDERS, sf_id),
                ErpOrderFact(
                    key,
                    order_no,
                    sf_id,
                    live,
                    f.get("status"),
                    f.get("total_amount"),
                    rec.top[0][0],
                    rec.invoiced_at,
                    rec.event_time,
                    rec.identity,
                ),
            )
    elif entity == "inventory":
        sku = _s(f.get("sku"))
        if sku is None:
            sku = _s(orjson.loads(key).get("sku"))
        if sku is not None:
            send(
                shard(SKUS, sku),
                InventoryFact(
                    sku,
                    key,
                    live,
                    f.get("qty_on_hand"),
                    f.get("qty_allocated"),
                    rec.event_time,
                    rec.identity,
                ),
            )
    elif entity == "items":
        sku = _s(f.get("sku"))
        if sku is None:
            sku = _s(orjson.loads(key).get("sku"))
        if sku is not None:
            send(shard(SKUS, sku), ErpItemFact(sku, live, rec.event_time, rec.identity))
