"""Salesforce REST API access over simple-salesforce: login, API limits, errors, circuit breaker.

Every call sferp makes to Salesforce (polls, gap re-reads, Bulk API 2.0, the
write-back) goes through `SalesforceApi.call`, which

- logs in (JWT bearer, OAuth client credentials, username/password, or a given
  session id) and logs in again once when a call answers INVALID_SESSION_ID,
  for Bulk API calls too (simple-salesforce refreshes only its own REST calls,
  and only for the login flows it runs itself);
- paces calls to `calls_per_minute`, reads `Sforce-Limit-Info`, slows down as
  the org approaches its reserve (`api_reserve_fraction` of the daily
  allocation) and stops at it, probing `/limits` every few minutes until the
  rolling 24-hour usage has dropped;
- opens a circuit breaker after consecutive outage-like failures (5xx,
  timeouts, connection errors, failed logins), lets one half-open probe through
  after `breaker_open_s`, and closes again when it succeeds;
- sends `Sforce-Call-Options: client=<client_id>` so CDC events caused by sferp
  carry the client id in `changeOrigin`.

It makes exactly one attempt (plus one after a re-login) and raises
`CallError` saying whether a retry may help and whether the failed request may
nevertheless have taken effect (`ambiguous`); the callers own their retry
policy. Secrets are read from the settings' environment/file sources and never
logged; error messages carry Salesforce's error code and message only.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import jwt
import requests
from sferp.connectors import sf_stats
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceAuthenticationFailed,
    SalesforceError,
    SalesforceExpiredSession,
)
from simple_salesforce.login import SalesforceLogin, token_login
from simple_salesforce.util import exception_handler

from sferp.config import ConfigError, Settings

__all__ = [
    "ApiConfig",
    "Backoff",
    "CallError",
    "CircuitBreaker",
    "NotReady",
    "Pacer",
    "SalesforceApi",
    "api_config",
    "preflight",
]

log = logging.getLogger("sferp.salesforce")
T = TypeVar("T")

AUTH_MODES = ("jwt", "client_credentials", "password", "session")
REQUEST_LIMIT_EXCEEDED = "REQUEST_LIMIT_EXCEEDED"
UNABLE_TO_LOCK_ROW = "UNABLE_TO_LOCK_ROW"
_VERSION = re.compile(r"\d{2,3}\.\d\Z")


@dataclass(frozen=True)
class ApiConfig:
    """Everything a `SalesforceApi` needs; built from the settings by `api_config`."""

    instance_url: str
    api_version: str = "62.0"
    auth: str = "jwt"
    username: str = ""
    consumer_key: str = ""
    private_key_file: str = ""
    login_url: str = "https://login.salesforce.com"
    client_id: str = "sferp"
    ca_bundle: str = ""
    timeout_s: float = 30.0
    calls_per_minute: float = 60.0
    reserve_fraction: float = 0.2
    breaker_failures: int = 5
    breaker_open_s: float = 30.0
    limit_probe_s: float = 300.0
    secrets: dict[str, str] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def gate_key(self) -> tuple:
        """Clients with the same key share one pacer and breaker (per process)."""
        return (
            self.instance_url,
            self.auth,
            self.username,
            self.consumer_key,
            self.calls_per_minute,
            self.reserve_fraction,
            self.breaker_failures,
            self.breaker_open_s,
            self.limit_probe_s,
        )


def api_config(settings: Settings) -> ApiConfig:
    """Validate the [salesforce] settings and read the secrets; raise ConfigError naming one."""
    s = settings.salesforce
    url = urlparse(s.instance_url)
    if url.scheme != "https" or not url.hostname:
        raise ConfigError(
            "salesforce.instance_url: expected https://<your domain>.my.salesforce.com, "
            f"got {s.instance_url!r}"
        )
    if not _VERSION.match(s.api_version):
        raise ConfigError(f"salesforce.api_version: expected e.g. 62.0, got {s.api_version!r}")
    secrets: dict[str, str] = {}
    for name in ("consumer_secret", "password", "security_token", "session_id"):
        value = settings.secret("salesforce", name)
        if value:
            secrets[name] = value

    def need(*names: str) -> None:
        for name in names:
            if name in ("consumer_secret", "password", "session_id"):
                if name not in secrets:
                    raise ConfigError(
                        f"salesforce.{name}: required for auth = {s.auth!r} (from "
                        f"SFERP_SALESFORCE__{name.upper()} or salesforce.{name}_file)"
                    )
            elif not getattr(s, name):
                raise ConfigError(f"salesforce.{name}: required for auth = {s.auth!r}")

    if s.auth == "jwt":
        need("username", "consumer_key", "private_key_file")
        try:
            pem = Path(s.private_key_file).read_bytes()
        except OSError as e:
            raise ConfigError(
                f"salesforce.private_key_file: cannot read {s.private_key_file}: {e.strerror}"
            ) from e
        try:  # what the JWT bearer flow signs with (RS256): checked now, not at the login
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(
                f"salesforce.private_key_file: {s.private_key_file} is not an unencrypted "
                "PEM private key (the connected app's certificate key)"
            ) from None
        aud = urlparse(s.login_url)
        if aud.scheme != "https" or not aud.hostname:
            raise ConfigError(f"salesforce.login_url: expected an https URL, got {s.login_url!r}")
    elif s.auth == "client_credentials":
        need("consumer_key", "consumer_secret")
    elif s.auth == "password":
        need("username", "password")
    else:
        need("session_id")
    pollable = ("Product2", "Account", "Order", "OrderItem")
    unknown = [o for o in s.poll_objects if o not in pollable]
    if unknown:
        raise ConfigError(
            f"salesforce.poll_objects: cannot poll {', '.join(unknown)} "
            f"(expected some of {', '.join(pollable)})"
        )
    if s.ca_bundle and not Path(s.ca_bundle).is_file():
        raise ConfigError(f"salesforce.ca_bundle: no such file {s.ca_bundle}")
    return ApiConfig(
        instance_url=s.instance_url.rstrip("/"),
        api_version=s.api_version,
        auth=s.auth,
        username=s.username,
        consumer_key=s.consumer_key,
        private_key_file=s.private_key_file,
        login_url=s.login_url.rstrip("/"),
        client_id=s.client_id,
        ca_bundle=s.ca_bundle,
        timeout_s=s.timeout_s,
        calls_per_minute=s.calls_per_minute,
        reserve_fraction=s.api_reserve_fraction,
        secrets=secrets,
    )


def auth_failure_text(exc: SalesforceAuthenticationFailed) -> str:
    """Salesforce's own explanation of a failed login (its `error_description`).

    simple-salesforce 1.12.10 keeps it in `auth_message`, earlier releases in
    `message`, which later releases made the class's template ("... {content}").
    """
    text = getattr(exc, "auth_message", None)
    if not isinstance(text, str):
        text = str(getattr(exc, "message", "") or "")
        if "{content}" in text:
            content = getattr(exc, "content", b"")
            is_bytes = isinstance(content, bytes)
            text = content.decode("utf-8", "replace") if is_bytes else str(content)
    return " ".join(text.split())[:300]


class CallError(Exception):
    """A failed call: Salesforce's error code (or TIMEOUT, CONNECTION_ERROR, HTTP_<status>...).

    `retryable`: trying again later may succeed. `ambiguous`: the request may have
    taken effect although it failed (a timeout, a broken connection, a gateway's
    502 or 504).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool,
        ambiguous: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.ambiguous = ambiguous
        self.status = status


