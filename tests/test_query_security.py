"""The query surface and the HTTP endpoints as an attacker sees them (issue 6, part 5).

Every statement is tried both ways `sferp query` runs it: through a live writer's
token-protected endpoint (real HTTP, the writer's own DuckDB connection) and from
the views file opened read-only. Files: real DuckDB files, a real secret file.
Metrics and health: the real monitor's HTTP server, reached over real sockets.
"""

from __future__ import annotations

import http.client
import io
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from sferp.connectors.duckdb_views import ViewsWriterPartition, write_views_file
from sferp.connectors.query_server import TOKEN_HEADER, endpoint_path

from sferp.config import load_settings
from sferp.metrics import Monitor
from sferp.query import run_query

T0 = 1_764_309_600_123
SAMPLE = {
    "inventory_live": {("SKU-1",): ("SKU-1", 5, 1, 0, 4, T0)},
    "flow_stats": {("sf.cdc",): ("sf.cdc", 7, 5, 1, 0, 1, 0)},
}
SECRET_TEXT = "root-secret-7f3a9c"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A local file no query may read (besides /etc/passwd)."""
    p = tmp_path / "secret.csv"
    p.write_text(f"k,v\nsecret,{SECRET_TEXT}\n")
    return p


@pytest.fixture(params=["stopped", "running"])
def views(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    path = tmp_path / "views.duckdb"
    if request.param == "stopped":
        write_views_file(str(path), [SAMPLE])
        yield str(path)
        return
    w = ViewsWriterPartition(str(path), None, commit_interval_s=0, query_timeout_s=2.0)
    w.write_batch([SAMPLE])
    assert Path(endpoint_path(str(path))).exists()
    yield str(path)
    w.close()


def query(sql: str, path: str, **kw: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_query(sql, path, "csv", out=out, err=err, **kw)
    return code, out.getvalue(), err.getvalue()


def still_intact(path: str) -> None:
    code, out, err = query("SELECT sku, on_hand FROM inventory_live", path)
    assert (code, out) == (0, "sku,on_hand\nSKU-1,5\n"), err


# --- statements --------------------------------------------------------------------------------

WRITES = [
    "INSERT INTO flow_stats VALUES ('x', 1, 1, 0, 0, 0, 0)",
    "UPDATE inventory_live SET on_hand = 0",
    "DELETE FROM inventory_live",
    "CREATE TABLE t AS SELECT 1",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE MACRO m(x) AS x",
    "CREATE SECRET (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "DROP TABLE inventory_live",
    "ALTER TABLE inventory_live ADD COLUMN x INT",
    "ATTACH ':memory:' AS m",
    "DETACH views",
    "USE memory",
    "COPY inventory_live TO '/tmp/sferp-leak.csv'",
    "COPY (SELECT 1) TO '/tmp/sferp-leak.csv'",
    "EXPORT DATABASE '/tmp/sferp-leak'",
    "IMPORT DATABASE '/tmp/sferp-leak'",
    "PRAGMA force_checkpoint",
    "PRAGMA enable_external_access",
    "PRAGMA threads=1",
    "SET enable_external_access = true",
    "SET memory_limit = '1TB'",
    "RESET threads",
    "SET VARIABLE x = 1",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CHECKPOINT",
    "VACUUM",
    "BEGIN",
    "ROLLBACK",
    "PREPARE p AS SELECT 1",
    "CALL pragma_force_checkpoint()",
    "CALL checkpoint()",
    "CALL enable_logging()",
    "EXPLAIN ANALYZE DELETE FROM inventory_live",
    "SELECT 1; DELETE FROM inventory_live",
    "SELECT 1; SELECT 2",
    # table functions with side effects, however they are hidden in a SELECT
    "SELECT * FROM checkpoint()",
    "FROM force_checkpoint()",
    "SELECT * FROM main.checkpoint()",
    'SELECT * FROM "CHECKPOINT"()',
    "WITH c AS (SELECT * FROM checkpoint()) SELECT * FROM c",
    "SELECT (SELECT count(*) FROM checkpoint())",
    "SELECT 1 UNION ALL SELECT * FROM checkpoint()",
    "SELECT * FROM range(2) r, LATERAL (SELECT * FROM checkpoint())",
    "EXPLAIN ANALYZE SELECT * FROM checkpoint()",
    "SUMMARIZE SELECT * FROM checkpoint()",
    "SELECT * FROM enable_logging()",
    "SELECT * FROM truncate_duckdb_logs()",
    "SELECT * FROM query('DELETE FROM inventory_live')",
    "SELECT * FROM query('SELECT * FROM checkpoint()')",
]


def test_anything_but_a_read_is_refused(views: str) -> None:
    accepted = []
    for sql in WRITES:
        code, out, err = query(sql, views)
        if not (code == 2 and out == "" and err.startswith("sferp query: refused:")):
            accepted.append((sql, code, out, err))
        assert err.count("\n") == 1, err
    assert accepted == []
    still_intact(views)


def test_writes_hidden_in_a_select_fail(views: str) -> None:
    for sql in (
        "WITH d AS (DELETE FROM inventory_live RETURNING *) SELECT * FROM d",
        "SELECT nextval('no_such_sequence')",
    ):
        code, out, err = query(sql, views)
        assert code == 2 and out == "", (sql, err)
    still_intact(views)


def file_reads(secret: Path) -> list[str]:
    return [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_csv_auto('/etc/passwd')",
        "SELECT * FROM read_csv(['/etc/passwd'])",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/passwd')",
        "SELECT * FROM read_json('/etc/passwd')",
        "SELECT * FROM read_parquet('/etc/passwd')",
        "SELECT * FROM sniff_csv('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM '/etc/passwd'",
        f"SELECT * FROM '{secret}'",
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM read_text('{secret.parent}/*.csv')",
        f"DESCRIBE SELECT * FROM read_text('{secret}')",
        f"SUMMARIZE SELECT * FROM read_csv('{secret}')",
        "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
        "SELECT * FROM duckdb_secrets()",
    ]


def test_no_query_reads_files_or_urls(views: str, secret_file: Path) -> None:
    for sql in file_reads(secret_file):
        code, out, err = query(sql, views)
        assert code == 2 and out == "", (sql, out, err)
        assert err.count("\n") == 1
        assert SECRET_TEXT not in out + err and "root:x:" not in out + err, sql


def test_reads_are_allowed(views: str) -> None:
    for sql in (
        "SELECT * FROM inventory_live",
        "FROM flow_stats",
        "SELECT * FROM query_table('flow_stats')",
        "SELECT * FROM range(3)",
        "SELECT * FROM duckdb_tables()",
        "SUMMARIZE inventory_live",
        "EXPLAIN ANALYZE SELECT count(*) FROM inventory_live",
        "SELECT 1;",
    ):
        code, out, err = query(sql, views)
        assert code == 0, (sql, err)


# --- limits ------------------------------------------------------------------------------------


def test_result_is_cut_at_max_rows(views: str) -> None:
    code, out, err = query("SELECT * FROM range(1000)", views, max_rows=7)
    assert code == 0 and out.splitlines() == ["range", *map(str, range(7))]
    assert "cut at 7 rows" in err


HEAVY = "SELECT sum(hash(a.range * b.range)) FROM range(300000) a, range(300000) b"


def test_slow_query_is_interrupted_at_the_time_limit(views: str) -> None:
    started = time.monotonic()
    code, out, err = query(HEAVY, views, timeout_s=0.5)
    took = time.monotonic() - started
    assert code == 1 and out == "" and "interrupted after 0.5 s" in err, err
    assert took < 15, took
    still_intact(views)


def _endpoint(path: str) -> dict[str, Any]:
    return orjson.loads(Path(endpoint_path(path)).read_bytes())


def _post(port: int, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/query", body=orjson.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def live(tmp_path: Path) -> Any:
    path = tmp_path / "views.duckdb"
    w = ViewsWriterPartition(
        str(path), None, commit_interval_s=0, query_max_rows=5, query_timeout_s=0.5
    )
    w.write_batch([SAMPLE])
    yield str(path)
    w.close()


def test_endpoint_caps_what_the_client_asks_for(live: str) -> None:
    """A client asking for more rows or more time than the writer allows gets the writer's."""
    info = _endpoint(live)
    auth = {TOKEN_HEADER: info["token"]}
    status, answer = _post(
        info["port"], {"sql": "SELECT * FROM range(100)", "max_rows": 10**9}, auth
    )
    assert status == 200 and len(answer["rows"]) == 5 and answer["truncated"]
    started = time.monotonic()
    status, answer = _post(info["port"], {"sql": HEAVY, "timeout_s": 3600}, auth)
    assert status == 400 and answer["kind"] == "timeout"
    assert time.monotonic() - started < 15


