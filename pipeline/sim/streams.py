"""Market-stream connections: who is subscribed to what, and the fan-out of frames to them.

Why one owner: every producer of stream frames (the random walk's pacing loop, the capture
replay, ``/sim/inject``, serverShutdown) must go through the same per-client pending buffers,
so a client's frames leave in order and in one ``transport.write`` per loop turn (the
``--rate max`` throughput depends on it). A frame is encoded once per (event, wrapping), not per
client. Backpressure is decided here too: a client over ``write_high_water`` pauses the
producers; one stuck there for ``slow_consumer_timeout`` seconds is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from pipeline.logs import RateLimitedLog
from pipeline.sim import market as mk
from pipeline.sim.control import handle_control, parse_stream
from pipeline.sim.framing import batch_frames, micros_payload, ws_frame

if TYPE_CHECKING:
    from pipeline.sim.connection import SimConnection
    from pipeline.sim.faults import Faults
    from pipeline.sim.server import SimConfig

log = logging.getLogger("pipeline.sim")
_rlog = RateLimitedLog(log)


class StreamClient:
    """Per-connection state of a market-stream connection."""

    __slots__ = (
        "combined",
        "conn",
        "frames_sent",
        "incoming",
        "micros",
        "over_since",
        "pending",
        "pending_frames",
        "streams",
    )

    def __init__(self, conn: SimConnection, combined: bool, micros: bool = False) -> None:
        self.conn = conn
        self.combined = combined
        self.micros = micros  # timeUnit=MICROSECOND: E and T in microseconds
        self.streams: list[str] = []
        self.pending: list[bytes] = []  # whole frames, possibly many in one bytes
        self.pending_frames = 0
        self.frames_sent = 0
        self.incoming: deque[float] = deque()
        self.over_since: float | None = None


class StreamHub:
    """Subscriptions and fan-out of all market-stream clients of one simulator.

    ``subs`` (stream -> clients) and ``dirty`` (clients with pending frames) are read directly
    by the replay loop, which fills the pending buffers itself rather than pay a call per frame.
    """

    def __init__(
        self,
        config: SimConfig,
        market: mk.Market,
        faults: Faults,
        stats: dict[str, int],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        capture_streams: set[str] | None = None,
    ) -> None:
        self.config = config
        self.market = market
        self.faults = faults
        self.stats = stats
        self.spawn = spawn
        self.capture_streams = capture_streams
        self.symbols_lower = {s.lower() for s in market.symbols}
        self.stream_b: dict[str, bytes] = {}  # stream name as bytes, for the combined envelope
        self.subs: dict[str, set[StreamClient]] = {}
        self.clients: set[StreamClient] = set()
        self.dirty: set[StreamClient] = set()
        self.client_joined = asyncio.Event()  # the capture replay starts on the first client
        # the SBE endpoint's hub (pipeline.sim.sbe_streams): fed the same walk events
        self.sbe: StreamHub | None = None

    def valid_stream(self, name: str) -> str | None:
        """Canonical name of a stream this simulator serves (a capture's own names too)."""
        if self.capture_streams is not None and name in self.capture_streams:
            return name
        return parse_stream(name, self.symbols_lower)

    def client_of(self, conn: SimConnection) -> StreamClient | None:
        return next((c for c in self.clients if c.conn is conn), None)

    # ---- one stream connection ----

    async def serve(
        self, conn: SimConnection, combined: bool, streams: list[str], micros: bool = False
    ) -> None:
        """Run one market-stream connection: its control messages until it closes."""
        client = StreamClient(conn, combined, micros)
        self.clients.add(client)
        self.subscribe(client, streams)
        limit = self.config.max_incoming_per_s
        loop = asyncio.get_running_loop()

        def on_frame() -> None:
            if not limit:
                return
            now = loop.time()
            q = client.incoming
            q.append(now)
            while q and now - q[0] >= 1.0:
                q.popleft()
            if len(q) > limit and conn.protocol.state is State.OPEN:
                self.stats["rate_limit_disconnects"] += 1
                _rlog.warning("sim_rate_limit", "stream client sent > limit msgs/s; closing")
                self.spawn(conn.close(1008, "Too many requests"))

        conn.sim_on_frame = on_frame
        if self.capture_streams is not None:
            self.client_joined.set()
        try:
            async for msg in conn:
                self.stats["control_messages"] += 1
                res = handle_control(
                    msg,
                    current=client.streams,
                    combined=client.combined,
                    valid_stream=self.valid_stream,
                    max_streams=self.config.max_streams,
                )
                if res.subscribe:
                    self.subscribe(client, res.subscribe)
                if res.unsubscribe:
                    self.unsubscribe(client, res.unsubscribe)
                if res.combined is not None:
                    client.combined = res.combined
                self.flush_client(client)  # keep data sent before the reply in order
                if conn.sim_write(ws_frame(res.reply)):
                    self.stats["frames_sent"] += 1
        except ConnectionClosed:
            pass
        finally:
            conn.sim_on_frame = None
            self.unsubscribe(client, list(client.streams))
            self.clients.discard(client)
            self.dirty.discard(client)

    # ---- subscriptions ----

    def writable_symbols(self) -> set[str]:
        """Lowercase symbols with a subscriber that can be written to now (not closing, not
        black-holed): at --rate max nobody else is worth a batch."""
        out: set[str] = set()
        for stream, subs in self.subs.items():
            sym = stream.partition("@")[0]
            if sym not in out and any(c.conn.sim_can_write() for c in subs):
                out.add(sym)
        if self.sbe is not None:
            out |= self.sbe.writable_symbols()
        return out

    def subscribe(self, client: StreamClient, streams: list[str]) -> None:
        for s in streams:
            if s not in client.streams:
                client.streams.append(s)
                self.subs.setdefault(s, set()).add(client)
                if s not in self.stream_b:
                    self.stream_b[s] = s.encode()

    def unsubscribe(self, client: StreamClient, streams: list[str]) -> None:
        for s in streams:
            if s in client.streams:
                client.streams.remove(s)
                subs = self.subs.get(s)
                if subs is not None:
                    subs.discard(client)
                    if not subs:
                        del self.subs[s]

    # ---- lifetime / serverShutdown ----

    # ---- fan-out ----

    def publish(self, stream: str, payload: bytes) -> None:
        subs = self.subs.get(stream)
        if not subs:
            return
        raw_f: bytes | None = None
        comb_f: bytes | None = None
        us_f: dict[bool, bytes] | None = None  # timeUnit=MICROSECOND clients, by wrapping
        for c in subs:
            if c.micros:
                if us_f is None:
                    us_f = {}
                f = us_f.get(c.combined)
                if f is None:
                    p = micros_payload(payload)
                    f = us_f[c.combined] = ws_frame(
                        b'{"stream":"' + self.stream_b[stream] + b'","data":' + p + b"}"
                        if c.combined else p
                    )
                c.pending.append(f)
            elif c.combined:
                if comb_f is None:
                    comb_f = ws_frame(
                        b'{"stream":"' + self.stream_b[stream] + b'","data":' + payload + b"}"
                    )
                c.pending.append(comb_f)
            else:
                if raw_f is None:
                    raw_f = ws_frame(payload)
                c.pending.append(raw_f)
            c.pending_frames += 1
            self.dirty.add(c)

    def flush_client(self, c: StreamClient) -> None:
        if not c.pending:
            return
        n = c.pending_frames
        data = c.pending[0] if len(c.pending) == 1 else b"".join(c.pending)
        c.pending = []
        c.pending_frames = 0
        self.dirty.discard(c)
        if c.conn.sim_write(data):
            c.frames_sent += n
            self.stats["frames_sent"] += n

    def flush(self) -> None:
        for c in list(self.dirty):
            self.flush_client(c)
        if self.sbe is not None:
            self.sbe.flush()

    def dispatch(self, events: list[mk.Event | mk.TakerBatch]) -> None:
        """The walk's events to the JSON streams, and to the SBE endpoint's hub if it has
        subscribers."""
        if self.sbe is not None and self.sbe.subs:
            self.sbe.dispatch(events)
        self._dispatch_json(events)

    def _dispatch_json(self, events: list[mk.Event | mk.TakerBatch]) -> None:
        subs = self.subs
        faults = self.faults
        for ev in events:
            if isinstance(ev, mk.TakerBatch):
                if faults.skip_agg_ids:  # rare: per event, so the budget counts exactly
                    self._dispatch_json(list(ev.events()))
                else:
                    self.publish_batch(ev)
                continue
            sym = ev.symbol.lower()
            if isinstance(ev, mk.AggTrade):
                if faults.skip_agg_ids and faults.take_skip_agg(ev.symbol):
                    continue
                stream = sym + "@aggTrade"
                if stream in subs:
                    self.publish(stream, mk.encode_agg_trade(ev))
            elif isinstance(ev, mk.Trade):
                stream = sym + "@trade"
                if stream in subs:
                    self.publish(stream, mk.encode_trade(ev))
            else:
                stream = sym + "@bookTicker"
                if stream in subs:
                    self.publish(stream, mk.encode_book_ticker(ev))

    def publish_batch(self, b: mk.TakerBatch) -> None:
        """Fan a TakerBatch out: per subscribed stream its frames, encoded once per wrapping.

        Within one batch (one instant) each stream's frames stay in order, but the trade,
        aggTrade and bookTicker streams follow one another rather than interleave."""
        low = b.symbol.lower()
        for kind in ("trade", "aggTrade", "bookTicker"):
            stream = f"{low}@{kind}"
            subs = self.subs.get(stream)
            if not subs:
                continue
            done: dict[tuple[bool, bool], tuple[bytes, int]] = {}  # by (combined, micros)
            for c in subs:
                key = (c.combined, c.micros)
                got = done.get(key)
                if got is None:
                    head = b'{"stream":"' + self.stream_b[stream] + b'","data":'
                    got = done[key] = batch_frames(b, kind, head, b"}", c.micros) if c.combined \
                        else batch_frames(b, kind, micros=c.micros)
                data, n = got
                if n:
                    c.pending.append(data)
                    c.pending_frames += n
                    self.dirty.add(c)

    def depth_tick(self, speed: int, now_ms: int) -> None:
        sfx = "@100ms" if speed == 100 else ""
        for sym in self.market.symbols:
            low = sym.lower()
            diff = self.market.flush_depth(sym, speed, now_ms)
            stream = f"{low}@depth{sfx}"
            if diff is not None and stream in self.subs:
                self.publish(stream, mk.encode_depth_diff(diff))
            for n in mk.PARTIAL_LEVELS:
                stream = f"{low}@depth{n}{sfx}"
                if stream in self.subs:
                    self.publish(stream, mk.encode_partial_depth(*self.market.top(sym, n)))

    def backpressured(self, now: float) -> bool:
        """True if some stream client cannot take more now; drops ones stuck too long."""
        high = self.config.write_high_water
        over = False
        for c in list(self.clients):
            conn = c.conn
            if conn.sim_blackholed or not c.streams or conn.transport.is_closing():
                continue
            if conn.transport.get_write_buffer_size() > high:
                if c.over_since is None:
                    c.over_since = now
                elif now - c.over_since > self.config.slow_consumer_timeout:
                    self.stats["slow_consumer_disconnects"] += 1
                    _rlog.warning("sim_slow_consumer", "stream client too slow; dropping it")
                    conn.transport.abort()
                    continue
                over = True
            else:
                c.over_since = None
        if self.sbe is not None and self.sbe.backpressured(now):
            over = True
        return over
