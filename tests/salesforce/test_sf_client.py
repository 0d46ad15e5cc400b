"""The Salesforce client against a local HTTPS Salesforce: logins, faults, limits, breaker."""

from __future__ import annotations

import logging
import time

import pytest
from sf_fake import Fault, api_cfg
from sferp.connectors.sf_client import (
    CallError,
    NotReady,
    Pacer,
    SalesforceApi,
    api_config,
    preflight,
)

from sferp.config import ConfigError, load_settings

SOQL = "SELECT Id, SystemModstamp, IsDeleted, Status FROM Order ORDER BY SystemModstamp, Id"
T0 = 1_795_000_000_000


def _orders(org, n: int) -> None:
    for i in range(n):
        org.put("Order", f"801000000000{i:03d}AAA", {"Status": "Draft"}, T0 + i * 1000)


def _data_calls(org, path_part: str = "") -> int:
    return sum(1 for c in org.api_calls() if path_part in c.path)


AUTH = {
    "jwt": {},
    "client_credentials": {"secrets": {"consumer_secret": "cs-1"}},
    "password_soap": {
        "auth": "password",
        "consumer_key": "",
        "secrets": {"password": "pw-1", "security_token": "tok-1"},
    },
    "password_oauth": {
        "auth": "password",
        "secrets": {"password": "pw-1", "security_token": "tok-1", "consumer_secret": "cs-1"},
    },
}


@pytest.mark.parametrize("flow", sorted(AUTH))
def test_every_login_flow_reads_with_paging(fake_sf, flow):
    org = fake_sf.org
    org.page_size = 2
    _orders(org, 5)
    api = SalesforceApi(api_cfg(fake_sf, **AUTH[flow]))
    records = api.query_all(SOQL, include_deleted=True)
    assert [r["Id"] for r in records] == [f"801000000000{i:03d}AAA" for i in range(5)]
    assert org.logins == 1
    assert _data_calls(org, "/query") == 3  # 2 + 2 + 1 records: two nextRecordsUrl pages
    # Every call names sferp as the client, so CDC shows it in changeOrigin.
    assert api.logins == 1


def test_session_id_auth_and_its_expiry(fake_sf):
    org = fake_sf.org
    _orders(org, 1)
    token = SalesforceApi(api_cfg(fake_sf))
    token.login()
    session = token._sf.session_id
    api = SalesforceApi(api_cfg(fake_sf, auth="session", secrets={"session_id": session}))
    assert api.query(SOQL)["totalSize"] == 1
    org.expire_sessions()
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert e.value.code == "INVALID_SESSION_ID" and not e.value.retryable


def test_wrong_credentials_are_a_login_failure(fake_sf):
    api = SalesforceApi(
        api_cfg(fake_sf, auth="password", consumer_key="", secrets={"password": "x"})
    )
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert e.value.code.startswith("LOGIN_FAILED") and "INVALID_LOGIN" in e.value.code
    api = SalesforceApi(api_cfg(fake_sf, consumer_key="someone-else"))
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert e.value.code == "LOGIN_FAILED:invalid_grant"
    assert fake_sf.org.api_calls() == []


def test_invalid_session_relogs_in_for_rest_and_bulk_calls(fake_sf):
    org = fake_sf.org
    _orders(org, 3)
    api = SalesforceApi(api_cfg(fake_sf))
    assert api.query(SOQL)["totalSize"] == 3
    org.expire_sessions()
    assert api.query(SOQL)["totalSize"] == 3
    assert api.logins == 2
    job = api.bulk_query_start("SELECT Id, SystemModstamp, IsDeleted, Status FROM Order")
    org.expire_sessions()
    while api.bulk_query_state(job)["state"] != "JobComplete":
        pass
    assert api.logins == 3
    org.expire_sessions()
    text, locator = api.bulk_query_results(job, None, 2)
    assert api.logins == 4
    assert text.splitlines()[0] == '"Id","SystemModstamp","IsDeleted","Status"'
    with pytest.raises(CallError) as e:  # Bulk API 2.0 takes no ORDER BY
        api.bulk_query_start(SOQL)
    assert e.value.code == "API_ERROR" and not e.value.retryable
    assert len(text.splitlines()) == 3 and locator == "2"
    text, locator = api.bulk_query_results(job, locator, 2)
    assert len(text.splitlines()) == 2 and locator is None
    # Each 401 was answered once, then the same call succeeded after the new login.
    assert sum(1 for c in org.api_calls() if c.status == 401) == 3


