"""Wire formats of the synthetic change stream: Salesforce Ids, CDC event forms, Debezium envelopes.

Everything here turns one logical change into the exact bytes a real producer
would write (CONTRACT §1.1 and §1.2), choosing among the forms with the
simulation's seeded RNG so that a seed always gives the same bytes. Templates
(Debezium schemas, flat-form null images) are built once; the per-event work is
a few dict literals and one `orjson.dumps`.
"""

from __future__ import annotations

import base64
import random
import time
from typing import Any

import orjson

from sferp.sfid import to18

__all__ = [
    "APPLIED",
    "IGNORED",
    "ERP_TABLES",
    "ErpEncoder",
    "IdFactory",
    "compact_json",
    "FastRandom",
    "SfEncoder",
    "iso_ms",
    "uuid4",
]

# Message labels: the outcome the flow must count for a message (docs/semantics.md §1).
APPLIED = "applied"
IGNORED = "ignored"

# Roles of the four input topics (CONTRACT §4.1 [topics] keys).
SF_ROLE = "sf_cdc"
ERP_ROLES = {
    "items": "erp_items",
    "inventory": "erp_inventory",
    "sales_orders": "erp_sales_orders",
}

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def iso_ms(ms: int) -> str:
    """Salesforce's datetime text for epoch milliseconds, e.g. `2026-11-02T08:00:00.000Z`."""
    s, r = divmod(ms, 1000)
    t = time.gmtime(s)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{r:03d}Z"
    )


def iso_date(ms: int) -> str:
    """The UTC calendar date of epoch milliseconds, `YYYY-MM-DD`."""
    t = time.gmtime(ms // 1000)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"


class FastRandom(random.Random):
    """`random.Random` with cheaper `randint`, `randrange` and `choice` (one `random()` each).

    The stdlib versions draw exact uniform integers through several Python
    calls; for simulated durations and picks, `int(random() * n)` is uniform
    enough and several times faster. Still fully determined by the seed.
    """

    def randint(self, a: int, b: int) -> int:  # type: ignore[override]
        """A random integer in [a, b]."""
        return a + int(self.random() * (b - a + 1))

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        """A random integer in [start, stop) (step 1 only)."""
        if stop is None:
            start, stop = 0, start
        return start + int(self.random() * (stop - start))

    def choice(self, seq: Any) -> Any:  # type: ignore[override]
        """A random element of a non-empty sequence."""
        return seq[int(self.random() * len(seq))]


def uuid4(rng: random.Random) -> str:
    """A version-4 UUID drawn from `rng` (so it is reproducible, unlike `uuid.uuid4`)."""
    n = rng.getrandbits(128)
    n = (n & ~(0xF000 << 64)) | (0x4000 << 64)
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def compact_json(obj: Any) -> bytes:
    """`orjson.dumps`, copied into an exactly-sized bytes object.

    orjson returns its working buffer (4 KiB for small documents); a stream
    that keeps many messages (a list, the partition cache) would hold that.
    """
    return bytes(memoryview(orjson.dumps(obj)))


def _b62(n: int, width: int) -> str:
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out)).rjust(width, "0")


