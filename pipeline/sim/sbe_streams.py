"""The simulator's SBE market-data endpoint: what it serves, who may connect, and the fan-out.

Binance serves SBE on its own host with the JSON streams' paths (binance-protocol.md 7.1); the
simulator listens on a second port for it (:class:`pipeline.sim.server.Simulator`). Why a
:class:`~pipeline.sim.streams.StreamHub` subclass: the connection rules are the JSON streams'
(limits, pings, 24 h lifetime, SUBSCRIBE and its replies as JSON text, serverShutdown as JSON
text, backpressure), so they are reused, not copied; only the stream names, the frames
(binary, encoded by :mod:`pipeline.sim.sbe_encode`) and the cadences differ:

- ``<sym>@trade``: one TradesStreamEvent per taker order, its fills as the group (same trade
  ids as the JSON ``@trade`` stream of the same simulator);
- ``<sym>@bestBidAsk``: after every best-level change, with the event time bookTicker lacks;
  the ``sbe_cull`` fault switch keeps only the newest per symbol per loop turn (Binance culls
  stale updates under load: a client must not expect every one);
- ``<sym>@depth``: diff depth every 20 ms, the same update ids as the REST snapshot;
- ``<sym>@depth20``: the top 20 levels every 50 ms.

aggTrade (and any JSON-only stream) is refused, as Binance does for SBE. The replay of a JSON
capture (``--replay``) has no SBE form: only the walk is served.

``POST /sim/inject {"target": "sbe", "hex": "..."}`` writes hand-made binary frames into every
SBE connection (:meth:`SbeHub.inject_binary`), so a client's hostile-frame handling is tested
over the wire, not only in process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
from websockets.http11 import Response

from pipeline.logs import RateLimitedLog
from pipeline.sim import market as mk
from pipeline.sim import sbe_encode as sbe
from pipeline.sim.faults import FaultError
from pipeline.sim.framing import ws_frame
from pipeline.sim.rest import json_response
from pipeline.sim.signatures import MSG_BAD_KEY, MSG_BAD_KEY_FMT
from pipeline.sim.streams import StreamHub

if TYPE_CHECKING:
    from pipeline.sim.faults import Faults
    from pipeline.sim.server import SimConfig

log = logging.getLogger("pipeline.sim")
_rlog = RateLimitedLog(log)

SBE_STREAM_KINDS = ("trade", "bestBidAsk", "depth", "depth20")
DEPTH_DIFF_MS = 20  # <sym>@depth over SBE (since 2026-08-04)
DEPTH20_MS = 50  # <sym>@depth20 over SBE
DEPTH20_LEVELS = 20
_OPCODE_BINARY = 0x2
_MAX_KEY_LEN = 128
#: most bytes one binary inject request may queue (frame size x count): a test's hostile frame
#: is small; the bound keeps a typo from queueing gigabytes in the simulator
MAX_INJECT_BYTES = 16 << 20


class InjectError(FaultError):
    """A binary inject request that cannot be carried out (the admin API answers 400)."""


def parse_binary_inject(spec: dict[str, Any], count: int) -> bytes:
    """The frame bytes of ``{"target": "sbe", "hex": "<frame as hex>"}``; raises InjectError.

    Why hex: the admin API speaks JSON, and a hostile frame is a few dozen bytes a test
    builds with struct; hex keeps it readable in a log line. No other keys: a typo bites.
    """
    extra = set(spec) - {"target", "hex", "count"}
    if extra:
        raise InjectError(f"a binary inject takes target, hex and count, not {sorted(extra)}")
    if spec.get("target") != "sbe":
        raise InjectError("binary frames (hex) go to SBE connections only: give target sbe")
    text = spec.get("hex")
    if not isinstance(text, str):
        raise InjectError("give `hex`: the frame's bytes as a hex string")
    try:
        data = bytes.fromhex(text)
    except ValueError as exc:
        raise InjectError(f"hex is not hexadecimal: {exc}") from None
    if len(data) * count > MAX_INJECT_BYTES:
        raise InjectError(f"frame bytes x count above {MAX_INJECT_BYTES}")
    return data


def parse_sbe_stream(name: str, symbols: Collection[str]) -> str | None:
    """Canonical SBE stream name if served for these (lowercase) symbols, else None."""
    sym, sep, kind = name.partition("@")
    if not sep or sym not in symbols or kind not in SBE_STREAM_KINDS:
        return None
    return name


def check_api_key(headers: Headers, registered: Collection[str]) -> Response | None:
    """None if ``X-MBX-APIKEY`` names a registered (Ed25519) key, else the 401 refusal.

    The simulator registers Ed25519 keys only (``--api-key NAME=PEM``), so a registered name is
    an Ed25519 key. The exact refusal of the SBE host is UNCONFIRMED; we answer as Binance's
    REST does for a key it does not accept: 401 with -2014 (missing or malformed key) or
    -2015 (unknown key), JSON body. The key itself is never logged.
    """
    key = headers.get("X-MBX-APIKEY", "").strip()
    if not key or len(key) > _MAX_KEY_LEN or not key.isascii():
        return json_response(401, {"code": -2014, "msg": MSG_BAD_KEY_FMT})
    if key not in registered:
        return json_response(401, {"code": -2015, "msg": MSG_BAD_KEY})
    return None


class SbeHub(StreamHub):
    """Subscriptions and binary fan-out of the SBE endpoint (one per simulator).

    The JSON hub forwards the walk's events here (:meth:`StreamHub.dispatch`); the depth
    streams run on this hub's own 20 ms / 50 ms ticks (:meth:`run`).
    """

    def __init__(
        self,
        config: SimConfig,
        market: mk.Market,
        faults: Faults,
        stats: dict[str, int],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        now_ms: Callable[[], int],
    ) -> None:
        super().__init__(config, market, faults, stats, spawn)
        self.now_ms = now_ms
        self.exps = {s: sbe.exponents(market.rules(s)) for s in market.symbols}
        market.add_depth_speed(DEPTH_DIFF_MS)
        stats.setdefault("sbe_connections_total", 0)
        stats.setdefault("sbe_frames", 0)
        stats.setdefault("sbe_encode_errors", 0)

    def valid_stream(self, name: str) -> str | None:
        return parse_sbe_stream(name, self.symbols_lower)

    # ---- fan-out ----

    def publish_frame(self, stream: str, message: bytes) -> None:
        """One encoded SBE message to every subscriber of ``stream``, as a binary frame (the
        same bytes for raw and combined connections: the message carries its symbol)."""
        subs = self.subs.get(stream)
        if not subs:
            return
        frame = ws_frame(message, _OPCODE_BINARY)
        for c in subs:
            c.pending.append(frame)
            c.pending_frames += 1
            self.dirty.add(c)
        self.stats["sbe_frames"] += 1

    def inject_binary(self, data: bytes, count: int) -> int:
        """``count`` binary frames of ``data`` to every SBE connection now, after what each
        was already owed (through the pending buffers, so the order on the wire is the order
        of events). Returns how many connections got them."""
        frame = ws_frame(data, _OPCODE_BINARY)
        clients = [c for c in self.clients if c.conn.sim_can_write()]
        for c in clients:
            c.pending.extend([frame] * count)
            c.pending_frames += count
            self.dirty.add(c)
        self.flush()
        return len(clients)

    def _encode_failed(self, what: str, exc: Exception) -> None:
        self.stats["sbe_encode_errors"] += 1
        _rlog.warning("sim_sbe_encode", "SBE event not encodable; skipped", event=what,
                      error=str(exc))

    def _trades(self, symbol: str, time_ms: int,
                trades: list[tuple[int, int, int, bool]]) -> None:
        stream = symbol.lower() + "@trade"
        if not trades or stream not in self.subs:
            return
        pe, qe = self.exps[symbol]
        try:
            msg = sbe.encode_trades(symbol, time_ms * 1000, time_ms * 1000, trades, pe, qe)
        except sbe.SbeEncodeError as exc:
            self._encode_failed("trade", exc)
            return
        self.publish_frame(stream, msg)

    def _best(self, symbol: str, time_ms: int, u: int, best: tuple[int, int, int, int]) -> None:
        pe, qe = self.exps[symbol]
        try:
            msg = sbe.encode_best_bid_ask(symbol, time_ms * 1000, u, best, pe, qe)
        except sbe.SbeEncodeError as exc:
            self._encode_failed("bestBidAsk", exc)
            return
        self.publish_frame(symbol.lower() + "@bestBidAsk", msg)

    def dispatch(self, events: list[mk.Event | mk.TakerBatch]) -> None:
        """The walk's events since the last turn -> trade and bestBidAsk messages.

        Trades group per taker order: consecutive prints of one symbol at one instant up to
        the bookTicker that follows the taker (a TakerBatch says which taker made which
        fills). With ``sbe_cull`` on, only the newest bestBidAsk per symbol of this turn goes
        out; the skipped ones are counted (``fired["sbe_cull"]``).
        """
        cull = self.faults.sbe_cull
        newest: dict[str, tuple[int, int, tuple[int, int, int, int]]] = {}
        culled = 0
        group: list[tuple[int, int, int, bool]] = []
        g_sym, g_time = "", 0
        now = self.now_ms()

        def best(sym: str, tm: int, u: int, bbo: tuple[int, int, int, int]) -> None:
            nonlocal culled
            if sym.lower() + "@bestBidAsk" not in self.subs:
                return
            if cull:
                culled += sym in newest
                newest[sym] = (tm, u, bbo)
            else:
                self._best(sym, tm, u, bbo)

        for ev in events:
            if isinstance(ev, mk.Trade):
                if group and (ev.symbol != g_sym or ev.time != g_time):
                    self._trades(g_sym, g_time, group)
                    group = []
                g_sym, g_time = ev.symbol, ev.time
                group.append((ev.t, ev.price, ev.qty, ev.buyer_maker))
                continue
            if isinstance(ev, mk.AggTrade):
                continue  # its trades are already in the group
            if group:
                self._trades(g_sym, g_time, group)
                group = []
            if isinstance(ev, mk.TakerBatch):
                self._batch(ev, best)
            else:  # BookTicker
                best(ev.symbol, now, ev.u, (ev.bid_px, ev.bid_qty, ev.ask_px, ev.ask_qty))
        if group:
            self._trades(g_sym, g_time, group)
        for sym, (tm, u, bbo) in newest.items():
            self._best(sym, tm, u, bbo)
        if culled:
            self.faults.count("sbe_cull", culled)

    def _batch(
        self, b: mk.TakerBatch, best: Callable[[str, int, int, tuple[int, int, int, int]], None]
    ) -> None:
        """A TakerBatch: one trade event per taker order, then that taker's bestBidAsk."""
        sym, tm, t0 = b.symbol, b.time, b.t0
        want_trades = sym.lower() + "@trade" in self.subs
        want_best = sym.lower() + "@bestBidAsk" in self.subs
        if not (want_trades or want_best):
            return
        tp, tq, tb = b.t_price.tolist(), b.t_qty.tolist(), b.t_bm.tolist()
        af, al, ak = b.a_f.tolist(), b.a_l.tolist(), b.a_taker.tolist()
        bu, bbp, bbq, bap, baq = (
            x.tolist() for x in (b.bt_u, b.bt_bp, b.bt_bq, b.bt_ap, b.bt_aq)
        )
        i, n_aggs = 0, len(af)
        for k in range(len(bu)):
            lo = hi = -1
            while i < n_aggs and ak[i] == k:
                if lo < 0:
                    lo = af[i]
                hi = al[i]
                i += 1
            if want_trades and lo >= 0:
                self._trades(sym, tm, [
                    (t, tp[t - t0], tq[t - t0], tb[t - t0]) for t in range(lo, hi + 1)
                ])
            if want_best:
                best(sym, tm, bu[k], (bbp[k], bbq[k], bap[k], baq[k]))

    # ---- the depth streams' own clock ----

    def depth_diff_tick(self, now_ms: int) -> None:
        """Every 20 ms: each symbol's diff since the last tick (``U`` = previous ``u`` + 1)."""
        for sym in self.market.symbols:
            diff = self.market.flush_depth(sym, DEPTH_DIFF_MS, now_ms)
            stream = sym.lower() + "@depth"
            if diff is None or stream not in self.subs:
                continue
            pe, qe = self.exps[sym]
            try:
                msg = sbe.encode_depth_diff(sym, now_ms * 1000, diff.U, diff.u, diff.bids,
                                            diff.asks, pe, qe)
            except sbe.SbeEncodeError as exc:
                self._encode_failed("depth", exc)
                continue
            self.publish_frame(stream, msg)

    def depth20_tick(self, now_ms: int) -> None:
        """Every 50 ms: the top 20 levels of each subscribed symbol."""
        for sym in self.market.symbols:
            stream = sym.lower() + "@depth20"
            if stream not in self.subs:
                continue
            uid, bids, asks = self.market.top(sym, DEPTH20_LEVELS)
            pe, qe = self.exps[sym]
            try:
                msg = sbe.encode_depth_snapshot(sym, now_ms * 1000, uid, bids, asks, pe, qe)
            except sbe.SbeEncodeError as exc:
                self._encode_failed("depth20", exc)
                continue
            self.publish_frame(stream, msg)

    async def run(self) -> None:
        """The 20 ms / 50 ms ticks until cancelled. Paused by the ``stall`` fault (the diff
        then covers the whole stall: no update id is lost)."""
        loop = asyncio.get_running_loop()
        step = DEPTH_DIFF_MS / 1000
        next_diff = next_top = loop.time()
        while True:
            now = loop.time()
            if not self.faults.stall:
                now_ms = self.now_ms()
                if now >= next_diff:
                    self.depth_diff_tick(now_ms)
                    next_diff = max(next_diff + step, now)
                if now >= next_top:
                    self.depth20_tick(now_ms)
                    next_top = max(next_top + DEPTH20_MS / 1000, now)
                self.flush()
            await asyncio.sleep(max(0.0, min(next_diff, next_top) - loop.time()) or step / 4)


__all__ = [
    "DEPTH20_MS",
    "DEPTH_DIFF_MS",
    "MAX_INJECT_BYTES",
    "SBE_STREAM_KINDS",
    "InjectError",
    "SbeHub",
    "check_api_key",
    "parse_binary_inject",
    "parse_sbe_stream",
]
