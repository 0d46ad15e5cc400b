"""The flow's Kafka outputs (reconciled.* and the DLQ), exact across crashes and resumes.

`ReconciledKafkaSink` is a Bytewax `FixedPartitionedSink` with one partition
(`"kafka"`), listed only by the process that owns the views writer. Items are
`(key, [(topic, key bytes, value bytes or None), ...])`: the coordinator's Kafka
records of one batch, in the order it produced them. One producer writes them
all, so per-key order is the coordinator's order.

Delivery guarantee, with a mirror (runs with a recovery store): after a resume,
the latest record of every key of the compacted topics (reconciled.inventory,
.orders, .exceptions) equals what a run without the crash would have left.
Plain at-least-once is not enough for that: a record written after the last
snapshot that the replay never writes again (a sku row that, in the replay's
interleaving of partitions, never appears; an exception that never opens)
would stay the latest value of its key. So the partition keeps a mirror of the
latest value sent per key (SQLite, beside the views file), with before-images
per snapshot interval, exactly like the DuckDB writer's undo log:

- `write_batch` first commits the records to the mirror (saving the
  before-image of each key's first change since the last snapshot), then hands
  them to the producer without waiting (a delivery failure raises on the next
  batch at the latest). Every key ever sent after a snapshot is therefore
  known to the mirror.
- `snapshot()` waits for every acknowledgement, then returns the mirror's
  sequence number (everything before it is acknowledged by Kafka). Not
  waiting per batch keeps the dataflow from stalling on broker round trips.
  Without a mirror (no recovery) nothing is resumed, and snapshots do not wait.
- `build_part` with a resume state rolls the mirror back to that snapshot and,
  before it commits the rollback, sends each rolled-back key's value at the
  snapshot again (a tombstone where the key had none). A crash during this
  repeats it on the next start. Only then does the replay write anything.
  Without a resume state (a first run, or a crash before the first snapshot)
  every key the mirror holds is tombstoned: the state to return to is empty.

The DLQ topic is not mirrored: its records are a function of the input offset
(same key, same value), so the replay writes the same records again
(duplicates, nothing stale). Without a recovery store there is no mirror and
the outputs are at-least-once.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from sferp.connectors.kafka import KafkaSink, SinkItem

__all__ = ["KafkaMirror", "MirrorResumeError", "ReconciledKafkaSink", "mirror_path"]

_PART = "kafka"

log = logging.getLogger("sferp")


def mirror_path(views_path: str) -> str:
    """Where the Kafka mirror of a views file lives (beside it, owned by the same process)."""
    return f"{views_path}.kafka.sqlite3"


class MirrorResumeError(RuntimeError):
    """The mirror cannot be brought back to the snapshot the recovery store names."""


class KafkaMirror:
    """Latest value sent per (topic, key) of the compacted topics, with per-snapshot undo.

    Positions: every commit that changes the mirror gets the next sequence
    number; a snapshot is the sequence number at that moment. Before-images are
    saved once per key and snapshot interval (`base` = the snapshot they
    precede); rolling back to snapshot n restores, per key, the earliest image
    among bases >= n. Undo rows older than the `keep`-th newest snapshot are
    pruned (Bytewax resumes from the newest snapshot every worker completed,
    normally the newest or the one before).
    """

    def __init__(self, path: str, *, keep_snapshots: int = 3) -> None:
        """Open (or create) the mirror file; nothing is rolled back yet."""
        if keep_snapshots < 1:
            raise ValueError("keep_snapshots must be >= 1")
        self.path = path
        self._keep = keep_snapshots
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        con = self._con
        # WAL with synchronous=FULL: a commit is on disk before the records it covers
        # are sent, so a crash of the process or of the machine loses no undo row.
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("BEGIN IMMEDIATE")
        con.execute(
            "CREATE TABLE IF NOT EXISTS mirror (topic TEXT NOT NULL, key BLOB NOT NULL, "
            "value BLOB NOT NULL, PRIMARY KEY (topic, key)) WITHOUT ROWID"
        )
        con.execute(
            "CREATE TABLE IF NOT EXISTS undo (base INTEGER NOT NULL, topic TEXT NOT NULL, "
            "key BLOB NOT NULL, value BLOB, PRIMARY KEY (base, topic, key)) WITHOUT ROWID"
        )
        con.execute("CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER PRIMARY KEY)")
        con.execute("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY, seq INTEGER)")
        con.execute("INSERT OR IGNORE INTO state VALUES (1, 0)")
        con.execute("COMMIT")
        (self.seq,) = con.execute("SELECT seq FROM state").fetchone()
        self.base = self.seq
        self._saved: set[tuple[str, bytes]] = set()  # keys with a before-image for `base`

    # -- resume -----------------------------------------------------------------------

    def begin_rollback(self, resume_state: int | None) -> list[SinkItem]:
        """Open a transaction that brings the mirror back to `resume_state`.

        Returns the records that bring the topics back too: each changed key's
        value at that snapshot, or a tombstone. The caller sends them, then calls
        `commit()` (or `abort()` when sending failed).
        """
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            if resume_state is None:
                out: list[SinkItem] = [
                    (topic, bytes(key), None)
                    for topic, key in con.execute("SELECT topic, key FROM mirror ORDER BY topic")
                ]
                for table in ("mirror", "undo", "snapshots"):
                    con.execute(f"DELETE FROM {table}")
            else:
                n = int(resume_state)
                known = {r[0] for r in con.execute("SELECT seq FROM snapshots")}
                if n not in known:
                    if n > self.seq:
                        why = f"its last commit is {self.seq}: it was replaced or deleted"
                    else:
                        why = f"it keeps snapshots {sorted(known)} only"
                    raise MirrorResumeError(
                        f"cannot bring the Kafka mirror {self.path} back to snapshot {n}: {why}; "
                        "rebuild with a new recovery dir and views file"
                    )
                earliest: dict[tuple[str, bytes], bytes | None] = {}
                rows = con.execute(
                    "SELECT topic, key, value FROM undo WHERE base >= ? ORDER BY base DESC", [n]
                )
                for topic, key, value in rows:
                    earliest[(topic, bytes(key))] = None if value is None else bytes(value)
                out = [(topic, key, value) for (topic, key), value in earliest.items()]
                con.executemany(
                    "DELETE FROM mirror WHERE topic = ? AND key = ?",
                    [(t, k) for t, k, v in out if v is None],
                )
                con.executemany(
                    "INSERT OR REPLACE INTO mirror VALUES (?, ?, ?)",
                    [(t, k, v) for t, k, v in out if v is not None],
                )
                con.execute("DELETE FROM undo WHERE base >= ?", [n])
                con.execute("DELETE FROM snapshots WHERE seq > ?", [n])
            # The recovered state is a position of its own (numbers are never reused).
            self.seq += 1
            con.execute("UPDATE state SET seq = ?", [self.seq])
            con.execute("INSERT OR IGNORE INTO snapshots VALUES (?)", [self.seq])
            self.base = self.seq
            self._saved = set()
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return out

    def commit(self) -> None:
        """Commit the open rollback transaction."""
        self._con.execute("COMMIT")

    def abort(self) -> None:
        """Abandon the open rollback transaction."""
        self._con.execute("ROLLBACK")

    # -- running ----------------------------------------------------------------------

    def record(self, latest: dict[tuple[str, bytes], bytes | None]) -> None:
        """Commit the latest value per key about to be sent (None: a tombstone)."""
        if not latest:
            return
        con = self._con
        saved = self._saved
        first = [key for key in latest if key not in saved]
        con.execute("BEGIN IMMEDIATE")
        try:
            # Before-images, only at a key's first change since the last snapshot.
            con.executemany(
                "INSERT OR IGNORE INTO undo (base, topic, key, value) "
                "SELECT ?1, ?2, ?3, (SELECT value FROM mirror WHERE topic = ?2 AND key = ?3)",
                [(self.base, t, k) for t, k in first],
            )
            con.executemany(
                "INSERT OR REPLACE INTO mirror VALUES (?, ?, ?)",
                [(t, k, v) for (t, k), v in latest.items() if v is not None],
            )
            con.executemany(
                "DELETE FROM mirror WHERE topic = ? AND key = ?",
                [(t, k) for (t, k), v in latest.items() if v is None],
            )
            con.execute("UPDATE state SET seq = ?", [self.seq + 1])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self.seq += 1
        saved.update(first)

    def snapshot(self) -> int:
        """Mark the current position as a snapshot (pruning what no resume can need)."""
        if self.seq == self.base:
            return self.seq
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("INSERT OR IGNORE INTO snapshots VALUES (?)", [self.seq])
            row = con.execute(
                "SELECT seq FROM snapshots ORDER BY seq DESC LIMIT 1 OFFSET ?", [self._keep - 1]
            ).fetchone()
            if row is not None:
                con.execute("DELETE FROM undo WHERE base < ?", [row[0]])
                con.execute("DELETE FROM snapshots WHERE seq < ?", [row[0]])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self.base = self.seq
        self._saved = set()
        return self.seq

    def values(self) -> dict[tuple[str, bytes], bytes]:
        """Every mirrored key's latest value (tests and tools)."""
        return {
            (t, bytes(k)): bytes(v)
            for t, k, v in self._con.execute("SELECT topic, key, value FROM mirror")
        }

    def close(self) -> None:
        """Close the file."""
        self._con.close()