class NotReady(Exception):
    """The pacer, the API reserve or the open breaker forbid a call for `delay` seconds."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(f"{why}: next call in {delay:.1f} s")
        self.delay = delay
        self.why = why


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n))."""

    def __init__(self, base_s: float = 1.0, cap_s: float = 60.0, rng: random.Random | None = None):
        self.base_s = base_s
        self.cap_s = cap_s
        self.rng = rng or random.Random()

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        return self.rng.uniform(0, min(self.cap_s, self.base_s * (2 ** min(attempt, 30))))


class CircuitBreaker:
    """closed -> open after `failures` consecutive failures -> half-open after `open_s`:
    one probe call; its success closes the breaker, its failure opens it again."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failures: int = 5, open_s: float = 30.0) -> None:
        self.threshold = max(1, failures)
        self.open_s = open_s
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False
        self.transitions: list[str] = []  # for metrics and tests

    def wait_s(self, now: float) -> float:
        """0 when a call may go now (and, half-open, claim the probe), else seconds to wait."""
        if self.state == self.CLOSED:
            return 0.0
        if self.state == self.OPEN:
            remaining = self.opened_at + self.open_s - now
            if remaining > 0:
                return remaining
            self._set(self.HALF_OPEN)
        if self.probing:
            return min(1.0, self.open_s)
        self.probing = True
        return 0.0

    def success(self) -> None:
        """A call succeeded: close."""
        self.failures = 0
        self.probing = False
        if self.state != self.CLOSED:
            self._set(self.CLOSED)

    def failure(self, now: float) -> None:
        """An outage-like failure: count it; open at the threshold or after a failed probe."""
        self.failures += 1
        self.probing = False
        if self.state == self.HALF_OPEN or (
            self.state == self.CLOSED and self.failures >= self.threshold
        ):
            self.opened_at = now
            self._set(self.OPEN)

    def release(self) -> None:
        """A half-open probe ended without telling anything (e.g. a 4xx): allow another."""
        self.probing = False

    def _set(self, state: str) -> None:
        if state != self.state:
            log.warning("salesforce circuit breaker %s -> %s", self.state, state)
            self.state = state
            self.transitions.append(state)


class Pacer:
    """Spacing of calls (`calls_per_minute`) and the daily allocation's reserve.

    Calls are at least 60/calls_per_minute seconds apart, so no window of W
    seconds holds more than 1 + W * calls_per_minute / 60 of them. With `used` of
    `total` daily calls (from Sforce-Limit-Info), the usable allocation ends at
    total * (1 - reserve). Within the last 5 % of the total before that point the
    spacing stretches by band/remaining (half the band left: half the speed); at
    the point no call is made, except a `/limits` probe every `probe_s`.
    """

    def __init__(self, calls_per_minute: float, reserve_fraction: float, probe_s: float) -> None:
        self.interval = 60.0 / calls_per_minute
        self.reserve = reserve_fraction
        self.probe_s = probe_s
        self.next_at = 0.0
        self.used: int | None = None
        self.total: int | None = None
        self.blocked_until = 0.0  # reserve reached or REQUEST_LIMIT_EXCEEDED: probe after this

    def remaining(self) -> float | None:
        """Calls left before the reserve (None until a response told the usage)."""
        if self.used is None or self.total is None:
            return None
        return self.total * (1 - self.reserve) - self.used

    def blocked(self) -> bool:
        """At or beyond the reserve."""
        rem = self.remaining()
        return rem is not None and rem <= 0

    def wait_s(self, now: float) -> float:
        """Seconds until the next call may go (ignoring the reserve block)."""
        return max(0.0, self.next_at - now)

    def spend(self, now: float) -> None:
        """Account one call made now."""
        self.next_at = max(now, self.next_at) + self.interval * self._factor()

    def sent(self, now: float) -> None:
        """A request leaves now (after a login delayed it): the next waits a full interval."""
        self.next_at = max(self.next_at, now + self.interval * self._factor())

    def _factor(self) -> float:
        rem = self.remaining()
        if rem is not None and self.total:
            band = max(1.0, 0.05 * self.total)
            if 0 < rem < band:
                return band / rem
        return 1.0

    def usage(self, used: int, total: int) -> None:
        """Record the org's usage as a response reported it."""
        self.used, self.total = used, total


