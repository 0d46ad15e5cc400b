"""Salesforce as a polled source: delta queries on SystemModstamp, Bulk API 2.0 backfill.

For orgs that do not bridge Change Data Capture to Kafka. Each polled object
is one source partition. A poll cycle runs

    SELECT Id, SystemModstamp, IsDeleted, <§1 fields> FROM <object>
    WHERE SystemModstamp >= <cursor - lookback> ORDER BY SystemModstamp, Id

through queryAll (deleted records come back with IsDeleted = true), one page
per call, following `nextRecordsUrl`. Each page becomes one batch of canonical
`Change`s (IMAGE, or DELETE for deleted rows; see operators/sf_images.py for
their order keys and identities), so the rest of the flow treats them like
CDC events. The cursor is the highest SystemModstamp emitted; the look-back
(default 5 minutes) re-reads records whose transactions committed after an
earlier poll had passed their SystemModstamp (query results are eventually
consistent), and the overlap's copies are duplicates for the flow's
de-duplication. The first cycle of an object with more than `bulk_threshold`
records is a Bulk API 2.0 queryAll job instead (unordered: the cursor becomes
the highest SystemModstamp it returned).

Every call is non-blocking with respect to pacing, the API reserve and the
circuit breaker (connectors/sf_client.py): when a call may not go, the
partition sleeps until it may. Retryable failures back off with jitter; an
error retrying cannot fix (a missing field, a malformed query, a permission)
stops the flow with Salesforce's error code.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from sferp.connectors import sf_stats
from sferp.connectors.sf_client import ApiConfig, Backoff, CallError, NotReady, SalesforceApi
from sferp.operators.sf_images import (
    POLL_PARTITIONS,
    bulk_soql,
    coerce_csv,
    delta_soql,
    poll_change,
)

from sferp.events import Change

__all__ = ["SalesforcePollSource", "SalesforceSourceError"]

log = logging.getLogger("sferp.salesforce")


class SalesforceSourceError(RuntimeError):
    """A poll failed in a way retrying cannot fix."""


class _PollPartition(StatefulSourcePartition[list[Change], dict]):
    """One object: backfill once, then delta cycles every `poll_interval_s`."""

    def __init__(self, src: SalesforcePollSource, entity: str, state: dict | None) -> None:
        self.src = src
        self.entity = entity
        state = dict(state or {})
        self.cursor: int | None = state.get("cursor")
        self.backfilled: bool = state.get("backfilled", False)
        self.bulk: dict | None = state.get("bulk")  # {"job", "locator", "done"} mid-backfill
        self.api = SalesforceApi(src.cfg, stop=src.stop_event)
        self.next_url: str | None = None  # inside a REST query (not snapshotted)
        self.in_cycle = False
        self.due = 0.0  # monotonic time of the next cycle or retry
        self.awake: datetime | None = None
        self.attempt = 0
        self.backoff = Backoff(base_s=src.retry_base_s, cap_s=300.0)
        self.cycles = 0
        self.emitted = 0

    # -- Bytewax -------------------------------------------------------------------

    def next_batch(self) -> list[list[Change]]:
        stop = self.src.stop_event
        if stop is not None and stop.is_set():
            raise StopIteration
        if self.src.bounded and self.cycles > 0 and not self.in_cycle:
            raise StopIteration
        if time.monotonic() < self.due:
            return []
        self.in_cycle = True
        try:
            batch = self._step()
        except NotReady as e:
            self._sleep(e.delay)
            return []
        except CallError as e:
            if not e.retryable:
                raise SalesforceSourceError(
                    f"polling {self.entity} failed: {e.code}: {e.message}"
                ) from None
            delay = self.backoff.delay(self.attempt)
            self.attempt += 1
            log.warning("polling %s: %s; retrying in %.1f s", self.entity, e.code, delay)
            self._sleep(delay)
            return []
        self.attempt = 0
        self.awake = None
        if batch:
            self.emitted += len(batch)
            return [batch]
        return []

    def next_awake(self) -> datetime | None:
        return self.awake

    def snapshot(self) -> dict:
        return {"cursor": self.cursor, "backfilled": self.backfilled, "bulk": self.bulk}

    def close(self) -> None:
        self.api.close()

    # -- the cycle -------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        self.due = time.monotonic() + seconds
        self.awake = datetime.now(UTC) + timedelta(seconds=seconds)

    def _end_cycle(self) -> None:
        sf_stats.polled(self.entity, time.time())
        self.in_cycle = False
        self.next_url = None
        self.cycles += 1
        self._sleep(self.src.poll_interval_s)

    def _advance(self, changes: list[Change]) -> None:
        for ch in changes:
            if self.cursor is None or ch.event_time > self.cursor:
                self.cursor = ch.event_time

    def _step(self) -> list[Change]:
        """One API call's worth of work; returns the changes it produced."""
        if not self.backfilled:
            return self._backfill_step()
        if self.next_url is None:
            lower = None if self.cursor is None else self.cursor - self.src.lookback_ms
            page = self.api.query(delta_soql(self.entity, lower), include_deleted=True, block=False)
        else:
            page = self.api.query_more(self.next_url, block=False)
        changes = [poll_change(self.entity, r) for r in page.get("records", [])]
        self._advance(changes)
        if page.get("done", True):
            self._end_cycle()
        else:
            self.next_url = page["nextRecordsUrl"]
        return changes

    def _backfill_step(self) -> list[Change]:
        src = self.src
        if self.bulk is None:
            count = self.api.query(
                f"SELECT COUNT() FROM {self.entity}", include_deleted=True, block=False
            )["totalSize"]
            if count <= src.bulk_threshold:
                log.info("backfill of %s: %d records through the REST API", self.entity, count)
                self.backfilled = True  # the first delta cycle (cursor None) reads everything
                return []
            job = self.api.bulk_query_start(bulk_soql(self.entity), block=False)
            log.info(
                "backfill of %s: %d records through Bulk API 2.0 job %s", self.entity, count, job
            )
            self.bulk = {"job": job, "locator": None, "complete": False}
            self._sleep(src.bulk_poll_s)
            return []
        job = self.bulk["job"]
        if not self.bulk["complete"]:
            try:
                info = self.api.bulk_query_state(job, block=False)
            except CallError as e:
                if e.status == 404:  # gone (results expire after 7 days): start over
                    self.bulk = None
                    return []
                raise
            state = info.get("state")
            if state in ("Failed", "Aborted"):
                raise SalesforceSourceError(
                    f"Bulk API 2.0 job {job} for {self.entity} ended {state}: "
                    f"{info.get('errorMessage', '')}"
                )
            if state != "JobComplete":
                self._sleep(src.bulk_poll_s)
                return []
            self.bulk["complete"] = True
        text, locator = self.api.bulk_query_results(
            job, self.bulk["locator"], src.bulk_page, block=False
        )
        rows = csv.DictReader(io.StringIO(text))
        changes = [poll_change(self.entity, coerce_csv(self.entity, row)) for row in rows]
        self._advance(changes)
        if locator is None:
            self.bulk = None
            self.backfilled = True
            self._end_cycle()
        else:
            self.bulk["locator"] = locator
        return changes


