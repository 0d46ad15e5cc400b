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
    GAP,
    RESYNCED,
    SALESFORCE,
    Change,
    version_string,
)
from sferp.sfid import to18

from .cold import Shapes, freeze, thaw
from .decode_common import dumps_compact, loads_exact
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
from .merge_records import ErpRecord, SfRecord
from .record_table import RecordTable
from .routing import GLOBAL, ORDERS, PRODUCTS, SKUS, shard
from .slots import compact_pickle

__all__ = ["ErpRecord", "MergeState", "Merger", "SfRecord", "fields_json"]

# Stats vector positions, shared with the coordinator.
CONSUMED, APPLIED, DUPLICATES, LATE, DEAD, IGNORED = range(6)

_SORTED = orjson.OPT_SORT_KEYS


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


@compact_pickle
class MergeState:
    """Everything one merge shard remembers (pickled into Bytewax snapshots)."""

    __slots__ = ("dedup", "records", "gaps", "clock", "partition_clocks", "shapes")

    def __init__(self, window_ms: int) -> None:
        self.dedup = DedupWindow(window_ms)
        # A record is an object while a batch works on it, else mostly frozen (cold.py).
        self.records = RecordTable()
        self.shapes = Shapes()  # the field names of the frozen records
        # resync key -> [gap stamp, open emitted?, event_time(, stamp of a RESYNCED marker)]
        self.gaps: dict[str, list] = {}
        self.clock = 0  # the largest partition clock this shard has heard of
        self.partition_clocks: dict[tuple[str, int], int] = {}

    def _after_load(self) -> None:
        """Snapshots of earlier versions: no shapes, and one flat dict of records."""
        if not hasattr(self, "shapes"):
            self.shapes = Shapes()
        if type(self.records) is dict:
            self.records = RecordTable(self.records)


class Merger:
    """The merge logic of one shard, free of Bytewax so it can be tested directly."""

    def __init__(self, state: MergeState, lateness_ms: int) -> None:
        self.state = state
        self.lateness_ms = lateness_ms

    def process(self, payloads: list[tuple]) -> list[tuple[str, tuple]]:
        """Apply a batch of payloads; return (destination shard, payload) items."""
        st = self.state
        kinds = st.records.kinds
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
                source, key = ch.source, ch.key
                records = kinds.get((source, ch.entity))
                if records is None:
                    records = st.records.of(source, ch.entity)
                rkey = (source, ch.entity, key)
                rec = records.get(key)
                if rec is None:
                    rec = records[key] = SfRecord() if source == SALESFORCE else ErpRecord()
                elif type(rec) is bytes:
                    rec = records[key] = thaw(rkey, rec, st.shapes)
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
        kinds = self.state.records.kinds
        shapes = self.state.shapes
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
                cold = freeze(rec, rkey, fields, shapes)
                if cold is not None:
                    kinds[(source, entity)][key] = cold
        for key in dirty_gaps:
            g = self.state.gaps[key]
            recs = [] if key.endswith(":*") else _records_with_key(self.state, key)
            resynced = len(g) > 3 and g[3] > g[0]
            is_open = not resynced and not any(
                r.lc_stamp is not None and r.lc_stamp > g[0] for r in recs
            )
            if is_open != g[1] or is_open:
                # The gap event; else what closed it: the re-read, or the newest lifecycle.
                if is_open:
                    ident = g[0][1]
                elif resynced:
                    ident = g[3][1]
                else:
                    ident = max(r.lc_stamp for r in recs if r.lc_stamp is not None)[1]
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
                        {"salesforce": ident} if ident else None,
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
        rkey = (SALESFORCE, entity, key)
        rec = state.records.get(rkey)
        if type(rec) is bytes:
            rec = thaw(rkey, rec, state.shapes)
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
            # Salesforce sends it as text: a number or a boolean there names no ERP sku
            sku = code if live and type(code) is str and code != "" else None
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
            sf_id = "\x00" + dumps_compact(raw)
        order_no = _s(f.get("order_no"))
        if order_no is None:
            order_no = _s(loads_exact(key).get("order_no")) or key
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
            sku = _s(loads_exact(key).get("sku"))
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
            sku = _s(loads_exact(key).get("sku"))
        if sku is not None:
            send(shard(SKUS, sku), ErpItemFact(sku, live, rec.event_time, rec.identity))