def test_errors_are_classified(fake_sf):
    org = fake_sf.org
    api = SalesforceApi(api_cfg(fake_sf, timeout_s=0.3, breaker_failures=100))
    api.query(SOQL)
    org.inject(Fault(lambda m, p: "/query" in p, "slow", seconds=2.0))
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert (e.value.code, e.value.retryable, e.value.ambiguous) == ("TIMEOUT", True, True)
    org.inject(Fault(lambda m, p: "/query" in p, "http", status=503, code="SERVER_UNAVAILABLE"))
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert (e.value.code, e.value.retryable, e.value.ambiguous) == (
        "SERVER_UNAVAILABLE",
        True,
        False,
    )
    org.inject(Fault(lambda m, p: "/query" in p, "http", status=504, code="GATEWAY_TIMEOUT"))
    with pytest.raises(CallError) as e:  # a gateway may have passed the request on
        api.query(SOQL)
    assert (e.value.retryable, e.value.ambiguous) == (True, True)
    org.inject(Fault(lambda m, p: "/query" in p, "http", status=400, code="UNABLE_TO_LOCK_ROW"))
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert (e.value.code, e.value.retryable, e.value.ambiguous) == (
        "UNABLE_TO_LOCK_ROW",
        True,
        False,
    )
    with pytest.raises(CallError) as e:
        api.query("SELEKT Id FROM Order")
    assert (e.value.code, e.value.retryable) == ("MALFORMED_QUERY", False)
    assert api.gate.breaker.state == "closed"


def test_calls_are_spaced_to_the_budget(fake_sf):
    org = fake_sf.org
    api = SalesforceApi(api_cfg(fake_sf, calls_per_minute=300))  # one per 0.2 s
    for _ in range(5):
        api.query(SOQL)
    at = [c.at for c in org.api_calls()]
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    # Sent 0.2 s apart (unpaced: a few ms); arrival at the server jitters on a busy machine.
    assert len(at) == 5 and min(gaps) >= 0.1 and at[-1] - at[0] >= 0.7, gaps
    with pytest.raises(NotReady) as e:  # a non-blocking caller is told how long to wait
        api.query(SOQL, block=False)
    assert e.value.why == "pacing" and 0 < e.value.delay <= 0.2


def test_pacer_stretches_the_spacing_near_the_reserve():
    p = Pacer(calls_per_minute=600, reserve_fraction=0.2, probe_s=300)  # 0.1 s apart
    p.usage(60, 100)  # 20 calls left before the reserve (80): normal speed
    p.spend(0.0)
    assert p.next_at == pytest.approx(0.1)
    spacing = {}
    for used in (75, 76, 77, 78, 79):  # within the last 5 % of the total: 5 / remaining
        p.usage(used, 100)
        before = p.next_at
        p.spend(before)
        spacing[80 - used] = round(p.next_at - before, 6)
    assert spacing == {5: 0.1, 4: 0.125, 3: 0.166667, 2: 0.25, 1: 0.5}
    p.usage(80, 100)
    assert p.blocked() and p.remaining() == 0


def test_reserve_stops_calls_and_probes_limits(fake_sf):
    org = fake_sf.org
    org.api_total, org.api_used = 100, 60  # usable up to 80 with a 20 % reserve
    api = SalesforceApi(api_cfg(fake_sf, calls_per_minute=6000, limit_probe_s=0.3))
    done = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            api.query(SOQL, block=False)
            done += 1
        except NotReady as e:
            if e.why == "API reserve reached":
                break
            time.sleep(e.delay)
    assert org.api_used == 80 and done == 20  # stopped exactly at the reserve
    # Blocked: nothing is sent until a /limits probe says usage has dropped.
    with pytest.raises(NotReady):
        api.query(SOQL, block=False)
    assert _data_calls(org, "/query") == 20
    time.sleep(0.35)
    with pytest.raises(NotReady):  # probe: still at the reserve
        api.query(SOQL, block=False)
    assert _data_calls(org, "/limits") == 1 and _data_calls(org, "/query") == 20
    org.api_used = 40  # the rolling 24-hour window moved on
    time.sleep(0.35)
    api.query(SOQL)
    assert _data_calls(org, "/limits") == 2 and _data_calls(org, "/query") == 21


