"""A load generator that costs (almost) no CPU: pre-encoded Kafka produce requests.

The latency phases run the flow, the broker and the load generator on the same
machine. kafka-python's producer encodes every record in Python (measured here
~24 µs a message, half a core at 21,000 messages/s): a load generator that
heavy takes the CPU the flow under test needs, which no production producer
(Java, librdkafka) would. So the stream is encoded *before* the phase starts,
into one ProduceRequest per ~20 ms of traffic (a v2 record batch per partition,
built by kafka-python's own record builder), and the phase only writes those
frames to the socket at their due times and reads the acknowledgements.

Limits: one connection to the bootstrap broker, which must lead every partition
(true of the embedded single-node broker the benchmark starts); a produce error
(for example NOT_LEADER_FOR_PARTITION from a multi-broker cluster) is reported,
not retried. Delivery: acks=1, every response is checked.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kafka.record.default_records import DefaultRecordBatchBuilder

from sferp.events import RawMessage

_PRODUCE = 0
_VERSION = 3  # ProduceRequest v3: the first with v2 record batches, not flexible
_CLIENT_ID = b"sferp-bench-load"
_ACKS = 1
_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class Chunk:
    """One produce request: messages [first, first + count) of the stream."""

    first: int
    count: int
    frame: bytes


def _string(b: bytes) -> bytes:
    return struct.pack(">h", len(b)) + b


def encode_chunks(
    messages: Sequence[RawMessage], rate: float, chunk_s: float = 0.02
) -> list[Chunk]:
    """Split the stream into requests of `rate * chunk_s` consecutive messages each.

    20 ms: the embedded broker's CPU per message grows with the number of requests
    (measured at 13,600 messages/s: 12.9 s of broker CPU in 30 s with 5 ms requests,
    6.0 s with 20 ms ones), and it shares the cores with the flow.

    Within a request, each partition's messages form one record batch in stream
    order, so the broker assigns offsets in the order a per-message producer would.
    """
    size = max(1, round(rate * chunk_s))
    now_ms = int(time.time() * 1000)
    chunks: list[Chunk] = []
    for no, first in enumerate(range(0, len(messages), size)):
        part = messages[first : first + size]
        by_tp: dict[str, dict[int, DefaultRecordBatchBuilder]] = {}
        for m in part:
            parts = by_tp.setdefault(m.topic, {})
            builder = parts.get(m.partition)
            if builder is None:
                builder = parts[m.partition] = DefaultRecordBatchBuilder(
                    magic=2,
                    compression_type=0,
                    is_transactional=False,
                    producer_id=-1,
                    producer_epoch=-1,
                    base_sequence=-1,
                    batch_size=1 << 30,
                )
            builder.append(builder._num_records, now_ms, m.key, m.value, [])
        body = [struct.pack(">hhi", -1, _ACKS, _TIMEOUT_MS), struct.pack(">i", len(by_tp))]
        for topic, parts in by_tp.items():
            body.append(_string(topic.encode()))
            body.append(struct.pack(">i", len(parts)))
            for partition, builder in parts.items():
                records = bytes(builder.build())
                body.append(struct.pack(">ii", partition, len(records)))
                body.append(records)
        header = struct.pack(">hhi", _PRODUCE, _VERSION, no) + _string(_CLIENT_ID)
        payload = header + b"".join(body)
        chunks.append(Chunk(first, len(part), struct.pack(">i", len(payload)) + payload))
    return chunks


def _errors(response: bytes) -> list[tuple[str, int, int]]:
    """(topic, partition, error code) of every failed partition of a v3 produce response."""
    pos = 4  # correlation id
    (topics,) = struct.unpack_from(">i", response, pos)
    pos += 4
    bad = []
    for _ in range(topics):
        (n,) = struct.unpack_from(">h", response, pos)
        topic = response[pos + 2 : pos + 2 + n].decode()
        pos += 2 + n
        (parts,) = struct.unpack_from(">i", response, pos)
        pos += 4
        for _ in range(parts):
            partition, code = struct.unpack_from(">ih", response, pos)
            pos += 4 + 2 + 8 + 8  # base offset, log append time
            if code:
                bad.append((topic, partition, code))
    return bad


class RawProducer:
    """Writes pre-encoded requests to one broker connection; a thread reads the answers."""

    def __init__(self, bootstrap: str, timeout_s: float = 30.0) -> None:
        """Connect to the first bootstrap address."""
        host, _, port = bootstrap.split(",")[0].rpartition(":")
        self._sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = 0
        self.acked = 0
        self.error: str | None = None
        self._done = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="load-acks", daemon=True)
        self._reader.start()

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self._sock.recv(n - len(buf))
            if not got:
                raise ConnectionError("the broker closed the connection")
            buf += got
        return bytes(buf)

    def _read(self) -> None:
        try:
            while True:
                (size,) = struct.unpack(">i", self._read_exact(4))
                bad = _errors(self._read_exact(size))
                with self._done:
                    if bad and self.error is None:
                        t, p, code = bad[0]
                        self.error = f"produce to {t}[{p}] failed with Kafka error code {code}"
                    self.acked += 1
                    self._done.notify_all()
        except (OSError, ConnectionError, struct.error) as exc:
            with self._done:
                if self.error is None and self.acked < self.sent:
                    self.error = f"load connection: {exc}"
                self._done.notify_all()

    def send(self, chunk: Chunk) -> None:
        """Write one request (blocking while the socket buffer is full)."""
        with self._done:
            self.sent += 1
        self._sock.sendall(chunk.frame)

    def wait(self, timeout_s: float) -> bool:
        """Wait until every request was answered (or an error); True when all were."""
        deadline = time.monotonic() + timeout_s
        with self._done:
            while self.acked < self.sent and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
            return self.acked >= self.sent

    def close(self) -> None:
        """Close the connection."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
