"""Kafka input and output for Bytewax, over kafka-python.

`KafkaSource` reads topic partitions with manually assigned consumers (no
consumer group: positions live in Bytewax snapshots) and emits one list of
`RawMessage`s per fetch, so Bytewax's per-item cost is paid per batch, not per
message. `KafkaSink` writes `(topic, key, value)` items and fails loudly when a
delivery fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2
from sferp.connectors.kafka_records import fetch_pending, queue_fetches, skip_history_batches
from sferp.connectors.kafka_records import install as install_fast_reader

from sferp.events import RawMessage

__all__ = [
    "KafkaConnectorError",
    "KafkaSink",
    "KafkaSource",
    "end_offsets",
    "list_partitions",
    "read_positions",
]

SinkItem = tuple[str, bytes | None, bytes | None]
T = TypeVar("T")

_PART_SEP = "#"  # "<topic>#<partition>"; '#' is not legal in a Kafka topic name
_CONNECT_TIMEOUT_MS = 5_000
_OFFSETS_TIMEOUT_MS = 10_000
_METADATA_TIMEOUT_MS = 10_000
_IDLE_BACKOFF_MAX = timedelta(milliseconds=50)
_PARTITION_CACHE = 200_000  # keys per topic whose partition is remembered
# A partition known to hold unread records that brings none for this long gets a
# new consumer at its position (see `_KafkaPartition`).
STALL_S = 60.0

log = logging.getLogger("sferp.kafka")

# Next offset to read of every partition read in this process, for progress
# and lag reporting. One dict store per fetched batch.
_POSITIONS: dict[tuple[str, int], int] = {}


# Cap of one partition's fetch (the flow and the benchmark's raw floor share it).
# Every partition's consumer holds a fetched response and one in flight. Measured
# on a 1,000,000-record initial load, 2 MB instead of 8 MB changed neither the
# peak RSS nor the time beyond the noise between runs (+-60 MB, +-10 %).
MAX_PARTITION_FETCH_BYTES = 8 << 20


def partition_fetch_bytes(batch_size: int) -> int:
    """Bytes one partition's fetch may return: about one batch of ~1 KB messages, bounded."""
    return max(1 << 20, min(batch_size * 1024, MAX_PARTITION_FETCH_BYTES))


class KafkaConnectorError(RuntimeError):
    """Kafka cannot be used as configured: unreachable, missing topic, failed delivery."""


def _check_settings(settings: dict[str, Any], known: dict[str, Any], what: str) -> dict[str, Any]:
    """Reject setting names this kafka-python does not know (names only: values may be secret)."""
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise KafkaConnectorError(f"unknown kafka-python {what} settings: {', '.join(unknown)}")
    return dict(settings)


