"""Column parameters of DuckDB bulk statements: JSON texts where they can be, else lists.

Binding a Python list makes DuckDB convert every value while it holds the GIL
(measured: ~20 ms for 120k values, the dataflow stalled meanwhile); the JSON text
of the list (orjson) binds as one string, and DuckDB parses it without the GIL
(~1 ms held). Used by the views rows (`duckdb_views.bind_columns`) and the audit
rows (`audit_log.AuditLog.write`), so both behave the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sferp.operators.numbers import decimal_text

__all__ = ["json_or_lists"]


def json_or_lists(columns: Iterable[Sequence[Any]]) -> tuple[bool, list[Any]]:
    """`(True, the JSON text of each column)`, else `(False, each column as a list)`.

    Decimals are written as strings. Values orjson cannot write exactly (integers
    beyond 64 bits, text with lone surrogates) make every column go as a list.
    """
    cols = list(columns)
    try:
        return True, [orjson.dumps(col, default=decimal_text).decode() for col in cols]
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return False, [list(col) for col in cols]
