"""Field-level encryption of configured sensitive fields (AES-256-GCM), and its decryption.

docs/data-protection.md is the user's description; in short:

- `[security] encrypt_fields = ["Account.ERP_Customer_Number__c", "sales_orders.customer_no"]`
  names `<entity>.<field>` pairs: a Salesforce object or an ERP table and one of its
  fields, or a text column of a view (`order_status.account_id`,
  `reconciliation_exceptions.detail`). A configured Salesforce/ERP field whose value
  a view copies verbatim also protects that view column (`IMPLIED`).
- The key ring comes from `SFERP_SECURITY__ENCRYPTION_KEYS` or
  `security.encryption_keys_file`: `kid1:<base64 of 32 bytes>,kid2:<...>`;
  `security.encryption_key_id` names the key for new writes (default: the first).
  Every key of the ring decrypts, so rotation is: add the new key, make it current,
  keep the old one for as long as values written with it must stay readable.
- A protected value is the string `enc:v1:<kid>:<base64url(nonce || ciphertext+tag)>`.
  The plaintext is the JSON encoding of the value (so numbers come back as numbers);
  the associated data binds the ciphertext to `(entity, row key, field)`, so a value
  moved to another row or field fails to decrypt. Null stays null.

Where values are protected (all on the writer side, in bulk, never in the hot
operators): `records.fields`, the protected view columns, `dead_letters.raw` and the
values of `integration.dlq` (the configured field names are redacted wherever they
occur as keys of the raw JSON; raw that does not parse but mentions one of them is
encrypted as a whole), and `reconciled.orders` / `reconciled.exceptions` values for
protected view columns. With `encrypt_fields` empty nothing here runs at all.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sferp.config import ConfigError
from sferp.connectors.duckdb_schema import INTERNAL_SCHEMA, PRIMARY_KEYS, SCHEMA, TABLES
from sferp.usage import MAX_ROWS, OneLineParser, int_between, timeout_seconds

if TYPE_CHECKING:
    from sferp.config import Settings

PREFIX = "enc:v1:"
_AAD = b"sferp/enc/v1"
_NONCE = 12
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# View tables and the text columns of theirs that may be encrypted: the VARCHAR
# columns outside the primary key (the others are keys, numbers, booleans or
# timestamps, which the views compute and compare).
VIEW_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    table: tuple(c for c, ty in SCHEMA[table] if ty == "VARCHAR" and c not in PRIMARY_KEYS[table])
    for table in ("order_status", "reconciliation_exceptions")
}
_VIEW_TABLES = ("order_status", "reconciliation_exceptions", "inventory_live")
_NOT_ENTITIES = ("records", "flow_stats", "dead_letters", "audit_log")

# Source fields that a view copies verbatim: configuring the field protects the copy.
IMPLIED: dict[tuple[str, str], tuple[str, str]] = {
    ("Order", "OrderNumber"): ("order_status", "order_number"),
    ("Order", "AccountId"): ("order_status", "account_id"),
    ("Order", "Status"): ("order_status", "sf_status"),
    ("sales_orders", "status"): ("order_status", "erp_status"),
}

# ERP primary-key columns: they make up records.record_key, which stays in clear.
ERP_KEY_COLUMNS = {
    "items": ("sku",),
    "inventory": ("sku", "warehouse"),
    "sales_orders": ("order_no",),
}


class DecryptError(ValueError):
    """A protected value cannot be decrypted (unknown key id, wrong context, tampering)."""


def check_field_names(entries: Iterable[str]) -> None:
    """Raise ValueError naming the first unusable `encrypt_fields` entry."""
    for entry in entries:
        entity, dot, field = entry.partition(".")
        if not dot or not _NAME.match(entity) or not field or "." in field:
            raise ValueError(f"{entry!r} is not <entity>.<field> (for example Account.Name)")
        if entity in _NOT_ENTITIES:
            raise ValueError(f"{entry!r}: {entity} is not an entity or view with text columns")
        if entity in _VIEW_TABLES:
            allowed = VIEW_TEXT_COLUMNS.get(entity, ())
            if field not in allowed:
                which = ", ".join(allowed) if allowed else "none"
                raise ValueError(
                    f"{entry!r}: only these columns of {entity} can be encrypted: {which}"
                )
        if field in ERP_KEY_COLUMNS.get(entity, ()):
            raise ValueError(f"{entry!r}: a primary-key column is part of records.record_key")


def check_fields_setting(entries: Iterable[str]) -> None:
    """`check_field_names` for the setting: ConfigError naming security.encrypt_fields."""
    try:
        check_field_names(entries)
    except ValueError as e:
        raise ConfigError(f"security.encrypt_fields: {e}") from None


def parse_keyring(text: str, where: str) -> dict[str, bytes]:
    """`kid:<base64>` entries (commas, spaces or newlines between them) -> {kid: 32-byte key}.

    Errors name `where` (the setting) and the key id, never the key material.
    """
    ring: dict[str, bytes] = {}
    entries = [e for e in re.split(r"[,\s]+", text.strip()) if e]
    if not entries:
        raise ConfigError(f"{where}: the key ring is empty")
    for n, entry in enumerate(entries, 1):
        kid, sep, b64 = entry.partition(":")
        if not sep or not b64:
            raise ConfigError(f"{where}: entry {n} is not <key id>:<base64 key>")
        if not _KID.match(kid):
            raise ConfigError(f"{where}: key id {kid!r} must be 1-32 letters, digits, '_' or '-'")
        if kid in ring:
            raise ConfigError(f"{where}: key id {kid!r} appears twice")
        try:
            std = b64.replace("-", "+").replace("_", "/")
            key = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: key {kid!r} is not valid base64") from None
        if len(key) != 32:
            raise ConfigError(
                f"{where}: key {kid!r} is {len(key)} bytes; AES-256-GCM needs 32 "
                "(make one with: openssl rand -base64 32)"
            )
        ring[kid] = key
    return ring


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _dumps(value: Any, *, sort: bool = False) -> bytes:
    """JSON bytes; exact for integers beyond 64 bits (which orjson refuses)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort else 0)
    except TypeError:
        return json.dumps(value, sort_keys=sort, separators=(",", ":"), default=str).encode()


