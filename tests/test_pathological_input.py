"""Pathological but valid input through the real in-memory dataflow (issue 6): many distinct
keys, one key changed thousands of times in shuffled order, 1 MB strings in unused fields.

The views must equal the reference model, and the run must finish; how fast is the
benchmark's business (README "Performance"), so nothing here is timed. Sizes are kept
small enough for CI; `SFERP_PATHOLOGICAL_SCALE=N` multiplies the counts, and
`make test-slow` changes one key a million times.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import pytest
from flowkit import run_in_memory

from sferp.compare import diff
from sferp.events import RawMessage
from sferp.reference import compute

SCALE = int(os.environ.get("SFERP_PATHOLOGICAL_SCALE", "1"))
SF = "sf.cdc"
INV = "erp.public.inventory"
SO = "erp.public.sales_orders"
ITEMS = "erp.public.items"
T0 = 1_793_606_400_000
ORDER = "801000000000001AAA"
MB_STRING = 1_000_000


def sf_event(change_type: str, rid: str, ts: int, seq: int, entity: str = "Order", **fields):
    header = {
        "entityName": entity,
        "recordIds": [rid],
        "changeType": change_type,
        "changeOrigin": "com/salesforce/api/rest/62.0",
        "transactionKey": f"tx-{ts}-{seq}",
        "sequenceNumber": seq,
        "commitTimestamp": ts,
        "commitNumber": ts - T0,
        "commitUser": "005000000000001AAA",
        "changedFields": list(fields) if change_type == "UPDATE" else [],
    }
    return {"replayId": f"{ts:016d}", "payload": {"ChangeEventHeader": header, **fields}}


def erp_event(op: str, table: str, row: dict[str, Any], lsn: int) -> dict:
    return {
        "before": None,
        "after": row,
        "source": {"connector": "postgresql", "table": table, "ts_ms": T0 + lsn, "lsn": lsn},
        "op": op,
        "ts_ms": T0 + lsn + 5,
    }


def to_messages(items: list[tuple[str, Any, Any]]) -> list[RawMessage]:
    """(topic, key, document) in arrival order -> RawMessages, offsets per partition."""
    offsets: dict[str, int] = {}
    out = []
    for topic, key, doc in items:
        off = offsets.get(topic, 0)
        offsets[topic] = off + 1
        k = None if key is None else (key if isinstance(key, bytes) else json.dumps(key).encode())
        out.append(RawMessage(topic, 0, off, k, json.dumps(doc).encode(), -1))
    return out


def build_stream(rng: random.Random) -> list[RawMessage]:
    items: list[tuple[str, Any, Any]] = []
    # Many distinct keys: inventory rows and Salesforce products.
    n_rows = 20_000 * SCALE
    for i in range(n_rows):
        row = {"sku": f"SKU-{i % 4000:05d}", "warehouse": f"W{i // 4000:03d}"}
        row |= {"qty_on_hand": i % 97, "qty_allocated": i % 7}
        items.append(
            (
                INV,
                {"sku": row["sku"], "warehouse": row["warehouse"]},
                erp_event("r", "inventory", row, 1_000 + i),
            )
        )
    for i in range(3_000 * SCALE):
        pid = f"01t{i:012d}AAA"
        items.append(
            (
                SF,
                pid,
                sf_event(
                    "CREATE",
                    pid,
                    T0 + i,
                    0,
                    "Product2",
                    ProductCode=f"SKU-{i:05d}",
                    Name="p",
                    IsActive=True,
                ),
            )
        )

    # One Salesforce Order and one ERP sales order, each changed thousands of times.
    n_updates = 12_000 * SCALE
    items.append(
        (
            SF,
            ORDER,
            sf_event(
                "CREATE",
                ORDER,
                T0,
                0,
                Status="Draft",
                TotalAmount="10.00",
                OrderNumber="00000001",
                AccountId=None,
                EffectiveDate="2026-11-02",
            ),
        )
    )
    statuses = ["Draft", "Activated"]
    for n in range(1, n_updates + 1):
        field = {"Status": statuses[n % 2]} if n % 3 else {"TotalAmount": f"{n}.{n % 100:02d}"}
        items.append((SF, ORDER, sf_event("UPDATE", ORDER, T0 + n * 10, n % 5, **field)))
    so_status = ["OPEN", "ALLOCATED", "SHIPPED", "INVOICED"]
    for n in range(n_updates):
        row = {"order_no": "SO-1", "sf_order_id": ORDER, "customer_no": "C1"}
        row |= {"status": so_status[n % 4], "total_amount": f"{n % 1000}.50", "currency": "USD"}
        items.append((SO, {"order_no": "SO-1"}, erp_event("u", "sales_orders", row, 50_000 + n)))
    items.append(
        (
            ITEMS,
            {"sku": "SKU-00001"},
            erp_event(
                "c",
                "items",
                {"sku": "SKU-00001", "description": "x", "list_price": "1.00", "active": True},
                10,
            ),
        )
    )

    # 1 MB strings in fields the views do not use (each message stays under max_message_bytes).
    for n in range(4):
        big = "".join(rng.choice("abcdefghij \u00e9\u4e2d") for _ in range(MB_STRING // 3))
        items.append((SF, ORDER, sf_event("UPDATE", ORDER, T0 + 5 + n * 20, 9, Description=big)))
        row = {"sku": "SKU-00001", "warehouse": "BIG", "qty_on_hand": 5, "qty_allocated": 1}
        row["notes"] = "n" * MB_STRING
        items.append(
            (
                INV,
                {"sku": "SKU-00001", "warehouse": "BIG"},
                erp_event("u", "inventory", row, 900_000 + n),
            )
        )

    # Disorder: late partial updates must not overwrite newer values; duplicates on top.
    rng.shuffle(items)
    items += rng.sample(items, len(items) // 50)
    return to_messages(items)


def test_pathological_valid_input_gives_the_reference_views(tmp_path):
    msgs = build_stream(random.Random(6))
    assert max(len(m.value or b"") for m in msgs) < 1_048_576
    views = run_in_memory(msgs, tmp_path / "views.duckdb", batch=2000)
    expected = compute(msgs)
    assert diff(expected, views) == []
    assert views.dead_letters == set()
    # the hot keys and the big strings are there
    record = views.records[("salesforce", "Order", ORDER)]
    assert len(record.fields["Description"]) >= MB_STRING // 3
    assert len(views.records) > 20_000 * SCALE
    stats = views.flow_stats
    assert sum(s["consumed"] for s in stats.values()) == len(msgs)


@pytest.mark.slow
def test_one_key_changed_a_million_times(tmp_path):
    """`make test-slow`: a million distinct updates of one Order, shuffled, with redeliveries.

    Per-record state must not grow with the number of changes (no per-change
    lineage or history kept): the run finishes at the benchmark's pace and the
    views equal the reference.
    """
    rng = random.Random(11)
    n = 1_000_000
    items = [(SF, ORDER.encode(), sf_event("CREATE", ORDER, T0, 1, Status="Draft", TotalAmount=1))]
    for i in range(1, n):
        doc = sf_event("UPDATE", ORDER, T0 + i, 1, TotalAmount=i % 9973, Name=f"n{i % 7}")
        items.append((SF, ORDER.encode(), doc))
    items += [items[rng.randrange(n)] for _ in range(n // 100)]  # redelivered copies
    head, tail = items[:1], items[1:]
    rng.shuffle(tail)
    msgs = to_messages(head + tail)
    started = time.perf_counter()
    views = run_in_memory(msgs, tmp_path / "views.duckdb", batch=8000)
    took = time.perf_counter() - started
    print(f"{len(msgs):,} messages in {took:.1f} s: {len(msgs) / took:,.0f} events/s")
    assert diff(compute(msgs), views) == []
    assert sum(s["consumed"] for s in views.flow_stats.values()) == len(msgs)
