"""REST REQUEST_WEIGHT of the simulator: the used-weight header, 429 and 418 with Retry-After.

PURE apart from reading the fault switches: the caller passes ``now_ms``. One pool for every
REST client (they all come from 127.0.0.1 in tests; Binance counts per IP), built on the WS
API's :class:`~pipeline.sim.ratelimit.IpLimits` so both services escalate the same way: over
the window's limit -> 429 with ``Retry-After`` (seconds to the window's end); a request before
that ``Retry-After`` has elapsed -> banned, 418 with ``Retry-After`` (the ban's length), and
every request during the ban is answered 418 too (binance-protocol.md 7.3 and pitfall 15).

The ``rest_rate_limit`` fault (pipeline/sim/faults.py) lowers the limit and shortens the window
on demand, or forces the next answers to be 429 / 418, so a client's pacing can be tested in
seconds. ``stats`` counts what a test asserts on: requests that arrived before a 429's
Retry-After (a client that does not honour it) and during a ban.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pipeline.sim.ratelimit import FixedWindow, IpLimits

if TYPE_CHECKING:
    from pipeline.sim.faults import Faults

DEFAULT_LIMIT = 6000  # REQUEST_WEIGHT per IP and minute (section 4)
DEFAULT_BAN_MS = 120_000  # Binance's shortest ban (7.3: 2 minutes up to 3 days)


class RestLimits:
    """The REST weight pool and its 429/418 state (module docstring)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._shape: tuple[int, float] = (0, 0.0)
        self.lim = self._make(DEFAULT_LIMIT, 60.0)
        self.stats: dict[str, int] = {
            "requests": 0, "rate_limited": 0, "banned": 0, "early_after_429": 0,
            "during_ban": 0, "peak_used_weight": 0,
        }

    def _make(self, limit: int, interval_s: float) -> IpLimits:
        self._shape = (limit, interval_s)
        ms = max(1, round(interval_s * 1000))
        # a window of whole seconds (FixedWindow aligns it to the epoch like Binance's minute)
        window = FixedWindow("REQUEST_WEIGHT", "SECOND", max(1, ms // 1000), limit) \
            if ms % 1000 == 0 else FixedWindow("REQUEST_WEIGHT", "SECOND", 1, limit)
        return IpLimits(window, grace=0)

    def _current(self) -> IpLimits:
        f = self.faults
        shape = (f.rest_limit or DEFAULT_LIMIT, f.rest_limit_interval if f.rest_limit else 60.0)
        if shape != self._shape:
            old = self.lim
            self.lim = self._make(*shape)
            self.lim.banned_until = old.banned_until  # a ban outlives a change of limits
        return self.lim

    def _ban_ms(self) -> int:
        f = self.faults
        if f.rest_limit:
            return max(2000, round(2 * f.rest_limit_interval * 1000))
        return DEFAULT_BAN_MS

    def admit(self, now_ms: int, weight: int) -> tuple[int, int | None, int]:
        """Count one request: ``(status, retry_after_s, used_weight)``; status 200 means
        answer it, 429 / 418 means answer that with ``Retry-After: retry_after_s``."""
        lim = self._current()
        st = self.stats
        st["requests"] += 1
        f = self.faults
        if f.rest_force is not None and f.rest_force_count > 0:
            f.rest_force_count -= 1
            kind = f.rest_force
            if f.rest_force_count == 0:
                f.rest_force = None
            f.count("rest_rate_limit_forced")
            until = now_ms + round(f.rest_retry_after * 1000)
            if kind == "429":
                lim.penalize(until)
                lim.grace_left = 0
                st["rate_limited"] += 1
                return 429, _secs(until - now_ms), lim.weight.current(now_ms)
            lim.banned_until = max(lim.banned_until, until)
            st["banned"] += 1
            return 418, _secs(lim.banned_until - now_ms), lim.weight.current(now_ms)
        if now_ms < lim.banned_until:
            st["during_ban"] += 1
        elif now_ms < lim.penalty_until:
            st["early_after_429"] += 1
        verdict, until = lim.admit(now_ms, weight, self._ban_ms())
        used = lim.weight.current(now_ms)
        st["peak_used_weight"] = max(st["peak_used_weight"], used)
        if verdict == "ok":
            return 200, None, used
        if verdict == "429":
            st["rate_limited"] += 1
            return 429, _secs(until - now_ms), used
        st["banned"] += 1
        return 418, _secs(until - now_ms), used


def _secs(ms: int) -> int:
    """Retry-After is whole seconds (rounded up: never earlier than the server means)."""
    return max(1, math.ceil(ms / 1000))
