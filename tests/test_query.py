"""`sferp query`: through the running writer (real HTTP) and from the stopped file."""

from __future__ import annotations

import csv
import http.client
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from sferp.connectors.duckdb_views import ViewsWriterPartition, write_views_file
from sferp.connectors.query_server import (
    TOKEN_HEADER,
    RefusedStatement,
    check_read_only,
    endpoint_path,
)

from sferp.query import QueryFailed, cli_query, fetch, run_query

T0 = 1_764_309_600_123  # 2025-11-28T06:00:00.123Z

ORDER = (
    "801A",
    "00000001",
    "001X",
    None,
    "Activated",
    None,
    "BOOKED",
    Decimal("12.50"),
    None,
    None,
    T0,
    None,
    None,
    T0 + 1000,
)
ORDER2 = (
    "801B",
    "00000002",
    "001X",
    "SO-2",
    "Activated",
    "INVOICED",
    "INVOICED",
    Decimal("-3.10"),
    Decimal("-3.10"),
    True,
    T0,
    T0 + 90_000,
    90.0,
    T0,
)
RECORD = (
    "salesforce",
    "Order",
    "801A",
    False,
    '{"Status":"Activated","TotalAmount":12.5}',
    "1764309600123:1:1",
    T0,
)
SAMPLE = {
    "order_status": {("801A",): ORDER, ("801B",): ORDER2},
    "records": {RECORD[:3]: RECORD},
    "inventory_live": {("SKU|1",): ("SKU|1", 5, 1, 0, 4, T0)},
}


def writer(path: Path, **kw: Any) -> ViewsWriterPartition:
    kw.setdefault("commit_interval_s", 0)
    return ViewsWriterPartition(str(path), None, **kw)


@pytest.fixture
def stopped(tmp_path: Path) -> str:
    """A views file with sample rows and no running writer."""
    path = tmp_path / "views.duckdb"
    write_views_file(str(path), [SAMPLE])
    return str(path)


@pytest.fixture
def running(tmp_path: Path) -> Any:
    """A live writer (this process) serving the same sample rows."""
    path = tmp_path / "views.duckdb"
    w = writer(path)
    w.write_batch([SAMPLE])
    yield str(path)
    w.close()


