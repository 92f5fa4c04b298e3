"""`pipeline ingest`: Binance market-data streams -> the shared-memory tick ring, gap-free.

The process is a thin asyncio shell (uvloop) around pure cores:

- :mod:`pipeline.binance.streams` decodes each frame once into a record tuple or an event;
- :mod:`pipeline.marketdata.gapfill` makes aggregate trades exactly-once and in order per symbol;
- :mod:`pipeline.marketdata.book` keeps each local order book in sync (snapshot + diffs, section
  1.7);
- :mod:`pipeline.net.ws` / :mod:`pipeline.net.http` are the sockets.

Connections: the subscribed streams are split into shards of at most 1024 streams (one
connection each), opened as ``/stream?streams=a/b/...`` (the remainder, if the URL would be too
long, goes out as SUBSCRIBE batches at <= 4 messages/s, under the 5/s limit of section 1.3).

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

Ring publishes are batched per event-loop iteration (``--publish-batch``, default 64; see
:meth:`Ingest.setup_publishing`): the first record of an iteration is published at once, the
records of further frames from the same socket read are staged in their ring slots and committed
together at the end of the iteration (one cursor store, one clock read for ``publish_time_ns``),
which takes ~0.35 us off each frame under load without delaying an isolated frame.

The common aggTrade, trade and bookTicker frame (the id its stream expects next, canonical
JSON) does not reach Python at all: the compiled path (pipeline/marketdata/fastpath.py,
``--fast-path``) parses it and stages its record from the transport's callback, and calls back into
:meth:`Ingest._fast_fallback` for everything else. It shares the ring writer's staging counters
and the last ids of the trackers and of the bookTicker dedupe (:meth:`Ingest._track` and the
BOOK_TICKER branch of :meth:`Ingest.handle`): whichever path sees a frame starts from what the
other published, so both publish one sequence, in order, exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from struct import error as struct_error
from typing import Any

from pipeline.logs import RateLimitedLog

log = logging.getLogger("pipeline.ingest")
_I64_MAX = (1 << 63) - 1
_TRACKED_KINDS = (1, 2)  # Kind.AGG_TRADE, Kind.TRADE: records an id tracker accounts for

DEFAULT_STREAMS_URL = "wss://stream.binance.com:9443"
DEFAULT_REST_URL = "https://api.binance.com"
MAX_STREAMS_PER_CONNECTION = 1024  # section 1.3
MAX_URL_CHARS = 4000  # longer stream lists go out as SUBSCRIBE messages
SUBSCRIBE_BATCH = 100  # streams per SUBSCRIBE message
SUBSCRIBE_INTERVAL_S = 0.25  # <= 4 control messages/s (limit: 5 incoming messages/s, 1.3)
MAX_SHARDS_IN_METRICS = 8
MAX_SYMBOLS_IN_METRICS = 16

# connection states (metrics conn_state_<i>)
DOWN, CONNECTING, UP, ROTATING, BACKOFF = 0, 1, 2, 3, 4


class ConfigError(ValueError):
    """Bad configuration; ``field`` names the flag."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


@dataclass
class IngestConfig:
    streams_url: str = DEFAULT_STREAMS_URL
    rest_url: str = DEFAULT_REST_URL
    symbols: list[str] = field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    streams: list[str] = field(default_factory=lambda: ["aggTrade", "bookTicker", "depth"])
    ring: str = "ticks"
    ring_capacity: int = 1 << 20
    cpu: int | None = None
    stall_timeout: float = 30.0
    transport: str = "picows"
    decoder: str = "msgspec"
    max_lifetime: float = 23.5 * 3600  # rotate before the 24 h server limit
    metrics: str = "pipeline.ingest.metrics"
    metrics_interval: float = 0.1
    depth_levels: int = 0
    depth_snapshot_limit: int = 1000
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    healthy_after: float = 30.0
    ping_interval: float = 20.0
    backfill_grace: float = 0.2
    rest_retries: int = 5
    rest_timeout: float = 5.0
    streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    max_frame_bytes: int = 4 << 20
    publish_batch: int = 64
    fast_path: str = "auto"
    time_unit: str = "MILLISECOND"
    max_id_jump: int = 5_000_000  # pipeline.gapfill.DEFAULT_MAX_ID_JUMP
    max_backfill_ids: int = 200_000  # 200 REST pages: a hole larger than this is a GAP at once
    id_resync_after: int = 16  # pipeline.gapfill.DEFAULT_RESYNC_AFTER

    def stream_names(self) -> list[str]:
        from pipeline.binance.streams import stream_name

        return [stream_name(sym, kind) for sym in self.symbols for kind in self.streams]


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0) or value != value:
        raise ConfigError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: IngestConfig) -> IngestConfig:
    """Check everything before any socket or segment exists; errors name the flag."""
    import re

    from pipeline.binance.streams import DEPTH_DIFF, STREAM_SUFFIXES
    from pipeline.net.ws import TRANSPORTS

    for name, url, schemes in (("--streams-url", cfg.streams_url, ("ws://", "wss://")),
                               ("--rest-url", cfg.rest_url, ("http://", "https://"))):
        if not url.startswith(schemes) or len(url) <= len(schemes[0]) + 1:
            raise ConfigError(name, f"must start with {' or '.join(schemes)}, got {url!r}")
    if not cfg.symbols:
        raise ConfigError("--symbols", "at least one symbol is required")
    for s in cfg.symbols:
        if not re.fullmatch(r"[A-Z0-9]{2,20}", s):
            raise ConfigError("--symbols", f"{s!r} is not an upper-case Binance symbol")
    if len(set(cfg.symbols)) != len(cfg.symbols):
        raise ConfigError("--symbols", "duplicate symbol")
    if not cfg.streams:
        raise ConfigError("--streams", "at least one stream kind is required")
    if len(set(cfg.streams)) != len(cfg.streams):
        raise ConfigError("--streams", "duplicate stream kind")
    for k in cfg.streams:
        if k not in STREAM_SUFFIXES:
            raise ConfigError("--streams", f"unknown stream kind {k!r}; known: "
                              f"{', '.join(STREAM_SUFFIXES)}")
    diff = [k for k in cfg.streams if STREAM_SUFFIXES[k] == DEPTH_DIFF]
    if len(diff) > 1:  # one local book per symbol
        raise ConfigError("--streams", f"subscribe one diff-depth stream per symbol, got {diff}")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", cfg.ring):
        raise ConfigError("--ring", f"not a valid shared-memory name: {cfg.ring!r}")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", cfg.metrics):
        raise ConfigError("--metrics", f"not a valid shared-memory name: {cfg.metrics!r}")
    cap = cfg.ring_capacity
    if cap < 2 or cap & (cap - 1):
        raise ConfigError("--ring-capacity", f"must be a power of two >= 2, got {cap}")
    if cfg.cpu is not None:
        allowed = sorted(os.sched_getaffinity(0))
        if cfg.cpu not in allowed:
            raise ConfigError("--cpu", f"CPU {cfg.cpu} is not available (allowed: {allowed})")
    if cfg.transport not in TRANSPORTS:
        raise ConfigError("--transport", f"must be one of {', '.join(TRANSPORTS)}")
    if cfg.decoder not in ("msgspec", "orjson"):
        raise ConfigError("--decoder", "must be msgspec or orjson")
    for name, v in (("--stall-timeout", cfg.stall_timeout), ("--max-lifetime", cfg.max_lifetime),
                    ("--metrics-interval", cfg.metrics_interval),
                    ("--backoff-base", cfg.backoff_base), ("--backoff-max", cfg.backoff_max),
                    ("--rest-timeout", cfg.rest_timeout)):
        _positive(name, v)
    for name, v in (("--healthy-after", cfg.healthy_after), ("--ping-interval", cfg.ping_interval),
                    ("--backfill-grace", cfg.backfill_grace),
                    ("--rest-retries", cfg.rest_retries), ("--depth-levels", cfg.depth_levels)):
        _positive(name, v, allow_zero=True)
    if cfg.backoff_max < cfg.backoff_base:
        raise ConfigError("--backoff-max", "must be >= --backoff-base")
    if not 1 <= cfg.streams_per_connection <= MAX_STREAMS_PER_CONNECTION:
        raise ConfigError("--streams-per-connection", f"must be in 1..{MAX_STREAMS_PER_CONNECTION}")
    if not 1 <= cfg.depth_snapshot_limit <= 5000:
        raise ConfigError("--depth-snapshot-limit", "must be in 1..5000")
    if cfg.depth_levels > 1000:
        raise ConfigError("--depth-levels", "must be <= 1000")
    if not 1 <= cfg.publish_batch <= min(4096, cfg.ring_capacity):
        raise ConfigError("--publish-batch", "must be in 1..min(4096, --ring-capacity)")
    from pipeline.marketdata.fastpath import FAST_PATH_MODES

    if cfg.fast_path not in FAST_PATH_MODES:
        raise ConfigError("--fast-path", f"must be one of {', '.join(FAST_PATH_MODES)}")
    from pipeline.binance.streams import TIME_UNITS

    if cfg.time_unit not in TIME_UNITS:
        raise ConfigError("--time-unit", f"must be one of {', '.join(TIME_UNITS)}")
    if len(cfg.symbols) > 65535:
        raise ConfigError("--symbols", "too many symbols for the ring's u2 symbol id")
    if not 1 <= cfg.max_id_jump <= 1 << 62:
        raise ConfigError("--max-id-jump", f"must be in 1..2**62, got {cfg.max_id_jump}")
    if not 1 <= cfg.max_backfill_ids <= 1 << 62:
        raise ConfigError("--max-backfill-ids", f"must be >= 1, got {cfg.max_backfill_ids}")
    if not 1 <= cfg.id_resync_after <= 10_000:
        raise ConfigError("--id-resync-after",
                          f"must be in 1..10000, got {cfg.id_resync_after}")
    return cfg


