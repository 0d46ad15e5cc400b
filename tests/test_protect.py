"""Field-level encryption: round trip, tamper detection, rotation, configuration, and the
real flow never writing a configured field in clear (DuckDB, DLQ, Kafka outputs, logs)."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import orjson
import pytest
from flowkit import read_topic, run_in_memory
from hypothesis import given, settings
from hypothesis import strategies as st
from protectkit import FIELD_NAMES, SENSITIVE, env_with, key_b64, leaks, plaintexts, world
from sferp.connectors.duckdb_views import ViewsWriterPartition

from sferp.compare import RecordRow, diff, load_views
from sferp.config import ConfigError, load_settings
from sferp.generator import GeneratorConfig, produce
from sferp.protect import (
    DecryptError,
    Protector,
    decrypt_result,
    is_token,
    protector_from_settings,
)
from sferp.reference import ReferenceConfig, compute

K1, K2 = key_b64(1), key_b64(2)
RAW1, RAW2 = bytes([1]) * 32, bytes([2]) * 32
TOKEN = re.compile(r"enc:v1:[A-Za-z0-9_-]{1,32}:[A-Za-z0-9_-]+")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.text(max_size=24)


def protector(fields=SENSITIVE) -> Protector:
    return Protector({"kid1": RAW1}, "kid1", fields)


# -- the primitive -------------------------------------------------------------------------


@given(value=json_values, entity=names, key=names, field=names)
@settings(max_examples=300, deadline=None)
def test_round_trip_of_any_json_value(value, entity, key, field) -> None:
    p = protector()
    token = p.encrypt(value, entity, key, field)
    assert TOKEN.fullmatch(token) and token.startswith("enc:v1:kid1:")
    assert p.decrypt(token, entity, key, field) == value
    if isinstance(value, str) and len(value) >= 8:
        assert value not in token
    # a fresh nonce every time: equal values do not give equal ciphertexts
    assert p.encrypt(value, entity, key, field) != token


@given(
    value=json_values,
    entity=names,
    key=names,
    field=names,
    other=names,
    how=st.sampled_from(["bit", "entity", "key", "field", "truncate", "kid", "swap"]),
    where=st.integers(min_value=0),
)
@settings(max_examples=300, deadline=None)
def test_tampering_and_misplacing_are_detected(
    value, entity, key, field, other, how, where
) -> None:
    p = protector()
    token = p.encrypt(value, entity, key, field)
    head, body = token.rsplit(":", 1)
    ctx = [entity, key, field]
    if how == "bit":
        blob = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        blob[where % len(blob)] ^= 1 << (where % 8)
        token = head + ":" + base64.urlsafe_b64encode(bytes(blob)).rstrip(b"=").decode()
    elif how in ("entity", "key", "field"):
        i = ("entity", "key", "field").index(how)
        if other == ctx[i]:
            other += "x"
        ctx[i] = other
    elif how == "truncate":
        token = token[: len(token) - 1 - where % (len(body) - 1)]
    elif how == "kid":
        token = token.replace(":kid1:", ":kid9:")
    else:  # a value of another row moved here
        token = p.encrypt(value, entity, key + "-other", field)
    with pytest.raises(DecryptError) as err:
        p.decrypt(token, *ctx)
    if how == "kid":
        assert "'kid9'" in str(err.value) and "not in the key ring" in str(err.value)


def test_null_stays_null_and_fields_of_other_entities_untouched() -> None:
    p = protector()
    fields = orjson.dumps(
        {"ERP_Customer_Number__c": None, "Name": "Acme", "customer_no": "C-1"},
        option=orjson.OPT_SORT_KEYS,
    ).decode()
    assert p.protect_fields("Account", "001", fields) == fields  # null: nothing to hide
    out = orjson.loads(p.protect_fields("sales_orders", '{"order_no":1}', fields))
    assert is_token(out["customer_no"]) and out["Name"] == "Acme"
    assert p.decrypt_fields("sales_orders", '{"order_no":1}', out)["customer_no"] == "C-1"


def test_dead_letter_raw_is_redacted_or_encrypted_whole() -> None:
    p = protector()
    ctx = "sf.cdc:0:7"
    raw = '{"payload":{"ERP_Customer_Number__c":"C-12345","Name":"x"},"h":[1,{"customer_no":7}]}'
    red = p.redact_raw(raw, ctx)
    assert "C-12345" not in red and '"Name":"x"' in red
    assert orjson.loads(p.decrypt_raw(red, ctx)) == orjson.loads(raw)
    broken = '{"ERP_Customer_Number__c":"C-12345", oops'
    whole = p.redact_raw(broken, ctx)
    assert is_token(whole) and p.decrypt_raw(whole, ctx) == broken
    # embedded JSON text that hides a field from the parser: encrypted whole
    nested = orjson.dumps({"value": '{"customer_no":"C-99999"}'}).decode()
    assert is_token(p.redact_raw(nested, ctx))
    assert p.redact_raw('{"Name":"no sensitive field"}', ctx) == '{"Name":"no sensitive field"}'
    with pytest.raises(DecryptError):
        p.decrypt_raw(red, "sf.cdc:0:8")  # bound to its dead letter


def test_view_columns_in_duckdb_and_kafka_share_their_context() -> None:
    p = protector(("Order.AccountId", "reconciliation_exceptions.detail"))
    row = ("801A", "00001", "001X", None, "Draft", None, "DRAFT", None, None, None, 1, 2, None, 3)
    exc = ("AMOUNT_MISMATCH", "801A", "Salesforce 10.00 vs ERP 12.00 (SO-1)", 1, 2, True)
    pending = {
        "order_status": {("801A",): row},
        "reconciliation_exceptions": {("AMOUNT_MISMATCH", "801A"): exc},
    }
    p.protect_delta(pending)
    got = pending["order_status"][("801A",)]
    assert is_token(got[2]) and got[:2] == row[:2] and got[3:] == row[3:]  # account_id only
    assert p.decrypt(got[2], "order_status", "801A", "account_id") == "001X"
    detail = pending["reconciliation_exceptions"][("AMOUNT_MISMATCH", "801A")][2]
    assert "10.00" not in detail
    ctx = "AMOUNT_MISMATCH:801A"
    assert p.decrypt(detail, "reconciliation_exceptions", ctx, "detail") == exc[2]
    kafka = p.for_kafka(dlq="dlq", orders="orders", exceptions="exc")
    assert kafka is not None and kafka.dlq == "dlq"  # AccountId is a source field name
    dl = {"reason": "not_json", "topic": "t", "partition": 0, "offset": 1}
    records = [
        ("orders", b"801A", orjson.dumps({"sf_order_id": "801A", "account_id": "001X"})),
        ("exc", ctx.encode(), orjson.dumps({"kind": "AMOUNT_MISMATCH", "detail": exc[2]})),
        ("orders", b"801B", None),
        ("dlq", b"t:0:1", orjson.dumps(dl | {"raw": '{"AccountId":"001X"} trailing'})),
        ("dlq", b"t:0:2", orjson.dumps(dl | {"offset": 2, "raw": '{"Name":"x"}'})),
    ]
    out = kafka(records)
    assert [r[:2] for r in out] == [r[:2] for r in records] and out[2][2] is None
    raw = orjson.loads(out[3][2])["raw"]
    assert is_token(raw) and p.decrypt_raw(raw, "t:0:1") == '{"AccountId":"001X"} trailing'
    assert out[4] == records[4]  # mentions no protected field: unchanged
    doc = orjson.loads(out[0][2])
    assert p.decrypt(doc["account_id"], "order_status", "801A", "account_id") == "001X"
    doc = orjson.loads(out[1][2])
    assert p.decrypt(doc["detail"], "reconciliation_exceptions", ctx, "detail") == exc[2]
    assert p.for_kafka(dlq="d", orders="o", exceptions="e") is not None
    assert protector(()).for_kafka(dlq="d", orders="o", exceptions="e") is None


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, setting",
    [
        ({"SFERP_SECURITY__ENCRYPTION_KEYS": "kid1:***notbase64***"}, "ENCRYPTION_KEYS"),
        (
            {"SFERP_SECURITY__ENCRYPTION_KEYS": "kid1:" + base64.b64encode(b"x" * 16).decode()},
            "ENCRYPTION_KEYS",
        ),
        ({"SFERP_SECURITY__ENCRYPTION_KEYS": "justakey"}, "ENCRYPTION_KEYS"),
        ({"SFERP_SECURITY__ENCRYPTION_KEYS": f"a:{K1},a:{K2}"}, "ENCRYPTION_KEYS"),
        (
            {
                "SFERP_SECURITY__ENCRYPTION_KEYS": f"kid1:{K1}",
                "SFERP_SECURITY__ENCRYPTION_KEY_ID": "k9",
            },
            "security.encryption_key_id",
        ),
        ({"SFERP_SECURITY__ENCRYPT_FIELDS": "Account.Name"}, "security.encrypt_fields"),
        (env_with(f"kid1:{K1}", ("items.sku",)), "security.encrypt_fields"),
        (env_with(f"kid1:{K1}", ("order_status.sf_total",)), "security.encrypt_fields"),
        (env_with(f"kid1:{K1}", ("NoDot",)), "security.encrypt_fields"),
        ({"SFERP_SECURITY__ENCRYPTION_KEYS_FILE": "/nonexistent/keys"}, "encryption_keys_file"),
    ],
)
def test_configuration_errors_name_the_setting(env, setting) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ=env)
    msg = str(err.value)
    assert setting in msg and "\n" not in msg
    assert K1 not in msg and K2 not in msg  # never the key material


def test_keys_only_from_environment_or_file(tmp_path: Path) -> None:
    toml = tmp_path / "sferp.toml"
    toml.write_text(f'[security]\nencryption_keys = "kid1:{K1}"\n')
    with pytest.raises(ConfigError, match="security.encryption_keys: secrets are not read"):
        load_settings(toml, environ={})
    ring = tmp_path / "keys"
    ring.write_text(f"kid2:{K2}\nkid1:{K1}\n")
    toml.write_text(
        f'[security]\nencryption_keys_file = "{ring}"\nencryption_key_id = "kid1"\n'
        'encrypt_fields = ["Account.ERP_Customer_Number__c"]\n'
    )
    p = protector_from_settings(load_settings(toml, environ={}))
    assert p is not None and p.current == "kid1" and p.key_ids == ("kid2", "kid1")
    assert "Protector(" in repr(p) and K1 not in repr(p)


def test_nothing_to_encrypt_means_no_protector() -> None:
    assert protector_from_settings(load_settings(environ={})) is None
    keys_only = {"SFERP_SECURITY__ENCRYPTION_KEYS": f"kid1:{K1}"}
    assert protector_from_settings(load_settings(environ=keys_only)) is None


def test_cli_refuses_bad_key_with_exit_2_and_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, SFERP_SECURITY__ENCRYPTION_KEYS="kid1:c2hvcnQ=")
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "run", "--views", str(tmp_path / "v.duckdb")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "SFERP_SECURITY__ENCRYPTION_KEYS" in lines[0], r.stderr
    assert "c2hvcnQ" not in r.stderr


# -- rotation --------------------------------------------------------------------------------


def _record(key: str, number: str) -> tuple:
    fields = orjson.dumps({"ERP_Customer_Number__c": number, "Name": f"Account {key}"}).decode()
    return ("salesforce", "Account", key, False, fields, "1:1:1", 1_700_000_000_000)


def _fields(path: Path) -> dict[str, str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT record_key, fields->>'ERP_Customer_Number__c' FROM records")
        return dict(rows.fetchall())
    finally:
        con.close()


def _cli(*args: str, keys: str, key_id: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, SFERP_SECURITY__ENCRYPTION_KEYS=keys)
    env.pop("SFERP_SECURITY__ENCRYPTION_KEY_ID", None)
    if key_id:
        env["SFERP_SECURITY__ENCRYPTION_KEY_ID"] = key_id
    return subprocess.run(
        [sys.executable, "-m", "sferp", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_rotation_keeps_old_rows_readable_and_rekey_retires_the_old_key(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    a, b = "001000000000001AAA", "001000000000002AAA"
    p1 = Protector({"kid1": RAW1}, "kid1", SENSITIVE)
    part = ViewsWriterPartition(
        str(path), None, commit_interval_s=0, serve_queries=False, protect=p1
    )
    part.write_batch([{"records": {("salesforce", "Account", a): _record(a, "C-11111")}}])
    snap = part.snapshot()
    part.close()
    # rotate: kid2 becomes current, kid1 stays in the ring
    p2 = Protector({"kid2": RAW2, "kid1": RAW1}, "kid2", SENSITIVE)
    part = ViewsWriterPartition(
        str(path), snap, commit_interval_s=0, serve_queries=False, protect=p2
    )
    part.write_batch([{"records": {("salesforce", "Account", b): _record(b, "C-22222")}}])
    part.close()
    tokens = _fields(path)
    assert tokens[a].startswith("enc:v1:kid1:") and tokens[b].startswith("enc:v1:kid2:")
    assert p2.decrypt(tokens[a], "Account", a, "ERP_Customer_Number__c") == "C-11111"
    assert p2.decrypt(tokens[b], "Account", b, "ERP_Customer_Number__c") == "C-22222"
    only2 = Protector({"kid2": RAW2}, "kid2")
    with pytest.raises(DecryptError, match="'kid1', which is not in the key ring"):
        only2.decrypt(tokens[a], "Account", a, "ERP_Customer_Number__c")

    sql = "SELECT entity, record_key, fields FROM records ORDER BY record_key"
    r = _cli("decrypt", sql, "--views", str(path), keys=f"kid2:{K2}")
    assert r.returncode == 1 and "kid1" in r.stderr and "C-22222" in r.stdout
    r = _cli("rekey", "--views", str(path), keys=f"kid2:{K2},kid1:{K1}")
    assert r.returncode == 0 and "re-encrypted 1 value(s) with key 'kid2'" in r.stdout, r.stderr
    assert all(t.startswith("enc:v1:kid2:") for t in _fields(path).values())
    r = _cli("decrypt", sql, "--views", str(path), "--format", "json", keys=f"kid2:{K2}")
    assert r.returncode == 0, r.stderr
    got = [row["fields"]["ERP_Customer_Number__c"] for row in orjson.loads(r.stdout)]
    assert got == ["C-11111", "C-22222"]


# -- the real flow ---------------------------------------------------------------------------


def _decrypted(views, p: Protector):
    records = {
        k: RecordRow(r.deleted, p.decrypt_fields(k[1], k[2], r.fields), r.version, r.event_time_ms)
        for k, r in views.records.items()
    }
    orders = {}
    for oid, row in views.order_status.items():
        acc = row.account_id
        if acc is not None:
            assert is_token(acc)
            acc = p.decrypt(acc, "order_status", oid, "account_id")
        orders[oid] = row._replace(account_id=acc)
    dead = {
        (t, part, off, reason, p.decrypt_raw(raw, f"{t}:{part}:{off}"))
        for t, part, off, reason, raw in views.dead_letters
    }
    return dataclasses.replace(views, records=records, order_status=orders, dead_letters=dead)


def _parsed(dead: set) -> set:
    out = set()
    for t, part, off, reason, raw in dead:
        try:
            raw = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
        except orjson.JSONDecodeError:
            pass
        out.add((t, part, off, reason, raw))
    return out


def test_flow_writes_no_plaintext_and_decrypts_to_the_reference(tmp_path: Path, caplog) -> None:
    msgs = world()
    secrets = plaintexts(msgs)
    assert len(secrets) >= 20
    path = tmp_path / "views.duckdb"
    env = env_with(f"kid1:{K1}", (*SENSITIVE, "Order.AccountId"))
    caplog.set_level(logging.DEBUG)
    views = run_in_memory(list(msgs), path, env=env)
    assert leaks(str(path), secrets) == []
    assert not any(s in caplog.text for s in secrets)
    # the dead letters did carry the fields: redacted, or encrypted whole
    carried = [d for d in views.dead_letters if any(n in d[4] for n in FIELD_NAMES)]
    whole = [d for d in views.dead_letters if is_token(d[4])]
    assert len(carried) >= 10 and whole
    p = protector_from_settings(load_settings(environ=env))
    expected = compute(list(msgs), ReferenceConfig.default())
    got = _decrypted(views, p)
    assert _parsed(got.dead_letters) == _parsed(expected.dead_letters)
    no_dl = {"dead_letters": set()}
    assert diff(dataclasses.replace(expected, **no_dl), dataclasses.replace(got, **no_dl)) == []
    # a query result decrypts given its key columns
    con = duckdb.connect(str(path), read_only=True)
    res = con.execute(
        "SELECT entity, record_key, fields->>'ERP_Customer_Number__c' FROM records "
        "WHERE entity = 'Account' AND fields->>'ERP_Customer_Number__c' IS NOT NULL"
    ).fetchall()
    con.close()
    rows = [list(r) for r in res]
    cols = ["entity", "record_key", "(fields ->> 'ERP_Customer_Number__c')"]
    n, problems = decrypt_result(p, cols, ["VARCHAR"] * 3, rows)
    assert n == len(rows) > 0 and problems == []
    assert {r[2] for r in rows} <= secrets


def test_kafka_outputs_and_dlq_carry_no_plaintext(broker, topics, tmp_path: Path) -> None:
    roles = ("sf_cdc", "erp_items", "erp_inventory", "erp_sales_orders")
    outs = ("out_inventory", "out_orders", "out_exceptions", "dlq")
    names = topics({r: 2 for r in roles} | {r: 1 for r in outs})
    config = tmp_path / "sferp.toml"
    config.write_text("[topics]\n" + "".join(f'{r} = "{n}"\n' for r, n in names.items()))
    cfg = GeneratorConfig(
        orders=200,
        duplicates=0.05,
        disorder=0.1,
        bad=0.05,
        partitions=2,
        seed=9,
        topics={r: names[r] for r in roles},
    )
    produce(cfg, broker.bootstrap, create_topics=False)
    views = tmp_path / "views.duckdb"
    env = dict(os.environ, **env_with(f"kid1:{K1}", (*SENSITIVE, "Order.AccountId")))
    r = subprocess.run(
        [sys.executable, "-m", "sferp", "run", "--config", str(config), "--bootstrap"]
        + [broker.bootstrap, "--views", str(views), "--until-caught-up"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from sferp.demo import generated_messages

    secrets = plaintexts(tuple(generated_messages(cfg)))
    assert secrets and not any(s in r.stderr + r.stdout for s in secrets)
    assert leaks(str(views), secrets) == []
    p = Protector({"kid1": RAW1}, "kid1")
    dlq = read_topic(broker.bootstrap, names["dlq"])
    assert dlq
    redacted = 0
    for m in dlq:
        value = m.value.decode()
        assert not any(s in value for s in secrets), value[:300]
        doc = orjson.loads(m.value)
        if "enc:v1:" in doc["raw"]:
            redacted += 1
            ctx = f"{doc['topic']}:{doc['partition']}:{doc['offset']}"
            p.decrypt_raw(doc["raw"], ctx)  # decrypts with the ring
    assert redacted >= 3
    orders = read_topic(broker.bootstrap, names["out_orders"])
    view = load_views(views).order_status
    accounts = 0
    for m in orders:
        if m.value is None:
            continue
        doc = orjson.loads(m.value)
        oid = m.key.decode()
        if doc["account_id"] is not None:
            plain = p.decrypt(doc["account_id"], "order_status", oid, "account_id")
            if oid in view:
                assert plain == p.decrypt(view[oid].account_id, "order_status", oid, "account_id")
            accounts += 1
    assert accounts > 50


def test_writeback_dead_letters_encrypt_configured_fields(caplog):
    from sferp.flows.salesforce import dead_letter_writer

    from sferp.protect import Protector, parse_keyring

    env = env_with(f"k1:{key_b64(7)}", fields=("Order.ERP_Order_No__c",))
    cfg = load_settings(environ=env)
    write = dead_letter_writer(cfg, kafka=False)  # the log stands in for the DLQ topic
    raw = orjson.dumps(
        {"sobject": "Order", "id": "801A", "fields": {"ERP_Order_No__c": "SO-SECRET-9"}}
    ).decode()
    value = {"reason": "writeback:X", "topic": "writeback", "partition": 0, "offset": 5, "raw": raw}
    with caplog.at_level("ERROR", logger="sferp.salesforce"):
        write(b"writeback:Order:801A", orjson.dumps(value))
    logged = caplog.text
    assert "write-back dead letter" in logged and "SO-SECRET-9" not in logged
    token = orjson.loads(orjson.loads(logged[logged.index("{") :].strip())["raw"])["fields"]
    p = Protector(parse_keyring(f"k1:{key_b64(7)}", "test"), "k1", ["Order.ERP_Order_No__c"])
    assert p.decrypt(
        token["ERP_Order_No__c"], "dead_letters", "writeback:0:5", "ERP_Order_No__c"
    ) == ("SO-SECRET-9")
