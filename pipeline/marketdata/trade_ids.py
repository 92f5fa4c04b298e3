"""`pipeline ingest` trade ids: aggTrade and @trade ids exactly once, in order, per symbol.

One :class:`~pipeline.marketdata.gapfill.AggTracker` per symbol and id kind (aggregate ids of
``aggTrade``, trade ids of ``@trade``) decides for every trade the compiled path did not take:
duplicate, the next id, held behind a hole, far from the last id (held aside), or a restart.
What the tracker releases is published here, in order; a hole starts its filler (REST backfill
for aggregate ids, a GAP report for trade ids: pipeline/marketdata/recovery.py).

Both paths publish one sequence: the compiled path (pipeline/marketdata/fastpath.py) keeps its
own last id per symbol and kind, so every decision here starts from the last id it published,
and re-arms it afterwards only while no hole is open (the tracker then owns the next ids).

Why apart from the process (ingest.py): the id rules and their hand-off with the compiled path
are one idea; the process keeps only the common case (the next aggregate id, published inline in
its frame handler) and hands everything else to :meth:`TradeIds.track`.
"""

from __future__ import annotations

from struct import error as struct_error
from typing import TYPE_CHECKING, Any

from pipeline.ipc.records import AT_KIND, AT_TRADE_ID, TRACKED_KINDS, Flags, TickTuple
from pipeline.marketdata.gapfill import AggTracker
from pipeline.marketdata.recovery import gap_maker, reset_maker

if TYPE_CHECKING:
    from pipeline.marketdata.ingest import Ingest

# ``kind`` below is the record kind, as the compiled path numbers its id lanes: 1 aggregate ids
# (Kind.AGG_TRADE), 2 @trade ids (Kind.TRADE)
_STREAM = {1: "aggTrade", 2: "trade"}


class TradeIds:
    """The trade-id trackers of every symbol (index = ring symbol id) of one ingest process."""

    def __init__(self, ing: Ingest) -> None:
        cfg = ing.cfg
        n = len(cfg.symbols)
        jump, again = cfg.max_id_jump, cfg.id_resync_after
        self.ing = ing
        # fixed for the process's life: held here so a frame costs no lookup through `ing`
        self._c = ing.c
        self._rlog = ing.rlog
        self._symbols = cfg.symbols
        #: aggregate trade ids per symbol
        self.agg: list[AggTracker[TickTuple]] = [
            AggTracker(max_jump=jump, resync_after=again, make_reset=reset_maker(sid),
                       make_gap=gap_maker(sid)) for sid in range(n)]
        # @trade ids are contiguous per symbol too: same exactly-once tracking, but a hole the
        # live stream does not fill is reported, not fetched (see RestRecovery.trade_gap)
        tf = int(Flags.TRADE_IDS)
        #: @trade ids per symbol
        self.trade: list[AggTracker[TickTuple]] = [
            AggTracker(max_jump=jump, resync_after=again, make_reset=reset_maker(sid, tf),
                       make_gap=gap_maker(sid, tf)) for sid in range(n)]
        #: symbols whose REST backfill / trade-gap task is running (one per symbol and kind)
        self.backfilling: set[int] = set()
        self.trade_waiting: set[int] = set()

    def track(self, kind: int, sid: int, val: TickTuple) -> None:
        """An aggTrade (``kind`` 1) or trade (2) the fast lane did not take: the symbol's
        exactly-once tracker decides (duplicate, gap, first trade, held behind a gap), starting
        from the last id the compiled path published; the compiled path is re-armed only while
        no hole is open, and a hole starts its filler (REST backfill, or the trade GAP timer).
        """
        tr = (self.agg if kind == 1 else self.trade)[sid]
        ing = self.ing
        fast = ing.fast
        if fast is not None:
            last = fast.last_id(sid, kind)
            if last is not None:
                tr.last = last
        dups, resets, far = tr.stats.duplicates, tr.stats.resets, tr.stats.far_ids
        out = tr.on_live(val[AT_TRADE_ID], val)
        self._c["duplicates"] += tr.stats.duplicates - dups
        if tr.stats.far_ids != far:
            self._rlog.warning(f"id_far_{kind}", "id far from the last one: held aside",
                               symbol=self._symbols[sid], stream=_STREAM[kind],
                               id=val[AT_TRADE_ID], last=tr.last)
        if tr.stats.resets != resets:
            self._log_reset(kind, sid, out)
        if out:
            self.publish_tracked(tr, out)
        if fast is not None:
            # disarmed while far ids are held aside too: the next id must reach the tracker,
            # which forgets them then (the compiled lane would not, and a later run of far ids
            # could re-base the stream on one path and not on the other)
            fast.set_last(sid, None if tr.pending or tr.far.held else tr.last, kind)
        if tr.pending:
            if kind == 1 and sid not in self.backfilling:
                ing._spawn(ing.recovery.backfill(sid), self.backfilling, sid)
            elif kind == 2 and sid not in self.trade_waiting:
                ing._spawn(ing.recovery.trade_gap(sid), self.trade_waiting, sid)

    def publish_tracked(self, tr: Any, out: list[TickTuple]) -> None:
        """Publish what a tracker released, in order. A record the ring refuses (it cannot be
        packed) is counted and logged, and the tracker is rewound to just before it: its id and
        the ones after it become a hole again (backfilled, or reported by a GAP record), never
        silently taken as published."""
        publish = self.ing.publish
        for i, rec in enumerate(out):
            try:
                publish(rec)
            except (OverflowError, TypeError, ValueError, struct_error) as exc:
                self._c["publish_errors"] += 1
                self._rlog.warning("publish_error", "record could not be published; its id is "
                                   "a hole again", kind=rec[AT_KIND], id=rec[AT_TRADE_ID],
                                   error=repr(exc))
                tracked = [(r[AT_TRADE_ID], r) for r in out[i:] if r[AT_KIND] in TRACKED_KINDS]
                if tracked:
                    tr.rewind(tracked[0][0] - 1, tracked[1:])
                return

    def _log_reset(self, kind: int, sid: int, out: list[TickTuple]) -> None:
        self._rlog.warning("id_reset", "id sequence restarted (a run of ids far from the last "
                           "one): re-based, nothing fetched across the jump",
                           symbol=self._symbols[sid], stream=_STREAM[kind],
                           new_first=next((r[AT_TRADE_ID] for r in out if r[AT_KIND] == kind),
                                          None))

    def changed(self, sid: int, kind: int = 1) -> None:
        """A gap was filled or given up outside the frame handler: the compiled path may
        continue after it (``kind`` 1: aggregate ids, 2: trade ids)."""
        tr = (self.agg if kind == 1 else self.trade)[sid]
        fast = self.ing.fast
        if fast is not None:
            fast.set_last(sid, None if tr.pending or tr.far.held else tr.last, kind)

    def last_agg_id(self, sid: int) -> int | None:
        """The last aggregate id published for the symbol (whichever path published it)."""
        fast = self.ing.fast
        if fast is not None:
            last = fast.last_id(sid)
            if last is not None:
                return int(last)
        return self.agg[sid].last

    def take_back(self, fast: Any) -> None:
        """The compiled path is going away: the last ids it published are the trackers' again."""
        for sid in range(len(self.agg)):
            for kind, tracker in ((1, self.agg[sid]), (2, self.trade[sid])):
                last = fast.last_id(sid, kind)
                if last is not None:
                    tracker.last = last
