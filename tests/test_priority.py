"""Background work runs at a lower CPU priority than the worker thread (sferp/priority.py).

Real threads, a real DuckDB file and a real producer process: the nice values are
read back from the kernel.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from sferp.connectors.duckdb_views import DuckDBViewsSink, ViewsWriterPartition
from sferp.connectors.kafka import KafkaSink
from sferp.connectors.kafka_producer_proc import ProducerProcess
from sferp.flows.reconcile import FlowOptions, build_flow

from sferp.config import load_settings
from sferp.priority import call_lowered, lower_process, lower_this_thread, thread_nice

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _nice_of(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:  # the thread ended meanwhile
        return None


def test_a_lowered_call_lowers_the_threads_it_starts_and_not_the_caller():
    base = thread_nice()
    seen: dict[str, int] = {}

    def start_a_thread() -> str:
        seen["helper"] = thread_nice()
        inner = threading.Thread(target=lambda: seen.__setitem__("inner", thread_nice()))
        inner.start()
        inner.join()
        return "done"

    assert call_lowered(start_a_thread, 3) == "done"
    assert seen == {"helper": min(19, base + 3), "inner": min(19, base + 3)}
    assert thread_nice() == base


def test_a_lowered_call_raises_what_the_call_raised():
    with pytest.raises(KeyError, match="missing"):
        call_lowered(lambda: {}["missing"], 2)


def test_no_increment_changes_nothing():
    base = thread_nice()
    out: list[int] = []

    def work() -> None:
        lower_this_thread(0)
        out.append(thread_nice())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert out == [base]
    assert call_lowered(threading.get_native_id, 0) == threading.get_native_id()


def test_the_nice_value_stops_at_19():
    out: list[int] = []

    def work() -> None:
        lower_this_thread(15)
        lower_this_thread(15)
        out.append(thread_nice())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert out == [19]


def test_the_views_writer_commits_and_duckdb_threads_run_lowered(tmp_path):
    base = thread_nice()
    lowered = min(19, base + 4)
    before = _tasks()
    part = ViewsWriterPartition(
        str(tmp_path / "views.duckdb"), None, commit_interval_s=0.05, nice=4
    )
    try:
        flusher = next(t for t in threading.enumerate() if t.name == "sferp-views-flusher")
        server = next(t for t in threading.enumerate() if t.name == "sferp-query-server")
        deadline = time.monotonic() + 5
        while _nice_of(flusher.native_id) != lowered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _nice_of(flusher.native_id) == lowered
        # The query endpoint answers at normal priority; the worker keeps its own.
        assert _nice_of(server.native_id) == base
        assert thread_nice() == base
        python_threads = {t.native_id for t in threading.enumerate()}
        duckdb_threads = _tasks() - before - python_threads
        nices = {tid: _nice_of(tid) for tid in duckdb_threads}
        assert duckdb_threads, "DuckDB started no thread of its own"
        assert {n for n in nices.values() if n is not None} == {lowered}
        # Commits still land (made by the lowered flusher).
        part.write_batch([{"flow_stats": {("a",): ("a", 1, 1, 0, 0, 0, 0)}}])
        deadline = time.monotonic() + 5
        while part.commits == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert part.commits >= 1
    finally:
        part.close()


def test_the_output_producer_process_runs_lowered(broker):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    proc = ProducerProcess({"bootstrap_servers": broker.bootstrap}, broker.bootstrap, nice=6)
    try:
        assert os.getpriority(os.PRIO_PROCESS, proc._proc.pid) == min(19, base + 6)
        assert os.getpriority(os.PRIO_PROCESS, 0) == base
    finally:
        proc.close()


def test_lowering_a_process_adds_to_its_nice_value():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_report_nice_after_lowering, args=(child, 5))
    p.start()
    before, after = parent.recv()
    p.join(10)
    assert after == min(19, before + 5)


def _report_nice_after_lowering(conn, increment: int) -> None:
    before = os.nice(0)
    lower_process(increment)
    conn.send((before, os.nice(0)))


def _sinks(steps) -> list:
    out = []
    for step in steps:
        sink = getattr(step, "sink", None)
        if sink is not None:
            out.append(sink)
        out.extend(_sinks(step.substeps))
    return out


@pytest.mark.parametrize("setting, expected", [(None, 10), ("3", 3), ("0", 0)])
def test_the_flow_hands_background_nice_to_its_views_writer_and_producer(
    tmp_path, setting, expected
):
    env = {"SFERP_FLOW__BACKGROUND_NICE": setting} if setting is not None else {}
    flow = build_flow(load_settings(environ=env), FlowOptions(views_path=str(tmp_path / "v")))
    sinks = _sinks(flow.substeps)
    views = [s for s in sinks if isinstance(s, DuckDBViewsSink)]
    kafka = [s._kafka for s in sinks if isinstance(getattr(s, "_kafka", None), KafkaSink)]
    assert [s.nice for s in views] == [expected]
    assert [k._nice for k in kafka] == [expected]
