"""Incremental view maintenance: the joins behind order_status and inventory_live.

Three sharded stages, each keeping contributions under the id that produced
them (so a replay, a duplicate or a late event replaces instead of adding):

- orders   (key: Salesforce Order Id): the Order, its OrderItems and the ERP
  sales orders naming it → the order row, the link, AMOUNT_MISMATCH,
  ORPHAN_ERP_ORDER, hand-off candidates, and demand per (order, product);
- products (key: Product2 Id): the product's sku and the demand of every order
  for it → one total per product, sent to its sku;
- skus     (key: sku): ERP inventory rows, the ERP item and product demand →
  the inventory row and UNKNOWN_SKU.

Each stage renders only what changed in a batch and emits a row only when it
differs from the one it emitted before.
"""

from __future__ import annotations

from decimal import Decimal
from itertools import islice
from typing import Any

from .cold_orders import NO_ORPHANS, freeze, thaw
from .decode_common import dumps_compact, loads_exact
from .facts import (
    FACTS,
    GLOBAL_IN,
    DemandFact,
    ErpItemFact,
    ErpOrderFact,
    ExceptionFact,
    GlobalInput,
    HandoffCandidate,
    InventoryFact,
    ItemFact,
    OrderFact,
    ProductFact,
    SkuDemandFact,
)
from .numbers import ZERO, money, to_decimal, whole
from .routing import GLOBAL, PRODUCTS, SKUS, shard
from .slots import compact_pickle

Out = list[tuple[str, tuple]]

# Order nodes kept as objects per orders shard after their render (about 2.3 KB
# each, so at most ~38 MB over 32 shards); the rest are cold.
WARM_NODES = 512


_CENT = Decimal("0.01")


def _lineage(**ids: str) -> dict[str, str]:
    return {k: v for k, v in ids.items() if v}


def _order_lineage(order: Any, link: Any) -> dict[str, str]:
    """An order row's lineage: its Salesforce Order's and its linked ERP order's events.
    Built only when something carrying it is sent (a changed row, exception or hand-off)."""
    return _lineage(
        salesforce=order.identity if order is not None else None,
        erp=link.identity if link is not None else None,
    )


def _global(rows: dict, exceptions: list, handoffs: list | None = None) -> tuple[str, tuple]:
    return (GLOBAL, (GLOBAL_IN, GlobalInput({}, None, [], rows, exceptions, handoffs or [], [])))


@compact_pickle
class OrderNode:
    """Everything known about one Salesforce Order Id."""

    __slots__ = (
        "order",
        "items",
        "erp",
        "row",
        "row_updated",
        "mismatch",
        "orphans",
        "handoff",
        "demand",
        "updated",
        "_total_raw",
        "_total",
    )

    def __init__(self) -> None:
        self.order: OrderFact | None = None
        self.row_updated = 0
        self.updated = 0  # latest event time of anything that touched the order
        self._total_raw: Any = None
        self._total: Decimal | None = None
        # live items only: item Id -> (Product2Id, Quantity), the two fields the views read
        # (a whole ItemFact would keep its identity and event time alive for nothing)
        self.items: dict[str, tuple[str | None, Any]] = {}
        self.erp: dict[str, ErpOrderFact] = {}  # live ERP orders naming this Id
        self.row: tuple | None = None  # last emitted order_status row
        self.mismatch = False
        # order_no keys with an open orphan exception (one shared empty set when none)
        self.orphans: frozenset[str] | set[str] = NO_ORPHANS
        self.handoff: int | None = None  # activated_at of the emitted candidate
        self.demand: dict[str, tuple[Decimal, bool]] = {}  # product -> (qty, has_items)

    def _after_load(self) -> None:
        """Snapshots written before items were kept as pairs hold whole ItemFacts."""
        items = self.items
        for item_id, item in items.items():
            if type(item) is ItemFact:
                items[item_id] = (item.product_id, item.quantity)

    def money(self, raw: Any) -> Decimal | None:
        """`TotalAmount` rounded, converted once per distinct value."""
        if raw != self._total_raw or self._total is None:
            self._total_raw, self._total = raw, money(raw)
        return self._total

    def empty(self) -> bool:
        """Nothing left to remember."""
        return (
            self.order is None
            and not self.items
            and not self.erp
            and self.row is None
            and not self.orphans
            and not self.demand
            and self.handoff is None
            and not self.mismatch
        )


