"""Helpers for tests that run, stop, kill and restart `sferp run` processes and clusters."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
from kafka import KafkaConsumer, TopicPartition
from sferp.benchmarks.recovery import live_consumed

# The deterministic part of every view (CONTRACT §2), ordered by primary key.
DETERMINISTIC_SQL = {
    "records": (
        "SELECT source, entity, record_key, deleted, fields, version, event_time FROM records "
        "ORDER BY source, entity, record_key"
    ),
    "inventory_live": (
        "SELECT sku, on_hand, allocated, sf_open_demand, available_to_promise "
        "FROM inventory_live ORDER BY sku"
    ),
    "order_status": (
        "SELECT sf_order_id, order_number, account_id, erp_order_no, sf_status, erp_status, "
        "stage, sf_total, erp_total, amount_matches, activated_at, invoiced_at, quote_to_cash_s "
        "FROM order_status ORDER BY sf_order_id"
    ),
    "open_exceptions": (
        'SELECT kind, "key" FROM reconciliation_exceptions WHERE "open" ORDER BY kind, "key"'
    ),
    "dead_letters": (
        'SELECT topic, "partition", "offset", reason, raw FROM dead_letters '
        'ORDER BY topic, "partition", "offset"'
    ),
    "flow_stats": (
        "SELECT topic, consumed, applied, duplicates, dead_lettered, ignored "
        "FROM flow_stats ORDER BY topic"
    ),
}


def deterministic_rows(views: Path) -> dict[str, list[tuple]]:
    """Every view's deterministic rows, ordered by primary key; JSON parsed, decimals exact."""
    con = duckdb.connect(str(views), read_only=True)
    try:
        out = {}
        for table, sql in DETERMINISTIC_SQL.items():
            rows = con.execute(sql).fetchall()
            if table == "records":
                rows = [(*r[:4], json.loads(r[4]), *r[5:]) for r in rows]
            out[table] = rows
        return out
    finally:
        con.close()


def assert_decimals_exact(rows: dict[str, list[tuple]]) -> None:
    """Amounts come back as Decimal (exact), never as binary floats."""
    for row in rows["order_status"]:
        for amount in (row[7], row[8]):
            assert amount is None or isinstance(amount, Decimal), row


def free_port() -> int:
    """A port free now, outside the range outgoing connections take theirs from."""
    return free_port_run(1)


