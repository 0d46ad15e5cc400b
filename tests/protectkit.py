"""Helpers shared by the data-protection tests (encryption, audit log, erasure)."""

from __future__ import annotations

import base64
import re
from functools import cache

import duckdb
import orjson

from sferp.demo import generated_messages
from sferp.events import RawMessage
from sferp.generator import GeneratorConfig

# The configured sensitive fields of these tests: customer numbers ("C-12345") occur
# nowhere else in the generated world, so any plaintext copy is easy to find.
SENSITIVE = ("Account.ERP_Customer_Number__c", "sales_orders.customer_no")
FIELD_NAMES = ("ERP_Customer_Number__c", "customer_no")


def key_b64(byte: int) -> str:
    """A deterministic 32-byte key, base64."""
    return base64.b64encode(bytes([byte]) * 32).decode()


def env_with(keys: str, fields: tuple[str, ...] = SENSITIVE, **extra: str) -> dict[str, str]:
    """Environment settings for encryption with key ring `keys`."""
    env = {
        "SFERP_SECURITY__ENCRYPTION_KEYS": keys,
        "SFERP_SECURITY__ENCRYPT_FIELDS": ",".join(fields),
    }
    env.update(extra)
    return env


@cache
def world(orders: int = 300, seed: int = 5, bad: float = 0.05) -> tuple[RawMessage, ...]:
    """A generated stream with plenty of dead letters (cached per parameters)."""
    cfg = GeneratorConfig(
        orders=orders, duplicates=0.05, disorder=0.1, bad=bad, partitions=3, seed=seed
    )
    return tuple(generated_messages(cfg))


def plaintexts(msgs: tuple[RawMessage, ...], names: tuple[str, ...] = FIELD_NAMES) -> set[str]:
    """Every string value that a message carries under one of `names` (at any depth)."""
    found: set[str] = set()

    def walk(d: object) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                if k in names and isinstance(v, str) and len(v) >= 4:
                    found.add(v)
                else:
                    walk(v)
        elif isinstance(d, list):
            for v in d:
                walk(v)

    for m in msgs:
        if m.value is None:
            continue
        try:
            walk(orjson.loads(m.value))
        except orjson.JSONDecodeError:
            # a malformed message: pick the values out of the text
            text = m.value.decode("utf-8", "replace")
            for n in names:
                found.update(re.findall(rf'"{n}"\s*:\s*"([^"]{{4,}})"', text))
    return found


def leaks(views_path: str, secrets: set[str]) -> list[str]:
    """Every place in the views file's tables where a secret occurs in clear."""
    pattern = re.compile("|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True)))
    con = duckdb.connect(views_path, read_only=True)
    out = []
    try:
        tables = con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() ORDER BY ALL"
        ).fetchall()
        for schema, table in tables:
            cols = [
                r[0]
                for r in con.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = ? AND table_name = ?",
                    [schema, table],
                ).fetchall()
            ]
            for col in cols:
                rows = con.execute(
                    f'SELECT CAST("{col}" AS VARCHAR) FROM "{schema}"."{table}" '
                    f'WHERE "{col}" IS NOT NULL'
                ).fetchall()
                for (v,) in rows:
                    m = pattern.search(v)
                    if m:
                        out.append(f"{schema}.{table}.{col}: {m.group(0)}")
    finally:
        con.close()
    return out
