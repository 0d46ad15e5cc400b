"""Salesforce API metrics: real calls to a local HTTPS Salesforce, scraped from a real Monitor."""

from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sf_fake import Fault, api_cfg
from sferp.connectors import sf_client, sf_stats
from sferp.connectors.sf_client import CallError, SalesforceApi
from sferp.connectors.sf_writeback import Writeback, WritebackFields, WritebackInput

from sferp.config import load_settings
from sferp.metrics import Monitor

SOQL = "SELECT Id, SystemModstamp, IsDeleted, Status FROM Order ORDER BY SystemModstamp, Id"


@pytest.fixture
def isolated(monkeypatch):
    """No org client of an earlier test in the metrics (they are per process)."""
    monkeypatch.setattr(sf_stats, "_REGISTRY", [])
    monkeypatch.setattr(sf_stats, "_WRITEBACKS", [])
    monkeypatch.setattr(sf_client, "_GATES", {})


def scrape() -> dict[tuple[str, tuple], float]:
    monitor = Monitor(load_settings(overrides={}), views_path="unused", writer=False)
    samples = {}
    for fam in text_string_to_metric_families(generate_latest(monitor.registry).decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def named(samples: dict, prefix: str) -> dict[tuple[str, tuple], float]:
    return {k: v for k, v in samples.items() if k[0].startswith(prefix)}


def test_nothing_is_exported_without_a_salesforce_client(isolated):
    assert named(scrape(), "sferp_salesforce") == {}


def test_calls_errors_and_durations_are_counted_per_operation(fake_sf, isolated):
    org = fake_sf.org
    org.api_total, org.api_used = 1000, 250
    api = SalesforceApi(api_cfg(fake_sf, timeout_s=1.0, breaker_failures=100))
    for _ in range(3):
        api.query(SOQL)
    org.inject(Fault(lambda m, p: "/query" in p, "http", status=503, code="SERVER_UNAVAILABLE"))
    with pytest.raises(CallError):
        api.query(SOQL)
    org.inject(Fault(lambda m, p: "/query" in p, "slow", seconds=3.0))
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert e.value.code == "TIMEOUT"
    api.update_collection([])
    s = scrape()
    q = (("op", "query"),)
    assert s[("sferp_salesforce_requests_total", q)] == 5
    assert s[("sferp_salesforce_requests_total", (("op", "update_collection"),))] == 1
    errors = named(s, "sferp_salesforce_request_errors_total")
    assert errors == {
        ("sferp_salesforce_request_errors_total", (("code", "SERVER_UNAVAILABLE"), *q)): 1,
        ("sferp_salesforce_request_errors_total", (("code", "TIMEOUT"), *q)): 1,
    }
    assert s[("sferp_salesforce_request_seconds_count", q)] == 5
    # The timed-out call waited for the 1 s timeout; the others were quick.
    assert s[("sferp_salesforce_request_seconds_bucket", (("le", "1.0"), *q))] <= 4
    assert s[("sferp_salesforce_request_seconds_bucket", (("le", "5.0"), *q))] == 5
    assert 1.0 <= s[("sferp_salesforce_request_seconds_sum", q)] < 5.0
    assert s[("sferp_salesforce_api_usage_ratio", ())] == pytest.approx(org.api_used / 1000)
    assert s[("sferp_salesforce_breaker_open", ())] == 0
    assert s[("sferp_salesforce_api_reserve_reached", ())] == 0


def test_breaker_and_reserve_gauges_follow_the_client(fake_sf, isolated):
    org = fake_sf.org
    api = SalesforceApi(api_cfg(fake_sf, breaker_failures=2, breaker_open_s=0.3))
    failing = Fault(lambda m, p: "/query" in p, "http", times=1000, status=500)
    org.inject(failing)
    for _ in range(2):
        with pytest.raises(CallError):
            api.query(SOQL)
    assert scrape()[("sferp_salesforce_breaker_open", ())] == 1
    failing.times = 0
    time.sleep(0.32)
    api.query(SOQL)  # the half-open probe succeeds: closed
    s = scrape()
    assert s[("sferp_salesforce_breaker_open", ())] == 0
    code = (("code", "UNKNOWN_EXCEPTION"), ("op", "query"))
    assert s[("sferp_salesforce_request_errors_total", code)] == 2
    assert s[("sferp_salesforce_requests_total", (("op", "query"),))] == 3
    org.api_total, org.api_used = 100, 85  # beyond the 20 % reserve
    api.query(SOQL)
    s = scrape()
    assert s[("sferp_salesforce_api_reserve_reached", ())] == 1
    assert s[("sferp_salesforce_api_usage_ratio", ())] == pytest.approx(0.86)


def test_writeback_outcomes_and_queue(fake_sf, isolated):
    """Written and given-up records (by code) and the queue, as the sender counts them."""
    org = fake_sf.org
    ids = [f"8010000000{i:05d}AAA" for i in range(3)]
    for rid in ids:
        org.put("Order", rid, {"Status": "Activated"}, 1_795_000_000_000)
    org.rejects[ids[2]] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    dead: list = []
    wb = Writeback(SalesforceApi(api_cfg(fake_sf)), WritebackFields(), lambda k, v: dead.append(k))
    rows = [(rid, (f"SO-{i}", "OPEN", None)) for i, rid in enumerate(ids)]
    wb.add(WritebackInput(rows, [], []))
    assert scrape()[("sferp_salesforce_writeback_pending", ())] == 3
    while wb.work_left():
        wb.step(wait_s=0.01)
    s = scrape()
    assert s[("sferp_salesforce_writeback_written_total", ())] == 2
    code = (("code", "FIELD_CUSTOM_VALIDATION_EXCEPTION"),)
    assert s[("sferp_salesforce_writeback_failed_total", code)] == 1 == len(dead)
    assert s[("sferp_salesforce_writeback_pending", ())] == 0
    assert s[("sferp_salesforce_requests_total", (("op", "update_collection"),))] >= 1


def test_a_completed_poll_cycle_is_timestamped_per_object(fake_sf, isolated, monkeypatch):
    from sferp.connectors.salesforce import SalesforcePollSource

    monkeypatch.setattr(sf_stats, "_LAST_POLL", {})
    fake_sf.org.put("Order", "801000000000001AAA", {"Status": "Draft"}, 1_795_000_000_000)
    src = SalesforcePollSource(api_cfg(fake_sf), ["Order"], bounded=True, retry_base_s=0.01)
    part = src.build_part("sf_poll", "Order", None)
    before = time.time()
    deadline = time.monotonic() + 30
    with pytest.raises(StopIteration):  # a bounded partition ends after its first cycle
        while time.monotonic() < deadline:
            part.next_batch()
            time.sleep(min(0.05, max(0.0, part.due - time.monotonic())))
    key = ("sferp_salesforce_last_poll_timestamp_seconds", (("object", "Order"),))
    assert before <= scrape()[key] <= time.time()
