"""The benchmark's pre-encoded load generator against the embedded broker."""

from __future__ import annotations

import random
import socket
import struct
import threading

from kafka import KafkaConsumer, TopicPartition
from sferp.benchmarks.rawproduce import RawProducer, encode_chunks

from sferp.events import RawMessage


def _read(bootstrap: str, tps: list[tuple[str, int]], expected: int) -> dict:
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    c.assign([TopicPartition(t, p) for t, p in tps])
    c.seek_to_beginning()
    got: dict[tuple[str, int], list] = {tp: [] for tp in tps}
    idle = 0
    while idle < 3 and sum(map(len, got.values())) < expected:
        batch = c.poll(timeout_ms=300, max_records=10_000)
        for tp, ms in batch.items():
            got[(tp.topic, tp.partition)].extend(ms)
        idle = 0 if batch else idle + 1
    c.close()
    return got


def test_chunks_arrive_complete_and_in_order_per_partition(broker, topics):
    names = topics({"a": 3, "b": 2})
    rng = random.Random(7)
    msgs = []
    for i in range(2_500):
        topic = names[rng.choice(["a", "b"])]
        part = rng.randrange(3 if topic == names["a"] else 2)
        key = None if i % 10 == 0 else f"k{i % 37}".encode()
        value = None if i % 97 == 0 else f'{{"n":{i},"pad":"{"x" * rng.randrange(300)}"}}'.encode()
        msgs.append(RawMessage(topic, part, -1, key, value, -1))
    chunks = encode_chunks(msgs, rate=5_000)  # 100 messages a request
    assert [c.count for c in chunks[:-1]] == [100] * (len(chunks) - 1)
    assert sum(c.count for c in chunks) == len(msgs)
    producer = RawProducer(broker.bootstrap)
    for c in chunks:
        producer.send(c)
    assert producer.wait(30) and producer.error is None
    assert producer.acked == len(chunks)
    producer.close()
    tps = [(names["a"], p) for p in range(3)] + [(names["b"], p) for p in range(2)]
    got = _read(broker.bootstrap, tps, len(msgs))
    for topic, part in tps:
        sent = [(m.key, m.value) for m in msgs if (m.topic, m.partition) == (topic, part)]
        read = got[(topic, part)]
        assert [(r.key, r.value) for r in read] == sent, (topic, part)
        assert [r.offset for r in read] == list(range(len(sent)))


def _answering_server(reply) -> tuple[socket.socket, threading.Thread]:
    """A TCP server that reads one request frame and answers `reply(correlation_id)`."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            size = struct.unpack(">i", conn.recv(4, socket.MSG_WAITALL))[0]
            request = conn.recv(size, socket.MSG_WAITALL)
            answer = reply(struct.unpack_from(">i", request, 4)[0])
            if answer is not None:
                conn.sendall(struct.pack(">i", len(answer)) + answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_a_produce_error_code_is_reported():
    # The embedded broker accepts every produce (even to a partition that does not
    # exist), so a broker's refusal is played by a socket answering a v3 response.
    def refuse(correlation: int) -> bytes:
        partition = struct.pack(">ihqq", 5, 6, -1, -1)  # NOT_LEADER_FOR_PARTITION
        topic = struct.pack(">h", 1) + b"t" + struct.pack(">i", 1) + partition
        return struct.pack(">ii", correlation, 1) + topic + struct.pack(">i", 0)

    srv, t = _answering_server(refuse)
    host, port = srv.getsockname()
    producer = RawProducer(f"{host}:{port}")
    producer.send(encode_chunks([RawMessage("t", 5, -1, b"k", b"{}", -1)], rate=1000)[0])
    assert not producer.wait(5) or producer.error
    producer.close()
    srv.close()
    assert producer.error == "produce to t[5] failed with Kafka error code 6"


def test_a_closed_connection_is_reported():
    srv, t = _answering_server(lambda correlation: None)  # reads the request, hangs up
    host, port = srv.getsockname()
    producer = RawProducer(f"{host}:{port}")
    producer.send(encode_chunks([RawMessage("t", 0, -1, b"k", b"{}", -1)], rate=1000)[0])
    assert producer.wait(5) is False
    producer.close()
    srv.close()
    assert producer.error is not None and producer.error.startswith("load connection")