def _consumer_config(
    bootstrap: str, client_config: dict[str, Any] | None, **tuning: Any
) -> dict[str, Any]:
    """Consumer settings: our defaults (where this kafka-python knows them), then the user's."""
    known = KafkaConsumer.DEFAULT_CONFIG
    config: dict[str, Any] = {
        "bootstrap_timeout_ms": _CONNECT_TIMEOUT_MS,
        "allow_auto_create_topics": False,
        **tuning,
    }
    config = {k: v for k, v in config.items() if k in known}
    config.update(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    config.update(_check_settings(client_config or {}, known, "consumer"))
    return config


def _open_consumer(
    bootstrap: str, client_config: dict[str, Any] | None, **tuning: Any
) -> KafkaConsumer:
    config = _consumer_config(bootstrap, client_config, **tuning)
    try:
        return KafkaConsumer(**config)
    except KafkaError as exc:
        from sferp.kafka_auth import connection_problem  # a TLS or SASL problem, if any

        hint = connection_problem(bootstrap, config)
        raise KafkaConnectorError(f"cannot connect to Kafka at {bootstrap}: {hint or exc}") from exc


def _partitions(
    consumer: KafkaConsumer, bootstrap: str, topics: Iterable[str], missing_ok: bool = False
) -> list[TopicPartition]:
    """The partitions of the topics; a missing topic is an error unless `missing_ok`
    (then it has none), but never all of them."""
    tps = []
    missing = []
    for topic in topics:
        try:
            parts = consumer.partitions_for_topic(topic)
        except KafkaError as exc:
            raise KafkaConnectorError(
                f"cannot read metadata of topic {topic!r} from Kafka at {bootstrap}: {exc}"
            ) from exc
        if not parts:
            missing.append(topic)
            continue
        tps.extend(TopicPartition(topic, p) for p in sorted(parts))
    if missing and (not missing_ok or not tps):
        raise KafkaConnectorError(f"topic {missing[0]!r} does not exist on Kafka at {bootstrap}")
    return tps


def _within_deadline(
    bootstrap: str, client_config: dict[str, Any] | None, work: Callable[[KafkaConsumer], T]
) -> T:
    """Run `work` on a fresh metadata consumer, with a hard deadline.

    kafka-python's own timeouts do not cover every stall: a TLS handshake with a
    plaintext listener (a wrong `security_protocol`) blocks forever. The work
    runs in a daemon thread, so such a mistake becomes a clear error instead.
    """
    tuning = {"request_timeout_ms": _METADATA_TIMEOUT_MS}
    config = _consumer_config(bootstrap, client_config, **tuning)
    deadline_s = (
        config.get("bootstrap_timeout_ms", _CONNECT_TIMEOUT_MS)
        + config.get("request_timeout_ms", _METADATA_TIMEOUT_MS)
    ) / 1000 + 1.0
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            consumer = _open_consumer(bootstrap, client_config, **tuning)
            try:
                outcome["value"] = work(consumer)
            finally:
                consumer.close()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="sferp-kafka-metadata", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise KafkaConnectorError(
            f"no answer from Kafka at {bootstrap} within {deadline_s:.0f} s "
            "(is security_protocol right for this listener?)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def list_partitions(
    bootstrap: str,
    topics: Iterable[str],
    client_config: dict[str, Any] | None = None,
    *,
    missing_ok: bool = False,
    warn: bool = False,
) -> list[tuple[str, int]]:
    """Every `(topic, partition)` of the topics.

    A missing topic raises KafkaConnectorError, unless `missing_ok`: then it has
    no partitions (with a warning when `warn`); all of them missing is an error
    still.
    """
    topics = list(topics)

    def work(consumer: KafkaConsumer) -> list[tuple[str, int]]:
        return [
            (tp.topic, tp.partition) for tp in _partitions(consumer, bootstrap, topics, missing_ok)
        ]

    found = _within_deadline(bootstrap, client_config, work)
    if warn:
        present = {t for t, _ in found}
        for topic in topics:
            if topic not in present:
                log.warning(
                    "topic %r does not exist on Kafka at %s: this run does not read it "
                    "(start sferp again once it exists)",
                    topic,
                    bootstrap,
                )
    return found


# Input topics of this process's Kafka source that did not exist when it listed its
# partitions (KafkaSource.list_parts): read by nobody until sferp restarts.
_UNREAD_TOPICS: set[str] = set()


def unread_topics() -> frozenset[str]:
    """The configured input topics the running flow does not read (they did not exist)."""
    return frozenset(_UNREAD_TOPICS)


def end_offsets(
    bootstrap: str, topics: Iterable[str], client_config: dict[str, Any] | None = None
) -> dict[tuple[str, int], int]:
    """The current end offset (next offset to be written) of every partition of the topics.

    On the embedded broker (Tansu) this is the base offset of the last record
    batch + 1, so lag computed from it is approximate there.
    """
    topics = list(topics)

    def work(consumer: KafkaConsumer) -> dict[tuple[str, int], int]:
        tps = _partitions(consumer, bootstrap, topics)
        try:
            ends = consumer.end_offsets(tps, _OFFSETS_TIMEOUT_MS)
        except KafkaError as exc:
            raise KafkaConnectorError(
                f"cannot read end offsets from Kafka at {bootstrap}: {exc}"
            ) from exc
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}

    return _within_deadline(bootstrap, client_config, work)


