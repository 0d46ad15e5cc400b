"""End to end through the embedded broker and the `sferp` command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from flowkit import read_topic

from sferp.compare import diff, load_views
from sferp.demo import generated_messages
from sferp.generator import GeneratorConfig, produce
from sferp.reference import ReferenceConfig, compute

ROLES = ("sf_cdc", "erp_items", "erp_inventory", "erp_sales_orders")
OUTPUTS = ("out_inventory", "out_orders", "out_exceptions", "dlq")
REF_ROLE = {
    "sf_cdc": "salesforce",
    "erp_items": "items",
    "erp_inventory": "inventory",
    "erp_sales_orders": "sales_orders",
}


@pytest.fixture
def world(topics, tmp_path):
    """Fresh topics, a config file naming them, and a way to produce a generated stream."""
    names = topics({role: 3 for role in ROLES} | {role: 1 for role in OUTPUTS})
    config = tmp_path / "sferp.toml"
    lines = ["[topics]"] + [f'{role} = "{name}"' for role, name in names.items()]
    config.write_text("\n".join(lines) + "\n")
    return names, config


def gen_config(names, orders, seed, **kw):
    return GeneratorConfig(
        orders=orders,
        duplicates=kw.get("duplicates", 0.05),
        disorder=kw.get("disorder", 0.2),
        bad=kw.get("bad", 0.01),
        partitions=3,
        seed=seed,
        topics={role: names[role] for role in ROLES},
    )


def reference_for(names, cfg):
    ref_cfg = ReferenceConfig(topics={names[r]: REF_ROLE[r] for r in ROLES})
    return compute(generated_messages(cfg), ref_cfg)


def sferp(*args, timeout=300, **kw):
    return subprocess.run(
        [sys.executable, "-m", "sferp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def run_args(broker, config, views_path) -> tuple[str, ...]:
    return ("--config", str(config), "--bootstrap", broker.bootstrap, "--views", str(views_path))


def sferp_run(broker, config, views_path, *extra, **kw):
    """`sferp run` with a config file against the test broker; the finished process."""
    return sferp("run", *run_args(broker, config, views_path), *extra, **kw)


@contextlib.contextmanager
def live_sferp_run(broker, config, views_path, **kw):
    """A live `sferp run` in the background; killed if a test leaves it running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sferp", "run", *run_args(broker, config, views_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop_cleanly(proc, ctrl_c: bool = False) -> str:
    """SIGTERM (or, with `ctrl_c`, SIGINT to the whole process group, as a terminal's
    Ctrl-C sends it): the run drains, flushes, snapshots and exits 0. Returns its stderr."""
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)  # the run and its producer child alike
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "panicked" not in err and "Traceback" not in err, err[-3000:]
    return err


