"""A local Salesforce REST server over HTTPS, for tests driving the real simple-salesforce client.

It implements just what sferp calls: the OAuth token endpoint (JWT bearer,
client credentials, username-password), SOAP login(), SOQL query/queryAll with
nextRecordsUrl paging (the handful of SOQL shapes sferp writes), sObject
Collections update, Bulk API 2.0 query jobs, /limits, and the Sforce-Limit-Info
header. Faults are injected per request (HTTP errors with an error code, slow
answers beyond the client's timeout, per-record UNABLE_TO_LOCK_ROW, expired
sessions). TLS uses a throwaway CA made with `cryptography`; clients trust it
through `ca_bundle`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tlskit import make_pki

API = "62.0"


# -- certificates and keys -------------------------------------------------------------


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a localhost server certificate: (ca.pem, server.pem, server.key)."""
    pki = make_pki(directory, label="sferp test Salesforce")
    return pki.ca, pki.cert, pki.key


def make_rsa_key(path: Path) -> bytes:
    """Write an RSA private key (PEM) for JWT bearer logins; return its public key (PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- the org -----------------------------------------------------------------------------


def sf_datetime(ms: int, *, rest: bool = True) -> str:
    """ms -> `2026-11-28T06:00:00.000+0000` (REST) or `...Z` (Bulk CSV)."""
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    base = t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}"
    return base + ("+0000" if rest else "Z")


@dataclass
class Fault:
    """One injected fault: applies to the next `times` requests that `match`."""

    match: Callable[[str, str], bool]
    kind: str  # "http", "slow"
    times: int = 1
    status: int = 500
    code: str = "UNKNOWN_EXCEPTION"
    seconds: float = 0.0
    before: bool = False  # slow: sleep before handling (True) or after applying (False)


@dataclass
class Call:
    """One request as the server saw it."""

    at: float
    method: str
    path: str
    query: dict[str, list[str]]
    status: int = 0


@dataclass
class FakeOrg:
    """The org's data, credentials, API usage and injected faults."""

    username: str = "integration@example.com"
    password: str = "pw-1"
    security_token: str = "tok-1"
    consumer_key: str = "ck-1"
    consumer_secret: str = "cs-1"
    jwt_public_key: bytes | None = None
    jwt_audience: str = "https://login.salesforce.com"
    api_total: int = 100_000
    api_used: int = 0
    page_size: int = 2000
    bulk_polls: int = 1  # job status calls answering InProgress before JobComplete
    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    writes: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock_failures: dict[str, int] = field(default_factory=dict)  # Id -> UNABLE_TO_LOCK_ROW count
    rejects: dict[str, str] = field(default_factory=dict)  # Id -> statusCode, always
    logins: int = 0
    clock_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000))

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self._locators: dict[str, list[dict[str, Any]]] = {}
        self._jobs: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    # data
    def put(self, obj: str, rid: str, fields: dict[str, Any], modstamp: int) -> None:
        """Create or replace a record's fields (merged), stamped `modstamp` ms."""
        with self.lock:
            rec = self.records.setdefault(obj, {}).setdefault(rid, {"Id": rid, "IsDeleted": False})
            rec.update(fields)
            rec["SystemModstamp"] = modstamp

    def delete(self, obj: str, rid: str, modstamp: int) -> None:
        """Move a record to the recycle bin (queryAll still sees it, IsDeleted true)."""
        with self.lock:
            rec = self.records[obj][rid]
            rec["IsDeleted"] = True
            rec["SystemModstamp"] = modstamp

    def purge(self, obj: str, rid: str) -> None:
        """Hard-delete: gone for every query."""
        with self.lock:
            self.records.get(obj, {}).pop(rid, None)

    def expire_sessions(self) -> None:
        """Every issued access token becomes invalid (the next call answers 401)."""
        with self.lock:
            self.tokens.clear()

    def inject(self, fault: Fault) -> None:
        """Queue a fault."""
        with self.lock:
            self.faults.append(fault)

    def api_calls(self, prefix: str = "/services/data/") -> list[Call]:
        """The requests counted against the API allocation (paths under /services/data/)."""
        with self.lock:
            return [c for c in self.calls if c.path.startswith(prefix)]