class SalesforcePollSource(FixedPartitionedSource[list[Change], dict]):
    """Poll Salesforce objects; emits one list of `Change`s per page read.

    One partition per object (named after it). Snapshots hold the object's
    cursor (highest SystemModstamp emitted) and, during a Bulk API backfill, the
    job and result locator; a resume re-reads from cursor - lookback. Changes
    read twice carry the same identity, so with the flow's de-duplication this
    source supports at-least-once input whose duplicates are not applied.

    `bounded=True` runs one cycle per object (the backfill, or one delta query)
    and ends, for `--until-caught-up`. A set `stop_event` ends every partition
    at its next call.
    """

    def __init__(
        self,
        cfg: ApiConfig,
        objects: list[str],
        *,
        poll_interval_s: float = 30.0,
        lookback_s: float = 300.0,
        bulk_threshold: int = 10_000,
        bounded: bool = False,
        stop_event: threading.Event | None = None,
        bulk_poll_s: float = 2.0,
        bulk_page: int = 50_000,
        retry_base_s: float = 1.0,
    ) -> None:
        """Validate and store settings; nothing connects until the dataflow runs."""
        unknown = [o for o in objects if o not in POLL_PARTITIONS]
        if unknown:
            raise ValueError(f"cannot poll {unknown}: expected some of {sorted(POLL_PARTITIONS)}")
        if not objects:
            raise ValueError("at least one object to poll is required")
        self.cfg = cfg
        self.objects = list(dict.fromkeys(objects))
        self.poll_interval_s = poll_interval_s
        self.lookback_ms = int(lookback_s * 1000)
        self.bulk_threshold = bulk_threshold
        self.bounded = bounded
        self.stop_event = stop_event
        self.bulk_poll_s = bulk_poll_s
        self.bulk_page = bulk_page
        self.retry_base_s = retry_base_s

    def list_parts(self) -> list[str]:
        """One partition per polled object."""
        return list(self.objects)

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _PollPartition:
        """Open the object's partition at its snapshotted cursor."""
        return _PollPartition(self, for_part, resume_state)