def read_positions() -> dict[tuple[str, int], int]:
    """Next offset to read of every partition a `KafkaSource` reads in this process."""
    return dict(_POSITIONS)


class _KafkaPartition(StatefulSourcePartition[list[RawMessage], int]):
    """One topic partition, read by its own manually assigned consumer.

    A stall watchdog: when the partition is known to hold unread records (below
    the bounded end, or below the high watermark of the last fetch) and polls
    have brought none for `stall_s`, `reopen` opens a new consumer at the next
    offset to read and the old one is closed (if no new one can be opened, the
    old one stays and the check repeats). A bounded benchmark run once sat idle
    with every partition behind while the broker served other clients; a new
    consumer reads on from the same offset, so nothing is lost or read twice.
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        tp: TopicPartition,
        offset: int,
        end: int | None,
        batch_size: int,
        stop_event: threading.Event | None,
        reopen: Callable[[int], KafkaConsumer] | None = None,
        stall_s: float = STALL_S,
        linger_ms: int = 0,
    ) -> None:
        self._consumer = consumer
        self._tp = tp
        self._key = (tp.topic, tp.partition)
        self._offset = offset
        self._end = end
        self._batch_size = batch_size
        self._stop = stop_event
        self._idle = timedelta(0)
        self._awake: datetime | None = None
        self._reopen = reopen
        self._stall_s = stall_s
        self._last_data = time.monotonic()
        self.reopened = 0  # consumers replaced by the stall watchdog
        self._linger_s = linger_ms / 1000
        self._pending: list[RawMessage] = []  # read, not yet emitted (linger)
        self._due = 0.0  # wall-clock time at which `_pending` goes out
        _POSITIONS[self._key] = offset

    def next_batch(self) -> list[list[RawMessage]]:
        if self._stop is not None and self._stop.is_set():
            if self._pending:  # what was read goes out before the end
                return [self._release()]
            raise StopIteration
        want = self._batch_size - len(self._pending)
        try:
            records = (
                None  # the fetch in flight has not answered: a poll would only cost
                if fetch_pending(self._consumer)
                else self._consumer.poll(timeout_ms=0, max_records=want).get(self._tp)
            )
        except KafkaError as exc:
            raise KafkaConnectorError(
                f"error reading {self._tp.topic}[{self._tp.partition}] at offset "
                f"{self._offset}: {exc}"
            ) from exc
        if records:
            if type(records[0]) is RawMessage:  # connectors/kafka_records.py
                batch = records
            else:
                topic, part = self._key
                batch = [
                    RawMessage(topic, part, r.offset, r.key, r.value, r.timestamp) for r in records
                ]
            self._last_data = time.monotonic()
            if self._linger_s:
                return self._linger(batch)
            self._offset = records[-1].offset + 1
            _POSITIONS[self._key] = self._offset
            self._awake = None
            self._idle = timedelta(0)
            return [batch]
        if self._pending:
            if time.time() >= self._due:
                return [self._release()]
            self._back_off()
            return []

        # Nothing buffered. The consumer's position may still move past
        # offsets that hold no records (transaction markers, compacted gaps).
        position = self._consumer.position(self._tp, timeout_ms=0)
        if position is not None and position > self._offset:
            self._offset = position
            _POSITIONS[self._key] = position
        # Bounded: done once the end seen at start is reached and a fetch
        # answered at this position with nothing new (highwater is only set
        # by a completed fetch). The extra condition makes Tansu exact: its
        # reported end is the last batch's base offset + 1, and that whole
        # batch arrives in one fetch, so an empty poll after reaching the
        # end means the batch is drained.
        if (
            self._end is not None
            and self._offset >= self._end
            and self._consumer.highwater(self._tp) is not None
        ):
            raise StopIteration
        if self._reopen is not None and time.monotonic() - self._last_data > self._stall_s:
            self._check_stall(self._reopen)
        self._back_off()
        return []

    def _back_off(self) -> None:
        """Poll again in 1, 2, 4 ... 50 ms (idle partitions do not spin), or when pending is due."""
        self._idle = min(max(self._idle * 2, timedelta(milliseconds=1)), _IDLE_BACKOFF_MAX)
        awake = datetime.now(UTC) + self._idle
        if self._pending:
            awake = min(awake, datetime.fromtimestamp(self._due, UTC))
        self._awake = awake

    def _linger(self, batch: list[RawMessage]) -> list[list[RawMessage]]:
        """Hold live records until the next linger slot (or a full batch), then emit them.

        Slots are aligned to the wall clock (multiples of the linger), so the
        partitions of every worker emit in the same activation: the stages then
        see a few large batches instead of one small batch per fetch.
        """
        now = time.time()
        if self._pending:
            self._pending.extend(batch)
        else:
            self._pending = batch
            self._due = (now // self._linger_s + 1) * self._linger_s
        if len(self._pending) >= self._batch_size or now >= self._due:
            return [self._release()]
        self._idle = timedelta(0)
        self._back_off()
        return []

    def _release(self) -> list[RawMessage]:
        """Emit what lingered: the snapshot offset moves past it only now."""
        out, self._pending = self._pending, []
        self._offset = out[-1].offset + 1
        _POSITIONS[self._key] = self._offset
        self._awake = None
        self._idle = timedelta(0)
        return out

    def _check_stall(self, reopen: Callable[[int], KafkaConsumer]) -> None:
        """Replace the consumer when records wait but none came for `stall_s`."""
        self._last_data = time.monotonic()  # next check one period from now
        highwater = self._consumer.highwater(self._tp)
        behind = (self._end is not None and self._offset < self._end) or (
            highwater is not None and highwater > self._offset
        )
        if not behind:
            return
        log.warning(
            "kafka: %s[%d] brought no records for %.0f s while records wait at offset %d "
            "(end %s); reading on with a new consumer",
            self._tp.topic,
            self._tp.partition,
            self._stall_s,
            self._offset,
            self._end if self._end is not None else highwater,
        )
        try:
            new = reopen(self._offset)
        except KafkaConnectorError as exc:  # broker unreachable: keep waiting, retry later
            log.warning("kafka: cannot open a new consumer yet: %s", exc)
            return
        old, self._consumer = self._consumer, new
        self.reopened += 1
        try:
            old.close()
        except Exception:  # noqa: BLE001 - the old consumer is abandoned either way
            log.debug("kafka: closing the stalled consumer failed", exc_info=True)

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class KafkaSource(FixedPartitionedSource[list[RawMessage], int]):
    """Read Kafka topics; emits one list of `RawMessage`s per fetch (per linger slot, live).

    Topic partitions are the unit of parallelism: each is one Bytewax source
    partition named `<topic>#<partition>`, read by its own manually assigned
    consumer (no consumer group, nothing committed to Kafka). Snapshots hold the
    next offset to read, and a resume starts exactly there, so this source
    supports exactly-once input; with at-least-once sinks the whole flow is
    at-least-once.

    `bounded=True` reads each partition up to the end offset seen when the
    partition is built, then ends it at the first fetch that brings nothing new:
    everything written before the start is read (also on Tansu, whose reported
    end falls inside the last record batch), plus possibly some of what arrives
    while it catches up; the snapshot continues right after it. A set
    `stop_event` ends every partition at its next call, so the dataflow drains,
    snapshots and exits.

    `start="latest"` starts at the reported log end. On Tansu that falls inside
    the last record batch written before the start (its base offset + 1); the
    reader drops that batch whole (`kafka_records.skip_history_batches`), so
    history is not read there either.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: list[str],
        *,
        start: str = "earliest",
        bounded: bool = False,
        batch_size: int = 8000,
        client_config: dict[str, Any] | None = None,
        stop_event: threading.Event | None = None,
        stall_s: float = STALL_S,
        linger_ms: int = 0,
    ) -> None:
        """Validate and store settings; nothing connects until the dataflow runs.

        :arg bootstrap: `host:port[,host:port...]`.
        :arg topics: topics to read, all partitions of each.
        :arg start: `earliest` or `latest`, where a partition without resume
            state starts.
        :arg bounded: stop at the end offsets seen at start (`--until-caught-up`).
        :arg batch_size: most messages per emitted list.
        :arg client_config: kafka-python settings passed through (security_protocol,
            sasl_*, ssl_*, and any consumer setting to override ours).
        :arg stop_event: when set, every partition ends at its next call.
        :arg stall_s: a partition with records waiting that brings none for this
            long reads on with a new consumer (`_KafkaPartition`).
        :arg linger_ms: live reading: hold what a partition read until the next
            multiple of this many ms on the wall clock (or a full batch), so
            downstream steps get fewer, larger batches; 0 emits every fetch.
        """
        if isinstance(topics, str):
            raise TypeError("topics must be a list of topic names, not a string")
        topics = list(topics)
        if not topics:
            raise ValueError("at least one topic is required")
        for topic in topics:
            if not topic or _PART_SEP in topic:
                raise ValueError(f"invalid topic name {topic!r}")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if stall_s <= 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        if linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0, got {linger_ms}")
        if not bootstrap:
            raise ValueError("bootstrap must name at least one broker")
        self._bootstrap = bootstrap
        self._topics = topics
        self._start = start
        self._bounded = bounded
        self._batch_size = batch_size
        self._client_config = _check_settings(
            client_config or {}, KafkaConsumer.DEFAULT_CONFIG, "consumer"
        )
        self._stop_event = stop_event
        self._stall_s = stall_s
        self._linger_ms = 0 if bounded else linger_ms

    def list_parts(self) -> list[str]:
        """Every partition of every topic that exists (none of them existing is an error).

        A missing topic has no partitions: a bounded run has nothing to read from it;
        a live run fixes its partitions now, so it is recorded (`unread_topics`) and
        the process reports not ready until a restart reads it.
        """
        found = list_partitions(self._bootstrap, self._topics, self._client_config, missing_ok=True)
        present = {topic for topic, _ in found}
        _UNREAD_TOPICS.clear()
        _UNREAD_TOPICS.update(t for t in self._topics if t not in present)
        return [f"{topic}{_PART_SEP}{part}" for topic, part in found]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaPartition:
        """Open a consumer for one partition at its resume offset (or `start`)."""
        topic, _, part = for_part.rpartition(_PART_SEP)
        if topic not in self._topics:
            raise KafkaConnectorError(
                f"cannot resume partition {for_part!r}: topic {topic!r} is not among "
                f"the configured topics {self._topics}"
            )
        tp = TopicPartition(topic, int(part))
        consumer = self._consumer(tp)
        try:
            end = None
            if resume_state is not None:
                offset = resume_state
            elif self._start == "earliest":
                offset = consumer.beginning_offsets([tp], _OFFSETS_TIMEOUT_MS)[tp]
            else:
                offset = consumer.end_offsets([tp], _OFFSETS_TIMEOUT_MS)[tp]
                skip_history_batches(consumer, topic, tp.partition, offset)  # Tansu's end
            if self._bounded:
                end = consumer.end_offsets([tp], _OFFSETS_TIMEOUT_MS)[tp]
            consumer.seek(tp, offset)
        except KafkaError as exc:
            consumer.close()
            raise KafkaConnectorError(
                f"cannot open {topic}[{part}] on Kafka at {self._bootstrap}: {exc}"
            ) from exc
        except BaseException:
            consumer.close()
            raise

        latest_start = resume_state is None and self._start != "earliest"

        def reopen(at: int) -> KafkaConsumer:
            fresh = self._consumer(tp)
            if latest_start and at == offset:  # nothing read yet: still after the history
                skip_history_batches(fresh, topic, tp.partition, offset)
            fresh.seek(tp, at)
            return fresh

        return _KafkaPartition(
            consumer,
            tp,
            offset,
            end,
            self._batch_size,
            self._stop_event,
            reopen,
            self._stall_s,
            self._linger_ms,
        )

    def _consumer(self, tp: TopicPartition) -> KafkaConsumer:
        """A consumer of `tp` alone, with the source's fetch settings."""
        fetch_bytes = partition_fetch_bytes(self._batch_size)
        consumer = _open_consumer(
            self._bootstrap,
            self._client_config,
            auto_offset_reset="earliest",  # a resume offset lost to retention
            max_poll_records=self._batch_size,
            max_partition_fetch_bytes=fetch_bytes,
            fetch_max_bytes=max(fetch_bytes, 50 << 20),
            fetch_max_wait_ms=200,
        )
        install_fast_reader(consumer)  # RawMessages straight from v2 batches
        queue_fetches(consumer)  # polls do not wait for the I/O thread to send fetches
        consumer.assign([tp])
        return consumer


