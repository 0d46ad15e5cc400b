"""The reconcile flow with a direct Salesforce connection (a local HTTPS Salesforce):
polling instead of CDC, gap re-reads, write-back and its echoes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from bytewax._bytewax import cli_main
from bytewax.testing import TestingSource
from flowkit import run_in_memory
from kafka import KafkaProducer
from sf_fake import Fault
from sferp.flows.reconcile import FlowOptions, build_flow
from sferp.operators.decode_salesforce import ENTITY_FIELDS

from sferp.compare import load_views
from sferp.config import load_settings
from sferp.events import RawMessage
from sferp.runner import prepare_recovery
from sferp.sfid import to18

T0 = 1_795_000_000_000  # 2026-11-18T11:06:40Z
PHASES = [T0, T0 + 60_000, T0 + 120_000, T0 + 1_800_000]
A1, A2 = "001000000000001AAA", "001000000000002AAA"
P1, P2, P3 = "01t000000000001AAA", "01t000000000002AAA", "01t000000000003AAA"
O = {i: f"80100000000000{i}AAA" for i in range(1, 8)}  # noqa: E741
I = {i: f"80200000000000{i}AAA" for i in range(1, 8)}  # noqa: E741
SF_TOPIC = "sf.cdc"


def _order(n: int, account: str, status: str = "Draft", total: float = 0.0) -> dict:
    return {
        "AccountId": account,
        "OrderNumber": f"{n:08d}",
        "Status": status,
        "TotalAmount": total or 100.0 * n,
        "EffectiveDate": "2026-11-18",
    }


def _item(order: str, product: str, qty: float) -> dict:
    return {"OrderId": order, "Product2Id": product, "Quantity": qty, "UnitPrice": 50.0}


# (phase, entity, Id, change, fields): every record changes at most once per phase,
# except O7, which is activated and cancelled between two polls.
SF_CHANGES = [
    (0, "Account", A1, "CREATE", {"Name": "Acme", "ERP_Customer_Number__c": "C-1"}),
    (0, "Account", A2, "CREATE", {"Name": "Beta", "ERP_Customer_Number__c": "C-2"}),
    (0, "Product2", P1, "CREATE", {"ProductCode": "SKU-1", "Name": "Widget", "IsActive": True}),
    (0, "Product2", P2, "CREATE", {"ProductCode": "SKU-2", "Name": "Gadget", "IsActive": True}),
    (0, "Product2", P3, "CREATE", {"ProductCode": "SKU-3", "Name": "Gizmo", "IsActive": True}),
    (0, "Order", O[1], "CREATE", _order(1, A1[:15])),  # 15-character reference
    (0, "Order", O[2], "CREATE", _order(2, A1)),
    (0, "Order", O[3], "CREATE", _order(3, A2)),
    (0, "Order", O[4], "CREATE", _order(4, A2)),
    (0, "Order", O[5], "CREATE", _order(5, A1)),
    (0, "Order", O[7], "CREATE", _order(7, A1)),
    (0, "OrderItem", I[1], "CREATE", _item(O[1], P1, 2.0)),
    (0, "OrderItem", I[2], "CREATE", _item(O[2], P2, 1.0)),
    (0, "OrderItem", I[3], "CREATE", _item(O[3], P1, 3.0)),
    (0, "OrderItem", I[4], "CREATE", _item(O[4], P3, 4.0)),
    (0, "OrderItem", I[5], "CREATE", _item(O[5], P2, 5.0)),
    (1, "Order", O[1], "UPDATE", {"Status": "Activated"}),
    (1, "Order", O[2], "UPDATE", {"Status": "Activated"}),
    (1, "Order", O[3], "UPDATE", {"Status": "Activated"}),
    (1, "Order", O[4], "UPDATE", {"Status": "Activated"}),
    (1, "Order", O[5], "UPDATE", {"TotalAmount": 555.5}),
    (1, "Order", O[7], "UPDATE", {"Status": "Activated"}),
    (1, "Order", O[7], "UPDATE", {"Status": "Cancelled"}),
    (2, "Order", O[3], "UPDATE", {"Status": "Cancelled"}),
    (2, "Order", O[5], "DELETE", {}),
    (2, "OrderItem", I[4], "UPDATE", {"Quantity": 6.0}),
    (2, "Product2", P2, "UPDATE", {"IsActive": False}),
    (3, "Order", O[6], "CREATE", _order(6, A2, "Activated", 60.0)),
    (3, "OrderItem", I[6], "CREATE", _item(O[6], P2, 2.0)),
    (3, "Order", O[5], "UNDELETE", {**_order(5, A1), "TotalAmount": 555.5}),
]


def _cdc(entity: str, rid: str, change: str, fields: dict, ts: int, n: int) -> dict:
    header = {
        "entityName": entity,
        "recordIds": [rid],
        "changeType": change,
        "changeOrigin": "com/salesforce/api/soap/62.0;client=SfdcInternalAPI/",
        "transactionKey": f"tx-{n}",
        "sequenceNumber": 1,
        "commitTimestamp": ts,
        "commitNumber": 10_000 + n,
        "commitUser": "005000000000001AAA",
    }
    if change == "UPDATE":
        header["changedFields"] = sorted(fields) + ["LastModifiedDate"]
    body = {"ChangeEventHeader": header, **({} if change == "DELETE" else fields)}
    return {"replayId": str(n), "payload": body}


def _timed_changes() -> list[tuple[int, int, tuple]]:
    """(phase, commit ms, change) with distinct, increasing commit times."""
    out = []
    for n, ch in enumerate(SF_CHANGES):
        out.append((ch[0], PHASES[ch[0]] + 10 * n, ch))
    return out


def cdc_messages() -> list[RawMessage]:
    msgs = []
    for n, (_, ts, (_, entity, rid, change, fields)) in enumerate(_timed_changes()):
        value = orjson.dumps(_cdc(entity, rid, change, fields, ts, n))
        msgs.append(RawMessage(SF_TOPIC, 0, n, rid.encode(), value, ts))
    return msgs


def apply_phase(org, phase: int) -> None:
    """Bring the fake org to the state after `phase` (SystemModstamp = commit time)."""
    for p, ts, (_, entity, rid, change, fields) in _timed_changes():
        if p != phase:
            continue
        if change == "DELETE":
            org.delete(entity, rid, ts)
        else:
            org.put(entity, rid, {**fields, "IsDeleted": False}, ts)


def _dbz(table: str, key: dict, after: dict | None, lsn: int, ts: int) -> RawMessage:
    op = "c" if after is not None else "d"
    value = {
        "before": None if after is not None else key,
        "after": after,
        "source": {"ts_ms": ts, "lsn": lsn, "table": table},
        "op": op,
    }
    return RawMessage(f"erp.public.{table}", 0, lsn, orjson.dumps(key), orjson.dumps(value), ts)


def erp_messages() -> list[RawMessage]:
    t = T0 - 100_000
    rows = [
        (
            "items",
            {"sku": "SKU-1"},
            {"sku": "SKU-1", "description": "w", "list_price": 50, "active": True},
        ),
        (
            "items",
            {"sku": "SKU-2"},
            {"sku": "SKU-2", "description": "g", "list_price": 50, "active": True},
        ),
        (
            "inventory",
            {"sku": "SKU-1", "warehouse": "WH1"},
            {"sku": "SKU-1", "warehouse": "WH1", "qty_on_hand": 100, "qty_allocated": 5},
        ),
        (
            "inventory",
            {"sku": "SKU-2", "warehouse": "WH1"},
            {"sku": "SKU-2", "warehouse": "WH1", "qty_on_hand": 50, "qty_allocated": 0},
        ),
    ]
    msgs = [_dbz(table, key, after, lsn, t) for lsn, (table, key, after) in enumerate(rows, 1)]

    def so(no: str, sf_id: str, status: str, total: float, lsn: int, ts: int) -> RawMessage:
        after = {
            "order_no": no,
            "sf_order_id": sf_id,
            "customer_no": "C-1",
            "status": status,
            "total_amount": total,
            "currency": "EUR",
        }
        return _dbz("sales_orders", {"order_no": no}, after, lsn, ts)

    msgs += [
        so("SO-1", O[1][:15], "OPEN", 100.0, 10, T0 + 90_000),
        so("SO-2", O[2], "OPEN", 250.0, 11, T0 + 100_000),  # Order 2 says 200.00
        so("SO-99", "801000000000099AAA", "OPEN", 10.0, 12, T0 + 100_000),  # an orphan
        so("SO-1", O[1][:15], "INVOICED", 100.0, 20, T0 + 3_600_000),
    ]
    # One topic per table: renumber offsets per topic.
    seen: dict[str, int] = {}
    out = []
    for m in msgs:
        off = seen.get(m.topic, 0)
        seen[m.topic] = off + 1
        out.append(m._replace(offset=off))
    return out


def sf_env(srv, **extra: str) -> dict[str, str]:
    env = {
        "SFERP_SALESFORCE__INSTANCE_URL": srv.url,
        "SFERP_SALESFORCE__AUTH": "jwt",
        "SFERP_SALESFORCE__USERNAME": srv.org.username,
        "SFERP_SALESFORCE__CONSUMER_KEY": srv.org.consumer_key,
        "SFERP_SALESFORCE__PRIVATE_KEY_FILE": str(srv.key_file),
        "SFERP_SALESFORCE__CA_BUNDLE": str(srv.ca),
        "SFERP_SALESFORCE__CALLS_PER_MINUTE": "60000",
        "SFERP_SALESFORCE__TIMEOUT_S": "5",
    }
    env.update({f"SFERP_SALESFORCE__{k.upper()}": v for k, v in extra.items()})
    return env


def run_flow(
    msgs: list[RawMessage],
    views: Path,
    env: dict,
    recovery: Path | None = None,
    later: list[RawMessage] | None = None,
):
    """A bounded run over msgs (batches of 50) and then `later` (one more batch, so a
    resumed TestingSource reads exactly it)."""
    settings = load_settings(environ=env)
    batches = [msgs[i : i + 50] for i in range(0, len(msgs), 50)]
    if later:
        batches.append(later)
    flow = build_flow(
        settings,
        FlowOptions(
            bounded=True,
            views_path=str(views),
            recovery=recovery is not None,
            source=TestingSource(batches),
            kafka_outputs=False,
        ),
    )
    rc = prepare_recovery(str(recovery)) if recovery is not None else None
    cli_main(flow, workers_per_process=1, recovery_config=rc)
    return load_views(views)


def _sf_records(v) -> dict:
    """records rows, Salesforce fields cut to the §1 fields (what a poll fetches; CDC
    updates also carry LastModifiedDate)."""
    out = {}
    for k, r in v.records.items():
        fields = r.fields
        if k[0] == "salesforce":
            fields = {f: fields.get(f) for f in ENTITY_FIELDS[k[1]]}
        out[k] = (r.deleted, fields, r.event_time_ms)
    return out


def test_polling_gives_the_views_cdc_gives_for_what_the_polls_observe(fake_sf, tmp_path):
    cdc = run_in_memory(cdc_messages() + erp_messages(), tmp_path / "cdc.duckdb")
    org = fake_sf.org
    env = sf_env(fake_sf, poll_objects="Product2,Account,Order,OrderItem", lookback_s="60") | {
        "SFERP_TOPICS__SF_CDC": ""
    }  # no Kafka input for Salesforce at all
    org.page_size = 4
    for phase in range(len(PHASES)):  # a poll after each phase, resuming from snapshots
        apply_phase(org, phase)
        polled = run_flow(erp_messages(), tmp_path / "poll.duckdb", env, tmp_path / "recovery")

    # Everything the polls saw is exactly what CDC says ...
    assert _sf_records(polled) == _sf_records(cdc)
    assert polled.inventory_live == cdc.inventory_live
    assert polled.open_exceptions == cdc.open_exceptions
    o7 = O[7]
    assert {k: v for k, v in polled.order_status.items() if k != o7} == {
        k: v for k, v in cdc.order_status.items() if k != o7
    }
    # ... except the state no poll saw: Order 7 was Activated and Cancelled between polls.
    assert cdc.order_status[o7].activated_at_ms == PHASES[1] + 10 * 21
    assert polled.order_status[o7].activated_at_ms is None
    assert polled.order_status[o7]._replace(activated_at_ms=None) == cdc.order_status[o7]._replace(
        activated_at_ms=None
    )
    # The scenario exercises every exception kind a poll can see.
    assert cdc.open_exceptions == {
        ("AMOUNT_MISMATCH", O[2]),
        ("ORPHAN_ERP_ORDER", "SO-99"),
        ("UNKNOWN_SKU", "SKU-3"),
        ("HANDOFF_OVERDUE", O[4]),
        ("HANDOFF_OVERDUE", O[6]),
    }
    assert cdc.order_status[O[1]].account_id == A1 == to18(A1[:15])
    assert cdc.records[("salesforce", "Order", O[5])].deleted is False  # undeleted
    # Polled images count on their own flow_stats row; overlapping re-reads are duplicates.
    stats = polled.flow_stats["salesforce.api"]
    assert stats["consumed"] == stats["applied"] + stats["duplicates"]
    assert stats["applied"] == len({(e, r, ts) for _, ts, (_, e, r, _, _) in _timed_changes()}) - 1
    assert SF_TOPIC not in polled.flow_stats


def _gap(rid: str, ts: int, n: int) -> RawMessage:
    event = _cdc("Order", rid, "GAP_UPDATE", {}, ts, n)
    return RawMessage(SF_TOPIC, 0, n, rid.encode(), orjson.dumps(event), ts)


def test_gaps_are_reread_in_the_flow(fake_sf, tmp_path):
    org = fake_sf.org
    for phase in range(len(PHASES)):
        apply_phase(org, phase)
    org.put("Order", O[4], {"Status": "Cancelled"}, PHASES[3] + 5_000)  # the missed change
    msgs = cdc_messages()
    msgs.append(_gap(O[4], PHASES[3] + 5_000, len(msgs)))
    msgs.append(_gap("801000000000404AAA", PHASES[3] + 6_000, len(msgs)))  # purged since
    v = run_flow(msgs + erp_messages(), tmp_path / "v.duckdb", sf_env(fake_sf))
    assert not any(kind == "SF_RESYNC_NEEDED" for kind, _ in v.open_exceptions)
    assert ("HANDOFF_OVERDUE", O[4]) not in v.open_exceptions  # it was cancelled
    assert v.order_status[O[4]].stage == "CANCELLED"
    assert v.records[("salesforce", "Order", "801000000000404AAA")].deleted is True
    assert v.flow_stats[SF_TOPIC]["applied"] == len(msgs)
    # With Salesforce failing, the gap stays open (and HANDOFF_OVERDUE with it).
    org.inject(Fault(lambda m, p: "/query" in p, "http", times=10_000, status=500))
    v = run_flow(msgs + erp_messages(), tmp_path / "w.duckdb", sf_env(fake_sf))
    assert {k for kind, k in v.open_exceptions if kind == "SF_RESYNC_NEEDED"} == {
        O[4],
        "801000000000404AAA",
    }


def test_writeback_from_the_flow_and_its_echoes(fake_sf, tmp_path):
    org = fake_sf.org
    for phase in range(len(PHASES)):
        apply_phase(org, phase)
    env = sf_env(fake_sf, writeback="true")
    recovery = tmp_path / "recovery"
    msgs = cdc_messages() + erp_messages()
    v = run_flow(msgs, tmp_path / "v.duckdb", env, recovery)
    orders = org.records["Order"]
    for oid, row in v.order_status.items():
        assert orders[oid]["ERP_Stage__c"] == row.stage
        assert orders[oid]["ERP_Order_No__c"] == row.erp_order_no
    assert orders[O[1]]["ERP_Invoiced_At__c"] == "2026-11-18T12:06:40.000Z"
    products = org.records["Product2"]
    codes = {p["ProductCode"]: pid for pid, p in products.items()}
    assert set(v.inventory_live) == {"SKU-1", "SKU-2", "SKU-3"}
    for sku, row in v.inventory_live.items():
        assert products[codes[sku]]["Available_To_Promise__c"] == row.available_to_promise
    assert v.inventory_live["SKU-3"].available_to_promise == -6  # demand, no stock
    updates = [c for c in org.api_calls() if c.path.endswith("/composite/sobjects")]
    written = len(org.writes)
    assert written == len(v.order_status) + 3 and len(updates) <= 3
    assert all(c.path.startswith("/services/data/v62.0/") for c in updates)

    # Salesforce's CDC echoes of those writes: ignored when they changed only write-back
    # fields; applied when a trigger changed something else in the same transaction.
    n = len(msgs)
    echo = _cdc("Order", O[2], "UPDATE", {"ERP_Stage__c": "OPEN"}, PHASES[3] + 9_000, n)
    echo["payload"]["ChangeEventHeader"]["changeOrigin"] = (
        "com/salesforce/api/rest/62.0;client=sferp"
    )
    mixed = _cdc(
        "Order",
        O[2],
        "UPDATE",
        {"ERP_Stage__c": "OPEN", "Status": "Cancelled"},
        PHASES[3] + 9_500,
        n + 1,
    )
    mixed["payload"]["ChangeEventHeader"]["changeOrigin"] = echo["payload"]["ChangeEventHeader"][
        "changeOrigin"
    ]
    more = [
        RawMessage(SF_TOPIC, 0, n, b"k", orjson.dumps(echo), -1),
        RawMessage(SF_TOPIC, 0, n + 1, b"k", orjson.dumps(mixed), -1),
    ]
    v2 = run_flow(msgs, tmp_path / "v.duckdb", env, recovery, later=more)
    assert v2.flow_stats[SF_TOPIC]["ignored"] == v.flow_stats[SF_TOPIC]["ignored"] + 1
    assert v2.order_status[O[2]].stage == "CANCELLED"
    # Resumed from the snapshot: only the order that changed is written again.
    assert len(org.writes) == written + 1
    assert org.writes[-1][1] == O[2] and org.writes[-1][2]["ERP_Stage__c"] == "CANCELLED"


def test_sferp_run_polls_salesforce_end_to_end(broker, topics, fake_sf, tmp_path):
    roles = ["erp_items", "erp_inventory", "erp_sales_orders"]
    outputs = ["out_inventory", "out_orders", "out_exceptions", "dlq"]
    names = topics({r: 1 for r in roles + outputs})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    table_topic = {f"erp.public.{r[4:]}": names[r] for r in roles}
    for m in erp_messages():
        producer.send(table_topic[m.topic], key=m.key, value=m.value)
    producer.flush()
    producer.close()
    for phase in range(len(PHASES)):
        apply_phase(fake_sf.org, phase)
    config = tmp_path / "sferp.toml"
    lines = ["[topics]", 'sf_cdc = ""'] + [f'{r} = "{n}"' for r, n in names.items()]
    lines += [
        "[salesforce]",
        f'instance_url = "{fake_sf.url}"',
        f'username = "{fake_sf.org.username}"',
        f'consumer_key = "{fake_sf.org.consumer_key}"',
        f'private_key_file = "{fake_sf.key_file}"',
        f'ca_bundle = "{fake_sf.ca}"',
        'poll_objects = ["Product2", "Account", "Order", "OrderItem"]',
    ]
    config.write_text("\n".join(lines) + "\n")
    views = tmp_path / "views.duckdb"
    base = [sys.executable, "-m", "sferp", "run", "--config", str(config)]
    base += ["--bootstrap", broker.bootstrap, "--views", str(views), "--until-caught-up"]
    env = dict(os.environ)
    bad = subprocess.run(
        base,
        capture_output=True,
        text=True,
        timeout=120,
        env=env | {"SFERP_SALESFORCE__CONSUMER_KEY": "not-the-app"},
    )
    assert bad.returncode == 2, bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, bad.stderr  # one line, with Salesforce's own explanation
    assert "salesforce.auth: jwt login" in lines[0] and "invalid_grant" in lines[0]
    assert "authentication failure" in lines[0] and "{content}" not in lines[0]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    v = load_views(views)
    sf_keys = {k[2] for k in v.records if k[0] == "salesforce"}
    assert sf_keys == {rid for _, _, rid, _, _ in SF_CHANGES}
    assert set(v.order_status) == {O[i] for i in (1, 2, 3, 4, 5, 6, 7)}
    assert ("AMOUNT_MISMATCH", O[2]) in v.open_exceptions
    assert v.flow_stats["salesforce.api"]["applied"] == len(sf_keys)