class _Gate:
    """A pacer and a breaker shared by all clients of one org in this process."""

    def __init__(self, cfg: ApiConfig) -> None:
        self.lock = threading.Lock()
        self.pacer = Pacer(cfg.calls_per_minute, cfg.reserve_fraction, cfg.limit_probe_s)
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_open_s)
        self.stats = sf_stats.register(self.reading)

    def reading(self) -> sf_stats.GateReading:
        """The breaker's and the allowance's state, for /metrics."""
        with self.lock:
            p = self.pacer
            ratio = p.used / p.total if p.used is not None and p.total else None
            return sf_stats.GateReading(
                self.breaker.state != self.breaker.CLOSED, ratio, p.blocked()
            )


_GATES: dict[tuple, _Gate] = {}
_GATES_LOCK = threading.Lock()


def _gate(cfg: ApiConfig) -> _Gate:
    with _GATES_LOCK:
        g = _GATES.get(cfg.gate_key())
        if g is None:
            g = _GATES[cfg.gate_key()] = _Gate(cfg)
        return g


def _error_body(content: Any) -> tuple[str | None, str]:
    """(errorCode, message) of a Salesforce error response body."""
    try:
        body = json.loads(content) if isinstance(content, bytes | str) else content
    except ValueError:
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        return None, text[:300]
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if isinstance(body, dict):
        code = body.get("errorCode") or body.get("error")
        msg = body.get("message") or body.get("error_description") or ""
        return (str(code) if code else None), str(msg)[:300]
    return None, str(body)[:300]


