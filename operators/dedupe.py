"""De-duplication over an event-time window (CONTRACT §2).

An identity is remembered as a 64-bit hash with its event time; it is forgotten
once the clock passes its event time + the window (checked exactly at lookup,
and storage is released a minute-bucket at a time).
Expiry is driven by event time (the shard's clock), never by wall clock, so a
replay after a crash decides exactly as the first run did.
"""

from __future__ import annotations

from hashlib import blake2b


def identity_hash(identity: str) -> int:
    """A stable 64-bit hash of an event identity."""
    return int.from_bytes(blake2b(identity.encode(), digest_size=8).digest(), "little")


class DedupWindow:
    """Remembers identities for `window_ms` of event time.

    Memory: one dict entry per remembered identity plus its place in a
    per-minute bucket list (see `bytes_per_identity` in the benchmarks).
    """

    __slots__ = ("window_ms", "seen", "buckets", "_oldest")

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.seen: dict[int, int] = {}  # hash -> event time (ms)
        self.buckets: dict[int, list[int]] = {}  # minute -> hashes first seen in it
        self._oldest: int | None = None

    def __len__(self) -> int:
        return len(self.seen)

    def check_and_add(self, identity: str, event_time_ms: int, clock_ms: int) -> bool:
        """True when `identity` is a duplicate; otherwise remember it and return False."""
        h = identity_hash(identity)
        first = self.seen.get(h)
        if first is not None and clock_ms <= first + self.window_ms:
            return True
        minute = event_time_ms // 60_000
        self.seen[h] = event_time_ms
        bucket = self.buckets.get(minute)
        if bucket is None:
            self.buckets[minute] = [h]
            if self._oldest is None or minute < self._oldest:
                self._oldest = minute
        else:
            bucket.append(h)
        return False

    def expire(self, clock_ms: int) -> int:
        """Forget identities whose whole minute lies more than the window behind `clock_ms`."""
        if self._oldest is None:
            return 0
        # A minute bucket m holds event times < (m + 1) * 60s; all of them are
        # expired when clock > (m + 1) * 60s + window.
        limit = (clock_ms - self.window_ms) // 60_000 - 1
        if self._oldest > limit:
            return 0
        dropped = 0
        for minute in sorted(m for m in self.buckets if m <= limit):
            for h in self.buckets.pop(minute):
                t = self.seen.get(h)
                if t is not None and t // 60_000 == minute:
                    del self.seen[h]
                    dropped += 1
        self._oldest = min(self.buckets) if self.buckets else None
        return dropped