_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _loads(text: str | bytes) -> Any:
    """Parse JSON exactly: orjson reads integers beyond 64 bits as floats, json does not."""
    raw = text.encode() if isinstance(text, str) else text
    if _LONG_DIGITS.search(raw):
        return json.loads(raw)  # raises ValueError if not JSON
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def map_tokens(node: Any, fn: Callable[[str, str], Any]) -> int:
    """Replace each token value in a JSON document's objects by `fn(object key, token)`,
    in place, at any depth; returns how many values changed."""
    n = 0
    if isinstance(node, dict):
        for k, v in node.items():
            if is_token(v):
                new = fn(k, v)
                if new != v:
                    node[k] = new
                    n += 1
            else:
                n += map_tokens(v, fn)
    elif isinstance(node, list):
        for v in node:
            n += map_tokens(v, fn)
    return n


def is_token(value: Any) -> bool:
    """Whether a value is a protected (encrypted) value."""
    return isinstance(value, str) and value.startswith(PREFIX)


class Protector:
    """Encrypts and decrypts field values with a key ring; knows which fields are protected."""

    def __init__(self, keys: dict[str, bytes], current: str, fields: Sequence[str] = ()) -> None:
        """`keys`: key id -> 32-byte key; `current`: the id used for new values."""
        if current not in keys:
            raise ValueError(f"no key {current!r} in the key ring")
        check_field_names(fields)
        self._aead = {kid: AESGCM(k) for kid, k in keys.items()}
        self.key_ids = tuple(keys)
        self.current = current
        self._enc = self._aead[current]
        self._prefix = f"{PREFIX}{current}:"
        by_entity: dict[str, set[str]] = {}
        views: dict[str, set[str]] = {}
        for entry in fields:
            entity, _, field = entry.partition(".")
            if entity in VIEW_TEXT_COLUMNS:
                views.setdefault(entity, set()).add(field)
                continue
            by_entity.setdefault(entity, set()).add(field)
            implied = IMPLIED.get((entity, field))
            if implied is not None:
                views.setdefault(implied[0], set()).add(implied[1])
        # entity -> protected fields of records.fields
        self.entities: dict[str, tuple[str, ...]] = {
            e: tuple(sorted(f)) for e, f in by_entity.items()
        }
        # view table -> ((column position, column name), ...)
        self.view_columns: dict[str, tuple[tuple[int, str], ...]] = {
            t: tuple((TABLES[t].index(c), c) for c in sorted(cols)) for t, cols in views.items()
        }
        # every protected source field name: redacted in dead letters whatever the entity
        names = {f for fs in by_entity.values() for f in fs}
        self.raw_names: tuple[str, ...] = tuple(sorted(names))
        self._raw_bytes = tuple(n.encode() for n in self.raw_names)
        self._escaped = tuple(f'\\"{n}\\"' for n in self.raw_names)

    def __repr__(self) -> str:  # never the keys
        return f"Protector(current={self.current!r}, keys={list(self.key_ids)!r})"

    @property
    def active(self) -> bool:
        """Whether any field is configured for encryption."""
        return bool(self.entities or self.view_columns)

    # -- single values -------------------------------------------------------------------

    @staticmethod
    def _aad(entity: str, key: str, field: str) -> bytes:
        return b"\x00".join((_AAD, entity.encode(), key.encode(), field.encode()))

    def encrypt(self, value: Any, entity: str, key: str, field: str) -> str:
        """The protected form of a JSON value, bound to (entity, row key, field)."""
        nonce = os.urandom(_NONCE)
        ct = self._enc.encrypt(nonce, _dumps(value), self._aad(entity, key, field))
        return self._prefix + _b64u(nonce + ct)

    def decrypt(self, token: str, entity: str, key: str, field: str) -> Any:
        """The JSON value a token protects; DecryptError when that is impossible."""
        if not is_token(token):
            raise DecryptError("not an encrypted value")
        kid, sep, body = token[len(PREFIX) :].partition(":")
        if not sep:
            raise DecryptError("malformed encrypted value")
        aead = self._aead.get(kid)
        if aead is None:
            raise DecryptError(
                f"value encrypted with key {kid!r}, which is not in the key ring "
                f"(have: {', '.join(self.key_ids)})"
            )
        try:
            blob = _unb64u(body)
        except (binascii.Error, ValueError):
            raise DecryptError("malformed encrypted value") from None
        if len(blob) < _NONCE + 16:
            raise DecryptError("malformed encrypted value")
        try:
            plain = aead.decrypt(blob[:_NONCE], blob[_NONCE:], self._aad(entity, key, field))
        except InvalidTag:
            raise DecryptError(
                f"value of {entity} {key!r} field {field!r} failed authentication "
                "(wrong row or field, or tampered)"
            ) from None
        return _loads(plain)

    def reencrypt(self, token: str, entity: str, key: str, field: str) -> str:
        """The same value under the current key (unchanged when already under it)."""
        if token.startswith(self._prefix):
            return token
        return self.encrypt(self.decrypt(token, entity, key, field), entity, key, field)

    # -- records.fields ----------------------------------------------------------------

    def protect_fields(self, entity: str, record_key: str, fields_json: str) -> str:
        """records.fields JSON with the entity's protected fields encrypted."""
        names = self.entities.get(entity)
        if not names or not any(f'"{n}"' in fields_json for n in names):
            return fields_json
        doc = _loads(fields_json)
        changed = False
        for n in names:
            v = doc.get(n)
            if v is not None and not is_token(v):
                doc[n] = self.encrypt(v, entity, record_key, n)
                changed = True
        return _dumps(doc, sort=True).decode() if changed else fields_json

    def decrypt_fields(self, entity: str, record_key: str, fields: str | dict) -> dict:
        """records.fields (JSON text or dict) with every encrypted value decrypted."""
        doc = _loads(fields) if isinstance(fields, str | bytes) else dict(fields)
        for n, v in doc.items():
            if is_token(v):
                doc[n] = self.decrypt(v, entity, record_key, n)
        return doc

    # -- dead letters ------------------------------------------------------------------

    def redact_raw(self, raw: str | None, context: str) -> str | None:
        """dead_letters.raw with protected field names' values encrypted.

        `context` is `<topic>:<partition>:<offset>`. Raw JSON keeps its structure
        (re-serialised compactly); raw that does not parse as JSON, or that still
        mentions a protected name inside an embedded JSON string, is encrypted whole
        (field `raw`).
        """
        names = self.raw_names
        if raw is None or not names or not any(n in raw for n in names):
            return raw
        try:
            doc = _loads(raw)
        except ValueError:
            return self.encrypt(raw, "dead_letters", context, "raw")
        if self._walk(doc, context):
            out = _dumps(doc).decode()
        else:
            out = raw
        if any(e in out for e in self._escaped):
            return self.encrypt(raw, "dead_letters", context, "raw")
        return out

    def _walk(self, doc: Any, context: str) -> bool:
        changed = False
        if isinstance(doc, dict):
            for k, v in doc.items():
                if k in self.raw_names and v is not None and not is_token(v):
                    doc[k] = self.encrypt(v, "dead_letters", context, k)
                    changed = True
                elif isinstance(v, dict | list):
                    changed |= self._walk(v, context)
        elif isinstance(doc, list):
            for v in doc:
                if isinstance(v, dict | list):
                    changed |= self._walk(v, context)
        return changed

    def decrypt_raw(self, raw: str | None, context: str) -> str | None:
        """dead_letters.raw as it arrived (modulo JSON formatting) from its redacted form."""
        if raw is None:
            return None
        if is_token(raw):
            return self.decrypt(raw, "dead_letters", context, "raw")
        if PREFIX not in raw:
            return raw
        doc = _loads(raw)
        map_tokens(doc, lambda k, v: self.decrypt(v, "dead_letters", context, k))
        return _dumps(doc).decode()

    # -- the writer's delta and the Kafka records ----------------------------------------

    def protect_delta(self, pending: dict[str, dict[tuple, tuple | None]]) -> None:
        """Encrypt, in place, the protected values of a writer's coalesced rows."""
        recs = pending.get("records")
        if recs and self.entities:
            ents = self.entities
            for pk, row in recs.items():
                if row is not None and row[1] in ents and row[4]:
                    new = self.protect_fields(row[1], row[2], row[4])
                    if new is not row[4]:
                        recs[pk] = (*row[:4], new, *row[5:])
        dls = pending.get("dead_letters")
        if dls and self.raw_names:
            for pk, row in dls.items():
                if row is not None:
                    raw = self.redact_raw(row[4], f"{row[0]}:{row[1]}:{row[2]}")
                    if raw is not row[4]:
                        dls[pk] = (*row[:4], raw)
        for table, cols in self.view_columns.items():
            rows = pending.get(table)
            if not rows:
                continue
            for pk, row in rows.items():
                if row is None:
                    continue
                key = row_context(table, row)
                new = list(row)
                for pos, name in cols:
                    v = new[pos]
                    if v is not None and not is_token(v):
                        new[pos] = self.encrypt(v, table, key, name)
                rows[pk] = tuple(new)

    def for_kafka(self, *, dlq: str, orders: str, exceptions: str) -> KafkaProtect | None:
        """The transformation of the coordinator's Kafka records, or None when none applies."""
        kp = KafkaProtect(self, dlq, orders, exceptions)
        return kp if kp.active else None


