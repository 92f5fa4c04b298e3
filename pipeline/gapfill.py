"""Aggregate-trade id tracking, dedupe and backfill planning (pure: no I/O, no clock).

Binance aggregate trade ids (`a`, section 1.6 of shared/binance-protocol.md) are contiguous per
symbol. That makes "every trade exactly once, in order" checkable: the ingest shell feeds every
live aggTrade through :class:`AggTracker`, which publishes the next expected id at once, drops
anything already published (duplicates from make-before-break rotation or a reconnect), and holds
ids that arrive early until the ids before them are recovered over REST
(``/api/v3/aggTrades?fromId=&limit=``) or declared lost.

Calling contract (one tracker per symbol)::

    out = tracker.on_live(agg_id, record)      # -> records to publish now, in order
    gap = tracker.missing()                    # (first, last) ids to backfill, or None
    req = tracker.next_request(max_limit=1000) # (fromId, limit) for the next REST page, or None
    out = tracker.on_backfill(rows)            # rows: [(agg_id, record)] from one REST page
    out = tracker.give_up()                    # REST failed for good: a GAP marker + drained ids

``on_backfill`` and ``give_up`` return the records to publish: the REST ones (the shell flags
them BACKFILLED before handing them in), followed by any buffered live ones they unblock. The
shell never awaits REST in the frame handler: a separate task per symbol polls ``missing()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")

#: Max rows one ``/api/v3/aggTrades`` request may return.
REST_PAGE_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Gap:
    """Ids ``first..last`` (inclusive) of one symbol are missing for good."""

    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(slots=True)
class TrackerStats:
    published_live: int = 0
    published_backfill: int = 0
    duplicates: int = 0
    gaps_detected: int = 0
    ids_lost: int = 0


@dataclass(slots=True)
class AggTracker(Generic[R]):
    """Exactly-once, in-order aggregate trade ids for one symbol.

    ``last`` is the last id handed out for publishing (None until the first trade: the first live
    id after start defines where the stream begins; nothing before it is fetched).
    ``max_buffer`` bounds memory while a gap is outstanding: when more live ids than that are
    waiting, the caller should ``give_up()`` (``overflowing`` says so).
    """

    last: int | None = None
    max_buffer: int = 100_000
    pending: dict[int, R] = field(default_factory=dict)  # early live ids, > last + 1
    stats: TrackerStats = field(default_factory=TrackerStats)
    _pending_min: int | None = None

    def on_live(self, agg_id: int, record: R) -> list[R]:
        """A live aggTrade arrived. Returns what to publish now (possibly nothing)."""
        last = self.last
        if last is None or (agg_id == last + 1 and not self.pending):
            self.last = agg_id
            self.stats.published_live += 1
            return [record]
        if agg_id <= last or agg_id in self.pending:
            self.stats.duplicates += 1
            return []
        if agg_id == last + 1:  # fills the front of a gap: publish, then what it unblocks
            self.last = agg_id
            self.stats.published_live += 1
            return [record, *self._drain()]
        if not self.pending or (self._pending_min is not None and agg_id < self._pending_min):
            if not self.pending:
                self.stats.gaps_detected += 1
            self._pending_min = agg_id
        self.pending[agg_id] = record
        return []

    @property
    def overflowing(self) -> bool:
        return len(self.pending) > self.max_buffer

    def missing(self) -> tuple[int, int] | None:
        """The id range that must be backfilled before buffered live ids can go out."""
        if not self.pending or self.last is None:
            return None
        assert self._pending_min is not None
        return self.last + 1, self._pending_min - 1

    def next_request(self, max_limit: int = REST_PAGE_LIMIT) -> tuple[int, int] | None:
        """(fromId, limit) of the next REST page, or None if nothing is missing."""
        gap = self.missing()
        if gap is None:
            return None
        first, last = gap
        return first, min(max_limit, last - first + 1)

    def on_backfill(self, rows: list[tuple[int, R]]) -> list[R]:
        """Rows of one REST page (any order, may overlap what we have). Returns what to publish:
        the rows that continue the sequence, then the buffered live ids they unblock. Rows
        beyond the gap are ignored (the live stream delivers them)."""
        out: list[R] = []
        gap = self.missing()
        if gap is None:
            return out
        end = gap[1]
        for agg_id, rec in sorted(rows, key=lambda r: r[0]):
            assert self.last is not None
            if agg_id == self.last + 1 and agg_id <= end:
                self.last = agg_id
                self.stats.published_backfill += 1
                out.append(rec)
            elif agg_id <= self.last:
                self.stats.duplicates += 1
        if self.last == end:
            out.extend(self._drain())
        return out

    def give_up(self, make_gap: Callable[[Gap], R]) -> list[R]:
        """Backfill failed for good: emit ``make_gap(Gap)`` for the missing range, skip past it
        and publish the buffered live ids it was blocking (which may reveal the next gap)."""
        gap = self.missing()
        if gap is None:
            return []
        g = Gap(*gap)
        self.stats.ids_lost += g.count
        self.last = g.last
        return [make_gap(g), *self._drain()]

    def _drain(self) -> list[R]:
        out: list[R] = []
        pending = self.pending
        assert self.last is not None
        nxt = self.last + 1
        while nxt in pending:
            out.append(pending.pop(nxt))
            nxt += 1
        self.last = nxt - 1
        self.stats.published_live += len(out)
        # anything left is beyond a new gap; recompute its front
        self._pending_min = min(pending) if pending else None
        if out and pending:  # we got past the old hole and hit another one
            self.stats.gaps_detected += 1
        return out
