"""Local order book kept in sync from a REST snapshot + diff-depth events (pure state machine).

Implements shared/binance-protocol.md section 1.7 (the algorithm as corrected 2025-11-12), one
:class:`OrderBook` per symbol. No I/O, no clock, no asyncio: the ingest shell feeds it events and
snapshots and acts on the returned :class:`BookAction`.

States and transitions (every transition the code makes is in :data:`TRANSITIONS`)::

    state          input     condition                  -> next state, action
    -------------  --------  -------------------------  ----------------------------
    WAIT_EVENT     diff      -                          WAIT_SNAPSHOT, NEED_SNAPSHOT
    WAIT_SNAPSHOT  diff      -                          WAIT_SNAPSHOT, BUFFERED
    WAIT_SNAPSHOT  snapshot  lastUpdateId+1 < first U   WAIT_SNAPSHOT, REFETCH
    WAIT_SNAPSHOT  snapshot  otherwise                  SYNCED, SYNCED
    SYNCED         diff      u <= book id               SYNCED, IGNORED
    SYNCED         diff      U > book id + 1 (gap)      WAIT_SNAPSHOT, NEED_SNAPSHOT
    SYNCED         diff      otherwise                  SYNCED, APPLIED
    SYNCED         snapshot  -                          SYNCED, IGNORED (stale)
    any            reset()   -                          WAIT_EVENT

Calling contract: on NEED_SNAPSHOT start (or keep) a resync task that fetches
``/api/v3/depth`` and calls :meth:`OrderBook.on_snapshot` - never await it in the frame handler;
on REFETCH fetch again (after a short delay); on SYNCED / APPLIED publish :meth:`OrderBook.top`.
``resynced_after_break`` is True for the sync that follows a sequence break (the shell marks its
records Flags.RESYNCED and emits Kind.BOOK_RESYNC).

Deviation from the documented step 3, on purpose: the doc refetches when ``lastUpdateId < U`` of
the first buffered event; we refetch only when ``lastUpdateId + 1 < U``. When
``lastUpdateId == U - 1`` the first event continues the snapshot exactly (``U <= lastUpdateId+1
<= u``, step 4), so the doc's rule would refetch a usable snapshot (and spin on a quiet market).

Hostile or corrupted update ids: an event whose ``u`` is more than ``max_jump`` away from the
book's id (or, while buffering, from the buffered run) is held aside, not applied and not a
sequence break: one bogus frame must neither freeze the book (every later event "older" than a
10**18 id) nor cost a resync. Only ``resync_after`` such events that agree with each other
(:class:`pipeline.marketdata.gapfill.FarRun`) mean the stream really restarted: that is a sequence
break (resync from a snapshot, counted in ``resets``).

Memory: each side keeps at most ``max_levels`` levels (default :data:`MAX_LEVELS`, 10000 per
side; the largest REST snapshot has 5000): levels beyond it are the furthest from the top, and
Binance stops sending updates for them anyway, so the worst ones are dropped (``trimmed``
counts them) instead of growing without bound on a stream that never removes far levels.

Prices are float64 dictionary keys: equal decimal strings ("0.00100000", "0.001") give the same
double and different <= 15-significant-digit decimals give different doubles, so float keys
compare exactly as the doc's "compare as decimals" asks.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable
from enum import Enum, IntEnum

from pipeline.binance.streams import Level  # (price, qty) as the depth decoders give it
from pipeline.ipc.records import TickTuple, depth_level_record, depth_top_record
from pipeline.marketdata.gapfill import DEFAULT_MAX_ID_JUMP, DEFAULT_RESYNC_AFTER, FarRun

#: Default bound on the levels kept per side (see the module docstring).
MAX_LEVELS = 10_000


class BookState(Enum):
    WAIT_EVENT = "wait_event"  # no event seen yet: nothing to anchor a snapshot to
    WAIT_SNAPSHOT = "wait_snapshot"  # buffering diffs until a usable snapshot arrives
    SYNCED = "synced"  # book valid; diffs applied as they come


class BookAction(IntEnum):
    NONE = 0
    BUFFERED = 1  # diff kept for after the snapshot
    NEED_SNAPSHOT = 2  # start a snapshot fetch (first sync or a sequence break)
    REFETCH = 3  # the snapshot was too old: fetch another
    SYNCED = 4  # book rebuilt from a snapshot: publish BOOK_RESYNC + top
    APPLIED = 5  # diff applied: publish top
    IGNORED = 6  # diff older than the book (duplicate / overlap) or a stale snapshot


TRANSITIONS: dict[tuple[BookState, str], set[tuple[BookState, BookAction]]] = {
    (BookState.WAIT_EVENT, "diff"): {(BookState.WAIT_SNAPSHOT, BookAction.NEED_SNAPSHOT)},
    (BookState.WAIT_SNAPSHOT, "diff"): {(BookState.WAIT_SNAPSHOT, BookAction.BUFFERED)},
    (BookState.WAIT_SNAPSHOT, "snapshot"): {(BookState.WAIT_SNAPSHOT, BookAction.REFETCH),
                                        (BookState.SYNCED, BookAction.SYNCED)},
    (BookState.SYNCED, "diff"): {(BookState.SYNCED, BookAction.IGNORED),
                             (BookState.WAIT_SNAPSHOT, BookAction.NEED_SNAPSHOT),
                             (BookState.SYNCED, BookAction.APPLIED)},
    (BookState.SYNCED, "snapshot"): {(BookState.SYNCED, BookAction.IGNORED)},
    (BookState.WAIT_EVENT, "snapshot"): {(BookState.WAIT_EVENT, BookAction.IGNORED)},
}


class _Side:
    """One side of the book: price -> qty plus a sorted key list (bids stored negated so that
    index 0 is always the best level)."""

    __slots__ = ("keys", "levels", "max_levels", "sign", "trimmed")

    def __init__(self, is_bid: bool, max_levels: int = MAX_LEVELS) -> None:
        self.sign = -1.0 if is_bid else 1.0
        self.levels: dict[float, float] = {}
        self.keys: list[float] = []  # sign * price, ascending
        self.max_levels = max_levels
        self.trimmed = 0  # levels dropped beyond max_levels (the worst prices)

    def _trim(self) -> None:
        keys = self.keys
        extra = len(keys) - self.max_levels
        if extra > 0:
            sign = self.sign
            book = self.levels
            for k in keys[self.max_levels:]:
                del book[sign * k]
            del keys[self.max_levels:]
            self.trimmed += extra

    def clear(self) -> None:
        self.levels.clear()
        self.keys.clear()

    def load(self, levels: Iterable[Level]) -> None:
        self.clear()
        for p, q in levels:
            if q > 0.0:
                self.levels[p] = q
        self.keys = sorted(self.sign * p for p in self.levels)
        self._trim()

    def apply(self, levels: Iterable[Level]) -> None:
        book = self.levels
        keys = self.keys
        sign = self.sign
        for p, q in levels:
            if q == 0.0:
                if book.pop(p, None) is not None:
                    k = sign * p
                    del keys[bisect_left(keys, k)]
            else:
                if p not in book:
                    insort(keys, sign * p)
                book[p] = q
        if len(keys) > self.max_levels:
            self._trim()

    def top(self, n: int) -> list[Level]:
        sign = self.sign
        book = self.levels
        return [(sign * k, book[sign * k]) for k in self.keys[:n]]


class OrderBook:
    """One symbol's local book; see the module docstring for the state table."""

    def __init__(self, max_buffer: int = 10_000, max_levels: int = MAX_LEVELS,
                 max_jump: int = DEFAULT_MAX_ID_JUMP,
                 resync_after: int = DEFAULT_RESYNC_AFTER) -> None:
        self.state = BookState.WAIT_EVENT
        self.update_id = 0  # book.updateId (section 1.7 step 5)
        self.bids = _Side(True, max_levels)
        self.asks = _Side(False, max_levels)
        #: events kept while waiting for a snapshot: at most ``max_buffer`` (10000)
        self.buffer: deque[tuple[int, int, list[Level], list[Level]]] = deque()
        self.max_buffer = max_buffer
        self.max_jump = max_jump
        #: events with a far ``u`` (module docstring), held until ``resync_after`` agree
        self.far: FarRun[tuple[int, int, list[Level], list[Level]]] = FarRun(
            max_jump, resync_after, contiguous=False)
        self.far_ids = 0  # events held aside for a far update id
        self.resets = 0  # runs of far ids taken as a stream restart
        self.resynced_after_break = False
        self.breaks = 0  # sequence breaks seen (each one causes a resync)
        self.syncs = 0  # snapshots applied
        self._broken = False

    def _go(self, event: str, new: BookState, action: BookAction) -> BookAction:
        assert (new, action) in TRANSITIONS[(self.state, event)], (self.state, event, new, action)
        self.state = new
        return action

    def reset(self) -> None:
        """Forget everything (e.g. the symbol's stream was unsubscribed)."""
        self.state = BookState.WAIT_EVENT
        self.bids.clear()
        self.asks.clear()
        self.buffer.clear()

    def on_diff(self, first_id: int, last_id: int, bids: list[Level],
                asks: list[Level]) -> BookAction:
        """One ``depthUpdate`` (``U`` = first_id, ``u`` = last_id)."""
        state = self.state
        if state is BookState.SYNCED:
            uid = self.update_id
            if last_id - uid > self.max_jump or uid - last_id > self.max_jump:
                if not self._far(first_id, last_id, bids, asks):
                    return self._go("diff", BookState.SYNCED, BookAction.IGNORED)
                self.breaks += 1
                self._broken = True
                self.bids.clear()
                self.asks.clear()
                return self._go("diff", BookState.WAIT_SNAPSHOT, BookAction.NEED_SNAPSHOT)
            if last_id <= uid:
                return self._go("diff", BookState.SYNCED, BookAction.IGNORED)
            if first_id > uid + 1:  # step 6: gap -> restart from step 1
                self.breaks += 1
                self._broken = True
                self.bids.clear()
                self.asks.clear()
                self.buffer.clear()
                self.buffer.append((first_id, last_id, bids, asks))
                return self._go("diff", BookState.WAIT_SNAPSHOT, BookAction.NEED_SNAPSHOT)
            self.bids.apply(bids)
            self.asks.apply(asks)
            self.update_id = last_id
            if self.far.held:  # the sequence went on: what was held was no restart
                self.far.clear()
            return self._go("diff", BookState.SYNCED, BookAction.APPLIED)
        if state is BookState.WAIT_EVENT:
            self.buffer.clear()
            self.buffer.append((first_id, last_id, bids, asks))
            return self._go("diff", BookState.WAIT_SNAPSHOT, BookAction.NEED_SNAPSHOT)
        # WAIT_SNAPSHOT: keep one contiguous run of events (the latest), bounded
        buf = self.buffer
        if buf:
            prev_last = buf[-1][1]
            if last_id - prev_last > self.max_jump or prev_last - last_id > self.max_jump:
                self._far(first_id, last_id, bids, asks)  # a confirmed run replaces the buffer
                return self._go("diff", BookState.WAIT_SNAPSHOT, BookAction.BUFFERED)
            if last_id <= prev_last:  # duplicate (two connections during rotation)
                return self._go("diff", BookState.WAIT_SNAPSHOT, BookAction.BUFFERED)
            if first_id > prev_last + 1:  # hole inside the buffer: only the newer run is usable
                buf.clear()
        buf.append((first_id, last_id, bids, asks))
        if len(buf) > self.max_buffer:
            buf.popleft()
        return self._go("diff", BookState.WAIT_SNAPSHOT, BookAction.BUFFERED)

    def _far(self, first_id: int, last_id: int, bids: list[Level], asks: list[Level]) -> bool:
        """Hold an event with a far update id; True when a run of them is confirmed: the buffer
        then holds the run's latest event (the snapshot is fetched after it) and the caller
        treats it as a sequence break."""
        self.far_ids += 1
        run = self.far.offer(last_id, (first_id, last_id, bids, asks))
        if run is None:
            return False
        self.resets += 1
        self.buffer.clear()
        self.buffer.append(run[-1][1])
        return True

    def on_snapshot(self, last_update_id: int, bids: list[Level], asks: list[Level]) -> BookAction:
        """A REST ``/api/v3/depth`` snapshot (steps 3-6)."""
        if self.state is not BookState.WAIT_SNAPSHOT:
            return self._go("snapshot", self.state, BookAction.IGNORED)
        buf = self.buffer
        if buf and last_update_id + 1 < buf[0][0]:  # step 3: snapshot older than our buffer
            return self._go("snapshot", BookState.WAIT_SNAPSHOT, BookAction.REFETCH)
        while buf and buf[0][1] <= last_update_id:  # step 4: drop what the snapshot contains
            buf.popleft()
        self.bids.load(bids)  # step 5
        self.asks.load(asks)
        self.update_id = last_update_id
        while buf:  # step 6 for the buffered events (contiguous by construction)
            _first, last, b, a = buf.popleft()
            self.bids.apply(b)
            self.asks.apply(a)
            self.update_id = last
        self.syncs += 1
        self.resynced_after_break = self._broken
        self._broken = False
        return self._go("snapshot", BookState.SYNCED, BookAction.SYNCED)

    def top(self, n: int = 1) -> tuple[list[Level], list[Level]]:
        """Best ``n`` levels per side, best first: (bids, asks)."""
        return self.bids.top(n), self.asks.top(n)

    @property
    def synced(self) -> bool:
        return self.state is BookState.SYNCED


