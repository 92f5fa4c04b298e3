"""Structured logging: one vocabulary, JSON lines for machines, text for people, no secrets.

Under systemd, when stderr is the journal (``$JOURNAL_STREAM``, see :func:`stderr_is_journal`),
each line starts with ``<N>``, its syslog priority, so ``journalctl -p warning`` filters; anywhere
else lines are plain.

Hot paths never format a message per frame: they count, and call :class:`RateLimitedLog` which
emits at most one line per key per interval with the number of suppressed repeats.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
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


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (journald's ``PRIORITY``): DEBUG 7, INFO 6,
    WARNING 4, ERROR 3, CRITICAL 2; a custom level takes the standard level below it."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True when ``fd`` is the stream systemd connected to the journal.

    The documented check (systemd.exec, ``$JOURNAL_STREAM``): the variable holds the device and
    inode of that stream as ``DEV:INO``, and a process must compare them with its own stderr,
    because the variable is inherited by children whose stderr was redirected elsewhere (a pipe,
    a file): those must get plain lines, not ``<N>`` prefixes.
    """
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalPriorityFormatter(logging.Formatter):
    """Prefixes every line of another formatter's output with ``<N>``, the record's syslog
    priority, so that ``journalctl -p warning -u UNIT`` filters the units' logs (journald reads
    the prefix on each line of a stream and strips it: ``SyslogLevelPrefix=``, on by default)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = self.inner.format(record)
        # a JSON line is one line; a text record with a traceback is several, each prefixed
        return prefix + text.replace("\n", "\n" + prefix)


def setup_logging(fmt: str = "auto", level: str = "INFO") -> None:
    """Configure the root logger once per process (format chosen by --log-format / env).
    Under systemd with stderr connected to the journal, each line carries its priority."""
    fmt = os.environ.get("PIPELINE_LOG_FORMAT", fmt)
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if stderr_is_journal(fd=_stderr_fd()):
        formatter = JournalPriorityFormatter(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("PIPELINE_LOG_LEVEL", level).upper())


def _stderr_fd() -> int:
    """sys.stderr's descriptor (2 unless replaced by something without one)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return -1


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
