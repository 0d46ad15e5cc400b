"""A faster record reader for kafka-python's consumer: v2 record batches straight to RawMessage.

kafka-python 3.0 decodes every record field through a generic varint function
and builds a `ConsumerRecord` (13 fields, header sizes computed) per message;
with CRCs checked by the `crc32c` extension that per-record Python is most of
the consume cost. This reader keeps everything else of the consumer (fetching,
positions, CRC checks per batch, compression, transactions, control batches)
and replaces only the loop over the records of an uncompressed or decompressed
v2 batch: one tight loop per batch that yields `RawMessage`s (headers are
skipped: the flow does not use them). An uncompressed batch of plain records is
parsed where it lies in the fetched response, without kafka-python's two copies
of it; compressed, control and (reading committed only) transactional batches
go through kafka-python's batch objects first.

The reader is installed per consumer (`install`), and only when the consumer
has the internals it was written against; otherwise the consumer keeps its own
reader and the source converts `ConsumerRecord`s as before. `install` also
removes two copies of every received response (`fewer_response_copies`); those
are class attributes of kafka-python's protocol parser, so from then on they
serve every connection of the process, with the same results. Both paths
give the same messages (tests/test_kafka_records.py compares them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBase
from kafka.record.util import calc_crc32c

from sferp.events import RawMessage

__all__ = [
    "fetch_pending",
    "fewer_response_copies",
    "install",
    "parse_records",
    "queue_fetches",
    "skip_history_batches",
]

log = logging.getLogger("sferp.kafka")

_READ_UNCOMMITTED = 0
_LOG_APPEND_TIME = DefaultRecordBase.TIMESTAMP_TYPE_MASK
_CONTROL = DefaultRecordBase.CONTROL_MASK
# A v2 batch is read in place, from the fetched response's bytes, when it is
# neither compressed nor a control batch (nor, when reading committed only, part
# of a transaction): kafka-python would copy it twice first (into its batch's
# bytearray, then to bytes for the parser), 1 MB at a time for batches as large
# as the benchmark's, a fresh memory mapping each (sferp/native_heap.py).
_HEADER = DefaultRecordBase.HEADER_STRUCT
_MAGIC_AT = DefaultRecordBase.CRC_OFFSET - 1
_CRC_FROM = DefaultRecordBase.ATTRIBUTES_OFFSET
_IN_PLACE_EXCLUDED = DefaultRecordBase.CODEC_MASK | _CONTROL
_IN_PLACE_NEEDED = ("_next_slice", "_pos", "_cache_next")


def skip_history_batches(consumer: Any, topic: str, partition: int, start: int) -> bool:
    """Have `consumer` read `topic[partition]`, started at its reported log end
    `start`, from the first record batch that began at or after `start`.

    The embedded broker reports a log end inside the last batch (DESIGN.md: the
    base offset of the last batch + 1), so the records of that batch from `start`
    on are history, not new traffic. On Kafka, whose log end is exact, no batch
    that began before `start` holds a record at or after it, so nothing changes
    there. False when the consumer does not use this reader.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    records_class = getattr(fetcher, "PartitionRecords", None)
    if (
        records_class is None
        or not issubclass(records_class, _FastPartitionRecords)
        or records_class is _FastPartitionRecords  # `install` gives each consumer its own
    ):
        return False
    records_class.history_below[(topic, partition)] = start
    return True


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
    end: int | None = None,
) -> list[RawMessage]:
    """The `count` records of a v2 batch body starting at `pos` (headers skipped).

    `timestamp` is the batch's first timestamp, or its max timestamp when the
    batch uses log-append time (then every record has it). `end` is where the
    batch ends in `buf` (default: the end of `buf`); no record may run past it.
    """
    out: list[RawMessage] = []
    append = out.append
    varint = _varint
    size = len(buf) if end is None else end
    try:
        for _ in range(count):
            length, pos = varint(buf, pos)
            stop = pos + length
            if length < 0 or stop > size:
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
            if pos > stop:
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
            pos = stop  # headers are not used
    except IndexError:
        raise CorruptRecordError("record batch ends inside a record") from None
    return out


