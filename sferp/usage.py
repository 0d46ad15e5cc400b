"""The command line's parser of arguments: bad usage is one line on stderr and exit 2.

CONTRACT §4: "2 bad usage or configuration (with a one-line message naming the
problem)". argparse's own `error()` prints the usage block before the message;
every `sferp` subcommand parses with `OneLineParser` instead (`-h` still shows
the full help).
"""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse that exits 2 with a single line naming the problem on bad usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)
