"""Pieces shared by the Salesforce and ERP decoders: reason codes, JSON parsing, numbers.

Everything here is on the per-message hot path except the fallbacks, which run
only for messages orjson refuses (docs/semantics.md §1, steps 3 and 4).
"""

from __future__ import annotations

import base64
import json
import re
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Any

import orjson

from sferp.events import DeadLetter, RawMessage, event_time_in_range

# Dead-letter reason codes (docs/semantics.md §1), exact strings.
TOO_LARGE = "too_large"
NOT_JSON = "not_json"
TOO_DEEP = "too_deep"
TOO_MANY_FIELDS = "too_many_fields"
NOT_AN_OBJECT = "not_an_object"
MISSING_HEADER = "missing_header"
BAD_HEADER = "bad_header"
BAD_NUMBER = "bad_number"
BAD_ENVELOPE = "bad_envelope"
MISSING_PRIMARY_KEY = "missing_primary_key"

REASONS = frozenset(
    {
        TOO_LARGE,
        NOT_JSON,
        TOO_DEEP,
        TOO_MANY_FIELDS,
        NOT_AN_OBJECT,
        MISSING_HEADER,
        BAD_HEADER,
        BAD_NUMBER,
        BAD_ENVELOPE,
        MISSING_PRIMARY_KEY,
    }
)

# `Ignored.why` values.
IGNORED_TOMBSTONE = "tombstone"
IGNORED_ENTITY = "entity"  # a Salesforce entity the views do not use
IGNORED_TRUNCATE = "op_t"
IGNORED_MESSAGE = "op_m"

RAW_LIMIT = 65_536

_new = tuple.__new__


def raw_text(value: bytes | None) -> str:
    """The `raw` column: UTF-8 with invalid bytes replaced, cut to the first 65,536 bytes."""
    if value is None:
        return ""
    return bytes(value[:RAW_LIMIT]).decode("utf-8", "replace")


def dead_letter(msg: RawMessage, reason: str) -> DeadLetter:
    """A dead letter carrying the message's coordinates and raw text."""
    return _new(DeadLetter, (msg.topic, msg.partition, msg.offset, reason, raw_text(msg.value)))


class ReparseExact(Exception):
    """Raised by a form decoder when a value orjson read as a double must be an integer.

    orjson reads integers beyond 64 bits as doubles; the decoder then asks for the
    message to be parsed again with the standard library, which keeps them exact.
    """


def is_big_integral(x: object) -> bool:
    """True for a double that may stand for an integer literal beyond 64 bits.

    -2**63 counts: it is what orjson makes of -2**63 - 1 (while -2**63 itself is an int).
    """
    return type(x) is float and x.is_integer() and not (-(2**63) < x < 2**64)


def ignored_event_time(value: Any) -> int | None:
    """The event time of an ignored event: `value` when it is an integer in the event-time
    range (docs/semantics.md, "Ranges"), else None. An integer literal beyond 64 bits,
    which orjson reads as a float, is out of that range either way."""
    return value if type(value) is int and event_time_in_range(value) else None


def holds_big_integral(values: Any) -> bool:
    """True if any value (nested lists and objects included) may be an integer beyond 64 bits.

    Checked on the fields of every Change decoded from an orjson parse, so that
    such integers reach `records.fields` and the views exact (as the reference
    model keeps them), not as the double orjson made of them.
    """
    for v in values:
        t = type(v)
        if t is str:
            continue
        if t is float:
            if (v >= 9.2e18 or v <= -9.2e18) and is_big_integral(v):
                return True
        elif t is dict:
            if holds_big_integral(v.values()):
                return True
        elif t is list and holds_big_integral(v):
            return True
    return False


# --- JSON ------------------------------------------------------------------


