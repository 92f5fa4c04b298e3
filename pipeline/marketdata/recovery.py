"""`pipeline ingest` recovery over REST: aggTrade backfill, @trade gap reports, book resyncs.

Each runs as its own task, started by the frame handler when a core asks for it (a hole in a
symbol's ids, a diff-depth sequence break) and never awaited there: a frame handler that waited
on REST would stall every other stream of its connection. They feed their answers back into the
same cores and publish through the process's one publishing path, so what reaches the ring stays
in id order and exactly once whichever way it came.

Why apart from the process (ingest.py): these are the slow, retrying, request-weight-spending
paths; the frame handler and these tasks share only the cores, the counters and ``publish``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.ipc.records import (
    AT_TRADE_ID,
    Flags,
    TickTuple,
    book_resync_record,
    gap_record,
    id_reset_record,
)

if TYPE_CHECKING:
    from pipeline.marketdata.ingest import Ingest

log = logging.getLogger("pipeline.ingest")


def reset_maker(sid: int, flags: int = 0) -> Callable[[int, int], TickTuple]:
    """What an id tracker calls to mark a restarted id sequence of symbol ``sid`` (a GAP flagged
    RESYNCED, see :func:`pipeline.ipc.records.id_reset_record`), stamped when it is made."""

    def make(old_last: int, new_first: int) -> TickTuple:
        return id_reset_record(symbol=sid, flags=flags, last_before=old_last,
                               first_after=new_first, recv_time_ns=time.time_ns())

    return make


def gap_maker(sid: int, flags: int = 0) -> Callable[[Any], TickTuple]:
    """What an id tracker calls to report the hole ``g`` (``g.first..g.last``) of symbol ``sid``
    as lost (a GAP record; ``flags`` Flags.TRADE_IDS for @trade ids)."""

    def make(g: Any) -> TickTuple:
        return gap_record(symbol=sid, flags=flags, first_missing=g.first, last_missing=g.last,
                          recv_time_ns=time.time_ns())

    return make


class RestRecovery:
    """The REST tasks of one ingest process; ``ing`` owns the cores, counters and publishing."""

    def __init__(self, ing: Ingest) -> None:
        self.ing = ing

    async def resync(self, sid: int) -> None:
        """Fetch snapshots until the book is synced (section 1.7 steps 2-6)."""
        from pipeline.backoff import Backoff, BackoffPolicy
        from pipeline.binance.streams import depth_snapshot
        from pipeline.marketdata.book import BookAction, BookState
        from pipeline.net.http import HttpError, get_json

        ing = self.ing
        cfg = ing.cfg
        book = ing.depth.books[sid]
        sym = cfg.symbols[sid]
        backoff = Backoff(BackoffPolicy(initial_s=0.1, max_s=max(cfg.backoff_max, 0.1),
                                        max_attempts=0))
        while not ing.stopping and book.state is BookState.WAIT_SNAPSHOT:
            ing.c["rest_requests"] += 1
            try:
                _, body = await get_json(cfg.rest_url, "/api/v3/depth",
                                         {"symbol": sym, "limit": cfg.depth_snapshot_limit},
                                         timeout_s=cfg.rest_timeout)
                lid, bids, asks = depth_snapshot(body)
            except (HttpError, KeyError, TypeError, ValueError) as exc:
                ing.c["rest_errors"] += 1
                ing.rlog.warning("snapshot_failed", "depth snapshot failed", symbol=sym,
                                 error=str(exc)[:200])
                await ing.sleep(backoff.next_delay() or 1.0)
                continue
            recv_ns = time.time_ns()
            act = book.on_snapshot(lid, bids, asks)
            if act == BookAction.SYNCED:
                ing.c["book_resyncs"] += 1
                flags = int(Flags.SNAPSHOT)
                if book.resynced_after_break:
                    flags |= int(Flags.RESYNCED)
                ing.publish(book_resync_record(symbol=sid, flags=flags, snapshot_update_id=lid,
                                               book_update_id=book.update_id,
                                               recv_time_ns=recv_ns))
                ing.depth.publish_book(sid, flags, lid, 0, recv_ns)
                log.info("book synced", extra={"symbol": sym, "last_update_id": lid,
                                               "after_break": book.resynced_after_break})
                return
            if act == BookAction.REFETCH:
                await ing.sleep(min(0.05 * (1 + backoff.attempts), 1.0))
                backoff.attempts += 1

    async def trade_gap(self, sid: int) -> None:
        """A hole in a symbol's @trade ids: wait ``--backfill-grace`` for the live stream to fill
        it (a rotation's two connections can deliver out of order), then publish a GAP record
        flagged TRADE_IDS and go on. Why not fetch them: the reference documents no REST call
        that returns individual trades by id (``/api/v3/aggTrades`` rows merge trades), so a
        consumer that needs them is told exactly which ids it will not get."""
        ing = self.ing
        await ing.sleep(ing.cfg.backfill_grace)
        tr = ing.ids.trade[sid]
        gap = tr.missing()
        if gap is None or ing.stopping:
            return
        out = tr.give_up(gap_maker(sid, int(Flags.TRADE_IDS)))
        ing.c["trade_gaps"] += 1
        ing.c["trade_ids_lost"] += gap[1] - gap[0] + 1
        ing.rlog.warning("trade_gap", "trades lost (no REST source for trade ids)",
                         symbol=ing.cfg.symbols[sid], first=gap[0], last=gap[1])
        ing.ids.publish_tracked(tr, out)
        ing.ids.changed(sid, 2)

    async def backfill(self, sid: int) -> None:
        """Fill the symbol's missing aggregate trade ids from REST, in order; GAP on failure."""
        from pipeline.binance.streams import agg_trade_from_rest
        from pipeline.net.http import HttpError, get_json

        ing = self.ing
        cfg = ing.cfg
        tr = ing.ids.agg[sid]
        sym = cfg.symbols[sid]
        await ing.sleep(cfg.backfill_grace)  # the live stream may still fill a small hole
        failures = 0
        while not ing.stopping:
            req = tr.next_request()
            if req is None:
                return
            gap = tr.missing()
            if tr.overflowing or (gap is not None and gap[1] - gap[0] + 1 > cfg.max_backfill_ids):
                # too much to fetch: ~2 request weight per 1000 ids, and a hole of millions
                # (a hostile id just inside --max-id-jump) would spend minutes of the IP's
                # request budget, a path to a 418 ban; report it instead
                failures = cfg.rest_retries + 1
            else:
                ing.c["rest_requests"] += 1
                try:
                    _, rows = await get_json(cfg.rest_url, "/api/v3/aggTrades",
                                             {"symbol": sym, "fromId": req[0], "limit": req[1]},
                                             timeout_s=cfg.rest_timeout)
                    if not isinstance(rows, list):
                        raise TypeError("aggTrades answer is not a list")
                except (HttpError, TypeError) as exc:
                    ing.c["rest_errors"] += 1
                    failures += 1
                    ing.rlog.warning("backfill_failed", "aggTrades backfill failed",
                                     symbol=sym, from_id=req[0], error=str(exc)[:200])
                else:
                    recv_ns = time.time_ns()
                    parsed = [(r[AT_TRADE_ID], r) for r in
                              (agg_trade_from_rest(x, sid, recv_ns) for x in rows) if r]
                    before = tr.stats.published_backfill
                    out = tr.on_backfill(parsed)
                    got = tr.stats.published_backfill - before
                    ing.c["ids_backfilled"] += got
                    ing.ids.publish_tracked(tr, out)
                    ing.ids.changed(sid)
                    if tr.missing() is None:
                        ing.c["gaps_backfilled"] += 1
                        log.info("backfilled", extra={"symbol": sym, "ids": got})
                        failures = 0
                        continue
                    failures = 0 if got else failures + 1  # no progress: REST not there yet
            if failures > cfg.rest_retries:
                gap = tr.missing()
                out = tr.give_up(gap_maker(sid))
                ing.c["gaps_unrecoverable"] += 1
                if gap is not None:
                    ing.c["ids_lost"] += gap[1] - gap[0] + 1
                ing.rlog.warning("gap", "aggregate trades lost", symbol=sym,
                                 first=gap[0] if gap else None, last=gap[1] if gap else None)
                ing.ids.publish_tracked(tr, out)
                ing.ids.changed(sid)
                failures = 0
                continue
            if failures:
                await ing.sleep(min(cfg.backoff_base * 2 ** (failures - 1), cfg.backoff_max))
