"""Resuming from the recovery store: snapshots of unfinished epochs never mix into a resume.

Bytewax 0.21 resumes at epoch R and loads each key's newest snapshot from before R,
but it keeps the snapshots a killed run wrote for epochs from R on. The resumed run
redoes those epochs and snapshots only the keys it touches, so an untouched key's
stale snapshot becomes the one a later resume loads. These tests run real Bytewax
executions on a real store; the killed run's leftover is one snapshot row written
for an epoch the run never finished, which is what a SIGKILL between a key's
snapshot and the epoch's frontier leaves behind.
"""

from __future__ import annotations

import logging
import pickle
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.inputs import AbortExecution
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from sferp import recovery
from sferp.recovery import (
    RecoveryStoreError,
    discard_unfinished_snapshots,
    partitions,
    prepare_recovery,
    release_run_lock,
    resume_epoch,
)


def _rows(store: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """`sql`'s rows from every partition, with the partition's file name first."""
    out: list[tuple] = []
    for part in partitions(store):
        with closing(sqlite3.connect(part)) as con:
            out += [(part.name, *row) for row in con.execute(sql, args)]
    return out


def _counting_flow(items: list, out: list) -> Dataflow:
    """Counts per key; each key's count is its state, snapshotted in the epochs it changes."""
    flow = Dataflow("t")
    inp = op.input("inp", flow, TestingSource(items, batch_size=1))
    keyed = op.key_on("key", inp, lambda kv: kv[0])

    def count(state: int | None, kv: tuple[str, int]) -> tuple[int, int]:
        n = (state or 0) + kv[1]
        return n, n

    op.output("out", op.stateful_map("count", keyed, count), TestingSink(out))
    return flow


def _run(flow: Dataflow, store: Path, *, ours: bool) -> None:
    """One execution: through `sferp.recovery` (ours) or with Bytewax's store as it is."""
    config = prepare_recovery(str(store)) if ours else RecoveryConfig(str(store))
    try:
        run_main(flow, epoch_interval=timedelta(0), recovery_config=config)
    except AbortExecution:
        pass  # the test's stand-in for a crash


def _put_snapshot(part: Path, step: str, key: str, epoch: int, state: object) -> None:
    with closing(sqlite3.connect(part)) as con, con:
        con.execute(
            "INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) VALUES (?, ?, ?, ?)",
            (step, key, epoch, None if state is None else pickle.dumps(state)),
        )


def _leave_stale_snapshot(store: Path, key: str, epoch: int, state: int) -> None:
    """Write `key`'s count snapshot for `epoch`, as a run killed inside that epoch leaves it."""
    ((part, step),) = set(
        _rows(
            store,
            "SELECT step_id FROM snaps WHERE state_key = ? AND step_id LIKE 't.count%'",
            (key,),
        )
    )
    _put_snapshot(store / part, step, key, epoch, state)


@pytest.mark.parametrize("ours", [False, True], ids=["bytewax alone", "sferp.recovery"])
def test_a_key_untouched_after_a_crash_resumes_from_its_finished_snapshot(tmp_path, ours):
    """b counts 1, a killed run leaves b=999 in an unfinished epoch, the next run touches
    only a and is killed too; the run after that must count b from 1, not from 999."""
    store = tmp_path / "rec"
    store.mkdir()
    init_db_dir(store, 4)
    items = [
        ("a", 1), ("b", 1), TestingSource.EOF(),  # run 1: both keys, to the end
        ("a", 1), ("a", 1), ("a", 1), TestingSource.ABORT(),  # run 2: only a, then a crash
        ("b", 1), TestingSource.EOF(),  # run 3: b again
    ]  # fmt: skip
    out: list = []
    _run(_counting_flow(items, out), store, ours=ours)
    assert out == [("a", 1), ("b", 1)]
    resumes_at = resume_epoch(partitions(store))
    _leave_stale_snapshot(store, "b", resumes_at, 999)

    out = []
    _run(_counting_flow(items, out), store, ours=ours)
    assert out == [("a", 2), ("a", 3), ("a", 4)]
    assert resume_epoch(partitions(store)) > resumes_at  # run 2 finished the stale epoch

    out = []
    _run(_counting_flow(items, out), store, ours=ours)
    if ours:
        assert out == [("b", 2)]
    else:  # the failure this guards against, with Bytewax's store as it is
        assert out == [("b", 1000)]


def test_the_resume_epoch_is_the_one_bytewax_resumes_at(tmp_path):
    """After each run (finished, or aborted), the next execution's recorded resume epoch."""
    store = tmp_path / "rec"
    store.mkdir()
    init_db_dir(store, 4)
    items = [
        ("a", 1), ("b", 1), TestingSource.EOF(),
        ("a", 1), ("a", 1), TestingSource.ABORT(),
        ("b", 1), ("a", 1), TestingSource.ABORT(),
        ("b", 1), TestingSource.EOF(),
    ]  # fmt: skip
    assert resume_epoch(partitions(store)) is None
    predicted = []
    for _ in range(4):
        predicted.append(resume_epoch(partitions(store)))
        _run(_counting_flow(items, []), store, ours=True)
    recorded = dict(r[1:] for r in _rows(store, "SELECT ex_num, resume_epoch FROM exs"))
    assert sorted(recorded) == [0, 1, 2, 3]
    assert [recorded[ex] for ex in (1, 2, 3)] == predicted[1:]
    assert predicted[0] is None and predicted[1] < predicted[2] < predicted[3]


def test_the_resume_epoch_of_a_two_worker_run_is_the_one_bytewax_resumes_at(tmp_path):
    store = tmp_path / "rec"
    store.mkdir()
    init_db_dir(store, 4)
    items = [("a", 1), ("b", 1), TestingSource.EOF(), ("a", 1), TestingSource.EOF()]
    predicted = []
    for _ in range(3):
        predicted.append(resume_epoch(partitions(store)))
        cluster_main(
            _counting_flow(items, []),
            [],
            0,
            epoch_interval=timedelta(0),
            recovery_config=prepare_recovery(str(store)),
            worker_count_per_proc=2,
        )
    recorded = {
        ex: (workers, epoch)
        for _, ex, workers, epoch in _rows(
            store, "SELECT ex_num, worker_count, resume_epoch FROM exs"
        )
    }
    assert [recorded[ex] for ex in (1, 2)] == [(2, predicted[1]), (2, predicted[2])]
    assert predicted[1] < predicted[2]


def _store_with(tmp_path: Path, executions: list[tuple], fronts: list[tuple]) -> Path:
    store = tmp_path / "rec"
    store.mkdir()
    init_db_dir(store, 2)
    parts = partitions(store)
    for i, ex in enumerate(executions):
        with closing(sqlite3.connect(parts[i % 2])) as con, con:
            con.execute("INSERT INTO exs (ex_num, worker_count, resume_epoch) VALUES (?, ?, ?)", ex)
    for i, front in enumerate(fronts):
        with closing(sqlite3.connect(parts[(i + 1) % 2])) as con, con:
            con.execute(
                "INSERT INTO fronts (ex_num, worker_index, worker_frontier) VALUES (?, ?, ?)", front
            )
    return store


def test_a_worker_without_a_frontier_holds_the_resume_at_its_start(tmp_path):
    """Two workers: worker 1 of the newest run wrote no frontier, so the run resumes
    where that run started; older runs' frontiers do not count."""
    store = _store_with(tmp_path, [(0, 2, 1), (1, 2, 7)], [(0, 0, 9), (0, 1, 7), (1, 0, 12)])
    assert resume_epoch(partitions(store)) == 7


def test_the_slowest_worker_sets_the_resume_epoch(tmp_path):
    store = _store_with(tmp_path, [(0, 2, 1), (1, 2, 7)], [(1, 0, 12), (1, 1, 9)])
    assert resume_epoch(partitions(store)) == 9


def test_discarding_keeps_finished_epochs_and_is_idempotent(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sferp")
    store = _store_with(tmp_path, [(0, 1, 1)], [(0, 0, 5)])
    part = partitions(store)[0]
    for epoch in (3, 4, 5, 6):
        _put_snapshot(part, "s", "k", epoch, epoch)
    assert discard_unfinished_snapshots(store) == 2
    assert "discarded 2 snapshots of epochs from 5 on" in caplog.text
    assert [r[1] for r in _rows(store, "SELECT snap_epoch FROM snaps ORDER BY snap_epoch")] == [
        3,
        4,
    ]
    assert discard_unfinished_snapshots(store) == 0


def test_only_process_0_discards(tmp_path):
    store = _store_with(tmp_path, [(0, 2, 1)], [(0, 0, 5), (0, 1, 5)])
    _put_snapshot(partitions(store)[0], "s", "k", 6, None)
    prepare_recovery(str(store), process_id=1)
    assert len(_rows(store, "SELECT 1 FROM snaps")) == 1
    prepare_recovery(str(store), process_id=0)
    assert _rows(store, "SELECT 1 FROM snaps") == []


def test_a_store_spread_over_machines_is_left_alone_with_a_warning(tmp_path, caplog):
    store = _store_with(tmp_path, [(0, 1, 1)], [(0, 0, 5)])
    _put_snapshot(partitions(store)[0], "s", "k", 6, None)
    partitions(store)[1].unlink()  # this machine holds one of the two partitions
    assert discard_unfinished_snapshots(store) == 0
    assert "1 of 2 partitions" in caplog.text
    assert len(_rows(store, "SELECT 1 FROM snaps")) == 1


def test_a_second_run_waits_for_the_running_one_before_it_touches_the_store(tmp_path, caplog):
    """A run that is writing snapshots must keep them: a second process 0 on the same
    store (started by mistake, or by a rolling update) waits until the first stops."""
    caplog.set_level(logging.INFO, logger="sferp")
    store = _store_with(tmp_path, [(0, 1, 1)], [(0, 0, 5)])
    _put_snapshot(partitions(store)[0], "s", "k", 6, None)  # the running flow's
    running = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time; from sferp.recovery import prepare_recovery; "
            "prepare_recovery(sys.argv[1]); print('holding', flush=True); time.sleep(2); "
            "con = sqlite3.connect(sys.argv[2]); "
            "print('kept', *con.execute('SELECT COUNT(*) FROM snaps').fetchone())",
            str(store),
            str(partitions(store)[0]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert running.stdout.readline().strip() == "holding"
        # what the running flow wrote after it started (its resume discarded the row above)
        _put_snapshot(partitions(store)[0], "s", "k", 7, None)
        started = time.monotonic()
        prepare_recovery(str(store))
        waited = time.monotonic() - started
        kept = running.stdout.readline().strip()  # read by the first run just before it ends
    finally:
        running.wait(timeout=30)
    assert kept == "kept 1"  # the waiting run had not deleted what the first one wrote
    assert "another run holds" in caplog.text
    assert waited > 0.2 and running.returncode == 0
    # only once the first run had stopped were its unfinished epochs discarded
    assert "discarded 1 snapshots of epochs from 5 on" in caplog.text
    release_run_lock(str(store))
    prepare_recovery(str(store))  # released: no second wait
    assert caplog.text.count("another run holds") == 1


def test_sferp_run_holds_the_run_lock_until_its_flow_ends(tmp_path, monkeypatch):
    import bytewax._bytewax as bytewax_core

    from sferp import recovery, runner
    from sferp.config import Settings

    store = tmp_path / "rec"
    held: list[bool] = []

    def flow_runs(_flow, **kwargs):  # stands in for Bytewax: the flow itself is not the point
        held.append(str(store.resolve()) in recovery._run_locks)
        assert kwargs["recovery_config"] is not None

    monkeypatch.setattr(bytewax_core, "cli_main", flow_runs)
    settings = Settings.model_validate({"metrics": {"port": 0}})
    options = runner.RunOptions(
        bounded=True,
        views_path=str(tmp_path / "views.duckdb"),
        recovery_dir=str(store),
        install_signals=False,
        preflight=False,
    )
    assert runner.run_flow(settings, options) == 0
    assert held == [True]
    assert str(store.resolve()) not in recovery._run_locks


def test_a_store_locked_past_the_timeout_stops_the_run_instead_of_resuming(tmp_path, monkeypatch):
    store = _store_with(tmp_path, [(0, 1, 1)], [(0, 0, 5)])
    _put_snapshot(partitions(store)[1], "s", "k", 6, None)
    monkeypatch.setattr(recovery, "SQLITE_TIMEOUT_S", 0.2)
    with closing(sqlite3.connect(partitions(store)[1], isolation_level=None)) as writer:
        writer.execute("BEGIN EXCLUSIVE")  # another writer that does not let go
        with pytest.raises(RecoveryStoreError, match="cannot discard unfinished snapshots"):
            discard_unfinished_snapshots(store)
        writer.execute("ROLLBACK")
    assert discard_unfinished_snapshots(store) == 1  # safe to repeat once it is free


def test_a_store_of_another_layout_is_left_to_bytewax(tmp_path, caplog):
    store = _store_with(tmp_path, [(0, 1, 1)], [(0, 0, 5)])
    for part in partitions(store):
        with closing(sqlite3.connect(part)) as con, con:
            con.execute("ALTER TABLE snaps RENAME TO snapshots")
    assert discard_unfinished_snapshots(store) == 0
    assert "cannot check" in caplog.text and "no such table" in caplog.text
