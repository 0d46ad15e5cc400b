"""The Kafka router (flows/reconcile.py `make_router`): partition clocks and ticks."""

from __future__ import annotations

import logging

import orjson
from sferp.flows.reconcile import ControlEventLog, make_router
from sferp.operators.decode import IGNORED_TRUNCATE, DecodeConfig, decode_batch
from sferp.operators.facts import CHANGES, GLOBAL_IN, TICK
from sferp.operators.merge import IGNORED
from sferp.operators.routing import SHARDS

from sferp.demo import generated_messages
from sferp.events import Change, Ignored, RawMessage
from sferp.generator import DEFAULT_TOPICS, GeneratorConfig

ROLES = {
    DEFAULT_TOPICS["sf_cdc"]: "salesforce",
    DEFAULT_TOPICS["erp_items"]: "items",
    DEFAULT_TOPICS["erp_inventory"]: "inventory",
    DEFAULT_TOPICS["erp_sales_orders"]: "sales_orders",
}


def _one_partition() -> list:
    msgs = generated_messages(GeneratorConfig(orders=300, seed=3, partitions=1))
    sf = [m for m in msgs if m.topic == DEFAULT_TOPICS["sf_cdc"]]
    assert len(sf) > 500
    return sf


def _stamps(out: list) -> dict[tuple[int, str], int]:
    """(offset, record key) of each change -> the clock stamp the router gave it."""
    return {
        (ch.offset, ch.key): stamp
        for _, p in out
        if p[0] == CHANGES
        for ch, stamp in zip(p[2], p[3], strict=True)
    }


def test_stamps_carry_the_partition_clock_across_batches() -> None:
    """A change's stamp is the largest event time its partition showed before it,
    whichever batch that was in: what a shard decides with it cannot depend on
    how the stream was cut into batches."""
    cfg = DecodeConfig(topics=ROLES)
    msgs = _one_partition()
    whole = _stamps(make_router(cfg, live=False, max_future_skew_ms=0)(msgs))
    route = make_router(cfg, live=False, max_future_skew_ms=0)
    cut: dict[tuple[int, str], int] = {}
    for i in range(0, len(msgs), 7):
        cut.update(_stamps(route(msgs[i : i + 7])))
    assert cut == whole
    # and each stamp is the running maximum of event times up to its message
    clock = -1
    for o in decode_batch(msgs, cfg):
        t = getattr(o, "event_time", None)
        if t is not None:
            clock = max(clock, t)
        if type(o) is Change:
            assert whole[(o.offset, o.key)] == clock
    assert len(whole) > 500


def test_ticks_go_to_every_shard_only_when_a_clock_enters_a_new_minute() -> None:
    cfg = DecodeConfig(topics=ROLES)
    msgs = _one_partition()
    route = make_router(cfg, live=False, max_future_skew_ms=0)
    batches = [msgs[i : i + 5] for i in range(0, len(msgs), 5)]
    seen_minute: int | None = None
    clock = -1
    ticked_batches = 0
    for batch in batches:
        out = route(batch)
        for o in decode_batch(batch, cfg):
            t = getattr(o, "event_time", None)
            if t is not None and t > clock:
                clock = t
        ticks = [(dest, p) for dest, p in out if p[0] == TICK]
        # every batch tells the coordinator's input (and the metrics probe) its clocks
        (gi,) = [p[1] for dest, p in out if p[0] == GLOBAL_IN]
        assert gi.clocks == ({(batch[0].topic, 0): clock} if clock >= 0 else {})
        minute = clock // 60_000 if clock >= 0 else None
        if minute is not None and minute != seen_minute:
            assert len(ticks) == SHARDS  # every merge shard hears of the new minute
            assert {d for d, _ in ticks} == {f"m{i:02d}" for i in range(SHARDS)}
            assert all(p[1] == {(batch[0].topic, 0): clock} for _, p in ticks)
            seen_minute = minute
            ticked_batches += 1
        else:
            assert ticks == []
    assert 1 < ticked_batches < len(batches) // 2


def _erp_control(op: str, offset: int, ts: int) -> RawMessage:
    value = {"op": op, "source": {"ts_ms": ts, "table": "items", "lsn": offset}, "ts_ms": ts}
    return RawMessage(DEFAULT_TOPICS["erp_items"], 0, offset, None, orjson.dumps(value), ts)


def test_erp_truncates_and_messages_move_the_clock_and_are_logged(caplog) -> None:
    """CONTRACT §1.2: `t`/`m` are counted as ignored and logged; §2: an event that is
    not dead-lettered moves the clock."""
    route = make_router(DecodeConfig(topics=ROLES), live=False, max_future_skew_ms=0)
    t0 = 1_764_309_600_000
    with caplog.at_level(logging.WARNING, logger="sferp.flow"):
        out = route([_erp_control("t", 5, t0), _erp_control("m", 6, t0 + 1000)])
        out += route([_erp_control("t", 7, t0 + 2000), _erp_control("t", 8, t0 + 3000)])
    gis = [p[1] for dest, p in out if p[0] == GLOBAL_IN]
    assert [gi.clocks for gi in gis] == [
        {(DEFAULT_TOPICS["erp_items"], 0): t0 + 1000},
        {(DEFAULT_TOPICS["erp_items"], 0): t0 + 3000},
    ]
    assert sum(gi.stats[DEFAULT_TOPICS["erp_items"]][IGNORED] for gi in gis) == 4
    lines = [r.getMessage() for r in caplog.records]
    # The first truncate and the first message at once; later truncates within the
    # minute are counted into the next line.
    assert len(lines) == 2
    assert "truncate (op t)" in lines[0] and "offset 5" in lines[0]
    assert "logical decoding message (op m)" in lines[1] and "offset 6" in lines[1]


def test_control_event_lines_are_limited_to_one_a_minute_per_kind(caplog) -> None:
    clog = ControlEventLog(interval_s=60)
    event = Ignored(DEFAULT_TOPICS["erp_items"], 0, 1, IGNORED_TRUNCATE, None)
    with caplog.at_level(logging.WARNING, logger="sferp.flow"):
        for now in (0.0, 1.0, 2.0, 61.0, 62.0):
            clog.saw(event, now)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "such events" not in lines[0]
    assert "(3 such events since the last line)" in lines[1]
