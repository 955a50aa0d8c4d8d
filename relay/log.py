"""Structured logging: one line per event, `event key=value ...` or one JSON object.

    from relay.log import get_logger
    log = get_logger("smtp")
    log.info("message", sid=sid, size=n, rcpts=3, outcome="250")

Client-facing text stays short; details belong in these fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FORMAT = "text"


def _quote(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s)
    return s


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if _FORMAT == "json":
            obj = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                   "event": record.getMessage(), **fields}
            if record.exc_info:
                obj["exc"] = self.formatException(record.exc_info)
            return json.dumps(obj, default=str)
        parts = [ts, record.levelname.lower(), record.name, record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StructLogger:
    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(f"relay.{name}")

    def _emit(self, level: int, event: str, exc_info: Any = None, **fields: Any) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, **fields)

    def error(self, event: str, exc_info: Any = None, **fields: Any) -> None:
        self._emit(logging.ERROR, event, exc_info=exc_info, **fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(name)


def setup(fmt: str = "text", level: str = "INFO", stream: Any = None) -> None:
    global _FORMAT
    _FORMAT = fmt
    root = logging.getLogger("relay")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
