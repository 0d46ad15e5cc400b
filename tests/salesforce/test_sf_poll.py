"""The polling source against a local HTTPS Salesforce: delta cycles, paging, look-back, resume,
Bulk API 2.0 backfill, deletions and faults."""

from __future__ import annotations

import time

import pytest
from sf_fake import Fault, api_cfg
from sferp.connectors.salesforce import SalesforcePollSource, SalesforceSourceError
from sferp.operators.sf_images import POLL_TOPIC

from sferp.events import DELETE, IMAGE
from sferp.sfid import to18

T0 = 1_795_000_000_000  # 2026-11-18
ACC15 = "001000000000001"


def _seed(org, n: int = 5, deleted: int = 2) -> list[str]:
    ids = []
    for i in range(n):
        rid = f"801000000000{i:03d}AAA"
        org.put(
            "Order",
            rid,
            {
                "AccountId": ACC15,
                "OrderNumber": f"{i:08d}",
                "Status": "Draft",
                "TotalAmount": 10.5 + i,
                "EffectiveDate": "2026-11-18",
            },
            T0 + i * 1000,
        )
        ids.append(rid)
    for rid in ids[:deleted]:
        org.delete("Order", rid, T0 + 60_000 + ids.index(rid))
    return ids


def _drain(part, limit_s: float = 10.0) -> list:
    """Run a bounded partition to its end; return every change it emitted."""
    out = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            for batch in part.next_batch():
                out.extend(batch)
        except StopIteration:
            return out
        wait = part.due - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.05))
    raise AssertionError("the partition did not finish")


def _source(srv, **kw):
    args = {"bounded": True, "bulk_threshold": 1000, "lookback_s": 300, "retry_base_s": 0.01}
    args.update(kw)
    return SalesforcePollSource(api_cfg(srv), ["Order"], **args)


def test_delta_cycle_reads_everything_as_images_and_deletes(fake_sf):
    org = fake_sf.org
    org.page_size = 2
    ids = _seed(org)
    part = _source(fake_sf).build_part("sf_poll", "Order", None)
    changes = _drain(part)
    # Ordered by SystemModstamp then Id: the three live ones, then the two deletions.
    assert [c.key for c in changes] == ids[2:] + ids[:2]
    assert [c.op for c in changes] == [IMAGE] * 3 + [DELETE] * 2
    first = changes[0]
    assert first.order == (T0 + 2000, 0, 0) and first.event_time == T0 + 2000
    assert first.identity == f"sfapi|Order|{ids[2]}|{T0 + 2000}"
    assert (first.topic, first.partition, first.primary) == (POLL_TOPIC, 2, True)
    assert first.fields == {
        "AccountId": to18(ACC15),  # 15 -> 18 like the CDC decoder
        "OrderNumber": "00000002",
        "Status": "Draft",
        "TotalAmount": 12.5,
        "EffectiveDate": "2026-11-18",
    }
    assert changes[-1].fields["OrderNumber"] == "00000001"  # a deleted record keeps its fields
    assert part.snapshot() == {"cursor": T0 + 60_001, "backfilled": True, "bulk": None}
    queries = [c for c in org.api_calls() if "/query" in c.path]
    assert len(queries) == 4  # COUNT(), then 2 + 2 + 1 records through nextRecordsUrl
    assert "queryAll" in queries[1].path


def test_resume_rereads_the_lookback_window_and_sees_late_commits(fake_sf):
    org = fake_sf.org
    ids = _seed(org, n=3, deleted=0)
    src = _source(fake_sf, lookback_s=60)
    part = src.build_part("sf_poll", "Order", None)
    assert len(_drain(part)) == 3
    state = part.snapshot()
    assert state["cursor"] == T0 + 2000
    # After the poll: one record changes; one transaction that stamped its row
    # before the cursor commits only now; one stamped long before is missed.
    org.put("Order", ids[0], {"Status": "Activated"}, T0 + 30_000)
    org.put("Order", "801000000000900AAA", {"Status": "Draft"}, T0 - 50_000)
    org.put("Order", "801000000000901AAA", {"Status": "Draft"}, T0 - 70_000)
    again = _drain(src.build_part("sf_poll", "Order", state))
    got = {(c.key, c.event_time) for c in again}
    assert (ids[0], T0 + 30_000) in got
    assert ("801000000000900AAA", T0 - 50_000) in got  # within cursor - 60 s
    assert all(k != "801000000000901AAA" for k, _ in got)  # older than the look-back
    # Records unchanged since the first poll come again with the same identity:
    # duplicates the flow's de-duplication drops.
    assert (ids[1], T0 + 1000) in got and (ids[2], T0 + 2000) in got
    assert again[-1].fields["Status"] == "Activated"