def classify(exc: BaseException) -> CallError:
    """Turn a requests / simple-salesforce exception into a CallError."""
    if isinstance(exc, CallError):
        return exc
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return CallError("TIMEOUT", "connect timeout", retryable=True)
    if isinstance(exc, requests.exceptions.Timeout):
        return CallError("TIMEOUT", "no answer within the timeout", retryable=True, ambiguous=True)
    if isinstance(exc, requests.exceptions.ConnectionError):
        return CallError("CONNECTION_ERROR", type(exc).__name__, retryable=True, ambiguous=True)
    if isinstance(exc, SalesforceAuthenticationFailed):
        return CallError(f"LOGIN_FAILED:{exc.code}", auth_failure_text(exc), retryable=True)
    if isinstance(exc, SalesforceError):
        code, msg = _error_body(exc.content)
        status = exc.status
        if code == UNABLE_TO_LOCK_ROW:
            return CallError(code, msg, retryable=True, status=status)
        if code == REQUEST_LIMIT_EXCEEDED or status == 429:
            return CallError(code or REQUEST_LIMIT_EXCEEDED, msg, retryable=True, status=status)
        if status >= 500:
            # 500/503: Salesforce rolled the request back or never ran it; a gateway's
            # 502/504 may have passed it on before giving up.
            ambiguous = status in (502, 504)
            return CallError(
                code or f"HTTP_{status}", msg, retryable=True, ambiguous=ambiguous, status=status
            )
        if status == 401:
            return CallError(code or "INVALID_SESSION_ID", msg, retryable=True, status=status)
        return CallError(code or f"HTTP_{status}", msg, retryable=False, status=status)
    raise exc


def _outage(err: CallError) -> bool:
    """Failures that count towards the circuit breaker."""
    return (
        err.code in ("TIMEOUT", "CONNECTION_ERROR", "INVALID_SESSION_ID")
        or err.code.startswith("LOGIN_FAILED")
        or (err.status is not None and err.status >= 500)
    )


class _CaBundleAdapter(requests.adapters.HTTPAdapter):
    """Verifies servers against one CA bundle, whatever the environment says."""

    def __init__(self, ca_bundle: str) -> None:
        super().__init__()
        self.ca_bundle = ca_bundle

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self.ca_bundle
        return super().send(request, **kwargs)


