"""A merge shard's records by `(source, entity, key)`, stored as one dict per `(source, entity)`.

A flat dict keyed by the triple keeps a 64-byte tuple per record besides the key
string (64 MB at 1,000,000 records); the few `(source, entity)` pairs are the
outer keys here, so a record costs its key string and one dict entry. The merge
loop reaches the inner dicts directly (`of`); everything else uses the mapping
of triples, which is built on the fly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class RecordTable:
    """Mapping of `(source, entity, key)` to a record (object or cold bytes)."""

    __slots__ = ("kinds",)

    def __init__(self, flat: dict[tuple[str, str, str], Any] | None = None) -> None:
        self.kinds: dict[tuple[str, str], dict[str, Any]] = {}
        for rkey, rec in (flat or {}).items():
            self[rkey] = rec

    def of(self, source: str, entity: str) -> dict[str, Any]:
        """The dict of keys to records of one source and entity (created when new)."""
        d = self.kinds.get((source, entity))
        if d is None:
            d = self.kinds[(source, entity)] = {}
        return d

    def get(self, rkey: tuple[str, str, str], default: Any = None) -> Any:
        d = self.kinds.get((rkey[0], rkey[1]))
        return default if d is None else d.get(rkey[2], default)

    def __getitem__(self, rkey: tuple[str, str, str]) -> Any:
        return self.kinds[(rkey[0], rkey[1])][rkey[2]]

    def __setitem__(self, rkey: tuple[str, str, str], rec: Any) -> None:
        self.of(rkey[0], rkey[1])[rkey[2]] = rec

    def __delitem__(self, rkey: tuple[str, str, str]) -> None:
        del self.kinds[(rkey[0], rkey[1])][rkey[2]]

    def __contains__(self, rkey: object) -> bool:
        return self.get(rkey, _MISSING) is not _MISSING  # type: ignore[arg-type]

    def __len__(self) -> int:
        return sum(len(d) for d in self.kinds.values())

    def items(self) -> Iterator[tuple[tuple[str, str, str], Any]]:
        for (source, entity), d in self.kinds.items():
            for key, rec in d.items():
                yield (source, entity, key), rec

    def keys(self) -> Iterator[tuple[str, str, str]]:
        for rkey, _ in self.items():
            yield rkey

    __iter__ = keys

    def values(self) -> Iterator[Any]:
        for d in self.kinds.values():
            yield from d.values()

    def __getstate__(self) -> dict[tuple[str, str], dict[str, Any]]:
        return self.kinds

    def __setstate__(self, kinds: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.kinds = kinds


_MISSING = object()
