"""Helpers for tests that run the real reconcile dataflow in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bytewax._bytewax import cli_main
from bytewax.testing import TestingSource
from kafka import KafkaConsumer, TopicPartition
from sferp.flows.reconcile import FlowOptions, build_flow

from sferp.compare import Views, load_views
from sferp.config import load_settings
from sferp.events import RawMessage


def run_in_memory(
    msgs: list[RawMessage], views: Path, *, workers: int = 1, batch: int = 500, env=None
) -> Views:
    """Run the real dataflow over `msgs` (TestingSource instead of Kafka); return its views."""
    batches = [msgs[i : i + batch] for i in range(0, len(msgs), batch)]
    settings = load_settings(environ=env or {})
    flow = build_flow(
        settings,
        FlowOptions(
            bounded=True,
            views_path=str(views),
            source=TestingSource(batches),
            kafka_outputs=False,
        ),
    )
    cli_main(flow, workers_per_process=workers)
    return load_views(views)


def without_counters(v: Views) -> Views:
    """The views minus flow_stats (which count duplicates) and late."""
    return dataclasses.replace(v, flow_stats={}, late={})


def renumber(msgs: list[RawMessage]) -> list[RawMessage]:
    """Give messages fresh consecutive offsets per (topic, partition), in list order."""
    nxt: dict[tuple[str, int], int] = {}
    out = []
    for m in msgs:
        k = (m.topic, m.partition)
        off = nxt.get(k, 0)
        nxt[k] = off + 1
        out.append(m._replace(offset=off))
    return out


def read_topic(bootstrap: str, topic: str, client_config: dict | None = None) -> list:
    """Every message of a one-partition topic, read until nothing new arrives."""
    extra = client_config or {}
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **extra)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    out, idle = [], 0
    while idle < 3:
        got = [m for ms in c.poll(timeout_ms=300, max_records=10_000).values() for m in ms]
        out.extend(got)
        idle = 0 if got else idle + 1
    c.close()
    return out
