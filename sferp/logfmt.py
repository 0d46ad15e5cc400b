"""Log line formats of `sferp run`: plain text (default) or one JSON object per line.

The JSON form is built with `json.dumps`, so quotes, backslashes, newlines and
control characters in messages are escaped and every line parses on its own
(log shippers such as Fluent Bit or Vector read it without a regex).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601 UTC), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single line of JSON."""
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def first_line(exc: BaseException) -> str:
    """An exception in one line for a one-line error: its message's first line, or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for `--log-format` (`text` or `json`)."""
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)
