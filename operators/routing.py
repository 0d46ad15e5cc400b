"""Stable routing of keys to the shards that key every stateful stage.

Each stateful stage is keyed by a shard id, not by a record: one Bytewax key
carries a whole batch of a shard's items, so Bytewax's per-item routing cost is
paid per shard and batch instead of per event (DESIGN.md, "Performance habits").
The hash is crc32, stable across processes and Python versions (never `hash()`).
"""

from __future__ import annotations

from zlib import crc32

# Fixed for the life of a recovery store: the shard count is part of the
# snapshotted key space. 32 shards spread evenly over up to ~8 workers.
SHARDS = 32

_NAMES = {prefix: [f"{prefix}{i:02d}" for i in range(SHARDS)] for prefix in "mopk"}

MERGE, ORDERS, PRODUCTS, SKUS = "m", "o", "p", "k"
GLOBAL = "g"


def shard(prefix: str, key: str) -> str:
    """The shard id (e.g. 'm07') that owns `key` in the stage named by `prefix`."""
    return _NAMES[prefix][crc32(key.encode()) % SHARDS]


def shard_index(key: str) -> int:
    """The shard number of `key` (0 <= n < SHARDS)."""
    return crc32(key.encode()) % SHARDS