def query_rows(views_path, sql: str) -> list[dict] | None:
    """`sferp query` as JSON rows; None while the views cannot answer yet."""
    r = sferp("query", sql, "--views", str(views_path), "--format", "json", timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else None


def run_until_caught_up(broker, config, views_path, *extra):
    r = sferp_run(broker, config, views_path, "--until-caught-up", *extra)
    assert r.returncode == 0, r.stderr[-3000:]


def latest_per_key(messages):
    latest = {}
    for m in messages:
        latest[m.key.decode()] = None if m.value is None else json.loads(m.value)
    return {k: v for k, v in latest.items() if v is not None}


def assert_outputs_agree(broker, names, views) -> None:
    """reconciled.* and the DLQ, read back to the latest value per key, equal the views."""
    inv = latest_per_key(read_topic(broker.bootstrap, names["out_inventory"]))
    assert set(inv) == set(views.inventory_live)
    for sku, row in views.inventory_live.items():
        got = inv[sku]
        assert (got["on_hand"], got["allocated"], got["sf_open_demand"]) == row[:3]
        assert got["available_to_promise"] == row.available_to_promise
        assert got["lineage"], "every row carries the identities that produced it"
    orders = latest_per_key(read_topic(broker.bootstrap, names["out_orders"]))
    assert set(orders) == set(views.order_status)
    for oid, row in views.order_status.items():
        got = orders[oid]
        assert got["stage"] == row.stage and got["erp_order_no"] == row.erp_order_no
        assert (None if got["sf_total"] is None else Decimal(got["sf_total"])) == row.sf_total
        assert got["amount_matches"] == row.amount_matches
        assert set(got["lineage"]) >= {"salesforce"} and all(got["lineage"].values())
    exc = latest_per_key(read_topic(broker.bootstrap, names["out_exceptions"]))
    open_keys = {tuple(k.split(":", 1)) for k, v in exc.items() if v["open"]}
    assert open_keys == views.open_exceptions
    for key, value in exc.items():  # CONTRACT §3.2: each value carries its lineage
        assert value["lineage"] and all(value["lineage"].values()), (key, value)
        if key.startswith("ORPHAN_ERP_ORDER:") and value["open"]:
            assert value["lineage"]["erp"].startswith("erp|sales_orders|")
        if key.startswith(("AMOUNT_MISMATCH:", "HANDOFF_OVERDUE:")) and value["open"]:
            assert value["lineage"]["salesforce"].startswith("sf|Order|")
    dlq = [json.loads(m.value) for m in read_topic(broker.bootstrap, names["dlq"])]
    assert {(v["offset"], v["reason"]) for v in dlq} == {(d[2], d[3]) for d in views.dead_letters}
    for v in dlq:
        assert v["lineage"] == {"input": f"{v['topic']}:{v['partition']}:{v['offset']}"}


def test_bounded_run_equals_reference_and_outputs_agree(broker, world, tmp_path):
    names, config = world
    cfg = gen_config(names, 1200, seed=21)
    produce(cfg, broker.bootstrap, create_topics=False)
    views_path = tmp_path / "views.duckdb"
    run_until_caught_up(broker, config, views_path)
    views = load_views(views_path)
    expected = reference_for(names, cfg)
    assert diff(expected, views) == []
    for s in views.flow_stats.values():
        assert s["consumed"] == s["applied"] + s["duplicates"] + s["dead_lettered"] + s["ignored"]

    assert_outputs_agree(broker, names, views)


def test_two_workers_give_the_same_views(broker, world, tmp_path):
    names, config = world
    cfg = gen_config(names, 800, seed=22)
    produce(cfg, broker.bootstrap, create_topics=False)
    views_path = tmp_path / "views.duckdb"
    run_until_caught_up(broker, config, views_path, "-w", "2")
    assert diff(reference_for(names, cfg), load_views(views_path)) == []


def _wait_for(predicate, timeout=60.0, every=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_missing_topic_is_one_clear_line_and_exit_1(broker, tmp_path):
    """A run with no input topic at all is a mistake, live or bounded: one line, exit 1."""
    config = tmp_path / "sferp.toml"
    missing = {role: f"no.such.{role}.{os.getpid()}" for role in ROLES}
    config.write_text("[topics]\n" + "".join(f'{r} = "{t}"\n' for r, t in missing.items()))
    for extra in ((), ("--until-caught-up",)):
        proc = sferp_run(broker, config, tmp_path / "v.duckdb", *extra, timeout=120)
        assert proc.returncode == 1, extra
        lines = [x for x in proc.stderr.splitlines() if x.startswith("sferp")]
        assert len(lines) == 1 and "no.such.sf_cdc" in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr


def test_bounded_run_reads_the_topics_that_exist(broker, topics, tmp_path):
    """--until-caught-up reads every partition up to its end: a topic that does not
    exist has none, so the run warns and reads the others."""
    names = topics({"sf_cdc": 3}) | {r: f"no.such.{r}.{os.getpid()}" for r in ROLES[1:]}
    cfg = gen_config(names, 60, seed=5)
    sf_only = [m for m in generated_messages(cfg) if m.topic == names["sf_cdc"]]
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for m in sf_only:
        producer.send(m.topic, key=m.key, value=m.value, partition=m.partition)
    producer.flush()
    producer.close()
    config = tmp_path / "sferp.toml"
    config.write_text("[topics]\n" + "".join(f'{r} = "{names[r]}"\n' for r in ROLES))
    views_path = tmp_path / "v.duckdb"
    proc = sferp_run(broker, config, views_path, "--until-caught-up")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for role in ROLES[1:]:
        assert f"topic '{names[role]}' does not exist" in proc.stderr
    views = load_views(views_path)
    ref = compute(sf_only, ReferenceConfig(topics={names["sf_cdc"]: "salesforce"}))
    assert not diff(ref, views)
    assert views.flow_stats[names["sf_cdc"]]["consumed"] == len(sf_only)
    for role in ROLES[1:]:  # one row per input topic, as ever: nothing read
        assert not any(views.flow_stats.get(names[role], {}).values())


def test_a_run_that_reads_nothing_leaves_a_views_file_of_nothing(broker, world, tmp_path):
    """CONTRACT §3.1: flow_stats has a row per input topic. The writer opens its file with
    the first message, so empty topics left no file, and a run from the end of the
    topics (`--start latest`, no recovery state) left the previous run's rows."""
    names, config = world
    views_path = tmp_path / "v.duckdb"
    run_until_caught_up(broker, config, views_path)  # empty topics
    rows = query_rows(views_path, "SELECT * FROM flow_stats ORDER BY topic")
    assert rows == [
        dict(
            topic=names[r], consumed=0, applied=0, duplicates=0, late=0, dead_lettered=0, ignored=0
        )
        for r in sorted(ROLES, key=lambda r: names[r])
    ]
    produce(gen_config(names, 30, seed=8), broker.bootstrap, create_topics=False)
    run_until_caught_up(broker, config, views_path)
    assert query_rows(views_path, "SELECT count(*) AS n FROM records")[0]["n"] > 0
    run_until_caught_up(broker, config, views_path, "--start", "latest")
    assert query_rows(views_path, "SELECT count(*) AS n FROM records")[0]["n"] == 0
    stats = query_rows(views_path, "SELECT sum(consumed) AS n, count(*) AS topics FROM flow_stats")
    assert stats == [{"n": 0, "topics": len(ROLES)}]


def test_a_resume_refuses_the_files_of_another_run(broker, world, tmp_path):
    """Both runs count snapshots alike, so another run's views file (or Kafka mirror) held
    the snapshot the store names: it was rolled back to it silently, and the resumed run
    went on with another world's views (exit 0)."""
    import shutil

    from sferp.connectors.kafka_outputs import mirror_path

    names, config = world
    produce(gen_config(names, 30, seed=9), broker.bootstrap, create_topics=False)
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        run_until_caught_up(broker, config, run / "v.duckdb", "--recovery-dir", str(run / "r"))
    # Another run's views file at this run's path: refused, and the file is not touched.
    shutil.copy(b / "v.duckdb", tmp_path / "b-copy.duckdb")
    r = sferp_run(
        broker, config, tmp_path / "b-copy.duckdb", "--until-caught-up", "--recovery-dir", a / "r"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "was not written by the run whose recovery store is" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "panicked" not in r.stderr and last.startswith(
        "sferp run: configuration error: views.path"
    )
    # Another run's Kafka mirror beside this run's views file: refused too.
    shutil.copy(mirror_path(str(b / "v.duckdb")), mirror_path(str(a / "v.duckdb")))
    r = sferp_run(broker, config, a / "v.duckdb", "--until-caught-up", "--recovery-dir", a / "r")
    assert r.returncode == 2 and "the Kafka mirror" in r.stderr, r.stderr[-2000:]
    # A missing views file with a store that resumes it: said before the flow starts.
    r = sferp_run(
        broker, config, tmp_path / "gone.duckdb", "--until-caught-up", "--recovery-dir", b / "r"
    )
    assert r.returncode == 2 and "does not exist, but the recovery store" in r.stderr
    # A damaged one: said in one line too (it was a Rust panic, then the error).
    (tmp_path / "garbage.duckdb").write_bytes(b"not a database" * 1000)
    r = sferp_run(
        broker, config, tmp_path / "garbage.duckdb", "--until-caught-up", "--recovery-dir", b / "r"
    )
    assert r.returncode == 2 and "cannot be read as a views file" in r.stderr, r.stderr[-2000:]
    assert "panicked" not in r.stderr
    # Another output topic under the same store: it would get only the rows that change.
    moved = tmp_path / "moved.toml"
    moved.write_text(config.read_text().replace(names["out_orders"], names["out_orders"] + ".v2"))
    r = sferp_run(broker, moved, b / "v.duckdb", "--until-caught-up", "--recovery-dir", b / "r")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"topics.out_orders: '{names['out_orders']}.v2', but the recovery store" in r.stderr
    run_until_caught_up(broker, config, b / "v.duckdb", "--recovery-dir", str(b / "r"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_starting_is_a_clean_exit(world, tmp_path, sig):
    """Before the flow's own handler, SIGTERM killed the run (exit -15, no word) and SIGINT
    gave exit 130, or exit 1 with "Query interrupted" from inside DuckDB. Here the start
    waits on a broker that accepts connections and never answers."""
    import socket

    _, config = world
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        bootstrap = f"127.0.0.1:{silent.getsockname()[1]}"
        cmd = [sys.executable, "-m", "sferp", "run", "--config", str(config)]
        cmd += ["--bootstrap", bootstrap, "--views", str(tmp_path / "v.duckdb")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        assert proc.poll() is None  # still starting
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert err.strip().splitlines()[-1] == f"sferp run: stopped by signal {int(sig)} while starting"
    assert "Traceback" not in err and "panicked" not in err


def test_a_second_run_on_the_same_files_waits_for_the_first_to_stop(broker, world, tmp_path):
    """A rolling update starts the new process before the old one stopped. With the same
    views file it waited 10 s on the file's lock, then stopped with exit 1; it waits on
    the recovery store's run lock instead, and goes on once the first run stopped."""
    names, config = world
    produce(gen_config(names, 20, seed=4), broker.bootstrap, create_topics=False)
    views, rec = tmp_path / "v.duckdb", str(tmp_path / "r")
    first = subprocess.Popen(
        [sys.executable, "-m", "sferp", "run", *run_args(broker, config, views)]
        + ["--recovery-dir", rec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for(lambda: query_rows(views, "SELECT 1 AS one") is not None)
        second = subprocess.Popen(
            [sys.executable, "-m", "sferp", "run", *run_args(broker, config, views)]
            + ["--recovery-dir", rec, "--until-caught-up"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(13)  # past the views file's 10 s lock wait
        assert second.poll() is None, second.communicate()[1][-2000:]
        stop_cleanly(first)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err[-2000:]
        assert "another run holds" in err
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_a_cluster_process_waiting_for_its_peer_stops_on_sigterm(broker, world, tmp_path):
    """Bytewax holds the main thread while the cluster connects, so the flow's handler
    cannot run: before, only SIGKILL stopped a process whose peer never came."""
    from clusterkit import free_port

    _, config = world
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "sferp", "run", *run_args(broker, config, tmp_path / "v.duckdb")]
    proc = subprocess.Popen(
        [*cmd, "-i", "0", "-a", addresses],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, SFERP_METRICS__PORT="0"),
    )
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while "waiting for the other processes of the cluster" not in seen:
            assert proc.poll() is None and time.monotonic() < deadline, seen
            seen += proc.stderr.readline()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, seen + err
    assert "before the other processes of the cluster (127.0.0.1:" in err, seen + err


def test_live_run_is_queryable_and_stops_cleanly_on_ctrl_c(broker, world, tmp_path):
    names, config = world
    views_path = tmp_path / "views.duckdb"
    first = gen_config(names, 300, seed=23)
    produce(first, broker.bootstrap, create_topics=False)
    env = dict(os.environ, SFERP_FLOW__SNAPSHOT_INTERVAL_S="1")
    with live_sferp_run(broker, config, views_path, env=env, start_new_session=True) as proc:

        def consumed():
            rows = query_rows(views_path, "SELECT sum(consumed) AS n FROM flow_stats")
            n = rows[0]["n"] if rows else None
            return int(n) if n else None

        n_first = len(generated_messages(first))
        assert _wait_for(lambda: (consumed() or 0) >= n_first and consumed()) == n_first
        # more traffic arrives while it runs: the query sees progress
        second = gen_config(names, 200, seed=24, bad=0.0)
        n_second = sum(produce(second, broker.bootstrap, create_topics=False).values())
        total = _wait_for(lambda: (consumed() or 0) >= n_first + n_second and consumed())
        assert total == n_first + n_second
        stop_cleanly(proc, ctrl_c=True)
    views = load_views(views_path)
    assert sum(s["consumed"] for s in views.flow_stats.values()) == n_first + n_second
    assert views.order_status and views.records
    # records still waiting for the live emit interval went out at the stop
    assert_outputs_agree(broker, names, views)
    assert not Path(f"{views_path}.endpoint").exists()


def test_a_live_flow_whose_input_ends_emits_the_records_still_waiting(broker, world, tmp_path):
    """Live, reconciled records wait up to the emit interval; when the input ends they
    go out at once (the flow ends well within one interval here)."""
    from bytewax._bytewax import cli_main
    from bytewax.testing import TestingSource
    from sferp.flows.reconcile import FlowOptions, build_flow

    from sferp.config import load_settings

    names, _ = world
    msgs = generated_messages(gen_config(names, 40, seed=25, bad=0.05))
    env = {"SFERP_KAFKA__BOOTSTRAP": broker.bootstrap} | {
        f"SFERP_TOPICS__{role.upper()}": name for role, name in names.items()
    }
    views_path = tmp_path / "views.duckdb"
    flow = build_flow(
        load_settings(environ=env),
        FlowOptions(
            bounded=False,
            views_path=str(views_path),
            source=TestingSource([msgs[i : i + 100] for i in range(0, len(msgs), 100)]),
        ),
    )
    cli_main(flow, workers_per_process=1)
    views = load_views(views_path)
    assert views.order_status and views.dead_letters
    assert_outputs_agree(broker, names, views)


def test_a_live_run_reads_the_topics_that_exist_and_says_it_is_not_ready(broker, topics, tmp_path):
    """A topic created after the start is read only after a restart: until then the
    process stays not ready (/readyz, SferpNotReady), and it serves what exists."""
    from clusterkit import free_port

    names = topics({"sf_cdc": 3}) | {r: f"no.such.{r}.{os.getpid()}" for r in ROLES[1:]}
    sf_only = [m for m in generated_messages(gen_config(names, 40, seed=8))
               if m.topic == names["sf_cdc"]]  # fmt: skip
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for m in sf_only:
        producer.send(m.topic, key=m.key, value=m.value, partition=m.partition)
    producer.flush()
    producer.close()
    port = free_port()
    config = tmp_path / "sferp.toml"
    config.write_text(
        "[topics]\n"
        + "".join(f'{r} = "{names[r]}"\n' for r in ROLES)
        + f"[metrics]\nport = {port}\n"
    )
    views_path = tmp_path / "views.duckdb"
    with live_sferp_run(broker, config, views_path) as proc:
        query = "SELECT consumed FROM flow_stats WHERE topic = '" + names["sf_cdc"] + "'"

        def consumed():
            rows = query_rows(views_path, query)
            return rows[0]["consumed"] if rows else None

        assert _wait_for(lambda: consumed() == len(sf_only))
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        reason = answer.value.read().decode()
        assert answer.value.code == 503 and "not read until sferp restarts" in reason
        assert all(names[r] in reason for r in ROLES[1:]), reason
        err = stop_cleanly(proc)
    for role in ROLES[1:]:
        assert f"topic '{names[role]}' does not exist" in err


def test_files_with_the_flows_data_are_private(broker, world, tmp_path):
    """Views, recovery store and their folders are readable by the service's user only,
    whatever the umask sferp was started with."""
    names, config = world
    produce(gen_config(names, 40, seed=3), broker.bootstrap, create_topics=False)
    data = tmp_path / "data"
    r = sferp_run(
        broker,
        config,
        data / "views.duckdb",
        "--recovery-dir",
        str(data / "recovery"),
        "--until-caught-up",
        preexec_fn=lambda: os.umask(0o022),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    paths = [data, *data.rglob("*")]
    assert len(paths) > 3
    for path in paths:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path}: {oct(mode)}"


def test_ctrl_c_during_the_demo_is_exit_130_without_a_panic(tmp_path):
    """The demo's flow stops as `sferp run` does; before, a KeyboardInterrupt raised
    inside the flow ended it in a Rust panic and exit 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sferp", "demo", "--orders", "15000"],  # a flow of seconds
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        seen = ""
        while "erp truncate" not in seen:  # logged by the running flow, early on
            line = proc.stderr.readline()
            assert line, seen
            seen += line
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "panicked" not in err and "Traceback" not in err, err[-3000:]
    assert "interrupted" in err  # stopped inside the flow, by its own handler