class _Reject(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Reject(name)


_STD_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def parse_json_fallback(value: bytes) -> tuple[Any, str | None]:
    """Parse what orjson refused: `(obj, None)` or `(None, reason)`.

    Accepts valid JSON that orjson refuses: integers too large for a double are
    kept exact, numbers that overflow a double read as infinity (numeric columns
    then reject them as `bad_number`). Rejects as `not_json`: invalid UTF-8, a
    BOM, NaN/Infinity literals, integer literals beyond Python's 4,300-digit
    conversion limit (their conversion is quadratic), and escaped lone
    surrogates (no UTF-8 text can hold them, so nothing downstream could store
    them). Documents nested beyond what the parsers can recurse into are
    validated iteratively and reported `too_deep`.
    """
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None, NOT_JSON
    try:
        obj = _STD_DECODER.decode(text)
    except RecursionError:
        return None, (TOO_DEEP if _valid_json_iterative(text) else NOT_JSON)
    except ValueError:  # JSONDecodeError, _Reject, the integer digit limit
        return None, NOT_JSON
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(obj):
        return None, NOT_JSON
    return obj, None


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


# The rare path below validates JSON too deep for the parsers' recursion without
# a Python step per character: regular expressions (which run in C) replace
# every string by \x00 and every number or literal by \x01, and drop
# whitespace; a small state machine then walks the remaining tokens. Neither
# control character can occur in valid JSON text, so a document holding one is
# refused first and the placeholders cannot be confused with its content.
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+"')
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?|true|false|null")
# An integer literal beyond Python's 4,300-digit conversion limit (no '.', 'e' around it).
_HUGE_INT = re.compile(r"(?<![0-9.eE+-])-?[0-9]{4301,}+(?![.eE])")
_NOT_TOKEN = str.maketrans("", "", "\x00\x01[]{}:,")
_NO_WS = str.maketrans("", "", " \t\n\r")
# state -> token -> next state. States: v value, e value or "]" (array just
# opened), k key or "}" (object just opened), K key, c colon, a after a value.
# Tokens: "\x00" string, "\x01" number or literal, and the punctuation.
_STEP = {
    "v": {"\x00": "a", "\x01": "a", "[": "e", "{": "k"},
    "e": {"\x00": "a", "\x01": "a", "[": "e", "{": "k", "]": "]"},
    "k": {"\x00": "c", "}": "}"},
    "K": {"\x00": "c"},
    "c": {":": "v"},
    "a": {",": ",", "]": "]", "}": "}"},
}


def _valid_json_iterative(text: str) -> bool:
    """Validate JSON text of any depth without recursion (rare path only).

    Rejects what `parse_json_fallback` rejects: NaN/Infinity, integer literals
    beyond 4,300 digits, escaped lone surrogates.
    """
    if "\x00" in text or "\x01" in text:
        return False  # raw control characters are never valid JSON
    strings_out = _STRING.sub("\x00", text)
    if _HUGE_INT.search(strings_out) is not None:
        return False  # the digit limit, as in parse_json_fallback
    tokens = _SCALAR.sub("\x01", strings_out).translate(_NO_WS)
    if tokens.translate(_NOT_TOKEN):
        return False  # something that is no JSON token
    stack: list[str] = []
    state = "v"
    step = _STEP
    for tok in tokens:
        nxt = step[state].get(tok)
        if nxt is None:
            return False
        if nxt == "a" or nxt == "c" or nxt == "v":
            state = nxt
        elif nxt == "e" or nxt == "k":
            stack.append(tok)
            state = nxt
        elif nxt == ",":
            if not stack:
                return False  # a token after the complete document
            state = "K" if stack[-1] == "{" else "v"
        else:  # a closing bracket: must close the innermost open container
            if not stack or stack.pop() != ("[" if nxt == "]" else "{"):
                return False
            state = "a"
    if state != "a" or stack:
        return False  # no document, or one cut short
    if _SURROGATE_ESCAPE.search(text) is not None:
        for m in _STRING.finditer(text):
            tok = m.group()
            if "\\u" in tok and _has_lone_surrogate(json.loads(tok)):
                return False
    return True


def deeper_than(obj: Any, limit: int) -> bool:
    """True when `obj` nests containers more than `limit` levels (top container = 1)."""
    return not _within(obj, limit)


def _within(obj: Any, budget: int) -> bool:
    if budget <= 0:
        return False
    budget -= 1
    values = obj.values() if type(obj) is dict else obj
    for v in values:
        t = type(v)
        if (t is dict or t is list) and not _within(v, budget):
            return False
    return True


# --- numbers ---------------------------------------------------------------


# A plain decimal as JSON and Debezium's string mode write one: ASCII digits, an
# optional sign, point and exponent (surrounding spaces allowed, as before). Python's
# Decimal() alone also took underscores ("1_000") and other scripts' digits ("١٢"
# became 12).
_DECIMAL_TEXT = re.compile(
    r"[ \t\n\r]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\n\r]*"
)


# Significant digits every double holds exactly: a JSON number with more is read
# from its text (CONTRACT §2: amounts are exact decimals parsed from the JSON text).
DOUBLE_DIGITS = 15
# An exponent beyond this leaves the double's range either way (inf or 0 stay as read).
_MAX_TEXT_EXPONENT = 400
_NUMBER_AFTER_KEY = re.compile(
    rb"[ \t\n\r]*:[ \t\n\r]*(-?([0-9]+)(?:\.([0-9]+))?(?:[eE]([-+]?[0-9]+))?)"
)
# key -> (its JSON text, a search for it followed by 16 digits or points)
_LONG_AFTER_KEY: dict[str, tuple[bytes, re.Pattern[bytes]]] = {}


def exact_number_text(raw: bytes, key: str, v: float) -> str | None:
    """The exact decimal text (plain notation) of the JSON number `raw` gives `key`, when
    it has more significant digits than a double holds; None when the double `v` is exact.

    orjson reads every non-integer number as a double, so `0.12500000000000001` would
    become 0.125. Called for the double of a numeric column only; the number is found
    after `"key":` in the raw text, among occurrences whose double is `v` (Debezium's
    `before` image may carry the same column). Two different such texts with the same
    double (which only a crafted message has) keep the double.
    """
    cached = _LONG_AFTER_KEY.get(key)
    if cached is None:
        needle = orjson.dumps(key)
        probe = re.compile(re.escape(needle) + rb"[ \t\n\r]*:[ \t\n\r]*-?[0-9.]{16}")
        cached = _LONG_AFTER_KEY[key] = (needle, probe)
    needle, probe = cached
    if probe.search(raw) is None:  # a necessary condition, by sre's literal-prefix search
        return None
    found = None
    i = raw.find(needle)
    while i >= 0:
        i += len(needle)
        m = _NUMBER_AFTER_KEY.match(raw, i)
        if m is not None:
            whole, integral, fraction, exponent = m.groups()
            digits = (integral + (fraction or b"")).strip(b"0")
            if (
                (fraction is not None or exponent is not None)  # integers: holds_big_integral
                and len(digits) > DOUBLE_DIGITS
                and (exponent is None or abs(int(exponent)) <= _MAX_TEXT_EXPONENT)
                and float(whole) == v
            ):
                text = whole.decode()
                if found is not None and text != found:
                    return None
                found = text
        i = raw.find(needle, i)
    return None if found is None else format(Decimal(found), "f")


def is_decimal_string(s: str) -> bool:
    """A string holding a plain finite decimal (`"12.50"`, `"-3"`, `"1.2E+3"`, `" 2.5 "`)."""
    return _DECIMAL_TEXT.fullmatch(s) is not None


# What the typed view columns hold (docs/semantics.md §1): an amount must round
# (half-even, 2 places) into DECIMAL(18,2), so below 9,999,999,999,999,999.995 in
# magnitude; a quantity is summed into BIGINT columns, so each is below 10^15 (the
# sums of up to 9,000 of them fit). Larger values are `bad_number`: dead-lettered
# with a reason instead of failing the views' commit or their exact arithmetic.
# A kind is its bound for JSON numbers: Python compares an int with a float
# exactly, and a double below 1e16 rounds to cents below 10^16.
AMOUNT = 1e16
QUANTITY = 1e15
EXACT_LIMITS = {AMOUNT: Decimal("9999999999999999.995"), QUANTITY: Decimal(10**15)}


def in_view_range(v: object, kind: float) -> bool:
    """A value that passed the number check fits the view columns of `kind` (AMOUNT, QUANTITY).

    The decoders test JSON numbers inline (`-kind < v < kind`) and call this for strings.
    """
    if type(v) is str:
        return Decimal(v).copy_abs() < EXACT_LIMITS[kind]  # (abs() may overflow)
    return -kind < v < kind  # type: ignore[operator]


def is_number_value(v: object) -> bool:
    """Valid numeric value: a finite JSON number (not bool) or a decimal string; null excluded."""
    t = type(v)
    if t is int:
        return True
    if t is float:
        return v - v == 0.0  # type: ignore[operator]  # false for inf
    return t is str and is_decimal_string(v)  # type: ignore[arg-type]


# Debezium precise decimals: at most this many bytes of unscaled value (about 2,466
# digits, beyond PostgreSQL's largest declared precision of 1,000) and this scale range.
MAX_DECIMAL_BYTES = 1024
MAX_ABS_SCALE = 16_383
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


def decode_base64_decimal(s: str, scale: int) -> str | None:
    """Debezium's precise decimal (base64 of the big-endian two's-complement unscaled value).

    Returns the decimal as Debezium's string mode would send it (plain notation
    with the scale, `"12.50"`), or None when `s` is not such a value.
    """
    if not s or len(s) > (MAX_DECIMAL_BYTES * 4) // 3 + 4:
        return None
    try:
        raw = base64.b64decode(s, validate=True)
    except ValueError:  # binascii.Error, or text that is not ASCII
        return None
    if not raw or len(raw) > MAX_DECIMAL_BYTES:
        return None
    unscaled = int.from_bytes(raw, "big", signed=True)
    return format(Decimal(unscaled).scaleb(-scale, _EXACT), "f")


def dumps_compact(value: Any) -> str:
    """Compact JSON of a decoded value; integers beyond 64 bits kept exact (orjson refuses them)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads_exact(text: str) -> Any:
    """Parse JSON text this flow wrote (a record key): integers beyond 64 bits stay exact.

    orjson reads them as floats, which would turn `{"order_no":123456789012345678901234}`
    into order number "1.2345678901234569e+23".
    """
    return _STD_DECODER.decode(text)


def dumps_compact_sorted(obj: dict[str, Any]) -> str:
    """Compact JSON with sorted keys (record keys); integers beyond 64 bits kept exact."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
