"""The real dataflow against the reference model: order, duplicates and workers don't matter."""

from __future__ import annotations

import pytest
from flowkit import renumber, run_in_memory, without_counters
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sferp.compare import diff
from sferp.demo import generated_messages
from sferp.generator import GeneratorConfig
from sferp.reference import compute

BASE = generated_messages(
    GeneratorConfig(orders=30, duplicates=0.0, disorder=0.0, bad=0.0, partitions=1, seed=11)
)
EXPECTED = compute(BASE)


def test_base_stream_is_rich_enough():
    kinds = {k for k, _ in EXPECTED.open_exceptions}
    assert len(EXPECTED.order_status) >= 20
    assert EXPECTED.inventory_live
    assert {"UNKNOWN_SKU", "HANDOFF_OVERDUE"} <= kinds


@settings(
    max_examples=12,
    deadline=None,
    # Each example runs a real dataflow: report the failing draw instead of shrinking for minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_order_duplication_and_worker_split_give_the_same_views(data, tmp_path_factory):
    order = data.draw(st.permutations(range(len(BASE))), label="order")
    msgs = [BASE[i] for i in order]
    for _ in range(data.draw(st.integers(0, 40), label="copies")):
        src = data.draw(st.integers(0, len(BASE) - 1))
        msgs.insert(data.draw(st.integers(0, len(msgs))), BASE[src])
    workers = data.draw(st.sampled_from([1, 2]), label="workers")
    batch = data.draw(st.integers(1, 300), label="batch")
    delivered = renumber(msgs)
    views = run_in_memory(
        delivered, tmp_path_factory.mktemp("v") / "views.duckdb", workers=workers, batch=batch
    )
    # The views equal those of the in-order, duplicate-free delivery...
    assert diff(without_counters(EXPECTED), without_counters(views)) == []
    # ...and the counters equal the reference's for this delivery (a copy that arrives
    # after the clock passed its event time + the window is applied again, not a duplicate).
    assert diff(compute(delivered), views) == []
    assert sum(s["consumed"] for s in views.flow_stats.values()) == len(msgs)


@pytest.mark.parametrize("seed, workers", [(1, 1), (2, 2), (3, 1)])
def test_generated_stream_with_faults_equals_reference(seed, workers, tmp_path):
    msgs = generated_messages(
        GeneratorConfig(
            orders=1500, duplicates=0.05, disorder=0.2, bad=0.01, partitions=3, seed=seed
        )
    )
    views = run_in_memory(msgs, tmp_path / "views.duckdb", workers=workers, batch=700)
    expected = compute(msgs)
    assert diff(expected, views) == []
    for s in views.flow_stats.values():
        assert s["consumed"] == s["applied"] + s["duplicates"] + s["dead_lettered"] + s["ignored"]
    assert views.dead_letters and any(s["duplicates"] for s in views.flow_stats.values())
