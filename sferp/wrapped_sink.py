"""A partitioned sink around another one: same partitions and routing, its own `build_part`.

The flow observes its sinks without changing them (metrics: `sferp/metrics.py`; busy time:
`sferp/stage_time.py`); each wrapper only says what it does to the partitions it builds.
"""

from __future__ import annotations

from typing import Any

from bytewax.outputs import FixedPartitionedSink

__all__ = ["WrappedSink"]


class WrappedSink(FixedPartitionedSink):
    """Delegates partitions and routing to `inner`; subclasses wrap `build_part`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def list_parts(self) -> list[str]:
        """The inner sink's partitions."""
        return self._inner.list_parts()

    def part_fn(self, item_key: str) -> int:
        """The inner sink's routing."""
        return self._inner.part_fn(item_key)
