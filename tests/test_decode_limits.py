"""The decoder's width limit (docs/semantics.md §1, `too_many_fields`) and its setting."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flowkit import run_in_memory
from sferp.operators.decode import DecodeConfig, decode_batch
from sferp.operators.decode_common import REASONS, TOO_MANY_FIELDS

from sferp.config import ConfigError, load_settings
from sferp.events import Change, DeadLetter, Ignored, RawMessage

SF = "sf.cdc"
ITEMS = "erp.public.items"
CFG = DecodeConfig(topics={SF: "salesforce", ITEMS: "items"}, max_fields=10)


def msg(topic: str, doc: Any, key: Any = None) -> RawMessage:
    k = None if key is None else json.dumps(key).encode()
    return RawMessage(topic, 0, 5, k, json.dumps(doc).encode(), -1)


def outcome(topic: str, doc: Any, cfg: DecodeConfig = CFG, key: Any = None) -> Any:
    [out] = decode_batch([msg(topic, doc, key)], cfg)
    return out


def header(change_type: str = "UPDATE", entity: str = "Order", **kw: Any) -> dict:
    h = {
        "entityName": entity,
        "recordIds": ["801000000000001AAA"],
        "changeType": change_type,
        "transactionKey": "tx",
        "sequenceNumber": 1,
        "commitTimestamp": 1_764_309_600_000,
        "commitNumber": 1,
    }
    h.update(kw)
    return h


def fields(n: int) -> dict[str, int]:
    return {f"F{i}__c": i for i in range(n)}


def forms(h: dict, body: dict) -> list[dict]:
    """The same event wrapped, bare and flat (with the flat form's metadata keys)."""
    meta = {"Id": "801000000000001AAA", "ReplayId": "1", "_ObjectType": "x", "_EventType": "y"}
    return [
        {"replayId": "1", "payload": {"ChangeEventHeader": h, **body}},
        {"ChangeEventHeader": h, **body},
        {"ChangeEventHeader": h, **meta, **body},
    ]


def is_dead(out: Any, reason: str = TOO_MANY_FIELDS) -> bool:
    return type(out) is DeadLetter and out.reason == reason


def test_reason_code_is_known():
    assert TOO_MANY_FIELDS == "too_many_fields" and TOO_MANY_FIELDS in REASONS


@pytest.mark.parametrize("change_type", ["CREATE", "UPDATE", "UNDELETE", "DELETE", "GAP_UPDATE"])
def test_salesforce_body_at_the_limit_passes_one_more_is_dead(change_type):
    h = header(change_type, changedFields=[])  # UPDATE: non-null body fields are the changes
    for doc in forms(h, fields(10)):
        assert type(outcome(SF, doc)) is Change, doc
    for doc in forms(h, fields(11)):
        assert is_dead(outcome(SF, doc)), doc


def test_metadata_keys_are_not_fields():
    """The flat form's Id, ReplayId, _ObjectType, _EventType do not count towards the limit."""
    h = header("CREATE")
    flat = forms(h, fields(10))[2]
    assert len(flat) - 1 > 10  # more keys than the limit, but only 10 fields
    assert type(outcome(SF, flat)) is Change


def test_update_lists_count_together():
    ok = header(changedFields=[f"F{i}__c" for i in range(6)], nulledFields=["A", "B", "C", "D"])
    assert type(outcome(SF, {"ChangeEventHeader": ok})) is Change
    over = header(changedFields=[f"F{i}__c" for i in range(6)], nulledFields=list("ABCDE"))
    assert is_dead(outcome(SF, {"ChangeEventHeader": over}))
    # duplicates count: the list is what a hostile producer controls
    dup = header(changedFields=["Status"] * 11)
    assert is_dead(outcome(SF, {"ChangeEventHeader": dup}))


def test_broken_update_lists_are_bad_header_before_their_length_counts():
    h = header(changedFields=[1] * 20)
    assert is_dead(outcome(SF, {"ChangeEventHeader": h}), "bad_header")


def test_wide_event_of_an_unused_entity_is_still_ignored():
    out = outcome(SF, {"ChangeEventHeader": header(entity="Lead"), **fields(50)})
    assert type(out) is Ignored and out.why == "entity"


def test_header_is_checked_before_the_width():
    h = header(changeType="NOPE")
    assert is_dead(outcome(SF, {"ChangeEventHeader": h, **fields(50)}), "bad_header")


def envelope(op: str, row: dict) -> dict:
    image = "before" if op == "d" else "after"
    return {"op": op, image: row, "source": {"lsn": 7, "ts_ms": 1, "table": "items"}}


@pytest.mark.parametrize("op", ["c", "u", "r", "d"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_erp_image_at_the_limit_passes_one_more_is_dead(op, wrapped):
    def doc(n: int) -> dict:
        env = envelope(op, {"sku": "SKU-1", **fields(n - 1)})
        return {"schema": {"type": "struct"}, "payload": env} if wrapped else env

    assert type(outcome(ITEMS, doc(10))) is Change
    assert is_dead(outcome(ITEMS, doc(11)))


def test_erp_unused_before_image_is_not_counted():
    env = envelope("u", {"sku": "SKU-1"})
    env["before"] = fields(500)
    assert type(outcome(ITEMS, env)) is Change


def test_default_limit_is_1000():
    cfg = DecodeConfig(topics={SF: "salesforce"})
    assert cfg.max_fields == 1000
    h = header("CREATE")
    assert type(outcome(SF, {"ChangeEventHeader": h, **fields(1000)}, cfg)) is Change
    assert is_dead(outcome(SF, {"ChangeEventHeader": h, **fields(1001)}, cfg))


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="max_fields"):
        DecodeConfig(topics={}, max_fields=0)


def test_flow_setting_and_its_validation():
    assert load_settings(environ={}).flow.max_fields == 1000
    assert load_settings(environ={"SFERP_FLOW__MAX_FIELDS": "50"}).flow.max_fields == 50
    with pytest.raises(ConfigError, match="flow.max_fields"):
        load_settings(environ={"SFERP_FLOW__MAX_FIELDS": "0"})


def test_flow_uses_the_setting(tmp_path):
    """Through the real in-memory flow: the setting reaches the decoder, the DLQ row says why."""
    body = {"ChangeEventHeader": header("CREATE"), **fields(30)}
    m = RawMessage("sf.cdc", 0, 0, b"801000000000001AAA", json.dumps(body).encode(), -1)
    views = run_in_memory([m], tmp_path / "v.duckdb", env={"SFERP_FLOW__MAX_FIELDS": "20"})
    assert [(d[0], d[2], d[3]) for d in views.dead_letters] == [("sf.cdc", 0, TOO_MANY_FIELDS)]
    assert views.records == {}
    views = run_in_memory([m], tmp_path / "w.duckdb", env={"SFERP_FLOW__MAX_FIELDS": "40"})
    assert views.dead_letters == set()
    assert len(views.records) == 1
