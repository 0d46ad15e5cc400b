"""A textbook Bytewax flow over the same input, to show what sferp's design gains.

`python -m sferp.benchmarks.textbook --bootstrap HOST:PORT TOPIC...` runs the
flow most Bytewax examples would suggest: one item per message, `key_on` +
`stateful_map` per event, one step per concern:

    KafkaSource -> explode batches -> decode (per message) -> key_on(identity)
    -> stateful_map(dedup) -> key_on(record) -> stateful_map(merge) -> counting sink

It reads with sferp's own KafkaSource and decoder, so the input and the per-message
parsing are the same as the flow's; it does only decode, de-duplication and the
per-record merge (field-level last-writer-wins for Salesforce, row image by lsn
for the ERP): no views, no DuckDB, no Kafka outputs, no snapshots. Python's
garbage collector keeps its default settings, as in the examples. It prints one
JSON line with its counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from sferp.connectors.kafka import KafkaSource
from sferp.operators.decode import DecodeConfig, decode_one

from sferp.events import SALESFORCE, Change, DeadLetter, RawMessage

COUNTS = {"messages": 0, "changes": 0, "dead_letters": 0, "duplicates": 0, "merged": 0}


class _CountPartition(StatelessSinkPartition[Any]):
    def write_batch(self, items: list[Any]) -> None:
        COUNTS["merged"] += len(items)


class CountSink(DynamicSink[Any]):
    """Counts what reaches it (the flow's output is the merged state itself)."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountPartition:
        """One counting partition per worker."""
        return _CountPartition()


def _explode(batch: list[RawMessage]) -> list[RawMessage]:
    COUNTS["messages"] += len(batch)
    return batch


def _dedup(seen: bool | None, ch: Change) -> tuple[bool, Change | None]:
    if seen:
        COUNTS["duplicates"] += 1
        return True, None
    return True, ch


def _merge(state: dict[str, Any] | None, ch: Change) -> tuple[dict[str, Any], str]:
    """Field-level last-writer-wins (Salesforce) or whole image by lsn (ERP)."""
    if state is None:
        state = {"fields": {}, "stamps": {}, "top": None, "deleted": None}
    stamp = ch.order
    if ch.source == SALESFORCE:
        if ch.fields:
            stamps = state["stamps"]
            for name, value in ch.fields.items():
                old = stamps.get(name)
                if old is None or stamp > old:
                    state["fields"][name] = value
                    stamps[name] = stamp
        if ch.op in ("create", "delete", "undelete") and (
            state["deleted"] is None or stamp > state["deleted"][0]
        ):
            state["deleted"] = (stamp, ch.op == "delete")
    elif state["top"] is None or stamp > state["top"]:
        state["fields"] = ch.fields or {}
        state["deleted"] = (stamp, ch.op == "delete")
    if state["top"] is None or stamp > state["top"]:
        state["top"] = stamp
    return state, ":".join(map(str, state["top"]))


def build(bootstrap: str, topics: dict[str, str], batch_size: int) -> Dataflow:
    """The textbook flow; `topics` maps topic name to role."""
    cfg = DecodeConfig(topics=topics)

    def decode(msg: RawMessage) -> list[Change]:
        out = []
        for o in decode_one(msg, cfg):
            if type(o) is Change:
                out.append(o)
            elif type(o) is DeadLetter:
                COUNTS["dead_letters"] += 1
        COUNTS["changes"] += len(out)
        return out

    flow = Dataflow("textbook")
    batches = op.input(
        "in", flow, KafkaSource(bootstrap, list(topics), bounded=True, batch_size=batch_size)
    )
    msgs = op.flat_map("explode", batches, _explode)
    changes = op.flat_map("decode", msgs, decode)
    by_identity = op.key_on(
        "key_identity", changes, lambda ch: ch.identity if ch.primary else f"{ch.identity}|{ch.key}"
    )
    fresh = op.filter_map(
        "drop_duplicates", op.stateful_map("dedup", by_identity, _dedup), lambda kv: kv[1]
    )
    by_record = op.key_on("key_record", fresh, lambda ch: f"{ch.source}|{ch.entity}|{ch.key}")
    merged = op.stateful_map("merge", by_record, _merge)
    op.output("out", merged, CountSink())
    return flow


def main(argv: list[str] | None = None) -> int:
    """Command line of the textbook flow (one JSON line on stdout)."""
    from bytewax._bytewax import cli_main

    p = argparse.ArgumentParser(prog="python -m sferp.benchmarks.textbook")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--batch-size", type=int, default=8000)
    p.add_argument("topics", nargs="+", help="TOPIC=ROLE (role: salesforce, items, ...)")
    args = p.parse_args(argv)
    topics = dict(t.split("=", 1) for t in args.topics)
    t0 = time.monotonic()
    cli_main(build(args.bootstrap, topics, args.batch_size), workers_per_process=1)
    out = dict(COUNTS, seconds=round(time.monotonic() - t0, 3))
    print(orjson.dumps(out).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
