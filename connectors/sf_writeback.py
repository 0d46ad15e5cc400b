"""Write-back: reconciled order status and available-to-promise into Salesforce custom fields.

`SalesforceWritebackSink` receives, per coordinator batch, the order_status
rows, inventory_live rows and Product2 records that changed, and keeps in
Salesforce

- `Order.<writeback_order_no_field>`, `<writeback_stage_field>`,
  `<writeback_invoiced_at_field>` = the row's `erp_order_no`, `stage`,
  `invoiced_at`;
- `Product2.<writeback_atp_field>` = the `available_to_promise` of the
  product's sku (`ProductCode`), 0 when the sku has left inventory_live. Product
  Ids come from the Product2 records the flow mirrors; skus no mirrored product
  names are looked up by ProductCode through SOQL (cached, misses for 10 min).

A record is sent only when its desired values differ from the last values
Salesforce acknowledged for it; values that change again while queued are
coalesced. A background thread sends sObject Collections updates by Id (200
records per call, allOrNone false) through the shared client, which paces
calls to `calls_per_minute`, keeps the API reserve and has the circuit
breaker; the dataflow never waits for Salesforce.

Failures: UNABLE_TO_LOCK_ROW for a record is retried with exponential backoff
and jitter; a call that fails with a 5xx, a timeout or a broken connection may
have been applied, so before its records are sent again their current values
are read back and those already right count as written (no write twice); other
per-record errors, and records still failing after `max_attempts`, go to the
dead-letter topic with Salesforce's error code as the reason
(`writeback:<code>`, topic field `salesforce.writeback`).

Delivery: at-least-once and idempotent. The acknowledged-value hashes and the
queue are snapshotted with the flow; after a resume, records queued or in
flight at the snapshot are sent again (same values). CDC echoes of these writes
are recognised by `changeOrigin` (client id) in the decoder and not applied
when they changed nothing but write-back fields.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, NamedTuple

import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from sferp.connectors import sf_stats
from sferp.connectors.sf_client import ApiConfig, Backoff, CallError, NotReady, SalesforceApi
from sferp.operators.sf_images import parse_datetime_ms, valid_id

__all__ = [
    "KafkaDeadLetters",
    "SalesforceWritebackSink",
    "WritebackFields",
    "WritebackInput",
    "Writeback",
]

log = logging.getLogger("sferp.salesforce")

WRITEBACK_TOPIC = "salesforce.writeback"
BATCH = 200
LOOKUP_MISS_S = 600.0
RETRYABLE_RECORD_CODES = frozenset({"UNABLE_TO_LOCK_ROW"})

Key = tuple[str, str]  # (sobject, Id)
DeadLetterWriter = Callable[[bytes, bytes], None]  # (key, value) of one DLQ record


@dataclass(frozen=True)
class WritebackFields:
    """API names of the custom fields written."""

    order_no: str = "ERP_Order_No__c"
    stage: str = "ERP_Stage__c"
    invoiced_at: str = "ERP_Invoiced_At__c"
    atp: str = "Available_To_Promise__c"

    def all(self) -> frozenset[str]:
        """Every write-back field name."""
        return frozenset({self.order_no, self.stage, self.invoiced_at, self.atp})


class WritebackInput(NamedTuple):
    """What changed in one coordinator batch."""

    orders: list[tuple[str, tuple | None]]  # sf_order_id -> (erp_order_no, stage, invoiced ISO)
    atp: list[tuple[str, Any]]  # sku -> available_to_promise (None: left the view)
    products: list[tuple[str, str | None]]  # Product2 Id -> its live sku (None: none)


def _digest(fields: dict[str, Any]) -> int:
    raw = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return int.from_bytes(blake2b(raw, digest_size=8).digest(), "little")


def _same(value: Any, current: Any) -> bool:
    """Whether Salesforce's current value equals what we want (its formats differ)."""
    if value is None or current is None:
        return value is None and current is None
    if isinstance(value, int | float) and isinstance(current, int | float):
        return float(value) == float(current)
    if isinstance(value, str) and isinstance(current, str) and value[:4].isdigit() and "T" in value:
        try:
            return parse_datetime_ms(value) == parse_datetime_ms(current)
        except ValueError:
            pass
    return value == current


