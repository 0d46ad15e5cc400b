"""The fast v2 record reader gives exactly what kafka-python's own reader gives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
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
