"""The write-back against a local HTTPS Salesforce: changes only, faults survived with every record
written exactly once, the circuit breaker, dead letters, the calls-per-minute budget."""

from __future__ import annotations

import time

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from sf_fake import Fault, api_cfg
from sferp.connectors.sf_client import Backoff, SalesforceApi
from sferp.connectors.sf_writeback import (
    KafkaDeadLetters,
    SalesforceWritebackSink,
    Writeback,
    WritebackFields,
    WritebackInput,
)

T0 = 1_795_000_000_000
F = WritebackFields()


def _ids(n: int, prefix: str = "801") -> list[str]:
    return [f"{prefix}0000000{i:05d}AAA" for i in range(n)]


def _seed(org, ids: list[str], obj: str = "Order") -> None:
    for rid in ids:
        org.put(obj, rid, {"Status": "Activated"}, T0)


def _row(i: int, stage: str = "OPEN") -> tuple:
    return (f"SO-{i}", stage, "2026-11-18T10:00:00.000Z" if stage == "INVOICED" else None)


def _orders(ids: list[str], stage: str = "OPEN") -> WritebackInput:
    return WritebackInput([(rid, _row(i, stage)) for i, rid in enumerate(ids)], [], [])


class Rig:
    def __init__(self, srv, **cfg) -> None:
        self.org = srv.org
        self.dead: list[dict] = []
        self.api = SalesforceApi(api_cfg(srv, **cfg))
        self.wb = Writeback(
            self.api,
            F,
            lambda k, v: self.dead.append(orjson.loads(v) | {"key": k.decode()}),
            backoff=Backoff(0.01, 0.05),
            max_attempts=4,
        )

    def settle(self, limit_s: float = 15.0) -> None:
        deadline = time.monotonic() + limit_s
        while self.wb.work_left():
            assert time.monotonic() < deadline, "write-back did not settle"
            self.wb.step(wait_s=0.01)

    def writes(self, rid: str | None = None) -> list:
        return [w for w in self.org.writes if rid is None or w[1] == rid]

    def updates(self) -> int:
        return sum(1 for c in self.org.api_calls() if c.path.endswith("/composite/sobjects"))


def test_only_changed_values_are_sent(fake_sf):
    ids = _ids(3)
    _seed(fake_sf.org, ids)
    r = Rig(fake_sf)
    r.wb.add(_orders(ids))
    r.settle()
    assert r.updates() == 1 and len(r.writes()) == 3
    assert fake_sf.org.records["Order"][ids[1]][F.order_no] == "SO-1"
    calls = len(fake_sf.org.api_calls())
    r.wb.add(_orders(ids))  # the same values again: nothing to send
    r.settle()
    assert len(fake_sf.org.api_calls()) == calls
    r.wb.add(
        WritebackInput([(ids[2], _row(2, "ALLOCATED")), (ids[2], _row(2, "INVOICED"))], [], [])
    )
    r.settle()  # two changes queued before sending: only the last one goes
    assert r.updates() == 2 and r.writes(ids[2])[-1][2] == {
        F.order_no: "SO-2",
        F.stage: "INVOICED",
        F.invoiced_at: "2026-11-18T10:00:00.000Z",
    }
    r.wb.add(WritebackInput([(ids[0], None)], [], []))  # the order left the view
    r.settle()
    assert r.updates() == 2


def test_locked_rows_are_retried_alone(fake_sf):
    ids = _ids(3)
    _seed(fake_sf.org, ids)
    fake_sf.org.lock_failures[ids[1]] = 2
    r = Rig(fake_sf)
    r.wb.add(_orders(ids))
    r.settle()
    assert [len(r.writes(i)) for i in ids] == [1, 1, 1]
    assert r.updates() == 3  # all three, then the locked one twice more
    assert r.dead == []


