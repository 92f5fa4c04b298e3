"""The simulator's asyncio shell and router: market streams, REST, WS API and admin on ONE port.

``websockets`` (asyncio server) does the handshakes, ping/pong and closing handshakes; plain HTTP
(REST, ``/sim`` admin) is answered from ``process_request``. Market data bypasses websockets'
send path: frames are pre-encoded once per (event, wrapping) and written straight to the
connection's transport as whole frames from the single event-loop thread, so they never
interleave with the protocol's own frames (pings, pongs, close).

This module owns the socket, the connections' lifetimes and the routing; each route's rules live
in a module of their own: :mod:`~pipeline.sim.streams` (subscriptions and fan-out),
:mod:`~pipeline.sim.pacing` (the walk's rate), :mod:`~pipeline.sim.replay` (captured sessions),
:mod:`~pipeline.sim.rest`, :mod:`~pipeline.sim.admin`, :mod:`~pipeline.sim.wsapi`, with the
pure wire helpers in :mod:`~pipeline.sim.framing` and :mod:`~pipeline.sim.control`.

Speed (``--rate max``): the walk runs in batches (:meth:`pipeline.sim.market.Market.step_batch`,
numpy), each batch's frames are formatted by one ``%`` over a byte template per stream and
wrapping (:func:`pipeline.sim.framing.batch_frames`), and all pending frames of a client leave
in one ``transport.write`` per loop turn. One client subscribed to one aggTrade stream gets about
0.5-0.8 M msg/s on a small shared 2-core machine (benchmarks/bench_sim.py; ~1.3 us of
simulator CPU per message), above what a Python client ingests, so ingest benchmarks measure
the client.

A finite ``--rate`` paces the same walk in 10 ms turns (``rate_unit`` "actions": walk actions
per second per symbol; "msgs": aggTrade messages per second per symbol, exact on average). A
turn with few units due runs the per-action walk (a bookTicker after every action); from
BATCH_MIN_ACTIONS / BATCH_MIN_MSGS due it runs step_batch, so fixed rates reach the hundreds of
thousands of msgs/s too (100 k aggTrade msgs/s over 2 symbols: about a third of a core).

Paths (binance-protocol.md section 1.2):
- ``/stream?streams=a/b`` combined, ``/stream`` then SUBSCRIBE, ``/ws/<stream>[/<stream>...]`` raw,
  ``/ws`` then SUBSCRIBE; ``timeUnit=MICROSECOND`` on any of them gives that connection its ``E``
  and ``T`` fields in microseconds (the simulator's clock has millisecond steps: ms * 1000);
- ``/ws-api/v3`` -> :func:`pipeline.sim.wsapi.serve_connection` (SIM-VENUE's module);
- on a SECOND port (``urls["sbe"]``, as Binance has a host of its own for it): the SBE
  market-data streams, same paths, ``X-MBX-APIKEY`` required (:mod:`pipeline.sim.sbe_streams`);
- ``GET /api/v3/{ping,time,exchangeInfo,depth,aggTrades,ticker/bookTicker}``;
- ``GET /sim/state``, ``POST /sim/fault/<name>`` (JSON body or query parameters);
- ``POST /sim/inject``: hostile or hand-made frames into live streams
  (:meth:`pipeline.sim.admin.Admin.inject`).

Rules with tunable timings (section 1.3): server pings every ``ping_interval`` and drops a
connection without pong after ``pong_timeout``; ``serverShutdown`` up to ``shutdown_notice``
before ``max_lifetime`` (a random lead, ``shutdown_lead``; or none at all) then close; more
than ``max_incoming_per_s`` incoming frames in one second (data, ping and pong frames all count)
drops a stream connection; at most ``max_streams`` streams. ``POST /sim/fault/shutdown`` sends a
serverShutdown now, with ``close_after`` seconds of lead (0: none), or (``notice=false``) only
the close.

Backpressure: a stream client whose transport buffer exceeds ``write_high_water`` pauses the
walk (nobody is sent more than it can take); one that stays above it for
``slow_consumer_timeout`` seconds is disconnected, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Coroutine
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State

from pipeline.sim import market as mk
from pipeline.sim.admin import Admin
from pipeline.sim.config import DEFAULT_SYMBOLS, RATE_UNITS, SimConfig
from pipeline.sim.connection import SimConnection
from pipeline.sim.faults import FaultRequest
from pipeline.sim.framing import ws_frame
from pipeline.sim.market_specs import default_spec
from pipeline.sim.pacing import MarketPacer
from pipeline.sim.replay import CaptureReplay, capture_symbols, load_capture
from pipeline.sim.rest import RestApi, json_response
from pipeline.sim.sbe_streams import SbeHub, check_api_key
from pipeline.sim.streams import StreamHub

log = logging.getLogger("pipeline.sim")

__all__ = ["DEFAULT_SYMBOLS", "SimConfig", "Simulator"]  # the config lives in pipeline.sim.config


class Simulator:
    """One simulator: market, venue service, websockets server, and the parts each route uses.

    ``await sim.start()`` binds and starts; ``await sim.stop()`` closes everything. Use
    :class:`pipeline.sim.testing.SimServer` in tests.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = cfg = config or SimConfig()
        if cfg.rate_unit not in RATE_UNITS:
            raise ValueError(f"rate_unit must be one of {RATE_UNITS}, not {cfg.rate_unit!r}")
        self.faults = cfg.faults
        self.capture = load_capture(cfg.replay) if cfg.replay else None
        symbols = [s.upper() for s in cfg.symbols]
        if self.capture is not None:
            for s in capture_symbols(self.capture):
                if s not in symbols:
                    symbols.append(s)
        # each symbol's allowed STP set and default (exchangeInfo, the venue's check)
        specs = {
            s: default_spec(s).with_stp_modes(cfg.stp_modes, cfg.stp_default) for s in symbols
        }
        self.market = mk.Market(symbols, cfg.seed, history=cfg.history, specs=specs)
        self.conns: set[SimConnection] = set()
        self._timers: dict[SimConnection, list[asyncio.TimerHandle]] = {}
        self._server: Server | None = None
        self._sbe_server: Server | None = None  # the SBE endpoint's own port
        self._tasks: list[asyncio.Task[None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._last_ms = 0
        self._lead_rng = random.Random(cfg.seed)  # serverShutdown leads (shutdown_lead=random)
        self.stats: dict[str, int] = {
            "connections_total": 0,
            "stream_connections_total": 0,
            "wsapi_connections_total": 0,
            "http_requests": 0,
            "frames_sent": 0,
            "bytes_sent": 0,
            "control_messages": 0,
            "rate_limit_disconnects": 0,
            "lifetime_disconnects": 0,
            "slow_consumer_disconnects": 0,
            "backpressure_waits": 0,
            "walk_actions": 0,  # a batched taker order counts as one
            "walk_batches": 0,  # Market.step_batch calls (--rate max, or a busy finite rate)
            "replay_frames": 0,
        }
        self.service: Any = None
        self.wsapi_error: str | None = None
        self.port = 0
        self.sbe_port = 0
        self.hub = StreamHub(
            cfg, self.market, self.faults, self.stats, self.spawn,
            None if self.capture is None else self.capture.streams,
        )
        self.sbe = self.hub.sbe = SbeHub(
            cfg, self.market, self.faults, self.stats, self.spawn, self.now_ms
        )
        self.pacer = MarketPacer(cfg, self.market, self.hub, self.faults, self.stats, self.now_ms)
        self.replay = None if self.capture is None else CaptureReplay(
            self.capture, cfg.replay_speed, self.hub, self.faults, self.stats
        )
        self.rest = RestApi(self.market, self.faults, self.now_ms, self.replay)
        self.admin = Admin(self)

    # ---- lifecycle ----

    def now_ms(self) -> int:
        """Event time in ms: the configured wall clock, never going backwards."""
        clock = self.config.clock_ms
        now = clock() if clock is not None else time.time_ns() // 1_000_000
        if now < self._last_ms:
            now = self._last_ms
        self._last_ms = now
        return now

    async def start(self) -> None:
        cfg = self.config
        self._make_service()
        self.market.set_wakeup(self.pacer.wake.set)

        def factory(*args: Any, **kwargs: Any) -> SimConnection:
            return SimConnection(self, *args, **kwargs)

        ws_options: dict[str, Any] = {
            "create_connection": cast(Any, factory),
            "ping_interval": cfg.ping_interval,
            "ping_timeout": cfg.pong_timeout,
            "compression": None,
            "max_size": 1 << 20,
            "write_limit": cfg.write_high_water,
            "close_timeout": 2,
            "server_header": "pipeline-sim",
            "logger": logging.getLogger("pipeline.sim.ws"),
        }
        self._server = await serve(
            self._handler, cfg.host, cfg.port, process_request=self._process_request,
            **ws_options,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        # SBE on a port of its own, as Binance serves it on a host of its own: same handler,
        # same connection rules, its own routing (API-key header, SBE stream names)
        self._sbe_server = await serve(
            self._handler, cfg.host, cfg.sbe_port, process_request=self._process_sbe_request,
            **ws_options,
        )
        self.sbe_port = next(iter(self._sbe_server.sockets)).getsockname()[1]
        loop = asyncio.get_running_loop()
        if self.replay is not None:
            self._tasks.append(loop.create_task(self.replay.run(), name="sim-replay"))
        else:
            self._tasks.append(loop.create_task(self.pacer.run(self.service), name="sim-market"))
            self._tasks.append(loop.create_task(self.sbe.run(), name="sim-sbe-depth"))
        log.info(
            "sim listening",
            extra={"port": self.port, "symbols": ",".join(self.market.symbols)},
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for handles in self._timers.values():
            for h in handles:
                h.cancel()
        if self.admin.blackhole_timer is not None:
            self.admin.blackhole_timer.cancel()
        for conn in list(self.conns):
            if conn.sim_blackholed:  # let the closing handshake out
                conn.sim_unblackhole()
        self.rest.close_sessions()  # keep-alive REST connections (pipeline/sim/rest_http.py)
        for server in (self._server, self._sbe_server):
            if server is not None:
                server.close()
                await server.wait_closed()
        self._server = self._sbe_server = None
        for task in list(self._bg):
            task.cancel()
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=2)
        self.market.set_wakeup(None)

    @property
    def urls(self) -> dict[str, str]:
        h, p = self.config.host, self.port
        return {
            "streams": f"ws://{h}:{p}",
            "rest": f"http://{h}:{p}",
            "wsapi": f"ws://{h}:{p}/ws-api/v3",
            "sbe": f"ws://{h}:{self.sbe_port}",
            "admin": f"http://{h}:{p}/sim",
        }

    def _make_service(self) -> None:
        try:
            from pipeline.sim import wsapi
        except ModuleNotFoundError as exc:
            if exc.name != "pipeline.sim.wsapi":
                raise
            self.wsapi_error = "pipeline.sim.wsapi is not available"
            log.warning("sim wsapi unavailable", extra={"reason": self.wsapi_error})
            return
        self.service = wsapi.WsApiService(
            market=self.market,
            api_keys=dict(self.config.api_keys),
            faults=self.faults,
            clock_ms=self.now_ms,
            **self.config.wsapi_options,
        )

    # ---- HTTP: routing, REST, admin ----

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        sconn = cast(SimConnection, conn)
        url = urlsplit(request.path)
        path = unquote(url.path)
        query = parse_qs(url.query, keep_blank_values=True)
        if path.startswith("/sim/") or path == "/sim":
            self.stats["http_requests"] += 1
            return self.admin.handle(request.method, path, query, sconn.sim_body)
        if self.faults.refuse:
            self.faults.count("refuse")
            status = self.faults.refuse_status
            if status == 503:
                return json_response(503, {"code": -1008,
                                           "msg": "Service unavailable (simulated)."})
            return json_response(status, {"code": -1000, "msg": f"Refused (simulated {status})."})
        if path.startswith("/api/"):
            self.stats["http_requests"] += 1
            return self.rest.handle(request.method, path, query, request.headers)
        if path == "/ws-api/v3":
            sconn.sim_route = ("wsapi", None)
            return None
        if path in ("/stream", "/ws") or path.startswith("/ws/"):
            return self._route_stream(sconn, path, query)
        return json_response(404, {"code": -1000, "msg": f"Unknown path {path}"})

    def _process_sbe_request(
        self, conn: ServerConnection, request: Request
    ) -> Response | None:
        """The SBE port: stream paths only, and only with a registered API key (7.1)."""
        sconn = cast(SimConnection, conn)
        url = urlsplit(request.path)
        path = unquote(url.path)
        self.stats["sbe_handshakes"] = self.stats.get("sbe_handshakes", 0) + 1
        if self.faults.refuse:
            self.faults.count("refuse")
            return json_response(self.faults.refuse_status,
                                 {"code": -1008, "msg": "Service unavailable (simulated)."})
        if not (path in ("/stream", "/ws") or path.startswith("/ws/")):
            return json_response(404, {"code": -1000, "msg": f"Unknown path {path}"})
        refused = check_api_key(request.headers, self.config.api_keys)
        if refused is not None:
            self.faults.count("sbe_key_refused")
            return refused
        return self._route_stream(sconn, path, parse_qs(url.query, keep_blank_values=True),
                                  self.sbe)

    def _route_stream(
        self, conn: SimConnection, path: str, query: dict[str, list[str]],
        hub: StreamHub | None = None,
    ) -> Response | None:
        hub = hub or self.hub
        tu = (query.get("timeUnit") or ["MILLISECOND"])[0]
        if tu not in ("MILLISECOND", "millisecond", "MICROSECOND", "microsecond"):
            # the streams service's exact answer is UNCONFIRMED (section 1.2): the error code
            # is the documented -1194 INVALID_TIME_UNIT
            return json_response(400, {"code": -1194, "msg": "Invalid timeUnit."})
        micros = tu in ("MICROSECOND", "microsecond")
        if path == "/stream":
            raw = (query.get("streams") or [""])[0]
            names = [n for n in raw.split("/") if n]
            combined = True
        else:
            names = [n for n in path[len("/ws/") :].split("/") if n] if path != "/ws" else []
            combined = False
        valid: list[str] = []
        for n in names:
            canon = hub.valid_stream(n)
            if canon is None:
                return json_response(
                    400, {"code": 2, "msg": f"Invalid request: unknown stream name `{n}`"}
                )
            if canon not in valid:
                valid.append(canon)
        if len(valid) > self.config.max_streams:
            return json_response(
                400, {"code": 2, "msg": f"Too many streams (max {self.config.max_streams})"}
            )
        conn.sim_route = ("sbe" if hub is self.sbe else "streams", (combined, valid, micros))
        return None

    # ---- the admin API, for in-process tests (pipeline.sim.testing.SimServer) ----

    def state(self) -> dict[str, Any]:
        """Counters for GET /sim/state."""
        return self.admin.state()

    def fault(self, req: FaultRequest) -> None:
        """Apply one validated fault now."""
        self.admin.fault(req)

    def inject(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Send hand-made frames now (``POST /sim/inject``, :meth:`Admin.inject`)."""
        return self.admin.inject(spec)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire-and-forget task that is kept referenced until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ---- WebSocket handlers ----

    async def _handler(self, ws: ServerConnection) -> None:
        conn = cast(SimConnection, ws)
        route = conn.sim_route
        if route is None:  # cannot happen: process_request routed it
            await conn.close(1011, "no route")
            return
        self.stats["connections_total"] += 1
        self.conns.add(conn)
        self._arm_lifetime(conn)
        try:
            if route[0] == "wsapi":
                conn.sim_kind = "wsapi"
                self.stats["wsapi_connections_total"] += 1
                await self._wsapi(conn)
            elif route[0] == "sbe":
                conn.sim_kind = "sbe"
                self.stats["sbe_connections_total"] += 1
                combined, streams, _micros = route[1]  # SBE times are always microseconds
                await self.sbe.serve(conn, combined, streams)
            else:
                conn.sim_kind = "streams"
                self.stats["stream_connections_total"] += 1
                combined, streams, micros = route[1]
                await self.hub.serve(conn, combined, streams, micros)
        finally:
            self.conns.discard(conn)
            for h in self._timers.pop(conn, []):
                h.cancel()

    async def _wsapi(self, conn: SimConnection) -> None:
        if self.service is None:
            await conn.close(1011, "WS API not available in this build (pipeline.sim.wsapi)")
            return
        from pipeline.sim import wsapi

        await wsapi.serve_connection(self.service, conn)

    # ---- lifetime / serverShutdown ----

    def _arm_lifetime(self, conn: SimConnection) -> None:
        """The lifetime close, and the serverShutdown before it: ``shutdown_lead`` says when
        (a random lead by default: Binance promises none since 2026-06-09, so a client that
        waits for a fixed one is tested against the real rule)."""
        cfg = self.config
        if not math.isfinite(cfg.max_lifetime):
            return
        loop = asyncio.get_running_loop()
        handles = [loop.call_later(cfg.max_lifetime, self.lifetime_close, conn)]
        lead = cfg.shutdown_notice
        if cfg.shutdown_lead == "random":
            lead = self._lead_rng.uniform(0.0, lead)
        if cfg.shutdown_notice > 0 and cfg.shutdown_lead != "none" and lead > 0:
            notice_at = max(0.0, cfg.max_lifetime - lead)
            handles.append(loop.call_later(notice_at, self.send_shutdown, conn))
        self._timers[conn] = handles

    def send_shutdown(self, conn: SimConnection) -> None:
        """Binance's ``serverShutdown`` notice, after what the client was already owed."""
        now = self.now_ms()
        event = {"e": "serverShutdown", "E": now}
        if conn.sim_kind == "wsapi":
            payload = orjson.dumps({"event": event})
        else:
            hub = self.sbe if conn.sim_kind == "sbe" else self.hub
            client = hub.client_of(conn)
            if conn.sim_kind == "sbe" or (client is not None and client.micros):
                event["E"] = now * 1000
            if client is not None and client.combined:
                payload = orjson.dumps({"stream": "!serverShutdown", "data": event})
            else:
                payload = orjson.dumps(event)
            if client is not None:
                hub.flush_client(client)
        if conn.sim_write(ws_frame(payload)):
            self.stats["frames_sent"] += 1
            self.faults.count("server_shutdown_sent")

    def lifetime_close(self, conn: SimConnection) -> None:
        """Close a connection that reached ``max_lifetime`` (Binance's 24 h rule)."""
        if conn.protocol.state is State.OPEN:
            self.stats["lifetime_disconnects"] += 1
            self.spawn(conn.close(1001, "connection lifetime"))
