"""The cold form of an orders-stage node: one `bytes` object per Order Id between batches.

An `OrderNode` holds an Order, its items, the ERP orders naming it, its last row
and its demand per product: about 40 small objects (dicts, facts, strings,
Decimals) and 2.3 KB on an initial load. Most orders are not touched again for a
long time, so the orders stage keeps a node that is not among the ones it
rendered last (`views.WARM_NODES`) as the `marshal` text of its values
(Decimals as their exact text, facts as plain tuples, the Id that keys the node
left out, and of each fact's identity only what the Order Id, the ERP record
key and lsn do not already say): about 380 bytes. The stage thaws a node when a
fact touches it, so the view logic only ever sees objects; freezing and thawing
cost about 2 and 3 µs (more for a node long out of the CPU's caches).

`marshal` is Python's own serialiser for code constants: exact for `str`,
`int`, `float` (bits and sign), `bool`, `None`, tuples, lists, dicts and sets,
and written in C. A node holding anything else (a fact built by hand with
another type) stays an object; both forms may sit in one shard, and snapshots
hold either.
"""

from __future__ import annotations

import marshal
from decimal import Decimal
from typing import Any

from sferp.events import SALESFORCE

from .cold import affixes_of, inner_identity
from .facts import ErpOrderFact, OrderFact
from .numbers import ZERO

# shared by every order without orphan exceptions (216 bytes each otherwise)
NO_ORPHANS: frozenset[str] = frozenset()


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _undec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _order_identity(identity: str, oid: str) -> str | tuple[str]:
    """`sf|Order|<middle>|<oid>` as `(middle,)` (28 bytes less), any other identity whole."""
    inner = inner_identity(identity, affixes_of(SALESFORCE, "Order", oid))
    return identity if inner is None else (inner,)


def _erp_identity(e: ErpOrderFact) -> str | None:
    """None for the identity `erp|sales_orders|<record key>|<lsn>` (derived on thaw)."""
    if e.identity == f"erp|sales_orders|{e.record_key}|{e.lsn}":
        return None
    return e.identity


def freeze(node: Any) -> bytes | None:
    """The cold form of an `OrderNode`, or None when a value does not marshal."""
    o = node.order
    row = node.row
    if row is not None:  # the two Decimal amounts as text
        row = (*row[:7], _dec(row[7]), _dec(row[8]), *row[9:])
    demand = node.demand
    try:
        return marshal.dumps(
            (
                # order_id is the node's key
                None if o is None else (*o[1:8], _order_identity(o.identity, o.order_id)),
                node.items,
                # sf_order_id (index 2) is the node's key too
                [(*e[:2], *e[3:9], _erp_identity(e)) for e in node.erp.values()],
                row,
                node.row_updated,
                node.mismatch,
                tuple(node.orphans) if node.orphans else None,
                node.handoff,
                {pid: (str(q), has) for pid, (q, has) in demand.items()} if demand else None,
                node.updated,
            )
        )
    except ValueError:  # an unmarshallable value
        return None


def thaw(oid: str, blob: bytes, node: Any) -> Any:
    """Fill `node` (a blank `OrderNode`) from the cold form `blob` of Order `oid`; return it."""
    o, items, erp, row, row_updated, mismatch, orphans, handoff, demand, updated = marshal.loads(
        blob
    )
    if o is None:
        order = None
    else:
        if type(o[7]) is str:
            ident = o[7]
        else:
            pre, suf = affixes_of(SALESFORCE, "Order", oid)
            ident = f"{pre}{o[7][0]}{suf}"
        order = OrderFact(oid, *o[:7], ident)
    node.order = order
    node.items = items
    node.erp = {
        e[0]: ErpOrderFact(
            e[0], e[1], oid, *e[2:8], f"erp|sales_orders|{e[0]}|{e[5]}" if e[8] is None else e[8]
        )
        for e in erp
    }
    node._total_raw = node._total = None
    if row is not None:
        total = _undec(row[7])
        row = (*row[:7], total, _undec(row[8]), *row[9:])
        if order is not None:  # the row's Salesforce amount is money(order.total)
            node._total_raw, node._total = order.total, total
    node.row = row
    node.row_updated = row_updated
    node.mismatch = mismatch
    node.orphans = NO_ORPHANS if orphans is None else set(orphans)
    node.handoff = handoff
    node.demand = (
        {}
        if demand is None
        else {pid: (ZERO if q == "0" else Decimal(q), has) for pid, (q, has) in demand.items()}
    )
    node.updated = updated
    return node