def _ephemeral_low() -> int:
    """Where the kernel's ports for outgoing connections start (32768 when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_run(n: int) -> int:
    """A port p such that p .. p+n-1 are free now (metrics ports are base + process id).

    Taken below the ephemeral range: there an outgoing connection of any client
    (the flows' Kafka consumers) could take p+1 before the process binds it.
    """
    low = _ephemeral_low()
    for _ in range(100):
        base = random.randrange(10_000, max(10_001, low - n))
        try:
            socks = []
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def cluster_addresses(n: int) -> str:
    """`host:port;...` for an n-process cluster on this machine."""
    return ";".join(f"127.0.0.1:{free_port()}" for _ in range(n))


class Runner:
    """Starts `sferp run` processes for one views file and recovery dir; logs to files."""

    def __init__(self, config: Path, bootstrap: str, workdir: Path, env: dict[str, str]) -> None:
        self.config = config
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.env = env
        self.started: list[subprocess.Popen] = []
        self.runs = 0

    @property
    def views(self) -> Path:
        return self.workdir / "views.duckdb"

    @property
    def recovery(self) -> Path:
        return self.workdir / "recovery"

    def command(self, *extra: str, recovery: bool = True, bounded: bool = True) -> list[str]:
        cmd = [sys.executable, "-m", "sferp", "run", "--config", str(self.config)]
        cmd += ["--bootstrap", self.bootstrap, "--views", str(self.views)]
        if recovery:
            cmd += ["--recovery-dir", str(self.recovery)]
        if bounded:
            cmd.append("--until-caught-up")
        return cmd + list(extra)

    def start(
        self, *extra: str, processes: int = 1, recovery: bool = True, bounded: bool = True
    ) -> list[subprocess.Popen]:
        """Start one process, or a cluster of `processes` on free local ports."""
        self.runs += 1
        procs = []
        addresses = cluster_addresses(processes) if processes > 1 else None
        for i in range(processes):
            cluster = ["-i", str(i), "-a", addresses] if addresses else []
            log = open(self.log_path(self.runs, i), "w")  # noqa: SIM115 - closed by the child
            procs.append(
                subprocess.Popen(
                    self.command(*extra, *cluster, recovery=recovery, bounded=bounded),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
            )
            log.close()
        self.started.extend(procs)
        return procs

    def log_path(self, run: int, process: int) -> Path:
        return self.workdir / f"run{run}-p{process}.log"

    def log(self, run: int | None = None, process: int = 0) -> str:
        return self.log_path(run or self.runs, process).read_text()

    def wait(self, procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]

    def finish(self, *extra: str, processes: int = 1) -> None:
        """Run until caught up; every process must exit 0."""
        procs = self.start(*extra, processes=processes)
        codes = self.wait(procs)
        logs = "\n".join(self.log(process=i)[-3000:] for i in range(processes))
        assert codes == [0] * processes, logs
        if processes > 1:  # each process said the cluster formed, and ran its flow
            for i in range(processes):
                log = self.log(process=i)
                assert f"all {processes} processes of the cluster are connected" in log, log
                assert "before the other processes" not in log, log

    def kill_all(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_until(
    predicate: Callable[[], Any], procs: list[subprocess.Popen], timeout: float = 120
) -> Any:
    """Poll until `predicate()` is truthy; fails when a process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        ended = [p.returncode for p in procs if p.poll() is not None]
        assert not ended, f"a process ended (exit {ended}) before the point was reached"
        time.sleep(0.05)
    raise AssertionError("point not reached in time")


def at_fraction(views: Path, writer: subprocess.Popen, total: int, fraction: float) -> Callable:
    """Predicate: the writer has committed at least `fraction` of the stream; returns the count."""

    def check() -> int | None:
        n = live_consumed(views, writer.pid)
        return n if n is not None and n >= fraction * total else None

    return check


def kill9(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every message of a one-partition topic, read until nothing new arrives."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    out: list[Any] = []
    idle = 0
    while idle < 3:
        batch = c.poll(timeout_ms=300, max_records=20_000)
        got = [m for msgs in batch.values() for m in msgs]
        out.extend(got)
        idle = 0 if got else idle + 1
    c.close()
    return out


def latest_per_key(messages: list[Any]) -> dict[str, Any]:
    """Latest value per key, as a compacted topic keeps it (tombstoned keys dropped)."""
    latest: dict[str, Any] = {}
    for m in messages:
        latest[m.key.decode()] = None if m.value is None else json.loads(m.value)
    return {k: v for k, v in latest.items() if v is not None}


def kafka_output_problems(bootstrap: str, names: dict[str, str], views: Path) -> list[str]:
    """Differences between the compacted reconciled.* topics (latest per key) and the views."""
    con = duckdb.connect(str(views), read_only=True)
    try:
        inventory = {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT sku, on_hand, allocated, sf_open_demand, available_to_promise "
                "FROM inventory_live"
            ).fetchall()
        }
        orders = {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT sf_order_id, erp_order_no, sf_status, erp_status, stage, sf_total, "
                "erp_total, amount_matches FROM order_status"
            ).fetchall()
        }
        exceptions = {
            (r[0], r[1]): r[2]
            for r in con.execute(
                'SELECT kind, "key", "open" FROM reconciliation_exceptions'
            ).fetchall()
        }
        dead = {
            f"{t}:{p}:{o}"
            for t, p, o in con.execute(
                'SELECT topic, "partition", "offset" FROM dead_letters'
            ).fetchall()
        }
    finally:
        con.close()

    def dec(v: Any) -> Decimal | None:
        return None if v is None else Decimal(v)

    problems: list[str] = []
    inv = latest_per_key(read_topic(bootstrap, names["out_inventory"]))
    got_inv = {
        k: (v["on_hand"], v["allocated"], v["sf_open_demand"], v["available_to_promise"])
        for k, v in inv.items()
    }
    problems += _keyed_diff("reconciled.inventory", inventory, got_inv)
    out = latest_per_key(read_topic(bootstrap, names["out_orders"]))
    got_orders = {
        k: (
            v["erp_order_no"],
            v["sf_status"],
            v["erp_status"],
            v["stage"],
            dec(v["sf_total"]),
            dec(v["erp_total"]),
            v["amount_matches"],
        )
        for k, v in out.items()
    }
    problems += _keyed_diff("reconciled.orders", orders, got_orders)
    exc = latest_per_key(read_topic(bootstrap, names["out_exceptions"]))
    got_exc = {tuple(k.split(":", 1)): v["open"] for k, v in exc.items()}
    problems += _keyed_diff("reconciled.exceptions", exceptions, got_exc)
    dlq = {m.key.decode() for m in read_topic(bootstrap, names["dlq"])}
    if dlq != dead:
        problems.append(f"integration.dlq keys differ: {len(dlq ^ dead)} of {len(dead)}")
    return problems


def _keyed_diff(name: str, want: dict, got: dict) -> list[str]:
    out = [f"{name} {k!r}: missing" for k in sorted(set(want) - set(got), key=repr)]
    out += [f"{name} {k!r}: stale key" for k in sorted(set(got) - set(want), key=repr)]
    out += [
        f"{name} {k!r}: {got[k]!r} != {want[k]!r}"
        for k in sorted(set(want) & set(got), key=repr)
        if got[k] != want[k]
    ]
    return out
