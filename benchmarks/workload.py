"""The benchmark's input: generated streams, topic sets, and pre-loading them into the broker.

Three kinds of stream:

- the main stream: `sferp generate`'s realistic mix (duplicates, disorder, bad
  messages), cut at exactly the requested number of messages;
- a fill stream: the first change of each record from the same simulation, one
  message per record, so N messages leave about N live records (an initial load);
  it measures memory per live record;
- live streams for the latency phases: the main stream again on fresh topics,
  extended by a second generated period (other seed, later event times) when a
  phase needs more messages than the main stream has.

Pre-loading forks one producer process per core (each takes whole partitions,
so every partition keeps its production order) because a single kafka-python
producer is the bottleneck of loading a million messages.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from sferp.broker import EmbeddedBroker
from sferp.events import RawMessage
from sferp.generator import (
    BASE_TIME_MS,
    DEFAULT_TOPICS,
    ROLES,
    GeneratorConfig,
    generate_labelled,
    partition_for,
)
from sferp.generator_sim import Simulation
from sferp.reference import ReferenceConfig

OUTPUT_ROLES = ("out_inventory", "out_orders", "out_exceptions", "dlq")
_REFERENCE_ROLE = {
    "sf_cdc": "salesforce",
    "erp_items": "items",
    "erp_inventory": "inventory",
    "erp_sales_orders": "sales_orders",
}
_DEFAULT_OUTPUTS = {
    "out_inventory": "reconciled.inventory",
    "out_orders": "reconciled.orders",
    "out_exceptions": "reconciled.exceptions",
    "dlq": "integration.dlq",
}
# Messages per order in the generated mix (measured: 11.4); a little low on purpose
# so that one generation pass is almost always enough.
_MESSAGES_PER_ORDER = 11.0
_RECORDS_PER_ORDER = 3.6
_DAY_MS = 86_400_000

# The generator's producer settings (sferp.generator), acks from the partition leader.
_PRODUCER = {
    "acks": 1,
    "linger_ms": 20,
    "batch_size": 1024 * 1024,
    "max_request_size": 4 * 1024 * 1024,  # the generator's over-size messages are ~1.1 MiB
    "max_in_flight_requests_per_connection": 1,  # per-partition order, also on retries
    "retries": 5,
}


@dataclass(frozen=True)
class TopicSet:
    """The eight topic names one run reads and writes, under a common prefix."""

    prefix: str
    partitions: int

    @property
    def inputs(self) -> dict[str, str]:
        """Input role -> topic name."""
        return {role: f"{self.prefix}.{DEFAULT_TOPICS[role]}" for role in ROLES}

    @property
    def outputs(self) -> dict[str, str]:
        """Output role -> topic name."""
        return {role: f"{self.prefix}.{_DEFAULT_OUTPUTS[role]}" for role in OUTPUT_ROLES}

    def reference_config(self) -> ReferenceConfig:
        """The reference model's settings for these topics."""
        return ReferenceConfig(topics={self.inputs[r]: _REFERENCE_ROLE[r] for r in ROLES})

    def create(self, broker: EmbeddedBroker) -> None:
        """Create every topic of the set (inputs and outputs with `partitions` partitions)."""
        names = [*self.inputs.values(), *self.outputs.values()]
        broker.create_topics({n: self.partitions for n in names})

    def write_config(self, path: Path) -> Path:
        """A `sferp run` configuration file naming these topics."""
        lines = ["[topics]"]
        lines += [f'{role} = "{name}"' for role, name in {**self.inputs, **self.outputs}.items()]
        path.write_text("\n".join(lines) + "\n")
        return path


@dataclass
class Stream:
    """Messages in production order (offsets as the broker will assign them), with labels.

    `labels[i]` is the generator's expected outcome of `messages[i]` (`applied`,
    `duplicate`, `ignored`, `dead_letter:<reason>`).
    """

    messages: list[RawMessage]
    labels: list[str]
    topics: TopicSet
    orders: int

    def __len__(self) -> int:
        return len(self.messages)

    def payload_bytes(self) -> int:
        """Sum of key and value sizes."""
        return sum(len(m.value or b"") + len(m.key or b"") for m in self.messages)


def _with_offsets(
    items: Iterable[tuple[str, int, bytes | None, bytes | None, str]],
) -> tuple[list[RawMessage], list[str]]:
    nxt: dict[tuple[str, int], int] = defaultdict(int)
    msgs: list[RawMessage] = []
    labels: list[str] = []
    for topic, part, key, value, label in items:
        tp = (topic, part)
        msgs.append(RawMessage(topic, part, nxt[tp], key, value, -1))
        labels.append(label)
        nxt[tp] += 1
    return msgs, labels