class SalesforceApi:
    """One logged-in client (not thread-safe: one per thread); pacing and breaker are shared."""

    def __init__(
        self,
        cfg: ApiConfig,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.clock = clock
        self.gate = _gate(cfg)
        self._sf: Salesforce | None = None
        self._session: requests.Session | None = None
        self.logins = 0
        self.calls = 0
        self._headers = {"Sforce-Call-Options": f"client={cfg.client_id}"}
        self._timeout = cfg.timeout_s

    # -- login -------------------------------------------------------------------

    def _http(self) -> requests.Session:
        if self._session is None:
            s = requests.Session()
            if self.cfg.ca_bundle:
                # Not `s.verify`: requests lets REQUESTS_CA_BUNDLE in the environment
                # override a session's verify setting; the adapter has the last word.
                adapter = _CaBundleAdapter(self.cfg.ca_bundle)
                s.mount("https://", adapter)
            self._session = s
        return self._session

    def login(self) -> None:
        """Log in (again) with the configured flow."""
        cfg = self.cfg
        http = self._http()
        token_url = f"{cfg.instance_url}/services/oauth2/token"
        host = urlparse(cfg.instance_url).netloc
        if cfg.auth == "session":
            if self._sf is not None:
                raise CallError(
                    "INVALID_SESSION_ID",
                    "the session given in salesforce.session_id has expired; give a new one",
                    retryable=False,
                )
            token, instance = cfg.secrets["session_id"], host
        elif cfg.auth == "jwt":
            claims = {
                "iss": cfg.consumer_key,
                "sub": cfg.username,
                "aud": cfg.login_url,
                "exp": int(time.time()) + 180,
            }
            key = Path(cfg.private_key_file).read_bytes()
            assertion = jwt.encode(claims, key, algorithm="RS256")
            data = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}
            data["assertion"] = assertion
            token, instance = token_login(token_url, data, host, cfg.consumer_key, None, None, http)
        elif cfg.auth == "client_credentials":
            pair = f"{cfg.consumer_key}:{cfg.secrets['consumer_secret']}".encode()
            headers = {"Authorization": "Basic " + base64.b64encode(pair).decode()}
            data = {"grant_type": "client_credentials"}
            token, instance = token_login(
                token_url, data, host, cfg.consumer_key, headers, None, http
            )
        elif cfg.consumer_key and "consumer_secret" in cfg.secrets:  # OAuth username-password
            data = {
                "grant_type": "password",
                "client_id": cfg.consumer_key,
                "client_secret": cfg.secrets["consumer_secret"],
                "username": cfg.username,
                "password": cfg.secrets["password"] + cfg.secrets.get("security_token", ""),
            }
            token, instance = token_login(token_url, data, host, cfg.consumer_key, None, None, http)
        else:  # SOAP login() with the security token
            token, instance = SalesforceLogin(
                username=cfg.username,
                password=cfg.secrets["password"],
                security_token=cfg.secrets.get("security_token"),
                sf_version=cfg.api_version,
                session=http,
                client_id=cfg.client_id,
                scratch_url=cfg.instance_url,
            )
        self._sf = Salesforce(
            session_id=token,
            instance_url=f"https://{instance}",
            version=cfg.api_version,
            session=http,
            object_pairs_hook=dict,
        )
        self.logins += 1
        log.info("salesforce: logged in (%s) to %s", cfg.auth, instance)

    # -- calls -------------------------------------------------------------------

    def ready_in(self) -> float:
        """Seconds until a call may be made (0: now), without claiming anything."""
        g = self.gate
        now = self.clock()
        with g.lock:
            b = g.breaker
            if b.state == b.OPEN:
                return max(0.0, b.opened_at + b.open_s - now)
            if g.pacer.blocked():
                return max(0.0, g.pacer.blocked_until - now)
            return g.pacer.wait_s(now)

    def _acquire(self, block: bool) -> None:
        """Wait for (or, not blocking, demand) permission; probe /limits at the reserve."""
        g = self.gate
        while True:
            now = self.clock()
            probe = False
            with g.lock:
                wait = g.breaker.wait_s(now)
                why = "circuit breaker open"
                if wait <= 0 and g.pacer.blocked():
                    if now < g.pacer.blocked_until:
                        wait, why = g.pacer.blocked_until - now, "API reserve reached"
                        g.breaker.release()
                    else:
                        probe = True
                        g.pacer.blocked_until = now + g.pacer.probe_s
                if wait <= 0 and not probe:
                    pw = g.pacer.wait_s(now)
                    if pw > 0:
                        wait, why = pw, "pacing"
                        g.breaker.release()
                    else:
                        g.pacer.spend(now)
                        return
            if probe:
                self._probe_limits()
                continue
            if not block:
                raise NotReady(wait, why)
            if self.stop.wait(min(wait, 0.5)):
                raise NotReady(wait, "stopping")

    def _probe_limits(self) -> None:
        """At the reserve: ask /limits how many calls are left (one call per probe interval)."""
        g = self.gate
        with g.lock:
            g.pacer.spend(self.clock())
        try:
            body = self._attempt(
                lambda sf: sf.limits(timeout=self._timeout, headers=self._headers), "limits"
            )
        except CallError as e:
            log.warning("salesforce: /limits probe failed: %s", e.code)
            return
        daily = (body or {}).get("DailyApiRequests") or {}
        mx, remaining = daily.get("Max"), daily.get("Remaining")
        if isinstance(mx, int) and isinstance(remaining, int):
            with g.lock:
                g.pacer.usage(mx - remaining, mx)
                if not g.pacer.blocked():
                    log.info("salesforce: API usage back under the reserve")

    def _attempt(self, fn: Callable[[Salesforce], T], op: str) -> T:
        """One call (plus one after a re-login on INVALID_SESSION_ID); errors classified.

        Its duration and outcome are recorded under `op` (connectors/sf_stats.py)."""
        g = self.gate
        started = time.perf_counter()
        try:
            if self._sf is None:
                self.login()
                self._sent()
            try:
                self.calls += 1
                result = fn(self._sf)  # type: ignore[arg-type]
            except SalesforceExpiredSession:
                log.info("salesforce: session expired; logging in again")
                self.login()
                self._sent()
                self.calls += 1
                result = fn(self._sf)  # type: ignore[arg-type]
        except Exception as exc:
            err = classify(exc)
            g.stats.record(op, time.perf_counter() - started, err.code)
            now = self.clock()
            with g.lock:
                if _outage(err):
                    g.breaker.failure(now)
                else:
                    g.breaker.release()
                if err.code == REQUEST_LIMIT_EXCEEDED:
                    # The org is out of calls (or of long-running slots): stop until a probe.
                    if g.pacer.total is not None:
                        g.pacer.usage(g.pacer.total, g.pacer.total)
                    else:
                        g.pacer.usage(1, 1)
                    g.pacer.blocked_until = now + g.pacer.probe_s
            log.warning("salesforce call failed: %s", err)
            raise err from None
        g.stats.record(op, time.perf_counter() - started)
        usage = getattr(self._sf, "api_usage", {}).get("api-usage")
        with g.lock:
            g.breaker.success()
            if usage is not None:
                g.pacer.usage(usage.used, usage.total)
                if g.pacer.blocked():
                    g.pacer.blocked_until = self.clock() + g.pacer.probe_s
                    log.warning(
                        "salesforce: API usage %d/%d reached the reserve (%.0f %%): pausing",
                        usage.used,
                        usage.total,
                        g.pacer.reserve * 100,
                    )
        return result

    def _sent(self) -> None:
        with self.gate.lock:
            self.gate.pacer.sent(self.clock())

    def call(self, fn: Callable[[Salesforce], T], *, op: str, block: bool = True) -> T:
        """Run `fn(sf)` as one paced, breaker-guarded call; raise CallError or NotReady.

        `op` names the operation in the call metrics (`sferp_salesforce_*{op}`)."""
        self._acquire(block)
        return self._attempt(fn, op)

    # -- the calls sferp makes ------------------------------------------------------

    def query(self, soql: str, *, include_deleted: bool = False, block: bool = True) -> dict:
        """First page of a SOQL query (queryAll with include_deleted)."""
        return self.call(
            lambda sf: sf.query(
                soql,
                include_deleted=include_deleted,
                timeout=self._timeout,
                headers=self._headers,
            ),
            op="query",
            block=block,
        )

    def query_more(self, next_url: str, *, block: bool = True) -> dict:
        """The page a `nextRecordsUrl` names."""
        return self.call(
            lambda sf: sf.query_more(
                next_url, identifier_is_url=True, timeout=self._timeout, headers=self._headers
            ),
            op="query_more",
            block=block,
        )

    def query_all(self, soql: str, *, include_deleted: bool = False) -> list[dict]:
        """Every record of a query, following nextRecordsUrl (blocking)."""
        page = self.query(soql, include_deleted=include_deleted)
        records = list(page.get("records", []))
        while not page.get("done", True):
            page = self.query_more(page["nextRecordsUrl"])
            records.extend(page.get("records", []))
        return records

    def update_collection(self, records: list[dict], *, block: bool = True) -> list[dict]:
        """sObject Collections update by Id (<= 200 records, allOrNone false)."""
        if len(records) > 200:
            raise ValueError("at most 200 records per sObject Collections call")
        body = {"allOrNone": False, "records": records}
        result = self.call(
            lambda sf: sf.restful(
                "composite/sobjects",
                method="PATCH",
                data=json.dumps(body),
                timeout=self._timeout,
                headers=self._headers,
            ),
            op="update_collection",
            block=block,
        )
        return list(result or [])

    def bulk_query_start(
        self, soql: str, *, include_deleted: bool = True, block: bool = True
    ) -> str:
        """Create a Bulk API 2.0 query job; return its id."""
        body = {"operation": "queryAll" if include_deleted else "query", "query": soql}
        job = self.call(
            lambda sf: sf.restful(
                "jobs/query",
                method="POST",
                data=json.dumps(body),
                timeout=self._timeout,
                headers=self._headers,
            ),
            op="bulk_query_start",
            block=block,
        )
        return str(job["id"])

    def bulk_query_state(self, job_id: str, *, block: bool = True) -> dict:
        """The job's info (`state`: UploadComplete, InProgress, JobComplete, Failed, Aborted)."""
        return self.call(
            lambda sf: sf.restful(
                f"jobs/query/{job_id}", timeout=self._timeout, headers=self._headers
            ),
            op="bulk_query_state",
            block=block,
        )

    def bulk_query_results(
        self, job_id: str, locator: str | None, max_records: int, *, block: bool = True
    ) -> tuple[str, str | None]:
        """One page of a finished job's CSV and the locator of the next (None at the end)."""

        def fetch(sf: Salesforce) -> tuple[str, str | None]:
            params: dict[str, Any] = {"maxRecords": max_records}
            if locator:
                params["locator"] = locator
            headers = dict(sf.headers)
            headers.update(self._headers)
            headers["Accept"] = "text/csv"
            r = sf.session.request(
                "GET",
                f"{sf.base_url}jobs/query/{job_id}/results",
                params=params,
                headers=headers,
                timeout=self._timeout,
            )
            if r.status_code >= 300:
                exception_handler(r, "bulk2 results")
            info = r.headers.get("Sforce-Limit-Info")
            if info:
                sf.api_usage = Salesforce.parse_api_usage(info)
            nxt = r.headers.get("Sforce-Locator")
            return r.content.decode("utf-8").replace("\x00", ""), (
                None if not nxt or nxt == "null" else nxt
            )

        return self.call(fetch, op="bulk_query_results", block=block)

    def close(self) -> None:
        """Release the HTTP connections."""
        if self._session is not None:
            self._session.close()
            self._session = None
        self._sf = None


