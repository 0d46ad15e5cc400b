"""The cold form of merged records: one `bytes` object per record between batches.

A merge shard remembers every record it has seen, and most are not touched again
for a long time (an initial load touches each once). As objects, a Salesforce
record is the record, its packed JSON text and a stamp `((ts, commit, seq),
identity)` of five more objects; frozen, it is one `bytes` object:

- the stamps' integers inline;
- of each identity, only what is not the record's own entity and key (`affixes_of`);
- the fields as a shape id (their names, kept once per shard in `Shapes`) and the
  JSON array of their values, instead of JSON text with every name in it.

Measured on an initial load of 100,000 records, the merge state per record
(dict and keys included): 991 bytes as objects, 651 frozen as JSON text, 504 with
shapes, 420 with the record table of `record_table.py`. The merge stage thaws a
record when a change touches it and freezes it again after rendering its row, so
the logic itself only ever sees objects; a record thaws with its fields as a dict,
the form a change needs anyway.

Only the common shapes freeze: a Salesforce record whose fields all carry one
stamp (`SfRecord.pack` found them equal) and an ERP row with a current image and
no delete. Anything else (per-field stamps, integers beyond 64 bits, deleted ERP
rows) stays an object; both forms may sit in the same shard, and snapshots hold
either. Records frozen by earlier versions (JSON text, whole identities) thaw too.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from sferp.events import SALESFORCE

from .merge_records import ErpRecord, SfRecord

# Header: flags, event_time, activated_at/invoiced_at (0 when None).
_HEAD = struct.Struct("<Bqq")
_LEN = struct.Struct("<I")
_LO, _HI = -(2**63), 2**63 - 1

# Flags.
_DELETED = 1  # SfRecord.lc_deleted / ErpRecord.deleted
_HAS_TIME = 2  # activated_at / invoiced_at is set (else None)
_BASE_IS_TOP = 4  # SfRecord: the fields' stamp is the top stamp
_LC_NONE = 8  # SfRecord: no lifecycle event
_LC_IS_TOP = 16  # SfRecord: the lifecycle stamp is the top stamp
_ID_IS_TOP = 32  # the last applied identity is the top stamp's
_ROUTED = 64  # `routed` is set (else None)
_SHAPED = 128  # the fields as a shape id and a JSON array of values (else JSON text)

_SHAPE_ID = struct.Struct("<I")
MAX_SHAPES = 4096  # per merge shard; records of further shapes freeze their JSON text


class Shapes:
    """The field-name tuples of one merge shard's frozen records, each kept once.

    A record's JSON text spends about half its bytes on field names, the same few
    sets of names for every record of an entity. A frozen record keeps a shape id
    and the JSON array of its values instead (`"Status":"Draft"` becomes
    `"Draft"`), and thaws to its fields dict with the shared name strings. Part of
    the merge state, so snapshots hold the shapes beside the records naming them.
    """

    __slots__ = ("names", "index")

    def __init__(self) -> None:
        self.names: list[tuple[str, ...]] = []
        self.index: dict[tuple[str, ...], int] = {}

    def id_of(self, names: tuple[str, ...]) -> int | None:
        """The id of this tuple of field names (new ones while fewer than MAX_SHAPES)."""
        i = self.index.get(names)
        if i is None:
            if len(self.names) >= MAX_SHAPES:
                return None
            i = self.index[names] = len(self.names)
            self.names.append(names)
        return i

    def __getstate__(self) -> list[tuple[str, ...]]:
        return self.names

    def __setstate__(self, names: list[tuple[str, ...]]) -> None:
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}


# A stamp `(order, identity)`: the order tuple's length, its integers, the
# identity's byte length, then the identity (Salesforce orders have 3 integers,
# ERP orders 1). One struct per order length, made on first use.
_ORDER: dict[int, struct.Struct] = {}


def _order_struct(n: int) -> struct.Struct:
    """The struct of a stamp whose order tuple has `n` integers (made on first use)."""
    s = _ORDER.get(n)
    if s is None:
        s = _ORDER[n] = struct.Struct(f"<b{n}qI")
    return s


def _fits(order: Any) -> bool:
    if type(order) is not tuple or not 0 < len(order) < 128:
        return False
    for v in order:
        if type(v) is not int or not _LO <= v <= _HI:
            return False
    return True


def _encode(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates (JSON may carry them): kept as they are
        return text.encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogatepass")


# An identity's length with this bit set: only the part between the record's
# identity prefix and suffix is written (see `affixes_of`).
_SHORT = 1 << 31


def affixes_of(source: str, entity: str, key: str) -> tuple[str, str]:
    """What every identity of this record's own events starts and ends with.

    A Salesforce event's identity is `sf|<entity>|<transactionKey>|<seq>|<record Ids>`
    and names this record alone in most events; an ERP event's is
    `erp|<table>|<record key>|<lsn>`. Only the middle (`<transactionKey>|<seq>`,
    `<lsn>`) is kept: 28 of a Salesforce identity's ~66 bytes and ~37 of an ERP
    identity's ~46 are the record's own entity and key. Other identities (several
    records, polled images) are kept whole.
    """
    if source == SALESFORCE:
        return f"sf|{entity}|", f"|{key}"
    return f"erp|{entity}|{key}|", ""


def inner_identity(identity: str, affixes: tuple[str, str]) -> str | None:
    """What `identity` holds between `affixes` (prefix, suffix), or None if it lacks them."""
    pre, suf = affixes
    if identity.startswith(pre) and identity.endswith(suf) and len(identity) >= len(pre) + len(suf):
        return identity[len(pre) : len(identity) - len(suf)]
    return None


def _stamp(stamp: tuple, affixes: tuple[str, str]) -> bytes:
    order, identity = stamp
    n = len(order)
    s = _order_struct(n)
    inner = inner_identity(identity, affixes)
    if inner is not None:
        ident = _encode(inner)
        return s.pack(n, *order, len(ident) | _SHORT) + ident
    ident = _encode(identity)
    return s.pack(n, *order, len(ident)) + ident


def _read_stamp(blob: bytes, pos: int, affixes: tuple[str, str]) -> tuple[tuple, int]:
    n = blob[pos]
    s = _order_struct(n)
    values = s.unpack_from(blob, pos)
    pos += s.size
    size = values[-1]
    if size & _SHORT:
        end = pos + (size ^ _SHORT)
        identity = f"{affixes[0]}{_decode(blob[pos:end])}{affixes[1]}"
    else:
        end = pos + size
        identity = _decode(blob[pos:end])
    return (values[1:-1], identity), end


def _text(value: str) -> bytes:
    b = _encode(value)
    return _LEN.pack(len(b)) + b


def _read_text(blob: bytes, pos: int) -> tuple[str, int]:
    (size,) = _LEN.unpack_from(blob, pos)
    pos += 4
    return _decode(blob[pos : pos + size]), pos + size


def _time(value: Any) -> tuple[int, int] | None:
    """(flag, value) of an optional time, None when it does not fit 64 bits."""
    if value is None:
        return 0, 0
    if type(value) is not int or not _LO <= value <= _HI:
        return None
    return _HAS_TIME, value


def freeze(
    rec: SfRecord | ErpRecord, rkey: tuple[str, str, str], fields: dict[str, Any], shapes: Shapes
) -> bytes | None:
    """The cold form of the packed record `rec` at `rkey` (source, entity, key) whose
    fields (or ERP image) are `fields`, or None when its shape does not freeze."""
    affixes = affixes_of(*rkey)
    if type(rec) is SfRecord:
        return _freeze_sf(rec, fields, shapes, affixes)
    return _freeze_erp(rec, fields, shapes, affixes)  # type: ignore[arg-type]


def thaw(rkey: tuple[str, str, str], blob: bytes, shapes: Shapes) -> SfRecord | ErpRecord:
    """The record object at `rkey` (source, entity, key) of a cold form made by `freeze`.

    A record frozen with a shape thaws with its fields (ERP: image) as a dict, the
    form a change needs anyway; one frozen as JSON text thaws packed.
    """
    affixes = affixes_of(*rkey)
    if rkey[0] == SALESFORCE:
        return _thaw_sf(blob, shapes, affixes)
    return _thaw_erp(blob, shapes, affixes)


def _join(
    rec: SfRecord | ErpRecord,
    top: tuple,
    flags: int,
    time: int,
    parts: list[bytes],
    text: str,
    fields: dict[str, Any],
    shapes: Shapes,
) -> bytes:
    """The header, the stamps in `parts`, the last identity, `routed` and the fields:
    a shape id and the JSON array of the values of `fields`, else the JSON `text`."""
    if rec.identity == top[1]:
        flags |= _ID_IS_TOP
    else:
        parts.append(_text(rec.identity))
    if rec.routed is not None:
        flags |= _ROUTED
        parts.append(_text(rec.routed))
    shape = shapes.id_of(tuple(fields))
    values = None
    if shape is not None:
        try:
            values = orjson.dumps(list(fields.values()))
        except TypeError:  # (`text` was dumped from them, so this is not expected)
            values = None
    if values is not None:
        flags |= _SHAPED
        parts.append(_SHAPE_ID.pack(shape))  # type: ignore[arg-type]
        parts.append(values)
    else:
        parts.append(_encode(text))
    parts[0] = _HEAD.pack(flags, rec.event_time, time)
    return b"".join(parts)


def _read_tail(
    blob: bytes, pos: int, flags: int, top: tuple, shapes: Shapes
) -> tuple[str, str | None, str | dict[str, Any]]:
    """The last identity, `routed` and the fields (dict or JSON text) `_join` wrote from `pos`."""
    if flags & _ID_IS_TOP:
        identity = top[1]
    else:
        identity, pos = _read_text(blob, pos)
    routed = None
    if flags & _ROUTED:
        routed, pos = _read_text(blob, pos)
    if flags & _SHAPED:
        (shape,) = _SHAPE_ID.unpack_from(blob, pos)
        values = orjson.loads(memoryview(blob)[pos + 4 :])
        return identity, routed, dict(zip(shapes.names[shape], values, strict=True))
    return identity, routed, _decode(blob[pos:])


def _freeze_sf(
    rec: SfRecord, fields: dict[str, Any], shapes: Shapes, affixes: tuple[str, str]
) -> bytes | None:
    top, base, lc = rec.top, rec.base, rec.lc_stamp
    text = rec.fields
    if rec.stamps is not None or type(text) is not str or top is None or base is None:
        return None
    t = _time(rec.activated_at)
    if t is None or _time(rec.event_time) is None or not _fits(top[0]):
        return None
    flags = t[0] | (_DELETED if rec.lc_deleted else 0)
    parts = [b"", _stamp(top, affixes)]
    if base == top:
        flags |= _BASE_IS_TOP
    elif _fits(base[0]):
        parts.append(_stamp(base, affixes))
    else:
        return None
    if lc is None:
        flags |= _LC_NONE
    elif lc == top:
        flags |= _LC_IS_TOP
    elif _fits(lc[0]):
        parts.append(_stamp(lc, affixes))
    else:
        return None
    return _join(rec, top, flags, t[1], parts, text, fields, shapes)


def _thaw_sf(blob: bytes, shapes: Shapes, affixes: tuple[str, str]) -> SfRecord:
    flags, event_time, time = _HEAD.unpack_from(blob)
    top, pos = _read_stamp(blob, _HEAD.size, affixes)
    if flags & _BASE_IS_TOP:
        base = top
    else:
        base, pos = _read_stamp(blob, pos, affixes)
    if flags & _LC_NONE:
        lc = None
    elif flags & _LC_IS_TOP:
        lc = top
    else:
        lc, pos = _read_stamp(blob, pos, affixes)
    identity, routed, fields = _read_tail(blob, pos, flags, top, shapes)
    rec = SfRecord.__new__(SfRecord)
    rec.fields = fields  # a dict with stamps None is unpacked with `base` for every field
    rec.stamps = None
    rec.base = base
    rec.lc_stamp = lc
    rec.lc_deleted = bool(flags & _DELETED)
    rec.top = top
    rec.event_time = event_time
    rec.identity = identity
    rec.activated_at = time if flags & _HAS_TIME else None
    rec.routed = routed
    return rec


def _freeze_erp(
    rec: ErpRecord, fields: dict[str, Any], shapes: Shapes, affixes: tuple[str, str]
) -> bytes | None:
    top, image = rec.top, rec.image
    if type(image) is not str or rec.del_image is not None or rec.del_lsn != -1:
        return None
    if top is None or rec.image_stamp != top or not _fits(top[0]):
        return None
    t = _time(rec.invoiced_at)
    if t is None or _time(rec.event_time) is None:
        return None
    flags = t[0] | (_DELETED if rec.deleted else 0)
    parts = [b"", _stamp(top, affixes)]
    return _join(rec, top, flags, t[1], parts, image, fields, shapes)


def _thaw_erp(blob: bytes, shapes: Shapes, affixes: tuple[str, str]) -> ErpRecord:
    flags, event_time, time = _HEAD.unpack_from(blob)
    top, pos = _read_stamp(blob, _HEAD.size, affixes)
    identity, routed, image = _read_tail(blob, pos, flags, top, shapes)
    rec = ErpRecord.__new__(ErpRecord)
    rec.image = image
    rec.image_stamp = top
    rec.del_image = None
    rec.del_lsn = -1
    rec.top = top
    rec.deleted = bool(flags & _DELETED)
    rec.event_time = event_time
    rec.identity = identity
    rec.invoiced_at = time if flags & _HAS_TIME else None
    rec.routed = routed
    return rec
