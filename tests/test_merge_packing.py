"""Packed records (fields kept as JSON between batches) merge exactly as unpacked ones.

Also: state objects pickle compactly, and state of the previous version still loads.
"""

from __future__ import annotations

import pickle
from decimal import Decimal

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from sferp.operators.cold import thaw
from sferp.operators.facts import CHANGES, FACTS, GLOBAL_IN, ItemFact, OrderFact
from sferp.operators.merge import ErpRecord, Merger, MergeState, SfRecord
from sferp.operators.views import OrdersStage, _touch

from sferp.events import CREATE, DELETE, UPDATE, UPSERT, Change

OID = "801000000000001AAA"
TP = ("sf.cdc", 0)


def _sf(op: str, ts: int, seq: int, **fields) -> Change:
    return Change("salesforce", "Order", OID, op, (ts, 1, seq), ts,
                  f"sf|Order|tx{ts}|{seq}|{OID}", fields or None, "sf.cdc", 0, ts)  # fmt: skip


def _erp(lsn: int, op: str = UPSERT, **fields) -> Change:
    return Change("erp", "inventory", '{"sku":"A"}', op, (lsn,), lsn, f"erp|inv|{lsn}",
                  {"sku": "A", **fields}, "erp.inv", 0, lsn)  # fmt: skip


def _rec(merger: Merger, key: tuple[str, str, str]) -> SfRecord | ErpRecord:
    """The record object, thawed when it is kept frozen (operators/cold.py)."""
    rec = merger.state.records[key]
    return thaw(key, rec, merger.state.shapes) if type(rec) is bytes else rec


def _rows(merger: Merger, *changes: Change) -> dict:
    out = merger.process([(CHANGES, TP, list(changes), [c.event_time for c in changes])])
    rows: dict = {}
    for _dest, payload in out:
        if payload[0] == GLOBAL_IN:
            rows.update(payload[1].rows.get("records", {}))
    return rows


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
_change = st.tuples(
    st.sampled_from([CREATE, UPDATE, DELETE]),
    st.integers(1, 50),  # commit time
    st.integers(1, 3),  # sequence
    st.dictionaries(st.sampled_from(["Status", "TotalAmount", "Name", "X"]), _values, max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_change, min_size=1, max_size=12), st.integers(1, 5))
def test_packing_between_batches_changes_nothing(changes, per_batch):
    """Same rows whether each change is its own batch (pack/unpack each time) or one batch."""
    chs = [_sf(op, ts, seq, **f) for op, ts, seq, f in changes]
    packed, whole = Merger(MergeState(0), 0), Merger(MergeState(0), 0)
    last = {}
    for i in range(0, len(chs), per_batch):
        last.update(_rows(packed, *chs[i : i + per_batch]))
    expected = _rows(whole, *chs)
    key = ("salesforce", "Order", OID)
    assert last[key] == expected[key]  # JSON writes non-finite floats as null either way


def test_a_packed_record_is_json_text_with_one_stamp_and_survives_pickling():
    m = Merger(MergeState(0), 0)
    _rows(m, _sf(CREATE, 10, 1, Status="Draft", TotalAmount=5.0))
    assert type(m.state.records[("salesforce", "Order", OID)]) is bytes  # frozen
    rec = _rec(m, ("salesforce", "Order", OID))
    # thawed from its shape: the fields as a dict, still one stamp for all of them
    assert rec.fields == {"Status": "Draft", "TotalAmount": 5.0}
    assert rec.stamps is None and rec.base[0] == (10, 1, 1)
    m2 = Merger(pickle.loads(pickle.dumps(m.state)), 0)
    _rows(m2, _sf(UPDATE, 5, 1, Status="Old"))  # older: loses field by field
    rows = _rows(m2, _sf(UPDATE, 20, 1, TotalAmount=7.0))
    fields = orjson.loads(rows[("salesforce", "Order", OID)][4])
    assert fields == {"Status": "Draft", "TotalAmount": 7.0}
    rec2 = m2.state.records[("salesforce", "Order", OID)]
    assert type(rec2) is SfRecord and rec2.stamps is not None  # two stamps: kept per field
    assert rec2.stamps["Status"][0] == (10, 1, 1) and rec2.stamps["TotalAmount"][0] == (20, 1, 1)


