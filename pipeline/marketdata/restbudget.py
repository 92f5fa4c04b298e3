"""REST request weight: the budget of one ingest process and the order its requests go out in.

PURE: no sockets, no clock. Every method takes ``now`` (wall-clock seconds, since Binance's
REQUEST_WEIGHT windows are aligned to the clock minute) so tests drive it with a fake clock;
the I/O shell is :class:`pipeline.net.rest.RestClient`.

Why a budget at all (issue #15, binance-protocol.md 7.3): every REST answer says how much of
the IP's per-minute weight is used (``X-MBX-USED-WEIGHT-1M``); a 429 asks the client to wait
``Retry-After`` seconds and a client that keeps going is banned (418, 2 minutes up to 3 days).
A resync storm over many symbols (50 weight per depth snapshot at limit 1000) is exactly how
that happens. So:

- :class:`RestBudget` charges each request's documented weight *before* it is sent, learns the
  server's count from every answer, and says how long a request must wait: never a request the
  window cannot afford (it waits for the next window instead), none before a ``Retry-After``
  has elapsed, none at all while banned.
- :class:`RestQueue` orders the waiting requests: backfills before snapshots (a consumer waits
  on a trade hole; a book without a snapshot only withholds its depth), the newest gap first
  (its trades are the ones still in the exchange's reach and the ones consumers look at),
  snapshots first come first served.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from enum import IntEnum

#: Binance's REQUEST_WEIGHT per IP and minute (section 4); the simulator's default too.
REQUEST_WEIGHT_PER_MINUTE = 6000
#: Share of the limit the process allows itself: the IP's other users (a second ingest, the
#: trading process, an operator's curl) spend from the same pool.
DEFAULT_SHARE = 0.8

#: Documented weights of the REST calls ingest makes (binance-protocol.md 1.7 and 7.3).
WEIGHT_AGG_TRADES = 4
WEIGHT_HISTORICAL_TRADES = 25
WEIGHT_EXCHANGE_INFO = 20


def depth_weight(limit: int) -> int:
    """``GET /api/v3/depth`` weight by ``limit`` (section 1.7)."""
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


class Priority(IntEnum):
    """What a request is for; lower goes first."""

    BACKFILL = 0
    SNAPSHOT = 1


@dataclass
class RestBudget:
    """The REQUEST_WEIGHT window of one process, and its 429/418 state.

    ``limit`` / ``interval_s``: the exchange's window (6000 per 60 s on Binance; a simulator
    test may shorten both). ``share``: the part of ``limit`` this process spends.
    """

    limit: int = REQUEST_WEIGHT_PER_MINUTE
    interval_s: float = 60.0
    share: float = DEFAULT_SHARE
    window: int = -1  # index of the current window (floor(now / interval_s))
    used: int = 0  # weight used in the current window: own charges, or the server's count
    blocked_until: float = 0.0  # a 429's Retry-After: nothing before this
    banned_until: float = 0.0  # a 418's Retry-After: nothing before this, loudly
    # counters the shell copies into the metrics block
    waits: int = 0  # requests that had to wait for the budget
    rate_limited: int = 0  # 429 answers
    bans: int = 0  # 418 answers
    peak_used: int = 0  # highest used weight of any window (own or server's count)

    @property
    def allowance(self) -> int:
        """Weight this process may use per window."""
        return max(1, int(self.limit * self.share))

    def _roll(self, now: float) -> None:
        w = math.floor(now / self.interval_s)
        if w != self.window:
            self.window = w
            self.used = 0

    def window_end(self, now: float) -> float:
        return (math.floor(now / self.interval_s) + 1) * self.interval_s

    def delay(self, weight: int, now: float) -> float:
        """Seconds until a request of ``weight`` may go (0: now). A request heavier than the
        whole allowance goes alone at the start of a window (it could never go otherwise)."""
        hold = max(self.blocked_until, self.banned_until)
        if now < hold:
            return hold - now
        self._roll(now)
        if self.used + weight <= self.allowance or (self.used == 0 and weight > self.allowance):
            return 0.0
        return self.window_end(now) - now

    def charge(self, weight: int, now: float) -> int:
        """The request goes now: count its weight in this window. Returns the window index
        (handed back to :meth:`on_answer`, so a late answer does not count in the next one)."""
        self._roll(now)
        self.used += weight
        self.peak_used = max(self.peak_used, self.used)
        return self.window

    def on_answer(self, status: int, used_weight: int | None, retry_after_s: float | None,
                  sent_window: int, now: float) -> None:
        """Learn from one answer: the server's used weight (it counts every user of the IP,
        so it may be above ours), and a 429's or 418's ``Retry-After`` (seconds; without one,
        the rest of the window)."""
        self._roll(now)
        if used_weight is not None and sent_window == self.window and used_weight > self.used:
            self.used = used_weight
            self.peak_used = max(self.peak_used, used_weight)
        if status in (429, 418):
            wait = retry_after_s if retry_after_s is not None and retry_after_s >= 0 \
                else self.window_end(now) - now
            if status == 429:
                self.rate_limited += 1
                self.blocked_until = max(self.blocked_until, now + wait)
                if used_weight is None or sent_window != self.window:
                    # no count of this window from the server: take it as spent. With one, the
                    # count decides (a 429 for another reason, e.g. the order-rate or a
                    # forced one, must not stall every resync until the next minute)
                    self.used = max(self.used, self.allowance)
            else:
                self.bans += 1
                self.banned_until = max(self.banned_until, now + wait)

    def banned(self, now: float) -> bool:
        return now < self.banned_until


@dataclass(order=True)
class Ticket:
    """One waiting request: sorted by (priority, order key, arrival)."""

    priority: int
    key: float
    seq: int
    weight: int = field(compare=False)


class RestQueue:
    """The waiting requests of one process, in the order they may go (module docstring)."""

    def __init__(self) -> None:
        self._heap: list[Ticket] = []
        self._gone: set[int] = set()
        self._seq = itertools.count()

    def submit(self, priority: Priority, weight: int, since: float = 0.0) -> Ticket:
        """A request wants to go. ``since``: when its need arose (a backfill's gap detection
        time); backfills go newest first, snapshots in arrival order."""
        key = -since if priority is Priority.BACKFILL else 0.0
        t = Ticket(int(priority), key, next(self._seq), weight)
        heapq.heappush(self._heap, t)
        return t

    def head(self) -> Ticket | None:
        """The request whose turn it is, or None."""
        heap = self._heap
        while heap and heap[0].seq in self._gone:
            self._gone.discard(heapq.heappop(heap).seq)
        return heap[0] if heap else None

    def pop(self, t: Ticket) -> None:
        """``t`` (the head) goes now."""
        assert self.head() is t
        heapq.heappop(self._heap)

    def discard(self, t: Ticket) -> None:
        """``t`` no longer wants to go (its task was cancelled)."""
        if any(x is t for x in self._heap):
            self._gone.add(t.seq)

    def __len__(self) -> int:
        return len(self._heap) - len(self._gone)
