"""Merged state of one record: last writer wins per field (Salesforce), per image (ERP).

CONTRACT §2. The merge stage (`merge.py`) keeps one of these per record it has
seen; between batches they are packed (`pack`) or frozen (`cold.py`).
"""

from __future__ import annotations

from typing import Any

import orjson

from sferp.events import DELETE, LIFECYCLE_OPS, UPSERT, Change

from .slots import compact_pickle


@compact_pickle
class SfRecord:
    """Merged state of one Salesforce record.

    Between batches a record is packed (`pack`): its fields are kept as the
    compact JSON text its `records` row was rendered from, and when every field
    was set by the same change, one `base` stamp replaces the per-field stamps.
    That is a third of the memory of live dicts; `apply` unpacks on demand.
    """

    __slots__ = (
        "fields",
        "stamps",
        "base",
        "lc_stamp",
        "lc_deleted",
        "top",
        "event_time",
        "identity",
        "activated_at",
        "routed",
    )

    def __init__(self) -> None:
        self.fields: dict[str, Any] | str = {}  # str: packed (compact JSON)
        self.stamps: dict[str, tuple] | None = {}  # field -> (order, identity) that set it
        self.base: tuple | None = None  # packed: the stamp of every field (stamps is None)
        self.lc_stamp: tuple | None = None  # latest lifecycle event
        self.lc_deleted = False
        self.top: tuple | None = None  # latest applied event of any kind
        self.event_time = 0
        self.identity = ""
        self.activated_at: int | None = None
        self.routed: str | None = None  # where its fact was last sent (OrderItem: OrderId)

    def apply(self, ch: Change) -> None:
        """Merge one change (CONTRACT §2, docs/semantics.md §3)."""
        stamp = (ch.order, ch.identity)
        if ch.fields and self.top is None and not self.fields:
            # A new record (most changes of a backlog): every field is from this
            # change, so it starts in the packed form's one stamp for all fields.
            self.fields = dict(ch.fields)
            self.stamps = None
            self.base = stamp
        elif ch.fields:
            fields, stamps = self.unpacked()
            if self.top is None or stamp > self.top:  # newer than every field: all win
                fields.update(ch.fields)
                stamps.update(dict.fromkeys(ch.fields, stamp))
            else:
                for name, value in ch.fields.items():
                    old = stamps.get(name)
                    if old is None or stamp > old:
                        fields[name] = value
                        stamps[name] = stamp
        if (
            ch.fields
            and ch.fields.get("Status") == "Activated"
            and (self.activated_at is None or ch.event_time < self.activated_at)
        ):
            self.activated_at = ch.event_time
        if ch.op in LIFECYCLE_OPS and (self.lc_stamp is None or stamp > self.lc_stamp):
            self.lc_stamp = stamp
            self.lc_deleted = ch.op == DELETE
        if self.top is None or stamp > self.top:
            self.top = stamp
            self.event_time = ch.event_time
        self.identity = ch.identity

    @property
    def live(self) -> bool:
        """Present and not deleted."""
        return not self.lc_deleted

    def unpacked(self) -> tuple[dict[str, Any], dict[str, tuple]]:
        """The fields and their stamps as dicts (unpacking a packed record)."""
        fields = self.fields
        if type(fields) is str:
            fields = self.fields = orjson.loads(fields)
        stamps = self.stamps
        if stamps is None:
            stamps = self.stamps = dict.fromkeys(fields, self.base)
        return fields, stamps  # type: ignore[return-value]

    def pack(self, text: str) -> None:
        """Keep the fields as `text` (their compact JSON) until the next change."""
        self.fields = text
        stamps = self.stamps
        if stamps:
            it = iter(stamps.values())
            first = next(it)
            for v in it:
                if v is not first:
                    return
            self.base = first
            self.stamps = None


@compact_pickle
class ErpRecord:
    """Merged state of one ERP row: the image with the highest lsn wins."""

    __slots__ = (
        "image",
        "image_stamp",
        "del_image",
        "del_lsn",
        "top",
        "deleted",
        "event_time",
        "identity",
        "invoiced_at",
        "routed",
    )

    def __init__(self) -> None:
        self.image: dict[str, Any] | str | None = None  # str: packed (compact JSON)
        self.image_stamp: tuple = ()
        self.del_image: dict[str, Any] | str | None = None
        self.del_lsn = -1
        self.top: tuple | None = None
        self.deleted = False
        self.event_time = 0
        self.identity = ""
        self.invoiced_at: int | None = None
        self.routed: str | None = None

    def apply(self, ch: Change) -> None:
        """Merge one change."""
        lsn = ch.order[0]
        stamp = (ch.order, ch.identity)
        if ch.op == UPSERT:
            if self.image is None or stamp > self.image_stamp:
                self.image = ch.fields
                self.image_stamp = stamp
            if (ch.fields or {}).get("status") == "INVOICED" and (
                self.invoiced_at is None or ch.event_time < self.invoiced_at
            ):
                self.invoiced_at = ch.event_time
        elif self.del_image is None or lsn > self.del_lsn:
            self.del_image = ch.fields or {}
            self.del_lsn = lsn
        if self.top is None or stamp > self.top:
            self.top = stamp
            self.deleted = ch.op == DELETE
            self.event_time = ch.event_time
        self.identity = ch.identity

    @property
    def live(self) -> bool:
        """Present and not deleted."""
        return not self.deleted

    def current_fields(self) -> dict[str, Any]:
        """The row's last image (a deleted row keeps it)."""
        image = self.image if self.image is not None else self.del_image
        if image is None:
            return {}
        if type(image) is str:
            return orjson.loads(image)  # type: ignore[no-any-return]
        return image

    def pack(self, text: str) -> None:
        """Keep the current image as `text` (its compact JSON); images are replaced whole."""
        if self.image is not None:
            self.image = text
        elif self.del_image is not None:
            self.del_image = text
