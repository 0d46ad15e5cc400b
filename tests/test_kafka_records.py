"""The fast v2 record reader gives exactly what kafka-python's own reader gives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from sferp.connectors.kafka_records import install, parse_records

from sferp.events import RawMessage

BASE_TS = 1_795_000_000_000

_records = st.lists(
    st.tuples(
        st.integers(0, 10**7),  # timestamp delta
        st.none() | st.binary(max_size=300),
        st.none() | st.binary(max_size=3000),
        st.lists(st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=20)), max_size=3),
    ),
    min_size=1,
    max_size=60,
)


def _batch(records: list, base_offset: int, *, log_append: bool = False) -> bytes:
    b = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, batch_size=1 << 30)
    for i, (dt, key, value, headers) in enumerate(records):
        b.append(i * 3, BASE_TS + dt, key, value, headers)  # offset gaps, as after compaction
    buf = b.build()
    # Base offset (int64) sits at the start of the header; set it as a broker would.
    buf[0:8] = base_offset.to_bytes(8, "big")
    if log_append:
        buf[21] |= DefaultRecordBatch.TIMESTAMP_TYPE_MASK  # attributes low byte
    return bytes(buf)


def _expected(buf: bytes) -> list[RawMessage]:
    batch = DefaultRecordBatch(buf)
    return [RawMessage("t", 4, r.offset, r.key, r.value, r.timestamp) for r in batch]


def _fast(buf: bytes) -> list[RawMessage]:
    batch = DefaultRecordBatch(buf)
    log_append = bool(batch.attributes & DefaultRecordBatch.TIMESTAMP_TYPE_MASK)
    ts = batch.max_timestamp if log_append else batch.first_timestamp
    return parse_records(
        buf, batch._pos, batch.records_count, batch.base_offset, ts, log_append, "t", 4
    )


@settings(max_examples=150, deadline=None)
@given(_records, st.integers(0, 2**40), st.booleans())
def test_same_messages_as_kafka_python(records, base_offset, log_append):
    buf = _batch(records, base_offset, log_append=log_append)
    assert _fast(buf) == _expected(buf)


@settings(max_examples=100, deadline=None)
@given(_records, st.data())
def test_a_truncated_batch_is_corrupt_not_wrong(records, data):
    buf = _batch(records, 0)
    cut = data.draw(st.integers(DefaultRecordBatch.HEADER_STRUCT.size + 1, len(buf) - 1))
    with pytest.raises(CorruptRecordError):
        _fast(buf[:cut])


def _read(bootstrap: str, tp: TopicPartition, n: int, *, fast: bool) -> list[RawMessage]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        if fast:
            assert install(c)
        c.assign([tp])
        c.seek_to_beginning(tp)
        out: list[RawMessage] = []
        for _ in range(100):
            for r in c.poll(timeout_ms=200).get(tp, []):
                if type(r) is not RawMessage:
                    r = RawMessage(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp)
                out.append(r)
            if len(out) >= n:
                break
        return out
    finally:
        c.close()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_through_the_broker_both_readers_agree(broker, topics, compression):
    topic = topics({"t": 1})["t"]
    p = KafkaProducer(
        bootstrap_servers=broker.bootstrap, compression_type=compression, linger_ms=50
    )
    for i in range(3000):
        key = None if i % 7 == 0 else f"k{i % 50}".encode()
        value = None if i % 11 == 0 and key else (b"v" * (i % 900))
        p.send(topic, key=key, value=value, partition=0, timestamp_ms=BASE_TS + i)
    p.flush()
    p.close()
    tp = TopicPartition(topic, 0)
    fast = _read(broker.bootstrap, tp, 3000, fast=True)
    slow = _read(broker.bootstrap, tp, 3000, fast=False)
    assert len(fast) == 3000
    assert fast == slow
    assert [m.offset for m in fast] == list(range(3000))


# -- whole fetched record sets: batches read in place beside kafka-python's ------------------


def _built(records: list, base_offset: int, *, codec: int = 0, producer_id: int = -1) -> bytearray:
    txn = producer_id >= 0
    b = DefaultRecordBatchBuilder(
        2, codec, txn, producer_id, 0 if txn else -1, 0 if txn else -1, batch_size=1 << 30
    )
    for i, (dt, key, value, headers) in enumerate(records):
        b.append(i, BASE_TS + dt, key, value, headers)
    buf = b.build()
    buf[0:8] = base_offset.to_bytes(8, "big")
    return buf


def _recrc(buf: bytearray) -> bytes:
    from kafka.record.util import calc_crc32c

    h = DefaultRecordBatch
    crc = calc_crc32c(memoryview(buf)[h.ATTRIBUTES_OFFSET :])
    buf[h.CRC_OFFSET : h.CRC_OFFSET + 4] = crc.to_bytes(4, "big")
    return bytes(buf)


class _Counted(MemoryRecords):
    """Counts the batches handed to kafka-python's batch objects (not read in place)."""

    __slots__ = ("copied",)

    def next_batch(self, *a):
        batch = super().next_batch(*a)
        self.copied = getattr(self, "copied", 0) + (batch is not None)
        return batch