@pytest.mark.parametrize(
    "fault",
    [
        Fault(lambda m, p: m == "PATCH", "slow", seconds=1.0),  # applied, answer too late
        Fault(lambda m, p: m == "PATCH", "http", times=2, status=500),
        Fault(lambda m, p: m == "PATCH", "http", status=503, code="SERVER_UNAVAILABLE"),
        Fault(lambda m, p: m == "PATCH", "http", status=403, code="REQUEST_LIMIT_EXCEEDED"),
    ],
    ids=["slow-after-apply", "500", "503", "limit-exceeded"],
)
def test_each_fault_is_survived_with_every_record_written_once(fake_sf, fault):
    ids = _ids(5)
    _seed(fake_sf.org, ids)
    fake_sf.org.inject(fault)
    r = Rig(fake_sf, timeout_s=0.3, limit_probe_s=0.2)
    r.wb.add(_orders(ids))
    r.settle()
    assert [len(r.writes(i)) for i in ids] == [1] * 5
    assert r.dead == [] and not r.wb.pending
    if fault.kind == "slow":  # the ambiguous call was checked by reading back, not resent
        assert r.updates() == 1
        assert any("/query" in c.path for c in fake_sf.org.api_calls())


def test_an_expired_session_is_renewed(fake_sf):
    ids = _ids(2)
    _seed(fake_sf.org, ids)
    r = Rig(fake_sf)
    r.wb.add(_orders(ids))
    r.settle()
    fake_sf.org.expire_sessions()
    r.wb.add(_orders(ids, "SHIPPED"))
    r.settle()
    assert [len(r.writes(i)) for i in ids] == [2, 2] and r.api.logins == 2


def test_breaker_opens_then_recovers_and_nothing_is_lost(fake_sf):
    ids = _ids(4)
    _seed(fake_sf.org, ids)
    # Salesforce fails 3 calls (the breaker opens), then the half-open probe, then is back.
    fake_sf.org.inject(Fault(lambda m, p: m == "PATCH", "http", times=4, status=500))
    r = Rig(fake_sf, breaker_failures=3, breaker_open_s=0.4)
    r.wb.max_attempts = 100
    r.wb.add(_orders(ids))
    r.settle()
    assert r.api.gate.breaker.transitions == ["open", "half_open", "open", "half_open", "closed"]
    calls = [c for c in fake_sf.org.api_calls() if c.path.endswith("/composite/sobjects")]
    assert [c.status for c in calls] == [500, 500, 500, 500, 200]
    gaps = [b.at - a.at for a, b in zip(calls, calls[1:], strict=False)]
    assert max(gaps[:2]) < 0.2  # backoff between the first failures
    assert min(gaps[2:]) >= 0.38  # open: nothing sent until the half-open probe
    assert [len(r.writes(i)) for i in ids] == [1] * 4 and r.dead == []


def test_failures_go_to_the_dead_letter_topic_with_the_error_code(fake_sf):
    ids = _ids(3)
    _seed(fake_sf.org, ids)
    fake_sf.org.rejects[ids[0]] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    fake_sf.org.lock_failures[ids[1]] = 100
    r = Rig(fake_sf)
    r.wb.add(_orders(ids))
    r.settle()
    by_id = {orjson.loads(d["raw"])["id"]: d for d in r.dead}
    assert by_id[ids[0]]["reason"] == "writeback:FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert by_id[ids[1]]["reason"] == "writeback:UNABLE_TO_LOCK_ROW"
    assert by_id[ids[0]]["key"] == f"salesforce.writeback:Order:{ids[0]}"
    assert by_id[ids[0]]["topic"] == "salesforce.writeback"
    assert orjson.loads(by_id[ids[0]]["raw"])["fields"][F.order_no] == "SO-0"
    assert len(r.writes(ids[2])) == 1 and len(r.dead) == 2
    assert r.updates() == 4  # the locked record: 4 attempts


