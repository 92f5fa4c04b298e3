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

Ids far from the sequence (more than ``max_jump`` above or below ``last``, see
:class:`FarRun`): a single such id is not a gap to backfill (a 10**18 id would make the tracker
"backfill" 10**18 ids, give up, and then drop every real trade as a duplicate) and not a
duplicate either. It is held aside. Only when ``resync_after`` far ids form a run of their own
(contiguous, in order) is the stream taken to have restarted: a reset marker
(``make_reset(old_last, new_first)``, a GAP record flagged RESYNCED in ingest) and the held run
are published and ``last`` is re-based; a lone hostile id costs nothing but a counter. Real
trades far *below* a bogus ``last`` (one that slipped in as the very first id) form such a run
too, so a symbol always comes back after ``resync_after`` trades, none of them lost.

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
#: Default ``--max-id-jump``: a larger step between consecutive ids is a suspected stream reset,
#: not a gap. Binance's busiest symbols make ~10**3 aggregate trades and ~10**5 book updates a
#: second, so an hour-long outage stays well inside 5 million; a corrupted or hostile id is
#: usually off by orders of magnitude.
DEFAULT_MAX_ID_JUMP = 5_000_000
#: Default ``--id-resync-after``: far ids that must agree (a run of their own) before the
#: sequence is re-based on them. Also the bound of :attr:`FarRun.held`.
DEFAULT_RESYNC_AFTER = 16


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
    far_ids: int = 0  # ids more than max_jump away from last: held, not published (yet)
    resets: int = 0  # runs of far ids taken as a stream restart (re-based)


@dataclass(slots=True)
class FarRun(Generic[R]):
    """Ids far from a sequence (more than ``max_jump`` from its last id), held until
    ``confirm`` of them form a run of their own.

    ``contiguous``: each id of a run is the previous + 1 (trade ids); otherwise each is larger
    than the previous by at most ``max_jump`` (book update ids, which skip). ``held`` is bounded
    by ``confirm`` (default :data:`DEFAULT_RESYNC_AFTER`, 16 records): a run that breaks starts
    over with the id that broke it.
    """

    max_jump: int = DEFAULT_MAX_ID_JUMP
    confirm: int = DEFAULT_RESYNC_AFTER
    contiguous: bool = True
    held: list[tuple[int, R]] = field(default_factory=list)
    seen: int = 0  # far ids offered
    runs: int = 0  # runs confirmed

    def is_far(self, last: int, new_id: int) -> bool:
        return new_id - last > self.max_jump or last - new_id > self.max_jump

    def offer(self, new_id: int, record: R) -> list[tuple[int, R]] | None:
        """A far id arrived: None while no run is confirmed, else the whole run (in order)."""
        self.seen += 1
        held = self.held
        if held:
            prev = held[-1][0]
            if held[0][0] <= new_id <= prev:
                return None  # a repeat of a held id (two connections during a rotation)
            if new_id == prev + 1 if self.contiguous else 0 < new_id - prev <= self.max_jump:
                held.append((new_id, record))
            else:
                held.clear()
                held.append((new_id, record))
        else:
            held.append((new_id, record))
        if len(held) < self.confirm:
            return None
        run = list(held)
        held.clear()
        self.runs += 1
        return run

    def clear(self) -> None:
        """The sequence continued normally: whatever is held was not a restart."""
        self.held.clear()


@dataclass(slots=True)
class AggTracker(Generic[R]):
    """Exactly-once, in-order aggregate trade ids for one symbol.

    ``last`` is the last id handed out for publishing (None until the first trade: the first live
    id after start defines where the stream begins; nothing before it is fetched).
    ``max_buffer`` bounds memory while a gap is outstanding: when more live ids than that are
    waiting, the caller should ``give_up()`` (``overflowing`` says so).
    ``max_jump`` / ``resync_after``: ids further than that from ``last`` go to a
    :class:`FarRun` (module docstring); on a confirmed restart ``make_reset(old_last,
    new_first)`` makes the marker record and ``make_gap`` the GAP records of holes still open
    in the old sequence (without them the restart publishes the held run alone).
    """

    last: int | None = None
    max_buffer: int = 100_000
    pending: dict[int, R] = field(default_factory=dict)  # early live ids, > last + 1
    stats: TrackerStats = field(default_factory=TrackerStats)
    _pending_min: int | None = None
    max_jump: int = DEFAULT_MAX_ID_JUMP
    resync_after: int = DEFAULT_RESYNC_AFTER
    make_reset: Callable[[int, int], R] | None = None
    make_gap: Callable[[Gap], R] | None = None
    far: FarRun[R] = field(init=False)

    def __post_init__(self) -> None:
        self.far = FarRun(self.max_jump, self.resync_after, contiguous=True)

    def on_live(self, agg_id: int, record: R) -> list[R]:
        """A live aggTrade arrived. Returns what to publish now (possibly nothing)."""
        last = self.last
        if last is None or (agg_id == last + 1 and not self.pending):
            self.last = agg_id
            self.stats.published_live += 1
            if self.far.held:
                self.far.clear()
            return [record]
        if agg_id - last > self.max_jump or last - agg_id > self.max_jump:
            self.stats.far_ids += 1
            run = self.far.offer(agg_id, record)
            return [] if run is None else self._restart(run)
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

    def rewind(self, last: int, unpublished: list[tuple[int, R]]) -> None:
        """Records this tracker handed out did not reach the ring: continue from ``last`` (the
        id before the first one lost), holding the ``unpublished`` ones after it again. Their
        ids become a hole like any other (backfilled or reported by a GAP record); the tracker
        never counts an id as published that readers cannot see."""
        if self.last is None or last >= self.last:
            return
        self.last = last
        for agg_id, rec in unpublished:
            if agg_id > last + 1:
                self.pending[agg_id] = rec
        if self.pending:
            self._pending_min = min(self.pending)
            self.stats.gaps_detected += 1

    def _restart(self, run: list[tuple[int, R]]) -> list[R]:
        """A confirmed run of far ids: the stream restarted. Close the old sequence (its open
        holes as GAP records, its held trades in order), mark the restart, publish the run and
        continue from its end. Nothing is fetched across the jump."""
        out: list[R] = []
        while self.pending:
            if self.make_gap is not None:
                out.extend(self.give_up(self.make_gap))
            else:
                g = self.missing()
                assert g is not None
                self.stats.ids_lost += g[1] - g[0] + 1
                self.last = g[1]
                out.extend(self._drain())
        old = self.last
        assert old is not None
        self.stats.resets += 1
        if self.make_reset is not None:
            out.append(self.make_reset(old, run[0][0]))
        out.extend(rec for _, rec in run)
        self.last = run[-1][0]
        self.stats.published_live += len(run)
        return out

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
