"""Partitioned sources and sinks around other ones: same partitions (and routing).

The flow observes its source and sinks without changing them (metrics: `sferp/metrics.py`;
busy time: `sferp/stage_time.py`; the cluster's start: `flows/reconcile.py`); each
wrapper only says what it does on top.
"""

from __future__ import annotations

from typing import Any

from bytewax.inputs import FixedPartitionedSource
from bytewax.outputs import FixedPartitionedSink

__all__ = ["WrappedSink", "WrappedSource"]


class WrappedSource(FixedPartitionedSource):
    """Delegates partitions to `inner`; subclasses wrap `list_parts` or `build_part`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def list_parts(self) -> list[str]:
        """The inner source's partitions."""
        return self._inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> Any:
        """The inner source's partition."""
        return self._inner.build_part(step_id, for_part, resume_state)


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
