"""Amounts and quantities as exact decimals (operators/numbers.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sferp.operators.facts import FACTS, OrderFact
from sferp.operators.numbers import money, to_decimal
from sferp.operators.views import OrdersStage


@pytest.mark.parametrize(
    "value, want",
    [
        ("10.005", Decimal("10.00")),  # half-even
        ("10.015", Decimal("10.02")),
        (9.99, Decimal("9.99")),
        (7, Decimal("7.00")),
        ("9999999999999999.994", Decimal("9999999999999999.99")),
        (None, None),
        (True, None),
        ("NaN", None),
        ("x", None),
    ],
)
def test_money_rounds_half_even_to_cents(value, want):
    assert money(value) == want


@given(st.integers(26, 400), st.sampled_from(["1E", "-9.5E", "123456789E"]))
def test_amounts_without_a_rounding_to_cents_are_none_not_an_error(exp, mantissa):
    assert to_decimal(f"{mantissa}{exp}") is not None
    assert money(f"{mantissa}{exp}") is None


def test_the_orders_stage_survives_an_amount_beyond_the_decimal_context():
    # The decoders dead-letter such amounts (bad_number); a fact built another way
    # must not end the stage.
    stage = OrdersStage({})
    fact = OrderFact("801A", True, None, None, None, "1E100", None, 0, "")
    out = stage.process([(FACTS, [fact])])
    assert out, "the order is rendered"
