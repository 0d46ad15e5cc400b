"""De-duplication over an event-time window (CONTRACT §2, docs/semantics.md §2).

An identity is remembered as a 64-bit hash with its event time. It is forgotten
once the clock of the partition its copies arrive on passes its event time +
the window: checked exactly at lookup, storage released a minute at a time.
Expiry is driven by event time, never by wall clock, so a replay after a crash
decides exactly as the first run did.
"""

from __future__ import annotations

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

    __slots__ = ("window_ms", "seen", "buckets")

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.seen: dict[int, int] = {}  # hash -> event time (ms)
        self.buckets: dict[Partition, dict[int, list[int]]] = {}  # partition -> minute -> hashes

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
        bucket = minutes.get(event_time_ms // 60_000)
        if bucket is None:
            minutes[event_time_ms // 60_000] = [h]
        else:
            bucket.append(h)
        return False

    def expire(self, clocks: dict[Partition, int]) -> int:
        """Forget identities whose minute lies wholly more than the window behind their
        partition's clock; return how many were dropped."""
        dropped = 0
        for tp, minutes in self.buckets.items():
            clock = clocks.get(tp)
            if clock is None:
                continue
            # Minute m holds event times < (m + 1) * 60 s; all of them have expired
            # once clock > (m + 1) * 60 s + window.
            limit = (clock - self.window_ms) // 60_000 - 1
            old = [m for m in minutes if m <= limit] if minutes else []
            for m in old:
                for h in minutes.pop(m):
                    t = self.seen.get(h)
                    if t is not None and t // 60_000 == m:
                        del self.seen[h]
                        dropped += 1
        return dropped