def row_context(table: str, row: Sequence[Any]) -> str:
    """The row key a protected view value is bound to (the Kafka key of the row)."""
    if table == "reconciliation_exceptions":
        return f"{row[0]}:{row[1]}"
    return str(row[0])


class KafkaProtect:
    """Encrypts protected values in `integration.dlq` and `reconciled.*` records."""

    def __init__(self, p: Protector, dlq: str, orders: str, exceptions: str) -> None:
        """Which topic carries what."""
        self.p = p
        self.dlq = dlq if p.raw_names else None
        self.columns: dict[str, tuple[str, tuple[str, ...]]] = {}
        for table, topic in (("order_status", orders), ("reconciliation_exceptions", exceptions)):
            cols = p.view_columns.get(table)
            if cols:
                self.columns[topic] = (table, tuple(c for _, c in cols))
        self.active = bool(self.dlq or self.columns)

    def __call__(self, records: list[tuple[str, bytes, bytes | None]]) -> list:
        """The records with protected values encrypted (others unchanged, same order)."""
        p = self.p
        out = []
        for rec in records:
            topic, key, value = rec
            if value is not None:
                if topic == self.dlq and any(n in value for n in p._raw_bytes):
                    doc = orjson.loads(value)
                    ctx = f"{doc.get('topic')}:{doc.get('partition')}:{doc.get('offset')}"
                    raw = doc.get("raw")
                    new = p.redact_raw(raw, ctx) if isinstance(raw, str) else raw
                    if new is not raw:
                        doc["raw"] = new
                        rec = (topic, key, orjson.dumps(doc))
                elif topic in self.columns:
                    table, cols = self.columns[topic]
                    doc = orjson.loads(value)
                    ctx = key.decode()
                    for c in cols:
                        v = doc.get(c)
                        if v is not None and not is_token(v):
                            doc[c] = p.encrypt(v, table, ctx, c)
                    rec = (topic, key, orjson.dumps(doc))
            out.append(rec)
        return out


