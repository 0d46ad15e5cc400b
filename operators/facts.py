"""Messages passed between the stateful stages of the reconcile flow.

Every fact carries the *current* state of what it describes (never a delta), so
a receiver replaces what it stored under the fact's id. Replays, duplicates and
late events therefore cannot double count (DESIGN.md, "incremental views must
be idempotent and retraction-safe"). A fact with `live=False` retracts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# Payload kinds on the wire between stages: (kind, body).
CHANGES = 0  # to merge shards: (CHANGES, (topic, partition), changes, clock stamps)
TICK = 1  # to merge shards: (TICK, {(topic, partition): clock_ms}) after each decode batch
FACTS = 2  # to order/product/sku shards: (FACTS, [fact, ...])
GLOBAL_IN = 3  # to the coordinator: (GLOBAL_IN, GlobalInput)


class OrderFact(NamedTuple):
    """A Salesforce Order as the order stage needs it."""

    order_id: str
    live: bool
    status: Any
    account_id: Any
    order_number: Any
    total: Any
    activated_at: int | None
    event_time: int
    identity: str


class ItemFact(NamedTuple):
    """A Salesforce OrderItem, sent to the shard of its OrderId."""

    item_id: str
    order_id: str
    live: bool
    product_id: str | None
    quantity: Any
    event_time: int
    identity: str


class ErpOrderFact(NamedTuple):
    """An ERP sales order, sent to the shard of the Salesforce Order it names."""

    record_key: str
    order_no: str
    sf_order_id: str  # normalised to 18 characters
    live: bool
    status: Any
    total: Any
    lsn: int
    invoiced_at: int | None
    event_time: int
    identity: str


class ProductFact(NamedTuple):
    """A Salesforce Product2's sku (None when deleted or without a text ProductCode)."""

    product_id: str
    sku: str | None
    event_time: int
    identity: str


class DemandFact(NamedTuple):
    """One Order's contribution to one product: open quantity, and whether it has live items."""

    product_id: str
    order_id: str
    quantity: Any  # Decimal
    has_items: bool
    event_time: int
    identity: str


class SkuDemandFact(NamedTuple):
    """One product's total contribution to the sku it maps to."""

    sku: str
    product_id: str
    quantity: Any  # Decimal
    has_items: bool
    event_time: int
    identity: str


class InventoryFact(NamedTuple):
    """An ERP inventory row (sku, warehouse)."""

    sku: str
    record_key: str
    live: bool
    on_hand: Any
    allocated: Any
    event_time: int
    identity: str


class ErpItemFact(NamedTuple):
    """An ERP item master row: whether the sku has a live item."""

    sku: str
    live: bool
    event_time: int
    identity: str


class ExceptionFact(NamedTuple):
    """The current state of one reconciliation exception.

    `lineage`: the identities of the source events behind this state, by source
    (`{"salesforce": ..., "erp": ...}`), as the reconciled.exceptions value carries it.
    """

    kind: str
    key: str
    open: bool
    detail: str
    event_time: int
    lineage: dict[str, str] | None = None


class HandoffCandidate(NamedTuple):
    """An Activated, unlinked Order (activated_at known), or its retraction.

    `lineage`: the order row's source events (the HANDOFF_OVERDUE exception's lineage).
    """

    order_id: str
    activated_at: int | None  # None retracts
    lineage: dict[str, str] | None = None


class GlobalInput(NamedTuple):
    """Everything a stage hands to the single coordinator for one batch."""

    stats: dict[str, list[int]]  # topic -> [consumed, applied, duplicates, late, dead, ignored]
    clock: int | None  # largest event time seen (decode batches only)
    dead_letters: list[Any]
    rows: dict[str, dict[tuple, tuple | None]]  # view table -> pk -> row (None deletes)
    exceptions: list[ExceptionFact]
    handoffs: list[HandoffCandidate]
    kafka: list[tuple[str, bytes, bytes | None]]  # (topic, key, value) ready to send
    # partition -> its clock after this decode batch (for the metrics probe: the
    # router ticks the merge shards only when a clock enters a new minute)
    clocks: dict[tuple[str, int], int] | None = None


def empty_global() -> GlobalInput:
    """A GlobalInput with nothing in it."""
    return GlobalInput({}, None, [], {}, [], [], [])
