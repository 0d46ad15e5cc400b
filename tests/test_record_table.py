"""RecordTable (operators/record_table.py) behaves as the flat dict of triples it replaces."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st
from sferp.operators.record_table import RecordTable

_rkeys = st.tuples(
    st.sampled_from(["salesforce", "erp"]),
    st.sampled_from(["Order", "OrderItem", "inventory"]),
    st.sampled_from(["a", "b", "c", ""]),
)
_ops = st.lists(
    st.tuples(st.sampled_from(["set", "del", "get"]), _rkeys, st.integers()), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_a_record_table_is_a_mapping_of_triples(ops):
    table, model = RecordTable(), {}
    for op, rkey, value in ops:
        if op == "set":
            table[rkey] = model[rkey] = value
        elif op == "del" and rkey in model:
            del table[rkey], model[rkey]
        assert table.get(rkey) == model.get(rkey)
        assert (rkey in table) == (rkey in model)
    assert len(table) == len(model)
    assert dict(table.items()) == model and set(table) == set(model)
    assert sorted(table.values()) == sorted(model.values())
    back = pickle.loads(pickle.dumps(table))
    assert dict(back.items()) == model
    assert dict(RecordTable(model).items()) == model  # from a flat dict (older snapshots)
    for (source, entity, key), value in model.items():
        assert table.of(source, entity)[key] == value
