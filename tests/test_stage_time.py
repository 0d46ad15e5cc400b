"""Busy time per stage (sferp/stage_time.py): per-thread tables, and the wrapped Bytewax parts."""

from __future__ import annotations

import threading
import time

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from bytewax.testing import TestingSource, run_main

from sferp.stage_time import STAGES, StageClock, TimedSink, TimedSource


def test_each_thread_is_a_worker_with_its_own_calls_and_seconds():
    clock = StageClock()
    slow = clock.wrap("merge", lambda s: time.sleep(s))
    quick = clock.wrap("decode", lambda: None)

    def work(seconds: float, calls: int) -> None:
        for _ in range(calls):
            slow(seconds)
        quick()

    work(0.02, 3)
    other = threading.Thread(target=work, args=(0.01, 2))
    other.start()
    other.join()

    rows = {(w, s): (calls, secs) for w, s, calls, secs in clock.totals()}
    assert {w for w, _ in rows} == {"0", "1"}  # in the order they first ran a stage
    assert {s for _, s in rows} == set(STAGES)  # every stage reported, idle ones at zero
    assert rows[("0", "merge")][0] == 3 and 0.06 <= rows[("0", "merge")][1] < 1.0
    assert rows[("1", "merge")][0] == 2 and 0.02 <= rows[("1", "merge")][1] < 1.0
    assert rows[("0", "decode")][0] == 1 and rows[("0", "orders")] == (0, 0.0)


def test_a_call_that_raises_is_still_counted():
    clock = StageClock()

    def fail() -> None:
        time.sleep(0.01)
        raise ValueError("bad batch")

    timed = clock.wrap("coordinator", fail)
    with pytest.raises(ValueError, match="bad batch"):
        timed()
    ((_, _, calls, seconds),) = [r for r in clock.totals() if r[1] == "coordinator"]
    assert calls == 1 and seconds >= 0.01


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stage"):
        StageClock().wrap("sorting", lambda: None)


def test_summary_names_each_stage_share_and_the_total():
    clock = StageClock()
    t0 = time.perf_counter()
    clock.wrap("merge", time.sleep)(0.06)
    clock.wrap("read", time.sleep)(0.02)
    time.sleep(0.02)  # outside every stage
    line = clock.summary(time.perf_counter() - t0)
    merge = float(line.split("merge ")[1].split(" %")[0])
    read = float(line.split("read ")[1].split(" %")[0])
    busy = float(line.split("busy ")[1].split(" %")[0])
    assert merge > read >= 1 and busy == pytest.approx(merge + read, abs=1) and busy < 100
    assert "decode" not in line  # stages under 0.5 % are left out
    assert "worker" not in line  # one worker: no worker names
    assert StageClock().summary(1.0) == ""


class _ListSink(FixedPartitionedSink):
    def __init__(self, out: list) -> None:
        self.out = out

    def list_parts(self) -> list[str]:
        return ["only"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(
        self, step_id: str, for_part: str, resume_state: object
    ) -> StatefulSinkPartition:
        out = self.out

        class Part(StatefulSinkPartition):
            def write_batch(self, values: list) -> None:
                out.extend(values)

            def snapshot(self) -> None:
                return None

        return Part()


def test_timed_source_and_sink_pass_everything_through_and_count_their_calls():
    clock = StageClock()
    out: list = []
    flow = Dataflow("timed")
    items = op.input("in", flow, TimedSource(TestingSource(list(range(100)), batch_size=10), clock))
    keyed = op.map("key", items, lambda x: ("k", x))
    op.output("out", keyed, TimedSink(_ListSink(out), clock, "views"))
    run_main(flow)

    assert sorted(out) == list(range(100))
    calls = {s: c for _, s, c, _ in clock.totals()}
    assert calls["read"] >= 10  # ten batches, and the poll that ends the source
    assert calls["views"] >= 1
