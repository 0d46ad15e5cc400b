"""The coordinator: the flow's clock, hand-off SLAs, exceptions and Kafka rendering."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sferp.operators import coordinator as coord_mod
from sferp.operators.coordinator import (
    INVENTORY_COLUMNS,
    Coordinator,
    CoordinatorState,
    OutputTopics,
    iso,
    row_json,
)
from sferp.operators.facts import ExceptionFact, GlobalInput, HandoffCandidate

MIN = 60_000


def gi(**kw) -> GlobalInput:
    base = {
        "stats": {},
        "clock": None,
        "dead_letters": [],
        "rows": {},
        "exceptions": [],
        "handoffs": [],
        "kafka": [],
    }
    base.update(kw)
    return GlobalInput(**base)


def make(live=False, **kw) -> Coordinator:
    return Coordinator(
        CoordinatorState(), handoff_sla_ms=15 * MIN, topics=OutputTopics(), live=live, **kw
    )


def test_iso_matches_datetime_rendering():
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(1793606400123) == "2026-11-02T08:00:00.123Z"
    assert iso(None) is None


def test_flow_stats_has_a_row_for_every_input_topic_from_the_start():
    c = make(input_topics=("a", "b"))
    delta, _ = c.process([gi(stats={"a": [3, 2, 1, 0, 0, 0]})])
    assert delta["flow_stats"][("a",)] == ("a", 3, 2, 1, 0, 0, 0)
    assert delta["flow_stats"][("b",)] == ("b", 0, 0, 0, 0, 0, 0)


def test_handoff_opens_only_after_the_sla_in_event_time_and_closes_on_handoff():
    c = make()
    t0 = 1_800_000_000_000
    lineage = {"salesforce": "sf|Order|tx|1|801A"}
    delta, kafka = c.process([gi(clock=t0, handoffs=[HandoffCandidate("801A", t0, lineage)])])
    assert "reconciliation_exceptions" not in delta
    delta, kafka = c.process([gi(clock=t0 + 15 * MIN)])  # exactly the SLA: not exceeded
    assert "reconciliation_exceptions" not in delta
    delta, kafka = c.process([gi(clock=t0 + 15 * MIN + 1)])
    row = delta["reconciliation_exceptions"][("HANDOFF_OVERDUE", "801A")]
    assert row[5] is True and row[3] == t0 + 15 * MIN  # first_seen: when it became overdue
    ((topic, key, value),) = kafka
    assert topic == "reconciled.exceptions" and key == b"HANDOFF_OVERDUE:801A"
    assert json.loads(value)["open"] is True
    assert json.loads(value)["lineage"] == lineage  # the activated order's event
    linked = {"salesforce": "sf|Order|tx|1|801A", "erp": "erp|sales_orders|k|9"}
    delta, kafka = c.process([gi(handoffs=[HandoffCandidate("801A", None, linked)])])
    assert delta["reconciliation_exceptions"][("HANDOFF_OVERDUE", "801A")][5] is False
    ((_, _, value),) = kafka
    assert json.loads(value)["lineage"] == linked  # the events that handed it off
    assert c.state.lineage == {}  # nothing kept for orders no longer pending


def test_exceptions_carry_the_lineage_of_their_facts():
    c = make()
    lin = {"erp": "erp|sales_orders|k|3"}
    _, kafka = c.process(
        [gi(exceptions=[ExceptionFact("ORPHAN_ERP_ORDER", "7", True, "d", 1, lin)])]
    )
    ((topic, key, value),) = kafka
    assert (topic, key) == ("reconciled.exceptions", b"ORPHAN_ERP_ORDER:7")
    assert json.loads(value)["lineage"] == lin


def test_live_clock_ages_with_wall_clock_and_is_capped(monkeypatch):
    wall = [1_800_000_000_000]
    monkeypatch.setattr(coord_mod, "_wall_ms", lambda: wall[0])
    c = make(live=True, max_future_skew_ms=5 * MIN)
    t0 = wall[0] - 10 * MIN
    c.process([gi(clock=t0, handoffs=[HandoffCandidate("801B", t0)])])
    assert c.now() == t0
    wall[0] += 16 * MIN  # no events for 16 minutes: the clock still moves
    assert c.now() == t0 + 16 * MIN
    delta, _ = c.tick()
    assert ("HANDOFF_OVERDUE", "801B") in delta["reconciliation_exceptions"]
    # an event stamped far in the future cannot drag the clock past wall + skew
    c.process([gi(clock=wall[0] + 60 * MIN)])
    assert c.now() == wall[0] + 5 * MIN


def test_live_clock_ages_across_a_restart_from_a_snapshot(monkeypatch):
    """CONTRACT §2: the live clock advances by the wall-clock time since the largest event
    time was seen, as Bytewax's EventClock does (it snapshots that moment): downtime
    counts, so a hand-off due during the downtime is overdue at once after the restart."""
    wall = [1_800_000_000_000]
    monkeypatch.setattr(coord_mod, "_wall_ms", lambda: wall[0])
    c = make(live=True)
    t0 = wall[0] - 5_000
    c.process([gi(clock=t0, handoffs=[HandoffCandidate("801B", t0)])])
    wall[0] += 5_000
    snapshot = pickle.dumps(c.state)
    wall[0] += 30 * MIN  # stopped for half an hour
    restored = Coordinator(
        pickle.loads(snapshot), handoff_sla_ms=15 * MIN, topics=OutputTopics(), live=True
    )
    assert restored.now() == t0 + 5_000 + 30 * MIN
    delta, _ = restored.tick()
    assert ("HANDOFF_OVERDUE", "801B") in delta["reconciliation_exceptions"]
    old = CoordinatorState()
    old.clock = t0
    del old.__dict__["clock_wall"]  # a snapshot from before the clock's wall time was kept
    aged_from_start = Coordinator(
        pickle.loads(pickle.dumps(old)), handoff_sla_ms=15 * MIN, topics=OutputTopics(), live=True
    )
    assert aged_from_start.now() == t0


def test_bounded_clock_is_the_largest_event_time():
    c = make()
    c.process([gi(clock=5), gi(clock=3)])
    assert c.now() == 5


def test_a_row_changed_twice_in_a_batch_is_sent_once_in_its_final_version():
    c = make()
    r1 = ("SKU-1", 10, 0, 0, 10, 1000, {"erp": "e1"}, True)
    r2 = ("SKU-1", 12, 0, 0, 12, 2000, {"erp": "e2"}, True)
    delta, kafka = c.process(
        [
            gi(rows={"inventory_live": {("SKU-1",): r1}}),
            gi(rows={"inventory_live": {("SKU-1",): r2}}),
        ]
    )
    assert delta["inventory_live"][("SKU-1",)] == r2[:-2]
    ((topic, key, value),) = kafka
    doc = json.loads(value)
    assert (topic, key) == ("reconciled.inventory", b"SKU-1")
    assert doc["on_hand"] == 12 and doc["lineage"] == {"erp": "e2"}
    assert doc["updated_at"] == "1970-01-01T00:00:02.000Z"


def test_only_informational_changes_update_duckdb_but_not_kafka():
    c = make()
    row = ("SKU-1", 10, 0, 0, 10, 3000, {"erp": "e3"}, False)
    delta, kafka = c.process([gi(rows={"inventory_live": {("SKU-1",): row}})])
    assert delta["inventory_live"][("SKU-1",)][5] == 3000
    assert kafka == []


def test_a_row_leaving_a_view_is_a_tombstone():
    c = make()
    _, kafka = c.process([gi(rows={"order_status": {("801C",): None}})])
    assert kafka == [("reconciled.orders", b"801C", None)]


@pytest.mark.parametrize("reopen_detail", ["same", "changed"])
def test_exception_first_seen_is_kept_while_open(reopen_detail):
    c = make()
    c.process([gi(exceptions=[ExceptionFact("UNKNOWN_SKU", "X", True, "d", 100)])])
    detail = "d" if reopen_detail == "same" else "d2"
    delta, _ = c.process([gi(exceptions=[ExceptionFact("UNKNOWN_SKU", "X", True, detail, 200)])])
    row = delta["reconciliation_exceptions"][("UNKNOWN_SKU", "X")]
    assert row[3] == 100 and row[4] == 200 and row[2] == detail
    delta, _ = c.process([gi(exceptions=[ExceptionFact("UNKNOWN_SKU", "X", False, "ok", 300)])])
    row = delta["reconciliation_exceptions"][("UNKNOWN_SKU", "X")]
    assert row[5] is False and row[3] == 100


def test_kafka_rendering_is_skipped_when_outputs_are_off():
    c = make(kafka_outputs=False)
    row = ("SKU-1", 10, 0, 0, 10, 3000, {}, True)
    delta, kafka = c.process([gi(rows={"inventory_live": {("SKU-1",): row}})])
    assert kafka == [] and delta["inventory_live"]


# -- live emit interval: Kafka records wait, each key in its latest version ------------


def inv(sku: str, on_hand: int, t: int, kafka: bool = True) -> GlobalInput:
    return gi(rows={"inventory_live": {(sku,): (sku, on_hand, 0, 0, on_hand, t, {}, kafka)}})


def emitted(records: list) -> dict[bytes, int | None]:
    return {k: None if v is None else json.loads(v)["on_hand"] for _, k, v in records}


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(coord_mod, "_clock", lambda: now[0])
    return now


def test_live_records_wait_for_the_emit_interval_and_go_once_per_key(clock):
    c = make(live=True, emit_interval_ms=250)
    _, kafka = c.process([inv("A", 1, 1000)])
    assert kafka == [] and c.next_emit_s() == pytest.approx(0.25)
    clock[0] += 0.1
    _, kafka = c.process([inv("A", 2, 2000), inv("B", 7, 2000)])
    assert kafka == [] and c.next_emit_s() == pytest.approx(0.15)
    clock[0] += 0.1
    # informational only (not for Kafka on its own), but A waits: its record follows it
    _, kafka = c.process([inv("A", 3, 3000, kafka=False)])
    assert kafka == []
    clock[0] += 0.05
    _, kafka = c.process([gi(rows={"inventory_live": {("B",): None}})])
    assert emitted(kafka) == {b"A": 3, b"B": None}
    assert c.next_emit_s() is None and c.state.outbox == {}
    # the next interval starts at that emit
    clock[0] += 0.2
    _, kafka = c.process([inv("A", 4, 4000)])
    assert kafka == []
    delta, kafka = c.tick()  # the timer fires without new input
    assert kafka == []
    clock[0] += 0.05
    _, kafka = c.tick()
    assert emitted(kafka) == {b"A": 4}


def test_flush_emits_every_waiting_record_at_once(clock):
    c = make(live=True, emit_interval_ms=250)
    c.process([inv("A", 1, 1000), inv("C", 5, 1000)])
    assert emitted(c.flush()) == {b"A": 1, b"C": 5}
    assert c.flush() == [] and c.next_emit_s() is None


def test_waiting_records_survive_a_snapshot_and_old_snapshots_load(clock):
    c = make(live=True, emit_interval_ms=250)
    c.process([inv("A", 1, 1000)])
    restored = Coordinator(
        pickle.loads(pickle.dumps(c.state)),
        handoff_sla_ms=15 * MIN,
        topics=OutputTopics(),
        live=True,
        emit_interval_ms=250,
    )
    assert emitted(restored.flush()) == {b"A": 1}
    old = CoordinatorState()
    del old.__dict__["outbox"]  # the state's form before the outbox
    assert pickle.loads(pickle.dumps(old)).outbox == {}


def test_bounded_and_outputs_off_never_hold_records(clock):
    c = make(emit_interval_ms=0)
    _, kafka = c.process([inv("A", 1, 1000)])
    assert emitted(kafka) == {b"A": 1} and c.next_emit_s() is None
    off = make(live=True, kafka_outputs=False, emit_interval_ms=250)
    off.process([inv("A", 1, 1000)])
    assert off.state.outbox == {} and off.flush() == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(
                st.tuples(st.sampled_from("ABC"), st.integers(0, 3), st.booleans(), st.booleans()),
                max_size=4,
            ),
            st.sampled_from([0.0, 0.1, 0.3]),
        ),
        max_size=25,
    )
)
def test_waiting_only_skips_versions_and_never_ends_behind(steps):
    """Per key, the records emitted with the interval are, in order, some of the key's
    versions, and after a flush the last is never older than without the interval."""
    now = [0.0]
    saved = coord_mod._clock
    coord_mod._clock = lambda: now[0]
    try:
        eager, lazy = make(live=True), make(live=True, emit_interval_ms=250)
        seen: dict[str, dict[bytes, list]] = {"eager": {}, "lazy": {}}
        versions: dict[bytes, list] = {}  # every version given, as the plain coordinator renders it
        present: set[str] = set()
        for t, (batch, advance) in enumerate(steps):
            now[0] += advance
            inputs = []
            for i, (k, n, for_kafka, gone) in enumerate(batch):
                if gone:
                    inputs.append(gi(rows={"inventory_live": {(k,): None}}))
                    present.discard(k)
                else:  # a row that (re)appears is always news for Kafka
                    inputs.append(inv(k, n, t * 1000 + i, kafka=for_kafka or k not in present))
                    present.add(k)
                row = inputs[-1].rows["inventory_live"][(k,)]
                rendered = None if row is None else row_json(INVENTORY_COLUMNS, row[:-2], row[-2])
                versions.setdefault(k.encode(), []).append(rendered)
            for name, c in (("eager", eager), ("lazy", lazy)):
                for _, key, value in c.process(inputs)[1]:
                    seen[name].setdefault(key, []).append(value)
        for _, key, value in lazy.flush():
            seen["lazy"].setdefault(key, []).append(value)
    finally:
        coord_mod._clock = saved
    assert set(seen["lazy"]) == set(seen["eager"])

    def positions(key: bytes, values: list) -> list[int]:
        out, start = [], 0
        for v in values:  # each value found after the previous one: a subsequence
            start = versions[key].index(v, start)
            out.append(start)
            start += 1
        return out

    for key, values in seen["lazy"].items():
        positions(key, values)
        behind = positions(key, seen["eager"][key])[-1]
        assert values[-1] in versions[key][behind:], key


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4_102_444_800_000), max_size=30))
def test_iso_cache_gives_each_millisecond_its_own_text(values):
    from datetime import UTC, datetime

    for ms in values + values:  # the second pass is served from the caches
        expected = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert iso(ms) == f"{expected}.{ms % 1000:03d}Z"


@pytest.mark.parametrize("new_sla_min", [5, 15, 60])
def test_a_restart_with_another_handoff_sla_judges_the_open_orders_by_it(new_sla_min):
    """flow.handoff_sla_s changed between runs on one recovery store: the overdue set must
    follow the new value (it mixed both before: orders overdue under a short SLA stayed
    open under a long one)."""
    t0 = 1_800_000_000_000
    c = make()
    c.process([gi(clock=t0, handoffs=[HandoffCandidate("A", t0), HandoffCandidate("B", t0)])])
    c.process([gi(clock=t0 + 20 * MIN, handoffs=[HandoffCandidate("C", t0 + 20 * MIN)])])
    c.process([gi(clock=t0 + 30 * MIN)])  # A and B: 30 min; C: 10 min
    assert c.state.overdue == {"A", "B"}  # under 15 min
    restored = Coordinator(
        pickle.loads(pickle.dumps(c.state)),
        handoff_sla_ms=new_sla_min * MIN,
        topics=OutputTopics(),
    )
    delta, _ = restored.process([gi(clock=t0 + 30 * MIN)])
    waited = {"A": 30 * MIN, "B": 30 * MIN, "C": 10 * MIN}
    assert restored.state.overdue == {o for o, w in waited.items() if w > new_sla_min * MIN}
    closed = {k[1] for k, row in delta.get("reconciliation_exceptions", {}).items() if not row[-1]}
    assert closed == ({"A", "B"} if new_sla_min == 60 else set())
