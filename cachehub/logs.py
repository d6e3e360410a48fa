"""Log records as JSON lines (``cachehub daemon --log-format json``), for log collectors
(Kubernetes, Loki, Elasticsearch) that parse each line instead of guessing at text."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    ``exception`` when there is one, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        return json.dumps(body, default=str)