# --- metrics ----------------------------------------------------------------------------------

COUNTERS = (
    "frames_received", "frames_decoded", "published", "control_replies", "control_errors",
    "duplicates", "reconnects", "rotations", "stalls", "server_shutdowns", "connect_failures",
    "gaps_detected", "gaps_backfilled", "ids_backfilled", "gaps_unrecoverable", "ids_lost",
    "trade_gaps", "trade_ids_lost",
    "book_resyncs", "book_breaks", "rest_requests", "rest_errors", "callback_errors",
    # ids more than --max-id-jump from their stream's last id (held aside, not published), and
    # runs of them taken as a stream restart (re-based; a GAP record flagged RESYNCED for trades)
    "ids_far", "id_resets",
    # records the ring refused to pack (the tracker re-opened a hole for them), book levels
    # dropped beyond the per-side bound (pipeline/marketdata/book.py MAX_LEVELS)
    "publish_errors", "book_levels_trimmed",
)


def metrics_fields(n_symbols: int) -> list[tuple[str, str]]:
    from pipeline.binance.streams import SKIP_REASONS

    fields = [(c, "<i8") for c in COUNTERS]
    fields += [(f"skipped_{r}", "<i8") for r in SKIP_REASONS]
    fields += [("skipped_total", "<i8"), ("last_frame_ns", "<i8"), ("shards", "<i8"),
               ("symbols", "<i8")]
    # fast_path: 1 while the compiled path is in use (an operator sees a fallback to pure
    # Python in `pipeline health`); frames_fast: frames it handled without Python
    fields += [("fast_path", "<i8"), ("frames_fast", "<i8")]
    # written every --metrics-interval even when no frame arrives: `pipeline health` calls the
    # process stuck when the block is older than a few of these
    fields += [("heartbeat_interval_ms", "<i8")]
    # shards without a delivering connection for longer than a reconnect cycle takes
    # (Ingest.down_grace_s): non-zero makes `pipeline health` call ingest unhealthy
    fields += [("problem_shards_down", "<i8")]
    fields += [(f"conn_state_{i}", "<i8") for i in range(MAX_SHARDS_IN_METRICS)]
    fields += [(f"last_agg_id_{i}", "<i8") for i in range(min(n_symbols, MAX_SYMBOLS_IN_METRICS))]
    return fields


# --- connections ------------------------------------------------------------------------------


class Conn:
    """One websocket connection of a shard, with its own liveness bookkeeping."""

    def __init__(self, shard: Shard, serial: int) -> None:
        self.shard = shard
        self.serial = serial
        self.ws: Any = None
        self.opened_at = time.monotonic()
        self.last_ns = time.time_ns()  # wall clock of the last message (the transport's stamp)
        self.first_msg = asyncio.get_running_loop().create_future()
        self.first_pending = True
        self.shutdown_requested = False
        # the transport calls the frame handler directly (no per-frame wrapper): the compiled
        # fast path's on_message(conn, ...) or Ingest.handle(conn, ...)
        self.on_message = functools.partial(shard.ingest.on_frame, self)

    def got_first(self) -> None:
        self.first_pending = False
        if not self.first_msg.done():
            self.first_msg.set_result(None)

    def silent_s(self) -> float:
        return (time.time_ns() - self.last_ns) / 1e9


