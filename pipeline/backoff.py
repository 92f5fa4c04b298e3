"""Reconnect schedule and retry classification: pure, unit-tested, reset after success.

Two small pieces (style.md habit 8): :class:`Backoff` yields delays (1 s doubling to 60 s,
jittered downwards so a herd of clients spreads out but never waits longer than the cap) and
counts attempts against a limit; :func:`classify_response` says what a WS API error means for
the request that got it (binance-protocol.md §2.3-2.5). Neither reads a clock nor sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2  # each delay is drawn from [d*(1-jitter), d]
    max_attempts: int = 10  # consecutive failed attempts before giving up; 0 = never

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.factor < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and factor >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("backoff jitter must be in [0, 1)")
        if self.max_attempts < 0:
            raise ValueError("max_attempts must be >= 0")


class Backoff:
    """Delay generator. Call :meth:`next_delay` after each failure, :meth:`reset` on success.

    ``next_delay`` returns ``None`` once ``max_attempts`` consecutive failures were counted:
    the caller then gives up (the trading process goes to Failed and exits non-zero).
    """

    def __init__(self, policy: BackoffPolicy | None = None, rng: random.Random | None = None):
        self.policy = policy or BackoffPolicy()
        self._rng = rng or random.Random()
        self.attempts = 0  # consecutive failures since the last success

    @property
    def exhausted(self) -> bool:
        p = self.policy
        return p.max_attempts > 0 and self.attempts >= p.max_attempts

    def base_delay(self, attempt: int) -> float:
        """Un-jittered delay before retry number ``attempt`` (1-based)."""
        p = self.policy
        # min() before the power would overflow for large attempts: cap the exponent too.
        exp = min(attempt - 1, 64)
        return min(p.max_s, p.initial_s * p.factor**exp)

    def next_delay(self) -> float | None:
        self.attempts += 1
        if self.exhausted:
            return None
        d = self.base_delay(self.attempts)
        return d * (1.0 - self.policy.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempts = 0


class Outcome(Enum):
    """What a WS API error response means for the request that received it."""

    OK = "ok"
    REJECTED = "rejected"  # definite: the exchange did not act (4xx with a code)
    UNKNOWN = "unknown"  # 5xx, -1006, -1007: may or may not have executed; must query
    RESYNC_RETRY = "resync_retry"  # -1021: resync the clock, retry once
    RATE_LIMITED = "rate_limited"  # 429 / 418 / -1003 / -1015: stop sending until retryAfter
    AUTH_FATAL = "auth_fatal"  # -1022 / -2014 / -2015: the key is wrong; do not retry


UNKNOWN_CODES = frozenset({-1006, -1007})
AUTH_CODES = frozenset({-1022, -2014, -2015})
RATE_CODES = frozenset({-1003, -1015})


def classify_response(status: int, code: int | None) -> Outcome:
    """Classify one WS API response by HTTP-like ``status`` and error ``code``."""
    if status == 200 and code is None:
        return Outcome.OK
    if code in AUTH_CODES or status == 401:
        return Outcome.AUTH_FATAL
    if status >= 500 or code in UNKNOWN_CODES:
        return Outcome.UNKNOWN
    if status in (418, 429) or code in RATE_CODES:
        return Outcome.RATE_LIMITED
    if code == -1021:
        return Outcome.RESYNC_RETRY
    return Outcome.REJECTED


def is_fatal_connect_error(exc: BaseException) -> bool:
    """Errors no reconnect can fix (bad URL, bad TLS config); everything else is retried."""
    name = type(exc).__name__
    return isinstance(exc, ValueError | TypeError) or name in {"InvalidURI", "InvalidProxy"}
