"""Log output for the server process: text lines for people, or `--log-format json` for collectors.

JSON is one object per line: time, level, logger, message, and the structured fields a record carries
(the access log's request_id, method, path, status, model, user, ms), so that a log pipeline need not
parse the message text.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry |= {key: value for key, value in vars(record).items() if key not in _STANDARD}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str, log_format: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every request at INFO: a router's probes and a node's heartbeats, several a second. Our own
    # lines say what matters about them (a node out of rotation, a router unreachable); --log-level debug shows all.
    root = logging.getLogger().level
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(root if root <= logging.DEBUG else max(root, logging.WARNING))
