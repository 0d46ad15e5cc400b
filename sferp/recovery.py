"""The Bytewax recovery store of `sferp run --recovery-dir`: created once, shared by the cluster.

A store is a directory of SQLite partitions (`part-<n>.sqlite3`). An empty
directory is initialised with `RECOVERY_PARTITIONS` partitions by process 0 (or
the only process); the other processes of a cluster wait until it is there, so
that processes starting together on a shared directory never create two stores.
Creation happens under an exclusive lock in the directory, into a scratch
directory first, and the partitions are moved into place only when all exist: a
crash during creation never leaves half a store behind.

Before a run resumes, process 0 (or the only process) discards the snapshots of
epochs the stopped run had not finished (`discard_unfinished_snapshots`): Bytewax
0.21 keeps them, and they would mix into a later resume.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from sferp.config import ConfigError
from sferp.run_identity import STORE_FILE

log = logging.getLogger("sferp")

# Partitions of a new store (fixed for its life). Bytewax routes each state key's
# snapshots to one partition and gives each partition to one worker, so a store
# serves a cluster of any size, and up to this many workers write snapshots in
# parallel. The flow's stateful stages have 32 shards each, so clusters beyond 32
# workers gain nothing; 16 partitions let the cluster grow to 16 workers with every
# worker sharing the snapshot writes, at a measured cost of nothing per run
# over 8 (README, "Running a cluster").
RECOVERY_PARTITIONS = 16

_LOCK = ".sferp-init.lock"
_SCRATCH = ".sferp-init"
_RUN_LOCK = ".sferp-run.lock"
SQLITE_TIMEOUT_S = 30.0  # how long a read or the discard waits for a partition Bytewax writes
_run_locks: dict[str, int] = {}  # recovery dir -> descriptor of its run lock, while held


def partitions(path: Path) -> list[Path]:
    """The recovery partitions in `path` (empty when there is no store)."""
    return sorted(path.glob("part-*.sqlite3"))


def prepare_recovery(
    recovery_dir: str,
    *,
    process_id: int | None = None,
    count: int = RECOVERY_PARTITIONS,
    wait_s: float = 60.0,
) -> Any:
    """Initialise the store when empty (process 0 only); return Bytewax's RecoveryConfig.

    Processes other than 0 wait up to `wait_s` for process 0 to create it; a
    directory that holds other files but no partitions is refused (exit 2).
    """
    from bytewax.recovery import RecoveryConfig

    path = Path(recovery_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--recovery-dir: cannot create {path}: {exc.strerror}") from exc
    if process_id in (None, 0):
        _hold_run_lock(path)  # before anything in the store changes
    deadline = time.monotonic() + wait_s
    while True:
        with _locked(path):
            if partitions(path):
                _finish_moving(path)  # a creation interrupted halfway through its renames
                log.info("resuming from recovery store %s", path)
                if process_id in (None, 0):
                    # Before any process of the cluster can start: Bytewax reads and
                    # writes the store only once every process has joined.
                    discard_unfinished_snapshots(path)
                return RecoveryConfig(str(path))
            ours = (_LOCK, _SCRATCH, _RUN_LOCK, STORE_FILE)
            strangers = [p.name for p in path.iterdir() if p.name not in ours]
            if strangers:
                raise ConfigError(
                    f"--recovery-dir: {path} holds no recovery partitions but other files "
                    f"({', '.join(sorted(strangers)[:3])}); give an empty or a recovery directory"
                )
            if process_id in (None, 0):
                _create(path, count)
                log.info("initialised recovery store %s with %d partitions", path, count)
                return RecoveryConfig(str(path))
        if time.monotonic() > deadline:
            raise ConfigError(
                f"--recovery-dir: no recovery store appeared in {path} within {wait_s:.0f} s; "
                "process 0 creates it, and every process must see the same directory"
            )
        time.sleep(0.2)


def _hold_run_lock(path: Path) -> None:
    """Process 0 holds the store's run lock while it runs; a second run waits for it.

    Discarding unfinished snapshots is only right while no run writes the store: a
    second `sferp run` started by mistake, or a rolling update that starts the new
    process before the old one has stopped, would otherwise delete the snapshots
    the running flow has written since it resumed. The kernel drops the lock when
    the process ends, kill -9 included; `release_run_lock` drops it earlier.
    """
    key = str(path.resolve())
    if key in _run_locks:
        return
    try:
        fd = os.open(path / _RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"--recovery-dir: cannot open {path / _RUN_LOCK}: {exc.strerror}"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("recovery: another run holds %s; waiting until it stops", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # a filesystem without flock (some network mounts)
        os.close(fd)
        raise ConfigError(
            f"--recovery-dir: cannot lock {path / _RUN_LOCK} ({exc.strerror}); "
            "the recovery dir needs a filesystem with flock (NFS v4, EFS, local)"
        ) from exc
    _run_locks[key] = fd


def release_run_lock(recovery_dir: str) -> None:
    """Let the next run have the store (this process's run on it has ended)."""
    fd = _run_locks.pop(str(Path(recovery_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the lock file drops the lock


def resume_epoch(parts: list[Path]) -> int | None:
    """The epoch Bytewax 0.21 resumes a store at (None: no run has started on it).

    Bytewax's own rule, from the rows of every partition: the newest execution's
    workers each count as far as their last written frontier (at least the epoch
    that execution resumed at), and the run resumes at the smallest of these.
    Epochs before it finished on every worker; snapshots are loaded from them only.
    """
    executions: list[tuple[int, int, int]] = []
    fronts: list[tuple[int, int, int]] = []
    for part in parts:
        with closing(sqlite3.connect(part, timeout=SQLITE_TIMEOUT_S)) as con:
            executions += con.execute("SELECT ex_num, worker_count, resume_epoch FROM exs")
            fronts += con.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts")
    if not executions:
        return None
    ex_num, workers, resumed_at = max(executions)
    reached = dict.fromkeys(range(workers), resumed_at)
    for ex, worker, frontier in fronts:
        if ex == ex_num:
            reached[worker] = max(reached.get(worker, frontier), frontier)
    return min(reached.values())


def discard_unfinished_snapshots(path: Path) -> int:
    """Delete the snapshots of epochs the next run redoes; returns how many were deleted.

    Why: a run resumes at epoch R and loads each state key's newest snapshot from
    before R, but Bytewax 0.21 never deletes the snapshots a killed run had written
    for epochs from R on. The resumed run redoes those epochs and snapshots only
    the keys it touches in them; a key it does not touch keeps the killed run's
    snapshot, which the next resume after those epochs loads as finished state.
    That state is ahead of the sources, the views and the other keys, and its
    changes are never replayed into the views: the crash test
    (tests/test_crash_recovery.py) lost thousands of view rows this way, in 2 of 43
    runs under load. Snapshots from R on are never loaded by the next run,
    so deleting them loses nothing. Needs every partition of the store; otherwise
    (partitions spread over machines) it warns and leaves the store alone.
    """
    parts = partitions(path)
    try:
        with closing(sqlite3.connect(parts[0], timeout=SQLITE_TIMEOUT_S)) as con:
            total = {n for (n,) in con.execute("SELECT part_count FROM parts")}
            con.execute("SELECT snap_epoch FROM snaps LIMIT 0")  # the tables this reads
        if total != {len(parts)}:
            log.warning(
                "recovery: %d of %s partitions are in %s: snapshots of epochs the last run "
                "did not finish cannot be discarded here, and a later resume may mix them in "
                "(README, Running a cluster)",
                len(parts),
                "/".join(str(n) for n in sorted(total)) or "?",
                path,
            )
            return 0
        epoch = resume_epoch(parts)
        if epoch is None:
            return 0
        deleted = 0
        for part in parts:
            with closing(
                sqlite3.connect(part, timeout=SQLITE_TIMEOUT_S, isolation_level=None)
            ) as con:
                con.execute("BEGIN IMMEDIATE")
                deleted += con.execute("DELETE FROM snaps WHERE snap_epoch >= ?", (epoch,)).rowcount
                con.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if "no such" not in str(exc):  # locked, I/O: resuming now could load stale state
            raise RecoveryStoreError(
                f"cannot discard unfinished snapshots in {path}: {exc}; a resume now could "
                "load state the last run did not finish, so nothing was started (run again: "
                "the discard is safe to repeat)"
            ) from exc
        # a store of another layout (another Bytewax version): leave it to Bytewax
        log.warning("recovery: cannot check %s for unfinished snapshots: %s", path, exc)
        return 0
    except sqlite3.Error as exc:
        raise RecoveryStoreError(f"cannot discard unfinished snapshots in {path}: {exc}") from exc
    if deleted:
        log.info(
            "recovery: discarded %d snapshots of epochs from %d on, which the last run did "
            "not finish",
            deleted,
            epoch,
        )
    return deleted


def _create(path: Path, count: int) -> None:
    from bytewax.recovery import init_db_dir

    scratch = path / _SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    init_db_dir(scratch, count)
    _finish_moving(path)


def _finish_moving(path: Path) -> None:
    """Move a complete scratch store into place (the scratch is complete once any part moved)."""
    scratch = path / _SCRATCH
    if not scratch.is_dir():
        return
    for part in partitions(scratch):
        os.replace(part, path / part.name)
    shutil.rmtree(scratch, ignore_errors=True)


class RecoveryStoreError(RuntimeError):
    """The recovery store could not be made safe to resume from (a database error)."""


class _locked:
    """An exclusive flock on the store's lock file (works across processes and machines
    sharing the directory over NFS v4)."""

    def __init__(self, path: Path) -> None:
        self.file = path / _LOCK

    def __enter__(self) -> None:
        self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
