"""The business behind the synthetic change stream: a discrete-event simulation of an order desk.

Salesforce and the ERP are simulated as they behave in a real quote-to-cash
process. Each order is a small process (a Python generator) that sleeps for
simulated durations between its steps: Draft -> items -> Activated -> ERP OPEN
-> ALLOCATED -> SHIPPED -> INVOICED, with the detours real operations take
(cancellations on either side, amount mismatches, hand-offs picked up late or
never, re-created ERP orders, deletes and undeletes, late-delivered partial
updates). Background processes maintain the catalogue, stock and accounts and
add unrelated CRM traffic (Lead, Contact) and gap events. A heap schedules all
processes in event-time order, so commit timestamps and LSNs grow with the
simulated clock.

Only the simulation's own seeded RNG is used, never Python's `hash()` or the
wall clock, so a seed always gives the same stream.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Generator, Iterator
from typing import Any

from sferp.generator_forms import (
    ORIGIN_API,
    ORIGIN_SOAP,
    ORIGIN_UI,
    ErpEncoder,
    FastRandom,
    IdFactory,
    SfEncoder,
    iso_date,
    iso_ms,
)

__all__ = ["Simulation", "Emitted"]

# (role, key, value, label, event time in ms)
Emitted = tuple[str, bytes | None, bytes | None, str, int]
_Proc = Generator[int, None, None]

S = 1000
MIN = 60 * S

_WAREHOUSES = ("DAL1", "RNO1", "ATL2", "CMH1")
_FAMILIES = ("Hardware", "Consumables", "Spare Parts", "Accessories", "Tools")
_NOUNS = (
    "Bracket",
    "Valve",
    "Sensor",
    "Pump",
    "Filter",
    "Gasket",
    "Controller",
    "Cable",
    "Bearing",
    "Hinge",
    "Panel",
    "Switch",
    "Relay",
    "Coupling",
    "Nozzle",
)
_ADJECTIVES = ("Steel", "Compact", "Heavy-Duty", "Industrial", "Mini", "Pro", "Marine", "Smart")
_COMPANY_A = ("Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Tyrell", "Cyberdyne")
_COMPANY_A += ("Hooli", "Vandelay", "Soylent", "Wonka", "Gringotts", "Monarch", "Oscorp")
_COMPANY_B = ("Industries", "Logistics", "Manufacturing", "Supply", "Systems", "Holdings", "GmbH")
_FIRST = ("Ada", "Grace", "Alan", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances")
_LAST = ("Lovelace", "Hopper", "Turing", "Torvalds", "Hamilton", "Ritchie", "Liskov", "Allen")
_CITIES = (("Dallas", "TX"), ("Reno", "NV"), ("Atlanta", "GA"), ("Columbus", "OH"), ("Boise", "ID"))
_LEAD_STATUS = ("Open - Not Contacted", "Working - Contacted", "Closed - Not Converted")

# Order scenarios: the main path, chosen once per order.
_MAIN = (
    ("normal", 0.835),
    ("stay_draft", 0.04),
    ("draft_delete", 0.01),
    ("draft_delete_undelete", 0.01),
    ("sf_cancel_before", 0.02),
    ("sf_cancel_after", 0.015),
    ("erp_cancel", 0.01),
    ("erp_cancel_purge", 0.005),
    ("erp_recreate", 0.015),
    ("never_picked", 0.01),
    ("late_pickup", 0.03),
)
# Independent detours and their probabilities.
_FLAGS = (
    ("mismatch", 0.03),
    ("penny", 0.01),
    ("late_partial", 0.02),
    ("item_delete", 0.02),
    ("short_ids", 0.02),
    ("gap", 0.003),
)
# The first orders cover every scenario (every other order), so that even a
# small run contains each kind of event.
_COVERAGE: tuple[tuple[str, frozenset[str]], ...] = (
    ("stay_draft", frozenset()),
    ("draft_delete_undelete", frozenset({"late_partial"})),
    ("sf_cancel_before", frozenset()),
    ("erp_recreate", frozenset({"short_ids"})),
    ("never_picked", frozenset()),
    ("late_pickup", frozenset({"mismatch"})),
    ("erp_cancel_purge", frozenset()),
    ("sf_cancel_after", frozenset({"item_delete"})),
    ("draft_delete", frozenset()),
    ("erp_cancel", frozenset({"penny"})),
    ("normal", frozenset({"late_partial", "gap"})),
    ("normal", frozenset({"item_delete", "mismatch"})),
)


class _Product:
    __slots__ = ("id", "sku", "price", "pbe", "f", "erp", "sellable", "deleted")

    def __init__(self, pid: str, sku: str | None, price: int, pbe: str, f: dict[str, Any]) -> None:
        self.id = pid
        self.sku = sku
        self.price = price  # cents
        self.pbe = pbe
        self.f = f
        self.erp = False
        self.sellable = True
        self.deleted = False


class _Account:
    __slots__ = ("id", "erp_no", "f", "deleted")

    def __init__(self, aid: str, erp_no: str | None, f: dict[str, Any]) -> None:
        self.id = aid
        self.erp_no = erp_no
        self.f = f
        self.deleted = False


class _Line:
    __slots__ = ("id", "product", "qty", "unit", "f")

    def __init__(self, lid: str, product: _Product, qty: int, unit: int, f: dict[str, Any]) -> None:
        self.id = lid
        self.product = product
        self.qty = qty
        self.unit = unit  # cents
        self.f = f


def _money(cents: int) -> float:
    return cents / 100


class Simulation:
    """One simulated business period; iterate `events()` for the encoded messages in order."""

    def __init__(self, orders: int, seed: int, base_ms: int) -> None:
        self.orders = orders
        self.base = base_ms
        self.now = base_ms
        self.rng = rng = FastRandom(f"sferp-generator/simulation/{seed}")
        self.out: list[Emitted] = []
        self._heap: list[tuple[int, int, _Proc]] = []
        self._seq = 0
        self.ids = IdFactory(rng)
        self.sf = SfEncoder(rng, self.out, self.ids)
        self.erp = ErpEncoder(rng, self.out)
        self.arrivals_done = False
        self.users = [self.ids.new("005") for _ in range(8)]
        self.pricebook = self.ids.new("01s")
        self.products: list[_Product] = []
        self.sellable: list[_Product] = []
        self.items: dict[str, dict[str, Any]] = {}
        self.stock: dict[str, list[str]] = {}
        self.inventory: dict[tuple[str, str], dict[str, Any]] = {}
        self.accounts: list[_Account] = []
        self.recent_orders: deque[str] = deque(maxlen=64)
        self.leads: deque[str] = deque(maxlen=256)
        self.contacts: deque[str] = deque(maxlen=256)
        self._sku_no = 10_000
        self._order_number = rng.randrange(100, 9000)
        self._item_number = rng.randrange(1000, 90_000)
        self._so_no = rng.randrange(400_000, 600_000)
        self._customer_no = rng.randrange(10_000, 20_000)

    # -- scheduling ------------------------------------------------------------------------------

    def spawn(self, at: int, proc: _Proc) -> None:
        """Start a process at simulated time `at`."""
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, proc))

    def events(self) -> Iterator[Emitted]:
        """Run the simulation to the end, yielding `(role, key, value, label, event_ms)`."""
        b = self.base
        self.spawn(b, self._catalogue())
        self.spawn(b + 20 * S, self._initial_accounts())
        self.spawn(b + 60 * S, self._arrivals())
        self.spawn(b + 90 * S, self._catalogue_maintenance())
        self.spawn(b + 100 * S, self._stock_keeping())
        self.spawn(b + 110 * S, self._account_maintenance())
        self.spawn(b + 75 * S, self._crm_noise())
        self.spawn(b + 150 * S, self._gaps())
        heap, out = self._heap, self.out
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            t, _, proc = pop(heap)
            self.now = t
            try:
                delay = next(proc)
            except StopIteration:
                pass
            else:
                self._seq += 1
                push(heap, (t + delay, self._seq, proc))
            if out:
                yield from out
                out.clear()

    # -- emitting --------------------------------------------------------------------------------

    def sf_tx(
        self,
        changes: list[tuple[str, str, list[str], dict[str, Any] | None, list[str]]],
        user: str | None = None,
        origin: str = ORIGIN_API,
        short_ids: bool = False,
        hold: bool = False,
    ) -> list[tuple[Any, ...]]:
        """One Salesforce transaction: `(entity, changeType, recordIds, fields, nulled)` each.

        With `hold`, the events are stamped now but returned instead of sent;
        `sf_deliver` sends them later (an older change delivered after newer ones).
        """
        tx_key, commit = self.sf.new_transaction()
        user = user or self.sf.integration_user
        pending = [
            (e, ct, rids, f, nulled, tx_key, seq, commit, self.now, user, origin, short_ids)
            for seq, (e, ct, rids, f, nulled) in enumerate(changes, 1)
        ]
        if hold:
            return pending
        self.sf_deliver(pending)
        return []

    def sf_deliver(self, pending: list[tuple[Any, ...]]) -> None:
        """Send events prepared by `sf_tx(..., hold=True)`."""
        for args in pending:
            self.sf.encode(*args)

    def erp_tx(
        self, changes: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]]
    ) -> None:
        """One ERP transaction: `(table, op, before, after)` per row."""
        self.erp.transaction(self.now, changes)

    # -- catalogue, stock, accounts --------------------------------------------------------------

    def _new_product(self, in_erp: bool, with_code: bool = True) -> _Product:
        rng = self.rng
        self._sku_no += rng.randint(1, 4)
        sku = (
            (f"SKU-{self._sku_no:05d}" if in_erp else f"SKU-9{self._sku_no:05d}")
            if with_code
            else None
        )
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.randint(10, 990)}"
        price = rng.choice((499, 999, 1250, 1999, 2450, 4999, 8900, 12900, 24999, 89900))
        price += rng.randint(0, 40) * 25
        f: dict[str, Any] = {
            "Name": name,
            "ProductCode": sku,
            "IsActive": True,
            "Family": rng.choice(_FAMILIES),
            "StockKeepingUnit": sku,
            "QuantityUnitOfMeasure": "Each",
        }
        p = _Product(self.ids.new("01t"), sku, price, self.ids.new("01u"), f)
        p.erp = in_erp and sku is not None
        self.products.append(p)
        self.sellable.append(p)
        return p

    def _erp_rows_for(self, p: _Product) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        rng = self.rng
        assert p.sku is not None
        item = {"sku": p.sku, "description": p.f["Name"], "list_price": p.price, "active": True}
        self.items[p.sku] = item
        whs = rng.sample(_WAREHOUSES, rng.choice((1, 1, 2, 2, 3)))
        self.stock[p.sku] = whs
        rows = []
        for wh in whs:
            row = {
                "sku": p.sku,
                "warehouse": wh,
                "qty_on_hand": rng.randint(20, 400),
                "qty_allocated": rng.randint(0, 15),
            }
            self.inventory[(p.sku, wh)] = row
            rows.append(row)
        return item, rows

    def _catalogue(self) -> _Proc:
        """The ERP's initial snapshot, then the Salesforce catalogue import."""
        rng = self.rng
        n = min(5000, max(40, self.orders // 20))
        for i in range(n):
            if i % 33 == 7:
                self._new_product(in_erp=False)  # sold in Salesforce, not set up in the ERP
            elif i % 41 == 11:
                self._new_product(in_erp=False, with_code=False)  # a service: no code
            else:
                self._new_product(in_erp=True)
        items: list[dict[str, Any]] = []
        inventory: list[dict[str, Any]] = []
        for p in self.products:
            if p.erp:
                item, rows = self._erp_rows_for(p)
                items.append(dict(item))
                inventory.extend(dict(r) for r in rows)
        legacy = []
        for k in range(3):
            self._so_no += 1
            legacy.append(
                {
                    "order_no": self._so_no,
                    "sf_order_id": None if k != 1 else "",
                    "customer_no": f"C-{rng.randint(10_000, 20_000)}",
                    "status": "INVOICED",
                    "total_amount": rng.randint(5_000, 500_000),
                    "currency": "USD",
                }
            )
        self.erp.snapshot(
            self.now, [("items", items), ("inventory", inventory), ("sales_orders", legacy)]
        )
        yield 1 * S
        # Data Loader: batches of 200 records, one transaction each.
        for start in range(0, len(self.products), 200):
            batch = self.products[start : start + 200]
            self.sf_tx(
                [("Product2", "CREATE", [p.id], dict(p.f), []) for p in batch],
                origin=ORIGIN_SOAP,
            )
            yield rng.randint(2 * S, 6 * S)

    def _new_account(self, with_erp: bool) -> tuple[_Account, tuple[Any, ...]]:
        rng = self.rng
        erp_no = None
        if with_erp:
            self._customer_no += rng.randint(1, 5)
            erp_no = f"C-{self._customer_no}"
        city, state = rng.choice(_CITIES)
        f: dict[str, Any] = {
            "Name": f"{rng.choice(_COMPANY_A)} {rng.choice(_COMPANY_B)} {rng.randint(1, 999)}",
            "ERP_Customer_Number__c": erp_no,
            "Type": "Customer - Direct",
            "Industry": rng.choice(("Manufacturing", "Energy", "Construction", "Retail")),
            "Phone": f"(555) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
            "BillingAddress": {
                "Street": f"{rng.randint(1, 9999)} Main St",
                "City": city,
                "State": state,
                "PostalCode": f"{rng.randint(10000, 99999)}",
                "Country": "US",
            },
            "OwnerId": rng.choice(self.users),
        }
        a = _Account(self.ids.new("001"), erp_no, f)
        self.accounts.append(a)
        body = {k: v for k, v in f.items() if v is not None}
        return a, ("Account", "CREATE", [a.id], body, [])

    def _initial_accounts(self) -> _Proc:
        n = min(2000, max(5, self.orders // 50))
        while n > 0:
            k = min(n, 50)
            n -= k
            self.sf_tx([self._new_account(True)[1] for _ in range(k)], origin=ORIGIN_SOAP)
            yield self.rng.randint(1 * S, 3 * S)

    def _account_for_order(self) -> _Account:
        rng = self.rng
        live = self.accounts
        if not live or rng.random() < 0.08:
            a, change = self._new_account(with_erp=rng.random() < 0.7)
            self.sf_tx([change], user=rng.choice(self.users), origin=ORIGIN_UI)
            return a
        for _ in range(4):
            a = live[int(len(live) * rng.random())]
            if not a.deleted:
                return a
        return a

    def _pick_product(self) -> _Product:
        s = self.sellable
        return s[int(len(s) * self.rng.random() ** 1.6)]

    def _inv_change(self, sku: str, wh: str, d_on_hand: int, d_alloc: int) -> tuple[Any, ...]:
        row = self.inventory[(sku, wh)]
        row["qty_on_hand"] += d_on_hand
        while row["qty_on_hand"] < row["qty_allocated"]:
            # A goods receipt: the warehouse replenishes before it would run short.
            row["qty_on_hand"] += 250
        row["qty_allocated"] = max(0, row["qty_allocated"] + d_alloc)
        return ("inventory", "u", None, dict(row))

    # -- the order desk --------------------------------------------------------------------------

    def _scenario(self, i: int) -> tuple[str, frozenset[str]]:
        rng = self.rng
        if i % 2 == 1 and i // 2 < len(_COVERAGE):
            return _COVERAGE[i // 2]
        r = rng.random()
        main = "normal"
        for name, p in _MAIN:
            if r < p:
                main = name
                break
            r -= p
        flags = frozenset(name for name, p in _FLAGS if rng.random() < p)
        return main, flags

    def _arrivals(self) -> _Proc:
        rng = self.rng
        n = self.orders
        overflow_at = {n // 2} if n >= 20 else set()
        for i in range(n):
            main, flags = self._scenario(i)
            self.spawn(self.now, self._order(main, flags))
            if i == 7 or rng.random() < 0.01:
                self.spawn(self.now + rng.randint(1 * S, 60 * S), self._orphan(sf_id=True))
            if i == 9 or rng.random() < 0.005:
                self.spawn(self.now + rng.randint(1 * S, 60 * S), self._orphan(sf_id=False))
            if i in overflow_at or (i and i % 30_000 == 0):
                entity = rng.choice(("Order", "OrderItem"))
                self.sf_tx([(entity, "GAP_OVERFLOW", [], None, [])])
            yield max(100, int(rng.expovariate(1 / 3000)))
        self.arrivals_done = True

    def _order(self, main: str, flags: frozenset[str]) -> _Proc:
        rng = self.rng
        sf_tx = self.sf_tx
        user = rng.choice(self.users)
        short = "short_ids" in flags
        acct = self._account_for_order()
        oid = self.ids.new("801")
        self._order_number += 1
        currency = "USD" if rng.random() < 0.9 else "CAD"
        lines: list[_Line] = []
        for _ in range(rng.choice((1, 1, 1, 1, 1, 1, 2, 2, 2, 3))):
            p = self._pick_product()
            qty = rng.choice((1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 24))
            unit = p.price if rng.random() < 0.8 else p.price * rng.choice((90, 95)) // 100
            self._item_number += 1
            lid = self.ids.new("802")
            f = {
                "OrderId": oid,
                "Product2Id": p.id,
                "PricebookEntryId": p.pbe,
                "Quantity": float(qty),
                "UnitPrice": _money(unit),
                "ListPrice": _money(p.price),
                "OrderItemNumber": f"{self._item_number:010d}",
            }
            lines.append(_Line(lid, p, qty, unit, f))

        def total() -> int:
            return sum(ln.qty * ln.unit for ln in lines)

        order_f: dict[str, Any] = {
            "AccountId": acct.id,
            "OrderNumber": f"{self._order_number:08d}",
            "Status": "Draft",
            "StatusCode": "Draft",
            "TotalAmount": 0.0,
            "EffectiveDate": iso_date(self.now),
            "Pricebook2Id": self.pricebook,
            "OwnerId": user,
            "Type": "New",
            "CurrencyIsoCode": currency,
        }
        if rng.random() < 0.4:
            order_f["PoNumber"] = f"PO-{rng.randint(10_000, 99_999)}"
        composite = rng.random() < 0.6
        if composite:
            # Order and items in one composite API call: one transaction.
            order_f["TotalAmount"] = _money(total())
            sf_tx(
                [("Order", "CREATE", [oid], dict(order_f), [])]
                + [("OrderItem", "CREATE", [ln.id], ln.f, []) for ln in lines],
                short_ids=short,
            )
        else:
            sf_tx([("Order", "CREATE", [oid], dict(order_f), [])], user, ORIGIN_UI, short)
            yield rng.randint(5 * S, 90 * S)
            order_f["TotalAmount"] = _money(total())
            sf_tx(
                [("OrderItem", "CREATE", [ln.id], ln.f, []) for ln in lines]
                + [("Order", "UPDATE", [oid], {"TotalAmount": order_f["TotalAmount"]}, [])],
                user,
                ORIGIN_UI,
                short,
            )
        self.recent_orders.append(oid)

        if "item_delete" in flags:
            if len(lines) < 2:
                p = self._pick_product()
                self._item_number += 1
                ln = _Line(self.ids.new("802"), p, 1, p.price, {})
                ln.f = {
                    "OrderId": oid,
                    "Product2Id": p.id,
                    "PricebookEntryId": p.pbe,
                    "Quantity": 1.0,
                    "UnitPrice": _money(p.price),
                    "ListPrice": _money(p.price),
                    "OrderItemNumber": f"{self._item_number:010d}",
                }
                lines.append(ln)
                yield rng.randint(5 * S, 30 * S)
                order_f["TotalAmount"] = _money(total())
                sf_tx(
                    [
                        ("OrderItem", "CREATE", [ln.id], ln.f, []),
                        ("Order", "UPDATE", [oid], {"TotalAmount": order_f["TotalAmount"]}, []),
                    ],
                    user,
                    ORIGIN_UI,
                )
            yield rng.randint(10 * S, 60 * S)
            victim = lines.pop()
            stale: list[tuple[Any, ...]] = []
            if rng.random() < 0.6:
                # An edit of the line whose event arrives only after the line's deletion.
                victim.f["Quantity"] = float(victim.qty + 1)
                stale = sf_tx(
                    [("OrderItem", "UPDATE", [victim.id], {"Quantity": victim.f["Quantity"]}, [])],
                    user,
                    ORIGIN_UI,
                    hold=True,
                )
                yield rng.randint(2 * S, 20 * S)
            order_f["TotalAmount"] = _money(total())
            sf_tx(
                [
                    ("OrderItem", "DELETE", [victim.id], None, []),
                    ("Order", "UPDATE", [oid], {"TotalAmount": order_f["TotalAmount"]}, []),
                ],
                user,
                ORIGIN_UI,
            )
            if stale:
                yield rng.randint(1 * S, 30 * S)
                self.sf_deliver(stale)

        if "late_partial" in flags:
            yield rng.randint(10 * S, 60 * S)
            ln = lines[0]
            ln.qty += 1
            older = sf_tx(
                [
                    ("OrderItem", "UPDATE", [ln.id], {"Quantity": float(ln.qty)}, []),
                    ("Order", "UPDATE", [oid], {"TotalAmount": _money(total())}, []),
                ],
                user,
                ORIGIN_UI,
                hold=True,
            )
            yield rng.randint(3 * S, 40 * S)
            ln.qty += rng.randint(1, 3)
            ln.f["Quantity"] = float(ln.qty)
            order_f["TotalAmount"] = _money(total())
            sf_tx(
                [
                    ("OrderItem", "UPDATE", [ln.id], {"Quantity": ln.f["Quantity"]}, []),
                    ("Order", "UPDATE", [oid], {"TotalAmount": order_f["TotalAmount"]}, []),
                ],
                user,
                ORIGIN_UI,
            )
            yield rng.randint(1 * S, 30 * S)
            self.sf_deliver(older)  # the older partial update, delivered late

        if main == "stay_draft":
            return
        if main in ("draft_delete", "draft_delete_undelete"):
            yield rng.randint(1 * MIN, 20 * MIN)
            # Deleting an order cascades to its items: one event names them all.
            sf_tx(
                [
                    ("Order", "DELETE", [oid], None, []),
                    ("OrderItem", "DELETE", [ln.id for ln in lines], None, []),
                ],
                user,
                ORIGIN_UI,
            )
            if main == "draft_delete":
                return
            yield rng.randint(2 * MIN, 30 * MIN)
            sf_tx(
                [("Order", "UNDELETE", [oid], dict(order_f), [])]
                + [("OrderItem", "UNDELETE", [ln.id], dict(ln.f), []) for ln in lines],
                user,
                ORIGIN_UI,
            )

        yield rng.randint(5 * S, 60 * S) if composite else rng.randint(30 * S, 8 * MIN)
        order_f["Status"] = order_f["StatusCode"] = "Activated"
        activation = {
            "Status": "Activated",
            "StatusCode": "Activated",
            "ActivatedDate": iso_ms(self.now),
            "ActivatedById": user,
        }
        order_f["ActivatedDate"] = activation["ActivatedDate"]
        order_f["ActivatedById"] = user
        nulled = []
        if "PoNumber" in order_f and rng.random() < 0.3:
            nulled = ["PoNumber"]
            del order_f["PoNumber"]
        sf_tx([("Order", "UPDATE", [oid], activation, nulled)], user, ORIGIN_UI, short)

        if "gap" in flags:
            yield rng.randint(5 * S, 2 * MIN)
            sf_tx([("Order", "GAP_UPDATE", [oid], None, [])])
        if main == "sf_cancel_before":
            yield rng.randint(1 * MIN, 10 * MIN)
            sf_tx([("Order", "UPDATE", [oid], self._cancel(order_f), [])], user, ORIGIN_UI)
            return
        if main == "never_picked":
            return

        # The ERP integration picks the activated order up.
        if main == "late_pickup":
            yield rng.randint(20 * MIN, 90 * MIN)
        else:
            yield rng.randint(20 * S, 10 * MIN)
        amount = total()
        if "mismatch" in flags:
            # Freight or a surcharge added in the ERP, a discount it missed, a price-list drift.
            amount += rng.choice((1250, 999, -500, 2000, 4995, 2))
        elif "penny" in flags:
            amount += rng.choice((1, -1))  # within the 0.01 tolerance
        so = self._new_sales_order(oid[:15] if short else oid, acct, amount, currency)
        self.erp_tx([("sales_orders", "c", None, dict(so))])

        if main == "erp_recreate":
            yield rng.randint(2 * MIN, 20 * MIN)
            self._so_status(so, "CANCELLED")
            yield rng.randint(1 * MIN, 10 * MIN)
            so = self._new_sales_order(so["sf_order_id"], acct, amount, currency)
            self.erp_tx([("sales_orders", "c", None, dict(so))])
        elif main in ("erp_cancel", "erp_cancel_purge"):
            yield rng.randint(2 * MIN, 30 * MIN)
            self._so_status(so, "CANCELLED")  # credit hold: Salesforce still says Activated
            if main == "erp_cancel_purge":
                yield rng.randint(30 * MIN, 120 * MIN)
                self.erp_tx([("sales_orders", "d", dict(so), None)])
            return
        elif main == "sf_cancel_after":
            yield rng.randint(1 * MIN, 10 * MIN)
            sf_tx([("Order", "UPDATE", [oid], self._cancel(order_f), [])], user, ORIGIN_UI)
            yield rng.randint(30 * S, 5 * MIN)
            self._so_status(so, "CANCELLED")
            return

        yield rng.randint(1 * MIN, 15 * MIN)
        allocations = []
        changes: list[tuple[Any, ...]] = []
        for ln in lines:
            sku = ln.product.sku
            whs = self.stock.get(sku) if sku else None
            if not whs:
                continue
            wh = whs[0]
            for w in whs:
                row = self.inventory[(sku, w)]
                if row["qty_on_hand"] - row["qty_allocated"] >= ln.qty:
                    wh = w
                    break
            if (sku, wh) not in self.inventory:
                continue
            allocations.append((sku, wh, ln.qty))
            changes.append(self._inv_change(sku, wh, 0, ln.qty))
        self.erp_tx([self._so_change(so, "ALLOCATED"), *changes])
        yield rng.randint(20 * MIN, 180 * MIN)
        changes = [
            self._inv_change(sku, wh, -q, -q)
            for sku, wh, q in allocations
            if (sku, wh) in self.inventory
        ]
        self.erp_tx([self._so_change(so, "SHIPPED"), *changes])
        yield rng.randint(5 * MIN, 60 * MIN)
        self._so_status(so, "INVOICED")

    @staticmethod
    def _cancel(order_f: dict[str, Any]) -> dict[str, Any]:
        order_f["Status"] = order_f["StatusCode"] = "Cancelled"
        return {"Status": "Cancelled", "StatusCode": "Cancelled"}

    def _new_sales_order(
        self, sf_order_id: str | None, acct: _Account | None, amount: int, currency: str
    ) -> dict[str, Any]:
        self._so_no += 1
        customer = acct.erp_no if acct is not None and acct.erp_no else None
        if customer is None:
            self._customer_no += 1
            customer = f"C-{self._customer_no}"
            if acct is not None:
                acct.erp_no = customer
        return {
            "order_no": self._so_no,
            "sf_order_id": sf_order_id,
            "customer_no": customer,
            "status": "OPEN",
            "total_amount": amount,
            "currency": currency,
        }

    def _so_change(self, so: dict[str, Any], status: str) -> tuple[Any, ...]:
        before = dict(so)
        so["status"] = status
        return ("sales_orders", "u", before, dict(so))

    def _so_status(self, so: dict[str, Any], status: str) -> None:
        self.erp_tx([self._so_change(so, status)])

    def _orphan(self, sf_id: bool) -> _Proc:
        """An ERP order naming no Salesforce order: a wrong Id keyed in, or an EDI order."""
        rng = self.rng
        ref: str | None = self.ids.new("801") if sf_id else rng.choice((None, ""))
        so = self._new_sales_order(ref, None, rng.randint(2_000, 300_000), "USD")
        self.erp_tx([("sales_orders", "c", None, dict(so))])
        yield rng.randint(10 * MIN, 60 * MIN)
        if rng.random() < 0.3:
            self._so_status(so, "CANCELLED")

    # -- background processes --------------------------------------------------------------------

    def _pause(self, first_round: bool, mean: int) -> int:
        """Time to a background process's next action: quick in its first round (so that
        even a short run sees every kind of change), then exponential around `mean`."""
        if first_round:
            return self.rng.randint(20 * S, 60 * S)
        return max(5 * S, int(self.rng.expovariate(1 / mean)))

    def _catalogue_maintenance(self) -> _Proc:
        """Product changes: bulk edits (multi-record events), prices, new and retired products."""
        rng = self.rng
        actions = ("bulk_family", "price", "rename", "new", "deactivate", "delete_undelete")
        actions += ("discontinue", "new_sf_only")
        k = 0
        while not self.arrivals_done:
            action = actions[k] if k < len(actions) else rng.choice(actions[:6] * 3 + actions[6:])
            k += 1
            live = [p for p in self.products[-400:] if not p.deleted]
            if action == "bulk_family" and len(live) >= 6:
                group = rng.sample(live, rng.randint(2, 5))
                fam = rng.choice(_FAMILIES)
                for p in group:
                    p.f["Family"] = fam
                self.sf_tx(
                    [("Product2", "UPDATE", [p.id for p in group], {"Family": fam}, [])],
                    origin=ORIGIN_SOAP,
                )
            elif action == "price":
                p = rng.choice(live)
                if p.sku in self.items:
                    p.price = p.price * rng.choice((95, 103, 105, 110)) // 100
                    item = self.items[p.sku]
                    item["list_price"] = p.price
                    self.erp_tx([("items", "u", None, dict(item))])
            elif action == "rename":
                p = rng.choice(live)
                p.f["Name"] = f"{p.f['Name'].split(' (')[0]} (rev {rng.randint(2, 9)})"
                self.sf_tx(
                    [("Product2", "UPDATE", [p.id], {"Name": p.f["Name"]}, [])],
                    rng.choice(self.users),
                    ORIGIN_UI,
                )
                if p.sku in self.items:
                    item = self.items[p.sku]
                    item["description"] = p.f["Name"]
                    self.erp_tx([("items", "u", None, dict(item))])
            elif action in ("new", "new_sf_only"):
                p = self._new_product(in_erp=action == "new")
                if p.erp:
                    item, rows = self._erp_rows_for(p)
                    self.erp_tx(
                        [("items", "c", None, dict(item))]
                        + [("inventory", "c", None, dict(r)) for r in rows]
                    )
                    yield rng.randint(1 * MIN, 20 * MIN)
                self.sf_tx(
                    [("Product2", "CREATE", [p.id], dict(p.f), [])],
                    rng.choice(self.users),
                    ORIGIN_UI,
                )
            elif action == "deactivate":
                group = rng.sample(live, min(len(live), rng.randint(1, 3)))
                for p in group:
                    p.f["IsActive"] = False
                    if p in self.sellable and len(self.sellable) > 20:
                        self.sellable.remove(p)
                self.sf_tx(
                    [("Product2", "UPDATE", [p.id for p in group], {"IsActive": False}, [])],
                    origin=ORIGIN_SOAP,
                )
                rows = [self.items[p.sku] for p in group if p.sku in self.items]
                for r in rows:
                    r["active"] = False
                if rows:
                    self.erp_tx([("items", "u", None, dict(r)) for r in rows])
            elif action == "delete_undelete":
                p = rng.choice(live)
                user = rng.choice(self.users)
                p.deleted = True
                self.sf_tx([("Product2", "DELETE", [p.id], None, [])], user, ORIGIN_UI)
                yield rng.randint(2 * MIN, 15 * MIN)
                p.deleted = False
                body = {k2: v for k2, v in p.f.items() if v is not None}
                self.sf_tx([("Product2", "UNDELETE", [p.id], body, [])], user, ORIGIN_UI)
            elif action == "discontinue":
                cands = [p for p in live if p.sku in self.items and p in self.sellable]
                if cands and len(self.sellable) > 20:
                    p = cands[0]
                    self.sellable.remove(p)
                    assert p.sku is not None
                    changes: list[tuple[Any, ...]] = [
                        ("inventory", "d", self.inventory.pop((p.sku, wh)), None)
                        for wh in self.stock.pop(p.sku, [])
                    ]
                    changes.append(("items", "d", self.items.pop(p.sku), None))
                    self.erp_tx(changes)
            yield self._pause(k <= len(actions), 8 * MIN)

    def _stock_keeping(self) -> _Proc:
        """Goods receipts, new stocking locations, a closed location, a reload (TRUNCATE)."""
        rng = self.rng
        k = 0
        while not self.arrivals_done:
            k += 1
            r = rng.random()
            keys = list(self.inventory)
            if k == 3 or r < 0.01:
                self.erp.truncate(self.now, "inventory")
            elif (k == 2 or r < 0.05) and len(keys) > 10:
                sku, wh = keys[int(len(keys) * rng.random())]
                if len(self.stock.get(sku, ())) > 1:
                    self.stock[sku].remove(wh)
                    self.erp_tx([("inventory", "d", self.inventory.pop((sku, wh)), None)])
            elif r < 0.15 and self.stock:
                skus = list(self.stock)
                sku = skus[int(len(skus) * rng.random())]
                free = [w for w in _WAREHOUSES if w not in self.stock[sku]]
                if free:
                    wh = free[0]
                    row = {
                        "sku": sku,
                        "warehouse": wh,
                        "qty_on_hand": rng.randint(10, 200),
                        "qty_allocated": 0,
                    }
                    self.inventory[(sku, wh)] = row
                    self.stock[sku].append(wh)
                    self.erp_tx([("inventory", "c", None, dict(row))])
            elif keys:
                picks = {keys[int(len(keys) * rng.random())] for _ in range(rng.randint(1, 6))}
                self.erp_tx(
                    [
                        self._inv_change(sku, wh, rng.randint(20, 300), 0)
                        for sku, wh in sorted(picks)
                    ]
                )
            yield self._pause(k <= 3, 4 * MIN)

    def _account_maintenance(self) -> _Proc:
        """Account edits: phone numbers, ERP numbers, territory re-assignments, delete/undelete."""
        rng = self.rng
        actions = ("owner", "erp_no", "phone", "delete_undelete")
        k = 0
        while not self.arrivals_done:
            action = actions[k] if k < len(actions) else rng.choice(actions * 3 + ("phone",) * 6)
            k += 1
            live = [a for a in self.accounts[-300:] if not a.deleted]
            if action == "owner" and len(live) >= 4:
                group = rng.sample(live, rng.randint(2, min(6, len(live))))
                owner = rng.choice(self.users)
                for a in group:
                    a.f["OwnerId"] = owner
                self.sf_tx(
                    [("Account", "UPDATE", [a.id for a in group], {"OwnerId": owner}, [])],
                    origin=ORIGIN_SOAP,
                )
            elif action == "erp_no":
                missing = [a for a in live if a.f["ERP_Customer_Number__c"] is None]
                if missing:
                    a = missing[0]
                    if a.erp_no is None:
                        self._customer_no += 1
                        a.erp_no = f"C-{self._customer_no}"
                    a.f["ERP_Customer_Number__c"] = a.erp_no
                    self.sf_tx(
                        [("Account", "UPDATE", [a.id], {"ERP_Customer_Number__c": a.erp_no}, [])]
                    )
            elif action == "phone" and live:
                a = rng.choice(live)
                a.f["Phone"] = f"(555) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
                self.sf_tx(
                    [("Account", "UPDATE", [a.id], {"Phone": a.f["Phone"]}, [])],
                    rng.choice(self.users),
                    ORIGIN_UI,
                )
            elif action == "delete_undelete" and live:
                a = rng.choice(live)
                user = rng.choice(self.users)
                a.deleted = True
                self.sf_tx([("Account", "DELETE", [a.id], None, [])], user, ORIGIN_UI)
                yield rng.randint(1 * MIN, 20 * MIN)
                a.deleted = False
                body = {k2: v for k2, v in a.f.items() if v is not None}
                self.sf_tx([("Account", "UNDELETE", [a.id], body, [])], user, ORIGIN_UI)
            yield self._pause(k <= len(actions), 12 * MIN)

    def _crm_noise(self) -> _Proc:
        """Lead and Contact traffic: legitimate events of entities the views do not use."""
        rng = self.rng
        k = 0
        while not self.arrivals_done:
            k += 1
            r = rng.random()
            user = rng.choice(self.users)
            if k > 2 and (k == 3 or r < 0.05) and len(self.leads) >= 3:
                ids = rng.sample(list(self.leads), min(len(self.leads), rng.randint(2, 8)))
                self.sf_tx([("Lead", "UPDATE", ids, {"OwnerId": user}, [])], origin=ORIGIN_SOAP)
            elif r < 0.08 and self.leads:
                lid = self.leads.popleft()
                self.sf_tx([("Lead", "DELETE", [lid], None, [])], user, ORIGIN_UI)
            elif r < 0.45:
                lid = self.ids.new("00Q")
                self.leads.append(lid)
                f = {
                    "Name": {
                        "Salutation": None,
                        "FirstName": rng.choice(_FIRST),
                        "LastName": rng.choice(_LAST),
                    },
                    "Company": f"{rng.choice(_COMPANY_A)} {rng.choice(_COMPANY_B)}",
                    "Status": _LEAD_STATUS[0],
                    "Email": f"lead{rng.randint(1000, 99999)}@example.com",
                    "LeadSource": rng.choice(("Web", "Trade Show", "Partner Referral")),
                    "OwnerId": user,
                }
                self.sf_tx([("Lead", "CREATE", [lid], f, [])], user, ORIGIN_UI)
            elif r < 0.7 and self.leads:
                lid = self.leads[int(len(self.leads) * rng.random())]
                self.sf_tx(
                    [("Lead", "UPDATE", [lid], {"Status": rng.choice(_LEAD_STATUS[1:])}, [])],
                    user,
                    ORIGIN_UI,
                )
            elif r < 0.85 and self.accounts:
                cid = self.ids.new("003")
                self.contacts.append(cid)
                f = {
                    "AccountId": rng.choice(self.accounts).id,
                    "Name": {
                        "Salutation": "Ms.",
                        "FirstName": rng.choice(_FIRST),
                        "LastName": rng.choice(_LAST),
                    },
                    "Email": f"c{rng.randint(1000, 99999)}@example.org",
                    "Title": rng.choice(("Buyer", "Plant Manager", "Procurement Lead")),
                    "OwnerId": user,
                }
                self.sf_tx([("Contact", "CREATE", [cid], f, [])], user, ORIGIN_UI)
            elif self.contacts:
                cid = self.contacts[int(len(self.contacts) * rng.random())]
                phone = f"(555) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
                self.sf_tx([("Contact", "UPDATE", [cid], {"Phone": phone}, [])], user, ORIGIN_UI)
            yield max(1 * S, int(rng.expovariate(1 / (15 * S))))

    def _gaps(self) -> _Proc:
        """Gap events: Salesforce could not produce the change event itself."""
        rng = self.rng
        while not self.arrivals_done:
            if self.recent_orders:
                n = rng.choice((1, 1, 2, 3))
                ids = rng.sample(list(self.recent_orders), min(n, len(self.recent_orders)))
                kind = rng.choice(("GAP_UPDATE",) * 6 + ("GAP_CREATE", "GAP_DELETE"))
                self.sf_tx([("Order", kind, ids, None, [])])
            yield max(1 * MIN, int(rng.expovariate(1 / (45 * MIN))))