def _soql_string(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Writeback:
    """The write-back state and sender, free of Bytewax (one instance per process)."""

    def __init__(
        self,
        api: SalesforceApi,
        fields: WritebackFields,
        dead_letters: DeadLetterWriter,
        *,
        state: dict | None = None,
        max_attempts: int = 8,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.f = fields
        self.dead_letters = dead_letters
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff(base_s=0.5, cap_s=60.0)
        self.clock = clock
        st = state or {}
        self.sent: dict[Key, int] = dict(st.get("sent", {}))
        self.pending: dict[Key, dict[str, Any]] = dict(st.get("pending", {}))
        self.atp: dict[str, Any] = dict(st.get("atp", {}))
        self.product_sku: dict[str, str] = dict(st.get("product_sku", {}))
        self.sku_products: dict[str, set[str]] = {}
        for pid, sku in self.product_sku.items():
            self.sku_products.setdefault(sku, set()).add(pid)
        self.attempts: dict[Key, int] = {}
        self.due: dict[Key, float] = {}
        self.verify: set[Key] = set()  # after an ambiguous failure: read back before re-sending
        self.unmapped: set[str] = set()  # skus with an ATP but no known product
        self.miss_until: dict[str, float] = {}
        self.cond = threading.Condition()
        self.in_flight: set[Key] = set()
        self.written = 0
        self.dead = 0
        self.failed: dict[str, int] = {}  # records given up, by error code
        sf_stats.register_writeback(self)

    # -- input (dataflow thread) ----------------------------------------------------------

    def state(self) -> dict:
        """A copy of what must survive a restart."""
        with self.cond:
            return {
                "sent": dict(self.sent),
                "pending": {k: dict(v) for k, v in self.pending.items()},
                "atp": dict(self.atp),
                "product_sku": dict(self.product_sku),
            }

    def _desire(self, key: Key, fields: dict[str, Any]) -> None:
        if self.sent.get(key) == _digest(fields):
            self.pending.pop(key, None)
            return
        if self.pending.get(key) != fields:
            self.pending[key] = fields
            self.attempts.pop(key, None)
            self.due.pop(key, None)

    def _atp_fields(self, value: Any) -> dict[str, Any]:
        return {self.f.atp: 0 if value is None else value}

    def add(self, inp: WritebackInput) -> None:
        """Fold one batch of changes into the queue."""
        with self.cond:
            for pid, sku in inp.products:
                old = self.product_sku.get(pid)
                if old == sku:
                    continue
                if old is not None:
                    self.sku_products.get(old, set()).discard(pid)
                if sku is None:
                    self.product_sku.pop(pid, None)
                    continue
                self.product_sku[pid] = sku
                self.sku_products.setdefault(sku, set()).add(pid)
                self.unmapped.discard(sku)
                if sku in self.atp:
                    self._desire(("Product2", pid), self._atp_fields(self.atp[sku]))
            for oid, row in inp.orders:
                key = ("Order", oid)
                if row is None:  # the order left the view (deleted): nothing to keep in sync
                    self.pending.pop(key, None)
                    self.sent.pop(key, None)
                    continue
                erp_no, stage, invoiced = row
                self._desire(
                    key,
                    {self.f.order_no: erp_no, self.f.stage: stage, self.f.invoiced_at: invoiced},
                )
            for sku, value in inp.atp:
                self.atp[sku] = 0 if value is None else value
                pids = self.sku_products.get(sku)
                if not pids:
                    self.unmapped.add(sku)
                    continue
                for pid in pids:
                    self._desire(("Product2", pid), self._atp_fields(value))
            self.cond.notify_all()

    # -- sending (sender thread) ---------------------------------------------------------

    def _ready(self, now: float) -> list[Key]:
        out = []
        for key in self.pending:
            if key not in self.in_flight and self.due.get(key, 0.0) <= now:
                out.append(key)
                if len(out) == BATCH:
                    break
        return out

    def work_left(self) -> bool:
        """Anything queued (sent or not yet due)."""
        with self.cond:
            return bool(self.pending) or bool(self._lookups(self.clock()))

    def _lookups(self, now: float) -> list[str]:
        return [s for s in self.unmapped if self.miss_until.get(s, 0.0) <= now][:BATCH]

    def step(self, *, wait_s: float = 0.5) -> bool:
        """Send one call's worth of work if any is due; False when there was none."""
        now = self.clock()
        with self.cond:
            skus = self._lookups(now)
            keys = [] if skus else self._ready(now)
            if not skus and not keys:
                self.cond.wait(wait_s)
                return False
            batch = {k: dict(self.pending[k]) for k in keys}
            self.in_flight.update(keys)
        try:
            if skus:
                self._lookup(skus)
            else:
                self._send(batch)
        finally:
            with self.cond:
                self.in_flight.difference_update(keys)
        return True

    def _lookup(self, skus: list[str]) -> None:
        soql = (
            "SELECT Id, ProductCode FROM Product2 WHERE ProductCode IN ("
            + ", ".join(_soql_string(s) for s in skus)
            + ")"
        )
        try:
            records = self.api.query_all(soql)
        except CallError as e:
            log.warning("write-back: product lookup failed: %s", e.code)
            with self.cond:
                for s in skus:
                    self.miss_until[s] = self.clock() + self.backoff.delay(3)
            return
        found: dict[str, list[str]] = {}
        for r in records:
            found.setdefault(r.get("ProductCode"), []).append(r["Id"])
        with self.cond:
            for sku in skus:
                pids = found.get(sku)
                if not pids:
                    self.miss_until[sku] = self.clock() + LOOKUP_MISS_S
                    continue
                self.unmapped.discard(sku)
                for pid in pids:
                    if pid not in self.product_sku:
                        self.product_sku[pid] = sku
                        self.sku_products.setdefault(sku, set()).add(pid)
                        self._desire(("Product2", pid), self._atp_fields(self.atp.get(sku)))

    def _read_back(self, batch: dict[Key, dict[str, Any]]) -> set[Key]:
        """Keys whose current Salesforce values already equal the batch's (an earlier call
        that failed ambiguously did apply them)."""
        done: set[Key] = set()
        by_type: dict[str, list[str]] = {}
        for sobject, rid in batch:
            if valid_id(rid):
                by_type.setdefault(sobject, []).append(rid)
        for sobject, ids in by_type.items():
            names = sorted({n for (t, _), f in batch.items() if t == sobject for n in f})
            soql = (
                f"SELECT Id, {', '.join(names)} FROM {sobject} WHERE Id IN ("
                + ", ".join(f"'{i}'" for i in ids)
                + ")"
            )
            for rec in self.api.query_all(soql):
                key = (sobject, rec["Id"])
                want = batch.get(key)
                if want is not None and all(_same(v, rec.get(n)) for n, v in want.items()):
                    done.add(key)
        return done

    def _send(self, batch: dict[Key, dict[str, Any]]) -> None:
        try:
            check = [k for k in batch if k in self.verify]
            if check:
                already = self._read_back({k: batch[k] for k in check})
                for key in already:
                    self._acked(key, batch.pop(key))
                with self.cond:
                    self.verify.difference_update(check)
                if not batch:
                    return
            records = [
                {"attributes": {"type": sobject}, "id": rid, **fields}
                for (sobject, rid), fields in batch.items()
            ]
            results = self.api.update_collection(records)
        except NotReady:
            return  # stopping
        except CallError as e:
            self._call_failed(batch, e)
            return
        for (key, fields), res in zip(batch.items(), results, strict=False):
            if res.get("success"):
                self._acked(key, fields)
                continue
            errors = res.get("errors") or [{}]
            code = str(errors[0].get("statusCode") or "UNKNOWN")
            if code in RETRYABLE_RECORD_CODES:
                self._retry_later(key, fields, code)
            else:
                self._dead(key, fields, code, str(errors[0].get("message", "")))

    def _acked(self, key: Key, fields: dict[str, Any]) -> None:
        with self.cond:
            self.sent[key] = _digest(fields)
            if self.pending.get(key) == fields:
                del self.pending[key]
                self.attempts.pop(key, None)
                self.due.pop(key, None)
            self.written += 1

    def _retry_later(
        self, key: Key, fields: dict[str, Any], code: str, delay: float | None = None
    ) -> None:
        with self.cond:
            if self.pending.get(key) != fields:
                return  # superseded by a newer value: that one starts afresh
            n = self.attempts.get(key, 0) + 1
            if n >= self.max_attempts:
                del self.pending[key]
                self.attempts.pop(key, None)
                self.due.pop(key, None)
                self.verify.discard(key)
                dead = True
            else:
                self.attempts[key] = n
                self.due[key] = self.clock() + (self.backoff.delay(n) if delay is None else delay)
                dead = False
        if dead:
            self._dead(key, fields, code, f"still failing after {n} attempts", pop=False)

    def _call_failed(self, batch: dict[Key, dict[str, Any]], e: CallError) -> None:
        if not e.retryable:
            for key, fields in batch.items():
                self._dead(key, fields, e.code, e.message)
            return
        log.warning("write-back call of %d record(s) failed: %s; will retry", len(batch), e.code)
        with self.cond:
            if e.ambiguous:
                self.verify.update(batch)
            n = max((self.attempts.get(k, 0) for k in batch), default=0) + 1
        delay = self.backoff.delay(n)  # the batch stays together
        for key, fields in batch.items():
            self._retry_later(key, fields, e.code, delay)

    def _dead(
        self, key: Key, fields: dict[str, Any], code: str, message: str, *, pop: bool = True
    ) -> None:
        with self.cond:
            if pop and self.pending.get(key) == fields:
                del self.pending[key]
                self.attempts.pop(key, None)
                self.due.pop(key, None)
            self.dead += 1
            self.failed[code] = self.failed.get(code, 0) + 1
        sobject, rid = key
        now_ms = int(time.time() * 1000)
        raw = orjson.dumps({"sobject": sobject, "id": rid, "fields": fields, "message": message})
        coordinates = f"{WRITEBACK_TOPIC}:{sobject}:{rid}"
        value = {
            "reason": f"writeback:{code}",
            "topic": WRITEBACK_TOPIC,
            "partition": 0,
            "offset": now_ms,
            "raw": raw.decode(),
            "lineage": {"input": coordinates},
        }
        log.error("write-back of %s %s failed for good: %s", sobject, rid, code)
        self.dead_letters(coordinates.encode(), orjson.dumps(value))


class _WritebackPartition(StatefulSinkPartition[WritebackInput, dict | None]):
    def __init__(self, sink: SalesforceWritebackSink, state: dict | None) -> None:
        self.sink = sink
        self.stop = threading.Event()
        self.api = SalesforceApi(sink.cfg, stop=self.stop)
        self.wb = Writeback(self.api, sink.fields, sink.dead_letters, state=state, **sink.tuning)
        self.draining = False
        self.thread = threading.Thread(target=self._run, name="sferp-writeback", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                did = self.wb.step()
            except Exception:  # never let the sender die silently
                log.exception("write-back sender failed; retrying in 5 s")
                self.stop.wait(5)
                continue
            if not did and self.draining and not self.wb.work_left():
                return

    def write_batch(self, values: list[WritebackInput]) -> None:
        for v in values:
            self.wb.add(v)

    def snapshot(self) -> dict | None:
        return self.wb.state() if self.sink.snapshots else None

    def close(self) -> None:
        self.draining = True
        with self.wb.cond:
            self.wb.cond.notify_all()
        self.thread.join(self.sink.drain_timeout_s)
        self.stop.set()
        self.thread.join(5)
        left = self.wb.state()["pending"]
        if left:
            log.error("write-back: %d record(s) not sent before shutdown", len(left))
            for key, fields in left.items():
                self.wb._dead(key, fields, "UNSENT", "not sent before shutdown")
        self.api.close()


class SalesforceWritebackSink(FixedPartitionedSink[WritebackInput, dict | None]):
    """Keep reconciled values in Salesforce custom fields (see the module docstring).

    One partition (`"writeback"`), owned by the process that owns the DuckDB
    writer (`writer=True`). At-least-once, idempotent; snapshots hold the
    acknowledged-value hashes and the queue when `snapshots` is true. On close
    it drains the queue for up to `drain_timeout_s`; what is still unsent goes
    to the dead-letter topic (reason `writeback:UNSENT`).
    """

    def __init__(
        self,
        cfg: ApiConfig,
        fields: WritebackFields,
        dead_letters: DeadLetterWriter,
        *,
        writer: bool = True,
        snapshots: bool = False,
        drain_timeout_s: float = 60.0,
        **tuning: Any,
    ) -> None:
        """Store settings; the client logs in when the partition first sends."""
        self.cfg = cfg
        self.fields = fields
        self.dead_letters = dead_letters
        self.writer = writer
        self.snapshots = snapshots
        self.drain_timeout_s = drain_timeout_s
        self.tuning = tuning

    def list_parts(self) -> list[str]:
        """The single write-back partition, on the writer process only."""
        return ["writeback"] if self.writer else []

    def part_fn(self, item_key: str) -> int:
        """Everything goes to the one partition."""
        return 0

    def build_part(
        self, step_id: str, for_part: str, resume_state: dict | None
    ) -> _WritebackPartition:
        """Start the sender thread with the snapshotted queue."""
        return _WritebackPartition(self, resume_state)


class KafkaDeadLetters:
    """Writes write-back dead letters to the DLQ topic (producer opened on first use)."""

    def __init__(self, bootstrap: str, topic: str, client_config: dict[str, Any]) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_config = client_config
        self._producer: Any = None
        self._lock = threading.Lock()

    def __call__(self, key: bytes, value: bytes) -> None:
        from kafka import KafkaProducer

        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap, **self.client_config
                )
            self._producer.send(self.topic, key=key, value=value).get(30)
