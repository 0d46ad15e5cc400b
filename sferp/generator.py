"""Realistic synthetic Salesforce CDC and ERP Debezium change streams (`sferp generate`).

The stream is a simulated business period (sferp.generator_sim) encoded in
every wire form the contract accepts (sferp.generator_forms), with delivery
faults laid over it (sferp.generator_mix): duplicates, disorder and malformed
messages in the fractions asked for. It goes to a Kafka-compatible broker or
to JSONL files. Same seed and knobs give byte-identical output.

Messages are keyed as in CONTRACT §1 (Salesforce: the first record Id; ERP:
compact JSON of the primary key) and placed in partition
`murmur2(key) % partitions`, the Java client's default partitioner, so a
real Kafka producer would put them in the same partitions; messages without
a key go to `crc32(value) % partitions`. The order of `generate` is the
production order, and therefore the order a consumer of each partition sees.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from sferp.events import RawMessage
from sferp.generator_mix import mix
from sferp.generator_sim import Simulation
from sferp.logfmt import first_line
from sferp.usage import int_between

__all__ = [
    "BASE_TIME_MS",
    "DEFAULT_TOPICS",
    "GeneratedMessage",
    "GeneratorConfig",
    "cli_generate",
    "generate",
    "generate_labelled",
    "iter_jsonl",
    "partition_for",
    "produce",
    "read_jsonl",
    "write_jsonl",
]

ROLES = ("sf_cdc", "erp_items", "erp_inventory", "erp_sales_orders")
DEFAULT_TOPICS: dict[str, str] = {
    "sf_cdc": "sf.cdc",
    "erp_items": "erp.public.items",
    "erp_inventory": "erp.public.inventory",
    "erp_sales_orders": "erp.public.sales_orders",
}
BASE_TIME_MS = int(datetime(2026, 11, 2, 8, 0, tzinfo=UTC).timestamp() * 1000)


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Fractions are of the output messages; `topics` is keyed by role."""

    orders: int = 1000
    duplicates: float = 0.05
    disorder: float = 0.10
    bad: float = 0.01
    partitions: int = 3
    seed: int = 42
    topics: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TOPICS), hash=False)
    base_time_ms: int = BASE_TIME_MS

    def __post_init__(self) -> None:
        if isinstance(self.orders, bool) or not isinstance(self.orders, int) or self.orders < 0:
            raise ValueError(f"orders must be an integer >= 0, got {self.orders!r}")
        for name in ("duplicates", "disorder", "bad"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1), got {v!r}")
        if self.duplicates + self.bad >= 0.9:
            raise ValueError(
                f"duplicates + bad must stay below 0.9, got {self.duplicates + self.bad:g}"
            )
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int):
            raise ValueError(f"partitions must be an integer, got {self.partitions!r}")
        if not 1 <= self.partitions <= 10_000:
            raise ValueError(f"partitions must be between 1 and 10000, got {self.partitions}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        topics = dict(DEFAULT_TOPICS)
        topics.update({k: v for k, v in self.topics.items() if k in DEFAULT_TOPICS})
        names = [topics[r] for r in ROLES]
        if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"topics must be four distinct non-empty names, got {topics}")
        object.__setattr__(self, "topics", topics)


class GeneratedMessage(NamedTuple):
    """One message as it is produced: topic, partition, key and value bytes (None = null)."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None


# --- partitioning ----------------------------------------------------------------------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (32-bit, seed 0x9747b28c), as the Java client's default partitioner."""
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    n4 = length // 4
    for k in struct.unpack_from(f"<{n4}I", data):
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length & 3
    tail = n4 * 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for(key: bytes | None, value: bytes | None, partitions: int) -> int:
    """The partition of a message: murmur2 of the key (positive) mod P; keyless: crc32 of value."""
    if key is None:
        return zlib.crc32(value or b"") % partitions
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# --- generation ------------------------------------------------------------------------------


def generate_labelled(cfg: GeneratorConfig) -> Iterator[tuple[GeneratedMessage, str]]:
    """Like `generate`, with the outcome the flow must count for each message.

    Labels: `applied`, `ignored` (other entities, tombstones, truncates),
    `duplicate` (a byte copy of an earlier applied message) and
    `dead_letter:<reason>` with the reason code of docs/semantics.md §1.
    """
    sim = Simulation(cfg.orders, cfg.seed, cfg.base_time_ms)
    topics = cfg.topics
    parts = cfg.partitions
    cache: dict[bytes, int] = {}
    for role, key, value, label in mix(
        sim.events(), cfg.duplicates, cfg.disorder, cfg.bad, cfg.seed
    ):
        if key is None:
            p = zlib.crc32(value or b"") % parts
        else:
            p = cache.get(key, -1)
            if p < 0:
                if len(cache) > 400_000:
                    cache.clear()
                p = cache[key] = (murmur2(key) & 0x7FFFFFFF) % parts
        yield GeneratedMessage(topics[role], p, key, value), label


