"""Random bytes and random JSON shapes through the real dataflow: nothing stops it,
every message is accounted for exactly once."""

from __future__ import annotations

import json

from flowkit import run_in_memory
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sferp.compare import diff
from sferp.events import RawMessage
from sferp.reference import compute


def dumps(value) -> bytes:
    """JSON text (big integers included; infinities come out as non-JSON literals)."""
    return json.dumps(value).encode()


TOPICS = ["sf.cdc", "erp.public.items", "erp.public.inventory", "erp.public.sales_orders"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
header = st.fixed_dictionaries(
    {
        "entityName": st.sampled_from(["Order", "OrderItem", "Product2", "Account", "Lead"]),
        "changeType": st.sampled_from(["CREATE", "UPDATE", "DELETE", "GAP_UPDATE", "BOGUS"]),
        "recordIds": st.lists(
            st.sampled_from(["801000000000001AAA", "8010000000000A1"]), max_size=2
        ),
        "commitTimestamp": st.integers(1_700_000_000_000, 1_700_000_900_000) | st.text(max_size=3),
        "commitNumber": st.integers(0, 10),
        "sequenceNumber": st.integers(0, 3),
        "transactionKey": st.text(max_size=4),
    }
)
sf_like = st.builds(
    lambda h, body: {"ChangeEventHeader": h, **body},
    header,
    st.dictionaries(st.sampled_from(["Status", "TotalAmount", "Quantity", "X"]), json_values),
)
erp_like = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["c", "u", "d", "r", "t", "x"]),
        "after": st.none()
        | st.dictionaries(
            st.sampled_from(["sku", "warehouse", "qty_on_hand", "order_no", "status"]), json_values
        ),
        "source": st.fixed_dictionaries(
            {"lsn": st.integers(0, 50) | st.text(max_size=2), "ts_ms": st.integers(0, 10**13)}
        ),
    }
)
payloads = (
    st.binary(max_size=60)
    | json_values.map(dumps)
    | sf_like.map(dumps)
    | erp_like.map(dumps)
    | st.none()
)


@settings(
    max_examples=15,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.tuples(st.sampled_from(TOPICS), payloads), min_size=1, max_size=120))
def test_garbage_never_stops_the_flow(tmp_path_factory, items):
    offsets: dict[str, int] = {}
    msgs = []
    for topic, value in items:
        off = offsets.get(topic, 0)
        offsets[topic] = off + 1
        msgs.append(RawMessage(topic, 0, off, None, value, -1))
    views = run_in_memory(msgs, tmp_path_factory.mktemp("fz") / "views.duckdb", batch=17)
    stats = views.flow_stats
    for topic, n in offsets.items():
        s = stats[topic]
        assert s["consumed"] == n
        assert s["consumed"] == s["applied"] + s["duplicates"] + s["dead_lettered"] + s["ignored"]
    assert len(views.dead_letters) == sum(s["dead_lettered"] for s in stats.values())
    assert diff(compute(msgs), views) == []
