"""The de-duplication window: decisions, and memory released exactly as a full scan would."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st
from sferp.operators.dedupe import DedupWindow, identity_hash

MINUTE = 60_000


class ScanWindow:
    """The window as first written: every expire scans every bucket (the oracle)."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.seen: dict[int, int] = {}
        self.buckets: dict[tuple[str, int], dict[int, list[int]]] = {}

    def check_and_add(self, identity: str, t: int, clock: int, tp: tuple[str, int]) -> bool:
        h = identity_hash(identity)
        first = self.seen.get(h)
        if first is not None and clock <= first + self.window_ms:
            return True
        self.seen[h] = t
        self.buckets.setdefault(tp, {}).setdefault(t // MINUTE, []).append(h)
        return False

    def expire(self, clocks: dict[tuple[str, int], int]) -> int:
        dropped = 0
        for tp, minutes in self.buckets.items():
            clock = clocks.get(tp)
            if clock is None:
                continue
            limit = (clock - self.window_ms) // MINUTE - 1
            for m in [m for m in minutes if m <= limit]:
                for h in minutes.pop(m):
                    t = self.seen.get(h)
                    if t is not None and t // MINUTE == m:
                        del self.seen[h]
                        dropped += 1
        return dropped


steps = st.lists(
    st.tuples(
        st.integers(0, 40),  # identity: a small pool, so copies recur
        st.integers(0, 90 * MINUTE),  # event time: far out of order
        st.sampled_from([("a", 0), ("a", 1), ("b", 0)]),
        st.booleans(),  # expire after this step
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(steps, st.sampled_from([0, MINUTE, 5 * MINUTE, 30 * MINUTE]))
def test_decisions_and_released_memory_equal_a_full_scan(events, window_ms):
    """Each lookup decides as the scanning window does, and after every expire the
    remembered identities are the same (also after a snapshot round trip midway)."""
    fast, oracle = DedupWindow(window_ms), ScanWindow(window_ms)
    clocks: dict[tuple[str, int], int] = {}
    for i, (ident, t, tp, expire) in enumerate(events):
        clocks[tp] = max(clocks.get(tp, -1), t)
        key = f"id-{ident}"
        assert fast.check_and_add(key, t, clocks[tp], tp) == oracle.check_and_add(
            key, t, clocks[tp], tp
        )
        if expire:
            assert fast.expire(clocks) == oracle.expire(clocks)
            assert fast.seen == oracle.seen
        if i == len(events) // 2:
            fast = pickle.loads(pickle.dumps(fast))
    assert fast.expire(clocks) == oracle.expire(clocks)
    assert fast.seen == oracle.seen
    assert len(fast) == len(oracle.seen)


def test_a_late_minute_below_the_expired_limit_is_released_later():
    """A bucket created below what was already released (a late event) goes at the
    next expire; nothing of the current window is lost."""
    w = DedupWindow(MINUTE)
    tp = ("t", 0)
    assert not w.check_and_add("x", 10 * MINUTE, 10 * MINUTE, tp)
    assert w.expire({tp: 10 * MINUTE}) == 0
    assert not w.check_and_add("late", 2 * MINUTE, 10 * MINUTE, tp)  # minute 2: long expired
    assert not w.check_and_add("now", 10 * MINUTE + 5, 10 * MINUTE + 5, tp)
    assert w.expire({tp: 10 * MINUTE + 5}) == 1
    assert identity_hash("late") not in w.seen
    assert w.check_and_add("now", 10 * MINUTE + 6, 10 * MINUTE + 6, tp)  # still a duplicate


def test_snapshots_written_before_the_heaps_existed_load():
    """Pickles of the window as it was (window_ms, seen, buckets) load and expire."""
    tp = ("t", 0)
    h_old, h_new = identity_hash("old"), identity_hash("new")
    w = DedupWindow.__new__(DedupWindow)
    w.__setstate__(
        (
            None,
            {
                "window_ms": MINUTE,
                "seen": {h_old: 1 * MINUTE, h_new: 9 * MINUTE},
                "buckets": {tp: {9: [h_new], 1: [h_old]}},
            },
        )
    )
    assert w.heaps == {tp: [1, 9]}
    assert w.expire({tp: 9 * MINUTE}) == 1
    assert w.seen == {h_new: 9 * MINUTE}
    state = pickle.dumps(w)
    assert b"heaps" not in state  # rebuilt on load, never stored
    assert pickle.loads(state).heaps == {tp: [9]}
