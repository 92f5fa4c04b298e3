"""`pipeline ingest` shards: groups of streams, each on one websocket connection at a time.

The subscribed streams are split into shards of at most 1024 streams (one connection each),
opened as ``/stream?streams=a/b/...`` (the remainder, if the URL would be too long, goes out as
SUBSCRIBE batches at <= 4 messages/s, under the 5/s limit of section 1.3). A shard reconnects
with backoff when its connection dies or stalls, and rotates make-before-break before the 24 h
server limit and on ``serverShutdown``.

Why apart from the process (ingest.py): connection management is I/O and timing; the frame
handler and the gap-free cores never wait on it, and it needs of the process only its config,
counters, log and stop signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from pipeline.settings import ConfigError

if TYPE_CHECKING:
    from pipeline.marketdata.ingest import Ingest

log = logging.getLogger("pipeline.ingest")

MAX_URL_CHARS = 4000  # longer stream lists go out as SUBSCRIBE messages
SUBSCRIBE_BATCH = 100  # streams per SUBSCRIBE message
SUBSCRIBE_INTERVAL_S = 0.25  # <= 4 control messages/s (limit: 5 incoming messages/s, 1.3)

# connection states (metrics conn_state_<i>)
DOWN, CONNECTING, UP, ROTATING, BACKOFF = 0, 1, 2, 3, 4


def is_config_rejection(status: int | None) -> bool:
    """A handshake answered 4xx other than 429 (too many requests) and 418 (IP ban): the venue
    does not serve this URL or these streams (404 wrong path, 400 bad stream, 403/451 refused
    here). Retrying will not fix it, so it is a configuration error, not a reason to reconnect
    with the usual fast backoff."""
    return status is not None and 400 <= status < 500 and status not in (418, 429)


def rejection_error(url: str, status: int) -> ConfigError:
    """The message for a handshake the venue refused (exit 2 on start, the log line later)."""
    base = url.partition("?")[0].removesuffix("/stream")
    return ConfigError("--streams-url", f"the streams server at {base} answered the WebSocket "
                                        f"handshake with HTTP {status}: give the base URL (e.g. "
                                        "wss://stream.binance.com:9443, no /stream or /ws) and "
                                        "stream names it serves")


def depth_symbol_ids(streams: list[str], symbols: list[str]) -> list[int]:
    """Ring symbol ids of the depth streams among ``streams`` (``btcusdt@depth@100ms``,
    ``btcusdt@depth5``, SBE ``btcusdt@depth20``...)."""
    index = {s: i for i, s in enumerate(symbols)}
    sids = {index[sym.upper()] for sym, _, kind in (s.partition("@") for s in streams)
            if kind.startswith("depth") and sym.upper() in index}
    return sorted(sids)


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
        #: an SBE connection's frames go to the compiled path's on_sbe_message or
        #: Ingest.handle_sbe (never the JSON decoder); the JSON path checks nothing
        self.sbe: bool = shard.sbe
        handler = shard.ingest.on_sbe_frame if self.sbe else shard.ingest.on_frame
        self.on_message = functools.partial(handler, self)

    def got_first(self) -> None:
        self.first_pending = False
        if not self.first_msg.done():
            self.first_msg.set_result(None)

    def silent_s(self) -> float:
        return (time.time_ns() - self.last_ns) / 1e9


class Shard:
    """Streams carried by one connection at a time (two during a rotation)."""

    def __init__(self, ingest: Ingest, index: int, streams: list[str], sbe: bool = False) -> None:
        self.ingest = ingest
        self.index = index
        #: carries SBE streams (binary frames, --sbe-url, X-MBX-APIKEY header)
        self.sbe = sbe
        self.streams = streams
        self.state = DOWN
        #: monotonic time the shard last stopped delivering (not UP / ROTATING), None while it
        #: delivers: `problem_shards_down` names shards down for longer than a reconnect takes
        self.down_since: float | None = time.monotonic()
        self.conn: Conn | None = None
        self.wake = asyncio.Event()
        self._serial = 0
        #: a connection was ever opened: a handshake refused before that is a configuration
        #: error the process exits on (2); after it, a health problem and a slow retry
        self.connected_once = False
        #: HTTP status of the handshake refusal this shard is retrying after (0: none), shown
        #: by `pipeline health` as problem_streams_rejected (ingest_metrics.py)
        self.rejected_status = 0
        cfg = ingest.cfg
        base = (cfg.sbe_url if sbe else cfg.streams_url).rstrip("/") + "/stream?streams="
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
        #: symbol ids whose depth (diff or partial) this shard carries: marked stale when its
        #: connection is lost
        self.depth_sids = depth_symbol_ids(streams, cfg.symbols)

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
            headers={"X-MBX-APIKEY": self.ingest.sbe_api_key} if self.sbe else None,
        )
        conn.opened_at = time.monotonic()
        conn.last_ns = time.time_ns()
        self.connected_once = True
        self.rejected_status = 0
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
                status = exc.status or 0
                if is_config_rejection(status):
                    err = rejection_error(self.url, status)
                    if not self.connected_once:  # on start: exit 2 with the message
                        log.error("streams handshake refused; stopping",
                                  extra={"shard": self.index, "error": str(err)})
                        ing.failed = ing.failed or err
                        ing.stop()
                        break
                    # later (the venue changed under us): loud, and retried slowly
                    self.rejected_status = status
                    delay = cfg.backoff_max
                    log.error("streams handshake refused", extra={
                        "shard": self.index, "error": str(err), "retry_in_s": delay})
                else:
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
            if conn.shutdown_requested and healthy:
                # serverShutdown with no lead (none is promised since 2026-06-09): the close
                # came before a rotation could be made, so reconnect now; the id trackers
                # backfill what the gap missed. A venue that does this to every fresh
                # connection still gets the backoff (not healthy yet).
                delay = 0.0
            info = conn.ws.close_info
            ing.rlog.warning("reconnect", "connection lost; reconnecting", shard=self.index,
                             reason=reason, close=str(info), retry_in_s=round(delay, 3))
            lost_ns = time.time_ns()
            for sid in self.depth_sids:
                ing.depth.mark_stale(sid, lost_ns)
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
            if is_config_rejection(exc.status):  # the old connection still delivers
                self.rejected_status = exc.status or 0
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
