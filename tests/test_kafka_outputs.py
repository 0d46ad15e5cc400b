"""The Kafka outputs' mirror: compacted topics brought back to the snapshot on resume."""

from __future__ import annotations

import json
import sqlite3

import pytest
from clusterkit import read_topic
from sferp.connectors.kafka import KafkaSink
from sferp.connectors.kafka_outputs import KafkaMirror, MirrorResumeError, ReconciledKafkaSink


def rec(topic, key, value):
    return (topic, key.encode(), None if value is None else json.dumps(value).encode())


def latest(records):
    return {(t, k): v for t, k, v in records}


def test_rollback_restores_changed_keys_and_tombstones_new_ones(tmp_path):
    m = KafkaMirror(str(tmp_path / "m.sqlite3"))
    assert m.begin_rollback(None) == []
    m.commit()
    m.record(latest([rec("inv", "A", 1), rec("inv", "B", 1), rec("exc", "X", {"open": True})]))
    snap = m.snapshot()
    at_snapshot = m.values()
    m.record(latest([rec("inv", "A", 2), rec("inv", "C", 1)]))  # A changes, C is new
    m.record(latest([rec("inv", "A", 3), rec("exc", "X", None)]))  # X leaves the view
    m.close()

    m = KafkaMirror(str(tmp_path / "m.sqlite3"))  # a new process after a crash
    restore = m.begin_rollback(snap)
    m.commit()
    assert sorted(restore) == sorted(
        [rec("inv", "A", 1), rec("inv", "C", None), rec("exc", "X", {"open": True})]
    )
    assert m.values() == at_snapshot  # B was never touched: neither restored nor sent


def test_rollback_to_an_older_snapshot_uses_the_earliest_image(tmp_path):
    m = KafkaMirror(str(tmp_path / "m.sqlite3"), keep_snapshots=3)
    m.begin_rollback(None)
    m.commit()
    m.record(latest([rec("inv", "A", 1)]))
    first = m.snapshot()
    m.record(latest([rec("inv", "A", 2), rec("inv", "B", 1)]))
    m.snapshot()
    m.record(latest([rec("inv", "A", 3), rec("inv", "B", 2)]))
    restore = m.begin_rollback(first)
    m.commit()
    assert sorted(restore) == sorted([rec("inv", "A", 1), rec("inv", "B", None)])
    assert m.values() == {("inv", b"A"): b"1"}


def test_a_rollback_interrupted_before_its_commit_is_repeated(tmp_path):
    path = str(tmp_path / "m.sqlite3")
    m = KafkaMirror(path)
    m.begin_rollback(None)
    m.commit()
    m.record(latest([rec("inv", "A", 1)]))
    snap = m.snapshot()
    m.record(latest([rec("inv", "A", 2)]))
    first = m.begin_rollback(snap)
    m.abort()  # sending the restore failed, or the process died before committing
    m.close()
    m = KafkaMirror(path)
    assert m.begin_rollback(snap) == first == [rec("inv", "A", 1)]
    m.commit()


def test_a_fresh_start_tombstones_every_key_of_an_earlier_run(tmp_path):
    m = KafkaMirror(str(tmp_path / "m.sqlite3"))
    m.begin_rollback(None)
    m.commit()
    m.record(latest([rec("inv", "A", 1), rec("orders", "O", 1)]))
    restore = m.begin_rollback(None)
    m.commit()
    assert sorted(restore) == sorted([rec("inv", "A", None), rec("orders", "O", None)])
    assert m.values() == {}


def test_unknown_or_pruned_snapshots_are_refused(tmp_path):
    m = KafkaMirror(str(tmp_path / "m.sqlite3"), keep_snapshots=2)
    m.begin_rollback(None)
    m.commit()
    snaps = []
    for i in range(4):
        m.record(latest([rec("inv", "A", i)]))
        snaps.append(m.snapshot())
    with pytest.raises(MirrorResumeError, match="keeps snapshots"):
        m.begin_rollback(snaps[0])
    with pytest.raises(MirrorResumeError, match="replaced or deleted"):
        m.begin_rollback(snaps[-1] + 10)
    # the refused attempts changed nothing; the newest snapshots still work
    assert m.begin_rollback(snaps[-2]) == [rec("inv", "A", 2)]
    m.commit()


def test_undo_rows_are_pruned_to_the_kept_snapshots(tmp_path):
    path = tmp_path / "m.sqlite3"
    m = KafkaMirror(str(path), keep_snapshots=2)
    m.begin_rollback(None)
    m.commit()
    for i in range(10):
        m.record(latest([rec("inv", f"K{j}", i) for j in range(50)]))
        m.snapshot()
    m.close()
    con = sqlite3.connect(path)
    (undo,) = con.execute("SELECT count(*) FROM undo").fetchone()
    con.close()
    assert undo <= 2 * 50


