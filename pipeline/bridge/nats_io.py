"""NATS connection and JetStream stream set-up shared by the publisher and the mirror.

Both processes keep one connection for their whole life and never exit because the server went
away: the client reconnects forever by itself (``max_reconnect_attempts=-1``), a first connection
that fails is retried here with backoff, and the processes' loops treat every NATS error as "start
this session over from what the stream holds", which is always correct (see
:mod:`pipeline.bridge.publish`). ``connected`` / ``reconnects`` are kept for the metrics blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError

log = logging.getLogger("pipeline.bridge")


class BridgeConfigError(Exception):
    """A setting the bridge cannot run with (a stream of another shape, a foreign stream):
    exit 2, a restart would not fix it."""


@dataclass
class Link:
    """One NATS connection and what the metrics say about it."""

    nc: NATS | None = None
    connected: bool = False
    reconnects: int = 0
    disconnected_since: float = 0.0  #: monotonic time the link went down (0: up)
    session_broken: bool = False  #: set on disconnect: the running session must start over
    closing: bool = False  #: we are closing it: a disconnect is expected, not a warning

    def down_for_s(self) -> float:
        return time.monotonic() - self.disconnected_since if self.disconnected_since else 0.0


async def connect(url: str, name: str, link: Link, stop: asyncio.Event) -> NATS | None:
    """Connect to ``url`` (retrying with backoff until ``stop``); None if stopped first."""
    delay = 0.1

    async def disconnected() -> None:
        if link.connected and not link.closing:
            log.warning("nats disconnected", extra={"url": url})
        link.connected = False
        link.session_broken = True
        if not link.disconnected_since:
            link.disconnected_since = time.monotonic()

    async def reconnected() -> None:
        link.connected = True
        link.reconnects += 1
        link.disconnected_since = 0.0
        log.info("nats reconnected", extra={"url": url, "reconnects": link.reconnects})

    async def error(exc: Exception) -> None:
        log.debug("nats client error", extra={"error": repr(exc)})

    while not stop.is_set():
        try:
            nc = await nats.connect(
                servers=[url], name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=0.25, connect_timeout=2, ping_interval=5,
                max_outstanding_pings=2, disconnected_cb=disconnected,
                reconnected_cb=reconnected, error_cb=error,
            )  # fmt: skip
        except Exception as exc:  # the client raises several unrelated types for "no server"
            if not link.disconnected_since:
                link.disconnected_since = time.monotonic()
            log.warning("nats connect failed; retrying", extra={"url": url, "error": repr(exc)})
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 2.0)
            continue
        link.nc = nc
        link.connected = True
        link.disconnected_since = 0.0
        log.info("nats connected", extra={"url": url})
        return nc
    return None


async def ensure_stream(
    js: Any, name: str, prefix: str, *, max_age_s: float, max_bytes: int, dedupe_window_s: float
) -> Any:
    """The stream ``name`` capturing ``<prefix>.>``, created (file storage) if absent. An
    existing stream that does not capture our subjects is refused, not changed: it belongs to
    someone else's configuration."""
    subject = f"{prefix}.>"
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        cfg = api.StreamConfig(
            name=name, subjects=[subject], storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
            max_age=max_age_s if max_age_s > 0 else None,
            max_bytes=max_bytes if max_bytes > 0 else None,
            duplicate_window=dedupe_window_s, allow_direct=True,
        )  # fmt: skip
        try:
            info = await js.add_stream(cfg)
        except BadRequestError as exc:  # e.g. the subjects overlap another stream's
            raise BridgeConfigError(
                f"the server refuses stream {name!r} on {subject!r}: {exc.description}"
            ) from None
        log.info(
            "stream created",
            extra={"stream": name, "subject": subject, "max_age_s": max_age_s,
                   "max_bytes": max_bytes},
        )  # fmt: skip
        return info
    subjects = list(info.config.subjects or [])
    if subject not in subjects:
        raise BridgeConfigError(
            f"stream {name!r} captures {subjects}, not {subject!r}: another prefix or stream name"
        )
    return info


class Backoff:
    """Delays between sessions that keep failing (0.05 s doubling to 2 s), so a server that
    refuses us for a while gets a few requests a second, not a log line every 50 ms; reset by a
    session that made progress."""

    def __init__(self, first_s: float = 0.05, cap_s: float = 2.0) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self.delay_s = first_s

    def next(self) -> float:
        d = self.delay_s
        self.delay_s = min(self.cap_s, d * 2)
        return d

    def reset(self) -> None:
        self.delay_s = self.first_s


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless stopped first; True if stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