def main_stream(
    n: int,
    topics: TopicSet,
    *,
    seed: int = 42,
    duplicates: float = 0.05,
    disorder: float = 0.20,
    bad: float = 0.001,
    base_time_ms: int = BASE_TIME_MS,
) -> Stream:
    """The first `n` messages of the generated mix (`sferp generate`'s stream)."""
    orders = max(10, math.ceil(n / _MESSAGES_PER_ORDER) + 20)
    while True:
        cfg = GeneratorConfig(
            orders=orders,
            duplicates=duplicates,
            disorder=disorder,
            bad=bad,
            partitions=topics.partitions,
            seed=seed,
            topics=topics.inputs,
            base_time_ms=base_time_ms,
        )
        items = (
            (m.topic, m.partition, m.key, m.value, label)
            for m, label in islice(generate_labelled(cfg), n)
        )
        msgs, labels = _with_offsets(items)
        if len(msgs) >= n:
            return Stream(msgs, labels, topics, orders)
        orders = math.ceil(orders * 1.25) + 10


def fill_stream(n: int, topics: TopicSet, *, seed: int = 7) -> Stream:
    """`n` messages, each the first applied change of a different record (an initial load).

    Taken from the same business simulation as the main stream, so records have
    realistic fields and views (orders, items, inventory) are built from them.
    """
    orders = max(10, math.ceil(n / _RECORDS_PER_ORDER) + 20)
    while True:
        sim = Simulation(orders, seed, BASE_TIME_MS)
        names = topics.inputs
        seen: set[tuple[str, bytes | None]] = set()
        picked: list[tuple[str, int, bytes | None, bytes | None, str]] = []
        for role, key, value, label, _ms in sim.events():
            if label != "applied" or (role, key) in seen:
                continue
            seen.add((role, key))
            picked.append(
                (names[role], partition_for(key, value, topics.partitions), key, value, label)
            )
            if len(picked) == n:
                break
        if len(picked) >= n:
            msgs, labels = _with_offsets(picked)
            return Stream(msgs, labels, topics, orders)
        orders = math.ceil(orders * 1.3) + 10


def retarget(stream: Stream, topics: TopicSet, n: int, *, seed: int) -> Stream:
    """The first `n` messages of `stream` on other topics, extended when it is too short.

    The extension is a second generated period (another seed, event times 60 days
    later), so every extra message is new to the flow and newer than the first part.
    """
    rename = {stream.topics.inputs[r]: topics.inputs[r] for r in ROLES}
    items = [
        (rename[m.topic], m.partition, m.key, m.value, label)
        for m, label in zip(stream.messages[:n], stream.labels[:n], strict=True)
    ]
    if n > len(items):
        extra = main_stream(
            n - len(items), topics, seed=seed, base_time_ms=BASE_TIME_MS + 60 * _DAY_MS
        )
        items += [
            (m.topic, m.partition, m.key, m.value, label)
            for m, label in zip(extra.messages, extra.labels, strict=True)
        ]
    msgs, labels = _with_offsets(items)
    return Stream(msgs, labels, topics, stream.orders)


# --- pre-loading -------------------------------------------------------------------------------


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """kafka-python producer settings of the benchmark (those of `sferp generate`)."""
    from kafka import KafkaProducer

    conf = {k: v for k, v in _PRODUCER.items() if k in KafkaProducer.DEFAULT_CONFIG}
    conf.update(overrides)
    conf["bootstrap_servers"] = bootstrap
    return conf


def _produce_groups(bootstrap: str, messages: Sequence[RawMessage], idx: list[int]) -> None:
    """Child process: produce the messages at positions `idx`, in that order."""
    from kafka import KafkaProducer

    producer = KafkaProducer(**producer_config(bootstrap))
    failures: list[BaseException] = []
    try:
        send = producer.send
        for i in idx:
            m = messages[i]
            send(m.topic, value=m.value, key=m.key, partition=m.partition).add_errback(
                failures.append
            )
            if failures:
                break
        producer.flush()
    finally:
        producer.close()
    if failures:
        raise SystemExit(f"producing failed: {failures[0]!r}")


def preload(bootstrap: str, messages: Sequence[RawMessage], processes: int = 0) -> None:
    """Produce every message into its partition, in parallel processes (one per core).

    Each process produces whole partitions, in production order, so the broker
    assigns every message the offset it has in `messages`.
    """
    processes = processes or max(1, min(4, os.cpu_count() or 1))
    by_tp: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, m in enumerate(messages):
        by_tp[(m.topic, m.partition)].append(i)
    shares: list[list[int]] = [[] for _ in range(processes)]
    for _tp, idx in sorted(by_tp.items(), key=lambda kv: -len(kv[1])):
        min(shares, key=len).extend(idx)
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_produce_groups, args=(bootstrap, messages, share), daemon=True)
        for share in shares
        if share
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"pre-loading the broker failed (producer exit codes {failed})")
