"""The one REST client of an ingest process: one keep-alive connection, one weight budget.

The policy is pure (:mod:`pipeline.marketdata.restbudget`: what a request weighs, when it may
go, which waiting request goes next); this is its thin asyncio shell. Requests go one at a time
over one :class:`~pipeline.net.http.HttpConnection`: serial requests keep the budget exact
(each answer's ``X-MBX-USED-WEIGHT-1M`` is read before the next request is charged) and one
connection is what Binance's per-IP connection limits like best.

Calling contract::

    client = RestClient(base_url, budget, headers={"X-MBX-TIME-UNIT": "MICROSECOND"})
    body = await client.get_json("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 1000},
                                 weight=50, priority=Priority.SNAPSHOT)

``get_json`` waits for its turn and its budget (cancellable), then raises
:class:`RestLimited` for a 429 / 418 (the budget has already learnt the ``Retry-After``: the
caller just tries again later and will be held back), :class:`~pipeline.net.http.HttpError`
for anything else that is not a 2xx JSON answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from pipeline.marketdata.restbudget import Priority, RestBudget, RestQueue
from pipeline.net.http import HttpConnection, HttpError

log = logging.getLogger("pipeline.rest")


class RestLimited(HttpError):
    """The exchange answered 429 (slow down) or 418 (banned); ``retry_after_s`` from its
    ``Retry-After`` header (None when it sent none)."""

    def __init__(self, message: str, status: int, retry_after_s: float | None,
                 body: bytes = b"") -> None:
        super().__init__(message, status, body)
        self.retry_after_s = retry_after_s


def _header_int(headers: dict[str, str], name: str) -> int | None:
    v = headers.get(name)
    if v is None or not v.strip().isdigit() or len(v.strip()) > 18:
        return None  # absent or garbage: learn nothing rather than something wrong
    return int(v)


class RestClient:
    """One origin, one connection, one budget (module docstring)."""

    def __init__(self, base_url: str, budget: RestBudget, *,
                 headers: dict[str, str] | None = None, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.conn = HttpConnection(base_url)
        self.budget = budget
        self.queue = RestQueue()
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.clock = clock
        self._cond = asyncio.Condition()
        self._busy = False
        self.requests = 0
        self.wait_s = 0.0  # total time requests spent waiting for the budget
        self._ban_logged_until = 0.0

    async def _turn(self, priority: Priority, weight: int, since: float) -> int:
        """Wait until this request heads the queue and the budget affords it; charge it.
        Returns the window it was charged in."""
        ticket = self.queue.submit(priority, weight, since)
        waited = False
        try:
            async with self._cond:
                while True:
                    if not self._busy and self.queue.head() is ticket:
                        now = self.clock()
                        delay = self.budget.delay(weight, now)
                        if delay <= 0:
                            break
                        if not waited:
                            waited = True
                            self.budget.waits += 1
                        self._log_ban(now)
                        t0 = time.monotonic()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._cond.wait(), delay)
                        self.wait_s += time.monotonic() - t0
                    else:
                        await self._cond.wait()
                self.queue.pop(ticket)
                self._busy = True
                return self.budget.charge(weight, self.clock())
        except BaseException:
            self.queue.discard(ticket)
            async with self._cond:
                self._cond.notify_all()
            raise

    async def _done(self) -> None:
        async with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _log_ban(self, now: float) -> None:
        b = self.budget
        if b.banned(now) and b.banned_until > self._ban_logged_until:
            self._ban_logged_until = b.banned_until
            log.error("REST banned by the exchange (HTTP 418): no REST request until the ban "
                      "ends; snapshots and backfills wait", extra={
                          "banned_for_s": round(b.banned_until - now, 3)})

    async def get(self, path: str, params: dict[str, Any] | None, *, weight: int,
                  priority: Priority, since: float = 0.0,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One paced GET: (status, headers, body) of any answer; 429/418 are learnt by the
        budget before they are returned."""
        window = await self._turn(priority, weight, since)
        try:
            self.requests += 1
            hdrs = {**self.headers, **headers} if headers else self.headers
            status, rh, body = await self.conn.get(path, params, headers=hdrs,
                                                   timeout_s=self.timeout_s)
            retry = _header_int(rh, "retry-after")
            now = self.clock()
            self.budget.on_answer(status, _header_int(rh, "x-mbx-used-weight-1m"),
                                  None if retry is None else float(retry), window, now)
            if status == 418:
                self._log_ban(now)
            elif status == 429:
                log.warning("REST rate limited (HTTP 429): waiting Retry-After before the next "
                            "request", extra={"retry_after_s": retry, "path": path})
            return status, rh, body
        finally:
            await self._done()

    async def get_json(self, path: str, params: dict[str, Any] | None, *, weight: int,
                       priority: Priority, since: float = 0.0,
                       headers: dict[str, str] | None = None) -> Any:
        """One paced GET decoded as JSON (module docstring for what it raises)."""
        status, rh, body = await self.get(path, params, weight=weight, priority=priority,
                                          since=since, headers=headers)
        if status in (429, 418):
            retry = _header_int(rh, "retry-after")
            raise RestLimited(f"GET {path}: HTTP {status} (Retry-After {retry})", status,
                              None if retry is None else float(retry), body[:1000])
        if not 200 <= status < 300:
            raise HttpError(f"GET {path}: HTTP {status} {body[:200]!r}", status, body[:1000])
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise HttpError(f"GET {path}: body is not JSON: {body[:100]!r}", status,
                            body[:1000]) from None

    async def close(self) -> None:
        await self.conn.close()
