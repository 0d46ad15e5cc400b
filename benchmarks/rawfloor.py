"""The raw floor: kafka-python consume + orjson decode of the input topics, nothing else.

`python -m sferp.benchmarks.rawfloor --bootstrap HOST:PORT --batch-size N TOPIC...`
reads every partition of the topics to its end, the way the flow's KafkaSource
does (one manually assigned consumer per partition, the same fetch settings,
non-blocking polls of up to `batch_size` records, the same bounded-end rule), and
parses every value with orjson. It prints one JSON line with its counts. No
Bytewax, no state, no output: the most a Python process can do with this input,
and the yardstick the flow is measured against.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
from kafka import KafkaConsumer, TopicPartition
from sferp.connectors.kafka import list_partitions, partition_fetch_bytes


def fetch_settings(batch_size: int) -> dict[str, int]:
    """The consumer fetch settings of `sferp.connectors.kafka.KafkaSource.build_part`."""
    fetch_bytes = partition_fetch_bytes(batch_size)
    return {
        "max_poll_records": batch_size,
        "max_partition_fetch_bytes": fetch_bytes,
        "fetch_max_bytes": max(fetch_bytes, 50 << 20),
        "fetch_max_wait_ms": 200,
    }


def consume(bootstrap: str, topics: list[str], batch_size: int) -> dict[str, int]:
    """Read every partition to its end and decode each value; return counts."""
    consumers = []
    for topic, part in list_partitions(bootstrap, topics):
        tp = TopicPartition(topic, part)
        c = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **fetch_settings(batch_size),
        )
        c.assign([tp])
        start = c.beginning_offsets([tp], 10_000)[tp]
        end = c.end_offsets([tp], 10_000)[tp]
        c.seek(tp, start)
        consumers.append([c, tp, start, end])
    messages = decoded = not_json = nbytes = 0
    loads = orjson.loads
    bad = orjson.JSONDecodeError
    active = list(consumers)
    while active:
        got_any = False
        for entry in list(active):
            c, tp, offset, end = entry
            records = c.poll(timeout_ms=0, max_records=batch_size).get(tp)
            if records:
                got_any = True
                for r in records:
                    v = r.value
                    if v is None:
                        continue
                    nbytes += len(v)
                    try:
                        loads(v)
                        decoded += 1
                    except bad:
                        not_json += 1
                messages += len(records)
                entry[2] = records[-1].offset + 1
                continue
            # The KafkaSource rule: done at the end seen at start once a fetch at
            # this position answered with nothing new (exact on Tansu too).
            pos = c.position(tp, timeout_ms=0)
            if pos is not None and pos > offset:
                entry[2] = offset = pos
            if offset >= end and c.highwater(tp) is not None:
                active.remove(entry)
        if not got_any:
            time.sleep(0.001)
    for c, *_ in consumers:
        c.close()
    return {
        "messages": messages,
        "decoded": decoded,
        "not_json": not_json,
        "value_bytes": nbytes,
        "partitions": len(consumers),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line of the raw floor (one JSON line on stdout)."""
    p = argparse.ArgumentParser(prog="python -m sferp.benchmarks.rawfloor")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--batch-size", type=int, default=8000)
    p.add_argument("topics", nargs="+")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    counts = consume(args.bootstrap, args.topics, args.batch_size)
    counts["seconds"] = round(time.monotonic() - t0, 3)
    print(orjson.dumps(counts).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