class Shard:
    """Streams carried by one connection at a time (two during a rotation)."""

    def __init__(self, ingest: Ingest, index: int, streams: list[str]) -> None:
        self.ingest = ingest
        self.index = index
        self.streams = streams
        self.state = DOWN
        #: monotonic time the shard last stopped delivering (not UP / ROTATING), None while it
        #: delivers: `problem_shards_down` names shards down for longer than a reconnect takes
        self.down_since: float | None = time.monotonic()
        self.conn: Conn | None = None
        self.wake = asyncio.Event()
        self._serial = 0
        cfg = ingest.cfg
        base = cfg.streams_url.rstrip("/") + "/stream?streams="
        # Binance's default unit stays implicit: the URL is the one users know
        suffix = "" if cfg.time_unit == "MILLISECOND" else f"&timeUnit={cfg.time_unit}"
        self.url_streams: list[str] = []
        for s in streams:
            if len(base) + len(suffix) + sum(len(x) + 1 for x in self.url_streams) + len(s) \
                    > MAX_URL_CHARS:
                break
            self.url_streams.append(s)
        self.sub_streams = streams[len(self.url_streams):]
        self.url = base + "/".join(self.url_streams) + suffix

    async def open(self) -> Conn:
        """Connect and subscribe everything; raises WsConnectError."""
        from pipeline.net import ws as wsmod

        cfg = self.ingest.cfg
        self._serial += 1
        conn = Conn(self, self._serial)
        conn.ws = await wsmod.connect(
            self.url, conn.on_message, transport=cfg.transport,
            ping_interval=cfg.ping_interval, ping_timeout=max(cfg.ping_interval, 1.0),
            # the transport limit is looser than the decoder's, so an oversized frame is a
            # counted skip rather than a dropped connection
            max_frame_size=max(16 << 20, 4 * cfg.max_frame_bytes),
            handshake_timeout=max(cfg.stall_timeout, 1.0),
        )
        conn.opened_at = time.monotonic()
        conn.last_ns = time.time_ns()
        for i in range(0, len(self.sub_streams), SUBSCRIBE_BATCH):
            if i:
                await asyncio.sleep(SUBSCRIBE_INTERVAL_S)
            batch = self.sub_streams[i:i + SUBSCRIBE_BATCH]
            self.ingest.next_req_id += 1
            params = ",".join(f'"{s}"' for s in batch)
            conn.ws.send_text(
                f'{{"method":"SUBSCRIBE","params":[{params}],"id":{self.ingest.next_req_id}}}')
        log.info("connected", extra={"shard": self.index, "conn": conn.serial,
                                     "streams": len(self.streams)})
        return conn

    def _set_state(self, state: int) -> None:
        self.state = state
        if state in (UP, ROTATING):
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.monotonic()

    async def run(self) -> None:
        from pipeline.backoff import Backoff, BackoffPolicy
        from pipeline.net.ws import WsConnectError

        ing = self.ingest
        cfg = ing.cfg
        backoff = Backoff(BackoffPolicy(initial_s=cfg.backoff_base, max_s=cfg.backoff_max,
                                        max_attempts=0))
        while not ing.stopping:
            self._set_state(CONNECTING)
            try:
                conn = await self.open()
            except WsConnectError as exc:
                ing.c["connect_failures"] += 1
                delay = backoff.next_delay() or cfg.backoff_max
                ing.rlog.warning("connect_failed", "connect failed", shard=self.index,
                                 error=str(exc), retry_in_s=round(delay, 3))
                self._set_state(BACKOFF)
                await ing.sleep(delay)
                continue
            self.conn = conn
            self._set_state(UP)
            while True:
                reason = await self.supervise(conn)
                if reason == "rotate" and not ing.stopping:
                    new = await self.rotate(conn)
                    if new is not None:
                        conn = new
                        continue
                    reason = "dead" if conn.ws.closed else reason
                    if reason == "rotate":
                        continue
                break
            self.conn = None
            if ing.stopping:
                await conn.ws.close(1000, "shutdown")
                break
            # the connection died (closed by the peer, stalled, or failed to rotate)
            healthy = time.monotonic() - conn.opened_at >= cfg.healthy_after
            if healthy:
                backoff.reset()
            ing.c["reconnects"] += 1
            delay = backoff.next_delay() or cfg.backoff_max
            info = conn.ws.close_info
            ing.rlog.warning("reconnect", "connection lost; reconnecting", shard=self.index,
                             reason=reason, close=str(info), retry_in_s=round(delay, 3))
            self._set_state(BACKOFF)
            await ing.sleep(delay)
        self._set_state(DOWN)

    async def supervise(self, conn: Conn) -> str:
        """Wait until this connection must be replaced: 'dead', 'rotate' or 'stop'."""
        ing = self.ingest
        cfg = ing.cfg
        tick = min(cfg.stall_timeout / 4, 0.5)
        closed = asyncio.ensure_future(conn.ws.wait_closed())
        try:
            while True:
                if ing.stopping:
                    return "stop"
                if conn.ws.closed:
                    return "dead"
                now = time.monotonic()
                silent = conn.silent_s()
                if silent > cfg.stall_timeout:
                    ing.c["stalls"] += 1
                    ing.rlog.warning("stall", "no data; closing connection", shard=self.index,
                                     silent_s=round(silent, 3))
                    await conn.ws.close(1000, "stalled", grace_s=0.2)
                    return "dead"
                if conn.shutdown_requested or now - conn.opened_at >= cfg.max_lifetime:
                    return "rotate"
                self.wake.clear()
                wake = asyncio.ensure_future(self.wake.wait())
                await asyncio.wait({closed, wake}, timeout=tick,
                                   return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
        finally:
            closed.cancel()

    async def rotate(self, old: Conn) -> Conn | None:
        """Make-before-break: the new connection is delivering before the old one closes.
        Returns the new connection, or None if it could not be opened (old one kept)."""
        from pipeline.net.ws import WsConnectError

        ing = self.ingest
        cfg = ing.cfg
        self._set_state(ROTATING)
        why = "server_shutdown" if old.shutdown_requested else "lifetime"
        try:
            new = await self.open()
        except WsConnectError as exc:
            ing.rlog.warning("rotate_failed", "rotation connect failed", shard=self.index,
                             error=str(exc))
            self._set_state(UP)
            old.opened_at = time.monotonic() - cfg.max_lifetime + min(cfg.backoff_base * 4, 30)
            await ing.sleep(cfg.backoff_base)
            return None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(new.first_msg), cfg.stall_timeout)
        self.conn = new
        ing.c["rotations"] += 1
        log.info("rotated", extra={"shard": self.index, "why": why, "old": old.serial,
                                   "new": new.serial})
        await old.ws.close(1000, "rotated")
        self._set_state(UP)
        return new