# -- SOQL, the shapes sferp writes ----------------------------------------------------

_SELECT = re.compile(
    r"SELECT (?P<fields>.+?) FROM (?P<obj>\w+)(?: WHERE (?P<where>.+?))?"
    r"(?: ORDER BY (?P<order>.+?))?(?: LIMIT (?P<limit>\d+))?\s*\Z",
    re.S,
)
_COND = re.compile(r"(\w+) (>=|>|=|<=|<|IN) (.+)")
_DTLIT = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?Z")


def _literal(text: str) -> Any:
    text = text.strip()
    m = _DTLIT.fullmatch(text)
    if m:
        y, mo, d, h, mi, s = (int(x) for x in m.groups())
        return ("dt", int(dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC).timestamp()))
    if text.startswith("(") and text.endswith(")"):
        return [_literal(x) for x in text[1:-1].split(",")]
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    return float(text)


def _matches(rec: dict[str, Any], where: str | None) -> bool:
    if not where:
        return True
    for cond in re.split(r" AND ", where):
        m = _COND.fullmatch(cond.strip())
        if m is None:
            raise ValueError(f"unsupported condition {cond!r}")
        name, op, lit = m.group(1), m.group(2), _literal(m.group(3))
        value = rec.get(name)
        if isinstance(lit, tuple) and lit[0] == "dt":  # SOQL compares whole seconds
            value = None if value is None else value // 1000
            lit = lit[1]
        if op == "IN":
            if value not in lit:
                return False
        elif op == "=":
            if value != lit:
                return False
        elif value is None:
            return False
        elif op == ">=" and not value >= lit:
            return False
        elif op == ">" and not value > lit:
            return False
        elif op == "<=" and not value <= lit:
            return False
        elif op == "<" and not value < lit:
            return False
    return True


def run_soql(org: FakeOrg, soql: str, include_deleted: bool) -> tuple[str, list[str], list[dict]]:
    """(object, selected fields, matching records as stored) for a supported query."""
    m = _SELECT.match(soql.strip())
    if m is None:
        raise ValueError(f"unsupported SOQL {soql!r}")
    obj = m.group("obj")
    fields = [f.strip() for f in m.group("fields").split(",")]
    with org.lock:
        recs = [dict(r) for r in org.records.get(obj, {}).values()]
    recs = [r for r in recs if (include_deleted or not r.get("IsDeleted"))]
    recs = [r for r in recs if _matches(r, m.group("where"))]
    if m.group("order"):
        keys = [k.strip() for k in m.group("order").split(",")]
        recs.sort(key=lambda r: tuple((r.get(k) is None, r.get(k) or 0) for k in keys))
    if m.group("limit"):
        recs = recs[: int(m.group("limit"))]
    return obj, fields, recs


def _rest_record(obj: str, fields: list[str], rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "attributes": {"type": obj, "url": f"/services/data/v{API}/sobjects/{obj}/{rec['Id']}"}
    }
    for f in fields:
        v = rec.get(f)
        out[f] = sf_datetime(v) if f == "SystemModstamp" and v is not None else v
    return out


