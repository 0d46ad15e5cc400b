"""Route batches of the ERP extract source into the merge shards, as the Kafka router does.

The extract source (connectors/erp_extracts.py) turns extract files into the
same canonical changes the Debezium decoder makes. This module hands them to
the merge stage in the payloads it already understands (flows/reconcile.py,
`make_router`): changes grouped by merge shard, tagged with their (pseudo-)
partition and carrying their clock stamps, a tick
with the pseudo-partition's clock to every merge shard, and one `GlobalInput`
for the coordinator with the clock, the counters and the dead letters. Each
table is one pseudo-partition: topic `extract:<table>`, partition 0, and its
clock is the export time of the file being applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from sferp.events import Change, DeadLetter

from .facts import CHANGES, GLOBAL_IN, TICK, GlobalInput
from .merge import CONSUMED, DEAD, IGNORED
from .routing import GLOBAL, MERGE, SHARDS, shard

__all__ = ["EXTRACT_TOPIC_PREFIX", "ExtractBatch", "extract_topic", "make_extract_router"]

EXTRACT_TOPIC_PREFIX = "extract:"
_TICK_SHARDS = [f"{MERGE}{i:02d}" for i in range(SHARDS)]


def extract_topic(table: str) -> str:
    """The pseudo-topic of a table's extracts in flow_stats and dead_letters."""
    return EXTRACT_TOPIC_PREFIX + table


class ExtractBatch(NamedTuple):
    """What the extract source emits: part of one file's outcome.

    `changes` are canonical ERP changes (one message each: `primary` is true);
    `export_ms` is the file's export time (the pseudo-partition's clock), None
    when the batch carries no file (a skipped export only); `dead_letters`
    are quarantined files or rejected rows; `skipped` counts stale exports
    that were not applied (counted as ignored).
    """

    table: str
    changes: list[Change]
    export_ms: int | None
    dead_letters: list[DeadLetter]
    skipped: int = 0


def make_extract_router(
    *, live: bool, max_future_skew_ms: int
) -> Callable[[ExtractBatch], list[tuple[str, tuple]]]:
    """A flat_map function from an ExtractBatch to merge-shard and coordinator payloads.

    In a live run, an export stamped more than `max_future_skew_ms` ahead of
    the wall clock is applied but does not move the clock (CONTRACT §2), as
    for Kafka messages.
    """

    def route(batch: ExtractBatch) -> list[tuple[str, tuple]]:
        topic = extract_topic(batch.table)
        clock = batch.export_ms
        if clock is not None and live and clock > time.time() * 1000 + max_future_skew_ms:
            clock = None
        stamp = -1 if clock is None else clock
        per_shard: dict[str, tuple[list[Change], list[int]]] = {}
        for ch in batch.changes:
            dest = shard(MERGE, ch.key)
            slot = per_shard.get(dest)
            if slot is None:
                slot = per_shard[dest] = ([], [])
            slot[0].append(ch)
            slot[1].append(stamp)
        tp = (topic, 0)
        out: list[tuple[str, tuple]] = [
            (dest, (CHANGES, tp, chs, stamps)) for dest, (chs, stamps) in per_shard.items()
        ]
        if clock is not None:
            ticks = {tp: clock}
            out.extend((dest, (TICK, ticks)) for dest in _TICK_SHARDS)
        stats: dict[str, list[int]] = {}
        dead = list(batch.dead_letters)
        if dead or batch.skipped:
            s = stats[topic] = [0, 0, 0, 0, 0, 0]
            s[CONSUMED] = len(dead) + batch.skipped
            s[DEAD] = len(dead)
            s[IGNORED] = batch.skipped
        if stats or clock is not None:
            out.append((GLOBAL, (GLOBAL_IN, GlobalInput(stats, clock, dead, {}, [], [], []))))
        return out

    return route
