"""Tests of the synthetic change-stream generator (sferp.generator).

The checks re-derive every property from the produced bytes with code written
here (a small classifier of the semantics' dead-letter rules, kafka-python's own
murmur2, Salesforce's documented Id checksum), so they do not trust the
generator's own labels; one test then checks those labels against the
reference model as well.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2 as kafka_murmur2

from sferp.generator import (
    BASE_TIME_MS,
    DEFAULT_TOPICS,
    GeneratedMessage,
    GeneratorConfig,
    cli_generate,
    generate,
    generate_labelled,
    murmur2,
    produce,
    read_jsonl,
    write_jsonl,
)

SF = DEFAULT_TOPICS["sf_cdc"]
ITEMS = DEFAULT_TOPICS["erp_items"]
INVENTORY = DEFAULT_TOPICS["erp_inventory"]
SALES = DEFAULT_TOPICS["erp_sales_orders"]
TABLE_OF = {ITEMS: "items", INVENTORY: "inventory", SALES: "sales_orders"}
PK = {"items": ("sku",), "inventory": ("sku", "warehouse"), "sales_orders": ("order_no",)}
NUMERIC = {
    "items": ("list_price",),
    "inventory": ("qty_on_hand", "qty_allocated"),
    "sales_orders": ("total_amount",),
}
CHANGE_TYPES = {
    "CREATE",
    "UPDATE",
    "DELETE",
    "UNDELETE",
    "GAP_CREATE",
    "GAP_UPDATE",
    "GAP_DELETE",
    "GAP_UNDELETE",
    "GAP_OVERFLOW",
}
USED = {"Product2", "Account", "Order", "OrderItem"}
PREFIX = {"Product2": "01t", "Account": "001", "Order": "801", "OrderItem": "802"}


def _cfg(**kw) -> GeneratorConfig:
    kw.setdefault("orders", 400)
    return GeneratorConfig(**kw)


_CACHE: dict[tuple, list[tuple[GeneratedMessage, str]]] = {}


def _labelled(cfg: GeneratorConfig) -> list[tuple[GeneratedMessage, str]]:
    key = (cfg.orders, cfg.duplicates, cfg.disorder, cfg.bad, cfg.partitions, cfg.seed)
    if key not in _CACHE:
        _CACHE[key] = list(generate_labelled(cfg))
    return _CACHE[key]


def _messages(cfg: GeneratorConfig) -> list[GeneratedMessage]:
    return [m for m, _ in _labelled(cfg)]


# --- an independent classifier of docs/semantics.md §1 ---------------------------------------


def _no_constants(name: str):
    raise ValueError(name)


def _is_decimal_text(v: str) -> bool:
    try:
        return Decimal(v).is_finite()
    except InvalidOperation:
        return False


def _decimal_columns(schema: dict) -> set[str]:
    for f in schema.get("fields", []):
        if f.get("field") == "after":
            return {
                c["field"]
                for c in f["fields"]
                if c.get("name") == "org.apache.kafka.connect.data.Decimal"
            }
    return set()


def classify(topic: str, key: bytes | None, value: bytes | None) -> str:
    """The outcome class of one message: ok, ignored, or a dead-letter reason."""
    if value is None:
        return "ignored"
    if len(value) > 1024 * 1024:
        return "too_large"
    try:
        obj = json.loads(value.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError):
        return "not_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    if topic == SF:
        body = obj["payload"] if isinstance(obj.get("payload"), dict) else obj
        header = body.get("ChangeEventHeader")
        if not isinstance(header, dict):
            return "missing_header"
        if header.get("changeType") not in CHANGE_TYPES:
            return "bad_header"
        if not isinstance(header.get("commitTimestamp"), int):
            return "bad_header"
        return "ok" if header.get("entityName") in USED else "ignored"
    wrapped = "schema" in obj and isinstance(obj.get("payload"), dict)
    env = obj["payload"] if wrapped else obj
    op = env.get("op")
    if op in ("t", "m"):
        return "ignored"
    if op not in ("c", "u", "d", "r"):
        return "bad_envelope"
    table = TABLE_OF[topic]
    image = env["before"] if op == "d" else env["after"]
    if not isinstance(image, dict):
        return "bad_envelope"
    key_obj = json.loads(key) if key else {}
    for col in PK[table]:
        v = image.get(col, key_obj.get(col))
        if v is None:
            v = key_obj.get(col)
        if not isinstance(v, str | int):
            return "missing_primary_key"
    if op != "d":
        decimals = _decimal_columns(obj["schema"]) if wrapped else set()
        for col in NUMERIC[table]:
            v = image.get(col)
            if v is None or (isinstance(v, int | float) and not isinstance(v, bool)):
                continue
            if isinstance(v, str) and col in decimals:
                try:
                    base64.b64decode(v, validate=True)
                    continue
                except binascii.Error:
                    return "bad_number"
            if isinstance(v, str) and _is_decimal_text(v):
                continue
            return "bad_number"
    return "ok"


def _measure(msgs: list[GeneratedMessage]) -> tuple[collections.Counter, int]:
    """Outcome counts, with byte copies of earlier good messages counted as duplicates."""
    seen: set[tuple[str, bytes]] = set()
    counts: collections.Counter = collections.Counter()
    for m in msgs:
        c = classify(m.topic, m.key, m.value)
        if c == "ok":
            if (m.topic, m.value) in seen:
                c = "duplicate"
            else:
                seen.add((m.topic, m.value))
        counts[c] += 1
    return counts, len(msgs)


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs():
    a = list(generate(_cfg(orders=150, seed=7)))
    b = list(generate(_cfg(orders=150, seed=7)))
    c = list(generate(_cfg(orders=150, seed=8)))
    assert a == b
    assert len(a) > 1000
    assert a != c
    assert {m.value for m in a} != {m.value for m in c}


def test_knobs_do_not_change_the_business_events():
    """Faults are laid over the same simulated events: the distinct good messages stay equal."""
    clean = _messages(_cfg(duplicates=0.0, disorder=0.0, bad=0.0))
    noisy = _messages(_cfg(duplicates=0.2, disorder=0.3, bad=0.05))

    def good(msgs):
        return {
            (m.topic, m.key, m.value) for m in msgs if classify(m.topic, m.key, m.value) == "ok"
        }

    assert good(clean) == good(noisy)
    counts, _ = _measure(clean)
    assert counts["duplicate"] == 0
    assert sum(v for k, v in counts.items() if k not in ("ok", "ignored")) == 0


# --- fractions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duplicates", "bad"),
    [(0.05, 0.01), (0.2, 0.05), (0.0, 0.1), (0.3, 0.0)],
)
def test_duplicate_and_bad_fractions_within_one_percent(duplicates, bad):
    msgs = _messages(_cfg(duplicates=duplicates, bad=bad))
    counts, total = _measure(msgs)
    n_bad = total - counts["ok"] - counts["ignored"] - counts["duplicate"]
    assert abs(counts["duplicate"] / total - duplicates) <= 0.01, counts
    assert abs(n_bad / total - bad) <= 0.01, counts


def test_labels_match_the_independent_classifier():
    for m, label in _labelled(_cfg(duplicates=0.1, bad=0.05)):
        c = classify(m.topic, m.key, m.value)
        if label == "applied":
            assert c == "ok", (m, label)
        elif label == "duplicate":
            assert c == "ok"
        elif label == "ignored":
            assert c == "ignored", (m, label)
        else:
            assert label.startswith("dead_letter:")
            assert c == label.split(":", 1)[1], (m.value[:300], label)


def test_every_bad_kind_present_and_too_large_rare():
    cfg = _cfg(bad=0.05)
    reasons = collections.Counter(classify(m.topic, m.key, m.value) for m in _messages(cfg))
    for reason in (
        "not_json",
        "not_an_object",
        "missing_header",
        "bad_header",
        "bad_number",
        "missing_primary_key",
        "too_large",
    ):
        assert reasons[reason] > 0, reason
    assert reasons["too_large"] <= 5
    raw = [m.value for m in _messages(cfg) if m.value is not None]
    assert any(b"\xe9" in v and classify(SF, None, v) == "not_json" for v in raw)  # bad UTF-8
    assert any(b'"qty_on_hand":"lots"' in v for v in raw)


def test_duplicates_arrive_soon_and_disorder_is_bounded():
    msgs = _messages(_cfg(duplicates=0.1, disorder=0.2, bad=0.0))
    first: dict[tuple[str, bytes], int] = {}
    gaps = []
    for i, m in enumerate(msgs):
        if m.value is None:
            continue
        k = (m.topic, m.value)
        if k in first:
            gaps.append(i - first[k])
        else:
            first[k] = i
    assert gaps and max(gaps) <= 600
    # Event time of a message never trails the newest seen by more than a few minutes,
    # except the deliberately late partial updates (which trail by at most a minute or two).
    newest = 0
    worst = 0
    for m in msgs:
        t = _event_time(m)
        if t is None:
            continue
        newest = max(newest, t)
        worst = max(worst, newest - t)
    assert worst <= 10 * 60 * 1000


# --- content ---------------------------------------------------------------------------------


def _event_time(m: GeneratedMessage) -> int | None:
    if m.value is None or classify(m.topic, m.key, m.value) != "ok":
        return None
    o = orjson.loads(m.value)
    if m.topic == SF:
        body = o["payload"] if isinstance(o.get("payload"), dict) else o
        return body["ChangeEventHeader"]["commitTimestamp"]
    env = o["payload"] if "schema" in o else o
    return env["source"]["ts_ms"]


def _sf_parsed(msgs):
    for m in msgs:
        if (
            m.topic != SF
            or m.value is None
            or classify(SF, m.key, m.value) not in ("ok", "ignored")
        ):
            continue
        o = orjson.loads(m.value)
        if "replayId" in o:
            form, body = "wrapped", o["payload"]
        elif "_ObjectType" in o:
            form, body = "flat", o
        else:
            form, body = "bare", o
        yield m, form, body, body["ChangeEventHeader"]


def _erp_parsed(msgs):
    for m in msgs:
        if m.topic == SF or m.value is None or classify(m.topic, m.key, m.value) != "ok":
            continue
        o = orjson.loads(m.value)
        wrapped = "schema" in o
        yield m, wrapped, (o["payload"] if wrapped else o), (o["schema"] if wrapped else None)


def test_every_form_and_event_kind_is_present():
    msgs = _messages(_cfg())
    forms = collections.Counter()
    types = collections.Counter()
    entities = collections.Counter()
    multi = short = no_changed = nulled = 0
    for _m, form, body, h in _sf_parsed(msgs):
        forms[form] += 1
        types[h["changeType"]] += 1
        entities[h["entityName"]] += 1
        multi += len(h["recordIds"]) > 1
        short += any(len(r) == 15 for r in h["recordIds"])
        no_changed += "changedFields" not in h
        nulled += bool(h.get("nulledFields"))
        if form == "flat":
            assert body["_ObjectType"] == h["entityName"] + "ChangeEvent"
            assert isinstance(body["_EventType"], str) and "ReplayId" in body and "Id" in body
            if h["changeType"] == "UPDATE":
                unchanged = [k for k, v in body.items() if v is None]
                assert unchanged, "flat UPDATE lists unchanged fields as null"
    assert all(forms[f] > 50 for f in ("wrapped", "bare", "flat")), forms
    for t in ("CREATE", "UPDATE", "DELETE", "UNDELETE", "GAP_UPDATE", "GAP_OVERFLOW"):
        assert types[t] > 0, t
    for e in ("Product2", "Account", "Order", "OrderItem", "Lead", "Contact"):
        assert entities[e] > 0, e
    assert multi > 0 and short > 0 and no_changed > 0 and nulled > 0

    ops = collections.Counter()
    wrapped_tables = set()
    precise = as_string = as_number = 0
    for m, wrapped, env, schema in _erp_parsed(msgs):
        ops[env["op"]] += 1
        if wrapped:
            wrapped_tables.add(TABLE_OF[m.topic])
            assert schema["name"] == f"erp.public.{TABLE_OF[m.topic]}.Envelope"
        if env["op"] == "d":
            assert env["after"] is None and isinstance(env["before"], dict)
        for col in ("list_price", "total_amount"):
            v = (env["after"] or {}).get(col)
            if isinstance(v, str) and wrapped and col in _decimal_columns(schema):
                precise += 1
            elif isinstance(v, str):
                as_string += 1
            elif isinstance(v, float | int):
                as_number += 1
    assert all(ops[o] > 0 for o in "rcud"), ops
    assert wrapped_tables == {"items", "inventory", "sales_orders"}
    assert precise > 0 and as_string > 0 and as_number > 0
    tombstones = [m for m in msgs if m.value is None]
    assert tombstones and all(m.topic != SF and m.key for m in tombstones)
    truncates = [
        m for m in msgs if m.topic != SF and m.value and b'"op":"t"' in m.value and m.key is None
    ]
    assert truncates


def test_tombstone_follows_each_delete():
    msgs = _messages(_cfg(duplicates=0.0, disorder=0.0, bad=0.0))
    for i, m in enumerate(msgs):
        if m.topic != SF and m.value is not None and b'"op":"d"' in m.value:
            nxt = msgs[i + 1]
            assert nxt.topic == m.topic and nxt.key == m.key and nxt.value is None


def _id18(id15: str) -> str:
    suffix = ""
    for chunk in range(3):
        bits = sum(1 << i for i, ch in enumerate(id15[chunk * 5 : chunk * 5 + 5]) if ch.isupper())
        suffix += "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits]
    return id15 + suffix


def test_salesforce_ids_are_valid_18_character_ids():
    assert _id18("001D000000IqhSL") == "001D000000IqhSLIAZ"  # Salesforce's documented example
    count = 0
    for _m, _form, body, h in _sf_parsed(_messages(_cfg())):
        entity = h["entityName"]
        for rid in h["recordIds"]:
            assert len(rid) in (15, 18) and rid.isalnum()
            if entity in PREFIX:
                assert rid.startswith(PREFIX[entity])
            if len(rid) == 18:
                assert _id18(rid[:15]) == rid
                count += 1
        for ref, prefix in (("AccountId", "001"), ("OrderId", "801"), ("Product2Id", "01t")):
            v = body.get(ref)
            if entity in USED and v is not None:
                assert v.startswith(prefix) and (len(v) == 15 or _id18(v[:15]) == v)
    assert count > 1000


def test_event_times_counters_and_keys_of_transactions():
    msgs = _messages(_cfg(duplicates=0.0, disorder=0.0, bad=0.0))
    sf = list(_sf_parsed(msgs))
    ts = [h["commitTimestamp"] for _, _, _, h in sf]
    assert min(ts) >= BASE_TIME_MS
    assert max(ts) - min(ts) > 30 * 60 * 1000  # a business period, not a burst
    # Delivery order follows commit time except for late partial updates (bounded).
    newest = 0
    late = 0
    for t in ts:
        if t < newest:
            late += 1
            assert newest - t < 2 * 60 * 1000
        newest = max(newest, t)
    assert 0 < late < len(ts) * 0.02
    idents = [(h["transactionKey"], h["sequenceNumber"]) for _, _, _, h in sf]
    assert len(set(idents)) == len(idents)
    for k, _ in idents:
        assert uuid.UUID(k).version == 4
    by_tx = collections.defaultdict(set)
    for _, _, _, h in sf:
        by_tx[h["transactionKey"]].add((h["commitNumber"], h["commitTimestamp"]))
    assert all(len(v) == 1 for v in by_tx.values())
    order = sorted({v for vs in by_tx.values() for v in vs}, key=lambda x: (x[1], x[0]))
    numbers = [n for n, _ in order]
    assert numbers == sorted(numbers)
    replay = [int(b.get("ReplayId") or 0) for _, f, b, _ in sf if f == "flat"]
    assert replay == sorted(replay)

    lsns = []
    for _m, _w, env, _s in _erp_parsed(msgs):
        src = env["source"]
        assert src["ts_ms"] >= BASE_TIME_MS and env["ts_ms"] >= src["ts_ms"]
        if env["op"] != "r":
            lsns.append(src["lsn"])
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)


def test_order_lifecycle_scenarios_are_present():
    msgs = _messages(_cfg(duplicates=0.0, disorder=0.0, bad=0.0))
    statuses = collections.defaultdict(list)
    by_sf_order = collections.defaultdict(set)
    for _m, _w, env, _s in _erp_parsed(msgs):
        if env["source"]["table"] != "sales_orders" or env["op"] == "d":
            continue
        row = env["after"]
        statuses[row["order_no"]].append(row["status"])
        if row["sf_order_id"]:
            by_sf_order[row["sf_order_id"]].add(row["order_no"])
    paths = {tuple(v) for v in statuses.values()}
    assert ("OPEN", "ALLOCATED", "SHIPPED", "INVOICED") in paths
    assert ("OPEN", "CANCELLED") in paths
    # One Salesforce order, two ERP orders: the first cancelled, then re-created.
    recreated = [
        nos
        for nos in by_sf_order.values()
        if len(nos) > 1 and any("CANCELLED" in statuses[n] for n in nos)
    ]
    assert recreated
    sf_status = collections.defaultdict(list)
    for _m, _f, body, h in _sf_parsed(msgs):
        if h["entityName"] == "Order" and h["changeType"] == "UPDATE" and "Status" in body:
            if body["Status"] is not None:
                sf_status[h["recordIds"][0][:15]].append(body["Status"])
    assert any(v[-1] == "Cancelled" for v in sf_status.values())
    # ERP orders naming an 18- or 15-character Id, and orders with no Salesforce Id at all.
    ids = {row for row in by_sf_order}
    assert any(len(i) == 15 for i in ids) and any(len(i) == 18 for i in ids)


def test_late_partial_update_is_older_than_an_already_delivered_one():
    msgs = _messages(_cfg(duplicates=0.0, disorder=0.0, bad=0.0))
    newest: dict[tuple[str, str], int] = {}
    found = 0
    for _m, _f, _body, h in _sf_parsed(msgs):
        if h["changeType"] != "UPDATE" or h["entityName"] not in USED:
            continue
        for field in h.get("changedFields", []):
            if field.startswith("LastModified"):
                continue
            k = (h["recordIds"][0][:15], field)
            t = h["commitTimestamp"]
            if k in newest and newest[k] > t:
                found += 1
            newest[k] = max(newest.get(k, 0), t)
    assert found > 0


def test_scale_and_sizes():
    cfg = _cfg(orders=1000)
    msgs = list(generate(cfg))
    per_order = len(msgs) / cfg.orders
    assert 9 <= per_order <= 13, per_order
    sizes = sorted(len(m.value) for m in msgs if m.value is not None)
    median = sizes[len(sizes) // 2]
    assert 300 <= median <= 900, median


# --- partitions ------------------------------------------------------------------------------


def test_murmur2_matches_kafka_python():
    for data in (b"", b"a", b"ab", b"abc", b"abcd", b"801Hs0000CYG0JnIQL", b'{"sku":"SKU-1"}'):
        assert murmur2(data) == kafka_murmur2(data)


def test_partition_is_a_stable_hash_of_the_contract_key():
    msgs = _messages(_cfg(partitions=5))
    assert {m.partition for m in msgs} == set(range(5))
    keyless = 0
    for m in msgs:
        if m.key is None:
            keyless += 1
            continue
        assert m.partition == (kafka_murmur2(m.key) & 0x7FFFFFFF) % 5
        if m.value is None or classify(m.topic, m.key, m.value) != "ok":
            continue
        o = orjson.loads(m.value)
        if m.topic == SF:
            body = o["payload"] if isinstance(o.get("payload"), dict) else o
            assert m.key.decode() == body["ChangeEventHeader"]["recordIds"][0]
        else:
            env = o["payload"] if "schema" in o else o
            image = env["after"] or env["before"]
            table = TABLE_OF[m.topic]
            want = json.dumps({c: image[c] for c in PK[table]}, separators=(",", ":"))
            assert m.key.decode() == want
    assert keyless < len(msgs) * 0.01
    # The same key always lands in the same partition, whatever else is generated.
    other = _messages(_cfg(partitions=5, seed=42, duplicates=0.0, bad=0.0, disorder=0.0))
    where = {}
    for m in msgs + other:
        if m.key is not None:
            assert where.setdefault((m.topic, m.key), m.partition) == m.partition


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path):
    cfg = _cfg(orders=200, bad=0.05)
    counts = write_jsonl(cfg, tmp_path)
    msgs = list(generate(cfg))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{t}.jsonl" for t in DEFAULT_TOPICS.values()
    )
    per_topic = collections.Counter(m.topic for m in msgs)
    assert counts == {t: per_topic[t] for t in DEFAULT_TOPICS.values()}
    back = read_jsonl(tmp_path)
    assert [(r.topic, r.partition, r.key, r.value) for r in back] == [tuple(m) for m in msgs]
    next_offset = collections.Counter()
    for r in back:
        assert r.offset == next_offset[(r.topic, r.partition)]
        next_offset[(r.topic, r.partition)] += 1
    lines = [orjson.loads(x) for x in (tmp_path / f"{SF}.jsonl").read_bytes().splitlines()]
    assert any("value_b64" in line for line in lines)  # invalid UTF-8 kept exactly
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs)


# --- broker ----------------------------------------------------------------------------------


def test_produce_round_trip_through_the_broker(broker):
    suffix = uuid.uuid4().hex[:10]
    topics = {role: f"{name}.{suffix}" for role, name in DEFAULT_TOPICS.items()}
    cfg = GeneratorConfig(orders=150, partitions=3, topics=topics, bad=0.03)
    counts = produce(cfg, broker.bootstrap)
    expected = collections.defaultdict(list)
    for m in generate(cfg):
        expected[(m.topic, m.partition)].append((m.key, m.value))
    want_counts = collections.Counter()
    for (t, _p), rows in expected.items():
        want_counts[t] += len(rows)
    assert counts == {t: want_counts[t] for t in topics.values()}

    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    try:
        tps = [TopicPartition(t, p) for t in topics.values() for p in range(3)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got = collections.defaultdict(list)
        want = sum(counts.values())
        deadline = time.monotonic() + 60
        quiet_since = time.monotonic()
        # The broker's reported end lags its last batch: read until nothing new arrives.
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            for tp, records in batch.items():
                got[(tp.topic, tp.partition)].extend((r.key, r.value) for r in records)
            if batch:
                quiet_since = time.monotonic()
            elif sum(map(len, got.values())) >= want and time.monotonic() - quiet_since > 1:
                break
    finally:
        consumer.close()
    per_topic = collections.Counter()
    for (t, _p), rows in got.items():
        per_topic[t] += len(rows)
    assert dict(per_topic) == {t: n for t, n in counts.items() if n}
    assert dict(got) == dict(expected)  # same partitions, same order, same bytes


# --- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--orders", "10"],
        ["--out", "x", "--bootstrap", "h:1"],
        ["--out", "x", "--duplicates", "1.5"],
        ["--out", "x", "--bad", "-0.1"],
        ["--out", "x", "--disorder", "abc"],
        ["--out", "x", "--partitions", "0"],
        ["--out", "x", "--orders", "-1"],
        ["--out", "x", "--orders", "ten"],
        ["--out", "x", "--seed", "1.5"],
        ["--out", "x", "--duplicates", "0.6", "--bad", "0.4"],
        ["--out", "x", "--frobnicate"],
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert cli_generate(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() and len(err.strip().splitlines()) == 1
    assert err.startswith("sferp generate: error:")


def test_cli_writes_files(tmp_path: Path, capsys):
    out = tmp_path / "stream"
    argv = ["--out", str(out), "--orders", "30", "--partitions", "2", "--seed", "3"]
    assert cli_generate(argv) == 0
    assert "generated" in capsys.readouterr().out
    cfg = GeneratorConfig(orders=30, partitions=2, seed=3)
    back = read_jsonl(out)
    assert [(r.topic, r.partition, r.key, r.value) for r in back] == [
        tuple(m) for m in generate(cfg)
    ]


def test_cli_failure_exits_1_with_one_line(tmp_path: Path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli_generate(["--out", str(blocker / "sub"), "--orders", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sferp generate:") and len(err.strip().splitlines()) == 1


def test_produce_to_an_unreachable_broker_raises():
    with pytest.raises(Exception, match="(?i)broker|bootstrap"):
        produce(_cfg(orders=5), "127.0.0.1:1", {"bootstrap_timeout_ms": 500})


def test_config_validation():
    with pytest.raises(ValueError):
        GeneratorConfig(duplicates=1.0)
    with pytest.raises(ValueError):
        GeneratorConfig(partitions=0)
    with pytest.raises(ValueError):
        GeneratorConfig(topics={"sf_cdc": "same", "erp_items": "same"})
    cfg = GeneratorConfig(topics={"sf_cdc": "my.sf", "out_orders": "ignored"})
    assert cfg.topics["sf_cdc"] == "my.sf" and cfg.topics["erp_items"] == ITEMS
    assert {m.topic for m in generate(GeneratorConfig(orders=5, topics={"sf_cdc": "my.sf"}))} >= {
        "my.sf"
    }


# --- agreement with the reference model ------------------------------------------------------


def test_labels_agree_with_the_reference_model_and_views_are_exercised():
    reference = pytest.importorskip("sferp.reference")
    from sferp.events import RawMessage

    labelled = _labelled(_cfg())
    offsets = collections.Counter()
    raws = []
    expected = collections.defaultdict(collections.Counter)
    column = {"applied": "applied", "duplicate": "duplicates", "ignored": "ignored"}
    for m, label in labelled:
        off = offsets[(m.topic, m.partition)]
        offsets[(m.topic, m.partition)] += 1
        raws.append(RawMessage(m.topic, m.partition, off, m.key, m.value, -1))
        expected[m.topic][column.get(label, "dead_lettered")] += 1
        expected[m.topic]["consumed"] += 1
    views = reference.compute(raws)
    for topic, stats in views.flow_stats.items():
        assert {k: v for k, v in stats.items() if v} == dict(expected[topic]), topic
    reasons = collections.Counter(d[3] for d in views.dead_letters)
    want = collections.Counter(label.split(":", 1)[1] for _, label in labelled if ":" in label)
    assert reasons == want
    kinds = {kind for kind, _ in views.open_exceptions}
    assert kinds == {
        "AMOUNT_MISMATCH",
        "ORPHAN_ERP_ORDER",
        "UNKNOWN_SKU",
        "HANDOFF_OVERDUE",
        "SF_RESYNC_NEEDED",
    }
    stages = collections.Counter(row.stage for row in views.order_status.values())
    assert {"INVOICED", "CANCELLED", "DRAFT", "BOOKED"} <= set(stages)