def _both(buf: bytes, **kw) -> tuple[list[RawMessage], int, list[RawMessage], int, int]:
    from kafka.consumer.fetcher import Fetcher
    from kafka.structs import TopicPartition as TP
    from sferp.connectors.kafka_records import _FastPartitionRecords

    tp = TP("t", 4)
    records = _Counted(buf)
    fast = _FastPartitionRecords(0, tp, records, **kw)
    slow = Fetcher.PartitionRecords(0, tp, MemoryRecords(buf), **kw)
    got = list(fast.record_iterator)
    want = [RawMessage("t", 4, r.offset, r.key, r.value, r.timestamp) for r in slow.record_iterator]
    copied = getattr(records, "copied", 0)
    return got, fast.next_fetch_offset, want, slow.next_fetch_offset, copied


_plain = [(i, f"k{i}".encode(), b"v" * (i * 37 % 700), []) for i in range(40)]


@pytest.mark.parametrize("isolation", [0, 1])
def test_mixed_batches_read_in_place_or_by_kafka_python_give_the_same(isolation):
    commit = [(0, b"\x00\x00\x00\x01", b"\x00\x00\x00\x00\x00\x00", [])]  # version 0, COMMIT
    control = _built(commit, 140, producer_id=7)
    control[22] |= DefaultRecordBatch.CONTROL_MASK  # attributes low byte
    buf = b"".join(
        [
            _built(_plain, 0),  # in place
            _built(_plain, 40, codec=DefaultRecordBatch.CODEC_GZIP),  # kafka-python
            _built(_plain, 80),  # in place again, after a decompressed one
            _built(_plain[:20], 120, producer_id=7),  # in place unless read_committed
            _recrc(control),  # a transaction marker: no records
            _built(_plain[:5], 141),
        ]
    )
    got, got_next, want, want_next, copied = _both(buf, isolation_level=isolation)
    assert len(got) == 40 + 40 + 40 + 20 + 5
    assert got == want
    assert got_next == want_next == 146
    # gzip and the marker (and, reading committed only, the transaction's batch)
    assert copied == 2 + isolation


def test_a_batch_failing_its_crc_is_corrupt_in_place_too():
    first, second = _built(_plain, 0), bytearray(_built(_plain, 40))
    second[-3] ^= 0xFF  # inside the last record's value
    with pytest.raises(CorruptRecordError, match="CRC"):
        _both(bytes(first + second))


def test_a_record_count_beyond_the_batch_does_not_read_into_the_next_batch():
    short = _built(_plain, 0)
    short[57:61] = (len(_plain) + 1).to_bytes(4, "big")  # records count
    buf = _recrc(short) + bytes(_built(_plain, 40))
    with pytest.raises(CorruptRecordError):
        _both(buf)


# -- fewer copies of each received response -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.lists(st.none() | st.integers(0, 80), max_size=6))
def test_kafka_bytes_read_with_one_copy_reads_what_kafka_python_reads(payload, reads):
    from kafka.protocol.frame import KafkaBytes
    from sferp.connectors.kafka_records import _read_once

    theirs, ours = KafkaBytes(len(payload)), KafkaBytes(len(payload))
    theirs[:] = ours[:] = payload
    original = _original_read()
    for n in reads:
        want, got = original(theirs, n), _read_once(ours, n)
        assert type(got) is bytes
        assert got == want
        assert ours.tell() == theirs.tell()
    ours.write(b"x")  # still writable: the view was released


def _original_read():
    def read(self, nbytes=None):  # kafka-python 3.0's KafkaBytes.read, as shipped
        if nbytes is None:
            nbytes = len(self) - self._idx
        start = self._idx
        self._idx += nbytes
        if self._idx > len(self):
            self._idx = len(self)
        return bytes(self[start : self._idx])

    return read


def test_install_makes_received_responses_go_through_the_lean_paths(broker, topics):
    from kafka.protocol.frame import KafkaBytes
    from kafka.protocol.parser import KafkaProtocol
    from sferp.connectors.kafka_records import _read_once

    topic = topics({"t": 1})["t"]
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(500):
        p.send(topic, value=b"%d" % i * 200, partition=0)
    p.flush()
    p.close()
    got = _read(broker.bootstrap, TopicPartition(topic, 0), 500, fast=True)
    assert KafkaBytes.read is _read_once
    assert getattr(KafkaProtocol.receive_bytes, "_sferp", False)
    assert [m.value for m in got] == [b"%d" % i * 200 for i in range(500)]
