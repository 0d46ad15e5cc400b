"""The command line's parser of arguments: bad usage is one line on stderr and exit 2.

CONTRACT §4: "2 bad usage or configuration (with a one-line message naming the
problem)". argparse's own `error()` prints the usage block before the message;
every `sferp` subcommand parses with `OneLineParser` instead (`-h` still shows
the full help).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse that exits 2 with a single line naming the problem on bad usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


MAX_TIMEOUT_S = 86_400.0
MAX_ROWS = 10**12  # --max-rows: more than DuckDB's fetch takes is an error, not a crash


def timeout_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, above 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT_S:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_TIMEOUT_S:g} s")
    return value


def int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (no upper end when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            upper = f" and at most {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"must be at least {low}{upper}, got {value}")
        return value

    return parse