class _ReconciledPartition(StatefulSinkPartition[list[SinkItem], int | None]):
    def __init__(
        self,
        producer: Any,
        mirror: KafkaMirror | None,
        compacted: frozenset[str],
        protect: Any = None,
    ):
        self._producer = producer
        self._mirror = mirror
        self._compacted = compacted
        self._protect = protect  # sferp.protect.KafkaProtect: encrypts configured fields

    def write_batch(self, values: list[list[SinkItem]]) -> None:
        records = [r for batch in values for r in batch]
        if not records:
            return
        if self._protect is not None:
            records = self._protect(records)
        if self._mirror is not None:
            compacted = self._compacted
            self._mirror.record({(t, k): v for t, k, v in records if t in compacted and k})
        self._producer.send(records)  # checked by a later send, a snapshot (recovery) or close

    def snapshot(self) -> int | None:
        """With a mirror (recovery on): wait for every delivery, then snapshot the mirror.

        Without one no resume state is ever used, so the worker does not wait for the
        producer here (measured: 1.8 % of the worker's time in live runs at 80 %
        load): a failed delivery is still raised by a later send or by `close`.
        """
        if self._mirror is None:
            return None
        self._producer.flush()
        return self._mirror.snapshot()

    def close(self) -> None:
        try:
            self._producer.close()
        finally:
            if self._mirror is not None:
                self._mirror.close()


