"""The embedded broker: start, topics, produce/consume, clean stops, clear errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from sferp.broker import BrokerError, BrokerNotFound, EmbeddedBroker


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _gone(pid: int) -> bool:
    """True when the process no longer exists (or is only a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _consume_all(bootstrap: str, topic: str, partitions: int, expected: int) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got: list = []
        deadline = time.monotonic() + 10
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
        return got
    finally:
        consumer.close()


def test_session_broker_produces_and_consumes(broker, topics):
    names = topics({"roundtrip": 2})
    topic = names["roundtrip"]
    assert topic.startswith("roundtrip.") and topic != "roundtrip."
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    sent = [
        producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=i % 2)
        for i in range(20)
    ]
    producer.flush()
    producer.close()
    assert all(f.succeeded() for f in sent)

    got = _consume_all(broker.bootstrap, topic, 2, 20)
    assert sorted((r.partition, r.key, r.value) for r in got) == sorted(
        (i % 2, f"k{i}".encode(), f"v{i}".encode()) for i in range(20)
    )


def test_topics_factory_names_are_unique_and_partitioned(broker, topics):
    a = topics({"sf.cdc": 3, "erp.public.items": 1})
    b = topics({"sf.cdc": 3})
    assert a["sf.cdc"] != b["sf.cdc"]
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    try:
        assert consumer.partitions_for_topic(a["sf.cdc"]) == {0, 1, 2}
        assert consumer.partitions_for_topic(a["erp.public.items"]) == {0}
    finally:
        consumer.close()


def test_create_topics_is_idempotent(broker, topics):
    name = topics({"idem": 2})["idem"]
    broker.create_topics({name: 2})  # exists: fine
    broker.create_topics({name: 2, name + ".new": 1})  # a mix of old and new
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    try:
        assert consumer.partitions_for_topic(name) == {0, 1}
        assert consumer.partitions_for_topic(name + ".new") == {0}
    finally:
        consumer.close()
    with pytest.raises(ValueError):
        broker.create_topics({"bad": 0})


def test_stop_ends_the_process_and_closes_the_port():
    with EmbeddedBroker() as b:
        pid, port = b.pid, b.port
        assert b.is_running() and _accepts(port)
        assert b.bootstrap == f"127.0.0.1:{port}"
        b.create_topics({"t": 1})
    assert not b.is_running()
    assert _gone(pid)
    assert not _accepts(port)
    b.stop()  # twice is fine


def test_process_is_stopped_when_the_block_raises():
    b = EmbeddedBroker()
    with pytest.raises(ZeroDivisionError), b:
        pid = b.pid
        1 / 0  # noqa: B018
    assert _gone(pid)


def test_bootstrap_unknown_before_start():
    with pytest.raises(BrokerError, match="not been started"):
        _ = EmbeddedBroker().bootstrap
    assert EmbeddedBroker(port=45678).bootstrap == "127.0.0.1:45678"


def test_broker_not_found(monkeypatch, tmp_path):
    fake = tmp_path / "tansu"
    fake.write_text("not a program")
    fake.chmod(0o644)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    with pytest.raises(BrokerNotFound) as info:
        EmbeddedBroker().start()
    message = str(info.value)
    assert "\n" not in message
    assert "CALF_TANSU_BIN" in message and "not found" in message


def test_start_failure_reports_log_tail(monkeypatch, tmp_path):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'storage engine exploded' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    started = time.monotonic()
    with pytest.raises(BrokerError) as info:
        EmbeddedBroker().start()
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "\n" not in message
    assert "code 3" in message and "storage engine exploded" in message


def test_port_in_use_is_a_clear_error(broker):
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_foreground_stops_cleanly_on_signal(sig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"import sys; from sferp.broker import run_foreground; sys.exit(run_foreground({port}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line
        consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}", enable_auto_commit=False)
        consumer.topics()  # the broker answers metadata
        consumer.close()
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not _accepts(port)  # the broker went with it


def test_run_foreground_port_taken_exits_1(broker):
    code = (
        "import sys; from sferp.broker import run_foreground; "
        f"sys.exit(run_foreground({broker.port}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "already in use" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_broker_that_took_the_port_first_is_never_adopted(broker, monkeypatch, tmp_path):
    """Another process can bind the chosen port between the check and the spawn (two
    test runs on one machine): the readiness probe then reaches that broker. It must
    not count as ours (its pid is not ours: stopping "our" broker would stop nothing);
    the start tries another port."""
    import sferp.broker as mod

    # Our broker starts slowly (a loaded machine): the probe reaches the other one
    # while ours is still alive, before it fails on the taken port.
    real_bin = mod._broker_bin()
    slow = tmp_path / "slow-broker"
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec "{real_bin}" "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setattr(mod, "_broker_bin", lambda: str(slow))
    taken = broker.port
    real_free_port = mod._free_port
    offered: list[int] = []

    def free_port() -> int:
        port = taken if not offered else real_free_port()
        offered.append(port)
        return port

    monkeypatch.setattr(mod, "_free_port", free_port)
    monkeypatch.setattr(mod, "_port_taken", lambda port: False)  # the race: free when checked
    with EmbeddedBroker() as own:
        assert offered[0] == taken and len(offered) == 2
        assert own.port != taken
        consumer = KafkaConsumer(bootstrap_servers=own.bootstrap)
        try:
            consumer.topics()
            assert consumer._client.cluster.cluster_id == own._cluster_id
        finally:
            consumer.close()
        os.kill(own.pid, signal.SIGSTOP)  # the pid is the process that serves the port
        try:
            with pytest.raises(OSError):
                with socket.create_connection(("127.0.0.1", own.port), timeout=1) as s:
                    s.settimeout(1)
                    s.sendall(b"\\x00\\x00\\x00\\x01\\x00")
                    s.recv(1)  # a stopped broker answers nothing
        finally:
            os.kill(own.pid, signal.SIGCONT)
    assert broker.is_running()  # the other broker was left alone
