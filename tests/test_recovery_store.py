"""The recovery store's creation (once, by process 0, under a lock) and the writer's start."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
from sferp.connectors.duckdb_views import ViewsWriterPartition, write_views_file

from sferp.config import ConfigError
from sferp.recovery import RECOVERY_PARTITIONS, partitions, prepare_recovery


def test_an_empty_dir_gets_a_store_and_a_second_start_resumes(tmp_path, caplog):
    caplog.set_level("INFO", logger="sferp")
    store = tmp_path / "rec"
    prepare_recovery(str(store))
    assert len(partitions(store)) == RECOVERY_PARTITIONS
    assert "initialised recovery store" in caplog.text
    made = {p.name: p.stat().st_mtime_ns for p in partitions(store)}
    prepare_recovery(str(store))
    assert {p.name: p.stat().st_mtime_ns for p in partitions(store)} == made
    assert "resuming from recovery store" in caplog.text


def test_processes_starting_together_create_one_store(tmp_path):
    """Process 1 waits for process 0's store; it never creates one of its own."""
    store = tmp_path / "rec"
    order = []

    def process(pid, delay):
        time.sleep(delay)
        prepare_recovery(str(store), process_id=pid, wait_s=20)
        order.append(pid)

    # process 1 starts first and must wait until process 0 has created the store
    threads = [
        threading.Thread(target=process, args=(1, 0.0)),
        threading.Thread(target=process, args=(0, 0.5)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == [0, 1]
    assert len(partitions(store)) == RECOVERY_PARTITIONS
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith("part-")) == [
        ".sferp-init.lock",
        ".sferp-run.lock",  # held by process 0 while it runs
    ]


def test_a_process_other_than_0_gives_up_when_no_store_appears(tmp_path):
    with pytest.raises(ConfigError, match="process 0 creates it"):
        prepare_recovery(str(tmp_path / "rec"), process_id=1, wait_s=0.3)
    assert partitions(tmp_path / "rec") == []


def test_a_directory_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a recovery store")
    with pytest.raises(ConfigError, match="--recovery-dir: .* holds no recovery partitions"):
        prepare_recovery(str(tmp_path))


def test_an_interrupted_creation_is_completed_or_redone(tmp_path):
    store = tmp_path / "rec"
    prepare_recovery(str(tmp_path / "model"))
    # crashed while moving partitions into place: some moved, the rest in the scratch dir
    scratch = store / ".sferp-init"
    scratch.mkdir(parents=True)
    for i, part in enumerate(partitions(tmp_path / "model")):
        (store if i < 3 else scratch).joinpath(part.name).write_bytes(part.read_bytes())
    prepare_recovery(str(store), process_id=1)
    assert len(partitions(store)) == RECOVERY_PARTITIONS
    assert not scratch.exists()
    # crashed while creating the scratch store: nothing in place, so it is created again
    other = tmp_path / "rec2" / ".sferp-init"
    other.mkdir(parents=True)
    (other / "part-0.sqlite3").write_bytes(b"")
    prepare_recovery(str(tmp_path / "rec2"))
    assert len(partitions(tmp_path / "rec2")) == RECOVERY_PARTITIONS


def test_the_writer_waits_for_a_reader_that_holds_the_file(tmp_path):
    """A `sferp query` on a stopped flow holds a read lock for a moment; a restart waits."""
    views = tmp_path / "views.duckdb"
    write_views_file(str(views), [])
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import duckdb, time
                con = duckdb.connect({str(views)!r}, read_only=True)
                print("open", flush=True)
                time.sleep(1.5)
                con.close()
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        started = time.monotonic()
        writer = ViewsWriterPartition(str(views), None, commit_interval_s=0, serve_queries=False)
        waited = time.monotonic() - started
        writer.close()
    finally:
        reader.kill()
        reader.wait()
    assert waited > 0.5
