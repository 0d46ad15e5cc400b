"""The run id stamps (sferp/run_identity.py) wait for a reader's lock on the views file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sferp.connectors.duckdb_views import write_views_file

from sferp.run_identity import stamp_views, views_run_id


def test_stamping_waits_while_a_query_reads_the_views_file(tmp_path: Path) -> None:
    """A `sferp query` polling a live run's file holds DuckDB's lock for a moment; a run
    starting just then failed on it ("Could not set lock") and never read a message."""
    path = str(tmp_path / "v.duckdb")
    write_views_file(path, [{"records": {}}])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time\n"
            "con = duckdb.connect(sys.argv[1], read_only=True)\n"
            "print('holding', flush=True)\n"
            "time.sleep(1.5)\n",
            path,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "holding\n"
    started = time.monotonic()
    stamp_views(path, "r1")
    assert time.monotonic() - started > 0.5  # it waited for the reader
    holder.wait(10)
    assert views_run_id(path) == "r1"
