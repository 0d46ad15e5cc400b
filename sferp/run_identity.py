"""Which run a views file, its Kafka mirror and a recovery store belong to.

A resume rolls the views file and the Kafka mirror back to the snapshot the
recovery store names. Snapshot numbers are small positions that every run counts
alike, so the files of another run (a copied or swapped `--views`, a backup of
another deployment) could hold the same numbers and were rolled back without a
word: the run went on with another world's views. A run that starts afresh stamps
the three with one random id; a resume first checks that they carry the same one,
and refuses in one line otherwise (before the dataflow starts).

Stores written before the stamp existed carry none and are not checked.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb

from sferp.config import ConfigError
from sferp.connectors.duckdb_schema import INTERNAL_SCHEMA
from sferp.duckdb_connect import connect
from sferp.logfmt import first_line

STORE_FILE = ".sferp-run-id"  # in the recovery dir, beside Bytewax's partitions


def new_run_id() -> str:
    """A random id for a run that starts afresh."""
    return uuid.uuid4().hex


def _open(path: str, *, read_only: bool, wait_s: float = 10.0) -> duckdb.DuckDBPyConnection:
    """Open the views file, waiting up to `wait_s` while another process holds its lock
    (a `sferp query` reads the file for a moment before the writer serves it)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return connect(path, read_only=read_only, config={"enable_external_access": False})
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stamp_views(path: str, run_id: str) -> None:
    """Record `run_id` in the views file (which exists: the run just emptied it)."""
    with _open(path, read_only=False) as con:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {INTERNAL_SCHEMA}")
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {INTERNAL_SCHEMA}.run "
            "(id INTEGER PRIMARY KEY, run_id VARCHAR)"
        )
        con.execute(f"INSERT OR REPLACE INTO {INTERNAL_SCHEMA}.run VALUES (1, ?)", [run_id])


def views_run_id(path: str) -> str | None:
    """The id a views file was stamped with; None when it has none."""
    with _open(path, read_only=True) as con:
        try:
            row = con.execute(f"SELECT run_id FROM {INTERNAL_SCHEMA}.run").fetchone()
        except duckdb.CatalogException:
            return None
    return None if row is None else str(row[0])


def stamp_mirror(path: str, run_id: str) -> None:
    """Record `run_id` in the Kafka mirror file (created when missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("CREATE TABLE IF NOT EXISTS run (id INTEGER PRIMARY KEY, run_id TEXT)")
        con.execute("INSERT OR REPLACE INTO run VALUES (1, ?)", [run_id])
    finally:
        con.close()


def mirror_run_id(path: str) -> str | None:
    """The id a Kafka mirror file was stamped with; None when it has none."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT run_id FROM run").fetchone()
    except sqlite3.OperationalError:  # no such table
        return None
    finally:
        con.close()
    return None if row is None else str(row[0])


def stamp_store(recovery_dir: str, run_id: str, topics: dict[str, str]) -> None:
    """Record `run_id` and the topics in the recovery dir (written whole, then renamed)."""
    final = Path(recovery_dir) / STORE_FILE
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "topics": topics}, sort_keys=True) + "\n")
    os.replace(tmp, final)


def read_store(recovery_dir: str) -> dict[str, Any] | None:
    """What the recovery store was stamped with; None for a store from before stamps."""
    try:
        doc = json.loads((Path(recovery_dir) / STORE_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise ConfigError(
            f"--recovery-dir: {recovery_dir}/{STORE_FILE} is damaged; rebuild the views "
            "with a new recovery dir and views file"
        ) from None
    return doc if isinstance(doc, dict) else None


def stamp_all(
    views_path: str, mirror: str | None, recovery_dir: str, topics: dict[str, str]
) -> str:
    """Stamp a fresh start's views file, mirror and store with one new id (the store last:
    a crash before it leaves a store without snapshots, which starts afresh again)."""
    run_id = new_run_id()
    stamp_views(views_path, run_id)
    if mirror is not None:
        stamp_mirror(mirror, run_id)
    stamp_store(recovery_dir, run_id, topics)
    return run_id


def check_resume(
    views_path: str, mirror: str | None, recovery_dir: str, topics: dict[str, str]
) -> None:
    """Raise ConfigError (one line) unless the files a resume rolls back belong to the run
    whose recovery store it resumes from, and the topics are the ones it was built with.

    A topic changed under a recovery store would mix: the state holds what the old input
    topics said, and a renamed output topic would get only the rows that change later.
    """
    store = read_store(recovery_dir)
    if store is None:
        return
    rebuild = "or rebuild the views with a new recovery dir and views file"
    for role, was in sorted((store.get("topics") or {}).items()):
        now = topics.get(role, "")
        if now != was:
            raise ConfigError(
                f"topics.{role}: {now!r}, but the recovery store {recovery_dir} was built "
                f"with {was!r}; keep it, {rebuild} to switch topics"
            )
    want = store.get("run_id")
    if not os.path.exists(views_path):
        raise ConfigError(
            f"views.path: {views_path} does not exist, but the recovery store {recovery_dir} "
            f"resumes it; restore that file, {rebuild}"
        )
    try:
        found = views_run_id(views_path)
    except duckdb.Error as exc:
        raise ConfigError(
            f"views.path: {views_path} cannot be read as a views file ({first_line(exc)}); "
            f"restore it, {rebuild}"
        ) from None
    if found != want:
        raise ConfigError(
            f"views.path: {views_path} was not written by the run whose recovery store is "
            f"{recovery_dir}; give that run's views file, {rebuild}"
        )
    if mirror is None or not os.path.exists(mirror):
        return
    try:
        found = mirror_run_id(mirror)
    except sqlite3.Error as exc:
        raise ConfigError(
            f"views.path: the Kafka mirror {mirror} beside it cannot be read "
            f"({first_line(exc)}); restore it, {rebuild}"
        ) from None
    if found != want:
        raise ConfigError(
            f"views.path: the Kafka mirror {mirror} beside it was not written by the run whose "
            f"recovery store is {recovery_dir}; give that run's files, {rebuild}"
        )