def _touch(nodes: dict[str, Any], oid: str) -> OrderNode:
    """The node of `oid` as an object: new, or thawed from its cold form."""
    node = nodes.get(oid)
    if node is None:
        node = nodes[oid] = OrderNode()
    elif type(node) is bytes:
        node = nodes[oid] = thaw(oid, node, OrderNode.__new__(OrderNode))
    return node  # type: ignore[no-any-return]


def _link(erp: dict[str, ErpOrderFact]) -> ErpOrderFact | None:
    """CONTRACT §2: the non-CANCELLED order with the highest lsn, else the highest lsn."""
    best = None
    for e in erp.values():
        rank = (e.status != "CANCELLED", e.lsn, e.record_key)
        if best is None or rank > best[0]:
            best = (rank, e)
    return None if best is None else best[1]


class OrdersStage:
    """The orders stage of one shard (no Bytewax here: testable directly)."""

    def __init__(self, state: dict[str, OrderNode | bytes], warm_nodes: int = WARM_NODES) -> None:
        self.nodes = state  # a node is cold (bytes) unless recently rendered or unfreezable
        # The `warm_nodes` nodes rendered last stay objects, least recent first: most
        # orders are touched again within a few batches (an item, the ERP order, a
        # status), and thawing and freezing cost ~3 µs each (measured on the
        # benchmark's stream: 96,000 thaws per 500,000 messages without, 1,100 with).
        self._warm: dict[str, OrderNode] = {}
        self._warm_nodes = warm_nodes

    def process(self, payloads: list[tuple]) -> Out:
        """Apply fact batches; return routed outputs."""
        nodes = self.nodes
        dirty: dict[str, OrderNode] = {}
        for _, facts in payloads:
            for f in facts:
                if isinstance(f, OrderFact):
                    oid = f.order_id
                    node = dirty.get(oid) or _touch(nodes, oid)
                    node.order = f
                elif isinstance(f, ItemFact):
                    oid = f.order_id
                    node = dirty.get(oid) or _touch(nodes, oid)
                    if f.live:
                        node.items[f.item_id] = (f.product_id, f.quantity)
                    else:
                        node.items.pop(f.item_id, None)
                else:  # ErpOrderFact
                    oid = f.sf_order_id
                    node = dirty.get(oid) or _touch(nodes, oid)
                    if f.live:
                        node.erp[f.record_key] = f
                    else:
                        node.erp.pop(f.record_key, None)
                if f.event_time > node.updated:
                    node.updated = f.event_time
                dirty[oid] = node
        rows: dict[tuple, tuple | None] = {}
        exceptions: list[ExceptionFact] = []
        handoffs: list[HandoffCandidate] = []
        demand_out: dict[str, list[DemandFact]] = {}
        warm = self._warm
        for oid, node in dirty.items():
            self._render(oid, node, rows, exceptions, handoffs, demand_out)
            warm.pop(oid, None)
            if node.empty():
                del nodes[oid]
            else:
                warm[oid] = node
        excess = len(warm) - self._warm_nodes
        if excess > 0:  # the least recent go cold (cold_orders.py)
            for oid in list(islice(warm, excess)):
                nodes[oid] = freeze(warm.pop(oid)) or nodes[oid]
        out: Out = [(dest, (FACTS, lst)) for dest, lst in demand_out.items()]
        if rows or exceptions or handoffs:
            out.append(_global({"order_status": rows}, exceptions, handoffs))
        return out

    @staticmethod
    def _render(
        oid: str,
        node: OrderNode,
        rows: dict,
        exceptions: list[ExceptionFact],
        handoffs: list[HandoffCandidate],
        demand_out: dict[str, list[DemandFact]],
    ) -> None:
        o = node.order
        live = o is not None and o.live
        erp = node.erp
        link = _link(erp) if erp else None
        updated = node.updated
        # order_status row (without updated_at and lineage, which only inform)
        row = None
        mismatch = False
        if live:
            sf_total = node.money(o.total)
            status = o.status
            if link is not None:
                erp_total = money(link.total)
                matches = (
                    None
                    if sf_total is None or erp_total is None
                    else abs(sf_total - erp_total) <= _CENT
                )
                mismatch = matches is False
                invoiced = link.invoiced_at
                erp_status = link.status
                stage = (
                    "CANCELLED"
                    if status == "Cancelled" or erp_status == "CANCELLED"
                    else (_str_or_none(erp_status))
                )
                erp_no = link.order_no
            else:
                erp_total = matches = invoiced = erp_status = erp_no = None
                if status == "Cancelled":
                    stage = "CANCELLED"
                elif status == "Activated":
                    stage = "BOOKED"
                else:
                    stage = "DRAFT"
            activated = o.activated_at
            q2c = (
                (invoiced - activated) / 1000.0
                if invoiced is not None and activated is not None
                else None
            )
            row = (
                oid,
                _str_or_none(o.order_number),
                _str_or_none(o.account_id),
                erp_no,
                _str_or_none(status),
                _str_or_none(erp_status),
                stage,
                sf_total,
                erp_total,
                matches,
                activated,
                invoiced,
                q2c,
            )
        old = node.row
        if row != old or (row is not None and updated != node.row_updated):
            if row is None:
                rows[(oid,)] = None
            else:
                rows[(oid,)] = (*row, updated, _order_lineage(o, link), row != old)
            node.row = row
            node.row_updated = updated
        # AMOUNT_MISMATCH
        if mismatch != node.mismatch or (mismatch and row != old):
            detail = (
                f"Salesforce {row[7]} vs ERP {row[8]} ({link.order_no})"
                if mismatch
                else "amounts agree or order no longer linked"
            )
            exceptions.append(
                ExceptionFact(
                    "AMOUNT_MISMATCH", oid, mismatch, detail, updated, _order_lineage(o, link)
                )
            )
            node.mismatch = mismatch
        # ORPHAN_ERP_ORDER: live ERP orders naming an Order that is not live
        if not live or node.orphans:
            orphans = NO_ORPHANS if live or not erp else set(erp)
            # sorted: a set's order changes when a cold node thaws (its set is rebuilt)
            for rk in sorted(orphans - node.orphans):
                e = erp[rk]
                exceptions.append(
                    ExceptionFact(
                        "ORPHAN_ERP_ORDER",
                        e.order_no,
                        True,
                        # (a non-text sf_order_id is keyed as "\x00" + its JSON: not shown)
                        f"sf_order_id {oid.removeprefix(chr(0))} names no live Salesforce Order",
                        e.event_time,
                        _lineage(erp=e.identity, salesforce=o.identity if o else None),
                    )
                )
            for rk in sorted(node.orphans - orphans):
                exceptions.append(
                    ExceptionFact(
                        "ORPHAN_ERP_ORDER",
                        _order_no_of(rk),
                        False,
                        "resolved",
                        updated,
                        _lineage(salesforce=o.identity if o else None),
                    )
                )
            node.orphans = orphans
        # hand-off candidate
        cand = (
            o.activated_at
            if live and o.status == "Activated" and link is None and o.activated_at is not None
            else None
        )
        if cand != node.handoff:
            handoffs.append(HandoffCandidate(oid, cand, _order_lineage(o, link)))
            node.handoff = cand
        # demand per product
        demand: dict[str, tuple[Decimal, bool]] = {}
        if live and node.items:
            open_demand = o.status == "Activated" and link is None
            for pid, quantity in node.items.values():
                if not pid:
                    continue
                prev = demand.get(pid)
                qty = prev[0] if prev is not None else ZERO
                if open_demand:
                    q = to_decimal(quantity)
                    if q is not None:
                        qty += q
                demand[pid] = (qty, True)
        if demand != node.demand:
            ident = o.identity if o is not None else ""
            old_demand = node.demand
            for pid, new in demand.items():
                if new != old_demand.get(pid):
                    demand_out.setdefault(shard(PRODUCTS, pid), []).append(
                        DemandFact(pid, oid, new[0], new[1], updated, ident)
                    )
            for pid in old_demand:
                if pid not in demand:
                    demand_out.setdefault(shard(PRODUCTS, pid), []).append(
                        DemandFact(pid, oid, ZERO, False, updated, ident)
                    )
            node.demand = demand


