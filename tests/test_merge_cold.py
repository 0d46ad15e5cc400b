"""Frozen records (operators/cold.py): exact round trips, and merging across batches unchanged."""

from __future__ import annotations

import pickle

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from sferp.operators.cold import freeze, thaw
from sferp.operators.facts import CHANGES, FACTS, GLOBAL_IN, ItemFact
from sferp.operators.merge import ErpRecord, Merger, MergeState, SfRecord
from sferp.operators.routing import ORDERS, shard

from sferp.events import CREATE, DELETE, UNDELETE, UPDATE, UPSERT, Change

TP = ("sf.cdc", 0)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_TEXT = st.text(max_size=6)  # any code point, lone surrogates included
_VALUE_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)
# Mostly small numbers, so that stamps often tie or follow each other.
_N = st.one_of(st.integers(0, 3), st.integers(0, 3), _INT64, st.integers(2**63, 2**65))


def _sf_change(op: str, order: tuple, identity: str, fields: dict | None) -> Change:
    return Change("salesforce", "OrderItem", "802000000000001AAA", op, order, order[0],
                  identity, fields, "sf.cdc", 0, 0)  # fmt: skip


def _packed_text(rec: SfRecord) -> str | None:
    fields, _ = rec.unpacked()
    try:
        return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return None


_sf_changes = st.lists(
    st.tuples(
        st.sampled_from([CREATE, UPDATE, DELETE, UNDELETE]),
        st.tuples(_N, _N, _N),
        st.one_of(st.sampled_from(["a", "b"]), _TEXT),
        st.dictionaries(
            st.sampled_from(["Status", "Quantity", "OrderId"]),
            st.one_of(st.none(), st.sampled_from(["Activated", "Draft"]), _N, _VALUE_TEXT),
            max_size=3,
        ),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(_sf_changes, st.one_of(st.none(), _TEXT))
def test_salesforce_records_thaw_to_what_was_frozen(changes, routed):
    rec = SfRecord()
    for op, order, identity, fields in changes:
        rec.apply(_sf_change(op, order, identity, fields or None))
    rec.routed = routed
    text = _packed_text(rec)
    if text is None:
        return
    rec.pack(text)
    cold = freeze(rec)
    fits = all(-(2**63) <= v < 2**63 for s in (rec.top, rec.base, rec.lc_stamp) if s for v in s[0])
    if rec.stamps is None and rec.base is not None and fits:
        assert cold is not None  # the shapes the cold form is for do freeze
    if cold is None:
        return
    back = thaw("salesforce", cold)
    assert type(back) is SfRecord
    assert back.__getstate__() == rec.__getstate__()
    assert freeze(back) == cold


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([UPSERT, UPSERT, DELETE]), _N, _TEXT, st.booleans()),
        min_size=1,
        max_size=5,
    ),
    st.one_of(st.none(), _TEXT),
)
def test_erp_rows_thaw_to_what_was_frozen(changes, routed):
    rec = ErpRecord()
    for op, lsn, identity, invoiced in changes:
        fields = {"order_no": "A", "status": "INVOICED" if invoiced else "OPEN"}
        rec.apply(Change("erp", "sales_orders", '{"order_no":"A"}', op, (lsn,), lsn, identity,
                         fields if op == UPSERT else None, "erp.so", 0, 0))  # fmt: skip
    rec.routed = routed
    rec.pack(orjson.dumps(rec.current_fields(), option=orjson.OPT_SORT_KEYS).decode())
    cold = freeze(rec)
    fits = -(2**63) <= rec.top[0][0] < 2**63
    if rec.del_image is None and rec.image is not None and fits:
        assert cold is not None
    else:
        assert cold is None  # rows with a delete, or beyond 64 bits, stay objects
        return
    back = thaw("erp", cold)
    assert back.__getstate__() == rec.__getstate__()


def _out(merger: Merger, *changes: Change) -> list:
    return merger.process([(CHANGES, TP, list(changes), [0] * len(changes))])


def test_an_item_moved_to_another_order_after_freezing_is_retracted_from_the_first():
    """`routed` (the order its fact went to) survives the cold form."""
    m = Merger(MergeState(0), 0)
    key = ("salesforce", "OrderItem", "802000000000001AAA")
    first = "801000000000001AAA"
    second = "801000000000002AAA"
    _out(m, _sf_change(CREATE, (1, 1, 1), "c", {"OrderId": first, "Quantity": 2}))
    assert type(m.state.records[key]) is bytes
    out = _out(m, _sf_change(UPDATE, (2, 1, 1), "u", {"OrderId": second}))
    facts = {dest: body[1] for dest, body in out if body[0] == FACTS}
    (gone,) = facts[shard(ORDERS, first)]
    assert gone == ItemFact(key[2], first, False, None, None, 2, "u")
    (moved,) = facts[shard(ORDERS, second)]
    assert moved.order_id == second and moved.live and moved.quantity == 2


_erp_ops = st.lists(
    st.tuples(st.sampled_from([UPSERT, UPSERT, DELETE]), st.integers(1, 30), st.integers(0, 9)),
    min_size=1,
    max_size=10,
)


@settings(max_examples=300, deadline=None)
@given(_erp_ops, st.integers(1, 4), st.booleans())
def test_erp_rows_merge_the_same_frozen_between_batches(ops, per_batch, snapshot):
    """Rows equal whether each change is its own batch (freeze/thaw) or all are one."""
    key = '{"sku":"A"}'
    chs = [
        Change("erp", "inventory", key, op, (lsn,), lsn, f"erp|inv|{lsn}|{n}",
               {"sku": "A", "qty_on_hand": n} if op == UPSERT else None, "erp.inv", 0, lsn)
        for op, lsn, n in ops
    ]  # fmt: skip
    split, whole = Merger(MergeState(0), 0), Merger(MergeState(0), 0)
    last: dict = {}
    for i in range(0, len(chs), per_batch):
        if snapshot:  # a snapshot between batches holds frozen rows
            split = Merger(pickle.loads(pickle.dumps(split.state)), 0)
        last.update(_rows(split, *chs[i : i + per_batch]))
    assert last[("erp", "inventory", key)] == _rows(whole, *chs)[("erp", "inventory", key)]


def _rows(merger: Merger, *changes: Change) -> dict:
    rows: dict = {}
    for _dest, payload in _out(merger, *changes):
        if payload[0] == GLOBAL_IN:
            rows.update(payload[1].rows.get("records", {}))
    return rows
