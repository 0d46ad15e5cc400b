"""Salesforce record Ids: the 15-character form to the 18-character case-safe form.

Salesforce Ids are case-sensitive in their 15-character form; the 18-character
form appends a 3-character checksum of the capitalisation, so the ids compare
equal in case-insensitive systems. sferp compares Ids only in the 18-character
form (contract §1.1, docs/semantics.md §1.1).
"""

from __future__ import annotations

__all__ = ["normalize_id", "suffix", "to18"]

_SUFFIX_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_CACHE: dict[str, str] = {}
_CACHE_MAX = 100_000


def suffix(id15: str) -> str:
    """The 3-character checksum: per 5-character chunk, a bit per upper-case letter (A-Z0-5)."""
    out = []
    for start in (0, 5, 10):
        flags = 0
        for bit, ch in enumerate(id15[start : start + 5]):
            if "A" <= ch <= "Z":
                flags |= 1 << bit
        out.append(_SUFFIX_ALPHABET[flags])
    return "".join(out)


def to18(value: str) -> str:
    """The comparable form of an Id: 15 ASCII letters/digits get the suffix, all else unchanged.

    Results are cached (bounded), since the same Ids recur on every event of a record.
    """
    if len(value) != 15:
        return value
    hit = _CACHE.get(value)
    if hit is not None:
        return hit
    if not (value.isascii() and value.isalnum()):
        return value
    full = value + suffix(value)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()  # bounded memory; the working set refills it at once
    _CACHE[value] = full
    return full


normalize_id = to18
