"""Frozen records (operators/cold.py): exact round trips, and merging across batches unchanged."""

from __future__ import annotations

import pickle

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from sferp.operators import cold
from sferp.operators.cold import Shapes, freeze, thaw
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


SF_KEY = ("salesforce", "OrderItem", "802000000000001AAA")
ERP_KEY = ("erp", "sales_orders", '{"order_no":"A"}')
# Identities of this record's own events (kept as their middle part), of events naming
# several records, and ones that only look alike (the prefix and suffix overlap).
_SF_IDENTITY = st.one_of(
    st.sampled_from(
        ["a", "b", "sf|OrderItem|802000000000001AAA", "sf|OrderItem||802000000000001AAA"]
    ),
    _TEXT.map(lambda t: f"sf|OrderItem|{t}|802000000000001AAA"),
    _TEXT.map(lambda t: f"sf|OrderItem|{t}|1|801000000000001AAA,802000000000001AAA"),
    _TEXT,
)

_sf_changes = st.lists(
    st.tuples(
        st.sampled_from([CREATE, UPDATE, DELETE, UNDELETE]),
        st.tuples(_N, _N, _N),
        _SF_IDENTITY,
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
    shapes = Shapes()
    cold = freeze(rec, SF_KEY, orjson.loads(text), shapes)
    fits = all(-(2**63) <= v < 2**63 for s in (rec.top, rec.base, rec.lc_stamp) if s for v in s[0])
    if rec.stamps is None and rec.base is not None and fits:
        assert cold is not None  # the shapes the cold form is for do freeze
    if cold is None:
        return
    back = thaw(SF_KEY, cold, shapes)
    assert type(back) is SfRecord
    assert _state(back) == _state(rec)
    back.pack(text)
    assert freeze(back, SF_KEY, orjson.loads(text), shapes) == cold


def _state(rec: SfRecord | ErpRecord) -> tuple:
    """The record's slots, with its fields (ERP: image) as a dict whether packed or not."""
    return tuple(
        orjson.loads(v) if name in ("fields", "image") and type(v) is str else v
        for name, v in zip(type(rec).__slots__, rec.__getstate__(), strict=True)
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([UPSERT, UPSERT, DELETE]),
            _N,
            st.one_of(
                _TEXT,
                st.just('erp|sales_orders|{"order_no":"A"}|'),
                _N.map(lambda lsn: f'erp|sales_orders|{{"order_no":"A"}}|{lsn}'),
            ),
            st.booleans(),
        ),
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
    fields = rec.current_fields()
    rec.pack(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode())
    shapes = Shapes()
    cold = freeze(rec, ERP_KEY, fields, shapes)
    fits = -(2**63) <= rec.top[0][0] < 2**63
    if rec.del_image is None and rec.image is not None and fits:
        assert cold is not None
    else:
        assert cold is None  # rows with a delete, or beyond 64 bits, stay objects
        return
    back = thaw(ERP_KEY, cold, shapes)
    assert _state(back) == _state(rec)
    assert back.image is not rec.image and list(back.image) == list(fields)


def test_records_beyond_the_shape_limit_freeze_their_json_text(monkeypatch):
    """Past MAX_SHAPES (per shard) the cold form keeps the JSON text, as before shapes."""
    monkeypatch.setattr(cold, "MAX_SHAPES", 1)
    m = Merger(MergeState(0), 0)
    _rows(m, _sf_change(CREATE, (1, 1, 1), "a", {"OrderId": "801A", "Quantity": 2}))
    key = ("salesforce", "OrderItem", "802000000000001AAA")
    _rows(m, Change("erp", "inventory", '{"sku":"A"}', UPSERT, (5,), 5, "e",
                    {"sku": "A", "qty_on_hand": 3}, "erp.inv", 0, 5))  # fmt: skip
    first, second = m.state.records[key], m.state.records[("erp", "inventory", '{"sku":"A"}')]
    assert m.state.shapes.names == [("OrderId", "Quantity")]
    assert b'"OrderId"' not in first and b'"qty_on_hand":3' in second
    assert thaw(key, first, m.state.shapes).fields == {"OrderId": "801A", "Quantity": 2}
    assert (
        thaw(("erp", "inventory", '{"sku":"A"}'), second, m.state.shapes).image
        == '{"qty_on_hand":3,"sku":"A"}'
    )
    rows = _rows(m, _sf_change(UPDATE, (2, 1, 1), "b", {"Quantity": 3}))
    assert orjson.loads(rows[key][4]) == {"OrderId": "801A", "Quantity": 3}


def test_merge_state_of_a_version_without_shapes_loads():
    state = MergeState(0)
    m = Merger(state, 0)
    _rows(m, Change("erp", "inventory", '{"sku":"A"}', UPSERT, (5,), 5, "e",
                    {"sku": "A", "qty_on_hand": 3}, "erp.inv", 0, 5))  # fmt: skip
    # What snapshots of the previous version hold: the default pickled form of a
    # __slots__ object, no shapes, and one flat dict of record objects.
    slots = {n: getattr(state, n) for n in MergeState.__slots__ if n != "shapes"}
    slots["records"] = {k: thaw(k, v, state.shapes) for k, v in state.records.items()}
    old = MergeState.__new__(MergeState)
    old.__setstate__(pickle.loads(pickle.dumps((None, slots))))
    back = pickle.loads(pickle.dumps(old))
    m2 = Merger(back, 0)
    rows = _rows(m2, Change("erp", "inventory", '{"sku":"A"}', UPSERT, (6,), 6, "f",
                            {"sku": "A", "qty_on_hand": 4}, "erp.inv", 0, 6))  # fmt: skip
    assert orjson.loads(rows[("erp", "inventory", '{"sku":"A"}')][4])["qty_on_hand"] == 4
    assert type(back.records[("erp", "inventory", '{"sku":"A"}')]) is bytes


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


def test_identities_are_kept_whole_unless_they_follow_the_records_pattern():
    shapes = Shapes()
    for identity in [
        "sf|OrderItem|tx-1|3|802000000000001AAA",  # the record's own: kept as "tx-1|3"
        "sf|OrderItem|802000000000001AAA",  # prefix and suffix overlap: kept whole
        "sf|OrderItem||802000000000001AAA",  # an empty middle
        "sf|OrderItem|tx|1|801000000000001AAA,802000000000001AAA",  # several records
        "sf|Order|tx|1|802000000000001AAA",  # another entity
    ]:
        rec = SfRecord()
        rec.apply(_sf_change(CREATE, (1, 1, 1), identity, {"Quantity": 2}))
        rec.pack('{"Quantity":2}')
        blob = freeze(rec, SF_KEY, {"Quantity": 2}, shapes)
        back = thaw(SF_KEY, blob, shapes)
        assert back.top[1] == identity and back.identity == identity
        assert (b"tx-1|3" in blob and b"802000000000001AAA" not in blob) or "tx-1" not in identity
