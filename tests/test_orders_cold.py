"""Cold order nodes (operators/cold_orders.py): exact round trips, and the stage unchanged."""

from __future__ import annotations

import pickle
from decimal import Decimal

from hypothesis import example, given, settings
from hypothesis import strategies as st
from sferp.operators import views
from sferp.operators.cold_orders import freeze, thaw
from sferp.operators.facts import FACTS, ErpOrderFact, ItemFact, OrderFact
from sferp.operators.views import OrderNode, OrdersStage

OIDS = ["801A", "801B", "801C"]
_TEXT = st.text(max_size=5)  # any code point, lone surrogates included
# What a field may hold once decoded: numbers within what the decoder admits for
# amounts and quantities (docs/semantics.md §1), and any other JSON value.
_JSON = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**15) + 1, 10**15 - 1),
    st.floats(-1e15, 1e15),
    st.sampled_from(["Draft", "Activated", "Cancelled", "OPEN", "INVOICED", "CANCELLED"]),
    _TEXT,
    st.lists(st.integers(), max_size=2),
)
_TIME = st.one_of(st.none(), st.integers(0, 2**45))


def _own_identity(f: OrderFact | ErpOrderFact, middle: str | None) -> OrderFact | ErpOrderFact:
    """The identity the decoder gives such a fact (kept in part by the cold form), or as drawn."""
    if middle is None:
        return f
    if type(f) is OrderFact:
        return f._replace(identity=f"sf|Order|{middle}|{f.order_id}")
    return f._replace(identity=f"erp|sales_orders|{f.record_key}|{f.lsn}")


def _order(oid: str) -> st.SearchStrategy[OrderFact]:
    return _raw_order(oid).flatmap(
        lambda f: st.one_of(st.none(), _TEXT).map(lambda m: _own_identity(f, m))
    )


def _raw_order(oid: str) -> st.SearchStrategy[OrderFact]:
    return st.builds(
        OrderFact,
        st.just(oid),
        st.booleans(),
        st.one_of(st.sampled_from(["Draft", "Activated", "Cancelled"]), _JSON),
        _JSON,
        _JSON,
        st.one_of(st.sampled_from([10, 10.005, "12.50", 9.99]), _JSON),
        _TIME,
        st.integers(0, 2**45),
        _TEXT,
    )


def _item(oid: str) -> st.SearchStrategy[ItemFact]:
    return st.builds(
        ItemFact,
        st.sampled_from(["802A", "802B", "802C"]),
        st.just(oid),
        st.booleans(),
        st.one_of(st.none(), st.sampled_from(["01tA", "01tB", ""])),
        st.one_of(st.sampled_from([1, 2.5, "3"]), _JSON),
        st.integers(0, 2**45),
        _TEXT,
    )


def _erp(oid: str) -> st.SearchStrategy[ErpOrderFact]:
    return _raw_erp(oid).flatmap(
        lambda f: st.one_of(st.none(), st.just("")).map(lambda m: _own_identity(f, m))
    )


def _raw_erp(oid: str) -> st.SearchStrategy[ErpOrderFact]:
    return st.sampled_from([1, 2]).flatmap(
        lambda no: st.builds(
            ErpOrderFact,
            st.just(f'{{"order_no":{no}}}'),
            st.just(str(no)),
            st.just(oid),
            st.booleans(),
            st.one_of(st.sampled_from(["OPEN", "INVOICED", "CANCELLED"]), _JSON),
            st.one_of(st.sampled_from([10, "10.01", 9.99]), _JSON),
            st.integers(0, 2**40),
            _TIME,
            st.integers(0, 2**45),
            _TEXT,
        )
    )


_facts = st.lists(
    st.sampled_from(OIDS).flatmap(lambda oid: st.one_of(_order(oid), _item(oid), _erp(oid))),
    min_size=1,
    max_size=14,
)


def _slots(node: OrderNode) -> dict:
    # the money() cache is not state: compared through what money() returns instead
    return {s: getattr(node, s) for s in OrderNode.__slots__ if s not in ("_total_raw", "_total")}


def _warm(stage: OrdersStage, facts: list) -> list:
    original = views.freeze
    views.freeze = lambda node: None  # every node stays an object
    try:
        return stage.process([(FACTS, facts)])
    finally:
        views.freeze = original


def _process_all(stage: OrdersStage, batches: list[list]) -> list:
    return [stage.process([(FACTS, facts)]) for facts in batches]