def generate(cfg: GeneratorConfig) -> Iterator[GeneratedMessage]:
    """The synthetic change stream, in production order."""
    for msg, _ in generate_labelled(cfg):
        yield msg


# --- JSONL files -----------------------------------------------------------------------------


def _text_field(name: str, data: bytes | None, line: dict[str, Any]) -> None:
    if data is None:
        line[name] = None
        return
    try:
        line[name] = data.decode()
    except UnicodeDecodeError:
        line[name + "_b64"] = base64.b64encode(data).decode()


def write_jsonl(
    cfg: GeneratorConfig,
    out_dir: str | os.PathLike[str],
    messages: Iterable[GeneratedMessage] | None = None,
) -> dict[str, int]:
    """Write the stream (or `messages`) as one `<topic>.jsonl` per topic; returns counts.

    Each line is `{"seq", "partition", "key", "value"}`: `seq` is the global
    production index; key and value are text, or `key_b64`/`value_b64` when
    the bytes are not valid UTF-8; null stays null.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {cfg.topics[r]: 0 for r in ROLES}
    files = {t: open(out / f"{t}.jsonl", "wb", buffering=1 << 20) for t in counts}  # noqa: SIM115
    dumps = orjson.dumps
    try:
        stream = generate(cfg) if messages is None else messages
        for seq, (topic, partition, key, value) in enumerate(stream):
            line: dict[str, Any] = {"seq": seq, "partition": partition}
            try:
                line["key"] = None if key is None else key.decode()
            except UnicodeDecodeError:
                _text_field("key", key, line)
            try:
                line["value"] = None if value is None else value.decode()
            except UnicodeDecodeError:
                _text_field("value", value, line)
            files[topic].write(dumps(line) + b"\n")
            counts[topic] += 1
    finally:
        for f in files.values():
            f.close()
    return counts


def _bytes_field(line: dict[str, Any], name: str) -> bytes | None:
    if name in line:
        text = line[name]
        return None if text is None else text.encode()
    b64 = line.get(name + "_b64")
    return None if b64 is None else base64.b64decode(b64)


def iter_jsonl(in_dir: str | os.PathLike[str]) -> Iterator[RawMessage]:
    """Stream the messages of a `write_jsonl` directory in production order.

    Offsets are assigned per (topic, partition) in file order, as a broker
    would; the timestamp is unknown (-1).
    """

    def one(path: Path) -> Iterator[tuple[int, RawMessage]]:
        topic = path.name[: -len(".jsonl")]
        offsets: dict[int, int] = {}
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                line = orjson.loads(raw)
                p = line["partition"]
                off = offsets.get(p, 0)
                offsets[p] = off + 1
                msg = RawMessage(
                    topic, p, off, _bytes_field(line, "key"), _bytes_field(line, "value"), -1
                )
                yield line.get("seq", 0), msg

    paths = sorted(Path(in_dir).glob("*.jsonl"))
    for _, msg in heapq.merge(*(one(p) for p in paths), key=lambda x: x[0]):
        yield msg


def read_jsonl(in_dir: str | os.PathLike[str]) -> list[RawMessage]:
    """All messages of a `write_jsonl` directory, in production order (see `iter_jsonl`)."""
    return list(iter_jsonl(in_dir))


# --- Kafka -----------------------------------------------------------------------------------

_PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": 1,
    "linger_ms": 50,
    "batch_size": 1024 * 1024,
    "max_request_size": 4 * 1024 * 1024,  # the over-size test messages are ~1.1 MiB
    "max_in_flight_requests_per_connection": 1,  # keep production order on retries
    "retries": 5,
    "bootstrap_timeout_ms": 10_000,
}
_BOOTSTRAP_TIMEOUT_MS = 10_000


def _ensure_topics(bootstrap: str, client_config: dict[str, Any], cfg: GeneratorConfig) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin_keys = set(KafkaAdminClient.DEFAULT_CONFIG)
    conf = {"bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS}
    conf.update({k: v for k, v in client_config.items() if k in admin_keys})
    conf["bootstrap_servers"] = bootstrap
    admin = KafkaAdminClient(**conf)
    try:
        existing = set(admin.list_topics())
        for role in ROLES:
            name = cfg.topics[role]
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, cfg.partitions, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def produce(
    cfg: GeneratorConfig,
    bootstrap: str,
    client_config: dict[str, Any] | None = None,
    create_topics: bool = True,
    messages: Iterable[GeneratedMessage] | None = None,
) -> dict[str, int]:
    """Produce the stream to Kafka, each message into its computed partition; returns counts.

    Delivery: every send is acknowledged (acks=1 by default) before this
    returns, and one request in flight per connection keeps each partition in
    production order even across retries; a failed send raises. Topics are
    created with `cfg.partitions` partitions when missing; an existing topic
    with fewer partitions is an error.
    """
    from kafka import KafkaProducer

    client_config = dict(client_config or {})
    if create_topics:
        _ensure_topics(bootstrap, client_config, cfg)
    conf = dict(_PRODUCER_DEFAULTS)
    conf.update(client_config)
    conf["bootstrap_servers"] = bootstrap
    producer = KafkaProducer(**conf)
    failures: list[BaseException] = []
    counts = {cfg.topics[r]: 0 for r in ROLES}
    try:
        deadline = time.monotonic() + 30
        for topic in counts:
            while True:
                parts = producer.partitions_for(topic)
                if parts and len(parts) >= cfg.partitions:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"topic {topic!r} has {len(parts or ())} partitions, need {cfg.partitions}"
                    )
                time.sleep(0.1)
        send = producer.send
        on_error = failures.append
        for topic, partition, key, value in generate(cfg) if messages is None else messages:
            send(topic, value=value, key=key, partition=partition).add_errback(on_error)
            counts[topic] += 1
            if failures:
                break
        producer.flush()
    finally:
        producer.close()
    if failures:
        raise RuntimeError(f"producing failed: {failures[0]!r}")
    return counts


# --- command line ----------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return v


def _parser() -> _Parser:
    p = _Parser(
        prog="sferp generate",
        description="Generate a realistic Salesforce CDC + ERP Debezium change stream.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--bootstrap", metavar="HOST:PORT", help="produce to this Kafka broker")
    where.add_argument("--out", metavar="DIR", help="write <topic>.jsonl files here")
    p.add_argument("--extracts", metavar="DIR", help="ERP tables as extract files here instead")
    p.add_argument(
        "--extract-tables",
        default="items,inventory,sales_orders",
        help="tables exported as files with --extracts (default: all three)",
    )
    p.add_argument(
        "--orders", type=int_between(0), default=1000, help="Salesforce orders (default 1000)"
    )
    p.add_argument("--duplicates", type=_fraction, default=0.05, help="fraction of exact copies")
    p.add_argument("--disorder", type=_fraction, default=0.10, help="fraction delivered late")
    p.add_argument("--bad", type=_fraction, default=0.01, help="fraction of malformed messages")
    p.add_argument("--partitions", type=int_between(1), default=3, help="partitions per topic")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    return p


def cli_generate(argv: list[str]) -> int:
    """`sferp generate ...`: 0 on success, 2 for bad usage (one line on stderr), 1 otherwise."""
    try:
        args = _parser().parse_args(argv)
        cfg = GeneratorConfig(
            orders=args.orders,
            duplicates=args.duplicates,
            disorder=args.disorder,
            bad=args.bad,
            partitions=args.partitions,
            seed=args.seed,
        )
    except _UsageError as exc:
        print(f"sferp generate: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"sferp generate: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.bootstrap is None and args.out is None and args.extracts is None:
        print(
            "sferp generate: error: one of --bootstrap, --out, --extracts is required",
            file=sys.stderr,
        )
        return 2
    messages = ext = None
    if args.extracts is not None:  # README "Batch extracts"
        from sferp.generator_extracts import ExtractGenerator

        tables = tuple(t.strip() for t in args.extract_tables.split(",") if t.strip())
        try:
            ext = ExtractGenerator(cfg, args.extracts, tables)
        except ValueError as exc:
            print(f"sferp generate: error: --extract-tables: {exc}", file=sys.stderr)
            return 2
        messages = ext.messages()
    started = time.monotonic()
    try:
        if args.out is not None:
            counts = write_jsonl(cfg, args.out, messages)
            where = args.out
        elif args.bootstrap is not None:
            counts = produce(cfg, args.bootstrap, messages=messages)
            where = args.bootstrap
        else:
            counts, where = {}, ""
            ext.run()  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - one line for the user, exit 1
        print(f"sferp generate: {first_line(exc)}", file=sys.stderr)
        return 1
    total = sum(counts.values())
    took = time.monotonic() - started
    detail = ", ".join(f"{t}={n}" for t, n in counts.items())
    if where:
        print(f"generated {total} messages to {where} in {took:.1f} s ({detail})")
    if ext is not None:
        files = ext.world.files
        bad = sum(1 for f in files if f.fault)
        print(f"wrote {len(files)} extract files ({bad} malformed) to {args.extracts}")
    return 0