class _FastPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """kafka-python's PartitionRecords, yielding RawMessage from v2 batches.

    `install` makes a subclass per consumer: its `history_below` holds the
    consumer's partitions started at `latest` (`skip_history_batches`) until the
    first batch that began at or after the start arrives.
    """

    history_below: dict[tuple[str, int], int] = {}

    def _unpack_records(  # type: ignore[override]
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[Any]:
        if key_deserializer is not None or value_deserializer is not None:
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        topic, partition = tp.topic, tp.partition
        buf = getattr(records, "_buffer", None)
        in_place = type(buf) is bytes and all(hasattr(records, n) for n in _IN_PLACE_NEEDED)
        any_txn = self.isolation_level == _READ_UNCOMMITTED
        next_offset = None  # after the last v2 batch read
        history = self.history_below
        history_below = history.get((topic, partition)) if history else None
        while True:
            view = records._next_slice if in_place else None
            if view is not None and len(view) > _HEADER.size and view[_MAGIC_AT] == 2:
                head = _HEADER.unpack_from(view)
                if not head[5] & _IN_PLACE_EXCLUDED and (any_txn or head[9] < 0):
                    # An uncompressed batch of plain records: read where it lies.
                    at = records._pos - len(view)
                    records._cache_next()
                    if self.check_crcs and calc_crc32c(view[_CRC_FROM:]) != head[4]:
                        raise CorruptRecordError(
                            f"record batch of {tp} at offset {head[0]} failed its CRC check"
                        )
                    self.leader_epoch = head[2]
                    next_offset = head[0] + head[6] + 1
                    if history_below is not None:
                        if head[0] < history_below:  # the batch holding the start: history
                            self.next_fetch_offset = next_offset
                            continue
                        history.pop((topic, partition), None)
                        history_below = None
                    log_append = bool(head[5] & _LOG_APPEND_TIME)
                    msgs = parse_records(
                        buf,  # type: ignore[arg-type]
                        at + _HEADER.size,
                        head[12],
                        head[0],
                        head[8] if log_append else head[7],
                        log_append,
                        topic,
                        partition,
                        at + len(view),
                    )
                    self.records_read += len(msgs)
                    self.bytes_read += len(view)
                    for m in msgs:
                        self.next_fetch_offset = m.offset + 1
                        yield m
                    continue
            batch = records.next_batch()
            if batch is None:
                break
            next_offset = None
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"record batch of {tp} at offset {batch.base_offset} failed its CRC check"
                )
            if batch.magic != 2:  # legacy message sets: kafka-python's own reader
                for r in batch:
                    self.next_fetch_offset = r.offset + 1
                    yield RawMessage(topic, partition, r.offset, r.key, r.value, r.timestamp)
                continue
            next_offset = batch.next_offset
            self.leader_epoch = batch.leader_epoch
            if history_below is not None:
                if batch.base_offset < history_below:  # as above
                    self.next_fetch_offset = batch.next_offset
                    continue
                history.pop((topic, partition), None)
                history_below = None
            attributes = batch.attributes
            if not any_txn and batch.has_producer_id():
                self._consume_aborted_transactions_up_to(batch.last_offset)
                if self._contains_abort_marker(batch):
                    self.aborted_producer_ids.discard(batch.producer_id)
                elif self._is_batch_aborted(batch):
                    self.next_fetch_offset = batch.next_offset
                    continue
            if attributes & _CONTROL:
                self.next_fetch_offset = batch.next_offset
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
        if next_offset is not None:
            self.next_fetch_offset = next_offset
        self.drain()


_NEEDED = ("_consume_aborted_transactions_up_to", "_contains_abort_marker", "_is_batch_aborted")


def install(consumer: Any) -> bool:
    """Use the fast reader in this consumer; False (and no change) if its internals differ."""
    fetcher = getattr(consumer, "_fetcher", None)
    base = getattr(fetcher, "PartitionRecords", None)
    if base is not Fetcher.PartitionRecords or not all(hasattr(base, n) for n in _NEEDED):
        log.debug("kafka: consumer internals differ; using kafka-python's record reader")
        return False
    # A subclass per consumer: the partitions to start after their history are its own.
    fetcher.PartitionRecords = type(
        "_ConsumerPartitionRecords", (_FastPartitionRecords,), {"history_below": {}}
    )
    fewer_response_copies()
    return True


def _read_once(self: Any, nbytes: int | None = None) -> bytes:
    """`KafkaBytes.read` with one copy (kafka-python slices the bytearray, then copies that)."""
    start = self._idx
    end = len(self) if nbytes is None else min(start + nbytes, len(self))
    self._idx = end
    with memoryview(self) as view:
        return view[start:end].tobytes()


def fewer_response_copies() -> bool:
    """Two fewer whole copies of every response kafka-python receives, in this process.

    A fetch response (up to 8 MB per partition) is copied about nine times between
    the socket and the records. Two are for nothing: the parser slices the received
    bytes before writing them into its frame buffer (a memoryview slice writes the
    same bytes), and `KafkaBytes.read` slices the buffer and then copies the slice.
    With glibc's fixed mmap threshold (sferp/native_heap.py) every copy is a fresh
    mapping whose pages fault in. Both replacements return what the originals
    return. False (and no change) when kafka-python's internals differ.
    """
    try:
        from kafka.protocol.frame import KafkaBytes
        from kafka.protocol.parser import KafkaProtocol
    except ImportError:
        return False
    receive = KafkaProtocol.__dict__.get("receive_bytes")
    if getattr(receive, "_sferp", False):
        return True
    if (
        receive is None
        or not callable(KafkaBytes.__dict__.get("read"))
        or not hasattr(KafkaBytes(0), "_idx")
    ):
        return False

    def receive_bytes(self: Any, data: Any) -> Any:
        return receive(self, memoryview(data))

    receive_bytes._sferp = True  # type: ignore[attr-defined]
    receive_bytes.__doc__ = receive.__doc__
    KafkaProtocol.receive_bytes = receive_bytes
    KafkaBytes.read = _read_once
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
