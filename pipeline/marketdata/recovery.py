"""`pipeline ingest` recovery over REST: aggTrade and @trade backfill, book resyncs.

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
import os
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


#: Binance's answers to a request that needs an API key it did not get or does not accept
#: (errors.md: -2014 API-key format invalid, -2015 invalid key/IP/permissions; HTTP 401).
_KEY_ERRORS = (b"-2014", b"-2015")


class RestRecovery:
    """The REST tasks of one ingest process; ``ing`` owns the cores, counters and publishing.

    Every request goes through the process's one :class:`~pipeline.net.rest.RestClient`: one
    keep-alive connection and one weight budget, backfills (newest gap first) ahead of
    snapshots (pipeline/marketdata/restbudget.py). A 429 or 418 is not a failure of the
    request's purpose: the budget holds every request back until ``Retry-After`` has passed,
    and the task asks again.
    """

    def __init__(self, ing: Ingest) -> None:
        from pipeline.binance.streams import TIME_UNITS

        self.ing = ing
        cfg = ing.cfg
        self.time_mult = TIME_UNITS[cfg.time_unit]
        self._client: Any = None
        self.api_key = os.environ.get(cfg.rest_api_key_env, "") if cfg.rest_api_key_env else ""
        self._no_key_logged = False

    @property
    def client(self) -> Any:
        """The process's REST client, made on first use (inside the running loop)."""
        if self._client is None:
            from pipeline.marketdata.restbudget import RestBudget
            from pipeline.net.rest import RestClient

            cfg = self.ing.cfg
            headers = {}
            if cfg.time_unit == "MICROSECOND":  # rows in the streams' unit (rest_rows.py)
                headers["X-MBX-TIME-UNIT"] = "MICROSECOND"
            self._client = RestClient(
                cfg.rest_url, RestBudget(limit=cfg.rest_weight_limit,
                                         interval_s=cfg.rest_weight_interval),
                headers=headers, timeout_s=cfg.rest_timeout)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def resync(self, sid: int) -> None:
        """Fetch snapshots until the book is synced (section 1.7 steps 2-6)."""
        from pipeline.backoff import Backoff, BackoffPolicy
        from pipeline.binance.streams import depth_snapshot
        from pipeline.marketdata.book import BookAction, BookState
        from pipeline.marketdata.restbudget import Priority, depth_weight
        from pipeline.net.http import HttpError
        from pipeline.net.rest import RestLimited

        ing = self.ing
        cfg = ing.cfg
        book = ing.depth.books[sid]
        sym = cfg.symbols[sid]
        backoff = Backoff(BackoffPolicy(initial_s=0.1, max_s=max(cfg.backoff_max, 0.1),
                                        max_attempts=0))
        weight = depth_weight(cfg.depth_snapshot_limit)
        while not ing.stopping and book.state is BookState.WAIT_SNAPSHOT:
            ing.c["rest_requests"] += 1
            try:
                body = await self.client.get_json(
                    "/api/v3/depth", {"symbol": sym, "limit": cfg.depth_snapshot_limit},
                    weight=weight, priority=Priority.SNAPSHOT)
                lid, bids, asks = depth_snapshot(body)
            except RestLimited:
                ing.c["rest_errors"] += 1
                continue  # the budget holds the next request until Retry-After has passed
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
        it (a rotation's two connections can deliver out of order), then fetch the missing
        trades by id from ``/api/v3/historicalTrades`` (weight 25; section 7.3), published in
        order and flagged BACKFILLED. A GAP record flagged TRADE_IDS only when REST fails for
        good (or refuses us for want of an API key: said once, loudly)."""
        await self._fill(sid, 2)

    async def backfill(self, sid: int) -> None:
        """Fill the symbol's missing aggregate trade ids from REST, in order; GAP on failure."""
        await self._fill(sid, 1)

    async def _fill(self, sid: int, kind: int) -> None:
        """The backfill loop of one symbol and id kind (1 aggregate ids, 2 trade ids)."""
        from pipeline.marketdata.rest_rows import agg_trade_row, trade_row
        from pipeline.marketdata.restbudget import (
            WEIGHT_AGG_TRADES,
            WEIGHT_HISTORICAL_TRADES,
            Priority,
        )
        from pipeline.net.http import HttpError
        from pipeline.net.rest import RestLimited

        ing = self.ing
        cfg = ing.cfg
        trades = kind == 2
        tr = (ing.ids.trade if trades else ing.ids.agg)[sid]
        sym = cfg.symbols[sid]
        if trades:
            path, weight, parse = "/api/v3/historicalTrades", WEIGHT_HISTORICAL_TRADES, trade_row
            headers = {"X-MBX-APIKEY": self.api_key} if self.api_key else None
            what = "trades"
        else:
            path, weight, parse = "/api/v3/aggTrades", WEIGHT_AGG_TRADES, agg_trade_row
            headers = None
            what = "aggregate trades"
        since = time.time()  # the newest gap goes first (restbudget.RestQueue)
        await ing.sleep(cfg.backfill_grace)  # the live stream may still fill a small hole
        failures = 0
        while not ing.stopping:
            req = tr.next_request()
            if req is None:
                return
            gap = tr.missing()
            if tr.overflowing or (gap is not None and gap[1] - gap[0] + 1 > cfg.max_backfill_ids):
                # too much to fetch: a hole of millions (a hostile id just inside
                # --max-id-jump) would spend minutes of the IP's request budget, a path to a
                # 418 ban; report it instead
                failures = cfg.rest_retries + 1
            else:
                ing.c["rest_requests"] += 1
                try:
                    rows = await self.client.get_json(
                        path, {"symbol": sym, "fromId": req[0], "limit": req[1]},
                        weight=weight, priority=Priority.BACKFILL, since=since, headers=headers)
                    if not isinstance(rows, list):
                        raise TypeError(f"{path} answer is not a list")
                except RestLimited:
                    ing.c["rest_errors"] += 1
                    continue  # held back by the budget until Retry-After; not a failure
                except (HttpError, TypeError) as exc:
                    ing.c["rest_errors"] += 1
                    failures += 1
                    if trades and self._key_refused(exc):
                        failures = cfg.rest_retries + 1
                    ing.rlog.warning(f"backfill_failed_{kind}", f"{path} backfill failed",
                                     symbol=sym, from_id=req[0], error=str(exc)[:200])
                else:
                    recv_ns = time.time_ns()
                    mult = self.time_mult
                    parsed = [(r[AT_TRADE_ID], r) for r in
                              (parse(x, sid, recv_ns, mult) for x in rows) if r]
                    before = tr.stats.published_backfill
                    out = tr.on_backfill(parsed)
                    got = tr.stats.published_backfill - before
                    ing.c["trades_backfilled" if trades else "ids_backfilled"] += got
                    ing.ids.publish_tracked(tr, out)
                    ing.ids.changed(sid, kind)
                    if tr.missing() is None:
                        ing.c["trade_gaps_backfilled" if trades else "gaps_backfilled"] += 1
                        log.info("backfilled", extra={"symbol": sym, "ids": got,
                                                      "stream": "trade" if trades else "aggTrade"})
                        failures = 0
                        continue
                    failures = 0 if got else failures + 1  # no progress: REST not there yet
            if failures > cfg.rest_retries:
                self._give_up(sid, kind, tr, what)
                failures = 0
                continue
            if failures:
                await ing.sleep(min(cfg.backoff_base * 2 ** (failures - 1), cfg.backoff_max))

    def _key_refused(self, exc: Exception) -> bool:
        """historicalTrades answered that it wants an API key: retrying cannot help."""
        from pipeline.net.http import HttpError

        if not isinstance(exc, HttpError) or not (
                exc.status == 401 or any(code in exc.body for code in _KEY_ERRORS)):
            return False
        if not self._no_key_logged:
            self._no_key_logged = True
            self.ing.rlog.warning(
                "trade_backfill_no_key",
                "@trade holes cannot be backfilled: historicalTrades refused the request for "
                "want of a valid API key (set --rest-api-key-env to the name of an environment "
                "variable holding one); the holes are reported as GAP records",
                configured=bool(self.api_key))
        return True

    def _give_up(self, sid: int, kind: int, tr: Any, what: str) -> None:
        """REST failed for good: a GAP record names the missing ids, and the ids behind it go
        out."""
        ing = self.ing
        trades = kind == 2
        gap = tr.missing()
        out = tr.give_up(gap_maker(sid, int(Flags.TRADE_IDS) if trades else 0))
        ing.c["trade_gaps" if trades else "gaps_unrecoverable"] += 1
        if gap is not None:
            ing.c["trade_ids_lost" if trades else "ids_lost"] += gap[1] - gap[0] + 1
        ing.rlog.warning(f"gap_{kind}", f"{what} lost (REST backfill failed)",
                         symbol=ing.cfg.symbols[sid], first=gap[0] if gap else None,
                         last=gap[1] if gap else None)
        ing.ids.publish_tracked(tr, out)
        ing.ids.changed(sid, kind)