# -- from the settings -------------------------------------------------------------------


def _ring_text(sec: Any) -> tuple[str, str] | None:
    """(key ring text, the setting it came from) of a [security] section, or None."""
    if sec.encryption_keys is not None:
        return sec.encryption_keys.get_secret_value(), "SFERP_SECURITY__ENCRYPTION_KEYS"
    if sec.encryption_keys_file:
        try:
            text = Path(sec.encryption_keys_file).read_text()
        except OSError as e:
            raise ConfigError(
                f"security.encryption_keys_file: cannot read {sec.encryption_keys_file}: "
                f"{e.strerror}"
            ) from None
        return text, "security.encryption_keys_file"
    return None


def keyring_of(sec: Any) -> tuple[dict[str, bytes], str] | None:
    """The key ring and the current key id of a [security] section, or None without a ring.

    Raises ConfigError, one line naming the setting, for every unusable combination.
    """
    found = _ring_text(sec)
    if found is None:
        if sec.encrypt_fields:
            raise ConfigError(
                "security.encrypt_fields: fields to encrypt but no key ring (set "
                "SFERP_SECURITY__ENCRYPTION_KEYS or security.encryption_keys_file)"
            )
        if sec.encryption_key_id:
            raise ConfigError("security.encryption_key_id: set, but there is no key ring")
        return None
    ring = parse_keyring(*found)
    current = sec.encryption_key_id or next(iter(ring))
    if current not in ring:
        raise ConfigError(
            f"security.encryption_key_id: no key {current!r} in the key ring "
            f"(have: {', '.join(ring)})"
        )
    return ring, current