def _order_no_of(record_key: str) -> str:
    v = loads_exact(record_key).get("order_no")
    return v if isinstance(v, str) else str(v)


def _str_or_none(v: Any) -> str | None:
    """A VARCHAR cell: strings as they are, other JSON values as compact JSON."""
    if v is None:
        return None
    return v if isinstance(v, str) else dumps_compact(v)


@compact_pickle
class ProductNode:
    """One Product2 Id: its sku and the open demand of every order for it."""

    __slots__ = ("sku", "demand", "total", "with_items", "sent_sku", "sent", "event_time", "ident")

    def __init__(self) -> None:
        self.sku: str | None = None
        self.demand: dict[str, tuple[Decimal, bool]] = {}
        self.total = ZERO
        self.with_items = 0
        self.sent_sku: str | None = None
        self.sent: tuple[Decimal, bool] | None = None
        self.event_time = 0
        self.ident = ""


class ProductsStage:
    """The products stage of one shard."""

    def __init__(self, state: dict[str, ProductNode]) -> None:
        self.nodes = state

    def process(self, payloads: list[tuple]) -> Out:
        """Apply fact batches; return routed outputs."""
        nodes = self.nodes
        dirty: dict[str, ProductNode] = {}
        for _, facts in payloads:
            for f in facts:
                pid = f.product_id
                node = nodes.get(pid) or nodes.setdefault(pid, ProductNode())
                if isinstance(f, ProductFact):
                    node.sku = f.sku
                else:  # DemandFact: replace this order's contribution
                    old = node.demand.pop(f.order_id, None)
                    if old is not None:
                        node.total -= old[0]
                        node.with_items -= old[1]
                    if f.has_items or f.quantity:
                        node.demand[f.order_id] = (f.quantity, f.has_items)
                        node.total += f.quantity
                        node.with_items += f.has_items
                if f.event_time >= node.event_time:
                    node.event_time = f.event_time
                    node.ident = f.identity
                dirty[pid] = node
        out: dict[str, list[SkuDemandFact]] = {}
        for pid, node in dirty.items():
            now = (node.total, node.with_items > 0) if node.sku is not None else None
            if node.sent_sku is not None and (node.sent_sku != node.sku or now is None):
                out.setdefault(shard(SKUS, node.sent_sku), []).append(
                    SkuDemandFact(node.sent_sku, pid, ZERO, False, node.event_time, node.ident)
                )
                node.sent_sku, node.sent = None, None
            if now is not None and now != node.sent and (node.sent is not None or any(now)):
                out.setdefault(shard(SKUS, node.sku), []).append(
                    SkuDemandFact(node.sku, pid, now[0], now[1], node.event_time, node.ident)
                )
                node.sent_sku, node.sent = node.sku, now
            if node.sku is None and not node.demand and node.sent_sku is None:
                del nodes[pid]
        return [(dest, (FACTS, lst)) for dest, lst in out.items()]