def test_bulk_backfill_matches_the_rest_path_and_survives_expired_sessions(fake_sf):
    org = fake_sf.org
    _seed(org)
    org.put("Order", "801000000000777AAA", {"Status": None, "TotalAmount": None}, T0 + 5)
    rest = _drain(_source(fake_sf).build_part("sf_poll", "Order", None))
    org.bulk_polls = 2
    org.expire_sessions()
    src = _source(fake_sf, bulk_threshold=2, bulk_poll_s=0.01, bulk_page=2)
    part = src.build_part("sf_poll", "Order", None)
    bulk = []
    expired = False
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline
        try:
            for batch in part.next_batch():
                bulk.extend(batch)
        except StopIteration:
            break
        if bulk and not expired:  # mid-download: the next results page needs a new login
            org.expire_sessions()
            expired = True
        time.sleep(0.01)
    # CSV typed like REST JSON: the same changes, whichever way the records came.
    key = lambda c: (c.key, c.order)  # noqa: E731
    assert sorted(bulk, key=key) == sorted(rest, key=key)
    assert len(bulk) == 6
    results = [c for c in org.api_calls() if c.path.endswith("/results")]
    assert len(results) == 4 and sum(1 for c in results if c.status == 401) == 1  # 3 pages
    assert part.snapshot() == {"cursor": T0 + 60_001, "backfilled": True, "bulk": None}


def test_a_restart_during_a_bulk_backfill_continues_the_job(fake_sf):
    org = fake_sf.org
    _seed(org, deleted=0)
    src = _source(fake_sf, bulk_threshold=2, bulk_poll_s=0.01, bulk_page=2)
    part = src.build_part("sf_poll", "Order", None)
    got = []
    while not got:
        for batch in part.next_batch():
            got.extend(batch)
        time.sleep(0.01)
    state = part.snapshot()
    assert state["bulk"]["locator"] == "2" and not state["backfilled"]
    rest = _drain(src.build_part("sf_poll", "Order", state))
    assert sorted(c.key for c in got + rest) == sorted(org.records["Order"])
    assert sum(1 for c in org.api_calls() if c.path.endswith("/jobs/query")) == 1


def test_transient_failures_back_off_and_lose_nothing(fake_sf):
    org = fake_sf.org
    org.page_size = 2
    ids = _seed(org, deleted=0)
    org.inject(Fault(lambda m, p: "/query/" in p, "http", times=2, status=500))
    org.inject(Fault(lambda m, p: "/queryAll" in p, "http", times=1, status=503))
    changes = _drain(_source(fake_sf).build_part("sf_poll", "Order", None))
    assert [c.key for c in changes] == ids  # each record exactly once, in order
    assert sum(1 for c in org.api_calls() if c.status >= 500) == 3


def test_an_error_retrying_cannot_fix_stops_the_source(fake_sf):
    org = fake_sf.org
    _seed(org, n=1, deleted=0)
    org.inject(Fault(lambda m, p: "/queryAll" in p, "http", status=400, code="INVALID_FIELD"))
    part = _source(fake_sf).build_part("sf_poll", "Order", None)
    with pytest.raises(SalesforceSourceError, match="polling Order failed: INVALID_FIELD"):
        _drain(part)


def test_unknown_objects_are_refused(fake_sf):
    with pytest.raises(ValueError, match="cannot poll"):
        SalesforcePollSource(api_cfg(fake_sf), ["Opportunity"])