def check_security(sec: Any) -> None:
    """Validate a [security] section (called when the settings are loaded)."""
    keyring_of(sec)


def keyring_from_settings(settings: Settings) -> tuple[dict[str, bytes], str] | None:
    """The key ring and the current key id, or None when no ring is configured."""
    return keyring_of(settings.security)


def protector_from_settings(settings: Settings, *, need_fields: bool = True) -> Protector | None:
    """The flow's Protector: None when nothing is to be encrypted (`need_fields`) or no ring.

    Raises ConfigError (one line naming the setting) for an unusable configuration.
    """
    found = keyring_from_settings(settings)
    if found is None:
        return None
    p = Protector(found[0], found[1], settings.security.encrypt_fields)
    if need_fields and not p.active:
        return None
    return p


# -- decrypting query results ------------------------------------------------------------

_FIELD_EXPR = re.compile(r"""fields\s*->>?\s*'([^']+)'""")


def decrypt_result(
    p: Protector, columns: Sequence[str], types: Sequence[str], rows: list[list[Any]]
) -> tuple[int, list[str]]:
    """Decrypt, in place, every encrypted value of a query result it can place.

    A value's context comes from the row: `entity` and `record_key` columns (records:
    the `fields` JSON column, and columns named after a field or `fields->>'<field>'`),
    `sf_order_id` (order_status), `kind` and `key` (reconciliation_exceptions),
    `topic`, `partition` and `offset` (dead_letters). Returns (values decrypted,
    problems for values left encrypted).
    """
    idx = {c: i for i, c in enumerate(columns)}
    done = 0
    problems: list[str] = []
    for row in rows:
        for i, col in enumerate(columns):
            v = row[i]
            is_json = types[i] == "JSON"
            if not (is_token(v) or (isinstance(v, str) and PREFIX in v)):
                continue
            try:
                new, n = _decrypt_cell(p, idx, row, col, v, is_json)
            except (DecryptError, ValueError) as exc:
                problems.append(f"{col}: {exc}")
                continue
            if n == 0:
                problems.append(
                    f"{col}: no row context (select the key columns: entity and record_key, "
                    "sf_order_id, kind and key, or topic, partition and offset)"
                )
                continue
            row[i] = new
            done += n
    return done, problems


