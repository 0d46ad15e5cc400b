"""De-duplication over an event-time window (CONTRACT §2, docs/semantics.md §2).

An identity is remembered as a 64-bit hash with its event time. It is forgotten
once the clock of the partition its copies arrive on passes its event time +
the window: checked exactly at lookup, storage released a minute at a time.
Expiry is driven by event time, never by wall clock, so a replay after a crash
decides exactly as the first run did.
"""

from __future__ import annotations

import heapq
from hashlib import blake2b

Partition = tuple[str, int]


def identity_hash(identity: str) -> int:
    """A stable 64-bit hash of an event identity."""
    return int.from_bytes(blake2b(identity.encode(), digest_size=8).digest(), "little")


class DedupWindow:
    """Remembers identities for `window_ms` of event time.

    Memory: one dict entry per remembered identity plus its place in a
    per-partition, per-minute bucket list (see the benchmark's
    `bytes_per_identity`).
    """

    __slots__ = ("window_ms", "seen", "buckets", "heaps")

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.seen: dict[int, int] = {}  # hash -> event time (ms)
        self.buckets: dict[Partition, dict[int, list[int]]] = {}  # partition -> minute -> hashes
        # partition -> its bucket minutes as a min-heap: `expire` touches only what
        # expires (live batches are small and many; a scan of every bucket each was not).
        self.heaps: dict[Partition, list[int]] = {}

    def __getstate__(self) -> tuple:
        return (None, {"window_ms": self.window_ms, "seen": self.seen, "buckets": self.buckets})

    def __setstate__(self, state: tuple) -> None:
        """Load a pickled window; the heaps are rebuilt from the buckets."""
        for name, value in state[1].items():
            setattr(self, name, value)
        self.heaps = {}
        for tp, minutes in self.buckets.items():
            heap = list(minutes)
            heapq.heapify(heap)
            self.heaps[tp] = heap

    def __len__(self) -> int:
        return len(self.seen)

    def check_and_add(
        self, identity: str, event_time_ms: int, clock_ms: int, tp: Partition
    ) -> bool:
        """True when `identity` is a duplicate; otherwise remember it and return False."""
        h = identity_hash(identity)
        first = self.seen.get(h)
        if first is not None and clock_ms <= first + self.window_ms:
            return True
        self.seen[h] = event_time_ms
        minutes = self.buckets.get(tp)
        if minutes is None:
            minutes = self.buckets[tp] = {}
            self.heaps[tp] = []
        minute = event_time_ms // 60_000
        bucket = minutes.get(minute)
        if bucket is None:
            minutes[minute] = [h]
            heapq.heappush(self.heaps[tp], minute)
        else:
            bucket.append(h)
        return False

    def expire(self, clocks: dict[Partition, int]) -> int:
        """Forget identities whose minute lies wholly more than the window behind their
        partition's clock; return how many were dropped."""
        dropped = 0
        heaps = self.heaps
        seen = self.seen
        for tp, minutes in self.buckets.items():
            clock = clocks.get(tp)
            if clock is None:
                continue
            # Minute m holds event times < (m + 1) * 60 s; all of them have expired
            # once clock > (m + 1) * 60 s + window.
            limit = (clock - self.window_ms) // 60_000 - 1
            heap = heaps[tp]
            while heap and heap[0] <= limit:
                m = heapq.heappop(heap)
                for h in minutes.pop(m):
                    t = seen.get(h)
                    if t is not None and t // 60_000 == m:
                        del seen[h]
                        dropped += 1
        return dropped