def _batches(facts: list, cuts: list[int]) -> list[list]:
    points = sorted({c % (len(facts) + 1) for c in cuts} | {0, len(facts)})
    return [facts[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(max_examples=300, deadline=None)
@given(_facts, st.lists(st.integers(0, 20), max_size=5), st.sampled_from([0, 0, 1, 2]))
@example(  # two orphans resolved at once: their order must not depend on a thawed set
    facts=[
        OrderFact("801A", False, "Draft", None, None, 10, None, 0, ""),
        ErpOrderFact('{"order_no":1}', "1", "801A", True, "OPEN", 10, 0, None, 0, ""),
        *[ItemFact("802A", "801A", False, None, 1, 0, "")] * 5,
        OrderFact("801A", False, "Draft", None, None, 10, None, 0, ""),
        ErpOrderFact('{"order_no":2}', "2", "801A", True, "OPEN", 10, 0, None, 0, ""),
        OrderFact("801A", True, "Draft", None, None, 10, None, 0, ""),
        *[ItemFact("802A", "801A", False, None, 1, 0, "")] * 2,
    ],
    cuts=[9],
    warm_nodes=0,
)
def test_a_stage_with_cold_nodes_emits_what_one_without_emits(facts, cuts, warm_nodes):
    """Batch by batch, freezing between batches changes no output and no node."""
    batches = _batches(facts, cuts)
    cold = OrdersStage({}, warm_nodes)
    warm = OrdersStage({})
    got = _process_all(cold, batches)
    want = [_warm(warm, facts) for facts in batches]
    assert got == want
    assert cold.nodes.keys() == warm.nodes.keys()
    objects = {oid for oid, n in cold.nodes.items() if type(n) is OrderNode}
    assert objects == set(cold._warm)
    assert len(cold._warm) <= warm_nodes, "only the most recently rendered stay objects"
    for oid, node in warm.nodes.items():
        blob = cold.nodes[oid]
        back = views._touch(cold.nodes, oid) if type(blob) is bytes else blob
        assert _slots(back) == _slots(node)
        if node.order is not None:
            assert back.money(node.order.total) == node.money(node.order.total)


@settings(max_examples=300, deadline=None)
@given(_facts)
def test_nodes_thaw_to_what_was_frozen(facts):
    stage = OrdersStage({})
    _warm(stage, facts)
    for oid, node in stage.nodes.items():
        blob = freeze(node)
        assert type(blob) is bytes, "JSON values and the stage's own Decimals all freeze"
        back = thaw(oid, blob, OrderNode.__new__(OrderNode))
        assert _slots(back) == _slots(node)
        assert [type(v) for v in _slots(back).values()] == [type(v) for v in _slots(node).values()]
        assert back.order is None or back.order.order_id is oid  # the key, not a copy
        assert all(e.sf_order_id is oid for e in back.erp.values())


def test_a_node_holding_what_marshal_cannot_write_stays_an_object():
    cold, warm = OrdersStage({}, 0), OrdersStage({})
    order = OrderFact("801A", True, "Activated", None, "1", 10.0, 5, 5, "sf|o")
    odd = ItemFact("802A", "801A", True, "01tA", Decimal("2"), 5, "sf|i")  # not a JSON value
    assert cold.process([(FACTS, [order, odd])]) == _warm(warm, [order, odd])
    assert type(cold.nodes["801A"]) is OrderNode
    gone = ItemFact("802A", "801A", False, None, None, 6, "sf|i")
    assert cold.process([(FACTS, [gone])]) == _warm(warm, [gone])
    assert type(cold.nodes["801A"]) is bytes, "frozen once the odd value is gone"


def test_snapshots_hold_cold_nodes_and_nodes_of_the_previous_version():
    stage = OrdersStage({}, 0)
    order = OrderFact("801A", True, "Activated", "001", "1", 10.0, 5, 5, "sf|o")
    stage.process([(FACTS, [order, ItemFact("802A", "801A", True, "01tA", 2, 5, "sf|i")])])
    stage.nodes["801B"] = views._touch({"801B": stage.nodes["801A"]}, "801B")  # an object
    back = OrdersStage(pickle.loads(pickle.dumps(stage.nodes, protocol=pickle.HIGHEST_PROTOCOL)))
    assert type(back.nodes["801A"]) is bytes and type(back.nodes["801B"]) is OrderNode
    out = back.process([(FACTS, [ItemFact("802B", "801A", True, "01tA", 3, 6, "sf|i2")])])
    demand = [f for _d, (kind, fs) in out if kind == FACTS for f in fs]
    assert [(d.product_id, d.quantity) for d in demand] == [("01tA", Decimal(5))]


def test_the_least_recently_rendered_nodes_go_cold_first():
    stage = OrdersStage({}, 2)
    for n, oid in enumerate(["801A", "801B", "801C", "801A", "801D"]):
        stage.process([(FACTS, [OrderFact(oid, True, "Draft", None, "1", 1.0, None, n, "sf|o")])])
    kinds = {oid: type(node).__name__ for oid, node in stage.nodes.items()}
    assert kinds == {"801A": "OrderNode", "801B": "bytes", "801C": "bytes", "801D": "OrderNode"}
    assert list(stage._warm) == ["801A", "801D"]