class _KafkaSinkPartition(StatelessSinkPartition[SinkItem]):
    """One producer. `send` is asynchronous; `flush` waits for and checks every delivery."""

    def __init__(self, producer: KafkaProducer, bootstrap: str) -> None:
        self._producer = producer
        self._bootstrap = bootstrap
        # Every send resolves within delivery_timeout_ms; a flush that outlasts
        # it (seen with kafka-python against a stalled broker) is a failure too.
        config = producer.config
        self._flush_timeout_s = (
            config.get("delivery_timeout_ms", 120_000) + config.get("request_timeout_ms", 30_000)
        ) / 1000 + 1.0
        self._sent = 0
        self._failed: list[tuple[str, BaseException]] = []
        # Partition of each key of a topic, computed as kafka-python's (and the
        # Java client's) default partitioner does; views keys repeat, murmur2 is slow.
        self._partitions: dict[str, tuple[list[int], dict[bytes, int]]] = {}

    def _partition(self, topic: str, key: bytes | None) -> int | None:
        if key is None:
            return None
        known = self._partitions.get(topic)
        if known is None:
            parts = self._producer.partitions_for(topic)
            if not parts:
                return None  # unknown topic: let send() report it
            known = self._partitions[topic] = (sorted(parts), {})
        ordered, cache = known
        p = cache.get(key)
        if p is None:
            if len(cache) >= _PARTITION_CACHE:
                cache.clear()
            p = cache[key] = ordered[(murmur2(key) & 0x7FFFFFFF) % len(ordered)]
        return p

    def send(self, items: Iterable[SinkItem]) -> None:
        """Hand items to the producer without waiting; raise if an earlier delivery failed."""
        self._raise_failed()
        send = self._producer.send
        partition = self._partition
        failed = self._failed
        n = 0
        try:
            for topic, key, value in items:
                fut = send(topic, key=key, value=value, partition=partition(topic, key))
                fut.add_errback(lambda exc, t=topic: failed.append((t, exc)))
                n += 1
        except KafkaError as exc:
            raise KafkaConnectorError(f"cannot write to Kafka at {self._bootstrap}: {exc}") from exc
        self._sent += n

    def flush(self) -> None:
        """Wait until everything sent so far is delivered; raise if anything was not."""
        if not self._sent:
            return
        try:
            self._producer.flush(timeout=self._flush_timeout_s)
        except KafkaError as exc:
            raise KafkaConnectorError(f"cannot write to Kafka at {self._bootstrap}: {exc}") from exc
        self._raise_failed()
        self._sent = 0

    def _raise_failed(self) -> None:
        if self._failed:
            topic, exc = self._failed[0]
            raise KafkaConnectorError(
                f"{len(self._failed)} messages not delivered to Kafka at "
                f"{self._bootstrap}; first: topic {topic!r}: {exc}"
            )

    def write_batch(self, items: list[SinkItem]) -> None:
        self.send(items)
        self.flush()

    def close(self) -> None:
        try:
            self.flush()  # raises for anything not delivered
        finally:
            try:
                self._producer.close(timeout=self._flush_timeout_s)
            except KafkaError as exc:
                _force_close(self._producer)
                raise KafkaConnectorError(
                    f"cannot flush the producer for Kafka at {self._bootstrap} on close: {exc}"
                ) from exc


