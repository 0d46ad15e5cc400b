"""Peak memory of the extract source on a large extract (run by tests/test_erp_extracts.py).

Writes a `rows`-row inventory full snapshot and a re-export with 1 % of the rows
changed and 0.1 % gone, then applies both through a Bytewax dataflow (extract
source -> merge-shard router -> a sink that counts the changes) and prints one
line: rows, upserts, deletes, seconds, peak RSS of this process in MB.

    python tests/extract_rss_probe.py DIR ROWS
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import bytewax.operators as op
import duckdb
from bytewax._bytewax import cli_main
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from sferp.connectors.erp_extracts import ErpExtractSource
from sferp.operators.extract_routing import make_extract_router
from sferp.operators.facts import CHANGES

COUNTS = {"upsert": 0, "delete": 0}


class _Counting(StatelessSinkPartition):
    def write_batch(self, items: list) -> None:
        for _, payload in items:
            if payload[0] == CHANGES:
                for ch in payload[2]:
                    COUNTS[ch.op] += 1


class CountingSink(DynamicSink):
    """Counts the changes routed to the merge shards; keeps nothing else."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Counting:
        return _Counting()


def write_extracts(d: Path, rows: int) -> None:
    """Two full snapshots written by DuckDB (no Python objects per row)."""
    con = duckdb.connect()
    for seq, changed_every in ((1, 0), (2, 100)):
        con.execute(
            f"""COPY (SELECT 'SKU-' || lpad((i // 4)::VARCHAR, 8, '0') AS sku,
              ['DAL1', 'RNO1', 'ATL2', 'CMH1'][(i % 4) + 1] AS warehouse,
              i % 400 + CASE WHEN {changed_every} > 0 AND i % {max(changed_every, 1)} = 0
                             THEN 1 ELSE 0 END AS qty_on_hand,
              i % 15 AS qty_allocated
              FROM range({rows}) t(i) WHERE NOT ({changed_every} > 0 AND i % 1000 = 999))
            TO '{d}/inventory.full.{seq:06d}.20261102T0{seq}0000Z.csv' (HEADER)"""
        )
    con.close()


def peak_rss_kib() -> int:
    """This process's own peak resident set (VmHWM). Not ru_maxrss: Linux carries that
    over from the process that started this one (here pytest's, when it had grown to
    2.2 GB), so the test failed whatever the extract source used."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    d, rows = Path(sys.argv[1]), int(sys.argv[2])
    d.mkdir(parents=True, exist_ok=True)
    write_extracts(d, rows)
    flow = Dataflow("extract_rss")
    src = ErpExtractSource(
        d, tables=["inventory"], state_dir=d / "state", bounded=True, settle_s=0, recovery=False
    )
    router = make_extract_router(live=False, max_future_skew_ms=0)
    op.output("out", op.flat_map("route", op.input("in", flow, src), router), CountingSink())
    started = time.monotonic()
    cli_main(flow)
    took = time.monotonic() - started
    peak_mb = peak_rss_kib() / 1024
    print(
        f"rows={rows} upserts={COUNTS['upsert']} deletes={COUNTS['delete']} "
        f"seconds={took:.1f} peak_rss_mb={peak_mb:.0f}"
    )


if __name__ == "__main__":
    main()
