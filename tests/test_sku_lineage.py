"""The lineage of an `inventory_live` row names its latest ERP event (CONTRACT §3.2),
whatever order the sku's item and inventory facts reach the skus stage in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sferp.operators.facts import ErpItemFact, InventoryFact
from sferp.operators.views import SkusStage


def fact(kind: str, lsn: int):
    identity = f'erp|{kind}|{{"sku":"S1"}}|{lsn}'
    if kind == "items":
        return ErpItemFact("S1", True, 1000 + lsn, identity)
    return InventoryFact("S1", f"W{lsn}", True, 10, 0, 1000 + lsn, identity)


@given(
    st.lists(st.integers(1, 10**12), min_size=1, max_size=8, unique=True).flatmap(
        lambda lsns: st.tuples(
            st.permutations(
                [fact("items" if i % 3 == 0 else "inventory", n) for i, n in enumerate(lsns)]
            ),
            st.integers(1, 4),
        )
    )
)
def test_the_row_names_the_erp_event_with_the_highest_lsn(case):
    facts, batches = case
    if not any(isinstance(f, InventoryFact) for f in facts):
        facts = [*facts, fact("inventory", 0)]  # the row exists only with a stock row
    stage = SkusStage({})
    size = -(-len(facts) // batches)
    for i in range(0, len(facts), size):
        stage.process([("skus", facts[i : i + size])])
    latest = max(facts, key=lambda f: int(f.identity.rpartition("|")[2]))
    assert stage.nodes["S1"].row[-1]["erp"] == latest.identity