def _erp_position(identity: str) -> int:
    """The log position an ERP identity ends with (`erp|<table>|<key>|<lsn>`); -1 if none."""
    try:
        return int(identity.rpartition("|")[2])
    except ValueError:
        return -1


def _latest_erp(current: str, new: str) -> str:
    """The identity of the later ERP event: an sku row's lineage names the latest one
    (CONTRACT §3.2), whichever of its item and inventory rows arrived last. Debezium's
    lsn orders the changes of all tables of one database."""
    if not current or _erp_position(new) >= _erp_position(current):
        return new
    return current


@compact_pickle
class SkuNode:
    """One sku: ERP inventory rows, the ERP item, and Salesforce demand per product."""

    __slots__ = (
        "inventory",
        "on_hand",
        "allocated",
        "item_live",
        "demand",
        "demand_total",
        "unknown_from",
        "row",
        "unknown",
        "updated",
        "erp_ident",
        "sf_ident",
    )

    def __init__(self) -> None:
        self.inventory: dict[str, tuple[Decimal, Decimal]] = {}
        self.on_hand = ZERO
        self.allocated = ZERO
        self.item_live = False
        self.demand: dict[str, Decimal] = {}
        self.demand_total = ZERO
        self.unknown_from: set[str] = set()  # products with live items of live orders
        self.row: tuple | None = None
        self.unknown = False
        self.updated = 0
        self.erp_ident = ""
        self.sf_ident = ""