def test_endpoint_requires_its_token(live: str) -> None:
    info = _endpoint(live)
    token = info["token"]
    body = {"sql": "SELECT * FROM flow_stats"}
    for headers in (
        {},
        {TOKEN_HEADER: ""},
        {TOKEN_HEADER: token[:-1]},
        {TOKEN_HEADER: token + "x"},
        {TOKEN_HEADER: token.upper() if token.upper() != token else token.lower()},
        {"Authorization": f"Bearer {token}"},
    ):
        status, answer = _post(info["port"], body, headers)
        assert status == 401 and answer["kind"] == "auth", headers
        assert token not in orjson.dumps(answer).decode()
    status, answer = _post(info["port"], body, {TOKEN_HEADER: token})
    assert status == 200 and answer["rows"] == [["sf.cdc", 7, 5, 1, 0, 1, 0]]
    # the token is not handed out anywhere else: GET and unknown paths answer without it
    conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=10)
    conn.request("GET", "/query")
    resp = conn.getresponse()
    assert resp.status == 404 and token.encode() not in resp.read()
    conn.close()


# --- where the endpoints listen ----------------------------------------------------------------


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_query_endpoint_listens_on_loopback_only(live: str) -> None:
    info = _endpoint(live)
    assert info["host"] == "127.0.0.1"
    assert _reachable("127.0.0.1", info["port"])
    outside = _outside_address()
    if outside is not None:
        assert not _reachable(outside, info["port"])


def _monitor(tmp_path: Path, env: dict[str, str]) -> Monitor:
    settings = load_settings(environ={"SFERP_METRICS__PORT": "0", **env})
    return Monitor(settings, views_path=str(tmp_path / "views.duckdb"), bounded=True)


def test_metrics_and_health_bind_to_loopback_by_default(tmp_path: Path) -> None:
    assert load_settings(environ={}).metrics.bind == "127.0.0.1"
    m = _monitor(tmp_path, {})
    m.start()
    try:
        assert m.port
        assert _get(m.port, "/healthz") == 200 and _get(m.port, "/metrics") == 200
        assert m._server is not None and m._server.server_address[0] == "127.0.0.1"
        outside = _outside_address()
        if outside is not None:
            assert not _reachable(outside, m.port)
    finally:
        m.stop()


def test_metrics_bind_is_configurable(tmp_path: Path) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no address besides loopback")
    m = _monitor(tmp_path, {"SFERP_METRICS__BIND": "0.0.0.0"})
    m.start()
    try:
        assert m.port and _reachable(outside, m.port)
    finally:
        m.stop()