def _decrypt_cell(
    p: Protector, idx: dict[str, int], row: list, col: str, v: str, is_json: bool
) -> tuple[Any, int]:
    def has(*names: str) -> bool:
        return all(n in idx and row[idx[n]] is not None for n in names)

    if has("entity", "record_key"):
        entity, rk = str(row[idx["entity"]]), str(row[idx["record_key"]])
        if col == "fields" or (is_json and not is_token(v)):
            doc = _loads(v)
            n = sum(1 for x in doc.values() if is_token(x)) if isinstance(doc, dict) else 0
            return _dumps(p.decrypt_fields(entity, rk, doc), sort=True).decode(), n
        m = _FIELD_EXPR.search(col)
        field = m.group(1) if m else col
        value = p.decrypt(v.strip('"') if is_json else v, entity, rk, field)
        return (value if isinstance(value, str) else _dumps(value).decode()), 1
    if has("topic", "partition", "offset") and col == "raw":
        ctx = f"{row[idx['topic']]}:{row[idx['partition']]}:{row[idx['offset']]}"
        return p.decrypt_raw(v, ctx), v.count(PREFIX)
    if has("kind", "key") and col == "detail":
        ctx = f"{row[idx['kind']]}:{row[idx['key']]}"
        return p.decrypt(v, "reconciliation_exceptions", ctx, col), 1
    if has("sf_order_id") and col in VIEW_TEXT_COLUMNS["order_status"]:
        return p.decrypt(v, "order_status", str(row[idx["sf_order_id"]]), col), 1
    return v, 0


def _settings_and_keys(args: argparse.Namespace) -> tuple[Settings, Protector]:
    """The settings (`--config`, `--views`) and a Protector of the key ring, which must exist."""
    from sferp.config import load_settings

    overrides = {"views": {"path": args.views}} if args.views else None
    settings = load_settings(args.config, overrides=overrides)
    found = keyring_from_settings(settings)
    if found is None:
        raise ConfigError(
            "SFERP_SECURITY__ENCRYPTION_KEYS: no key ring configured (or set "
            "security.encryption_keys_file)"
        )
    return settings, Protector(found[0], found[1])


