"""A faster record reader for kafka-python's consumer: v2 record batches straight to RawMessage.

kafka-python 3.0 decodes every record field through a generic varint function
and builds a `ConsumerRecord` (13 fields, header sizes computed) per message;
with CRCs checked by the `crc32c` extension that per-record Python is most of
the consume cost. This reader keeps everything else of the consumer (fetching,
positions, CRC checks per batch, compression, transactions, control batches)
and replaces only the loop over the records of an uncompressed or decompressed
v2 batch: one tight loop per batch that yields `RawMessage`s (headers are
skipped: the flow does not use them).

It is installed per consumer (`install`), never globally, and only when the
consumer has the internals it was written against; otherwise the consumer keeps
its own reader and the source converts `ConsumerRecord`s as before. Both paths
give the same messages (tests/test_kafka_records.py compares them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBase

from sferp.events import RawMessage

__all__ = ["fetch_pending", "install", "parse_records", "queue_fetches"]

log = logging.getLogger("sferp.kafka")

_READ_UNCOMMITTED = 0
_LOG_APPEND_TIME = DefaultRecordBase.TIMESTAMP_TYPE_MASK
_CONTROL = DefaultRecordBase.CONTROL_MASK


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint at `pos`: (value, next position)."""
    b = buf[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    value = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
        if shift > 63:
            raise CorruptRecordError("varint longer than 10 bytes")


def parse_records(
    buf: bytes,
    pos: int,
    count: int,
    base_offset: int,
    timestamp: int,
    log_append_time: bool,
    topic: str,
    partition: int,
) -> list[RawMessage]:
    """The `count` records of a v2 batch body starting at `pos` (headers skipped).

    `timestamp` is the batch's first timestamp, or its max timestamp when the
    batch uses log-append time (then every record has it).
    """
    out: list[RawMessage] = []
    append = out.append
    varint = _varint
    size = len(buf)
    try:
        for _ in range(count):
            length, pos = varint(buf, pos)
            end = pos + length
            if length < 0 or end > size:
                raise CorruptRecordError(f"record length {length} beyond the batch")
            # Attributes (int8), then TimestampDelta, OffsetDelta, Key, Value.
            ts_delta, pos = varint(buf, pos + 1)
            offset_delta, pos = varint(buf, pos)
            n, pos = varint(buf, pos)
            if n >= 0:
                key: bytes | None = buf[pos : pos + n]
                pos += n
            else:
                key = None
            n, pos = varint(buf, pos)
            if n >= 0:
                value: bytes | None = buf[pos : pos + n]
                pos += n
            else:
                value = None
            if pos > end:
                raise CorruptRecordError("record fields run past the record length")
            append(
                RawMessage(
                    topic,
                    partition,
                    base_offset + offset_delta,
                    key,
                    value,
                    timestamp if log_append_time else timestamp + ts_delta,
                )
            )
            pos = end  # headers are not used
    except IndexError:
        raise CorruptRecordError("record batch ends inside a record") from None
    return out


class _FastPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """kafka-python's PartitionRecords, yielding RawMessage from v2 batches."""

    def _unpack_records(  # type: ignore[override]
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[Any]:
        if key_deserializer is not None or value_deserializer is not None:
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        topic, partition = tp.topic, tp.partition
        batch = records.next_batch()
        last_batch = None
        while batch is not None:
            last_batch = batch
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"record batch of {tp} at offset {batch.base_offset} failed its CRC check"
                )
            if batch.magic != 2:  # legacy message sets: kafka-python's own reader
                for r in batch:
                    self.next_fetch_offset = r.offset + 1
                    yield RawMessage(topic, partition, r.offset, r.key, r.value, r.timestamp)
                batch = records.next_batch()
                continue
            self.leader_epoch = batch.leader_epoch
            attributes = batch.attributes
            if self.isolation_level != _READ_UNCOMMITTED and batch.has_producer_id():
                self._consume_aborted_transactions_up_to(batch.last_offset)
                if self._contains_abort_marker(batch):
                    self.aborted_producer_ids.discard(batch.producer_id)
                elif self._is_batch_aborted(batch):
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
            if attributes & _CONTROL:
                self.next_fetch_offset = batch.next_offset
                batch = records.next_batch()
                continue
            batch._maybe_uncompress()
            log_append = bool(attributes & _LOG_APPEND_TIME)
            msgs = parse_records(
                bytes(batch._buffer),
                batch._pos,
                batch.records_count,
                batch.base_offset,
                batch.max_timestamp if log_append else batch.first_timestamp,
                log_append,
                topic,
                partition,
            )
            self.records_read += len(msgs)
            self.bytes_read += batch.size_in_bytes
            for m in msgs:
                self.next_fetch_offset = m.offset + 1
                yield m
            batch = records.next_batch()
        if last_batch is not None and last_batch.magic == 2:
            self.next_fetch_offset = last_batch.next_offset
        self.drain()


_NEEDED = ("_consume_aborted_transactions_up_to", "_contains_abort_marker", "_is_batch_aborted")


def install(consumer: Any) -> bool:
    """Use the fast reader in this consumer; False (and no change) if its internals differ."""
    fetcher = getattr(consumer, "_fetcher", None)
    base = getattr(fetcher, "PartitionRecords", None)
    if base is not Fetcher.PartitionRecords or not all(hasattr(base, n) for n in _NEEDED):
        log.debug("kafka: consumer internals differ; using kafka-python's record reader")
        return False
    fetcher.PartitionRecords = _FastPartitionRecords
    return True


def queue_fetches(consumer: Any) -> bool:
    """Make the consumer's fetch requests go out without the poll waiting for them.

    After draining what was fetched, every kafka-python 3.0 poll sends the next
    fetch requests by handing a task to its I/O thread and waiting until that
    thread ran it. On a busy machine the wait is the I/O thread's turn on a core
    and on the GIL: 13 % of a live flow's main thread at half load (py-spy).
    The task is queued instead and the poll returns at once; `fetch_pending`
    counts a queued send as in flight, so no second send is queued meanwhile.
    The requests and their handling are kafka-python's own. False (and no
    change) when the consumer's internals differ or it has no I/O thread.
    """
    f = getattr(consumer, "_fetcher", None)
    net = getattr(f, "_net", None)
    send_async = getattr(f, "_send_fetches_async", None)
    if (
        send_async is None
        or getattr(net, "_io_thread", None) is None
        or not callable(getattr(net, "call_soon_threadsafe", None))
    ):
        return False
    f._sferp_queued = False  # type: ignore[union-attr]

    async def send() -> None:
        try:
            await send_async()
        finally:
            f._sferp_queued = False  # type: ignore[union-attr]

    def send_fetches() -> list:
        if not f._sferp_queued:  # type: ignore[union-attr]
            f._sferp_queued = True  # type: ignore[union-attr]
            net.call_soon_threadsafe(send)  # type: ignore[union-attr]
        return []

    f.send_fetches = send_fetches  # type: ignore[union-attr]
    return True


def fetch_pending(consumer: Any) -> bool:
    """True when a poll of `consumer` could bring nothing: a fetch is in flight and nothing
    fetched waits to be read.

    kafka-python 3.0 runs its network on an I/O thread, and every `poll` hands
    work to that thread and waits for it, twice when nothing is buffered
    (about 200 µs of CPU per poll here, measured). Live partitions polled
    between fetch responses paid that for nothing: 16,381 polls in a 30 s
    phase at 20 % load, about 4,000 of them bringing records. Reads only what
    the fetcher exposes; False (poll) when its internals differ from those this
    was written against.
    """
    f = getattr(consumer, "_fetcher", None)
    try:
        in_flight = getattr(f, "_sferp_queued", False) or f._nodes_with_pending_fetch_requests  # type: ignore[union-attr]
        return bool(in_flight) and not (  # type: ignore[union-attr]
            f._completed_fetches  # type: ignore[union-attr]
            or f._next_partition_records  # type: ignore[union-attr]
            or f._paused_completed_fetches  # type: ignore[union-attr]
            or f._paused_partition_records  # type: ignore[union-attr]
        )
    except AttributeError:
        return False