def test_sink_restores_the_compacted_topics_after_a_crash(broker, topics, tmp_path):
    names = topics({"inv": 1, "dlq": 1})
    inv, dlq = names["inv"], names["dlq"]
    sink = ReconciledKafkaSink(
        KafkaSink(broker.bootstrap), compacted=[inv], mirror=str(tmp_path / "m.sqlite3")
    )
    assert sink.list_parts() == ["kafka"]
    part = sink.build_part("kafka_out", "kafka", None)
    part.write_batch([[rec(inv, "A", 1), rec(inv, "B", 1)], [rec(dlq, "t:0:5", "bad")]])
    snap = part.snapshot()
    # after the snapshot: A changes, C appears, B leaves; then the process dies
    part.write_batch([[rec(inv, "A", 2), rec(inv, "C", 1), rec(inv, "B", None)]])
    del part

    part = ReconciledKafkaSink(
        KafkaSink(broker.bootstrap), compacted=[inv], mirror=str(tmp_path / "m.sqlite3")
    ).build_part("kafka_out", "kafka", snap)
    part.close()
    state = {}
    for m in read_topic(broker.bootstrap, inv):
        state[m.key.decode()] = None if m.value is None else json.loads(m.value)
    assert {k: v for k, v in state.items() if v is not None} == {"A": 1, "B": 1}
    assert [m.key for m in read_topic(broker.bootstrap, dlq)] == [b"t:0:5"]
    assert (
        ReconciledKafkaSink(KafkaSink(broker.bootstrap), compacted=[], writer=False).list_parts()
        == []
    )


@pytest.mark.parametrize("with_mirror", [False, True])
def test_only_a_recoverable_sink_waits_for_deliveries_at_snapshots(
    broker, topics, tmp_path, with_mirror
):
    """Without recovery no resume state is used: the worker does not wait for the
    producer at snapshots, and `close` still delivers everything."""
    inv = topics({"inv": 1})["inv"]
    mirror = str(tmp_path / "m.sqlite3") if with_mirror else None
    sink = ReconciledKafkaSink(
        KafkaSink(broker.bootstrap, own_process=True), compacted=[inv], mirror=mirror
    )
    part = sink.build_part("kafka_out", "kafka", None)
    flushes = []
    real_flush = part._producer.flush
    part._producer.flush = lambda: (flushes.append(1), real_flush())[1]
    part.write_batch([[rec(inv, f"K{i}", i) for i in range(20)]])
    snap = part.snapshot()
    assert (snap is not None) is with_mirror
    assert len(flushes) == (1 if with_mirror else 0)
    part.close()
    assert {m.key.decode(): json.loads(m.value) for m in read_topic(broker.bootstrap, inv)} == {
        f"K{i}": i for i in range(20)
    }


def test_an_interpreter_exit_with_a_producer_still_open_does_not_hang(broker, tmp_path):
    """The producer child ignores SIGTERM (a process group's Ctrl-C or stop must not kill
    it before the flow's flush), which is how multiprocessing stops daemon children at
    exit: without closing their pipes first, such an exit waited forever."""
    import subprocess
    import sys

    script = tmp_path / "exit_with_producer.py"
    script.write_text(
        "import sys\n"
        "from sferp.connectors.kafka_producer_proc import ProducerProcess\n"
        "if __name__ == '__main__':\n"
        "    KEEP = ProducerProcess({'bootstrap_servers': sys.argv[1]}, sys.argv[1])\n"
        "    print('started', flush=True)\n"
    )
    r = subprocess.run(
        [sys.executable, str(script), broker.bootstrap], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout == "started\n", r.stderr[-2000:]


def test_a_parent_killed_in_the_middle_of_a_message_stops_the_producer_unflushed(broker, topics):
    """The child must stop at once, without kafka-python's flush at exit, however the pipe
    ends: a late delivery could land after the resumed run restored the topics. A parent
    killed while writing leaves half a message ("got end of file during message", an
    OSError, not the EOFError of a clean end), which ended the child normally: it printed
    a traceback and flushed what it held."""
    import multiprocessing
    import os
    import pickle
    import struct

    from kafka import KafkaConsumer, TopicPartition
    from sferp.connectors.kafka_producer_proc import _SEND, _serve

    (topic,) = topics({"out": 1}).values()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    config = {"bootstrap_servers": broker.bootstrap, "linger_ms": 60_000}  # holds records
    proc = ctx.Process(target=_serve, args=(child, config, broker.bootstrap))
    proc.start()
    child.close()
    assert parent.recv() == (True, None)
    items = [(topic, f"k{i}".encode(), b"v") for i in range(100)]
    parent.send_bytes(pickle.dumps((_SEND, items)))
    os.write(parent.fileno(), struct.pack("!i", 1000) + b"half a message")
    parent.close()
    proc.join(30)
    assert proc.exitcode == 0
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=3000)
    tp = TopicPartition(topic, 0)
    assert consumer.end_offsets([tp])[tp] == 0  # nothing was sent after the parent died
    consumer.close()
