"""Structured logging: one vocabulary, JSON lines for machines, text for people, no secrets.

Hot paths never format a message per frame: they count, and call :class:`RateLimitedLog` which
emits at most one line per key per interval with the number of suppressed repeats.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_SECRET_KEYS = ("signature", "private", "secret", "passphrase", "seed")


def _scrub(key: str, value: Any) -> Any:
    if any(s in key.lower() for s in _SECRET_KEYS):
        return "<redacted>"
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = _scrub(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={_scrub(k, v)}"
            for k, v in vars(record).items()
            if k not in _RESERVED and not k.startswith("_")
        )
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
        base += f"{record.levelname[0]} {record.name}: {record.getMessage()}"
        if extras:
            base += " " + extras
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def setup_logging(fmt: str = "auto", level: str = "INFO") -> None:
    """Configure the root logger once per process (format chosen by --log-format / env)."""
    fmt = os.environ.get("PIPELINE_LOG_FORMAT", fmt)
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("PIPELINE_LOG_LEVEL", level).upper())


class RateLimitedLog:
    """At most one log line per key per ``interval_s``; repeats are counted, not lost."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        self._logger.warning(msg, extra={"event": key, "suppressed": suppressed, **fields})