def _force_close(producer: KafkaProducer) -> None:
    """Stop a producer whose `close` raised, dropping what it could not deliver.

    kafka-python's `close` flushes first and raises when deliveries are still
    pending, before it stops its I/O thread: the thread would go on reconnecting
    for the life of the process, and the producer's `__del__` would try to close
    it again. Its sender's own `force_close` (what `close` does after a timeout)
    ends the thread.
    """
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
        sender.join(1)
    producer._closed = True  # nothing left to close: `__del__` returns at once


class KafkaSink(DynamicSink[SinkItem]):
    """Write `(topic, key, value)` items to Kafka; a None value is a tombstone.

    Workers are the unit of parallelism: one producer per worker. Each batch is
    flushed and every delivery checked before the batch returns, and a failed
    delivery raises, so nothing is lost silently. Messages written after the
    last snapshot are written again after a resume: at-least-once. Items are
    keyed, so a compacted topic keeps the latest version of each key.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        client_config: dict[str, Any] | None = None,
        producer_config: dict[str, Any] | None = None,
        own_process: bool = False,
        nice: int = 0,
    ) -> None:
        """Validate and store settings; the producer is created per worker in `build`.

        :arg bootstrap: `host:port[,host:port...]`.
        :arg client_config: kafka-python security/connection settings shared with
            the source (security_protocol, sasl_*, ssl_*).
        :arg producer_config: producer settings that override ours (acks,
            linger_ms, compression_type, delivery_timeout_ms...).
        :arg own_process: run the producer in a child process
            (`kafka_producer_proc`): for outputs busy enough that kafka-python's
            per-record cost would hold the worker's GIL.
        :arg nice: with `own_process`, run the child that much lower in priority
            than the worker (`flow.background_nice`, sferp/priority.py).
        """
        if not bootstrap:
            raise ValueError("bootstrap must name at least one broker")
        known = KafkaProducer.DEFAULT_CONFIG
        self._bootstrap = bootstrap
        self._client_config = _check_settings(client_config or {}, known, "producer")
        self._producer_config = _check_settings(producer_config or {}, known, "producer")
        self._own_process = own_process
        self._nice = nice

    def build(self, step_id: str, worker_index: int, worker_count: int) -> Any:
        """Create this worker's producer (a `_KafkaSinkPartition` or a `ProducerProcess`)."""
        known = KafkaProducer.DEFAULT_CONFIG
        defaults = {
            "acks": "all",
            "enable_idempotence": True,  # retries keep per-key order
            "linger_ms": 5,
            "batch_size": 256 * 1024,
            "bootstrap_timeout_ms": _CONNECT_TIMEOUT_MS,
            "allow_auto_create_topics": False,
        }
        config = {k: v for k, v in defaults.items() if k in known}
        config["bootstrap_servers"] = self._bootstrap
        config.update(self._client_config)
        config.update(self._producer_config)
        if self._own_process:
            from sferp.connectors.kafka_producer_proc import ProducerProcess

            return ProducerProcess(config, self._bootstrap, self._nice)
        try:
            producer = KafkaProducer(**config)
        except KafkaError as exc:
            raise KafkaConnectorError(
                f"cannot connect to Kafka at {self._bootstrap}: {exc}"
            ) from exc
        return _KafkaSinkPartition(producer, self._bootstrap)