def test_values_json_cannot_hold_stay_unpacked():
    m = Merger(MergeState(0), 0)
    _rows(m, _sf(CREATE, 10, 1, TotalAmount=1.5, Big=2**80))
    rec = m.state.records[("salesforce", "Order", OID)]
    assert isinstance(rec.fields, dict) and rec.fields["Big"] == 2**80
    rows = _rows(m, _sf(UPDATE, 11, 1, TotalAmount=2.5))
    assert orjson.loads(rows[("salesforce", "Order", OID)][4]) == {"Big": 2**80, "TotalAmount": 2.5}


def test_erp_images_pack_and_deletes_keep_the_last_image():
    m = Merger(MergeState(0), 0)
    _rows(m, _erp(5, qty_on_hand=3))
    assert type(m.state.records[("erp", "inventory", '{"sku":"A"}')]) is bytes  # frozen
    rec = _rec(m, ("erp", "inventory", '{"sku":"A"}'))
    assert rec.image == {"sku": "A", "qty_on_hand": 3}  # thawed from its shape
    rows = _rows(m, _erp(4, qty_on_hand=99))  # older image: current one stays
    assert orjson.loads(rows[("erp", "inventory", '{"sku":"A"}')][4])["qty_on_hand"] == 3
    rows = _rows(m, _erp(6, op=DELETE))
    row = rows[("erp", "inventory", '{"sku":"A"}')]
    assert row[3] is True and orjson.loads(row[4])["qty_on_hand"] == 3


def test_sfrecord_unpacked_restores_per_field_stamps():
    rec = SfRecord()
    rec.apply(_sf(CREATE, 10, 1, Status="Draft", Name="n"))
    rec.pack(orjson.dumps(rec.fields, option=orjson.OPT_SORT_KEYS).decode())
    assert rec.stamps is None
    fields, stamps = rec.unpacked()
    assert fields == {"Name": "n", "Status": "Draft"}
    assert set(stamps) == {"Name", "Status"} and stamps["Name"] is rec.base


def test_state_objects_pickle_as_tuples_and_still_load_the_old_form():
    m = Merger(MergeState(0), 0)
    _rows(m, _sf(CREATE, 10, 1, Status="Draft"), _erp(5, qty_on_hand=3))
    _rows(m, _sf(UPDATE, 11, 1, Name="n"))  # two stamps: stays an object
    rec = m.state.records[("salesforce", "Order", OID)]
    assert type(rec.__getstate__()) is tuple
    # The default form of a __slots__ object, as snapshots written before held it.
    old = (None, {n: getattr(rec, n) for n in SfRecord.__slots__})
    fresh = SfRecord.__new__(SfRecord)
    fresh.__setstate__(old)
    assert fresh.__getstate__() == rec.__getstate__()
    back = pickle.loads(pickle.dumps(m.state, protocol=pickle.HIGHEST_PROTOCOL))
    for key, r in m.state.records.items():
        b = back.records[key]
        assert (b == r) if type(r) is bytes else (b.__getstate__() == r.__getstate__())


def test_orders_state_of_the_previous_version_loads_with_its_items():
    """Snapshots written before items were kept as (Product2Id, Quantity) hold ItemFacts."""
    stage = OrdersStage({}, 0)
    order = OrderFact(OID, True, "Activated", None, "1", 10.0, 5, 5, "sf|o")
    stage.process([(FACTS, [order, ItemFact("802A", OID, True, "01tA", 2, 5, "sf|i1")])])
    assert type(stage.nodes[OID]) is bytes  # cold between batches (cold_orders.py)
    node = _touch(stage.nodes, OID)
    # The form the previous version pickled: whole ItemFacts as the items' values.
    node.items = {"802A": ItemFact("802A", OID, True, "01tA", 2, 5, "sf|i1")}
    old = pickle.dumps(stage.nodes, protocol=pickle.HIGHEST_PROTOCOL)
    back = OrdersStage(pickle.loads(old))
    assert back.nodes[OID].items == {"802A": ("01tA", 2)}
    out = back.process([(FACTS, [ItemFact("802B", OID, True, "01tA", 3, 6, "sf|i2")])])
    demand = [f for _dest, (kind, facts) in out if kind == FACTS for f in facts]
    assert [(d.product_id, d.quantity) for d in demand] == [("01tA", Decimal(5))]
