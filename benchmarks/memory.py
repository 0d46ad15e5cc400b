"""Memory measurements that need no broker: de-duplication state and recovery snapshots."""

from __future__ import annotations

import gc
import sqlite3
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

from sferp.operators.dedupe import DedupWindow


def dedup_bytes_per_identity(n: int, partitions: int = 12, window_s: int = 3600) -> dict[str, Any]:
    """Fill a DedupWindow with `n` distinct identities inside one window; bytes each.

    Identities look like the decoder's Salesforce identities (entity, transaction
    key, sequence number, record Ids); event times spread over the window across
    `partitions` partitions, so nothing expires. Measured with tracemalloc: every
    byte Python allocates for the window's dict, buckets and hash integers.
    """
    rng = uuid.UUID(int=0x5EED).int
    tps = [("sf.cdc", p) for p in range(partitions)]
    start_ms = 1_790_000_000_000
    spacing = max(1, window_s * 1000 // max(1, n))
    identities = [
        f"Order|{uuid.UUID(int=(rng + i) % (1 << 128))}|{i % 7}|801{i:015d}" for i in range(n)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        window = DedupWindow(window_s * 1000)
        t0 = time.perf_counter()
        for i, ident in enumerate(identities):
            t = start_ms + i * spacing
            window.check_and_add(ident, t, t, tps[i % partitions])
        took = time.perf_counter() - t0
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(window) == n, "every identity is distinct and inside the window"
    return {
        "identities": n,
        "bytes": after - before,
        "bytes_per_identity": round((after - before) / n, 1),
        "fill_seconds_traced": round(took, 3),
    }


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def snapshot_size(recovery_dir: Path) -> dict[str, Any]:
    """Size of the newest snapshot of every state key in a Bytewax recovery store.

    Bytewax writes a key's state only in epochs where it changed; the newest row per
    `(step_id, state_key)` together is the full state a resume loads.
    """
    total = 0
    keys = 0
    epochs: set[int] = set()
    last_epoch = 0
    per_step: dict[str, int] = {}
    for db in sorted(recovery_dir.glob("*.sqlite3")):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT s.step_id, length(s.ser_change), s.snap_epoch FROM snaps s "
                "WHERE s.snap_epoch = (SELECT max(t.snap_epoch) FROM snaps t "
                "WHERE t.step_id = s.step_id AND t.state_key = s.state_key)"
            ).fetchall()
            epochs.update(e for (e,) in con.execute("SELECT DISTINCT snap_epoch FROM snaps"))
            (last,) = con.execute("SELECT max(snap_epoch) FROM snaps").fetchone()
        finally:
            con.close()
        last_epoch = max(last_epoch, last or 0)
        for step, size, _epoch in rows:
            total += size or 0
            keys += 1
            per_step[step] = per_step.get(step, 0) + (size or 0)
    return {
        "state_bytes": total,
        "state_keys": keys,
        "epochs_kept": len(epochs),
        "last_epoch": last_epoch,
        "per_step_bytes": dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
        "dir_bytes": dir_bytes(recovery_dir),
    }