@pytest.fixture(params=["stopped", "running"])
def views(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(request.param)


def query(sql: str, path: str, fmt: str = "table", **kw: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_query(sql, path, fmt, out=out, err=err, **kw)
    return code, out.getvalue(), err.getvalue()


# -- output -------------------------------------------------------------------------------


def test_table_output(views: str) -> None:
    code, out, err = query(
        "SELECT sf_order_id, sf_total, erp_order_no, amount_matches, activated_at "
        "FROM order_status ORDER BY sf_order_id",
        views,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split(" | ") == [
        "sf_order_id",
        "sf_total",
        "erp_order_no",
        "amount_matches",
        "activated_at",
    ]
    assert set(lines[1]) <= {"-", "+"}
    cells = [[c.strip() for c in line.split("|")] for line in lines[2:4]]
    assert cells == [
        ["801A", "12.50", "NULL", "NULL", "2025-11-28T06:00:00.123Z"],
        ["801B", "-3.10", "SO-2", "true", "2025-11-28T06:00:00.123Z"],
    ]
    assert lines[4] == "(2 rows)"
    # aligned: every row has its column separators at the same positions
    seps = {tuple(i for i, ch in enumerate(line) if ch == "|") for line in [lines[0], *lines[2:4]]}
    assert len(seps) == 1
    assert lines[2].index("12.50") + len("12.50") == lines[3].index("-3.10") + len("-3.10")


def test_csv_output(views: str) -> None:
    code, out, err = query(
        "SELECT sku, on_hand, updated_at, NULL AS nothing FROM inventory_live", views, "csv"
    )
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [
        ["sku", "on_hand", "updated_at", "nothing"],
        ["SKU|1", "5", "2025-11-28T06:00:00.123Z", ""],
    ]


def test_json_output(views: str) -> None:
    code, out, err = query(
        "SELECT r.*, o.sf_total, o.quote_to_cash_s FROM records r "
        "JOIN order_status o ON o.sf_order_id = r.record_key",
        views,
        "json",
    )
    assert code == 0, err
    (obj,) = orjson.loads(out)
    assert obj == {
        "source": "salesforce",
        "entity": "Order",
        "record_key": "801A",
        "deleted": False,
        "fields": {"Status": "Activated", "TotalAmount": 12.5},  # JSON column nested
        "version": "1764309600123:1:1",
        "event_time": "2025-11-28T06:00:00.123Z",
        "sf_total": "12.50",  # decimals as exact strings
        "quote_to_cash_s": None,
    }


def test_same_output_running_and_stopped(tmp_path: Path) -> None:
    path = tmp_path / "views.duckdb"
    w = writer(path)
    w.write_batch([SAMPLE])
    sql = "SELECT * FROM order_status ORDER BY 1"
    live = [query(sql, str(path), fmt) for fmt in ("table", "csv", "json")]
    w.close()
    assert not os.path.exists(endpoint_path(str(path)))
    offline = [query(sql, str(path), fmt) for fmt in ("table", "csv", "json")]
    assert live == offline
    assert all(code == 0 for code, _, _ in live)


def test_row_limit(views: str) -> None:
    code, out, err = query("SELECT * FROM range(100)", views, "csv", max_rows=5)
    assert code == 0
    assert out.splitlines() == ["range", "0", "1", "2", "3", "4"]
    assert "row limit: --max-rows" in err
    code, out, _ = query("SELECT * FROM range(5)", views, "table", max_rows=5)
    assert out.splitlines()[-1] == "(5 rows)"


def test_no_row_limit_unless_asked(tmp_path: Path, stopped: str) -> None:
    """CONTRACT §4 names no limit: every row, from the file and from a running flow
    (up to the server's cap, far beyond a test's or a support query's size)."""
    sql = "SELECT * FROM range(25000)"
    code, out, err = query(sql, stopped, "csv")
    assert code == 0 and err == "" and len(out.splitlines()) == 25001
    path = tmp_path / "live.duckdb"
    w = writer(path)
    try:
        assert os.path.exists(endpoint_path(str(path)))
        code, out, err = query(sql, str(path), "csv")
        assert code == 0 and err == "" and len(out.splitlines()) == 25001
    finally:
        w.close()


def test_server_row_cap(tmp_path: Path) -> None:
    path = tmp_path / "views.duckdb"
    w = writer(path, query_max_rows=3)
    try:
        res = fetch("SELECT * FROM range(10)", str(path), max_rows=1000, timeout_s=5)
        assert len(res.rows) == 3 and res.truncated
        code, _, err = query("SELECT * FROM range(10)", str(path), "csv", max_rows=1000)
        assert code == 0 and "output cut at 3 rows (row limit: the running flow's limit)" in err
    finally:
        w.close()


def test_server_time_cap_says_it_is_the_flows(tmp_path: Path) -> None:
    path = tmp_path / "views.duckdb"
    w = writer(path, query_timeout_s=0.2)
    slow = "SELECT count(*) FROM range(10000000000) a"
    try:
        with pytest.raises(QueryFailed, match="interrupted after 0.2 s .the running flow's limit"):
            fetch(slow, str(path), max_rows=10, timeout_s=60)
    finally:
        w.close()


def test_metadata_statements_allowed(views: str) -> None:
    for sql in (
        "DESCRIBE records",
        "SHOW TABLES",
        "PRAGMA table_info('records')",
        "EXPLAIN SELECT * FROM records",
        'SELECT "offset" FROM dead_letters',
        "CALL pragma_table_info('flow_stats')",
        "SUMMARIZE inventory_live",
    ):
        code, out, err = query(sql, views)
        assert code == 0, (sql, err)


# -- refusals and errors ------------------------------------------------------------------

REFUSED = [
    "INSERT INTO flow_stats VALUES ('x', 1, 1, 0, 0, 0, 0)",
    "UPDATE order_status SET stage = 'X'",
    "DELETE FROM order_status",
    "CREATE TABLE t (a INT)",
    "DROP TABLE records",
    "ATTACH 'other.duckdb' AS o",
    "COPY order_status TO 'out.csv'",
    "PRAGMA force_checkpoint",
    "PRAGMA threads=1",
    "SET threads = 1",
    "CHECKPOINT",
    "EXPLAIN ANALYZE DELETE FROM order_status",
    "INSTALL httpfs",
    "SELECT 1; DELETE FROM order_status",
    "EXPORT DATABASE 'dump'",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_writes_are_refused(views: str, sql: str) -> None:
    code, out, err = query(sql, views)
    assert code == 2
    assert out == ""
    assert err.startswith("sferp query: refused:") and err.count("\n") == 1
    code, out, _ = query("SELECT count(*) FROM order_status WHERE stage <> 'X'", views, "csv")
    assert out.splitlines()[1] == "2"


def test_hidden_write_in_select_fails(views: str) -> None:
    """A data-modifying CTE parses as SELECT; the read-only transaction stops it."""
    code, _, err = query("WITH d AS (DELETE FROM order_status RETURNING *) SELECT * FROM d", views)
    assert code == 2 and err.count("\n") == 1
    _, out, _ = query("SELECT count(*) FROM order_status", views, "csv")
    assert out.splitlines()[1] == "2"


def test_no_file_access_from_queries(views: str) -> None:
    for sql in ("SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM 'other.csv'"):
        code, out, err = query(sql, views)
        assert code == 2 and out == "" and err.count("\n") == 1, (sql, err)


def test_checker_refuses_what_it_cannot_read() -> None:
    with pytest.raises(RefusedStatement):
        check_read_only("/* comment */ EXPLAIN ANALYZE DELETE FROM records")
    with pytest.raises(RefusedStatement):
        check_read_only("/* comment */ PRAGMA table_info('records')")


def test_checker_accepts_read_only_forms() -> None:
    check_read_only("SELECT 1")
    check_read_only("EXPLAIN SELECT 1")
    check_read_only("EXPLAIN ANALYZE SELECT 1")
    check_read_only("FROM flow_stats")


def test_sql_error_exit_2(views: str) -> None:
    code, out, err = query("SELECT nope FROM order_status", views)
    assert code == 2 and out == ""
    assert err.startswith("sferp query: ") and err.count("\n") == 1 and "nope" in err
    code, _, err = query("SELEC 1", views)
    assert code == 2 and err.count("\n") == 1


def test_missing_views_file(tmp_path: Path) -> None:
    code, out, err = query("SELECT 1", str(tmp_path / "absent.duckdb"))
    assert code == 2 and out == ""
    assert "no views file" in err and err.count("\n") == 1
    assert not (tmp_path / "absent.duckdb").exists()  # a query never creates the file


def test_timeout_interrupts(tmp_path: Path) -> None:
    heavy = "SELECT sum(hash(a.range + b.range)) FROM range(200000) a, range(200000) b"
    path = tmp_path / "views.duckdb"
    w = writer(path, query_timeout_s=0.3)
    try:
        started = time.monotonic()
        code, _, err = query(heavy, str(path))
        assert code == 1 and "interrupted" in err
        assert time.monotonic() - started < 10
        w.write_batch([SAMPLE])  # the writer is unaffected
        assert (
            query("SELECT count(*) FROM order_status", str(path), "csv")[1] == "count_star()\n2\n"
        )
    finally:
        w.close()
    code, _, err = query(heavy, str(path), timeout_s=0.3)  # stopped: same limit, from the file
    assert code == 1 and "interrupted" in err


# -- the endpoint ---------------------------------------------------------------------------


def _post(
    port: int, body: bytes, headers: dict[str, str], timeout_s: float = 5
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", "/query", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def test_endpoint_file_and_token(running: str) -> None:
    ep = endpoint_path(running)
    assert stat.S_IMODE(os.stat(ep).st_mode) == 0o600
    info = orjson.loads(Path(ep).read_bytes())
    assert info["pid"] == os.getpid() and len(info["token"]) >= 32
    body = orjson.dumps({"sql": "SELECT 42 AS x"})
    status, answer = _post(info["port"], body, {})
    assert status == 401 and answer["kind"] == "auth"
    status, _ = _post(info["port"], body, {TOKEN_HEADER: info["token"][:-1] + "?"})
    assert status == 401
    status, answer = _post(info["port"], body, {TOKEN_HEADER: info["token"]})
    assert status == 200 and answer["rows"] == [[42]] and answer["columns"] == ["x"]
    status, answer = _post(
        info["port"], orjson.dumps({"sql": "DROP TABLE records"}), {TOKEN_HEADER: info["token"]}
    )
    assert status == 400 and answer["kind"] == "refused"
    with socket.create_connection(("127.0.0.1", info["port"]), timeout=5):
        pass  # bound on the loopback interface


def test_stale_endpoint_of_dead_process_falls_back_to_file(stopped: str) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = {"pid": int(dead.stdout), "host": "127.0.0.1", "port": port, "token": "x"}
    Path(endpoint_path(stopped)).write_bytes(orjson.dumps(info))
    code, out, err = query("SELECT count(*) AS n FROM order_status", stopped, "csv")
    assert (code, out) == (0, "n\n2\n"), err


def test_endpoint_of_live_pid_without_listener_falls_back(stopped: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = {"pid": os.getpid(), "host": "127.0.0.1", "port": port, "token": "x"}
    Path(endpoint_path(stopped)).write_bytes(orjson.dumps(info))
    code, out, err = query("SELECT count(*) AS n FROM order_status", stopped, "csv")
    assert (code, out) == (0, "n\n2\n"), err


def test_queries_see_consistent_progressing_data_while_writing(tmp_path: Path) -> None:
    """A writer thread commits continuously; each query sees one committed state."""
    path = tmp_path / "views.duckdb"
    w = writer(path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write_loop() -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                w.write_batch(
                    [
                        {
                            "flow_stats": {("t",): ("t", i, i, 0, 0, 0, 0)},
                            "inventory_live": {("S",): ("S", i, 0, 0, i, T0)},
                            "dead_letters": {("t", 0, i): ("t", 0, i, "not_json", "x")},
                        }
                    ]
                )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=write_loop)
    thread.start()
    try:
        seen = []
        sql = (
            "SELECT (SELECT consumed FROM flow_stats), "
            "(SELECT sum(hash(range)) FROM range(3000000)) IS NOT NULL, "
            "(SELECT on_hand FROM inventory_live), (SELECT count(*) FROM dead_letters)"
        )
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline or len(seen) < 5:
            res = fetch(sql, str(path), max_rows=10, timeout_s=10)
            (row,) = res.rows
            if row[0] is not None:
                assert row[0] == row[2] == row[3], row  # one snapshot of committed data
                seen.append(row[0])
        commits_before = w.commits
        slow = fetch(
            "SELECT sum(hash(a.range * b.range)) FROM range(3000) a, range(3000) b",
            str(path),
            max_rows=1,
            timeout_s=30,
        )
        assert slow.rows and w.commits > commits_before  # the writer kept committing
    finally:
        stop.set()
        thread.join()
        w.close()
    assert not errors
    assert seen == sorted(seen) and len(set(seen)) >= 3  # progressing, never going back


# -- command line ---------------------------------------------------------------------------


def test_cli_query_arguments(stopped: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_query(["SELECT count(*) AS n FROM records", "--views", stopped, "--format", "csv"]) == 0
    )
    assert capsys.readouterr().out == "n\n1\n"
    assert cli_query(["SELECT 1", "--views", stopped, "--format", "xml"]) == 2
    assert cli_query([]) == 2
    assert cli_query(["SELECT 1", "--views", stopped, "--max-rows", "0"]) == 2


WRITER_SCRIPT = """
import sys, time
from sferp.connectors.duckdb_views import ViewsWriterPartition, write_views_file
w = ViewsWriterPartition(sys.argv[1], None, commit_interval_s=0, serve_queries=sys.argv[2] == "1")
w.write_batch([{"flow_stats": {("sf.cdc",): ("sf.cdc", 7, 5, 1, 0, 1, 0)}}])
print("ready", flush=True)
time.sleep(60)
"""


def _start_writer(path: Path, serve: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER_SCRIPT), str(path), "1" if serve else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_cli_against_a_writer_in_another_process(tmp_path: Path) -> None:
    """The real `sferp query` command against a writer process that holds the file."""
    path = tmp_path / "views.duckdb"
    proc = _start_writer(path, serve=True)
    try:
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "sferp",
                "query",
                "SELECT topic, consumed FROM flow_stats",
                "--views",
                str(path),
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert orjson.loads(cli.stdout) == [{"topic": "sf.cdc", "consumed": 7}]
        with pytest.raises(duckdb.Error):  # why the endpoint exists: the file is locked
            duckdb.connect(str(path), read_only=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_locked_file_without_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "views.duckdb"
    proc = _start_writer(path, serve=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(QueryFailed) as e:
            fetch("SELECT 1", str(path), max_rows=10, timeout_s=5, wait_s=0.5)
        assert time.monotonic() - t0 >= 0.5
        assert e.value.code == 1
        assert "locked" in str(e.value) and "waited 0.5 s" in str(e.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


STARTING_WRITER_SCRIPT = """
import sys, time, duckdb
from sferp.connectors.query_server import QueryServer
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE t AS SELECT 42 AS x")
print("ready", flush=True)
time.sleep(float(sys.argv[2]))  # a restarted writer getting its views ready
QueryServer(con.cursor(), sys.argv[1], max_rows=100, timeout_s=5).start()
time.sleep(60)
"""


def test_a_query_waits_for_a_starting_writer_to_announce_its_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "views.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(STARTING_WRITER_SCRIPT), str(path), "1.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        res = fetch("SELECT x FROM t", str(path), max_rows=10, timeout_s=5, wait_s=20)
        assert [list(r) for r in res.rows] == [[42]]
        assert time.monotonic() - t0 >= 1.0  # answered by the endpoint once it came up
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


HEAVY = "SELECT sum(hash(a.range + b.range)) FROM range(200000) a, range(200000) b"


def test_closing_the_writer_while_a_query_runs_interrupts_it(tmp_path: Path) -> None:
    """DuckDB refuses to close a connection while a cursor made from it runs a query;
    closing the writer (the end of every run) interrupts the query instead of failing."""
    path = tmp_path / "views.duckdb"
    w = writer(path, query_timeout_s=60)
    w.write_batch([SAMPLE])
    info = orjson.loads(Path(endpoint_path(str(path))).read_bytes())
    headers = {TOKEN_HEADER: info["token"]}
    answers: list = []
    asker = threading.Thread(
        target=lambda: answers.append(
            _post(info["port"], orjson.dumps({"sql": HEAVY}), headers, timeout_s=30)
        )
    )
    asker.start()
    deadline = time.monotonic() + 10
    while not w._server._active:  # the query is running on its cursor
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    w.close()  # raised ResourceInUseException before
    assert time.monotonic() - started < 10
    asker.join(15)
    assert answers and answers[0][0] == 400 and answers[0][1]["kind"] in ("timeout", "sql")
    assert query("SELECT count(*) FROM order_status", str(path), "csv")[1] == "count_star()\n2\n"


def test_a_query_that_starts_after_the_stop_began_is_interrupted_too(tmp_path: Path) -> None:
    """A handler may be between taking its cursor and running its query when the
    writer stops (seen under load): interrupting the idle cursor did nothing, the
    query then ran on, and closing the root failed after the wait."""
    w = writer(tmp_path / "views.duckdb")
    server = w._server
    cur = server.new_cursor()  # the handler has its cursor, its query not yet started
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            server.stop()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    stopper = threading.Thread(target=stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while not server._stopping:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # the first interruptions have passed
    started = time.monotonic()
    with pytest.raises(duckdb.Error):
        cur.execute(HEAVY)
    assert time.monotonic() - started < 5
    server.release(cur)
    stopper.join(15)
    assert not stopper.is_alive() and errors == []
    w._server = None  # stopped above
    w.close()


def test_a_cursor_closed_but_not_yet_handed_back_does_not_fail_the_stop(tmp_path: Path) -> None:
    """`release` closes the cursor, then removes it from the cursors in flight: a stop
    in between interrupted a closed cursor, which raised."""
    w = writer(tmp_path / "views.duckdb")
    server = w._server
    cur = server.new_cursor()
    cur.close()  # the first half of `release`
    later = threading.Timer(0.3, server.release, args=(cur,))  # and the second
    later.start()
    started = time.monotonic()
    w.close()
    assert time.monotonic() - started < 5
    later.join()


def test_no_connection_draws_a_progress_bar(tmp_path: Path) -> None:
    """DuckDB draws a progress bar on standard output for statements over 2 s: emptying
    a big views file for a rebuild drew one into the flow's log. Off for the writer, the
    cursors it serves queries on, and every other connection sferp opens. (Checked in a
    process of its own: under pytest, DuckDB starts with it off.)"""
    script = textwrap.dedent(
        f"""
        from sferp.connectors.duckdb_views import ViewsWriterPartition
        from sferp.duckdb_connect import connect
        setting = "SELECT current_setting('enable_progress_bar')"
        w = ViewsWriterPartition({str(tmp_path / "v.duckdb")!r}, None, commit_interval_s=0)
        cur = w._server.new_cursor()
        print(w._con.execute(setting).fetchone()[0], cur.execute(setting).fetchone()[0])
        w._server.release(cur)
        w.close()
        print(connect().execute(setting).fetchone()[0])
        import duckdb
        print(duckdb.connect().execute(setting).fetchone()[0])  # DuckDB's default here
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False", "True"]
