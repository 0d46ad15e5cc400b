"""Wiring of the direct Salesforce connection into the reconcile flow.

With `salesforce.instance_url` set, `attach_salesforce` adds to the routed
stream (the decoder's output, before the merge stage):

    SalesforcePollSource ─► change router ─┐   (when poll_objects is not empty)
    decode+route ─► split_gaps ─┬──────────┴─► merge, coordinator
                                └─► resync (one key) ─┘

- polled changes are routed to the merge shards exactly like decoded CDC
  changes (partition clocks, ticks, the flow's clock);
- gap markers are held back from the merge stage until the resync step has
  tried to re-read their records, then handed on together with the images
  (connectors/sf_resync.py), so SF_RESYNC_NEEDED opens only when the re-read
  fails.

`attach_writeback` (with `salesforce.writeback`) feeds the coordinator's view
deltas to the write-back sink.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulBatchLogic
from sferp.connectors.salesforce import SalesforcePollSource
from sferp.connectors.sf_client import ApiConfig, SalesforceApi, api_config
from sferp.connectors.sf_resync import Resyncer
from sferp.connectors.sf_writeback import (
    DeadLetterWriter,
    KafkaDeadLetters,
    SalesforceWritebackSink,
    WritebackFields,
    WritebackInput,
)
from sferp.operators.coordinator import iso
from sferp.operators.decode import DecodeConfig
from sferp.operators.facts import CHANGES, GLOBAL_IN, TICK, GlobalInput
from sferp.operators.routing import GLOBAL, MERGE, SHARDS, shard

from sferp.config import Settings
from sferp.events import GAP, SALESFORCE, Change

__all__ = [
    "RESYNC_KEY",
    "attach_salesforce",
    "attach_writeback",
    "dead_letter_writer",
    "make_change_router",
    "salesforce_enabled",
    "split_gaps",
    "with_echo_rule",
    "writeback_fields",
    "writeback_input",
]

log = logging.getLogger("sferp.salesforce")

# Key of the single resync stage. Its first letter must differ from every other
# stage's prefix (m, o, p, k, g): reconcile.py filters routed items by it.
RESYNC_KEY = "rsync"
_TICK_SHARDS = [f"{MERGE}{i:02d}" for i in range(SHARDS)]


def salesforce_enabled(settings: Settings) -> bool:
    """Whether a direct API connection is configured."""
    return bool(settings.salesforce.instance_url)


def writeback_fields(settings: Settings) -> WritebackFields:
    """The custom field names of the write-back."""
    s = settings.salesforce
    return WritebackFields(
        s.writeback_order_no_field,
        s.writeback_stage_field,
        s.writeback_invoiced_at_field,
        s.writeback_atp_field,
    )


def with_echo_rule(cfg: DecodeConfig, settings: Settings) -> DecodeConfig:
    """The decoder settings, ignoring CDC echoes of the write-back when it is on."""
    if not settings.salesforce.writeback:
        return cfg
    echo = (settings.salesforce.client_id, writeback_fields(settings).all())
    return dataclasses.replace(cfg, writeback_echo=echo)


def dead_letter_writer(settings: Settings, kafka: bool) -> DeadLetterWriter:
    """Where write-back failures go: the DLQ topic, or (no Kafka outputs) the log only.

    Values of `[security] encrypt_fields` in a failed record are encrypted first,
    as in every other dead letter (docs/data-protection.md).
    """
    writer: DeadLetterWriter
    if kafka:
        writer = KafkaDeadLetters(
            settings.kafka.bootstrap, settings.topics.dlq, settings.kafka_client_config()
        )
    else:

        def writer(key: bytes, value: bytes) -> None:
            log.error("write-back dead letter %s: %s", key.decode(), value.decode())

    from sferp.protect import protector_from_settings

    p = protector_from_settings(settings)
    t = settings.topics
    protect = None
    if p is not None:
        protect = p.for_kafka(dlq=t.dlq, orders=t.out_orders, exceptions=t.out_exceptions)
    if protect is None or not protect.dlq:
        return writer
    inner = writer

    def protected(key: bytes, value: bytes) -> None:
        [(_, k, v)] = protect([(t.dlq, key, value)])
        inner(k, v)

    return protected


def make_change_router(*, live: bool, max_future_skew_ms: int) -> Any:
    """Route a batch of polled changes as the decode router routes decoded ones.

    Each change is stamped with its partition's clock as of itself; every merge
    shard gets a tick with the batch's partition clocks, and the coordinator the
    largest event time (polled event times are part of the flow's clock).
    """

    def route(batch: list[Change]) -> list[tuple[str, tuple]]:
        if not batch:
            return []
        cap = (time.time() * 1000 + max_future_skew_ms) if live else float("inf")
        per: dict[tuple[str, tuple[str, int]], tuple[list, list]] = {}
        clocks: dict[tuple[str, int], int] = {}
        for ch in batch:
            tp = (ch.topic, ch.partition)
            clock = clocks.get(tp, -1)
            if clock < ch.event_time <= cap:
                clock = clocks[tp] = ch.event_time
            k = (shard(MERGE, ch.key), tp)
            slot = per.get(k)
            if slot is None:
                slot = per[k] = ([], [])
            slot[0].append(ch)
            slot[1].append(clock)
        out: list[tuple[str, tuple]] = [
            (dest, (CHANGES, tp, chs, stamps)) for (dest, tp), (chs, stamps) in per.items()
        ]
        if clocks:
            out.extend((dest, (TICK, dict(clocks))) for dest in _TICK_SHARDS)
            gi = GlobalInput({}, max(clocks.values()), [], {}, [], [], [])
            out.append((GLOBAL, (GLOBAL_IN, gi)))
        return out

    return route


def split_gaps(item: tuple[str, tuple]) -> list[tuple[str, tuple]]:
    """Take Salesforce gap markers out of a merge payload and send them to the resync key."""
    dest, payload = item
    if dest[0] != MERGE or payload[0] != CHANGES:
        return [item]
    _, tp, chs, stamps = payload
    for ch in chs:
        if ch.op == GAP:
            break
    else:
        return [item]
    keep: tuple[list, list] = ([], [])
    gaps: tuple[list, list] = ([], [])
    for ch, stamp in zip(chs, stamps, strict=True):
        slot = gaps if ch.op == GAP and ch.source == SALESFORCE else keep
        slot[0].append(ch)
        slot[1].append(stamp)
    out = [(RESYNC_KEY, gaps)]
    if keep[0]:
        out.append((dest, (CHANGES, tp, keep[0], keep[1])))
    return out


class _ResyncLogic(StatefulBatchLogic):
    """Bytewax adapter of a Resyncer: retries when due, pending re-reads in snapshots."""

    def __init__(self, resyncer: Resyncer, recovery: bool) -> None:
        self.r = resyncer
        self.recovery = recovery

    def on_batch(self, values: list) -> tuple[list, bool]:
        gaps: list[Change] = []
        stamps: list[int] = []
        for g, s in values:  # one read per entity for the whole batch
            gaps.extend(g)
            stamps.extend(s)
        out = self.r.on_gaps(gaps, stamps)
        out.extend(self.r.retry_due())
        return ([out] if out else []), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        due = self.r.next_due()
        if due is None:
            return None
        return datetime.now(UTC) + timedelta(seconds=max(0.0, due - time.monotonic()))

    def on_notify(self) -> tuple[list, bool]:
        out = self.r.retry_due()
        return ([out] if out else []), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list, bool]:
        out = self.r.retry_due(force=True)
        return ([out] if out else []), StatefulBatchLogic.RETAIN

    def snapshot(self) -> Any:
        if not self.recovery:
            return None
        return pickle.dumps(self.r.pending, protocol=pickle.HIGHEST_PROTOCOL)


def attach_salesforce(
    flow: Dataflow,
    routed: Stream,
    settings: Settings,
    *,
    bounded: bool,
    recovery: bool,
    stop_event: threading.Event,
    cfg: ApiConfig | None = None,
) -> Stream:
    """Add polling and gap re-reads to the routed stream; return the new routed stream."""
    s = settings.salesforce
    cfg = cfg or api_config(settings)
    live = not bounded
    skew_ms = settings.flow.max_future_skew_s * 1000
    streams = []
    if s.poll_objects:
        source = SalesforcePollSource(
            cfg,
            list(s.poll_objects),
            poll_interval_s=s.poll_interval_s,
            lookback_s=s.lookback_s,
            bulk_threshold=s.bulk_threshold,
            bounded=bounded,
            stop_event=stop_event,
        )
        polled = op.input("sf_poll", flow, source)
        streams.append(
            op.flat_map(
                "sf_poll_route",
                polled,
                make_change_router(live=live, max_future_skew_ms=skew_ms),
            )
        )
    split = op.flat_map("sf_gaps", routed, split_gaps)
    to_resync = op.filter("sf_to_resync", split, lambda kv: kv[0] == RESYNC_KEY)
    rest = op.filter("sf_not_resync", split, lambda kv: kv[0] != RESYNC_KEY)

    def builder(resume: Any) -> _ResyncLogic:
        pending = None if resume is None else pickle.loads(resume)
        api = SalesforceApi(cfg, stop=stop_event)
        return _ResyncLogic(Resyncer(api, pending=pending), recovery)

    resynced = op.flat_map(
        "sf_resync_out", op.stateful_batch("sf_resync", to_resync, builder), lambda kv: kv[1]
    )
    return op.merge("sf_routed", rest, resynced, *streams)


def writeback_input(kv: tuple[str, dict]) -> list[tuple[str, WritebackInput]]:
    """The write-back's share of one coordinator delta (order rows, sku rows, products)."""
    delta = kv[1]
    orders = [
        (pk[0], None if row is None else (row[3], row[6], iso(row[11])))
        for pk, row in delta.get("order_status", {}).items()
    ]
    atp = [
        (pk[0], None if row is None else row[4])
        for pk, row in delta.get("inventory_live", {}).items()
    ]
    products: list[tuple[str, str | None]] = []
    for rkey, row in delta.get("records", {}).items():
        if rkey[0] != SALESFORCE or rkey[1] != "Product2" or row is None:
            continue
        code = orjson.loads(row[4]).get("ProductCode")
        live = not row[3]
        sku = str(code) if live and code not in (None, "") else None
        products.append((rkey[2], sku))
    if not (orders or atp or products):
        return []
    return [("writeback", WritebackInput(orders, atp, products))]


def attach_writeback(
    deltas: Stream,
    settings: Settings,
    dead_letters: DeadLetterWriter,
    *,
    writer: bool,
    recovery: bool,
    cfg: ApiConfig | None = None,
) -> None:
    """Send reconciled order status and available-to-promise to Salesforce."""
    cfg = cfg or api_config(settings)
    items = op.flat_map("sf_writeback_in", deltas, writeback_input)
    sink = SalesforceWritebackSink(
        cfg, writeback_fields(settings), dead_letters, writer=writer, snapshots=recovery
    )
    op.output("sf_writeback", items, sink)
