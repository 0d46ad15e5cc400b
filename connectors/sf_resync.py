"""Re-reading the records that Salesforce gap events name.

A GAP_* event says a change to a record was not captured; the record must be
read again. The flow holds each gap marker back from the merge stage until the
re-read has been tried (flows/salesforce.py), then hands the marker on
*together with* the fresh images, in one batch: merge sees the gap and, in the
same batch, a lifecycle image newer than it, so SF_RESYNC_NEEDED never opens.
When the re-read fails (no connection, breaker open, an error), the marker goes
on alone, SF_RESYNC_NEEDED opens, and the record stays pending: it is retried
with backoff, and the first successful read closes the exception.

Records are read by Id through queryAll (so recycle-bin deletions are seen),
200 Ids per call. A record that is not found at all has been purged (or is not
visible to the integration user) and becomes a DELETE. GAP_OVERFLOW names no
record: the entity's records modified since an hour before the gap are re-read,
and a RESYNCED marker for `<entity>:*` rides after the images so merge closes
the overflow's exception once the whole window has been read.

Delivery: pending re-reads are part of the flow's snapshot, so a restart
retries them; re-read images are idempotent for the merge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sferp.connectors.sf_client import Backoff, CallError, NotReady, SalesforceApi
from sferp.operators.facts import CHANGES
from sferp.operators.routing import MERGE, shard
from sferp.operators.sf_images import (
    delta_soql,
    ids_soql,
    resync_change,
    resynced_marker,
    valid_id,
)

from sferp.events import Change

__all__ = ["OVERFLOW_WINDOW_MS", "Resyncer"]

log = logging.getLogger("sferp.salesforce")

OVERFLOW_WINDOW_MS = 3_600_000  # a GAP_OVERFLOW re-reads what changed from an hour before it
IDS_PER_CALL = 200

Routed = tuple[str, tuple]


class Resyncer:
    """Gap re-reads, free of Bytewax: `on_gaps` for new markers, `retry_due` for pending ones.

    `api` None means no connection is configured: every marker goes on alone.
    Outputs are `(merge shard, (CHANGES, (topic, partition), changes, stamps))`
    items; images ride with their gap message's topic and partition.
    """

    def __init__(
        self,
        api: SalesforceApi | None,
        *,
        pending: dict[str, list] | None = None,
        backoff: Backoff | None = None,
        max_wait_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        # record key -> [entity, newest gap Change, its stamp, attempts, due (monotonic)];
        # the gap's (topic, partition) is in the Change.
        self.pending: dict[str, list] = pending if pending is not None else {}
        self.backoff = backoff or Backoff(base_s=5.0, cap_s=300.0)
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.reads = 0
        self.failures = 0

    # -- reading ---------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        """A call that may wait a little for pacing, but not for an open breaker."""
        deadline = self.clock() + self.max_wait_s
        while True:
            try:
                return fn()
            except NotReady as e:
                if self.clock() + e.delay > deadline or e.why == "stopping":
                    raise
                time.sleep(e.delay)

    def _pages(self, soql: str) -> list[dict]:
        api = self.api
        assert api is not None
        page = self._call(lambda: api.query(soql, include_deleted=True, block=False))
        records = list(page.get("records", []))
        while not page.get("done", True):
            url = page["nextRecordsUrl"]
            page = self._call(lambda: api.query_more(url, block=False))  # noqa: B023
            records.extend(page.get("records", []))
        return records

    def _read(self, entity: str, gaps: dict[str, tuple[Change, int]]) -> list[tuple[Change, int]]:
        """Images for the gapped records of one entity; raises CallError/NotReady."""
        out: list[tuple[Change, int]] = []
        keys = sorted(gaps)
        for overflow in [k for k in keys if k.endswith(":*")]:
            gap, stamp = gaps[overflow]
            soql = delta_soql(entity, gap.event_time - OVERFLOW_WINDOW_MS)
            for rec in self._pages(soql):
                out.append((resync_change(entity, rec["Id"], rec, gap), stamp))
            out.append((resynced_marker(gap), stamp))  # every page read: the window is done
        ids = [k for k in keys if not k.endswith(":*") and valid_id(k)]
        if len(ids) + sum(1 for k in keys if k.endswith(":*")) < len(keys):
            log.warning("salesforce: gap names Ids that are not Salesforce Ids; not re-read")
        for i in range(0, len(ids), IDS_PER_CALL):
            chunk = ids[i : i + IDS_PER_CALL]
            found = {}
            for rec in self._pages(ids_soql(entity, chunk)):
                found[rec["Id"]] = rec
            for rid in chunk:
                gap, stamp = gaps[rid]
                out.append((resync_change(entity, rid, found.get(rid), gap), stamp))
        self.reads += 1
        return out

    # -- the two entry points -------------------------------------------------------------

    def on_gaps(self, gaps: list[Change], stamps: list[int]) -> list[Routed]:
        """Try to re-read the records of new gap markers; return markers + images to merge.

        Markers and images for one record share a payload, markers first, so the
        merge stage applies them in one batch.
        """
        by_entity: dict[str, dict[str, tuple[Change, int]]] = {}
        for gap, stamp in zip(gaps, stamps, strict=True):
            slot = by_entity.setdefault(gap.entity, {})
            old = slot.get(gap.key)
            if old is None or gap.order > old[0].order:
                slot[gap.key] = (gap, stamp)
        out: list[tuple[str, Change, int]] = [
            (shard(MERGE, g.key), g, s) for g, s in zip(gaps, stamps, strict=True)
        ]
        for entity, slot in by_entity.items():
            images = self._try(entity, slot)
            if images is None:
                for key, (gap, stamp) in slot.items():
                    self._remember(key, entity, gap, stamp)
                continue
            for ch, stamp in images:
                out.append((shard(MERGE, ch.key), ch, stamp))
            for key in slot:
                p = self.pending.get(key)
                if p is not None and p[1].order <= slot[key][0].order:
                    del self.pending[key]
        return _group(out)

    def retry_due(self, *, force: bool = False) -> list[Routed]:
        """Re-read pending records whose retry time has come (all of them with `force`)."""
        if not self.pending or self.api is None:
            return []
        now = self.clock()
        by_entity: dict[str, dict[str, tuple[Change, int]]] = {}
        for key, (entity, gap, stamp, _attempts, due) in self.pending.items():
            if force or due <= now:
                by_entity.setdefault(entity, {})[key] = (gap, stamp)
        out: list[tuple[str, Change, int]] = []
        for entity, slot in by_entity.items():
            images = self._try(entity, slot)
            if images is None:
                for key in slot:
                    p = self.pending[key]
                    p[3] += 1
                    p[4] = self.clock() + self.backoff.delay(p[3])
                continue
            for ch, stamp in images:
                out.append((shard(MERGE, ch.key), ch, stamp))
            for key in slot:
                del self.pending[key]
            log.info("salesforce: re-read %d pending %s record(s)", len(slot), entity)
        return _group(out)

    def next_due(self) -> float | None:
        """Monotonic time of the earliest pending retry, None when nothing is pending."""
        if not self.pending or self.api is None:
            return None
        return min(p[4] for p in self.pending.values())

    def _try(
        self, entity: str, slot: dict[str, tuple[Change, int]]
    ) -> list[tuple[Change, int]] | None:
        if self.api is None:
            return None
        try:
            return self._read(entity, slot)
        except (CallError, NotReady) as e:
            self.failures += 1
            log.warning(
                "salesforce: re-read of %d %s record(s) failed (%s); SF_RESYNC_NEEDED stays open",
                len(slot),
                entity,
                e,
            )
            return None

    def _remember(self, key: str, entity: str, gap: Change, stamp: int) -> None:
        p = self.pending.get(key)
        due = self.clock() + self.backoff.delay(0)
        if p is None:
            self.pending[key] = [entity, gap, stamp, 0, due]
        elif gap.order > p[1].order:
            p[1], p[2] = gap, stamp


def _group(items: list[tuple[str, Change, int]]) -> list[Routed]:
    """One CHANGES payload per merge shard and (topic, partition), in the given order."""
    per: dict[tuple[str, tuple[str, int]], tuple[list, list]] = {}
    for dest, ch, stamp in items:
        k = (dest, (ch.topic, ch.partition))
        slot = per.get(k)
        if slot is None:
            slot = per[k] = ([], [])
        slot[0].append(ch)
        slot[1].append(stamp)
    return [(dest, (CHANGES, tp, chs, sts)) for (dest, tp), (chs, sts) in per.items()]