def test_available_to_promise_reaches_products_by_sku(fake_sf):
    org = fake_sf.org
    p1, p2, p3 = _ids(3, "01t")
    _seed(org, [p1, p2, p3], "Product2")
    org.records["Product2"][p3]["ProductCode"] = "SKU-3"
    r = Rig(fake_sf)
    # p1 and p2 are mirrored with sku SKU-1 and SKU-2; SKU-3's product is looked up.
    r.wb.add(WritebackInput([], [("SKU-1", 14), ("SKU-3", 7)], [(p1, "SKU-1"), (p2, "SKU-2")]))
    r.settle()
    assert org.records["Product2"][p1][F.atp] == 14
    assert org.records["Product2"][p3][F.atp] == 7
    assert F.atp not in org.records["Product2"][p2]
    r.wb.add(WritebackInput([], [("SKU-2", 3), ("SKU-1", None)], []))
    r.settle()
    assert org.records["Product2"][p2][F.atp] == 3
    assert org.records["Product2"][p1][F.atp] == 0  # left inventory_live: nothing to promise
    r.wb.add(WritebackInput([], [("SKU-9", 5)], []))  # no product has this code
    r.settle()
    lookups = [c for c in org.api_calls() if "/query" in c.path]
    assert len(lookups) == 2
    r.wb.add(WritebackInput([], [("SKU-9", 6)], []))  # the miss is cached for a while
    r.settle()
    assert len([c for c in org.api_calls() if "/query" in c.path]) == 2


def test_the_sink_stays_within_its_calls_per_minute_budget(fake_sf):
    ids = _ids(1000)
    _seed(fake_sf.org, ids)
    sink = SalesforceWritebackSink(
        api_cfg(fake_sf, calls_per_minute=300), F, lambda k, v: None, drain_timeout_s=30
    )
    part = sink.build_part("sf_writeback", "writeback", None)
    part.write_batch([_orders(ids)])
    deadline = time.monotonic() + 10
    while part.wb.work_left():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    part.write_batch([_orders(ids[:10], "SHIPPED")])
    part.close()  # drains the queue
    calls = [c for c in fake_sf.org.api_calls() if c.path.endswith("/composite/sobjects")]
    at = [c.at for c in calls]
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert len(calls) == 6  # 1000 records in 200s, then the 10 that changed again
    # 300/min: sent one every 0.2 s (an unpaced sender needs ~0.01 s); the server's
    # arrival times jitter by a few tens of ms on a busy machine.
    assert min(gaps) >= 0.1 and at[-1] - at[0] >= 0.9, gaps
    assert max(n for n in (sum(1 for t in at if a <= t < a + 0.5) for a in at)) <= 3
    assert len(fake_sf.org.writes) == 1010
    assert part.snapshot() is None  # no recovery store: nothing pickled


def test_dead_letters_reach_the_dlq_topic(fake_sf, broker, topics):
    dlq = topics({"dlq": 1})["dlq"]
    ids = _ids(2)
    _seed(fake_sf.org, ids)
    fake_sf.org.rejects[ids[1]] = "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    api = SalesforceApi(api_cfg(fake_sf))
    wb = Writeback(api, F, KafkaDeadLetters(broker.bootstrap, dlq, {}))
    wb.add(_orders(ids))
    while wb.work_left():
        wb.step(wait_s=0.01)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    tp = TopicPartition(dlq, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got = [m for ms in consumer.poll(timeout_ms=200).values() for m in ms]
    consumer.close()
    assert len(got) == 1
    assert got[0].key == f"salesforce.writeback:Order:{ids[1]}".encode()
    value = orjson.loads(got[0].value)
    assert value["reason"] == "writeback:INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    # CONTRACT §3.2: the DLQ's fields, and, like every output value, `lineage`.
    assert set(value) == {"reason", "topic", "partition", "offset", "raw", "lineage"}
    assert value["lineage"] == {"input": f"salesforce.writeback:Order:{ids[1]}"}