def cli_decrypt(argv: list[str]) -> int:
    """`sferp decrypt "SQL"`: `sferp query` with protected values decrypted."""
    from sferp.query import FORMATS, QueryFailed, fetch, render

    ap = OneLineParser(
        prog="sferp decrypt",
        description="Run one read-only SQL statement against the views, like sferp query, "
        "and decrypt the encrypted values of the rows (keys from "
        "SFERP_SECURITY__ENCRYPTION_KEYS or security.encryption_keys_file).",
    )
    ap.add_argument("sql", help="a read-only statement that selects the rows' key columns too")
    ap.add_argument("--config", help="TOML configuration file (for [security] and [views])")
    ap.add_argument("--views", help="views file (default: views.path)")
    ap.add_argument("--format", choices=FORMATS, default="table")
    ap.add_argument("--max-rows", type=int_between(1, MAX_ROWS), default=None)
    ap.add_argument("--timeout", type=timeout_seconds, default=30.0)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    settings, p = _settings_and_keys(args)
    try:
        result = fetch(
            args.sql, settings.views.path, max_rows=args.max_rows, timeout_s=args.timeout
        )
    except QueryFailed as exc:
        print(f"sferp decrypt: {exc}", file=sys.stderr)
        return exc.code
    _, problems = decrypt_result(p, result.columns, result.types, result.rows)
    render(result, args.format, sys.stdout)
    if problems:
        print(
            f"sferp decrypt: {len(problems)} value(s) left encrypted; first: {problems[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


# -- re-encryption under the current key (`sferp rekey`) -----------------------------------


def _reencrypt_json_tokens(p: Protector, text: str, entity: str, key: str) -> tuple[str, int]:
    """A JSON object's token values re-encrypted (field = the object key); (text, count)."""
    doc = _loads(text)
    n = map_tokens(doc, lambda k, v: p.reencrypt(v, entity, key, k))
    return (_dumps(doc, sort=entity != "dead_letters").decode() if n else text), n


class RekeyError(RuntimeError):
    """The views file cannot be re-encrypted now (a running flow holds it)."""


def rekey(views_path: str, p: Protector, *, topics: dict[str, str] | None = None) -> dict[str, int]:
    """Re-encrypt every value of a stopped flow's files that is not under the current key.

    Covers the views (records.fields, protected view columns, dead_letters.raw), the
    writer's undo log and the Kafka mirror. Values Kafka consumers already hold are
    not changed: keep the old key for as long as they may need it.
    """
    from sferp.views_file import open_stopped, rewrite, tables  # duckdb: only when used

    con = open_stopped(views_path, "rekey", RekeyError)
    counts: dict[str, int] = {}
    current = f"{PREFIX}{p.current}:"
    with rewrite(con):
        present = tables(con)
        for schema, table, base in [
            (s, t, t if s == "main" else t[len("undo_") :])
            for s, t in sorted(present)
            if (s == "main" and t in ("records", "dead_letters", *VIEW_TEXT_COLUMNS))
            or (s == INTERNAL_SCHEMA and t.startswith("undo_"))
        ]:
            cols = {"records": ["fields"], "dead_letters": ["raw"]}.get(
                base, list(VIEW_TEXT_COLUMNS.get(base, ()))
            )
            if not cols:
                continue
            name = f"{schema}.{table}"
            ctx_cols = {
                "records": ["entity", "record_key"],
                "dead_letters": ["topic", "partition", "offset"],
                "order_status": ["sf_order_id"],
                "reconciliation_exceptions": ["kind", "key"],
            }[base]
            sel = ", ".join(f'"{c}"' for c in ctx_cols)
            for col in cols:
                rows = con.execute(
                    f'SELECT rowid, {sel}, CAST("{col}" AS VARCHAR) FROM {name} '
                    f"WHERE contains(CAST(\"{col}\" AS VARCHAR), '{PREFIX}')"
                ).fetchall()
                ids, vals, n = [], [], 0
                for r in rows:
                    rid, ctx, v = r[0], r[1:-1], r[-1]
                    if base == "records":
                        new, k = _reencrypt_json_tokens(p, v, str(ctx[0]), str(ctx[1]))
                    elif base == "dead_letters":
                        c = f"{ctx[0]}:{ctx[1]}:{ctx[2]}"
                        if is_token(v):
                            new = p.reencrypt(v, "dead_letters", c, "raw")
                            k = int(new != v)
                        else:
                            new, k = _reencrypt_json_tokens(p, v, "dead_letters", c)
                    else:
                        if v.startswith(current) or not is_token(v):
                            continue
                        new, k = p.reencrypt(v, base, row_context(base, ctx), col), 1
                    if k:
                        ids.append(rid)
                        vals.append(new)
                        n += k
                if ids:
                    cast = "CAST(u.v AS JSON)" if base == "records" else "u.v"
                    con.execute(
                        f'UPDATE {name} SET "{col}" = {cast} FROM (SELECT unnest($1::BIGINT[]) '
                        f"AS rid, unnest($2::VARCHAR[]) AS v) u WHERE {name}.rowid = u.rid",
                        [ids, vals],
                    )
                if n:
                    counts[name] = counts.get(name, 0) + n
    n = _rekey_mirror(p, f"{views_path}.kafka.sqlite3", topics or {})
    if n:
        counts["kafka mirror"] = n
    return counts


def _rekey_mirror(p: Protector, path: str, topics: dict[str, str]) -> int:
    import sqlite3

    if not os.path.exists(path):
        return 0
    tables = {
        topics.get("orders", "reconciled.orders"): "order_status",
        topics.get("exceptions", "reconciled.exceptions"): "reconciliation_exceptions",
    }
    con = sqlite3.connect(path, isolation_level=None)
    n = 0
    try:
        con.execute("BEGIN IMMEDIATE")
        for table in ("mirror", "undo"):
            keycols = "rowid, topic, key, value"
            updates = []
            for rid, topic, key, value in con.execute(f"SELECT {keycols} FROM {table}"):
                view = tables.get(topic)
                if view is None or value is None or PREFIX.encode() not in bytes(value):
                    continue
                doc = orjson.loads(bytes(value))
                ctx = bytes(key).decode()
                changed = 0
                for c in VIEW_TEXT_COLUMNS[view]:
                    v = doc.get(c)
                    if is_token(v):
                        new = p.reencrypt(v, view, ctx, c)
                        if new != v:
                            doc[c] = new
                            changed += 1
                if changed:
                    updates.append((orjson.dumps(doc), rid))
                    n += changed
            con.executemany(f"UPDATE {table} SET value = ? WHERE rowid = ?", updates)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return n


def cli_rekey(argv: list[str]) -> int:
    """`sferp rekey [--views PATH] [--config FILE]`: re-encrypt under the current key."""
    ap = OneLineParser(
        prog="sferp rekey",
        description="Re-encrypt every encrypted value of a stopped flow's views file, undo "
        "log and Kafka mirror with security.encryption_key_id (key rotation).",
    )
    ap.add_argument("--config", help="TOML configuration file")
    ap.add_argument("--views", help="views file (default: views.path)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    settings, p = _settings_and_keys(args)
    if not os.path.exists(settings.views.path):
        raise ConfigError(f"--views: no views file at {settings.views.path}")
    t = settings.topics
    try:
        counts = rekey(
            settings.views.path,
            p,
            topics={"orders": t.out_orders, "exceptions": t.out_exceptions},
        )
    except RekeyError as exc:
        print(f"sferp rekey: {exc}", file=sys.stderr)
        return 1
    total = sum(counts.values())
    detail = ", ".join(f"{k} {v}" for k, v in counts.items()) or "nothing to do"
    print(f"re-encrypted {total} value(s) with key {p.current!r}: {detail}")
    return 0