def preflight(settings: Settings) -> None:
    """Validate the [salesforce] settings and log in once, before the dataflow starts.

    A rejected login or an untrusted certificate is a configuration error (one
    line naming the setting, exit 2); an unreachable server is a RuntimeError.
    """
    cfg = api_config(settings)
    if cfg.auth == "password":
        log.warning(
            "salesforce: auth = password logs in with the user's password%s; prefer jwt or "
            "client_credentials (OAuth 2.0 with a connected app) in production",
            "" if cfg.consumer_key else " through SOAP login()",
        )
    api = SalesforceApi(cfg)
    try:
        if cfg.auth == "session":
            api.call(lambda sf: sf.limits(timeout=cfg.timeout_s), op="limits")
        else:
            api.login()
    except SalesforceAuthenticationFailed as e:
        raise ConfigError(
            f"salesforce.auth: {cfg.auth} login to {cfg.instance_url} failed: {e.code}: "
            f"{auth_failure_text(e)[:200]}"
        ) from None
    except CallError as e:
        if e.code == "INVALID_SESSION_ID":
            raise ConfigError("salesforce.session_id: Salesforce rejected the session") from None
        if e.code == "CONNECTION_ERROR" and "SSL" in e.message:
            raise ConfigError(
                f"salesforce.ca_bundle: cannot verify the certificate of {cfg.instance_url}"
            ) from None
        raise RuntimeError(f"Salesforce at {cfg.instance_url}: {e}") from None
    except requests.exceptions.SSLError:
        raise ConfigError(
            f"salesforce.ca_bundle: cannot verify the certificate of {cfg.instance_url}"
        ) from None
    except requests.exceptions.RequestException as e:
        raise RuntimeError(
            f"cannot reach Salesforce at {cfg.instance_url}: {type(e).__name__}"
        ) from None
    finally:
        api.close()