def _csv(fields: list[str], recs: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(fields)
    for rec in recs:
        row = []
        for f in fields:
            v = rec.get(f)
            if v is None:
                row.append("")
            elif f == "SystemModstamp":
                row.append(sf_datetime(v, rest=False))
            elif isinstance(v, bool):
                row.append("true" if v else "false")
            else:
                row.append(str(v))
        w.writerow(row)
    return buf.getvalue()


# -- the HTTP side -------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # plumbing
    def _send(
        self, status: int, body: Any, ctype: str = "application/json", headers: dict | None = None
    ) -> None:
        data = (
            body
            if isinstance(body, bytes)
            else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        )
        self._call.status = status  # before the client can see the answer
        if self._delay:
            self.server.stopping.wait(self._delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass

    def _err(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        self._send(status, [{"message": message, "errorCode": code}], headers=headers)

    def _handle(self, method: str) -> None:
        org = self.server.org
        arrived = time.monotonic()
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length else b""
        self._call = Call(arrived, method, url.path, parse_qs(url.query))
        with org.lock:
            org.calls.append(self._call)
            fault = None
            for f in org.faults:
                if f.times > 0 and f.match(method, url.path):
                    f.times -= 1
                    fault = f
                    break
            org.faults = [f for f in org.faults if f.times > 0]
        self._delay = 0.0
        if fault is not None and fault.kind == "slow":
            if fault.before:
                self.server.stopping.wait(fault.seconds)
            else:
                self._delay = fault.seconds  # handle the request, then answer late
        if fault is not None and fault.kind == "http":
            self._err(fault.status, fault.code, "injected fault")
            return
        try:
            self._route(method, url.path, self._call.query)
        except ValueError as e:
            self._err(400, "MALFORMED_QUERY", str(e))

    def _limit_header(self) -> dict[str, str]:
        org = self.server.org
        return {"Sforce-Limit-Info": f"api-usage={org.api_used}/{org.api_total}"}

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        if path == "/services/oauth2/token" and method == "POST":
            return self._token()
        if path.startswith("/services/Soap/u/") and method == "POST":
            return self._soap_login()
        prefix = f"/services/data/v{API}/"
        if not path.startswith(prefix):
            return self._err(404, "NOT_FOUND", "The requested resource does not exist")
        org = self.server.org
        auth = self.headers.get("Authorization", "")
        with org.lock:
            if not auth.startswith("Bearer ") or auth[7:] not in org.tokens:
                return self._err(401, "INVALID_SESSION_ID", "Session expired or invalid")
            if org.api_used >= org.api_total:
                return self._err(
                    403,
                    "REQUEST_LIMIT_EXCEEDED",
                    "TotalRequests Limit exceeded.",
                    self._limit_header(),
                )
            org.api_used += 1
        rest = path[len(prefix) :]
        if rest in ("query", "query/", "queryAll", "queryAll/") and method == "GET":
            return self._query(query["q"][0], rest.startswith("queryAll"))
        if rest.startswith("query/") or rest.startswith("queryAll/"):
            return self._more(rest.split("/", 1)[1])
        if rest == "composite/sobjects" and method == "PATCH":
            return self._update()
        if rest in ("limits", "limits/"):
            with org.lock:
                body = {
                    "DailyApiRequests": {
                        "Max": org.api_total,
                        "Remaining": max(0, org.api_total - org.api_used),
                    }
                }
            return self._send(200, body, headers=self._limit_header())
        if rest == "jobs/query" and method == "POST":
            return self._bulk_create()
        m = re.fullmatch(r"jobs/query/(\w+)(/results)?", rest)
        if m and method == "GET":
            return self._bulk_results(m.group(1)) if m.group(2) else self._bulk_state(m.group(1))
        return self._err(404, "NOT_FOUND", f"no fake for {method} {rest}")

    # auth
    def _issue(self) -> dict[str, Any]:
        org = self.server.org
        token = "00D" + uuid.uuid4().hex
        with org.lock:
            org.tokens.add(token)
            org.logins += 1
        return {
            "access_token": token,
            "instance_url": self.server.base_url,
            "token_type": "Bearer",
            "issued_at": str(int(time.time() * 1000)),
        }

    def _token(self) -> None:
        org = self.server.org
        form = {k: v[0] for k, v in parse_qs(self._body.decode()).items()}
        grant = form.get("grant_type")
        ok = False
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer" and org.jwt_public_key:
            try:
                claims = jwt.decode(
                    form.get("assertion", ""),
                    org.jwt_public_key,
                    algorithms=["RS256"],
                    audience=org.jwt_audience,
                )
                ok = claims.get("iss") == org.consumer_key and claims.get("sub") == org.username
            except jwt.PyJWTError:
                ok = False
        elif grant == "client_credentials":
            import base64

            basic = self.headers.get("Authorization", "")
            expected = base64.b64encode(f"{org.consumer_key}:{org.consumer_secret}".encode())
            ok = basic == "Basic " + expected.decode()
        elif grant == "password":
            ok = (
                form.get("client_id") == org.consumer_key
                and form.get("client_secret") == org.consumer_secret
                and form.get("username") == org.username
                and form.get("password") == org.password + org.security_token
            )
        if not ok:
            return self._send(
                400, {"error": "invalid_grant", "error_description": "authentication failure"}
            )
        self._send(200, self._issue())

    def _soap_login(self) -> None:
        org = self.server.org
        text = self._body.decode()
        user = re.search(r"<n1:username>(.*?)</n1:username>", text)
        pw = re.search(r"<n1:password>(.*?)</n1:password>", text)
        if not (user and pw and user.group(1) == org.username):
            ok = False
        else:
            ok = pw.group(1) == org.password + org.security_token
        if not ok:
            fault = (
                '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
                'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
                'xmlns:sf="urn:fault.partner.soap.sforce.com"><soapenv:Body><soapenv:Fault>'
                "<faultcode>INVALID_LOGIN</faultcode><faultstring>INVALID_LOGIN</faultstring>"
                "<detail><sf:LoginFault><sf:exceptionCode>INVALID_LOGIN</sf:exceptionCode>"
                "<sf:exceptionMessage>Invalid username, password, security token; or user "
                "locked out.</sf:exceptionMessage></sf:LoginFault></detail>"
                "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
            )
            return self._send(500, fault, "text/xml")
        token = self._issue()["access_token"]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
            'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns="urn:partner.soap.sforce.com"><soapenv:Body><loginResponse><result>'
            f"<serverUrl>{self.server.base_url}/services/Soap/u/{API}/00D000000000001</serverUrl>"
            f"<sessionId>{token}</sessionId></result></loginResponse></soapenv:Body>"
            "</soapenv:Envelope>"
        )
        self._send(200, body, "text/xml")

    # data
    def _page(self, obj: str, fields: list[str], recs: list[dict], total: int) -> None:
        org = self.server.org
        size = org.page_size
        page, rest = recs[:size], recs[size:]
        body: dict[str, Any] = {
            "totalSize": total,
            "done": not rest,
            "records": [_rest_record(obj, fields, r) for r in page],
        }
        if rest:
            loc = f"01gFAKE{next(org._ids):08d}-{size}"
            with org.lock:
                org._locators[loc] = [obj, fields, rest, total]
            body["nextRecordsUrl"] = f"/services/data/v{API}/query/{loc}"
        self._send(200, body, headers=self._limit_header())

    def _query(self, soql: str, include_deleted: bool) -> None:
        obj, fields, recs = run_soql(self.server.org, soql, include_deleted)
        if fields == ["COUNT()"]:
            return self._send(
                200,
                {"totalSize": len(recs), "done": True, "records": []},
                headers=self._limit_header(),
            )
        self._page(obj, fields, recs, len(recs))

    def _more(self, loc: str) -> None:
        org = self.server.org
        with org.lock:
            state = org._locators.pop(loc, None)
        if state is None:
            return self._err(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        obj, fields, recs, total = state
        self._page(obj, fields, recs, total)

    def _update(self) -> None:
        org = self.server.org
        body = json.loads(self._body)
        results = []
        for r in body["records"]:
            obj = r["attributes"]["type"]
            rid = r["id"]
            fields = {k: v for k, v in r.items() if k not in ("attributes", "id")}
            with org.lock:
                locks = org.lock_failures.get(rid, 0)
                rec = org.records.get(obj, {}).get(rid)
                if locks > 0:
                    org.lock_failures[rid] = locks - 1
                    code = "UNABLE_TO_LOCK_ROW"
                elif rid in org.rejects:
                    code = org.rejects[rid]
                elif rec is None or rec.get("IsDeleted"):
                    code = "ENTITY_IS_DELETED"
                else:
                    code = None
                    rec.update(fields)
                    rec["SystemModstamp"] = org.clock_ms()
                    org.writes.append((obj, rid, fields))
            if code is None:
                results.append({"id": rid, "success": True, "errors": []})
            else:
                results.append(
                    {
                        "id": rid,
                        "success": False,
                        "errors": [{"statusCode": code, "message": code.lower(), "fields": []}],
                    }
                )
        self._send(200, results, headers=self._limit_header())

    # bulk 2.0
    def _bulk_create(self) -> None:
        org = self.server.org
        body = json.loads(self._body)
        if re.search(r" (ORDER BY|LIMIT|OFFSET|GROUP BY) ", body["query"] + " "):
            return self._err(400, "API_ERROR", "Bulk API 2.0 does not support this clause")
        obj, fields, recs = run_soql(org, body["query"], body["operation"] == "queryAll")
        job_id = f"750FAKE{next(org._ids):011d}"
        with org.lock:
            org._jobs[job_id] = {
                "fields": fields,
                "records": recs,
                "polls": org.bulk_polls,
                "obj": obj,
            }
        self._send(
            200,
            {
                "id": job_id,
                "operation": body["operation"],
                "object": obj,
                "state": "UploadComplete",
            },
            headers=self._limit_header(),
        )

    def _bulk_state(self, job_id: str) -> None:
        org = self.server.org
        with org.lock:
            job = org._jobs.get(job_id)
            if job is None:
                return self._err(404, "NOT_FOUND", "no such job")
            if job["polls"] > 0:
                job["polls"] -= 1
                state = "InProgress"
            else:
                state = "JobComplete"
        self._send(
            200,
            {"id": job_id, "state": state, "numberRecordsProcessed": len(job["records"])},
            headers=self._limit_header(),
        )

    def _bulk_results(self, job_id: str) -> None:
        org = self.server.org
        q = self._call.query
        size = int(q.get("maxRecords", ["50000"])[0])
        start = int(q.get("locator", ["0"])[0] or 0)
        with org.lock:
            job = org._jobs.get(job_id)
        if job is None:
            return self._err(404, "NOT_FOUND", "no such job")
        chunk = job["records"][start : start + size]
        nxt = start + size if start + size < len(job["records"]) else None
        headers = self._limit_header()
        headers["Sforce-Locator"] = str(nxt) if nxt is not None else "null"
        headers["Sforce-NumberOfRecords"] = str(len(chunk))
        self._send(200, _csv(job["fields"], chunk), "text/csv", headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, org: FakeOrg, ctx: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.org = org
        self.ctx = ctx
        self.stopping = threading.Event()
        self.base_url = f"https://127.0.0.1:{self.server_address[1]}"

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        sock.settimeout(10)
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


class FakeSalesforce:
    """Run a FakeOrg behind HTTPS on 127.0.0.1; a context manager."""

    def __init__(self, org: FakeOrg, tls_dir: Path) -> None:
        self.org = org
        self.ca, cert, key = make_tls(tls_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server = _Server(org, ctx)
        self.url = self.server.base_url
        self.key_file: Path | None = None
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeSalesforce:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def api_cfg(srv: FakeSalesforce, **overrides: Any) -> Any:
    """An ApiConfig for the fake org (JWT bearer, fast pacing) with overrides."""
    from sferp.connectors.sf_client import ApiConfig

    org = srv.org
    base: dict[str, Any] = {
        "instance_url": srv.url,
        "auth": "jwt",
        "username": org.username,
        "consumer_key": org.consumer_key,
        "private_key_file": str(srv.key_file),
        "ca_bundle": str(srv.ca),
        "calls_per_minute": 60_000,
        "timeout_s": 2.0,
        "breaker_open_s": 0.3,
    }
    base.update(overrides)
    return ApiConfig(**base)
