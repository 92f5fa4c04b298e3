"""`pipeline ingest` depth: the local books (diff depth) and partial-depth frames -> records.

One :class:`~pipeline.marketdata.book.OrderBook` per symbol follows the diff-depth stream; every
applied diff publishes the book's top (and ``--depth-levels`` levels). A sequence break asks the
process for a resync from a REST snapshot (pipeline/marketdata/recovery.py), never awaited here.
Partial-depth frames (``@depth<N>``) are full top-N books: deduped by ``lastUpdateId`` with the
far-id rule of bookTicker, then published flagged SNAPSHOT.

Why apart from the process (ingest.py): depth has its own state (books, partial dedupe) and its
own rules, and none of the aggTrade / trade / bookTicker hot path; the process hands it decoded
events and gives it ``publish_many`` and the counters.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pipeline.ipc.records import Flags, book_stale_record
from pipeline.marketdata.book import BookAction, OrderBook, book_records
from pipeline.marketdata.gapfill import FarRun

if TYPE_CHECKING:
    from pipeline.binance.streams import DepthDiff, DepthPartial
    from pipeline.marketdata.ingest import Ingest

_SNAPSHOT = int(Flags.SNAPSHOT)


class DepthFeed:
    """The depth state of every symbol of one ingest process (index = ring symbol id)."""

    def __init__(self, ing: Ingest) -> None:
        cfg = ing.cfg
        n = len(cfg.symbols)
        jump, again = cfg.max_id_jump, cfg.id_resync_after
        self.ing = ing
        self._max_jump = jump
        self._levels = cfg.depth_levels
        self.books = [OrderBook(max_jump=jump, resync_after=again) for _ in range(n)]
        self.last_partial = [-1] * n  # partial depth dedupe
        #: partial-depth frames whose lastUpdateId is far from last_partial (held, bounded)
        self.partial_far: list[FarRun[Any]] = [
            FarRun(jump, again, contiguous=False) for _ in range(n)]
        self.partial_far_seen = 0
        self.partial_resets = 0
        #: monotonic time a BOOK_STALE went out for the symbol, None once a depth record
        #: followed (one per outage; problem_books_stale counts the long ones)
        self.stale_since: list[float | None] = [None] * n

    def mark_stale(self, sid: int, recv_ns: int) -> None:
        """Tell consumers the symbol's last depth records are no longer current: its connection
        was lost or its book broke and waits for a snapshot. Why a record: without it a
        consumer cannot tell a book frozen by an outage from a quiet market, and would go on
        pricing from it. Once per outage; nothing if no depth record was ever published."""
        book = self.books[sid]
        if self.stale_since[sid] is not None or (book.syncs == 0 and self.last_partial[sid] < 0):
            return
        self.stale_since[sid] = time.monotonic()
        self.ing.c["books_stale"] += 1
        uid = book.update_id if book.syncs else self.last_partial[sid]
        self.ing.publish(book_stale_record(symbol=sid, update_id=uid, recv_time_ns=recv_ns))

    def publish_book(self, sid: int, flags: int, first: int, ev_ns: int, recv_ns: int) -> None:
        """Publish the symbol's local book top (and ``--depth-levels`` levels)."""
        self.stale_since[sid] = None
        book = self.books[sid]
        bids, asks = book.top(max(1, self._levels))
        self.ing.publish_many(book_records(symbol=sid, flags=flags, update_id=book.update_id,
                                           first_update_id=first, event_time_ns=ev_ns,
                                           recv_time_ns=recv_ns, bids=bids, asks=asks,
                                           levels=self._levels))

    def on_diff(self, d: DepthDiff) -> None:
        """A diff-depth event: apply it, or count a duplicate, or ask for a resync."""
        act = self.books[d.symbol].on_diff(d.first_id, d.last_id, d.bids, d.asks)
        if act == BookAction.APPLIED:
            self.publish_book(d.symbol, 0, d.first_id, d.event_time_ns, d.recv_time_ns)
        elif act == BookAction.IGNORED:
            self.ing.c["duplicates"] += 1
        elif act == BookAction.NEED_SNAPSHOT:
            self.mark_stale(d.symbol, d.recv_time_ns)
            self.ing.start_resync(d.symbol)

    def on_partial(self, p: DepthPartial) -> None:
        """A partial-book frame: dedupe by ``lastUpdateId``, with the far-id rule of bookTicker
        (one bogus 10**17 must not make every later snapshot look old)."""
        lid, last, mj = p.last_update_id, self.last_partial[p.symbol], self._max_jump
        if lid <= last or (lid - last > mj and last >= 0):
            ing = self.ing
            if lid - last > mj or last - lid > mj:
                self.partial_far_seen += 1
                far = self.partial_far[p.symbol]
                if len(far.held) == 0:
                    ing.rlog.warning("id_far_partial", "update id far from the last one: "
                                     "held aside", symbol=ing.cfg.symbols[p.symbol],
                                     stream="depth<N>", u=lid, last=last)
                run = far.offer(lid, p)
                if run is not None:  # the stream restarted: go on from its latest snapshot
                    self.partial_resets += 1
                    ing.rlog.warning("id_reset_partial", "update id sequence restarted: "
                                     "re-based", symbol=ing.cfg.symbols[p.symbol],
                                     stream="depth<N>", new_first=run[0][0])
                    self._publish_partial(run[-1][1])
            else:
                ing.c["duplicates"] += 1
            return
        self._publish_partial(p)

    def _publish_partial(self, p: DepthPartial) -> None:
        self.stale_since[p.symbol] = None
        self.ing.publish_many(book_records(symbol=p.symbol, flags=_SNAPSHOT,
                                           update_id=p.last_update_id, first_update_id=0,
                                           event_time_ns=p.event_time_ns,
                                           recv_time_ns=p.recv_time_ns,
                                           bids=p.bids, asks=p.asks, levels=self._levels))
        self.last_partial[p.symbol] = p.last_update_id