def book_records(*, symbol: int, flags: int, update_id: int, first_update_id: int,
                 event_time_ns: int, recv_time_ns: int, bids: list[Level], asks: list[Level],
                 levels: int) -> list[TickTuple]:
    """What publishes a book's top (``bids`` / ``asks`` best first, as :meth:`OrderBook.top`
    returns them, or a partial-depth frame's): one DEPTH_TOP, then DEPTH_LEVEL records for the
    first ``levels`` levels, as far as either side has one (the shorter side reads 0, 0).
    Pure, so a diff, a snapshot and a partial-depth frame publish their books the same way."""
    bp, bq = bids[0] if bids else (0.0, 0.0)
    ap, aq = asks[0] if asks else (0.0, 0.0)
    out = [depth_top_record(symbol=symbol, flags=flags, bid_price=bp, bid_qty=bq, ask_price=ap,
                            ask_qty=aq, update_id=update_id, first_update_id=first_update_id,
                            event_time_ns=event_time_ns, recv_time_ns=recv_time_ns)]
    for lvl in range(levels):
        if lvl >= len(bids) and lvl >= len(asks):
            break
        bp, bq = bids[lvl] if lvl < len(bids) else (0.0, 0.0)
        ap, aq = asks[lvl] if lvl < len(asks) else (0.0, 0.0)
        out.append(depth_level_record(symbol=symbol, flags=flags, level=lvl, bid_price=bp,
                                      bid_qty=bq, ask_price=ap, ask_qty=aq, update_id=update_id,
                                      first_update_id=first_update_id,
                                      event_time_ns=event_time_ns, recv_time_ns=recv_time_ns))
    return out
