"""The ``/sim`` admin API: ``GET /sim/state``, ``POST /sim/fault/<name>``, ``POST /sim/inject``,
``POST /sim/symbol_status``.

Why apart from the router: this is the test harness's hand on the simulator, not Binance's
protocol. Faults that are switches live in :mod:`pipeline.sim.faults`; the ones that act on live
connections now (drop, malformed, shutdown, blackhole) and the frame injection are carried out
here, which is why :class:`Admin` holds the whole :class:`~pipeline.sim.server.Simulator`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from websockets.http11 import Response

from pipeline.binance.filters import SYMBOL_STATUSES
from pipeline.sim import market as mk
from pipeline.sim.faults import IMMEDIATE, FaultError, FaultRequest, apply_switch, parse_fault
from pipeline.sim.framing import ws_frame
from pipeline.sim.rest import json_response
from pipeline.sim.sbe_streams import parse_binary_inject

if TYPE_CHECKING:
    from pipeline.sim.server import Simulator

log = logging.getLogger("pipeline.sim")


class Admin:
    """Answers ``/sim`` requests and applies faults to one running simulator."""

    #: most frames one inject request may send (each goes to every subscriber at once)
    MAX_INJECT = 10_000

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.faults = sim.faults
        self.blackhole_timer: asyncio.TimerHandle | None = None

    def handle(self, method: str, path: str, q: dict[str, list[str]], body: bytes) -> Response:
        if path == "/sim/state" and method == "GET":
            return json_response(200, self.state())
        json_posts: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "/sim/inject": self.inject,
            "/sim/symbol_status": self.symbol_status,
        }
        if path in json_posts:
            if method != "POST":
                return json_response(405, {"error": "use POST"})
            try:
                spec = orjson.loads(body or b"null")
                if not isinstance(spec, dict):
                    raise FaultError("body must be a JSON object")
                return json_response(200, json_posts[path](spec))
            except orjson.JSONDecodeError as exc:
                return json_response(400, {"error": f"body is not JSON: {exc}"})
            except FaultError as exc:
                return json_response(400, {"error": str(exc)})
        if path.startswith("/sim/fault/"):
            if method != "POST":
                return json_response(405, {"error": "use POST"})
            name = path[len("/sim/fault/") :]
            params: dict[str, Any] = {}
            if body:
                try:
                    params = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    return json_response(400, {"error": f"body is not JSON: {exc}"})
                if not isinstance(params, dict):
                    return json_response(400, {"error": "body must be a JSON object"})
            else:
                params = {k: _query_value(v[0]) for k, v in q.items()}
            try:
                req = parse_fault(name, params)
                self.fault(req)
            except FaultError as exc:
                return json_response(400, {"error": str(exc)})
            return json_response(200, {"ok": True, "fault": name, "params": req.params})
        return json_response(404, {"error": f"unknown admin path {path}"})

    def state(self) -> dict[str, Any]:
        """Counters for GET /sim/state."""
        sim, hub = self.sim, self.sim.hub
        subs = {s: len(c) for s, c in hub.subs.items() if c}
        kinds: dict[str, int] = {"streams": 0, "wsapi": 0, "sbe": 0}
        for c in sim.conns:
            if c.sim_kind in kinds:
                kinds[c.sim_kind] += 1
        market = {}
        for s in sim.market.symbols:
            bp, _bq, ap, _aq = sim.market.best_units(s)
            market[s] = {
                "last_update_id": sim.market.last_update_id(s),
                "best_bid": mk.fmt_units(bp),
                "best_ask": mk.fmt_units(ap),
            }
        venue: Any = None
        if sim.service is not None and hasattr(sim.service, "state"):
            try:
                venue = sim.service.state()
            except Exception as exc:  # the venue's bug must not break the admin endpoint
                venue = {"error": repr(exc)}
        return {
            "port": sim.port,
            "connections": kinds,
            "stats": dict(sim.stats),
            "subscriptions": subs,
            "faults": self.faults.snapshot(),
            # REST weight, 429/418 answers and keep-alive connections (pipeline/sim/rest_limits.py)
            "rest": {**sim.rest.limits.stats, "connections": sim.rest.connections},
            "market": market,
            "venue": venue,
            "wsapi_error": sim.wsapi_error,
            "replay": None
            if sim.replay is None
            else {"frames": len(sim.replay.capture.frames), "position": sim.replay.position},
        }

    # ---- faults ----

    def fault(self, req: FaultRequest) -> None:
        """Apply one validated fault now."""
        sim = self.sim
        loop = asyncio.get_running_loop()
        log.info("sim fault", extra={"fault": req.name, "params": str(req.params)})
        if req.name not in IMMEDIATE and req.name != "blackhole":
            apply_switch(self.faults, req, loop.time())
            if req.name == "clear":
                self.end_blackhole()
            self.faults.count(req.name)
            return
        target = req.params.get("target", "all")
        conns = [c for c in sim.conns if target == "all" or c.sim_kind == target]
        self.faults.count(req.name)
        if req.name == "drop":
            for c in conns:
                if req.params["mode"] == "abort":
                    c.transport.abort()
                else:
                    sim.spawn(c.close(req.params["code"], "simulated drop"))
        elif req.name == "malformed":
            frames = _malformed_frames(req.params["kind"], req.params["count"], req.params["size"])
            for c in conns:
                for f in frames:
                    c.sim_write(f)
        elif req.name == "shutdown":
            for c in conns:
                if req.params["notice"]:
                    sim.send_shutdown(c)
                if req.params["close_after"] is not None:
                    loop.call_later(req.params["close_after"], sim.lifetime_close, c)
        elif req.name == "blackhole":
            if not req.params["on"]:
                self.end_blackhole()
                return
            self.faults.blackhole = True
            for c in conns:
                c.sim_blackhole()
            dur = req.params["duration"]
            if self.blackhole_timer is not None:
                self.blackhole_timer.cancel()
                self.blackhole_timer = None
            if dur is not None:
                self.faults.blackhole_until = loop.time() + dur
                self.blackhole_timer = loop.call_later(dur, self.end_blackhole)

    #: most frames one inject request may send (each goes to every subscriber at once)

    def inject(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Send hand-made frames now, ahead of the market's next event (``POST /sim/inject``).

        Why: the venue a client must survive sends more than well-formed market data (a 19-digit
        id, an out-of-range time, 100k-deep JSON); tests inject exactly that into a live stream
        and watch the client carry on with the real frames that follow.

        ``{"stream": "btcusdt@aggTrade", "payload": "<the data object as JSON text>",
        "count": 1, "seq_from": 0}`` goes to every subscriber of the stream, wrapped like the
        stream's own frames (combined envelope, raw, timeUnit). Tokens in ``payload``:
        ``$NEXT_AGG_ID`` / ``$NEXT_TRADE_ID`` (the id the market's next aggregate trade / trade
        of the stream's symbol will get: a race-free "same id as the real next frame"),
        ``$LAST_UPDATE_ID`` (the book's current update id), ``$SEQ`` (``seq_from`` + the frame's
        index, for runs). ``{"frame": "<text>", "count": n}`` instead writes that text frame
        as-is to every market-stream connection; ``{"target": "sbe", "hex": "<bytes as hex>",
        "count": n}`` writes that binary frame to every SBE connection
        (:func:`pipeline.sim.sbe_streams.parse_binary_inject`). Returns how many clients got
        each frame.
        """
        sim, hub = self.sim, self.sim.hub
        count = spec.get("count", 1)
        if type(count) is not int or not 1 <= count <= self.MAX_INJECT:
            raise FaultError(f"count must be an integer in 1..{self.MAX_INJECT}")
        if "hex" in spec or spec.get("target") == "sbe":  # binary, into SBE connections
            n = sim.sbe.inject_binary(parse_binary_inject(spec, count), count)
            self.faults.count("inject", count)
            return {"ok": True, "clients": n, "frames": count}
        frame = spec.get("frame")
        if frame is not None:
            if not isinstance(frame, str):
                raise FaultError("frame must be a string")
            conns = [c for c in sim.conns if c.sim_kind == "streams"]
            data = ws_frame(frame.encode())
            for c in conns:
                for _ in range(count):
                    c.sim_write(data)
            self.faults.count("inject", count)
            return {"ok": True, "clients": len(conns), "frames": count}
        stream, payload = spec.get("stream"), spec.get("payload")
        if not isinstance(stream, str) or not isinstance(payload, str):
            raise FaultError("give `stream` and `payload` (strings), or `frame`")
        canon = hub.valid_stream(stream)
        if canon is None or "@" not in canon:
            raise FaultError(f"unknown stream {stream!r}")
        seq_from = spec.get("seq_from", 0)
        if type(seq_from) is not int:
            raise FaultError("seq_from must be an integer")
        sym = canon.split("@", 1)[0].upper()
        known = sym in sim.market.symbols
        tokens = {
            "$NEXT_AGG_ID": str(sim.market.next_agg_id(sym)) if known else "0",
            "$NEXT_TRADE_ID": str(sim.market.next_trade_id(sym)) if known else "0",
            "$LAST_UPDATE_ID": str(sim.market.last_update_id(sym)) if known else "0",
        }
        for k, v in tokens.items():
            payload = payload.replace(k, v)
        hub.stream_b.setdefault(canon, canon.encode())
        for i in range(count):
            hub.publish(canon, payload.replace("$SEQ", str(seq_from + i)).encode())
        hub.flush()
        self.faults.count("inject", count)
        return {"ok": True, "clients": len(hub.subs.get(canon) or ()), "frames": count,
                **{k.lstrip("$").lower(): v for k, v in tokens.items()}}

    def symbol_status(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Set a symbol's status (``POST /sim/symbol_status {"symbol", "status"}``).

        Why: Binance moves symbols to CANCEL_ONLY, BREAK or HALT without notice; a client must
        see it in exchangeInfo and survive the refusals. exchangeInfo reports the new status at
        once; the venue refuses new orders and amends unless TRADING and accepts cancels.
        """
        symbol, status = spec.get("symbol"), spec.get("status")
        if not isinstance(symbol, str) or not isinstance(status, str):
            raise FaultError("give `symbol` and `status` (strings)")
        if symbol not in self.sim.market.symbols:
            raise FaultError(f"unknown symbol {symbol!r}")
        if status not in SYMBOL_STATUSES:
            raise FaultError(f"status must be one of {', '.join(sorted(SYMBOL_STATUSES))}")
        self.sim.market.set_status(symbol, status)
        venue = getattr(self.sim.service, "venue", None)
        if venue is not None:
            venue.set_symbol_status(symbol, status)
        log.info("sim symbol status", extra={"symbol": symbol, "status": status})
        self.faults.count("symbol_status")
        return {"ok": True, "symbol": symbol, "status": status}

    def end_blackhole(self) -> None:
        sim = self.sim
        self.faults.blackhole = False
        self.faults.blackhole_until = None
        if self.blackhole_timer is not None:
            self.blackhole_timer.cancel()
            self.blackhole_timer = None
        for c in list(sim.conns):
            c.sim_unblackhole()



def _query_value(v: str) -> Any:
    """Query-string fault parameters: numbers and true/false/null parse as JSON."""
    try:
        return orjson.loads(v)
    except orjson.JSONDecodeError:
        return v


def _malformed_frames(kind: str, count: int, size: int) -> list[bytes]:
    """Bytes to write for the ``malformed`` fault (each entry is written as-is)."""
    sample = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT","a":1}}'
    if kind == "truncated":  # valid frame, JSON cut short
        one = ws_frame(sample[: len(sample) // 2])
    elif kind == "invalid_json":
        one = ws_frame(b"this is not json {")
    elif kind == "oversized":  # valid JSON, larger than clients' usual 1 MiB max_size
        pad = max(0, size - 16)
        one = ws_frame(b'{"pad":"' + b"x" * pad + b'"}')
    elif kind == "binary":
        one = ws_frame(b"\x00\x01\x02\xffbinary", opcode=0x2)
    elif kind == "bad_utf8":
        one = ws_frame(b'{"s":"\xff\xfe"}')
    elif kind == "torn":  # header promises more bytes than follow: the stream desyncs
        one = struct.pack("!BB", 0x81, 100) + sample[:20]
    else:  # parse_fault validated it
        raise FaultError(kind)
    return [one] * count