# --- the process ------------------------------------------------------------------------------


class Ingest:
    """Owns the ring, the metrics block, the per-symbol cores and the shards."""

    def __init__(self, cfg: IngestConfig, ring: Any, metrics: Any) -> None:
        from pipeline.binance import streams as st
        from pipeline.marketdata.book import OrderBook
        from pipeline.marketdata.gapfill import AggTracker

        self.cfg = cfg
        self.ring = ring
        self.metrics = metrics
        self.st = st
        self.decoder = st.make_decoder(cfg.decoder, cfg.symbols, cfg.max_frame_bytes,
                                       cfg.time_unit)
        self._decode = self.decoder.decode
        assert st.AGG == 1, "handle() compares the decode tag with the literal 1"
        from pipeline.ipc.records import Flags
        from pipeline.marketdata.gapfill import FarRun

        n = len(cfg.symbols)
        jump, again = cfg.max_id_jump, cfg.id_resync_after
        self._max_jump = jump
        self.trackers: list[AggTracker[tuple[Any, ...]]] = [
            AggTracker(max_jump=jump, resync_after=again, make_reset=self._reset_record(sid),
                       make_gap=self._gap_record(sid)) for sid in range(n)]
        self.books = [OrderBook(max_jump=jump, resync_after=again) for _ in range(n)]
        self.last_book_u = [-1] * n  # bookTicker dedupe
        #: bookTicker updates whose `u` is far from last_book_u (held, at most id_resync_after)
        self.book_far: list[FarRun[tuple[Any, ...]]] = [
            FarRun(jump, again, contiguous=False) for _ in range(n)]
        self._book_far_seen = 0
        self._book_resets = 0
        # @trade ids are contiguous per symbol too: same exactly-once tracking, but a hole the
        # live stream does not fill is reported, not fetched (see _trade_gap)
        tf = int(Flags.TRADE_IDS)
        self.trade_trackers: list[AggTracker[tuple[Any, ...]]] = [
            AggTracker(max_jump=jump, resync_after=again, make_reset=self._reset_record(sid, tf),
                       make_gap=self._gap_record(sid, tf)) for sid in range(n)]
        self.last_partial = [-1] * n  # partial depth dedupe
        #: partial-depth frames whose lastUpdateId is far from last_partial (held, bounded)
        self.partial_far: list[FarRun[Any]] = [
            FarRun(jump, again, contiguous=False) for _ in range(n)]
        self._partial_far_seen = 0
        self._partial_resets = 0
        self.c: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.skipped: dict[str, int] = dict.fromkeys(st.SKIP_REASONS, 0)
        self.last_frame_ns = 0
        self.next_req_id = 0
        self.stopping = False
        self._stop = asyncio.Event()
        self.rlog = RateLimitedLog(log)
        names = cfg.stream_names()
        per = cfg.streams_per_connection
        self.shards = [Shard(self, i, names[k:k + per]) for i, k in
                       enumerate(range(0, len(names), per))]
        self._tasks: set[asyncio.Task[Any]] = set()
        #: a long-lived task died of an exception: the process stops and exits non-zero
        self.failed: BaseException | None = None
        #: a shard may be without a delivering connection this long (stall detection, a full
        #: backoff, a handshake) before metrics report it as a problem
        self.down_grace_s = 2 * cfg.stall_timeout + cfg.backoff_max
        self._backfilling: set[int] = set()
        self._trade_waiting: set[int] = set()
        self._resyncing: set[int] = set()
        self._publish_raw: Callable[[Any], int] = ring.publish
        self._cursor0 = ring.cursor
        self._time_ns = time.time_ns
        self._ready = False
        self._loop: asyncio.AbstractEventLoop | None = None  # set: batch within loop iterations
        self._iter_open = False  # a record was published in this loop iteration: stage the rest
        self._stage: Callable[[tuple[Any, ...]], bool] = self._stage_unbatched
        #: the compiled path (pipeline/marketdata/fastpath.py), once setup_publishing() built it
        self.fast: Any = None
        self._frames_fast = 0  # the compiled path's count, kept once it is released
        #: what the transport calls per frame: fast.on_message, or handle
        self.on_frame: Callable[[Conn, bytes, int], None] = self.handle

    # -- publishing --
    def setup_publishing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batch ring publishes per event-loop iteration (``--publish-batch`` > 1), and build
        the compiled frame path (``--fast-path``). Call :meth:`release` before closing the
        ring: the compiled path holds its buffers.

        Why: a ring publish costs ~0.9 us per record (tuple rebuilt with the clock read, pack,
        three shared-memory stores); staging costs ~0.55 us (the pack and two stores), and the
        cursor store and clock read are paid once per batch. The first record of a loop iteration
        is published at once (an isolated frame gets no added latency); later records of the same
        iteration (several frames from one socket read, under load) are staged and committed by a
        ``call_soon`` callback at the end of the iteration, or as soon as ``publish_batch`` of
        them wait. So under saturation a record waits at most ``publish_batch`` frame-handler
        runs (64 x ~2 us); ``publish_time_ns`` is the commit time, when readers can see it.

        The compiled path stages its records the same way (it needs staging configured even
        with ``--publish-batch 1``: then every record it stages is committed at once).
        """
        from pipeline.marketdata import fastpath

        batch = self.cfg.publish_batch
        if not hasattr(self.ring, "configure_staging"):
            return
        want_fast = self.cfg.fast_path != "off"
        if batch > 1 or want_fast:
            self.ring.configure_staging("publish_time_ns", batch)
        if batch > 1:
            self._stage = self.ring.stage
            self._loop = loop
        self.fast, how = fastpath.build(self.cfg.fast_path, self.cfg.symbols, self.ring,
                                        self._fast_fallback, self.cfg.max_frame_bytes,
                                        self.decoder.time_mult, self.cfg.max_id_jump)
        self.on_frame = self.fast.on_message if self.fast is not None else self.handle
        log.info("fast path: " + how)

    def release(self) -> None:
        """Drop the compiled path's hold on the ring's buffers (idempotent); frames then take
        the Python handler."""
        fast, self.fast = self.fast, None
        self.on_frame = self.handle
        if fast is not None:
            self._frames_fast = fast.frames
            for sid in range(len(self.trackers)):  # the ids it published are Python's again
                for kind, tracker in ((1, self.trackers[sid]), (2, self.trade_trackers[sid])):
                    last = fast.last_id(sid, kind)
                    if last is not None:
                        tracker.last = last
                last = fast.last_id(sid, 3)
                if last is not None:
                    self.last_book_u[sid] = last
            fast.close()

    def _stage_unbatched(self, rec: tuple[Any, ...]) -> bool:
        self._publish_raw((*rec, self._time_ns()))
        return False

    def _open_iteration(self) -> None:
        """Records published from here to the end of this loop iteration are staged."""
        self._iter_open = True
        if self.fast is not None:
            self.fast.iter_open = 1
        self._loop.call_soon(self._end_iteration)  # type: ignore[union-attr]

    def _end_iteration(self) -> None:
        self._iter_open = False
        if self.fast is not None:
            self.fast.iter_open = 0
        self.ring.commit(self._time_ns())

    def _commit(self) -> None:
        self.ring.commit(self._time_ns())

    def publish(self, rec: tuple[Any, ...]) -> None:
        """Publish a record tuple (all fields but ``publish_time_ns``), batched if enabled."""
        if self._iter_open:
            if self._stage(rec):
                self._commit()
            return
        if self._loop is not None:
            self._open_iteration()
        self._publish_raw((*rec, self._time_ns()))

    def publish_many(self, recs: list[tuple[Any, ...]]) -> None:
        for r in recs:
            self.publish(r)

    # -- the frame handlers (hot path; never await, never raise) --
    def _fast_fallback(self, conn: Conn, payload: bytes, recv_ns: int, code: int) -> None:
        """Called by the compiled path: ``code`` 0, a frame it did not take (everything but
        the expected next id of an armed aggTrade / trade / bookTicker stream in canonical
        JSON): the Python handler decides.
        ``code`` 2: it staged the record and the shell must act (first record of this loop
        iteration: publish it now; a full batch: commit; the connection's first frame)."""
        if code == 0:
            self.handle(conn, payload, recv_ns)
            return
        if conn.first_pending:
            conn.got_first()
        if self._loop is None:  # --publish-batch 1: every record at once
            self._commit()
        elif not self._iter_open:
            self._open_iteration()
            self._commit()
        elif self.ring.staged >= self.ring.max_staged:
            self._commit()

    def _track(self, kind: int, sid: int, val: tuple[Any, ...]) -> None:
        """An aggTrade (``kind`` 1) or trade (2) the fast lane did not take: the symbol's
        exactly-once tracker decides (duplicate, gap, first trade, held behind a gap), starting
        from the last id the compiled path published; the compiled path is re-armed only while
        no hole is open, and a hole starts its filler (REST backfill, or the trade GAP timer).
        """
        tr = (self.trackers if kind == 1 else self.trade_trackers)[sid]
        fast = self.fast
        if fast is not None:
            last = fast.last_id(sid, kind)
            if last is not None:
                tr.last = last
        dups, resets, far = tr.stats.duplicates, tr.stats.resets, tr.stats.far_ids
        out = tr.on_live(val[11], val)
        self.c["duplicates"] += tr.stats.duplicates - dups
        if tr.stats.far_ids != far:
            self.rlog.warning(f"id_far_{kind}", "id far from the last one: held aside",
                              symbol=self.cfg.symbols[sid],
                              stream="aggTrade" if kind == 1 else "trade", id=val[11],
                              last=tr.last)
        if tr.stats.resets != resets:
            self._log_reset(kind, sid, out)
        if out:
            self._publish_tracked(tr, out)
        if fast is not None:
            fast.set_last(sid, None if tr.pending else tr.last, kind)
        if tr.pending:
            if kind == 1 and sid not in self._backfilling:
                self._spawn(self._backfill(sid), self._backfilling, sid)
            elif kind == 2 and sid not in self._trade_waiting:
                self._spawn(self._trade_gap(sid), self._trade_waiting, sid)

    def _publish_tracked(self, tr: Any, out: list[tuple[Any, ...]]) -> None:
        """Publish what a tracker released, in order. A record the ring refuses (it cannot be
        packed) is counted and logged, and the tracker is rewound to just before it: its id and
        the ones after it become a hole again (backfilled, or reported by a GAP record), never
        silently taken as published."""
        for i, rec in enumerate(out):
            try:
                self.publish(rec)
            except (OverflowError, TypeError, ValueError, struct_error) as exc:
                self.c["publish_errors"] += 1
                self.rlog.warning("publish_error", "record could not be published; its id is "
                                  "a hole again", kind=rec[0], id=rec[11], error=repr(exc))
                tracked = [(r[11], r) for r in out[i:] if r[0] in _TRACKED_KINDS]
                if tracked:
                    tr.rewind(tracked[0][0] - 1, tracked[1:])
                return

    def _log_reset(self, kind: int, sid: int, out: list[tuple[Any, ...]]) -> None:
        self.rlog.warning("id_reset", "id sequence restarted (a run of ids far from the last "
                          "one): re-based, nothing fetched across the jump",
                          symbol=self.cfg.symbols[sid], stream="aggTrade" if kind == 1
                          else "trade", new_first=next((r[11] for r in out if r[0] == kind),
                                                       None))

    def _book_far(self, sid: int, val: tuple[Any, ...]) -> None:
        """A bookTicker whose `u` is far from the last one: held aside (one bogus id must not
        make every later update look old); a run of them re-bases the dedupe."""
        self._book_far_seen += 1
        far = self.book_far[sid]
        if len(far.held) == 0:
            self.rlog.warning("id_far_3", "update id far from the last one: held aside",
                              symbol=self.cfg.symbols[sid], stream="bookTicker", u=val[11],
                              last=self.last_book_u[sid])
        run = far.offer(val[11], val)
        if run is None:
            return
        self._book_resets += 1
        self.rlog.warning("id_reset", "update id sequence restarted: re-based",
                          symbol=self.cfg.symbols[sid], stream="bookTicker", new_first=run[0][0])
        for u, rec in run:
            self.publish(rec)
            self.last_book_u[sid] = u
        if self.fast is not None:
            self.fast.set_last(sid, self.last_book_u[sid], 3)

    def _tracker_changed(self, sid: int, kind: int = 1) -> None:
        """A gap was filled or given up outside the frame handler: the compiled path may
        continue after it (``kind`` 1: aggregate ids, 2: trade ids)."""
        tr = (self.trackers if kind == 1 else self.trade_trackers)[sid]
        if self.fast is not None:
            self.fast.set_last(sid, None if tr.pending else tr.last, kind)

    def last_agg_id(self, sid: int) -> int | None:
        """The last aggregate id published for the symbol (whichever path published it)."""
        if self.fast is not None:
            last = self.fast.last_id(sid)
            if last is not None:
                return int(last)
        return self.trackers[sid].last

    def handle(self, conn: Conn, payload: bytes, recv_ns: int) -> None:
        conn.last_ns = recv_ns
        if conn.first_pending:
            conn.got_first()
        c = self.c
        c["frames_received"] += 1
        try:
            tag, val = self._decode(payload, recv_ns)
            if tag == 1:  # st.AGG (a literal: no module attribute lookup on the hot path)
                sid = val[2]
                if self.fast is not None:
                    self._track(1, sid, val)
                    return
                tr = self.trackers[sid]
                a = val[11]
                last = tr.last
                if last is not None and a == last + 1 and not tr.pending:  # the common case
                    # into the ring first, then advance: a record that fails to pack leaves
                    # its id missing (a hole to backfill), never marked as published
                    if self._iter_open:  # `published` is derived from the ring cursor
                        if self._stage(val):
                            self._commit()
                    else:
                        self.publish(val)
                    tr.last = a
                    return
                self._track(1, sid, val)
                return
            st = self.st
            if tag == st.BOOK_TICKER:
                sid = val[2]
                fast = self.fast
                if fast is not None:  # start from what the compiled path published
                    last = fast.last_id(sid, 3)
                    if last is not None:
                        self.last_book_u[sid] = last
                u = val[11]
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
                self._track(2, val[2], val)
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

    # -- depth --
    def _top_records(self, sid: int, flags: int, u: int, first: int, ev_ns: int,
                     recv_ns: int, bids: list[tuple[float, float]],
                     asks: list[tuple[float, float]]) -> list[tuple[Any, ...]]:
        from pipeline.ipc.records import Kind

        bp, bq = bids[0] if bids else (0.0, 0.0)
        ap, aq = asks[0] if asks else (0.0, 0.0)
        out = [(int(Kind.DEPTH_TOP), flags, sid, 0, 0, 0.0, 0.0, bp, bq, ap, aq, u, first,
                ev_ns, recv_ns)]
        for lvl in range(self.cfg.depth_levels):
            if lvl >= len(bids) and lvl >= len(asks):
                break
            bp, bq = bids[lvl] if lvl < len(bids) else (0.0, 0.0)
            ap, aq = asks[lvl] if lvl < len(asks) else (0.0, 0.0)
            out.append((int(Kind.DEPTH_LEVEL), flags, sid, lvl, 0, 0.0, 0.0, bp, bq, ap, aq, u,
                        first, ev_ns, recv_ns))
        return out

    def _publish_book(self, sid: int, flags: int, first: int, ev_ns: int, recv_ns: int) -> None:
        book = self.books[sid]
        bids, asks = book.top(max(1, self.cfg.depth_levels))
        self.publish_many(self._top_records(sid, flags, book.update_id, first, ev_ns, recv_ns,
                                            bids, asks))

    def _on_diff(self, d: Any) -> None:
        from pipeline.marketdata.book import Action

        book = self.books[d.symbol]
        act = book.on_diff(d.first_id, d.last_id, d.bids, d.asks)
        if act == Action.APPLIED:
            self._publish_book(d.symbol, 0, d.first_id, d.event_time_ns, d.recv_time_ns)
        elif act == Action.IGNORED:
            self.c["duplicates"] += 1
        elif act == Action.NEED_SNAPSHOT and d.symbol not in self._resyncing:
            self._spawn(self._resync(d.symbol), self._resyncing, d.symbol)

    def _on_partial(self, p: Any) -> None:
        """A partial-book frame: dedupe by ``lastUpdateId``, with the far-id rule of bookTicker
        (one bogus 10**17 must not make every later snapshot look old)."""
        lid, last, mj = p.last_update_id, self.last_partial[p.symbol], self._max_jump
        if lid <= last or (lid - last > mj and last >= 0):
            if lid - last > mj or last - lid > mj:
                self._partial_far_seen += 1
                far = self.partial_far[p.symbol]
                if len(far.held) == 0:
                    self.rlog.warning("id_far_partial", "update id far from the last one: "
                                      "held aside", symbol=self.cfg.symbols[p.symbol],
                                      stream="depth<N>", u=lid, last=last)
                run = far.offer(lid, p)
                if run is not None:  # the stream restarted: go on from its latest snapshot
                    self._partial_resets += 1
                    self.rlog.warning("id_reset_partial", "update id sequence restarted: "
                                      "re-based", symbol=self.cfg.symbols[p.symbol],
                                      stream="depth<N>", new_first=run[0][0])
                    self._publish_partial(run[-1][1])
            else:
                self.c["duplicates"] += 1
            return
        self._publish_partial(p)

    def _publish_partial(self, p: Any) -> None:
        from pipeline.ipc.records import Flags

        self.publish_many(self._top_records(p.symbol, int(Flags.SNAPSHOT), p.last_update_id, 0,
                                            0, p.recv_time_ns, p.bids, p.asks))
        self.last_partial[p.symbol] = p.last_update_id

    async def _resync(self, sid: int) -> None:
        """Fetch snapshots until the book is synced (section 1.7 steps 2-6)."""
        from pipeline.backoff import Backoff, BackoffPolicy
        from pipeline.ipc.records import Flags, Kind
        from pipeline.marketdata.book import Action, State
        from pipeline.net.http import HttpError, get_json

        cfg = self.cfg
        book = self.books[sid]
        sym = cfg.symbols[sid]
        backoff = Backoff(BackoffPolicy(initial_s=0.1, max_s=max(cfg.backoff_max, 0.1),
                                        max_attempts=0))
        while not self.stopping and book.state is State.WAIT_SNAPSHOT:
            self.c["rest_requests"] += 1
            try:
                _, body = await get_json(cfg.rest_url, "/api/v3/depth",
                                         {"symbol": sym, "limit": cfg.depth_snapshot_limit},
                                         timeout_s=cfg.rest_timeout)
                lid = body["lastUpdateId"]
                bids = [(float(p), float(q)) for p, q in body["bids"]]
                asks = [(float(p), float(q)) for p, q in body["asks"]]
                if type(lid) is not int or not 0 <= lid <= _I64_MAX:
                    raise ValueError("lastUpdateId is not an integer in 0..2**63-1")
            except (HttpError, KeyError, TypeError, ValueError) as exc:
                self.c["rest_errors"] += 1
                self.rlog.warning("snapshot_failed", "depth snapshot failed", symbol=sym,
                                  error=str(exc)[:200])
                await self.sleep(backoff.next_delay() or 1.0)
                continue
            recv_ns = time.time_ns()
            act = book.on_snapshot(lid, bids, asks)
            if act == Action.SYNCED:
                self.c["book_resyncs"] += 1
                flags = int(Flags.SNAPSHOT)
                if book.resynced_after_break:
                    flags |= int(Flags.RESYNCED)
                self.publish((int(Kind.BOOK_RESYNC), flags, sid, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0,
                              0.0, lid, book.update_id, 0, recv_ns))
                self._publish_book(sid, flags, lid, 0, recv_ns)
                log.info("book synced", extra={"symbol": sym, "last_update_id": lid,
                                               "after_break": book.resynced_after_break})
                return
            if act == Action.REFETCH:
                await self.sleep(min(0.05 * (1 + backoff.attempts), 1.0))
                backoff.attempts += 1

    # -- aggTrade backfill --
    def _rest_row(self, sid: int, row: Any, recv_ns: int) -> tuple[int, tuple[Any, ...]] | None:
        from pipeline.ipc.records import Flags, Kind

        try:
            a, p, q, last, t, m = row["a"], float(row["p"]), float(row["q"]), row["l"], \
                row["T"], row["m"]
        except (KeyError, TypeError, ValueError):
            return None
        if type(a) is not int or type(last) is not int or type(t) is not int \
                or not (0.0 <= p < float("inf") and 0.0 <= q < float("inf")) \
                or not (0 <= a <= _I64_MAX and 0 <= last <= _I64_MAX
                        and 0 <= t <= _I64_MAX // 1_000_000):
            return None
        flags = int(Flags.BACKFILLED) | (int(Flags.BUYER_IS_MAKER) if m is True else 0)
        return a, (int(Kind.AGG_TRADE), flags, sid, 0, 0, p, q, 0.0, 0.0, 0.0, 0.0, a, last,
                   t * 1_000_000, recv_ns)

    def _reset_record(self, sid: int, flags: int = 0) -> Callable[[int, int], tuple[Any, ...]]:
        """The marker of a restarted id sequence: Kind.GAP flagged RESYNCED, ``trade_id`` = the
        last id before the restart, ``aux_id`` = the first id after it. Nothing between them is
        fetched (they are not a range of missing trades)."""
        from pipeline.ipc.records import Flags, Kind

        f = flags | int(Flags.RESYNCED)

        def make(old_last: int, new_first: int) -> tuple[Any, ...]:
            return (int(Kind.GAP), f, sid, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, old_last,
                    new_first, 0, time.time_ns())

        return make

    def _gap_record(self, sid: int, flags: int = 0) -> Callable[[Any], tuple[Any, ...]]:
        from pipeline.ipc.records import Kind

        def make(g: Any) -> tuple[Any, ...]:
            return (int(Kind.GAP), flags, sid, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, g.first,
                    g.last, 0, time.time_ns())

        return make

    async def _trade_gap(self, sid: int) -> None:
        """A hole in a symbol's @trade ids: wait ``--backfill-grace`` for the live stream to fill
        it (a rotation's two connections can deliver out of order), then publish a GAP record
        flagged TRADE_IDS and go on. Why not fetch them: the reference documents no REST call
        that returns individual trades by id (``/api/v3/aggTrades`` rows merge trades), so a
        consumer that needs them is told exactly which ids it will not get."""
        from pipeline.ipc.records import Flags

        await self.sleep(self.cfg.backfill_grace)
        tr = self.trade_trackers[sid]
        gap = tr.missing()
        if gap is None or self.stopping:
            return
        out = tr.give_up(self._gap_record(sid, int(Flags.TRADE_IDS)))
        self.c["trade_gaps"] += 1
        self.c["trade_ids_lost"] += gap[1] - gap[0] + 1
        self.rlog.warning("trade_gap", "trades lost (no REST source for trade ids)",
                          symbol=self.cfg.symbols[sid], first=gap[0], last=gap[1])
        self._publish_tracked(tr, out)
        self._tracker_changed(sid, 2)

    async def _backfill(self, sid: int) -> None:
        """Fill the symbol's missing aggregate trade ids from REST, in order; GAP on failure."""
        from pipeline.net.http import HttpError, get_json

        cfg = self.cfg
        tr = self.trackers[sid]
        sym = cfg.symbols[sid]
        await self.sleep(cfg.backfill_grace)  # the live stream may still fill a small hole
        failures = 0
        while not self.stopping:
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
                self.c["rest_requests"] += 1
                try:
                    _, rows = await get_json(cfg.rest_url, "/api/v3/aggTrades",
                                             {"symbol": sym, "fromId": req[0], "limit": req[1]},
                                             timeout_s=cfg.rest_timeout)
                    if not isinstance(rows, list):
                        raise TypeError("aggTrades answer is not a list")
                except (HttpError, TypeError) as exc:
                    self.c["rest_errors"] += 1
                    failures += 1
                    self.rlog.warning("backfill_failed", "aggTrades backfill failed",
                                      symbol=sym, from_id=req[0], error=str(exc)[:200])
                else:
                    recv_ns = time.time_ns()
                    parsed = [r for r in (self._rest_row(sid, x, recv_ns) for x in rows) if r]
                    before = tr.stats.published_backfill
                    out = tr.on_backfill(parsed)
                    got = tr.stats.published_backfill - before
                    self.c["ids_backfilled"] += got
                    self._publish_tracked(tr, out)
                    self._tracker_changed(sid)
                    if tr.missing() is None:
                        self.c["gaps_backfilled"] += 1
                        log.info("backfilled", extra={"symbol": sym, "ids": got})
                        failures = 0
                        continue
                    failures = 0 if got else failures + 1  # no progress: REST not there yet
            if failures > cfg.rest_retries:
                gap = tr.missing()
                out = tr.give_up(self._gap_record(sid))
                self.c["gaps_unrecoverable"] += 1
                if gap is not None:
                    self.c["ids_lost"] += gap[1] - gap[0] + 1
                self.rlog.warning("gap", "aggregate trades lost", symbol=sym,
                                  first=gap[0] if gap else None, last=gap[1] if gap else None)
                self._publish_tracked(tr, out)
                self._tracker_changed(sid)
                failures = 0
                continue
            if failures:
                await self.sleep(min(cfg.backoff_base * 2 ** (failures - 1), cfg.backoff_max))

    # -- plumbing --
    def _spawn(self, coro: Any, running: set[int], key: int) -> None:
        running.add(key)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            running.discard(key)
            if not t.cancelled() and t.exception() is not None:
                self._task_failed(t)
            elif not self.stopping and running is self._backfilling \
                    and self.trackers[key].pending:
                self._spawn(self._backfill(key), running, key)  # more arrived meanwhile
            elif not self.stopping and running is self._trade_waiting \
                    and self.trade_trackers[key].pending:
                self._spawn(self._trade_gap(key), running, key)  # the next hole

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
        m = self.metrics
        if m is None:
            return
        if self._loop is not None:
            # records staged in this loop iteration (a frame may have arrived just before this
            # runs) are committed first, so `published` and `last_agg_id_*` never run ahead of
            # what readers can see
            self._commit()
        c = self.c
        vals: dict[str, float] = dict(c)
        vals["fast_path"] = int(self.fast is not None)
        vals["frames_fast"] = self._frames_fast
        if self.fast is not None:  # frames the compiled path handled without Python
            vals["frames_fast"] = self._frames_fast = self.fast.frames
        vals["frames_received"] = c["frames_received"] + vals["frames_fast"]
        for r, n in self.skipped.items():
            vals[f"skipped_{r}"] = n
        skipped = vals["skipped_total"] = sum(self.skipped.values())
        # derived here rather than counted per frame on the hot path
        vals["published"] = self.ring.cursor - self._cursor0
        vals["frames_decoded"] = (vals["frames_received"] - skipped - c["control_replies"]
                                  - c["server_shutdowns"] - c["callback_errors"])
        for sh in self.shards:
            if sh.conn is not None:
                self.last_frame_ns = max(self.last_frame_ns, sh.conn.last_ns)
        vals["last_frame_ns"] = self.last_frame_ns
        vals["callback_errors"] = self.c["callback_errors"] + sum(
            sh.conn.ws.callback_errors for sh in self.shards if sh.conn and sh.conn.ws)
        vals["shards"] = len(self.shards)
        vals["symbols"] = len(self.cfg.symbols)
        vals["heartbeat_interval_ms"] = max(1, round(self.cfg.metrics_interval * 1000))
        now = time.monotonic()
        vals["problem_shards_down"] = sum(
            1 for sh in self.shards
            if sh.down_since is not None and now - sh.down_since > self.down_grace_s)
        trackers = (*self.trackers, *self.trade_trackers)
        vals["ids_far"] = (sum(t.stats.far_ids for t in trackers) + self._book_far_seen
                           + self._partial_far_seen + sum(b.far_ids for b in self.books))
        vals["id_resets"] = (sum(t.stats.resets for t in trackers) + self._book_resets
                             + self._partial_resets + sum(b.resets for b in self.books))
        vals["book_levels_trimmed"] = sum(b.bids.trimmed + b.asks.trimmed for b in self.books)
        for i, sh in enumerate(self.shards[:MAX_SHARDS_IN_METRICS]):
            vals[f"conn_state_{i}"] = sh.state
        for i in range(min(len(self.trackers), MAX_SYMBOLS_IN_METRICS)):
            last = self.last_agg_id(i)
            vals[f"last_agg_id_{i}"] = last if last is not None else -1
        vals["gaps_detected"] = sum(t.stats.gaps_detected for t in self.trackers)
        vals["book_breaks"] = sum(b.breaks for b in self.books)
        m.set(**vals)

    async def _metrics_loop(self) -> None:
        from pipeline.ops import sdnotify

        wd = sdnotify.Watchdog()
        while not self.stopping:
            self.flush_metrics()
            if not self._ready and self.ring.cursor > self._cursor0:
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
        return 1
    log.info("ingest stopped")
    return 0


# --- CLI --------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# (IngestConfig field, argparse type, help), in --help order. The flag is the field with dashes
# and its default the field's default; ``config_from_args`` reads the same table back, so a flag
# cannot be added on one side and forgotten on the other.
_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("streams_url", str, "market streams base URL"),
    ("rest_url", str, "REST base URL (snapshots, backfill)"),
    ("symbols", str, "comma-separated symbols"),
    ("streams", str, "stream kinds per symbol: aggTrade, trade, bookTicker, depth, "
                     "depth@100ms, depth5/10/20[@100ms]"),
    ("ring", str, "ring (shared-memory) name"),
    ("ring_capacity", int, "ring slots (power of two)"),
    ("cpu", int, "pin the process to this CPU"),
    ("stall_timeout", float, "seconds without any message before a connection counts as dead"),
    ("transport", str, "picows | websockets"),
    ("decoder", str, "msgspec | orjson"),
    ("max_lifetime", float, "rotate connections after this many seconds (server limit: 24 h)"),
    ("metrics", str, "metrics block name"),
    ("metrics_interval", float, "seconds between metrics updates"),
    ("depth_levels", int, "also publish this many book levels as DEPTH_LEVEL records"),
    ("depth_snapshot_limit", int, "levels per REST depth snapshot"),
    ("backoff_base", float, "first reconnect delay (s), doubling"),
    ("backoff_max", float, "reconnect delay cap (s)"),
    ("healthy_after", float, "a connection up this long resets the backoff"),
    ("ping_interval", float, "own keep-alive ping after this many idle seconds (0 = off)"),
    ("backfill_grace", float, "wait this long for the live stream to fill a hole before REST"),
    ("rest_retries", int, "failed/unproductive REST attempts before a GAP record"),
    ("rest_timeout", float, "REST timeout (s)"),
    ("streams_per_connection", int, "streams per connection (max 1024)"),
    ("max_frame_bytes", int, "larger frames are skipped (counted as oversized)"),
    ("publish_batch", int, "at most this many records per ring commit within one event-loop "
                           "iteration (1 = publish each record at once)"),
    ("fast_path", str, "compiled aggTrade frame -> ring path: auto (use it if built) | on "
                       "(refuse to start without it) | off (pure Python)"),
    ("time_unit", str, "exchange timestamps in MILLISECOND (Binance's default) or MICROSECOND "
                       "(timeUnit on the stream URL; records carry ns either way)"),
    ("max_id_jump", int, "an id further than this from its stream's last id is held aside, not "
                         "a gap to backfill (a stream restart once --id-resync-after agree)"),
    ("id_resync_after", int, "far ids that must form a run of their own before the stream is "
                             "re-based on them"),
    ("max_backfill_ids", int, "an aggTrade hole larger than this is reported (GAP) without "
                              "fetching it over REST (request weight)"),
)
_CSV_FIELDS = frozenset({"symbols", "streams"})  # comma-separated on the command line


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    values = {name: getattr(args, name) for name, _, _ in _FLAGS}
    for name in _CSV_FIELDS:
        values[name] = _csv(values[name])
    return validate(IngestConfig(**values))


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"pipeline ingest: error: {exc}", file=sys.stderr)
        return 2
    return run(cfg)


def register(subparsers: Any) -> None:
    """Add the ``ingest`` subcommand."""
    d = IngestConfig()
    p = subparsers.add_parser(
        "ingest", help="market-data streams -> shared-memory tick ring (gap-free)",
        description="Subscribe Binance market-data streams and publish ticks into a ring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, kind, help_ in _FLAGS:
        default = getattr(d, name)
        if name in _CSV_FIELDS:
            default = ",".join(default)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help_)
    p.set_defaults(func=_main)
