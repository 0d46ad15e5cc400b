"""The Bytewax recovery store of `sferp run --recovery-dir`: created once, shared by the cluster.

A store is a directory of SQLite partitions (`part-<n>.sqlite3`). An empty
directory is initialised with `RECOVERY_PARTITIONS` partitions by process 0 (or
the only process); the other processes of a cluster wait until it is there, so
that processes starting together on a shared directory never create two stores.
Creation happens under an exclusive lock in the directory, into a scratch
directory first, and the partitions are moved into place only when all exist: a
crash during creation never leaves half a store behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sferp.config import ConfigError

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
    deadline = time.monotonic() + wait_s
    while True:
        with _locked(path):
            if partitions(path):
                _finish_moving(path)  # a creation interrupted halfway through its renames
                log.info("resuming from recovery store %s", path)
                return RecoveryConfig(str(path))
            strangers = [p.name for p in path.iterdir() if p.name not in (_LOCK, _SCRATCH)]
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
