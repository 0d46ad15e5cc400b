"""Gap re-reads against a local HTTPS Salesforce, through the real router, gap split and merge."""

from __future__ import annotations

import orjson
from sf_fake import Fault, api_cfg
from sferp.connectors.sf_client import Backoff, SalesforceApi
from sferp.connectors.sf_resync import Resyncer
from sferp.flows.reconcile import make_router
from sferp.flows.salesforce import RESYNC_KEY, split_gaps
from sferp.operators.decode import DecodeConfig
from sferp.operators.facts import GLOBAL_IN
from sferp.operators.merge import APPLIED, CONSUMED, Merger, MergeState
from sferp.operators.routing import GLOBAL, MERGE

from sferp.events import RawMessage

T0 = 1_795_000_000_000
TOPIC = "sf.cdc"
ROUTER = make_router(DecodeConfig(topics={TOPIC: "salesforce"}), live=False, max_future_skew_ms=0)


def _event(change_type: str, ids: list[str], ts: int, seq: int = 1, **fields) -> dict:
    header = {
        "entityName": "Order",
        "recordIds": ids,
        "changeType": change_type,
        "changeOrigin": "",
        "transactionKey": f"tx-{ts}-{seq}",
        "sequenceNumber": seq,
        "commitTimestamp": ts,
        "commitNumber": 1000 + seq,
        "commitUser": "005000000000001AAA",
    }
    return {"payload": {"ChangeEventHeader": header, **fields}}


class Flowlet:
    """Router -> split_gaps -> resync -> merge shards, as the flow wires them."""

    def __init__(self, resyncer: Resyncer) -> None:
        self.r = resyncer
        self.merge: dict[str, Merger] = {}
        self.offset = 0
        self.exceptions: dict[str, bool] = {}
        self.rows: dict[tuple, tuple] = {}
        self.stats = [0] * 6

    def send(self, *events: dict) -> None:
        msgs = []
        for e in events:
            msgs.append(RawMessage(TOPIC, 0, self.offset, b"k", orjson.dumps(e), -1))
            self.offset += 1
        items = [out for item in ROUTER(msgs) for out in split_gaps(item)]
        rest = [i for i in items if i[0] != RESYNC_KEY]
        gaps, stamps = [], []
        for _, (g, s) in [i for i in items if i[0] == RESYNC_KEY]:
            gaps.extend(g)
            stamps.extend(s)
        if gaps:
            rest.extend(self.r.on_gaps(gaps, stamps))
        self.deliver(rest)

    def deliver(self, items: list) -> None:
        per: dict[str, list] = {}
        for dest, payload in items:
            if dest[0] == MERGE:
                per.setdefault(dest, []).append(payload)
        for dest, payloads in per.items():
            m = self.merge.setdefault(dest, Merger(MergeState(3_600_000), 30_000))
            for out_dest, payload in m.process(payloads):
                if out_dest == GLOBAL and payload[0] == GLOBAL_IN:
                    gi = payload[1]
                    for exc in gi.exceptions:
                        self.exceptions[exc.key] = exc.open
                    self.rows.update(gi.rows.get("records", {}))
                    for topic_stats in gi.stats.values():
                        for i, v in enumerate(topic_stats):
                            self.stats[i] += v

    def open(self) -> set[str]:
        return {k for k, v in self.exceptions.items() if v}


def _order(org, rid: str, ts: int, **fields) -> None:
    base = {"AccountId": "001000000000001AAA", "OrderNumber": rid[-6:], "Status": "Draft"}
    base.update({"TotalAmount": 10.0, "EffectiveDate": "2026-11-18"}, **fields)
    org.put("Order", rid, base, ts)


def _resyncer(srv, **kw) -> Resyncer:
    return Resyncer(SalesforceApi(api_cfg(srv, **kw)), backoff=Backoff(0.0, 0.0))


def test_a_successful_reread_never_opens_the_exception(fake_sf):
    org = fake_sf.org
    a, b, c = "801000000000001AAA", "801000000000002AAA", "801000000000003AAA"
    _order(org, a, T0 + 500, Status="Activated", TotalAmount=99.5)
    _order(org, b, T0 - 1000)
    org.delete("Order", b, T0 + 700)  # in the recycle bin: queryAll sees IsDeleted
    f = Flowlet(_resyncer(fake_sf))
    f.send(_event("CREATE", [a], T0, Status="Draft", TotalAmount=10.0))
    f.send(_event("GAP_UPDATE", [a, b, c], T0 + 1000, seq=2))
    assert f.open() == set() and f.exceptions == {}  # never opened, not even briefly
    row_a = f.rows[("salesforce", "Order", a)]
    assert orjson.loads(row_a[4])["Status"] == "Activated"
    assert orjson.loads(row_a[4])["TotalAmount"] == 99.5
    assert row_a[5] == f"{T0 + 1000}:1002:2:1"  # right after the gap
    assert row_a[3] is False
    assert f.rows[("salesforce", "Order", b)][3] is True  # deleted, fields kept
    assert orjson.loads(f.rows[("salesforce", "Order", b)][4])["OrderNumber"] == "002AAA"
    row_c = f.rows[("salesforce", "Order", c)]  # purged: not found at all
    assert row_c[3] is True and orjson.loads(row_c[4]) == {}
    # Two messages consumed and applied; the images ride on the gap message.
    assert f.stats[CONSUMED] == 2 and f.stats[APPLIED] == 2
    assert len([x for x in org.api_calls() if "/queryAll" in x.path]) == 1