class ReconciledKafkaSink(FixedPartitionedSink[list[SinkItem], int | None]):
    """Write the coordinator's Kafka records through one producer, exact across resumes.

    One partition, built on one worker of the process that may write (`writer`).
    With `mirror` (a file path; runs with a recovery store) the compacted topics
    are brought back to the snapshot on resume, as the module docstring
    describes; without it the outputs are at-least-once.
    """

    def __init__(
        self,
        kafka: KafkaSink,
        *,
        compacted: Iterable[str],
        mirror: str | None = None,
        writer: bool = True,
        keep_snapshots: int = 3,
        protect: Any = None,
    ) -> None:
        """Store the settings; the producer and the mirror open in `build_part`.

        :arg kafka: the producer settings (its `build` makes the producer).
        :arg compacted: topics whose latest value per key is the state to keep exact.
        :arg mirror: path of the mirror file, or None for plain at-least-once.
        :arg writer: whether this process lists the partition.
        :arg protect: a `sferp.protect.KafkaProtect` (encrypts configured fields), or None.
        """
        self._kafka = kafka
        self._compacted = frozenset(compacted)
        self._mirror = mirror
        self._writer = writer
        self._keep = keep_snapshots
        self._protect = protect

    def list_parts(self) -> list[str]:
        """The single partition, when this process may write."""
        return [_PART] if self._writer else []

    def part_fn(self, item_key: str) -> int:
        """Every item goes to the one partition."""
        return 0

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _ReconciledPartition:
        """Open the producer and the mirror, and bring the topics back to `resume_state`."""
        producer = self._kafka.build(step_id, 0, 1)
        if self._mirror is None:
            return _ReconciledPartition(producer, None, self._compacted, self._protect)
        try:
            mirror = KafkaMirror(self._mirror, keep_snapshots=self._keep)
        except BaseException:
            producer.close()
            raise
        try:
            restore = mirror.begin_rollback(resume_state)
            try:
                if restore:
                    producer.write_batch(restore)
            except BaseException:
                mirror.abort()
                raise
            mirror.commit()
            if resume_state is not None:
                log.info(
                    "kafka outputs: resumed at snapshot %s; %d keys sent after it restored",
                    resume_state,
                    len(restore),
                )
            elif restore:
                log.info(
                    "kafka outputs: starting afresh; %d keys of an earlier run tombstoned",
                    len(restore),
                )
        except BaseException:
            mirror.close()
            producer.close()
            raise
        return _ReconciledPartition(producer, mirror, self._compacted, self._protect)
