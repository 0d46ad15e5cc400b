"""KafkaSource and KafkaSink against the embedded broker, in real Bytewax runs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from sferp.connectors.kafka import (
    KafkaConnectorError,
    KafkaSink,
    KafkaSource,
    end_offsets,
    list_partitions,
    read_positions,
    unread_topics,
)

from sferp.broker import EmbeddedBroker
from sferp.events import RawMessage


def produce(bootstrap, topic, items, *, linger_ms=20):
    """Send (partition, key, value) items; returns {(partition, offset): (key, value)}."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms)
    try:
        futures = [(producer.send(topic, key=k, value=v, partition=p), k, v) for p, k, v in items]
        producer.flush()
        out = {}
        for f, k, v in futures:
            md = f.get(timeout=10)
            out[(md.partition, md.offset)] = (k, v)
        return out
    finally:
        producer.close()


def produce_one_by_one(bootstrap, topic, partition, values):
    """One record batch per message, so Tansu's reported end offsets are exact."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    try:
        return [producer.send(topic, value=v, partition=partition).get(10).offset for v in values]
    finally:
        producer.close()


def run_source(source, **kwargs):
    out: list = []
    flow = Dataflow("read")
    op.output("out", op.input("in", flow, source), TestingSink(out))
    run_main(flow, **kwargs)
    return out


def flatten(batches):
    assert all(isinstance(b, list) and b for b in batches), "emits non-empty lists"
    return [m for b in batches for m in b]


def drain(part, timeout_s=10.0):
    """Call next_batch until StopIteration; returns all messages."""
    got = []
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "partition did not end"
        try:
            for batch in part.next_batch():
                got.extend(batch)
        except StopIteration:
            return got


def poll_until(part, n, timeout_s=10.0):
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} messages"
        for batch in part.next_batch():
            got.extend(batch)
    return got


def unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- KafkaSource -------------------------------------------------------------


def test_bounded_reads_exactly_what_was_there_at_start(broker, topics):
    names = topics({"a": 3, "b": 1})
    a, b = names["a"], names["b"]
    # Partition 0: many records in few batches (Tansu reports the end as the
    # last batch's base + 1); partition 1: one record; partition 2: empty.
    items = [(0, f"k{i}".encode(), f"v{i}".encode()) for i in range(3000)]
    items += [(0, b"tomb", None), (0, None, b"no key"), (1, b"one", b"only")]
    sent_a = produce(broker.bootstrap, a, items)
    sent_b = produce(broker.bootstrap, b, [(0, b"x", b"y")])

    before = time.time() * 1000
    batches = run_source(KafkaSource(broker.bootstrap, [a, b], bounded=True, batch_size=500))
    msgs = flatten(batches)
    assert max(len(batch) for batch in batches) <= 500

    assert all(isinstance(m, RawMessage) for m in msgs)
    got_a = {(m.partition, m.offset): (m.key, m.value) for m in msgs if m.topic == a}
    got_b = {(m.partition, m.offset): (m.key, m.value) for m in msgs if m.topic == b}
    assert len(msgs) == len(sent_a) + len(sent_b)  # no duplicates
    assert got_a == sent_a
    assert got_b == sent_b
    for part in (0, 1):
        offsets = [m.offset for m in msgs if m.topic == a and m.partition == part]
        assert offsets == sorted(offsets)
    assert all(0 < m.timestamp_ms <= before + 1000 for m in msgs)


def test_bounded_ends_while_producers_keep_writing(broker, topics):
    topic = topics({"busy": 2})["busy"]
    before = produce(broker.bootstrap, topic, [(i % 2, None, b"pre") for i in range(200)])
    halt = threading.Event()

    def keep_writing():
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=1)
        i = 0
        while not halt.is_set():
            producer.send(topic, value=b"during-%d" % i, partition=i % 2)
            i += 1
            time.sleep(0.001)
        producer.close()

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        msgs = flatten(run_source(KafkaSource(broker.bootstrap, [topic], bounded=True)))
        elapsed = time.monotonic() - started
    finally:
        halt.set()
        writer.join()
    assert elapsed < 10
    # Everything there at start, then possibly some of what arrived while it
    # caught up: per partition a gap-free prefix of the log.
    assert set(before) <= {(m.partition, m.offset) for m in msgs}
    for part in (0, 1):
        offsets = [m.offset for m in msgs if m.partition == part]
        assert offsets == list(range(len(offsets)))


def test_bounded_with_two_workers(broker, topics):
    topic = topics({"multi": 4})["multi"]
    sent = produce(broker.bootstrap, topic, [(i % 4, None, b"%d" % i) for i in range(400)])
    out: list = []
    flow = Dataflow("two_workers")
    op.output(
        "out",
        op.input("in", flow, KafkaSource(broker.bootstrap, [topic], bounded=True)),
        TestingSink(out),
    )
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    msgs = flatten(out)
    assert {(m.partition, m.offset): (m.key, m.value) for m in msgs} == sent
    assert len(msgs) == len(sent)


def test_partition_names_and_helpers(broker, topics):
    names = topics({"x": 2, "y": 1})
    x, y = names["x"], names["y"]
    produce_one_by_one(broker.bootstrap, x, 1, [b"a", b"b", b"c"])
    source = KafkaSource(broker.bootstrap, [x, y])
    assert sorted(source.list_parts()) == sorted([f"{x}#0", f"{x}#1", f"{y}#0"])
    assert list_partitions(broker.bootstrap, [y, x]) == [(y, 0), (x, 0), (x, 1)]
    assert end_offsets(broker.bootstrap, [x, y]) == {(x, 0): 0, (x, 1): 3, (y, 0): 0}

    part = source.build_part("s", f"{x}#1", None)
    poll_until(part, 3)
    assert read_positions()[(x, 1)] == 3
    part.close()


def test_resume_from_snapshot_is_exact(broker, topics):
    topic = topics({"resume": 1})["resume"]
    sent = produce(broker.bootstrap, topic, [(0, None, b"%d" % i) for i in range(100)])
    source = KafkaSource(broker.bootstrap, [topic], batch_size=30)
    name = f"{topic}#0"

    part = source.build_part("s", name, None)
    assert part.snapshot() == 0  # the start offset is concrete before any read
    first = poll_until(part, 1)
    assert len(first) <= 30
    snap = part.snapshot()
    assert snap == first[-1].offset + 1  # the NEXT offset to read
    part.close()

    resumed = source.build_part("s", name, snap)
    assert resumed.snapshot() == snap
    rest = poll_until(resumed, 100 - snap)
    resumed.close()
    assert [m.offset for m in first + rest] == list(range(100))
    assert [m.value for m in first + rest] == [sent[(0, i)][1] for i in range(100)]


def test_bounded_resume_inside_the_last_batch(broker, topics):
    # The 50 records land in one record batch; Tansu reports end = 1, so a resume
    # at 45 is "past the end" and must still read 45..49 before ending.
    topic = topics({"midbatch": 1})["midbatch"]
    produce(broker.bootstrap, topic, [(0, None, b"%d" % i) for i in range(50)], linger_ms=200)
    source = KafkaSource(broker.bootstrap, [topic], bounded=True)
    part = source.build_part("s", f"{topic}#0", 45)
    got = drain(part)
    assert [m.offset for m in got] == [45, 46, 47, 48, 49]
    assert part.snapshot() == 50
    part.close()

    done = source.build_part("s", f"{topic}#0", 50)
    assert drain(done) == []
    done.close()


def test_bounded_runs_resume_through_bytewax_recovery(broker, topics, tmp_path):
    topic = topics({"recov": 2})["recov"]
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    produce(broker.bootstrap, topic, [(i % 2, None, b"first-%d" % i) for i in range(60)])
    first = flatten(
        run_source(KafkaSource(broker.bootstrap, [topic], bounded=True), recovery_config=recovery)
    )
    produce(broker.bootstrap, topic, [(i % 2, None, b"second-%d" % i) for i in range(20)])
    second = flatten(
        run_source(KafkaSource(broker.bootstrap, [topic], bounded=True), recovery_config=recovery)
    )
    assert sorted(m.value for m in first) == sorted(b"first-%d" % i for i in range(60))
    assert sorted(m.value for m in second) == sorted(b"second-%d" % i for i in range(20))


def test_start_latest_skips_history(broker, topics):
    topic = topics({"latest": 1})["latest"]
    produce_one_by_one(broker.bootstrap, topic, 0, [b"old-1", b"old-2", b"old-3"])
    source = KafkaSource(broker.bootstrap, [topic], start="latest")
    part = source.build_part("s", f"{topic}#0", None)
    assert part.snapshot() == 3
    produce_one_by_one(broker.bootstrap, topic, 0, [b"new-1", b"new-2"])
    got = poll_until(part, 2)
    part.close()
    assert [(m.offset, m.value) for m in got] == [(3, b"new-1"), (4, b"new-2")]

    bounded = KafkaSource(broker.bootstrap, [topic], start="latest", bounded=True)
    assert flatten(run_source(bounded)) == []


def test_start_latest_skips_history_sent_in_one_batch(broker, topics):
    """The embedded broker reports the end of a partition inside its last record
    batch (DESIGN.md); the records of that batch are history all the same."""
    topic = topics({"latest": 1})["latest"]
    old = produce(broker.bootstrap, topic, [(0, None, b"old-%d" % i) for i in range(50)],
                  linger_ms=200)  # fmt: skip
    assert max(off for _, off in old) == 49
    source = KafkaSource(broker.bootstrap, [topic], start="latest")
    part = source.build_part("s", f"{topic}#0", None)
    produce_one_by_one(broker.bootstrap, topic, 0, [b"new-1", b"new-2"])
    got = poll_until(part, 2)
    part.close()
    assert [(m.offset, m.value) for m in got] == [(50, b"new-1"), (51, b"new-2")]
    produce(broker.bootstrap, topic, [(0, None, b"more-%d" % i) for i in range(30)], linger_ms=200)
    bounded = KafkaSource(broker.bootstrap, [topic], start="latest", bounded=True)
    assert flatten(run_source(bounded)) == []
    # A resumed partition reads on from its offset, inside a batch too.
    resumed = KafkaSource(broker.bootstrap, [topic], bounded=True).build_part("s", f"{topic}#0", 60)
    rest = poll_until(resumed, 22)
    resumed.close()
    assert [m.value for m in rest] == [b"more-%d" % i for i in range(8, 30)]


def test_missing_topics_are_recorded_and_none_at_all_is_a_clear_error(broker, topics):
    existing = topics({"here": 2})["here"]
    source = KafkaSource(broker.bootstrap, [existing, "no.such.topic"])
    assert source.list_parts() == [f"{existing}#0", f"{existing}#1"]
    assert unread_topics() == {"no.such.topic"}  # the process reports not ready (metrics)
    assert KafkaSource(broker.bootstrap, [existing]).list_parts() and unread_topics() == set()
    with pytest.raises(KafkaConnectorError) as info:
        KafkaSource(broker.bootstrap, ["no.such.topic", "nor.this.one"]).list_parts()
    message = str(info.value)
    assert "no.such.topic" in message and broker.bootstrap in message and "\n" not in message
    # In a dataflow, Bytewax wraps it; the cause chain keeps our error.
    with pytest.raises(Exception) as info:
        run_source(KafkaSource(broker.bootstrap, ["no.such.topic"], bounded=True))
    causes = []
    exc: BaseException | None = info.value
    while exc is not None:
        causes.append(exc)
        exc = exc.__cause__
    assert any(isinstance(e, KafkaConnectorError) and "no.such.topic" in str(e) for e in causes)


def test_unreachable_broker_is_a_clear_error_within_seconds():
    bootstrap = f"127.0.0.1:{unused_port()}"
    started = time.monotonic()
    with pytest.raises(KafkaConnectorError) as info:
        KafkaSource(bootstrap, ["t"]).list_parts()
    assert time.monotonic() - started < 10
    assert bootstrap in str(info.value) and "\n" not in str(info.value)


def test_invalid_arguments():
    with pytest.raises(TypeError):
        KafkaSource("b:1", "topic")
    with pytest.raises(ValueError):
        KafkaSource("b:1", [])
    with pytest.raises(ValueError):
        KafkaSource("b:1", ["t"], start="middle")
    with pytest.raises(ValueError):
        KafkaSource("b:1", ["t"], batch_size=0)
    with pytest.raises(KafkaConnectorError, match="no_such_setting"):
        KafkaSource("b:1", ["t"], client_config={"no_such_setting": 1})
    with pytest.raises(KafkaConnectorError, match="fetch_max_bytes"):  # a consumer setting
        KafkaSink("b:1", producer_config={"fetch_max_bytes": 1})


def test_client_config_reaches_the_client(broker, topics):
    topic = topics({"cfg": 1})["cfg"]
    ok = KafkaSource(broker.bootstrap, [topic], client_config={"client_id": "sferp-test"})
    assert ok.list_parts() == [f"{topic}#0"]
    # TLS against the plaintext listener stalls inside kafka-python (no timeout
    # covers the handshake); it must still end as a clear error, in bounded time.
    tls = KafkaSource(
        broker.bootstrap,
        [topic],
        client_config={
            "security_protocol": "SSL",
            "bootstrap_timeout_ms": 1000,
            "request_timeout_ms": 1000,
        },
    )
    started = time.monotonic()
    with pytest.raises(KafkaConnectorError, match=broker.bootstrap) as info:
        tls.list_parts()
    assert time.monotonic() - started < 8
    assert "security_protocol" in str(info.value)


def test_stop_event_ends_an_unbounded_flow(broker, topics):
    topic = topics({"live": 3})["live"]
    sent = produce(broker.bootstrap, topic, [(i % 3, None, b"%d" % i) for i in range(300)])
    stop = threading.Event()
    seen: list = []

    class StopWhenAllSeen(StatelessSinkPartition):
        def write_batch(self, items):
            for batch in items:
                seen.extend(batch)
            if len(seen) >= len(sent):
                stop.set()

    class Sink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):
            return StopWhenAllSeen()

    flow = Dataflow("live")
    src = KafkaSource(broker.bootstrap, [topic], stop_event=stop)
    op.output("out", op.input("in", flow, src), Sink())
    safety = threading.Timer(20, stop.set)  # never hang the suite
    safety.start()
    try:
        started = time.monotonic()
        run_main(flow)
        elapsed = time.monotonic() - started
    finally:
        safety.cancel()
    assert elapsed < 15
    assert {(m.partition, m.offset) for m in seen} == set(sent)


def test_idle_source_does_not_spin(broker, topics):
    topic = topics({"idle": 8})["idle"]
    stop = threading.Event()
    out: list = []
    flow = Dataflow("idle")
    op.output(
        "out",
        op.input("in", flow, KafkaSource(broker.bootstrap, [topic], stop_event=stop)),
        TestingSink(out),
    )
    timer = threading.Timer(2.0, stop.set)
    timer.start()
    cpu = time.process_time()
    run_main(flow)
    cpu = time.process_time() - cpu
    assert out == []
    assert cpu < 1.0, f"8 idle partitions used {cpu:.2f} s of CPU in 2 s"


# -- KafkaSink -----------------------------------------------------------------


def read_all(bootstrap, topic, partitions, expected):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
        return got
    finally:
        consumer.close()


@pytest.mark.parametrize("own_process", [False, True])
def test_sink_writes_keys_values_and_tombstones(broker, topics, own_process):
    names = topics({"out.a": 3, "out.b": 1})
    a, b = names["out.a"], names["out.b"]
    items = [(a, b"sku-%d" % (i % 7), b'{"v":%d}' % i) for i in range(50)]
    items += [(a, b"sku-3", None), (b, b"kind:key", b"{}"), (b, b"kind:key", None)]
    flow = Dataflow("write")
    op.output(
        "out",
        op.input("in", flow, TestingSource(items, batch_size=8)),
        KafkaSink(broker.bootstrap, own_process=own_process),
    )
    run_main(flow)

    got_a = read_all(broker.bootstrap, a, 3, 51)
    got_b = read_all(broker.bootstrap, b, 1, 2)
    assert len(got_a) == 51 and len(got_b) == 2
    # Keyed: all versions of a key in one partition, in the order written, so
    # compaction keeps the latest (here the tombstone for sku-3).
    for key in {k for _, k, _ in items if _ == a}:
        versions = sorted((r for r in got_a if r.key == key), key=lambda r: r.offset)
        assert len({r.partition for r in versions}) == 1
        assert [r.value for r in versions] == [v for t, k, v in items if t == a and k == key]
    assert [(r.key, r.value) for r in got_b] == [(b"kind:key", b"{}"), (b"kind:key", None)]


@pytest.mark.parametrize("own_process", [False, True])
def test_sink_raises_when_the_broker_is_gone(own_process):
    with EmbeddedBroker() as own:
        own.create_topics({"t": 1})
        part = KafkaSink(
            own.bootstrap,
            producer_config={
                "max_block_ms": 1000,
                "request_timeout_ms": 500,
                "delivery_timeout_ms": 1500,
            },
            own_process=own_process,
        ).build("out", 0, 1)
        part.write_batch([("t", b"k", b"v")])  # works while the broker is up
        own.stop()
        started = time.monotonic()
        with pytest.raises(KafkaConnectorError) as info:
            part.write_batch([("t", b"k", b"v2")])
        assert time.monotonic() - started < 10
        assert own.bootstrap in str(info.value)


@pytest.mark.parametrize("own_process", [False, True])
def test_sink_raises_when_deliveries_time_out(own_process):
    # A stalled broker (SIGSTOP): sends are accepted, deliveries then fail.
    with EmbeddedBroker() as own:
        own.create_topics({"t": 1})
        part = KafkaSink(
            own.bootstrap,
            producer_config={
                "max_block_ms": 1000,
                "request_timeout_ms": 500,
                "delivery_timeout_ms": 1500,
                "linger_ms": 0,
            },
            own_process=own_process,
        ).build("out", 0, 1)
        part.write_batch([("t", b"k", b"v")])
        os.kill(own.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(KafkaConnectorError, match="not delivered|Timeout"):
                part.write_batch([("t", b"k", b"v%d" % i) for i in range(3)])
            assert time.monotonic() - started < 10
        finally:
            os.kill(own.pid, signal.SIGCONT)
        with contextlib.suppress(KafkaConnectorError):
            part.close()
        if not own_process:  # kafka-python's close may raise before stopping its I/O thread
            sender = part._producer._sender
            deadline = time.monotonic() + 5
            while sender.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not sender.is_alive(), "the producer's thread was stopped"


def test_producer_process_sends_without_waiting_and_flush_checks(broker, topics):
    t = topics({"t": 2})["t"]
    part = KafkaSink(broker.bootstrap, own_process=True).build("out", 0, 1)
    try:
        for i in range(20):
            part.send([(t, b"k%d" % (j % 5), b"%d" % (i * 100 + j)) for j in range(100)])
        part.flush()
        got = read_all(broker.bootstrap, t, 2, 2000)
        assert len(got) == 2000
        for k in range(5):  # per key: the order sent
            mine = sorted((r for r in got if r.key == b"k%d" % k), key=lambda r: r.offset)
            assert [int(r.value) for r in mine] == sorted(int(r.value) for r in mine)
        part.send([(t, b"k", b"x" * (3 << 20))])  # beyond max_request_size: fails in the child
        with pytest.raises(KafkaConnectorError, match="too large|MessageSizeTooLarge"):
            part.flush()
    finally:
        with contextlib.suppress(KafkaConnectorError):
            part.close()


def test_a_dead_producer_process_is_an_error_not_a_loss(broker, topics):
    t = topics({"t": 1})["t"]
    part = KafkaSink(broker.bootstrap, own_process=True).build("out", 0, 1)
    part.write_batch([(t, b"k", b"v")])
    part._proc.kill()
    part._proc.join(10)
    with pytest.raises(KafkaConnectorError, match="producer process"):
        part.write_batch([(t, b"k", b"v2")])
    with contextlib.suppress(KafkaConnectorError):
        part.close()


@pytest.mark.parametrize("own_process", [False, True])
def test_sink_connect_failure_is_clear(own_process):
    bootstrap = f"127.0.0.1:{unused_port()}"
    sink = KafkaSink(
        bootstrap, producer_config={"bootstrap_timeout_ms": 1000}, own_process=own_process
    )
    with pytest.raises(KafkaConnectorError, match=bootstrap):
        sink.build("out", 0, 1)


# -- throughput ----------------------------------------------------------------


class _CountingSink(DynamicSink):
    def __init__(self, counter):
        self.counter = counter

    def build(self, step_id, worker_index, worker_count):
        counter = self.counter

        class Part(StatelessSinkPartition):
            def write_batch(self, items):
                for batch in items:
                    counter[0] += len(batch)

        return Part()


def test_source_throughput_close_to_a_plain_consumer(broker, topics):
    """KafkaSource in Bytewax vs a bare kafka-python poll loop over the same data.

    SFERP_BENCH_MESSAGES=200000 pytest -s -k throughput  for the full measurement.
    """
    n = int(os.environ.get("SFERP_BENCH_MESSAGES", "20000"))
    topic = topics({"bench": 4})["bench"]
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, linger_ms=50, batch_size=512 * 1024
    )
    value = b"v" * 500
    for i in range(n):
        producer.send(topic, key=b"key-%d" % i, value=value, partition=i % 4)
    producer.flush()
    producer.close()

    def plain():
        consumer = KafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=4 << 20,
            max_poll_records=2000,
        )
        tps = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        count = 0
        while count < n:
            for records in consumer.poll(timeout_ms=100, max_records=2000).values():
                count += len(records)
        consumer.close()
        return count

    def source():
        counter = [0]
        flow = Dataflow("bench")
        src = KafkaSource(broker.bootstrap, [topic], bounded=True)
        op.output("out", op.input("in", flow, src), _CountingSink(counter))
        run_main(flow)
        return counter[0]

    rates = {}
    for name, fn in (("plain", plain), ("source", source)):
        best = 0.0
        for _ in range(2):
            started, cpu = time.perf_counter(), time.process_time()
            assert fn() == n
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            best = max(best, n / wall)
            rates[name + "_cpu"] = max(rates.get(name + "_cpu", 0.0), n / cpu)
        rates[name] = best
    print(
        f"\n{n} x 500 B: plain kafka-python {rates['plain']:,.0f} msg/s "
        f"({rates['plain_cpu']:,.0f}/CPU-s), KafkaSource in Bytewax {rates['source']:,.0f} msg/s "
        f"({rates['source_cpu']:,.0f}/CPU-s)"
    )
    assert rates["source"] >= 0.35 * rates["plain"]


@pytest.mark.parametrize("bounded", [True, False])
def test_a_stalled_consumer_is_replaced_and_reading_goes_on(broker, topics, caplog, bounded):
    """A consumer that stops fetching while records wait (the partition below the
    bounded end, or below the last fetch's high watermark) is replaced by a new
    one at the next offset: every record is read once, in order."""
    topic = topics({"stall": 1})["stall"]
    offsets = produce_one_by_one(broker.bootstrap, topic, 0, [b"%d" % i for i in range(120)])
    assert offsets == list(range(120))
    source = KafkaSource(broker.bootstrap, [topic], bounded=bounded, batch_size=40, stall_s=0.5)
    part = source.build_part("s", f"{topic}#0", None)
    first = poll_until(part, 1)
    assert len(first) <= 40
    # Wedge it as observed: still assigned, but no fetch brings anything any more.
    part._consumer.pause(TopicPartition(topic, 0))
    with caplog.at_level(logging.WARNING, logger="sferp.kafka"):
        rest = drain(part, 15) if bounded else poll_until(part, 120 - len(first), 15)
    part.close()
    assert part.reopened == 1
    assert "reading on with a new consumer" in caplog.text
    assert [m.offset for m in first + rest] == list(range(120))
    assert [m.value for m in first + rest] == [b"%d" % i for i in range(120)]


def test_a_caught_up_partition_keeps_its_consumer(broker, topics):
    """Nothing waits, so a long silence is no stall."""
    topic = topics({"quiet": 1})["quiet"]
    produce_one_by_one(broker.bootstrap, topic, 0, [b"a", b"b"])
    part = KafkaSource(broker.bootstrap, [topic], stall_s=0.2).build_part("s", f"{topic}#0", None)
    assert [m.value for m in poll_until(part, 2)] == [b"a", b"b"]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert part.next_batch() == []
        time.sleep(0.02)
    part.close()
    assert part.reopened == 0


# -- live linger ---------------------------------------------------------------


def test_live_linger_hands_partitions_over_together_at_slot_boundaries(broker, topics):
    """With a linger, each partition holds what it read until the next multiple of the
    linger on the wall clock: every partition releases right at a slot boundary (so
    they hand over together), every record once and in order, and a snapshot never
    counts records still held."""
    topic = topics({"linger": 3})["linger"]
    sent = produce(broker.bootstrap, topic, [(i % 3, None, b"%d" % i) for i in range(300)])
    linger_s = 1.0
    source = KafkaSource(broker.bootstrap, [topic], linger_ms=int(linger_s * 1000))
    parts = [source.build_part("s", f"{topic}#{p}", None) for p in range(3)]
    got: dict[int, list] = {0: [], 1: [], 2: []}
    released: list[float] = []
    held_snapshots = []
    while not 0.4 <= time.time() % linger_s <= 0.5:  # start in the middle of a slot
        time.sleep(0.005)
    start = time.time()
    deadline = time.monotonic() + 15
    while sum(len(v) for v in got.values()) < 300:
        assert time.monotonic() < deadline, "records were held too long"
        for p, part in enumerate(parts):
            for batch in part.next_batch():
                released.append(time.time())
                got[p].extend(batch)
            if part._pending:
                held_snapshots.append(part.snapshot() == (got[p][-1].offset + 1 if got[p] else 0))
        time.sleep(0.001)
    for part in parts:
        part.close()
    for p in range(3):
        assert [(m.partition, m.offset) for m in got[p]] == sorted(k for k in sent if k[0] == p)
    assert min(released) >= (start // linger_s + 1) * linger_s
    late = [round(t % linger_s, 3) for t in released if t % linger_s > 0.3]
    assert not late, f"released {late} s after a slot boundary"
    assert held_snapshots and all(held_snapshots)


def test_live_linger_releases_a_full_batch_at_once_and_everything_at_stop(broker, topics):
    topic = topics({"full": 1})["full"]
    produce_one_by_one(broker.bootstrap, topic, 0, [b"%d" % i for i in range(50)])
    stop = threading.Event()
    source = KafkaSource(
        broker.bootstrap, [topic], linger_ms=10_000, batch_size=40, stop_event=stop
    )
    part = source.build_part("s", f"{topic}#0", None)
    started = time.monotonic()
    first = poll_until(part, 40)
    assert len(first) == 40 and time.monotonic() - started < 5  # a full batch does not wait
    while len(part._pending) < 10:  # the rest is read and held for the 10 s slot
        assert time.monotonic() - started < 10
        assert part.next_batch() == []
        time.sleep(0.005)
    assert part.snapshot() == 40
    stop.set()
    rest = part.next_batch()
    with pytest.raises(StopIteration):
        part.next_batch()
    part.close()
    assert [m.offset for m in first + rest[0]] == list(range(50))
    assert part.snapshot() == 50


def test_bounded_reading_never_lingers(broker, topics):
    topic = topics({"nolinger": 1})["nolinger"]
    produce_one_by_one(broker.bootstrap, topic, 0, [b"a", b"b", b"c"])
    source = KafkaSource(broker.bootstrap, [topic], bounded=True, linger_ms=10_000)
    part = source.build_part("s", f"{topic}#0", None)
    started = time.monotonic()
    assert [m.value for m in drain(part)] == [b"a", b"b", b"c"]
    assert time.monotonic() - started < 5


def test_fetch_pending_skips_polls_only_while_a_fetch_is_in_flight(broker, topics):
    """`fetch_pending` is True only while the broker holds a fetch and nothing fetched
    waits; a record produced meanwhile is read at the next poll after it lands."""
    from sferp.connectors.kafka_records import fetch_pending

    topic = topics({"pending": 1})["pending"]
    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=None, fetch_max_wait_ms=5000
    )
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        assert not fetch_pending(consumer)  # nothing sent yet: a poll must send a fetch
        assert consumer.poll(timeout_ms=0) == {}
        deadline = time.monotonic() + 5
        while not fetch_pending(consumer):  # the fetch is out; the broker waits for data
            assert time.monotonic() < deadline
            consumer.poll(timeout_ms=0)
        produce_one_by_one(broker.bootstrap, topic, 0, [b"x"])
        deadline = time.monotonic() + 10
        while fetch_pending(consumer):  # the answer lands on kafka-python's I/O thread
            assert time.monotonic() < deadline, "the fetch never answered"
            time.sleep(0.005)
        records = consumer.poll(timeout_ms=1000).get(tp, [])
        assert [r.value for r in records] == [b"x"]
    finally:
        consumer.close()
    assert fetch_pending(object()) is False  # other internals: always poll


def test_queued_fetches_read_everything_in_order_without_waiting(broker, topics):
    """With `queue_fetches` a poll queues the next fetch requests for kafka-python's I/O
    thread instead of waiting for it; a queued send counts as in flight, and every
    record still arrives once and in order."""
    from sferp.connectors.kafka_records import fetch_pending, queue_fetches

    topic = topics({"queued": 1})["queued"]
    tp = TopicPartition(topic, 0)
    values = [b"%d" % i for i in range(400)]
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        assert queue_fetches(consumer)
        fetcher, net = consumer._fetcher, consumer._fetcher._net
        real, held = net.call_soon_threadsafe, []
        net.call_soon_threadsafe = held.append  # hold queued tasks back for a moment
        assert fetcher.send_fetches() == [] and fetcher.send_fetches() == []
        assert len(held) == 1 and fetcher._sferp_queued  # one send queued, not two
        assert fetch_pending(consumer)  # queued, not yet sent: polls wait for it
        net.call_soon_threadsafe = real
        real(held[0])
        deadline = time.monotonic() + 5
        while fetcher._sferp_queued:  # the I/O thread ran it
            assert time.monotonic() < deadline
            time.sleep(0.002)
        for i in range(0, 400, 100):
            produce_one_by_one(broker.bootstrap, topic, 0, values[i : i + 100])
        got: list = []
        deadline = time.monotonic() + 15
        while len(got) < 400:
            assert time.monotonic() < deadline, f"only {len(got)} of 400 records"
            if not fetch_pending(consumer):
                got.extend(consumer.poll(timeout_ms=0).get(tp, []))
            time.sleep(0.002)
        assert [r.value for r in got] == values
        assert [r.offset for r in got] == list(range(400))
    finally:
        consumer.close()
    plain = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    try:
        plain._net.stop()  # no I/O thread: polls drive the network themselves
        assert not queue_fetches(plain)
    finally:
        plain.close()