def test_a_failed_reread_opens_and_a_later_read_closes(fake_sf):
    org = fake_sf.org
    a = "801000000000001AAA"
    _order(org, a, T0 + 1500, Status="Cancelled")
    f = Flowlet(_resyncer(fake_sf, breaker_failures=100))
    org.inject(Fault(lambda m, p: "/queryAll" in p, "http", times=1, status=500))
    f.send(_event("GAP_UPDATE", [a], T0 + 1000))
    assert f.open() == {a}
    assert ("salesforce", "Order", a) not in f.rows
    assert f.r.next_due() is not None
    f.deliver(f.r.retry_due())
    assert f.open() == set() and f.exceptions == {a: False}
    assert orjson.loads(f.rows[("salesforce", "Order", a)][4])["Status"] == "Cancelled"
    assert f.r.pending == {} and f.r.next_due() is None


def test_without_a_connection_the_exception_stays_open():
    f = Flowlet(Resyncer(None))
    f.send(_event("GAP_CREATE", ["801000000000001AAA"], T0))
    assert f.open() == {"801000000000001AAA"}
    assert f.r.retry_due() == [] and f.r.next_due() is None


def test_reread_images_sort_against_cdc_events(fake_sf):
    """A CDC update after the gap still wins for its fields; one before it does not."""
    org = fake_sf.org
    a = "801000000000001AAA"
    _order(org, a, T0 + 2500, Status="Activated", TotalAmount=50.0)
    f = Flowlet(_resyncer(fake_sf))
    f.send(_event("GAP_UPDATE", [a], T0 + 1000))
    f.send(_event("UPDATE", [a], T0 + 3000, seq=3, Status="Cancelled"))  # newer: wins
    f.send(_event("UPDATE", [a], T0 + 500, seq=4, TotalAmount=1.0))  # older: loses
    fields = orjson.loads(f.rows[("salesforce", "Order", a)][4])
    assert fields["Status"] == "Cancelled" and fields["TotalAmount"] == 50.0


def test_many_records_are_read_200_per_call(fake_sf):
    org = fake_sf.org
    ids = [f"8010000000{i:05d}AAA" for i in range(450)]
    for i, rid in enumerate(ids):
        _order(org, rid, T0 + i)
    f = Flowlet(_resyncer(fake_sf))
    f.send(*[_event("GAP_UPDATE", [rid], T0 + 1000, seq=i) for i, rid in enumerate(ids)])
    assert f.open() == set()
    assert len([x for x in org.api_calls() if "/queryAll" in x.path]) == 3
    assert len(f.rows) == 450


def test_overflow_rereads_the_entity_window(fake_sf):
    org = fake_sf.org
    _order(org, "801000000000001AAA", T0 - 10_000)  # within the hour before the gap
    _order(org, "801000000000002AAA", T0 - 7_200_000)  # older: not re-read
    f = Flowlet(_resyncer(fake_sf))
    f.send(_event("GAP_OVERFLOW", [], T0))
    assert set(k[2] for k in f.rows) == {"801000000000001AAA"}
    assert f.open() == set()  # the whole window was read: `Order:*` never opens


def test_overflow_stays_open_until_a_reread_succeeds(fake_sf):
    org = fake_sf.org
    _order(org, "801000000000001AAA", T0 - 10_000)
    f = Flowlet(_resyncer(fake_sf, breaker_failures=100))
    org.inject(Fault(lambda m, p: "/queryAll" in p, "http", times=1, status=500))
    f.send(_event("GAP_OVERFLOW", [], T0))
    assert f.open() == {"Order:*"} and f.rows == {}
    f.deliver(f.r.retry_due(force=True))
    assert f.open() == set() and f.exceptions == {"Order:*": False}
    assert set(k[2] for k in f.rows) == {"801000000000001AAA"}
    f.send(_event("GAP_OVERFLOW", [], T0 + 60_000, seq=2))  # a newer overflow, read at once
    assert f.open() == set()