class SkusStage:
    """The skus stage of one shard: inventory_live rows and UNKNOWN_SKU."""

    def __init__(self, state: dict[str, SkuNode]) -> None:
        self.nodes = state

    def process(self, payloads: list[tuple]) -> Out:
        """Apply fact batches; return routed outputs."""
        nodes = self.nodes
        dirty: dict[str, SkuNode] = {}
        for _, facts in payloads:
            for f in facts:
                sku = f.sku
                node = nodes.get(sku) or nodes.setdefault(sku, SkuNode())
                if isinstance(f, InventoryFact):
                    old = node.inventory.pop(f.record_key, None)
                    if old is not None:
                        node.on_hand -= old[0]
                        node.allocated -= old[1]
                    if f.live:
                        new = (to_decimal(f.on_hand) or ZERO, to_decimal(f.allocated) or ZERO)
                        node.inventory[f.record_key] = new
                        node.on_hand += new[0]
                        node.allocated += new[1]
                    node.erp_ident = _latest_erp(node.erp_ident, f.identity)
                elif isinstance(f, ErpItemFact):
                    node.item_live = f.live
                    node.erp_ident = _latest_erp(node.erp_ident, f.identity)
                else:  # SkuDemandFact
                    old_q = node.demand.pop(f.product_id, None)
                    if old_q is not None:
                        node.demand_total -= old_q
                    if f.quantity:
                        node.demand[f.product_id] = f.quantity
                        node.demand_total += f.quantity
                    if f.has_items:
                        node.unknown_from.add(f.product_id)
                    else:
                        node.unknown_from.discard(f.product_id)
                    if f.identity:
                        node.sf_ident = f.identity
                if f.event_time > node.updated:
                    node.updated = f.event_time
                dirty[sku] = node
        rows: dict[tuple, tuple | None] = {}
        exceptions: list[ExceptionFact] = []
        for sku, node in dirty.items():
            demand = whole(node.demand_total)
            row = None
            if node.inventory or demand > 0:
                on_hand, allocated = whole(node.on_hand), whole(node.allocated)
                row = (
                    sku,
                    on_hand,
                    allocated,
                    demand,
                    on_hand - allocated - demand,
                    node.updated,
                    _lineage(erp=node.erp_ident, salesforce=node.sf_ident),
                )
            if row != node.row:
                rows[(sku,)] = _flagged(row, node.row)
                node.row = row
            unknown = bool(node.unknown_from) and not node.item_live
            if unknown != node.unknown:
                exceptions.append(
                    ExceptionFact(
                        "UNKNOWN_SKU",
                        sku,
                        unknown,
                        f"ordered in Salesforce ({len(node.unknown_from)} product(s)) "
                        "but no live ERP item"
                        if unknown
                        else "ERP item exists or no longer ordered",
                        node.updated,
                        # the sku row's lineage (the row is gone when nothing is stocked)
                        row[-1]
                        if row is not None
                        else _lineage(erp=node.erp_ident, salesforce=node.sf_ident),
                    )
                )
                node.unknown = unknown
            if (
                not node.inventory
                and not node.demand
                and not node.unknown_from
                and not node.item_live
                and node.row is None
                and not node.unknown
            ):
                del nodes[sku]
        if rows or exceptions:
            return [_global({"inventory_live": rows}, exceptions)]
        return []


def _flagged(new: tuple | None, old: tuple | None) -> tuple | None:
    """The row with a trailing flag: True when a column other than updated_at and
    lineage (its last two) changed, i.e. when downstream Kafka consumers must hear of it."""
    if new is None:
        return None
    return (*new, old is None or new[:-2] != old[:-2])
