"""Binance-style fixed-window counters for the simulated WS API (binance-protocol.md 2.5 and 4).

PURE: callers pass ``now_ms``. Windows are fixed and aligned to the epoch, as Binance documents:
the minute resets at :00, the 10-second window at :00/:10/..., the day at 00:00 UTC.

- :class:`IpLimits` -- REQUEST_WEIGHT per IP (shared by all connections from that IP) plus the
  429 -> 418 escalation: after a 429 with ``retryAfter`` R, a client that keeps sending before R
  gets ``grace`` more 429s and is then banned (418) until ``now + ban_ms``.
- :class:`OrderLimits` -- the ORDERS (unfilled order count) windows per account, 10 s and 1 day.
- :class:`ApiLimits` -- both, for every IP and account of one WS API; :func:`request_weight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MINUTE_MS = 60_000
DAY_MS = 86_400_000
# built once: every counted request reads it (through FixedWindow.interval_ms)
_UNIT_MS = {"SECOND": 1000, "MINUTE": MINUTE_MS, "HOUR": 3_600_000, "DAY": DAY_MS}


@dataclass
class FixedWindow:
    """One ``rateLimits`` entry: a count that resets at every multiple of ``interval_ms``."""

    rate_limit_type: str  # "REQUEST_WEIGHT" | "ORDERS"
    interval: str  # "SECOND" | "MINUTE" | "DAY"
    interval_num: int
    limit: int
    start: int = -1
    count: int = 0

    @property
    def interval_ms(self) -> int:
        return _UNIT_MS[self.interval] * self.interval_num

    def _roll(self, now_ms: int) -> None:
        start = now_ms - now_ms % self.interval_ms
        if start != self.start:
            self.start = start
            self.count = 0

    def current(self, now_ms: int) -> int:
        self._roll(now_ms)
        return self.count

    def add(self, now_ms: int, n: int = 1) -> int:
        self._roll(now_ms)
        self.count += n
        return self.count

    def resets_at(self, now_ms: int) -> int:
        """Epoch ms at which the current window ends (the ``retryAfter`` to advertise)."""
        interval = self.interval_ms
        return now_ms - now_ms % interval + interval

    def entry(self, now_ms: int) -> dict[str, Any]:
        return {
            "rateLimitType": self.rate_limit_type,
            "interval": self.interval,
            "intervalNum": self.interval_num,
            "limit": self.limit,
            "count": self.current(now_ms),
        }


@dataclass
class IpLimits:
    """REQUEST_WEIGHT for one IP, and its 429/418 state."""

    weight: FixedWindow
    grace: int = 1  # further requests tolerated (answered 429) after a 429 before the ban
    penalty_until: int = 0  # retryAfter of the last 429 (0 = none pending)
    grace_left: int = 0
    banned_until: int = 0

    @classmethod
    def make(cls, weight_per_minute: int, grace: int) -> IpLimits:
        return cls(FixedWindow("REQUEST_WEIGHT", "MINUTE", 1, weight_per_minute), grace=grace)

    def admit(self, now_ms: int, weight: int, ban_ms: int) -> tuple[str, int]:
        """Count one request. Returns ``(verdict, retry_after)``: ``("ok", 0)``,
        ``("429", retry_after)`` (weight limit exceeded, or still in the penalty period), or
        ``("418", banned_until)`` (banned; the shell must disconnect).
        """
        if now_ms < self.banned_until:
            return "418", self.banned_until
        if now_ms < self.penalty_until:
            if self.grace_left <= 0:
                self.banned_until = now_ms + ban_ms
                self.penalty_until = 0
                return "418", self.banned_until
            self.grace_left -= 1
            self.weight.add(now_ms, weight)
            return "429", self.penalty_until
        count = self.weight.add(now_ms, weight)
        if count > self.weight.limit:
            retry = self.weight.resets_at(now_ms)
            self.penalize(retry)
            return "429", retry
        return "ok", 0

    def penalize(self, retry_after: int) -> None:
        """Arm the escalation: requests before ``retry_after`` spend grace, then ban."""
        self.penalty_until = max(self.penalty_until, retry_after)
        self.grace_left = self.grace


@dataclass
class OrderLimits:
    """The ORDERS windows of one account (section 4: 50 per 10 s, 160,000 per day)."""

    windows: list[FixedWindow] = field(default_factory=list)

    @classmethod
    def make(cls, per_10s: int, per_day: int) -> OrderLimits:
        return cls(
            [
                FixedWindow("ORDERS", "SECOND", 10, per_10s),
                FixedWindow("ORDERS", "DAY", 1, per_day),
            ]
        )

    def exceeded(self, now_ms: int) -> FixedWindow | None:
        """The first window that has no room for one more order, or None."""
        for w in self.windows:
            if w.current(now_ms) >= w.limit:
                return w
        return None

    def add(self, now_ms: int) -> None:
        for w in self.windows:
            w.add(now_ms)

    def remove(self, now_ms: int) -> None:
        """One order less in every current window (it filled, or was refused), never below 0."""
        for w in self.windows:
            if w.current(now_ms) > 0:
                w.add(now_ms, -1)

    def entries(self, now_ms: int) -> list[dict[str, Any]]:
        return [w.entry(now_ms) for w in self.windows]


# Method -> weight (section 2.6); callables for params-dependent weights.
WEIGHTS: dict[str, int] = {
    "ping": 1,
    "time": 1,
    "session.logon": 2,
    "session.status": 2,
    "session.logout": 2,
    "session.subscriptions": 2,
    "order.place": 1,
    "order.test": 1,
    "order.cancel": 1,
    "order.cancelReplace": 1,
    "order.amend.keepPriority": 4,
    "order.status": 4,
    "openOrders.status": 6,
    "openOrders.cancelAll": 1,
    "account.status": 20,
    "account.rateLimits.orders": 40,
    "userDataStream.subscribe": 2,
    "userDataStream.subscribe.signature": 2,
    "userDataStream.unsubscribe": 2,
}


#: Methods whose successful requests weigh 0 since 2026-04-02 (binance-protocol.md 7.2: order
#: place, cancel, cancelReplace, amend); a failed one still costs its weight above.
FREE_WHEN_SUCCESSFUL = frozenset(
    {"order.place", "order.cancel", "order.cancelReplace", "order.amend.keepPriority"}
)
#: RAW_REQUESTS per 5 minutes per IP (7.2: 300,000 since the 2026 changelog; was 61,000)
RAW_REQUESTS_PER_5MIN = 300_000


def request_weight(method: str, params: Mapping[str, str]) -> int:
    """The REQUEST_WEIGHT one request costs (section 2.6; unknown methods cost 1)."""
    if method == "openOrders.status" and not params.get("symbol"):
        return 80
    if method == "order.test" and params.get("computeCommissionRates") == "true":
        return 20
    return WEIGHTS.get(method, 1)


class ApiLimits:
    """All counters of one WS API: REQUEST_WEIGHT per IP, unfilled ORDERS per account.

    Why one owner: the limits a service enforces, the 429 it answers and the ``rateLimits``
    it advertises must be the same numbers."""

    def __init__(
        self,
        weight_per_minute: int,
        orders_per_10s: int,
        orders_per_day: int,
        ban_ms: int,
        ban_grace: int,
    ) -> None:
        self.weight_per_minute = weight_per_minute
        self.orders_per_10s = orders_per_10s
        self.orders_per_day = orders_per_day
        self.ban_ms = ban_ms
        self.ban_grace = ban_grace
        self._ips: dict[str, IpLimits] = {}
        self._orders: dict[str, OrderLimits] = {}

    def ip(self, ip: str) -> IpLimits:
        lim = self._ips.get(ip)
        if lim is None:
            lim = self._ips[ip] = IpLimits.make(self.weight_per_minute, self.ban_grace)
        return lim

    def orders(self, account: str) -> OrderLimits:
        lim = self._orders.get(account)
        if lim is None:
            lim = self._orders[account] = OrderLimits.make(self.orders_per_10s, self.orders_per_day)
        return lim

    def banned_ips(self, now_ms: int) -> list[str]:
        return [ip for ip, lim in self._ips.items() if lim.banned_until > now_ms]

    def info(self) -> list[dict[str, Any]]:
        """The limits enforced, in exchangeInfo's ``rateLimits`` shape, so that the server's
        exchangeInfo advertises exactly what is enforced."""
        return [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": self.weight_per_minute,
            },
            {
                "rateLimitType": "ORDERS",
                "interval": "SECOND",
                "intervalNum": 10,
                "limit": self.orders_per_10s,
            },
            {
                "rateLimitType": "ORDERS",
                "interval": "DAY",
                "intervalNum": 1,
                "limit": self.orders_per_day,
            },
            {
                "rateLimitType": "RAW_REQUESTS",
                "interval": "MINUTE",
                "intervalNum": 5,
                "limit": RAW_REQUESTS_PER_5MIN,
            },
        ]
