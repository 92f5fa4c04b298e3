"""`pipeline ingest`: Binance market-data streams -> the shared-memory tick ring, gap-free.

The process is a thin asyncio shell (uvloop) around pure cores:

- :mod:`pipeline.binance.streams` decodes each frame once into a record tuple or an event;
- :mod:`pipeline.marketdata.gapfill` makes aggregate trades exactly-once and in order per symbol;
- :mod:`pipeline.marketdata.book` keeps each local order book in sync (snapshot + diffs, section
  1.7);
- :mod:`pipeline.net.ws` / :mod:`pipeline.net.http` are the sockets.

This module is the process: the frame handler, ring publishing, task plumbing and ``run``. The
rest of the wing, one idea per module beside it: ``config`` (IngestConfig, validate), ``cli``
(the flags), ``connections`` (shards of at most 1024 streams, one websocket each, reconnects and
rotation), ``trade_ids`` (aggTrade / @trade ids exactly once, with the compiled path),
``depth`` (local books, partial depth), ``recovery`` (REST backfill, trade gaps, snapshots),
``ingest_metrics`` (what the metrics block shows). The names this module always offered are
still importable from it.

Liveness and gap-freedom:

- the websocket library answers server pings and sends our own; a connection that delivers no
  message for ``--stall-timeout`` s is dead; it is closed and reopened with exponential backoff
  (pipeline/backoff.py: base doubling to the cap, jittered; reset once a connection stayed
  healthy for ``--healthy-after`` s);
- rotation before ``--max-lifetime`` and on ``serverShutdown`` is make-before-break: open and
  subscribe the new connection, wait for its first message, then close the old one; duplicates
  from the overlap are dropped by id (agg trade id, trade id, book update id);
- a jump in a symbol's aggregate trade ids (after a reconnect or a server hiccup) is filled from
  REST ``/api/v3/aggTrades`` in a separate task (never in the frame handler) and published
  flagged BACKFILLED before the live trades behind it; if that fails ``--rest-retries`` times a
  Kind.GAP record names the missing ids;
- diff-depth books resync from a REST snapshot in a separate task on a sequence break and say so
  (Kind.BOOK_RESYNC + Flags.RESYNCED).

Hostile numbers (issue 11): ids and times outside int64 are skipped as ``bad_number`` by the
decoders; an id further than ``--max-id-jump`` from its stream's last one (aggTrade, trade,
bookTicker ``u``, depth ``u``) is held aside and counted (``ids_far``), never a gap to backfill
and never a new "last" that makes every real frame a duplicate; ``--id-resync-after`` of them
that agree are a stream restart (``id_resets``; for trades a GAP record flagged RESYNCED:
``trade_id`` the last id before, ``aux_id`` the first after). A tracker advances only once its
record is in the ring. A long-lived task that dies stops the process (exit 1, traceback
logged): half alive is worse than a supervisor restart. The metrics block is rewritten every
``--metrics-interval`` (``heartbeat_interval_ms``) even when no frame arrives.

Counters live in Python ints on the hot path and are copied into the MetricsBlock every
``--metrics-interval`` s (a seqlock write per frame would cost more than the frame).

Every record is visible the moment its frame is decoded: a burst of frames from one socket read
is not held back until its last frame is handled (that cost the first frame of a burst tens to
hundreds of microseconds). A frame that makes several records (a depth update's levels) is
committed as one batch (``--publish-batch`` bounds it), so readers see a book update whole.

The common aggTrade, trade and bookTicker frame (the id its stream expects next, canonical
JSON) does not reach Python at all: the compiled path (pipeline/marketdata/fastpath.py,
``--fast-path``) parses it and publishes its record from the transport's callback, and calls
back into :meth:`Ingest._fast_fallback` for everything else. It shares the ring writer's
cursor and intent (through the ring header, never the writer's attributes) and the last ids of
the trackers and of the bookTicker dedupe (:meth:`TradeIds.track` and the BOOK_TICKER branch of
:meth:`Ingest.handle`): whichever path sees a frame starts from what the other published, so
both publish one sequence, in order, exactly once. SBE trade and bestBidAsk frames likewise
(the compiled ``on_sbe_message``, falling back to :meth:`Ingest.handle_sbe`), on the same ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.ipc.records import AT_SYMBOL, AT_TRADE_ID
from pipeline.logs import RateLimitedLog
from pipeline.marketdata.cli import config_from_args, register
from pipeline.marketdata.config import (
    DEFAULT_REST_URL,
    DEFAULT_STREAMS_URL,
    MAX_STREAMS_PER_CONNECTION,
    ConfigError,
    IngestConfig,
    validate,
)
from pipeline.marketdata.depth import DepthFeed
from pipeline.marketdata.ingest_metrics import (
    COUNTERS,
    metric_values,
    metrics_fields,
)
from pipeline.marketdata.recovery import RestRecovery
from pipeline.marketdata.shards import (
    BACKOFF,
    CONNECTING,
    DOWN,
    ROTATING,
    UP,
    Conn,
    Shard,
)
from pipeline.marketdata.trade_ids import TradeIds

log = logging.getLogger("pipeline.ingest")

__all__ = [  # what this module has always offered, wherever it now lives
    "BACKOFF", "CONNECTING", "COUNTERS", "DEFAULT_REST_URL", "DEFAULT_STREAMS_URL", "DOWN",
    "MAX_STREAMS_PER_CONNECTION", "ROTATING", "UP", "ConfigError", "Conn", "Ingest",
    "IngestConfig", "Shard", "config_from_args", "metrics_fields", "register", "run", "validate",
]


# --- the process ------------------------------------------------------------------------------


class Ingest:
    """Owns the ring, the metrics block, the per-symbol cores and the shards."""

    def __init__(self, cfg: IngestConfig, ring: Any, metrics: Any) -> None:
        from pipeline.binance import streams as st

        self.cfg = cfg
        self.ring = ring
        self.metrics = metrics
        self.st = st
        self.decoder = st.make_decoder(cfg.decoder, cfg.symbols, cfg.max_frame_bytes,
                                       cfg.time_unit)
        self._decode = self.decoder.decode
        assert st.AGG == 1, "handle() compares the decode tag with the literal 1"
        from pipeline.marketdata.gapfill import FarRun

        n = len(cfg.symbols)
        jump, again = cfg.max_id_jump, cfg.id_resync_after
        self._max_jump = jump
        self.last_book_u = [-1] * n  # bookTicker dedupe
        #: bookTicker updates whose `u` is far from last_book_u (held, at most id_resync_after)
        self.book_far: list[FarRun[tuple[Any, ...]]] = [
            FarRun(jump, again, contiguous=False) for _ in range(n)]
        self.book_far_seen = 0
        self.book_resets = 0
        #: the local books and partial-depth dedupe (pipeline/marketdata/depth.py); its two
        #: handlers are bound here so a depth frame costs no extra lookup
        self.depth = DepthFeed(self)
        self._on_diff = self.depth.on_diff
        self._on_partial = self.depth.on_partial
        self.c: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        from pipeline.binance import sbe

        #: by reason; the SBE reasons include the JSON ones (text frames on an SBE connection)
        self.skipped: dict[str, int] = dict.fromkeys(sbe.SKIP_REASONS, 0)
        self.sbe = sbe
        #: SBE frames (connections with ``conn.sbe``) never go through the JSON decoder; the
        #: compiled twin unless ``--fast-path off`` (the reference), or when no SBE streams
        self.sbe_decoder, how = sbe.make_decoder(
            cfg.symbols, cfg.max_frame_bytes, cfg.fast_path if cfg.sbe_streams else "off")
        self._decode_sbe = self.sbe_decoder.decode
        if cfg.sbe_streams:
            log.info("SBE decoder: " + how)
        self.last_frame_ns = 0
        self.next_req_id = 0
        self.stopping = False
        self._stop = asyncio.Event()
        self.rlog = RateLimitedLog(log)
        #: aggTrade and @trade ids exactly once (pipeline/marketdata/trade_ids.py); its trackers
        #: and track() are bound here for the frame handler, which reads them on every trade
        self.ids = TradeIds(self)
        self.trackers = self.ids.agg
        self.trade_trackers = self.ids.trade
        self._track = self.ids.track
        self.last_agg_id = self.ids.last_agg_id
        names = cfg.stream_names()
        per = cfg.streams_per_connection
        self.shards = [Shard(self, i, names[k:k + per]) for i, k in
                       enumerate(range(0, len(names), per))]
        sbe_names = cfg.sbe_stream_names()
        self.shards += [Shard(self, len(self.shards) + i, sbe_names[k:k + per], sbe=True)
                        for i, k in enumerate(range(0, len(sbe_names), per))]
        #: X-MBX-APIKEY of SBE connections (--sbe-api-key-file / -env; run() refuses to start
        #: when neither gives a usable key)
        self.sbe_api_key = ""
        if sbe_names:
            from pipeline.config import SecretFileError
            from pipeline.marketdata.config import sbe_api_key

            try:
                self.sbe_api_key = sbe_api_key(cfg)
            except SecretFileError:  # run() refused to start on it; in-process tests go on
                pass
        self._tasks: set[asyncio.Task[Any]] = set()
        #: a long-lived task died of an exception: the process stops and exits non-zero
        self.failed: BaseException | None = None
        #: a shard may be without a delivering connection this long (stall detection, a full
        #: backoff, a handshake) before metrics report it as a problem
        self.down_grace_s = 2 * cfg.stall_timeout + cfg.backoff_max
        #: the REST tasks (backfill, trade gap reports, book resyncs), started by _spawn
        self.recovery = RestRecovery(self)
        self._resyncing: set[int] = set()
        self._publish_raw: Callable[[Any], int] = ring.publish
        self.cursor0 = ring.cursor
        self._time_ns = time.time_ns
        self._ready = False
        #: set by setup_publishing: the loop whose iterations the compiled path reports per
        #: connection in
        self._loop: asyncio.AbstractEventLoop | None = None
        self._iter_open = False  # the compiled path told us of a frame in this loop iteration
        self._stage: Callable[[tuple[Any, ...]], bool] | None = None  # publish_many's batches
        #: the compiled path (pipeline/marketdata/fastpath.py), once setup_publishing() built it
        self.fast: Any = None
        self.frames_fast = 0  # the compiled path's count, kept once it is released
        #: what the transport calls per frame: fast.on_message, or handle
        self.on_frame: Callable[[Conn, bytes, int], None] = self.handle
        #: likewise for SBE connections: fast.on_sbe_message, or handle_sbe
        self.on_sbe_frame: Callable[[Conn, bytes, int], None] = self.handle_sbe

    # -- publishing --
    def setup_publishing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set up staging for multi-record frames (``--publish-batch`` records per commit) and
        build the compiled frame path (``--fast-path``). Call :meth:`release` before closing
        the ring: the compiled path holds its buffers.

        Why no batching across frames: committing at the end of an event-loop iteration saved
        ~0.35 us per frame under load, but held the first frame of a socket read invisible
        until the last one was decoded (recv -> publish p99 556 us on ``make run``). The
        compiled path publishes each record itself (a cursor store costs nanoseconds in C); the
        Python path publishes each record at once (~0.9 us instead of ~0.55 us staged) and
        stages only the records of one frame, so a depth update is seen whole.
        """
        from pipeline.marketdata import fastpath

        if not hasattr(self.ring, "configure_staging"):
            return
        self.ring.configure_staging("publish_time_ns", self.cfg.publish_batch)
        self._stage = self.ring.stage
        self._loop = loop
        self.fast, how = fastpath.build(self.cfg.fast_path, self.cfg.symbols, self.ring,
                                        self._fast_fallback, self.cfg.max_frame_bytes,
                                        self.decoder.time_mult, self.cfg.max_id_jump,
                                        self._fast_sbe_fallback if self.cfg.sbe_streams
                                        else None)
        self.on_frame = self.fast.on_message if self.fast is not None else self.handle
        self.on_sbe_frame = (self.fast.on_sbe_message
                             if self.fast is not None and self.cfg.sbe_streams
                             else self.handle_sbe)
        log.info("fast path: " + how)

    def release(self) -> None:
        """Drop the compiled path's hold on the ring's buffers (idempotent); frames then take
        the Python handler."""
        fast, self.fast = self.fast, None
        self.on_frame = self.handle
        self.on_sbe_frame = self.handle_sbe
        if fast is not None:
            self.frames_fast = fast.frames
            self.ids.take_back(fast)  # the ids it published are Python's again
            for sid in range(len(self.last_book_u)):
                last = fast.last_id(sid, 3)
                if last is not None:
                    self.last_book_u[sid] = last
            fast.close()

    def _open_iteration(self) -> None:
        """The compiled path has told us of a frame in this loop iteration: it need not call
        back for further frames of the same connection until the iteration ends."""
        self._iter_open = True
        if self.fast is not None:
            self.fast.iter_open = 1
        self._loop.call_soon(self._end_iteration)  # type: ignore[union-attr]

    def _end_iteration(self) -> None:
        self._iter_open = False
        if self.fast is not None:
            self.fast.iter_open = 0

    def _commit(self) -> None:
        self.ring.commit(self._time_ns())

    def publish(self, rec: tuple[Any, ...]) -> None:
        """Publish a record tuple (all fields but ``publish_time_ns``): visible at once."""
        self._publish_raw((*rec, self._time_ns()))

    def publish_many(self, recs: list[tuple[Any, ...]]) -> None:
        """Publish the records of one frame together (a depth update's levels): staged and
        committed at once, at most ``--publish-batch`` per commit."""
        stage = self._stage
        if stage is None:
            for r in recs:
                self._publish_raw((*r, self._time_ns()))
            return
        for r in recs:
            if stage(r):
                self._commit()
        self._commit()

    # -- the frame handlers (hot path; never await, never raise) --
    def _fast_fallback(self, conn: Conn, payload: bytes, recv_ns: int, code: int) -> None:
        """Called by the compiled path: ``code`` 0, a frame it did not take (everything but
        the expected next id of an armed aggTrade / trade / bookTicker stream in canonical
        JSON): the Python handler decides.
        ``code`` 2: it published the record and the shell must learn of the connection (its
        first frame in this loop iteration: the compiled path keeps no per-connection state,
        so ``last_ns`` is the first such frame's time, at most one iteration old)."""
        if code == 0:
            self.handle(conn, payload, recv_ns)
            return
        conn.last_ns = recv_ns
        if conn.first_pending:
            conn.got_first()
        if not self._iter_open and self._loop is not None:
            self._open_iteration()

    def _fast_sbe_fallback(self, conn: Conn, payload: bytes, recv_ns: int, code: int) -> None:
        """:meth:`_fast_fallback` for SBE connections (the compiled ``on_sbe_message``): code
        0, a frame it did not take, goes to :meth:`handle_sbe`; code 2 is the same
        per-connection bookkeeping as for JSON."""
        if code == 0:
            self.handle_sbe(conn, payload, recv_ns)
        else:
            self._fast_fallback(conn, payload, recv_ns, code)

    def _book_far(self, sid: int, val: tuple[Any, ...]) -> None:
        """A bookTicker whose `u` is far from the last one: held aside (one bogus id must not
        make every later update look old); a run of them re-bases the dedupe."""
        self.book_far_seen += 1
        far = self.book_far[sid]
        if len(far.held) == 0:
            self.rlog.warning("id_far_3", "update id far from the last one: held aside",
                              symbol=self.cfg.symbols[sid], stream="bookTicker", u=val[AT_TRADE_ID],
                              last=self.last_book_u[sid])
        run = far.offer(val[AT_TRADE_ID], val)
        if run is None:
            return
        self.book_resets += 1
        self.rlog.warning("id_reset", "update id sequence restarted: re-based",
                          symbol=self.cfg.symbols[sid], stream="bookTicker", new_first=run[0][0])
        for u, rec in run:
            self.publish(rec)
            self.last_book_u[sid] = u
        if self.fast is not None:
            self.fast.set_last(sid, self.last_book_u[sid], 3)

    def handle_sbe(self, conn: Conn, payload: bytes, recv_ns: int) -> None:
        """A frame of an SBE connection: decoded by the SBE decoder, then handled as the JSON
        records are (a TRADES group is tracked record by record, exactly once with JSON
        @trade's machinery). A separate entry so the JSON path pays nothing for SBE."""
        conn.last_ns = recv_ns
        if conn.first_pending:
            conn.got_first()
        self.c["frames_received"] += 1
        try:
            tag, val = self._decode_sbe(payload, recv_ns)
            if tag == self.sbe.TRADES:
                track = self._track
                for rec in val:
                    track(2, rec[AT_SYMBOL], rec)
                return
            st = self.st
            if tag == st.BOOK_TICKER:
                self._on_book(val)
            elif tag == st.DEPTH_DIFF:
                self._on_diff(val)
            elif tag == st.DEPTH_PARTIAL:
                self._on_partial(val)
            elif tag == st.SKIP:
                self.skipped[val] += 1
                head = payload[:32]
                self.rlog.warning(f"skip_{val}", "frame skipped", reason=val,
                                  head=head if isinstance(head, str) else bytes(head).hex())
            elif tag in (st.CONTROL, st.SHUTDOWN, st.TRADE, st.AGG):  # text frames: as JSON's
                self.handle_json_text(conn, payload, recv_ns)
        except Exception as exc:  # a bug must not take the read loop down
            self.c["callback_errors"] += 1
            self.rlog.warning("handler_error", "frame handler failed", error=repr(exc))

    def handle_json_text(self, conn: Conn, payload: Any, recv_ns: int) -> None:
        """A text frame on an SBE connection (control reply, serverShutdown): the JSON
        handler's, without counting the frame twice."""
        self.c["frames_received"] -= 1
        self.handle(conn, payload, recv_ns)

    def _on_book(self, val: tuple[Any, ...]) -> None:
        """SBE bestBidAsk: the same dedupe as JSON bookTicker (inlined in :meth:`handle`, the
        JSON hot path). SBE may cull updates: skipped ids are normal, never a gap."""
        sid = val[AT_SYMBOL]
        fast = self.fast
        if fast is not None:
            last = fast.last_id(sid, 3)
            if last is not None:
                self.last_book_u[sid] = last
        u = val[AT_TRADE_ID]
        last = self.last_book_u[sid]
        if u <= last or (u - last > self._max_jump and last >= 0):
            if u - last > self._max_jump or last - u > self._max_jump:
                self._book_far(sid, val)
            else:
                self.c["duplicates"] += 1
            return
        self.publish(val)
        self.last_book_u[sid] = u
        if fast is not None:
            fast.set_last(sid, u, 3)

    def handle(self, conn: Conn, payload: bytes, recv_ns: int) -> None:
        conn.last_ns = recv_ns
        if conn.first_pending:
            conn.got_first()
        c = self.c
        c["frames_received"] += 1
        try:
            tag, val = self._decode(payload, recv_ns)
            if tag == 1:  # st.AGG (a literal: no module attribute lookup on the hot path)
                sid = val[AT_SYMBOL]
                if self.fast is not None:
                    self._track(1, sid, val)
                    return
                tr = self.trackers[sid]
                a = val[AT_TRADE_ID]
                last = tr.last
                if last is not None and a == last + 1 and not tr.pending:  # the common case
                    # into the ring first, then advance: a record that fails to pack leaves
                    # its id missing (a hole to backfill), never marked as published
                    self._publish_raw((*val, self._time_ns()))
                    tr.last = a
                    return
                self._track(1, sid, val)
                return
            st = self.st
            if tag == st.BOOK_TICKER:
                sid = val[AT_SYMBOL]
                fast = self.fast
                if fast is not None:  # start from what the compiled path published
                    last = fast.last_id(sid, 3)
                    if last is not None:
                        self.last_book_u[sid] = last
                u = val[AT_TRADE_ID]
                last = self.last_book_u[sid]
                if u <= last or (u - last > self._max_jump and last >= 0):
                    if u - last > self._max_jump or last - u > self._max_jump:
                        self._book_far(sid, val)
                    else:
                        c["duplicates"] += 1
                    return
                self.publish(val)
                self.last_book_u[sid] = u
                if fast is not None:
                    fast.set_last(sid, u, 3)
            elif tag == st.DEPTH_DIFF:
                self._on_diff(val)
            elif tag == st.SKIP:
                self.skipped[val] += 1
                self.rlog.warning(f"skip_{val}", "frame skipped", reason=val,
                                  head=bytes(payload[:80]).decode("utf-8", "replace"))
            elif tag == st.TRADE:
                self._track(2, val[AT_SYMBOL], val)
            elif tag == st.DEPTH_PARTIAL:
                self._on_partial(val)
            elif tag == st.CONTROL:
                c["control_replies"] += 1
                if val.error is not None:
                    c["control_errors"] += 1
                    self.rlog.warning("control_error", "control request failed",
                                      id=str(val.id), error=str(val.error))
            elif tag == st.SHUTDOWN:
                c["server_shutdowns"] += 1
                log.info("serverShutdown received", extra={"shard": conn.shard.index})
                conn.shutdown_requested = True
                conn.shard.wake.set()
        except Exception as exc:  # a bug must not take the read loop down
            c["callback_errors"] += 1
            self.rlog.warning("handler_error", "frame handler failed", error=repr(exc))

    # -- plumbing --
    def start_resync(self, sid: int) -> None:
        """The symbol's book lost its sequence: fetch a snapshot in a task (one at a time)."""
        if sid not in self._resyncing:
            self._spawn(self.recovery.resync(sid), self._resyncing, sid)

    def _spawn(self, coro: Any, running: set[int], key: int) -> None:
        running.add(key)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            running.discard(key)
            if not t.cancelled() and t.exception() is not None:
                self._task_failed(t)
            elif not self.stopping and running is self.ids.backfilling \
                    and self.trackers[key].pending:
                self._spawn(self.recovery.backfill(key), running, key)  # more arrived meanwhile
            elif not self.stopping and running is self.ids.trade_waiting \
                    and self.trade_trackers[key].pending:
                self._spawn(self.recovery.trade_gap(key), running, key)  # the next hole

        task.add_done_callback(done)

    def _task_failed(self, t: asyncio.Task[Any]) -> None:
        """A long-lived task died of an exception: log its traceback and stop the whole process
        (it exits non-zero). Half alive (no reconnects, no backfill, metrics saying all is
        well) is worse than a restart by the supervisor."""
        exc = t.exception()
        if exc is None:
            return
        log.error("task %s failed; stopping", t.get_name(), exc_info=exc)
        if self.failed is None:
            self.failed = exc
        self.stop()

    def _watch(self, t: asyncio.Task[Any]) -> asyncio.Task[Any]:
        t.add_done_callback(lambda t: None if t.cancelled() else self._task_failed(t))
        return t

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on shutdown."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def stop(self) -> None:
        if not self.stopping:
            log.info("stopping")
        self.stopping = True
        self._stop.set()
        for sh in self.shards:
            sh.wake.set()

    def flush_metrics(self) -> None:
        """Copy the counters into the metrics block (every ``--metrics-interval``, and at exit)."""
        m = self.metrics
        if m is None:
            return
        if self.fast is not None:  # frames the compiled path handled without Python
            self.frames_fast = self.fast.frames
        if getattr(self.ring, "sleepers", 0):  # perhaps one killed asleep: free its bit
            self.ring.reap_dead_readers()
        for sh in self.shards:
            if sh.conn is not None:
                self.last_frame_ns = max(self.last_frame_ns, sh.conn.last_ns)
        m.set(**metric_values(self))

    async def _metrics_loop(self) -> None:
        from pipeline.ops import sdnotify

        wd = sdnotify.Watchdog()
        while not self.stopping:
            self.flush_metrics()
            if not self._ready and self.ring.cursor > self.cursor0:
                self._ready = True
                sdnotify.ready(f"streaming {len(self.cfg.symbols)} symbols")
            age_s = (time.time_ns() - self.last_frame_ns) / 1e9 if self.last_frame_ns else 0.0
            wd.tick(healthy=age_s < 2 * self.cfg.stall_timeout)
            await self.sleep(self.cfg.metrics_interval)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        log.info("ingest starting", extra={
            "symbols": ",".join(self.cfg.symbols), "streams": ",".join(self.cfg.streams),
            "shards": len(self.shards), "transport": self.cfg.transport,
            "decoder": self.cfg.decoder, "ring": self.cfg.ring})
        self.setup_publishing(loop)
        metrics_task = self._watch(loop.create_task(self._metrics_loop(), name="metrics"))
        shard_tasks = [self._watch(loop.create_task(sh.run(), name=f"shard-{sh.index}"))
                       for sh in self.shards]
        try:
            # a shard ends only when stopping (or when it failed: _task_failed stopped the rest)
            await asyncio.gather(*shard_tasks, return_exceptions=True)
        finally:
            self.stop()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.recovery.close()  # the REST keep-alive connection
            await asyncio.gather(metrics_task, return_exceptions=True)
            try:
                self.flush_metrics()
            except Exception as exc:  # the cleanup below must still run
                log.error("final metrics flush failed", exc_info=exc)
                if self.failed is None:
                    self.failed = exc
            self.release()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def run(cfg: IngestConfig) -> int:
    """Create the ring + metrics, run until SIGTERM/SIGINT, clean up. Returns the exit code."""
    from pipeline import aio
    from pipeline.ipc.metrics import MetricsBlock
    from pipeline.ipc.records import TICK_DTYPE
    from pipeline.ipc.ring import RingError, RingWriter

    if cfg.fast_path == "on":
        from pipeline.marketdata.fastpath import load

        if load()[0] is None:
            print(f"pipeline ingest: error: --fast-path on: {load()[1]}", file=sys.stderr)
            return 2
        from pipeline.binance.sbe import load_compiled

        if cfg.sbe_streams and load_compiled()[0] is None:
            print(f"pipeline ingest: error: --fast-path on: {load_compiled()[1]}",
                  file=sys.stderr)
            return 2
    if cfg.sbe_streams:
        from pipeline.config import SecretFileError
        from pipeline.marketdata.config import sbe_api_key

        try:
            sbe_api_key(cfg)
        except SecretFileError as exc:  # names the variable or file, never the key
            print(f"pipeline ingest: error: SBE streams need an API key: {exc}",
                  file=sys.stderr)
            return 2
    if cfg.cpu is not None:
        os.sched_setaffinity(0, {cfg.cpu})
    logging.getLogger("picows").setLevel(logging.WARNING)  # it logs every connect at INFO
    try:
        ring = RingWriter.create(cfg.ring, dtype=TICK_DTYPE, capacity=cfg.ring_capacity,
                                 symbols=cfg.symbols)
    except (RingError, OSError) as exc:
        print(f"pipeline ingest: error: --ring: cannot create ring {cfg.ring!r}: {exc}",
              file=sys.stderr)
        return 2
    try:
        try:
            metrics = MetricsBlock.create(cfg.metrics, metrics_fields(len(cfg.symbols)))
        except Exception as exc:
            print(f"pipeline ingest: error: --metrics: cannot create {cfg.metrics!r}: {exc}",
                  file=sys.stderr)
            return 2
        failed: list[BaseException] = []
        try:
            async def main() -> None:
                ing = Ingest(cfg, ring, metrics)
                await ing.run()
                if ing.failed is not None:
                    failed.append(ing.failed)

            aio.run(main())
        finally:
            metrics.close()
    finally:
        ring.close()
    if failed:
        log.error("ingest stopped after a task failed: %r", failed[0])
        if isinstance(failed[0], ConfigError):  # a handshake refused on start (shards.py)
            print(f"pipeline ingest: error: {failed[0]}", file=sys.stderr)
            return 2
        return 1
    log.info("ingest stopped")
    return 0