def test_request_limit_exceeded_pauses_calls(fake_sf):
    org = fake_sf.org
    api = SalesforceApi(api_cfg(fake_sf, limit_probe_s=0.3))
    org.inject(Fault(lambda m, p: "/query" in p, "http", status=403, code="REQUEST_LIMIT_EXCEEDED"))
    with pytest.raises(CallError) as e:
        api.query(SOQL)
    assert e.value.code == "REQUEST_LIMIT_EXCEEDED" and e.value.retryable
    with pytest.raises(NotReady) as n:
        api.query(SOQL, block=False)
    assert n.value.why == "API reserve reached"
    time.sleep(0.35)
    assert api.query(SOQL, block=False)["totalSize"] == 0  # probe found calls left
    assert _data_calls(org, "/limits") == 1


def test_breaker_opens_after_repeated_failures_and_recovers_through_a_probe(fake_sf):
    org = fake_sf.org
    api = SalesforceApi(api_cfg(fake_sf, breaker_failures=3, breaker_open_s=0.3))
    failing = Fault(lambda m, p: "/query" in p, "http", times=1000, status=500)
    org.inject(failing)
    for _ in range(3):
        with pytest.raises(CallError):
            api.query(SOQL)
    assert api.gate.breaker.state == "open"
    with pytest.raises(NotReady) as e:
        api.query(SOQL, block=False)
    assert e.value.why == "circuit breaker open"
    assert _data_calls(org) == 3  # the open breaker sent nothing
    time.sleep(0.32)
    with pytest.raises(CallError):  # the half-open probe fails: open again
        api.query(SOQL, block=False)
    assert _data_calls(org) == 4 and api.gate.breaker.state == "open"
    failing.times = 0
    time.sleep(0.32)
    assert api.query(SOQL, block=False)["totalSize"] == 0
    assert api.gate.breaker.transitions == ["open", "half_open", "open", "half_open", "closed"]
    api.query(SOQL, block=False)  # closed: calls flow again
    assert _data_calls(org) == 6


def test_settings_are_validated_with_the_setting_named(tmp_path):
    def cfg(**env):
        environ = {f"SFERP_SALESFORCE__{k.upper()}": v for k, v in env.items()}
        return api_config(load_settings(environ=environ))

    with pytest.raises(ConfigError, match=r"salesforce\.instance_url"):
        cfg(instance_url="http://example.my.salesforce.com")
    base = {"instance_url": "https://example.my.salesforce.com"}
    with pytest.raises(ConfigError, match=r"salesforce\.username"):
        cfg(**base)
    key = tmp_path / "k.pem"
    with pytest.raises(ConfigError, match=r"salesforce\.private_key_file: cannot read"):
        cfg(**base, username="u", consumer_key="c", private_key_file=str(key))
    key.write_text("127.0.0.1 localhost\n")  # a file that is no key
    with pytest.raises(
        ConfigError, match=r"salesforce\.private_key_file: .* not an unencrypted PEM"
    ):
        cfg(**base, username="u", consumer_key="c", private_key_file=str(key))
    with pytest.raises(ConfigError, match=r"salesforce\.consumer_secret: required") as e:
        cfg(**base, auth="client_credentials", consumer_key="c")
    assert "SFERP_SALESFORCE__CONSUMER_SECRET" in str(e.value)
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value\n")
    c = cfg(
        **base,
        auth="client_credentials",
        consumer_key="c",
        consumer_secret_file=str(secret),
    )
    assert c.secrets == {"consumer_secret": "s3cret-value"}
    assert "s3cret" not in repr(c)
    with pytest.raises(ConfigError, match=r"salesforce\.session_id"):
        cfg(**base, auth="session")
    with pytest.raises(ConfigError, match=r"salesforce\.poll_objects: cannot poll Opportunity"):
        cfg(**base, auth="session", session_id="x", poll_objects="Order,Opportunity")


def test_password_login_is_warned_about_and_the_password_never_logged(fake_sf, caplog):
    org = fake_sf.org
    settings = load_settings(
        overrides={
            "salesforce": {
                "instance_url": fake_sf.url,
                "auth": "password",
                "username": org.username,
                "ca_bundle": str(fake_sf.ca),
            }
        },
        environ={"SFERP_SALESFORCE__PASSWORD": "pw-1", "SFERP_SALESFORCE__SECURITY_TOKEN": "tok-1"},
    )
    with caplog.at_level(logging.INFO, logger="sferp.salesforce"):
        preflight(settings)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("auth = password" in w and "SOAP" in w for w in warnings), warnings
    assert "pw-1" not in caplog.text and "tok-1" not in caplog.text
