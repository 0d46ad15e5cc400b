"""Exact decimal arithmetic for amounts and quantities (CONTRACT §2)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

ZERO = Decimal(0)
CENT = Decimal("0.01")


def decimal_text(value: Any) -> str:
    """orjson's `default` for decimals: their exact text (orjson writes no Decimal)."""
    if type(value) is Decimal:
        return str(value)
    raise TypeError(type(value).__name__)


def to_decimal(value: Any) -> Decimal | None:
    """The exact decimal of a stored JSON value; None for null or non-numbers.

    JSON numbers arrive as float at double precision: their shortest repr is
    the text that was sent for up to 15 significant digits.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        return None
    return d if d.is_finite() else None


def money(value: Any) -> Decimal | None:
    """An amount rounded half-even to 2 places; None when it has no such rounding.

    Beyond 26 integer digits the rounding does not fit the decimal context's 28
    digits. The decoders dead-letter amounts that large (`bad_number`) before
    they reach a view; this keeps a stage alive should one come another way.
    """
    d = to_decimal(value)
    if d is None:
        return None
    try:
        return d.quantize(CENT, rounding=ROUND_HALF_EVEN)
    except InvalidOperation:
        return None


def whole(d: Decimal) -> int:
    """A decimal sum rounded half-even to an integer."""
    return int(d.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