class IdFactory:
    """Valid-looking 18-character Salesforce Ids: key prefix, pod, reserved digit, base-62 number.

    Numbers grow by small random steps per key prefix, as Ids allocated by one
    org do; the last three characters are the real case-safe checksum.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._pod = rng.choice(("5e", "Dn", "Hs", "8c", "Ak", "3t"))
        self._next: dict[str, int] = {}

    def new(self, prefix: str) -> str:
        """A fresh Id with the given 3-character key prefix (01t, 001, 801, 802, ...)."""
        n = self._next.get(prefix)
        if n is None:
            n = self._rng.randrange(62**5, 62**6)
        n += self._rng.randint(1, 9)
        self._next[prefix] = n
        return to18(prefix + self._pod + "0" + _b62(n, 9))


# --- Salesforce Change Data Capture ------------------------------------------------------------

USED_ENTITIES = frozenset({"Product2", "Account", "Order", "OrderItem"})

# Every field of each simulated object, in the order the flat form lists them.
SF_FIELDS: dict[str, tuple[str, ...]] = {
    "Product2": (
        "Name",
        "ProductCode",
        "IsActive",
        "Family",
        "Description",
        "StockKeepingUnit",
        "QuantityUnitOfMeasure",
    ),
    "Account": (
        "Name",
        "ERP_Customer_Number__c",
        "Type",
        "Industry",
        "Phone",
        "BillingAddress",
        "OwnerId",
    ),
    "Order": (
        "AccountId",
        "OrderNumber",
        "Status",
        "StatusCode",
        "TotalAmount",
        "EffectiveDate",
        "Pricebook2Id",
        "OwnerId",
        "Type",
        "CurrencyIsoCode",
        "PoNumber",
        "Description",
        "ActivatedDate",
        "ActivatedById",
    ),
    "OrderItem": (
        "OrderId",
        "Product2Id",
        "PricebookEntryId",
        "Quantity",
        "UnitPrice",
        "ListPrice",
        "OrderItemNumber",
        "Description",
        "ServiceDate",
    ),
    "Lead": ("Name", "Company", "Status", "Email", "LeadSource", "OwnerId"),
    "Contact": ("AccountId", "Name", "Email", "Phone", "Title", "OwnerId"),
}
_AUDIT = ("CreatedDate", "CreatedById", "LastModifiedDate", "LastModifiedById")
_REFERENCE_FIELDS = ("AccountId", "OrderId", "Product2Id")

ORIGIN_API = "com/salesforce/api/rest/62.0"
ORIGIN_SOAP = "com/salesforce/api/soap/62.0;client=DataLoaderBulkUI/62.0"
ORIGIN_UI = ""


class SfEncoder:
    """Encodes Salesforce change events in the three forms of CONTRACT §1.1.

    Forms are mixed per message: wrapped (`replayId` + `payload`), the bare
    payload, and Confluent's flat schemaless record (every field present, null
    when unchanged, datetimes as epoch milliseconds like Connect's Timestamp).
    A few bare UPDATEs come from an older bridge that strips `changedFields`.
    """

    WRAPPED = 0.45  # cumulative form probabilities
    BARE = 0.70
    SHORT_ID_RATE = 0.01

    def __init__(self, rng: random.Random, out: list[Any], ids: IdFactory) -> None:
        self._rng = rng
        self._out = out
        self.replay = rng.randrange(10**6, 10**7)
        self.commit_number = rng.randrange(10**10, 2 * 10**10)
        self._flat_nulls = {e: dict.fromkeys(f + _AUDIT) for e, f in SF_FIELDS.items()}
        self._event_type = {
            e: "".join(rng.choice(_B64URL) for _ in range(22)) for e in sorted(SF_FIELDS)
        }
        self.integration_user = ids.new("005")

    def new_transaction(self) -> tuple[str, int]:
        """A fresh (transactionKey, commitNumber) pair; commit numbers only grow."""
        self.commit_number += self._rng.randint(1, 60)
        return uuid4(self._rng), self.commit_number

    def encode(
        self,
        entity: str,
        change_type: str,
        record_ids: list[str],
        fields: dict[str, Any] | None,
        nulled: list[str],
        tx_key: str,
        seq: int,
        commit_number: int,
        ts: int,
        user: str,
        origin: str,
        short_ids: bool = False,
    ) -> None:
        """Append one encoded event `(role, key, value, label, event_ms)` to the output list."""
        rng = self._rng
        r = rng.random()
        if short_ids or rng.random() < self.SHORT_ID_RATE:
            record_ids = [x[:15] for x in record_ids]
            if fields:
                fields = {
                    k: (v[:15] if k in _REFERENCE_FIELDS and isinstance(v, str) else v)
                    for k, v in fields.items()
                }
        body_fields: dict[str, Any] = fields or {}
        audit: tuple[tuple[str, Any], ...] = ()
        changed: list[str] = []
        if change_type == "UPDATE":
            changed = [*body_fields, *nulled, "LastModifiedDate", "LastModifiedById"]
            audit = (("LastModifiedDate", ts), ("LastModifiedById", user))
        elif change_type in ("CREATE", "UNDELETE"):
            audit = (
                ("CreatedDate", ts),
                ("CreatedById", user),
                ("LastModifiedDate", ts),
                ("LastModifiedById", user),
            )
        header: dict[str, Any] = {
            "entityName": entity,
            "recordIds": record_ids,
            "changeType": change_type,
            "changeOrigin": origin,
            "transactionKey": tx_key,
            "sequenceNumber": seq,
            "commitTimestamp": ts,
            "commitNumber": commit_number,
            "commitUser": user,
            "nulledFields": nulled,
            "diffFields": [],
            "changedFields": changed,
        }
        self.replay += 1
        if r < self.BARE:
            body: dict[str, Any] = {"ChangeEventHeader": header}
            body.update(body_fields)
            for k, v in audit:
                body[k] = iso_ms(v) if k.endswith("Date") else v
            if r < self.WRAPPED:
                doc: dict[str, Any] = {"replayId": f"{self.replay:016d}", "payload": body}
            else:
                doc = body
                if changed and not nulled and rng.random() < 0.1:
                    del header["changedFields"], header["nulledFields"], header["diffFields"]
        else:
            doc = {
                "Id": record_ids[0] if record_ids else None,
                "ReplayId": str(self.replay),
                "ChangeEventHeader": header,
            }
            doc.update(self._flat_nulls.get(entity, ()))
            doc.update(body_fields)
            doc.update(audit)
            doc["_ObjectType"] = entity + "ChangeEvent"
            doc["_EventType"] = self._event_type[entity]
        key = record_ids[0].encode() if record_ids else None
        label = APPLIED if entity in USED_ENTITIES else IGNORED
        self._out.append((SF_ROLE, key, compact_json(doc), label, ts))


# --- Debezium (PostgreSQL connector) -----------------------------------------------------------

ERP_TABLES = ("items", "inventory", "sales_orders")
ERP_KEYS: dict[str, tuple[str, ...]] = {
    "items": ("sku",),
    "inventory": ("sku", "warehouse"),
    "sales_orders": ("order_no",),
}
# column -> (Connect type, optional, decimal precision or 0)
_COLUMNS: dict[str, tuple[tuple[str, str, bool, int], ...]] = {
    "items": (
        ("sku", "string", False, 0),
        ("description", "string", True, 0),
        ("list_price", "decimal", True, 12),
        ("active", "boolean", True, 0),
    ),
    "inventory": (
        ("sku", "string", False, 0),
        ("warehouse", "string", False, 0),
        ("qty_on_hand", "int32", True, 0),
        ("qty_allocated", "int32", True, 0),
    ),
    "sales_orders": (
        ("order_no", "int64", False, 0),
        ("sf_order_id", "string", True, 0),
        ("customer_no", "string", True, 0),
        ("status", "string", False, 0),
        ("total_amount", "decimal", True, 14),
        ("currency", "string", True, 0),
    ),
}
DECIMAL_COLUMNS = {
    t: tuple(c[0] for c in cols if c[1] == "decimal") for t, cols in _COLUMNS.items()
}
# REPLICA IDENTITY FULL on sales_orders (audited table): updates and deletes carry the old row.
_FULL_IDENTITY = frozenset({"sales_orders"})
_SNAPSHOT_VALUES = (
    "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"
)


def _row_schema(table: str, decimals: str) -> list[dict[str, Any]]:
    fields: list[dict[str, Any]] = []
    for name, typ, optional, precision in _COLUMNS[table]:
        if typ != "decimal":
            fields.append({"type": typ, "optional": optional, "field": name})
        elif decimals == "precise":
            fields.append(
                {
                    "type": "bytes",
                    "optional": optional,
                    "name": "org.apache.kafka.connect.data.Decimal",
                    "version": 1,
                    "parameters": {"scale": "2", "connect.decimal.precision": str(precision)},
                    "field": name,
                }
            )
        else:
            fields.append({"type": "string", "optional": optional, "field": name})
    return fields


def debezium_schema(table: str, decimals: str) -> dict[str, Any]:
    """The Connect schema Debezium 2.7's PostgreSQL connector writes for `erp.public.<table>`.

    `decimals` is `precise` (Connect Decimal, base64 bytes) or `string`
    (`decimal.handling.mode=string`).
    """
    value = f"erp.public.{table}.Value"
    row = _row_schema(table, decimals)
    i64 = "int64"
    source = [
        {"type": "string", "optional": False, "field": "version"},
        {"type": "string", "optional": False, "field": "connector"},
        {"type": "string", "optional": False, "field": "name"},
        {"type": i64, "optional": False, "field": "ts_ms"},
        {
            "type": "string",
            "optional": True,
            "name": "io.debezium.data.Enum",
            "version": 1,
            "parameters": {"allowed": _SNAPSHOT_VALUES},
            "default": "false",
            "field": "snapshot",
        },
        {"type": "string", "optional": False, "field": "db"},
        {"type": "string", "optional": True, "field": "sequence"},
        {"type": i64, "optional": True, "field": "ts_us"},
        {"type": i64, "optional": True, "field": "ts_ns"},
        {"type": "string", "optional": False, "field": "schema"},
        {"type": "string", "optional": False, "field": "table"},
        {"type": i64, "optional": True, "field": "txId"},
        {"type": i64, "optional": True, "field": "lsn"},
        {"type": i64, "optional": True, "field": "xmin"},
    ]
    transaction = [
        {"type": "string", "optional": False, "field": "id"},
        {"type": i64, "optional": False, "field": "total_order"},
        {"type": i64, "optional": False, "field": "data_collection_order"},
    ]
    return {
        "type": "struct",
        "fields": [
            {"type": "struct", "fields": row, "optional": True, "name": value, "field": "before"},
            {"type": "struct", "fields": row, "optional": True, "name": value, "field": "after"},
            {
                "type": "struct",
                "fields": source,
                "optional": False,
                "name": "io.debezium.connector.postgresql.Source",
                "field": "source",
            },
            {
                "type": "struct",
                "fields": transaction,
                "optional": True,
                "name": "event.block",
                "version": 1,
                "field": "transaction",
            },
            {"type": "string", "optional": False, "field": "op"},
            {"type": i64, "optional": True, "field": "ts_ms"},
            {"type": i64, "optional": True, "field": "ts_us"},
            {"type": i64, "optional": True, "field": "ts_ns"},
        ],
        "optional": False,
        "name": f"erp.public.{table}.Envelope",
        "version": 2,
    }


_SCHEMA_BYTES = {
    (t, mode): orjson.dumps(debezium_schema(t, mode))
    for t in ERP_TABLES
    for mode in ("precise", "string")
}


def cents_text(c: int) -> str:
    """Exact decimal text with two places for an integer number of cents (`1250` -> `12.50`)."""
    sign = "-" if c < 0 else ""
    q, r = divmod(abs(c), 100)
    return f"{sign}{q}.{r:02d}"


def cents_b64(c: int) -> str:
    """Connect Decimal encoding: base64 of the big-endian two's-complement unscaled value."""
    return base64.b64encode(c.to_bytes((c.bit_length() + 8) // 8, "big", signed=True)).decode()


def _convert(row: dict[str, Any], cols: tuple[str, ...], conv: Any) -> dict[str, Any]:
    row = dict(row)
    for c in cols:
        v = row[c]
        if v is not None:
            row[c] = conv(v)
    return row


class ErpEncoder:
    """Encodes ERP row changes as Debezium 2.7 PostgreSQL events, schemaless or schema-wrapped.

    One LSN sequence for the whole ERP database; decimals (`list_price`,
    `total_amount`, kept internally as integer cents) are written as JSON
    numbers or strings in the schemaless form and as Connect Decimals (base64)
    or strings in the wrapped form. Deletes are followed by a Kafka tombstone.
    """

    WRAPPED_RATE = 0.12

    def __init__(self, rng: random.Random, out: list[Any]) -> None:
        self._rng = rng
        self._out = out
        self.lsn = rng.randrange(20_000_000, 40_000_000) * 8
        self.tx_id = rng.randrange(1000, 90_000)
        self._last_commit_lsn = self.lsn

    def _next_lsn(self) -> int:
        self.lsn += self._rng.randint(5, 250) * 8
        return self.lsn

    def transaction(
        self,
        ts: int,
        changes: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]],
    ) -> None:
        """Encode one ERP transaction: `(table, op, before, after)` per changed row, op c/u/d."""
        self.tx_id += self._rng.randint(1, 12)
        seq = f'["{self._last_commit_lsn}","'
        for table, op, before, after in changes:
            lsn = self._next_lsn()
            self._encode(table, op, before, after, ts, lsn, "false", seq + f'{lsn}"]')
        self._last_commit_lsn = self.lsn

    def snapshot(self, ts: int, tables: list[tuple[str, list[dict[str, Any]]]]) -> None:
        """Encode an initial snapshot: op `r` for every row, all at the snapshot's LSN."""
        self.tx_id += 1
        lsn = self._next_lsn()
        seq = f'[null,"{lsn}"]'
        total = sum(len(rows) for _, rows in tables)
        n = 0
        for table, rows in tables:
            for i, row in enumerate(rows):
                n += 1
                if n == 1:
                    marker = "first"
                elif n == total:
                    marker = "last"
                elif i == 0:
                    marker = "first_in_data_collection"
                elif i == len(rows) - 1:
                    marker = "last_in_data_collection"
                else:
                    marker = "true"
                self._encode(table, "r", None, row, ts, lsn, marker, seq)
        self._last_commit_lsn = lsn

    def truncate(self, ts: int, table: str) -> None:
        """Encode a `TRUNCATE` (op `t`): no row, no key."""
        self.tx_id += 1
        lsn = self._next_lsn()
        src = self._source(table, ts, "false", f'["{self._last_commit_lsn}","{lsn}"]', lsn)
        env = {"before": None, "after": None, "source": src, "transaction": None, "op": "t"}
        self._stamp(env, ts)
        role = ERP_ROLES[table]
        self._out.append((role, None, compact_json(env), IGNORED, ts))
        self._last_commit_lsn = lsn

    def _source(self, table: str, ts: int, snapshot: str, seq: str, lsn: int) -> dict[str, Any]:
        return {
            "version": "2.7.3.Final",
            "connector": "postgresql",
            "name": "erp",
            "ts_ms": ts,
            "snapshot": snapshot,
            "db": "erp",
            "sequence": seq,
            "ts_us": ts * 1000,
            "ts_ns": ts * 1_000_000,
            "schema": "public",
            "table": table,
            "txId": self.tx_id,
            "lsn": lsn,
            "xmin": None,
        }

    def _stamp(self, env: dict[str, Any], ts: int) -> None:
        # Connector processing time: a little after the commit.
        done = ts + self._rng.randint(3, 400)
        env["ts_ms"] = done
        env["ts_us"] = done * 1000 + self._rng.randint(0, 999)
        env["ts_ns"] = env["ts_us"] * 1000

    def _encode(
        self,
        table: str,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        ts: int,
        lsn: int,
        snapshot: str,
        seq: str,
    ) -> None:
        rng = self._rng
        pk = ERP_KEYS[table]
        image = after if after is not None else before
        assert image is not None
        key = compact_json({c: image[c] for c in pk})
        if op == "d":
            if table in _FULL_IDENTITY:
                before = image
            else:
                before = {c: (image[c] if c in pk else None) for c, *_ in _COLUMNS[table]}
        elif table not in _FULL_IDENTITY or op != "u":
            before = None
        decs = DECIMAL_COLUMNS[table]
        wrapped = rng.random() < self.WRAPPED_RATE
        mode = "precise"
        if decs:
            if wrapped:
                mode = "precise" if rng.random() < 0.7 else "string"
                conv: Any = cents_b64 if mode == "precise" else cents_text
            else:
                conv = (lambda c: c / 100) if rng.random() < 0.75 else cents_text
            if before is not None:
                before = _convert(before, decs, conv)
            if after is not None:
                after = _convert(after, decs, conv)
        src = self._source(table, ts, snapshot, seq, lsn)
        env = {"before": before, "after": after, "source": src, "transaction": None, "op": op}
        self._stamp(env, ts)
        if wrapped:
            payload = (
                b'{"schema":'
                + _SCHEMA_BYTES[(table, mode)]
                + b',"payload":'
                + orjson.dumps(env)
                + b"}"
            )
        else:
            payload = compact_json(env)
        role = ERP_ROLES[table]
        self._out.append((role, key, payload, APPLIED, ts))
        if op == "d":
            self._out.append((role, key, None, IGNORED, ts))
