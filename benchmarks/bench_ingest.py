"""Ingest benchmarks, side by side in one run (``make bench``; smoke: ``BENCH_SCALE=0.05``).

1. In-process, per aggTrade frame: decode only, and decode + id tracking + ring publish (the
   frame handler, i.e. socket-to-ring minus the socket), for msgspec, orjson and the compiled
   path, every record visible once its frame is handled (since issue 14 nothing waits for the
   end of an event-loop iteration), and the transport floor: picows delivering the blaster's
   frames (see 3) to a handler that does nothing (framing + the Python callback layer).
2. The real process at saturation: ``pipeline sim --rate max`` feeding ``pipeline ingest``
   (aggTrade streams, 2 symbols) for each transport x decoder. Reported: messages/s received and
   published, and CPU microseconds per message of the ingest process (psutil user+sys time over
   the measurement window / messages received in it). The ring is drained here and checked
   (every aggregate id once, in order) after the timed window.
3. The same process fed by a "blaster" (a bare websocket server writing pre-built aggTrade frames
   in large batches, in a child process): the simulator is pure Python and saturates before
   ingest does, so this is the variant where ingest itself is the bottleneck and many frames
   arrive per socket read (``cpu util`` close to 1.0).

4. SBE vs JSON in process (issue 18): the same events (trade x1 and x5 per event, bestBidAsk /
   bookTicker, diff depth 10x10 and 100x100) through each connection's frame handler into a
   real ring: JSON through ``on_frame`` with and without the compiled JSON path, SBE through
   ``on_sbe_frame`` as the live connection does: ``--fast-path on`` takes trade and bestBidAsk
   frames straight into the ring in C and decodes the rest with the compiled SBE decoder,
   ``off`` is the pure-Python reference decoder (named in the table). CPU us per event and
   bytes per event both ways.
5. SBE vs JSON in the real process: two ingest processes on one simulator (same walk, same
   book), JSON ``trade,bookTicker,depth@100ms`` vs SBE ``trade,bestBidAsk,depth`` (20 ms
   diffs): CPU per frame, per record and utilisation, and the book's freshness from each ring
   (interval between book publications, staleness, lag behind the ticker:
   benchmarks/book_latency.py defines them).

Target from the issue: <= 2 us of ingest-process CPU per aggTrade frame, socket to ring.
The summary tables are handed to the end-of-run summary by the module's report fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psutil
import pytest
from summary import emit

from pipeline.binance import streams as st
from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.records import TICK_DTYPE, Kind
from pipeline.ipc.ring import RingReader, RingWriter
from pipeline.sim.testing import stop_process

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
RESULTS: dict[str, dict[str, float]] = {}


def agg_frames(n: int, first_id: int = 1_000_000) -> list[bytes]:
    """Real-shaped combined aggTrade frames (field order and widths as captured live)."""
    return [
        b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1768627409826,"s":"BTCUSDT",'
        b'"a":%d,"p":"95311.64000000","q":"0.00084000","f":5782154285,"l":5782154285,'
        b'"T":1768627409825,"m":false,"M":true}}' % (first_id + i)
        for i in range(n)
    ]


def cpu_us_per_call(fn: Callable[[], None], calls_per_run: int, runs: int) -> float:
    """CPU us per call: the best run (the machine is shared; the minimum is the stable one)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / calls_per_run * 1e6


@pytest.mark.parametrize("decoder", ["msgspec", "orjson"])
def test_decode_agg_trade(benchmark: Any, decoder: str) -> None:
    frames = agg_frames(1000)
    dec = st.make_decoder(decoder, SYMBOLS)
    out: list[Any] = []

    def run() -> None:
        out.clear()
        d = dec.decode
        for f in frames:
            out.append(d(f, 1))

    benchmark(run)
    assert [t for t, _ in out] == [st.AGG] * len(frames)
    assert [v[11] for _, v in out] == list(range(1_000_000, 1_001_000))
    RESULTS.setdefault(f"in-process decode ({decoder})", {})["cpu_us_per_msg"] = \
        cpu_us_per_call(run, len(frames), max(1, int(50 * SCALE)))


class _FakeConn:
    last_ns = 0
    first_pending = False


def _handler_to_ring(benchmark: Any, tag: str, cfg: Any,
                     frames_for: Callable[[int, int], list[bytes]], *, entry: str = "on_frame",
                     n: int = 1000, ids_per_frame: int = 1, records_per_frame: int = 1,
                     prepare: Callable[[Any], None] | None = None) -> tuple[float, Any]:
    """Frames through an ingest entry point into a real ring, all frames of a run in one uvloop
    loop iteration (as when one socket read carries many frames; the end-of-iteration commit
    runs after them). ``entry``: ``on_frame`` (what the transport calls for a JSON connection)
    or ``on_sbe_frame`` (an SBE connection's). ``frames_for(n, first_id)`` makes ``n`` frames
    that use ``ids_per_frame`` ids each from ``first_id``; ``prepare(ing)`` runs once before
    (e.g. anchors a book). Returns the best CPU us per frame and the (released) ingest; checks
    every frame published ``records_per_frame`` records and none was skipped."""
    import uvloop

    from pipeline.marketdata.ingest import Ingest

    w = RingWriter.create(f"bench_{tag}_{os.getpid()}", TICK_DTYPE, 1 << 16, symbols=SYMBOLS)
    loop = uvloop.new_event_loop()
    ing = None
    try:
        ing = Ingest(cfg, w, None)
        ing.setup_publishing(loop)
        if prepare is not None:
            prepare(ing)
        state: dict[str, float] = {"next": 1_000_000}

        async def one() -> None:
            frames = frames_for(n, int(state["next"]))
            state["next"] += n * ids_per_frame
            h = getattr(ing, entry)
            conn = _FakeConn()
            t0 = time.process_time()
            for f in frames:
                h(conn, f, 1)
            state["best"] = min(state.get("best", 1e9), time.process_time() - t0)

        def run() -> None:
            loop.run_until_complete(one())

        benchmark(run)
        state["best"] = 1e9
        before = w.cursor
        runs = max(1, int(50 * SCALE))
        for _ in range(runs):
            run()
        assert w.cursor - before == runs * n * records_per_frame  # every frame published once
        assert w.staged == 0
        assert sum(ing.skipped.values()) == 0, ing.skipped
        assert ing.c["callback_errors"] == 0
        if cfg.streams == ["aggTrade"]:
            assert ing.last_agg_id(0) == state["next"] - 1
            assert not ing.trackers[0].pending
        return state["best"] / n * 1e6, ing
    finally:
        if ing is not None:
            ing.release()
        loop.close()
        w.close()


@pytest.mark.parametrize(("decoder", "fast"), [("msgspec", "off"), ("orjson", "off"),
                                               ("msgspec", "on")])
def test_frame_handler_to_ring(benchmark: Any, decoder: str, fast: str) -> None:
    """Decode + exactly-once tracking + ring publish, as the live handler runs it: every record
    visible once its frame is handled (issue 14). ``fast`` on: the compiled path takes the
    frames (the transport calls it directly).
    """
    from pipeline.marketdata.ingest import IngestConfig

    cfg = IngestConfig(decoder=decoder, symbols=SYMBOLS, streams=["aggTrade"], fast_path=fast)
    us, _ = _handler_to_ring(benchmark, f"agg_{decoder}_{fast}", cfg, agg_frames)
    path = "C fast path" if fast == "on" else decoder
    RESULTS.setdefault(f"in-process handler->ring ({path})", {})["cpu_us_per_msg"] = us


def book_frames(n: int, first_u: int) -> list[bytes]:
    """Real-shaped combined bookTicker frames (as captured live)."""
    return [
        b'{"stream":"ethusdt@bookTicker","data":{"u":%d,"s":"ETHUSDT","b":"3311.64000000",'
        b'"B":"12.08400000","a":"3311.65000000","A":"0.31990000"}}' % (first_u + i)
        for i in range(n)
    ]


@pytest.mark.parametrize("fast", ["off", "on"])
def test_book_ticker_handler_to_ring(benchmark: Any, fast: str) -> None:
    """bookTicker frames through the live handler into the ring: msgspec + Python
    dedupe vs the compiled path."""
    from pipeline.marketdata.ingest import IngestConfig

    cfg = IngestConfig(symbols=SYMBOLS, streams=["bookTicker"], fast_path=fast)
    us, _ = _handler_to_ring(benchmark, f"book_{fast}", cfg, book_frames)
    path = "C fast path" if fast == "on" else "msgspec"
    RESULTS.setdefault(f"in-process bookTicker handler->ring ({path})", {})[
        "cpu_us_per_msg"] = us


def depth_sides(i: int, width: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The ``i``-th diff's (bids, asks) in 1e-8 units: ``width`` levels a side, prices moving
    around a 60,000 / 60,001 book (one source for the JSON and the SBE frames of one event)."""
    bids = [(6_000_000_000_000 - ((i + k) % 200) * 1_000_000, 50_000_000 + k * 100_000)
            for k in range(width)]
    asks = [(6_000_100_000_000 + ((i + k) % 200) * 1_000_000, 50_000_000 + k * 100_000)
            for k in range(width)]
    return bids, asks


def depth_frames(n: int, first_u: int, width: int) -> list[bytes]:
    """Diff-depth frames (``@depth@100ms``) of ``width`` bid and ``width`` ask levels each,
    contiguous update ids from ``first_u``; prices and quantities with Binance's 8 decimals
    (``"60000.00000000"``, as the live stream and the simulator send them)."""
    from pipeline.sim.units import fmt_units

    out = []
    u = first_u
    for i in range(n):
        bids, asks = depth_sides(i, width)
        b = ",".join(f'["{fmt_units(p)}","{fmt_units(q)}"]' for p, q in bids).encode()
        a = ",".join(f'["{fmt_units(p)}","{fmt_units(q)}"]' for p, q in asks).encode()
        out.append(b'{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1768627409826,'
                   b'"s":"BTCUSDT","U":%d,"u":%d,"b":[%s],"a":[%s]}}'
                   % (u, u + 2 * width - 1, b, a))
        u += 2 * width
    return out


@pytest.mark.parametrize("width", [10, 100])
def test_depth_handler_to_ring(benchmark: Any, width: int) -> None:
    """Diff-depth frames (``width`` x ``width`` levels) through the live handler into a synced
    1,000-level book and the ring (the book's top published per diff, a frame's records
    committed together): the Python path, the default ``@depth@100ms`` stream of issue 15."""
    from pipeline.marketdata.ingest import IngestConfig

    cfg = IngestConfig(symbols=SYMBOLS, streams=["depth@100ms"])
    us, ing = _handler_to_ring(benchmark, f"depth{width}", cfg,
                               lambda n, u: depth_frames(n, u, width), n=200,
                               ids_per_frame=2 * width, prepare=_anchor_book)
    assert ing.depth.books[0].synced  # every diff applied in order: one DEPTH_TOP each
    RESULTS.setdefault(f"in-process depth {width}x{width} handler->ring (msgspec)", {})[
        "cpu_us_per_msg"] = us
    benchmark.extra_info["cpu_us_per_frame"] = us


def _anchor_book(ing: Any) -> None:
    """A synced 1,000-level BTCUSDT book below the depth frames' first update id (no REST)."""
    book = ing.depth.books[0]
    book.on_diff(999_000, 999_000, [], [])  # anchors the snapshot
    book.on_snapshot(999_999, [(60000.0 - k * 0.01, 1.0) for k in range(1000)],
                     [(60001.0 + k * 0.01, 1.0) for k in range(1000)])
    assert book.synced


# --- SBE vs JSON in process: the same events through each connection's frame handler ---------

EV_MS, TX_MS = 1768627409826, 1768627409825  # event / transaction time of the made-up events
TRADE_PX, TRADE_QTY = 9_531_164_000_000, 84_000  # 95311.64, 0.00084 in 1e-8 units
#: ETHUSDT best bid/ask of book_frames in 1e-8 units: 3311.64 x 12.084 / 3311.65 x 0.3199
BOOK_BBO = (331_164_000_000, 1_208_400_000, 331_165_000_000, 31_990_000)
SBE_EXP = -8  # price and quantity exponent of the made-up SBE frames (Binance's 8 decimals)


def trade_frames(n: int, first_id: int) -> list[bytes]:
    """Real-shaped combined ``@trade`` frames, one trade each, ids contiguous from
    ``first_id``."""
    return [
        b'{"stream":"btcusdt@trade","data":{"e":"trade","E":%d,"s":"BTCUSDT","t":%d,'
        b'"p":"95311.64000000","q":"0.00084000","T":%d,"m":false,"M":true}}'
        % (EV_MS, first_id + i, TX_MS)
        for i in range(n)
    ]


def sbe_trade_frames(per_event: int) -> Callable[[int, int], list[bytes]]:
    """SBE TradesStreamEvent frames of ``per_event`` trades each (the trades of
    :func:`trade_frames`), built by the simulator's encoder (no code shared with the
    decoder)."""
    from pipeline.sim.sbe_encode import encode_trades

    def make(n: int, first_id: int) -> list[bytes]:
        return [encode_trades("BTCUSDT", EV_MS * 1000, TX_MS * 1000,
                              [(first_id + i * per_event + k, TRADE_PX, TRADE_QTY, False)
                               for k in range(per_event)], SBE_EXP, SBE_EXP)
                for i in range(n)]

    return make


def sbe_book_frames(n: int, first_u: int) -> list[bytes]:
    """SBE BestBidAskStreamEvent frames of :func:`book_frames`' quotes (plus the event time
    bookTicker lacks)."""
    from pipeline.sim.sbe_encode import encode_best_bid_ask

    return [encode_best_bid_ask("ETHUSDT", EV_MS * 1000, first_u + i, BOOK_BBO, SBE_EXP, SBE_EXP)
            for i in range(n)]


def sbe_depth_frames(n: int, first_u: int, width: int) -> list[bytes]:
    """SBE DepthDiffStreamEvent frames of :func:`depth_frames`' diffs."""
    from pipeline.sim.sbe_encode import encode_depth_diff

    out = []
    u = first_u
    for i in range(n):
        bids, asks = depth_sides(i, width)
        out.append(encode_depth_diff("BTCUSDT", EV_MS * 1000, u, u + 2 * width - 1, bids, asks,
                                     SBE_EXP, SBE_EXP))
        u += 2 * width
    return out


class _Pair:
    """One kind of market event in both encodings: the JSON stream kind and frames, the SBE
    ones, and what a frame uses (ids) and makes (records)."""

    def __init__(self, json_stream: str, sbe_stream: str,
                 json_frames: Callable[[int, int], list[bytes]],
                 sbe_frames: Callable[[int, int], list[bytes]], *, json_per_event: int = 1,
                 ids_per_event: int = 1, json_ids_per_frame: int = 1, n: int = 1000,
                 depth: bool = False) -> None:
        self.json_stream, self.sbe_stream = json_stream, sbe_stream
        self.json_frames, self.sbe_frames = json_frames, sbe_frames
        self.json_per_event = json_per_event  # JSON frames that carry one SBE event
        self.ids_per_event = ids_per_event  # trade / update ids one event uses
        self.json_ids_per_frame = json_ids_per_frame
        self.n = n  # frames per timed run
        self.depth = depth


PAIRS: dict[str, _Pair] = {
    "trade x1": _Pair("trade", "trade", trade_frames, sbe_trade_frames(1)),
    # 5 trades of one taker: SBE sends one event, JSON 5 @trade frames (the JSON cost per frame
    # is trade x1's: the same frames; its per-event cost is 5 of them)
    "trade x5": _Pair("trade", "trade", trade_frames, sbe_trade_frames(5), json_per_event=5,
                      ids_per_event=5),
    "bestBidAsk / bookTicker": _Pair("bookTicker", "bestBidAsk", book_frames, sbe_book_frames),
    "depth diff 10x10": _Pair("depth@100ms", "depth", lambda n, u: depth_frames(n, u, 10),
                              lambda n, u: sbe_depth_frames(n, u, 10), ids_per_event=20,
                              json_ids_per_frame=20, n=200, depth=True),
    "depth diff 100x100": _Pair("depth@100ms", "depth", lambda n, u: depth_frames(n, u, 100),
                                lambda n, u: sbe_depth_frames(n, u, 100), ids_per_event=200,
                                json_ids_per_frame=200, n=200, depth=True),
}
#: in-process SBE vs JSON rows: event -> column -> value (CPU us per event, bytes per event)
SBE_ROWS: dict[str, dict[str, float]] = {}
#: which SBE decoder the ingest picked for each --fast-path mode (read from the ingest)
SBE_DECODERS: dict[str, str] = {}


def sbe_decoder_in_use(ing: Any) -> str:
    """The SBE decoder this ingest built (its ``_decode_sbe`` is the decoder's bound
    ``decode``): the rows measure whatever the ingest picks (the pure-Python reference, or the
    compiled twin once the factory chooses it), and say which."""
    fn = ing._decode_sbe
    owner = getattr(fn, "__self__", fn)
    return f"{type(owner).__module__}.{type(owner).__name__}"


@pytest.mark.parametrize(("event", "encoding", "fast"), [
    (event, enc, fast) for event, pair in PAIRS.items() for enc in ("json", "sbe")
    for fast in ("off", "on")
    if enc == "sbe" or pair.json_per_event == 1  # JSON trade x5 is 5 of trade x1's frames
])
def test_sbe_vs_json_handler_to_ring(benchmark: Any, event: str, encoding: str,
                                     fast: str) -> None:
    """The same market events through the ingest's frame handler into a real ring: JSON frames
    through ``on_frame`` (``fast`` on: the compiled JSON path takes trade and bookTicker; depth
    falls back to Python through it, as in the live process) vs SBE frames through
    ``on_sbe_frame`` (``fast`` on: the compiled SBE path takes trade and bestBidAsk, the
    compiled decoder the rest; the decoder is read from the ingest). Depth: diffs applied to a
    synced 1,000-level book, its top published. Reported per event (JSON trade x5 = 5 frames)
    with the bytes per event (the combined stream's JSON text vs the SBE message, WebSocket
    frame header excluded)."""
    from pipeline.marketdata.ingest import IngestConfig

    pair = PAIRS[event]
    prepare = _anchor_book if pair.depth else None
    if encoding == "json":
        cfg = IngestConfig(symbols=SYMBOLS, streams=[pair.json_stream], fast_path=fast)
        us, ing = _handler_to_ring(benchmark, f"js{fast}", cfg, pair.json_frames, n=pair.n,
                                   ids_per_frame=pair.json_ids_per_frame, prepare=prepare)
        path = "C fast path" if fast == "on" else cfg.decoder
    else:
        cfg = IngestConfig(symbols=SYMBOLS, streams=[], sbe_streams=[pair.sbe_stream],
                           sbe_api_key_env="BENCH_SBE_KEY_UNUSED", fast_path=fast)
        us, ing = _handler_to_ring(benchmark, f"sb{fast}", cfg, pair.sbe_frames,
                                   entry="on_sbe_frame", n=pair.n,
                                   ids_per_frame=pair.ids_per_event,
                                   records_per_frame=1 if pair.depth else pair.ids_per_event,
                                   prepare=prepare)
        path = SBE_DECODERS[fast] = sbe_decoder_in_use(ing)
        if fast == "on" and not pair.depth:
            path = "C frame -> ring (" + path + " decoder for the rest)"
    row = SBE_ROWS.setdefault(event, {})
    row[f"{encoding}_{fast}_us"] = us  # one frame is one event (JSON x5: see the report)
    json_frames, sbe_frames = pair.json_frames(pair.json_per_event, 1), pair.sbe_frames(1, 1)
    row["json_bytes"] = sum(map(len, json_frames))
    row["sbe_bytes"] = len(sbe_frames[0])
    benchmark.extra_info.update(cpu_us_per_frame=us, path=path, fast_path=fast,
                                json_bytes_per_event=row["json_bytes"],
                                sbe_bytes_per_event=row["sbe_bytes"])


def _sbe_vs_json_table() -> str:
    """The in-process SBE vs JSON rows, side by side (CPU us per event)."""
    nan = float("nan")
    lines = ["", "SBE vs JSON, in process: frame handler -> ring (CPU us per event; JSON trade "
             "x5 = 5 trade frames; bytes per event without the WebSocket header)",
             f"{'event':26} {'json py':>8} {'json C':>8} {'sbe off':>8} {'sbe on':>8} "
             f"{'json B':>7} {'sbe B':>6} {'json/sbe B':>10}"]
    for name, r in SBE_ROWS.items():
        per = PAIRS[name].json_per_event
        src = SBE_ROWS.get("trade x1", {}) if per > 1 else r
        lines.append(f"{name:26} {src.get('json_off_us', nan) * per:>8.2f} "
                     f"{src.get('json_on_us', nan) * per:>8.2f} {r.get('sbe_off_us', nan):>8.2f} "
                     f"{r.get('sbe_on_us', nan):>8.2f} {r['json_bytes']:>7.0f} "
                     f"{r['sbe_bytes']:>6.0f} {r['json_bytes'] / r['sbe_bytes']:>10.2f}")
    for fast, dec in SBE_DECODERS.items():
        lines.append(f"  sbe {fast}: --fast-path {fast}, SBE decoder {dec}")
    lines.append("  json py: msgspec + Python handler (--fast-path off); json C: the compiled "
                 "JSON path (depth falls back to Python through it)")
    return "\n".join(lines)


def test_transport_floor_picows(benchmark: Any) -> None:
    """picows -> a no-op handler, in this process, fed by the blaster: what the socket, the
    framing and the per-frame Python callback cost before ingest does anything."""
    import asyncio

    import uvloop

    from pipeline.net import ws as wsmod

    window = max(1.0, 3.0 * SCALE)
    n = [0]
    res: dict[str, float] = {}

    async def run(url: str) -> None:
        flowing = asyncio.Event()

        def on_message(_payload: bytes, _t: int) -> None:
            n[0] += 1
            if n[0] == 1000:
                flowing.set()

        c = await wsmod.connect(url + "/stream?streams=x", on_message, transport="picows",
                                ping_interval=0)
        try:
            await asyncio.wait_for(flowing.wait(), 15)
            n0, c0, t0 = n[0], time.process_time(), time.monotonic()
            await asyncio.sleep(window)
            n1, c1, t1 = n[0], time.process_time(), time.monotonic()
            res["msgs_per_s"] = (n1 - n0) / (t1 - t0)
            res["cpu_us_per_msg"] = (c1 - c0) / max(n1 - n0, 1) * 1e6
            res["cpu_util"] = (c1 - c0) / (t1 - t0)
        finally:
            await c.close(grace_s=0.2)

    with blaster() as url:
        benchmark.pedantic(lambda: uvloop.run(run(url)), rounds=1, iterations=1)
    assert res["msgs_per_s"] > 0
    RESULTS["in-process transport floor (picows, no-op handler)"] = res


def _blaster_main(port_out: Any, batch: int) -> None:
    """Child process: a minimal websocket server that writes aggTrade frames for both symbols,
    ``batch`` frames per write, as fast as the client reads (contiguous ids per symbol)."""
    import asyncio
    import base64
    import contextlib
    import hashlib

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"sec-websocket-key:"):
                key = line.split(b":", 1)[1].strip()
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")

        async def discard() -> None:  # read (and ignore) whatever the client sends
            with contextlib.suppress(ConnectionError, OSError):
                while await reader.read(65536):
                    pass

        asyncio.get_running_loop().create_task(discard())
        ids = [1_000_000, 2_000_000]
        tmpl = [b'{"stream":"' + s.lower().encode() + b'@aggTrade","data":{"e":"aggTrade",'
                b'"E":1768627409826,"s":"' + s.encode() + b'","a":%d,"p":"95311.64000000",'
                b'"q":"0.00084000","f":5782154285,"l":5782154285,"T":1768627409825,'
                b'"m":false,"M":true}}' for s in SYMBOLS]
        try:
            while True:
                out = bytearray()
                for k in range(batch):
                    sid = k & 1
                    payload = tmpl[sid] % ids[sid]
                    ids[sid] += 1
                    out += b"\x81" + bytes((126,)) + len(payload).to_bytes(2, "big") + payload
                writer.write(out)
                await writer.drain()
        except (ConnectionError, OSError):
            return

    async def main() -> None:
        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        port_out.send(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


@contextmanager
def blaster(batch: int = 256) -> Iterator[str]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_blaster_main, args=(child, batch), daemon=True)
    proc.start()
    try:
        assert parent.poll(15), "blaster did not start"
        yield f"ws://127.0.0.1:{parent.recv()}"
    finally:
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextmanager
def feed(source: str) -> Iterator[tuple[str, str]]:
    """(streams_url, rest_url) of the chosen data source."""
    if source == "blaster":
        with blaster() as url:
            yield url, "http://127.0.0.1:9"  # never called: ids are contiguous
    else:
        from pipeline.sim.testing import run_sim_process

        with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "max") as sim:
            yield sim.streams_url, sim.rest_url


@contextmanager
def ingest_process(tag: str, streams_url: str, rest_url: str, args: tuple[str, ...],
                   env: dict[str, str] | None = None) -> Iterator[tuple[Any, Any, Any]]:
    """A ``pipeline ingest`` child on ``SYMBOLS`` (``args``: its streams and the rest), with
    its ring attached for reading and its metrics block; stopped (and its segments removed if
    it had to be killed) on exit."""
    ring, met = f"bench_{os.getpid()}_{tag}_r", f"bench_{os.getpid()}_{tag}_m"
    cmd = [sys.executable, "-m", "pipeline", "--log-format", "text", "--log-level",
           "WARNING", "ingest", "--streams-url", streams_url, "--rest-url",
           rest_url, "--symbols", ",".join(SYMBOLS), "--ring", ring, "--metrics", met,
           "--ring-capacity", str(1 << 20), "--stall-timeout", "5",
           "--metrics-interval", "0.02", *args]
    proc = subprocess.Popen(cmd, env=env)
    reader = block = None
    try:
        deadline = time.monotonic() + 15
        while reader is None or block is None:
            try:
                reader = reader or RingReader.attach(ring, name="bench", start="oldest")
                block = block or MetricsBlock.attach(met)
            except FileNotFoundError:
                assert proc.poll() is None, "ingest exited"
                assert time.monotonic() < deadline, "ingest did not start"
                time.sleep(0.05)
        yield proc, reader, block
    finally:
        if stop_process(proc, 20) == -signal.SIGKILL:
            for name in (ring, met):  # a killed ingest cannot unlink its segments
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{name}")
        if reader is not None:
            reader.close()
        if block is not None:
            block.close()


@contextmanager
def sim_and_ingest(transport: str, decoder: str, tag: str, source: str = "sim",
                   extra: tuple[str, ...] = ()) -> Iterator[tuple[Any, Any, Any]]:
    """The saturation rows' data source and an aggTrade ingest on it."""
    with feed(source) as (streams_url, rest_url), \
            ingest_process(tag, streams_url, rest_url,
                           ("--streams", "aggTrade", "--transport", transport, "--decoder",
                            decoder, *extra)) as running:
        yield running


@pytest.mark.parametrize("source", ["sim", "blaster"])
@pytest.mark.parametrize(("transport", "decoder", "fast"), [
    ("picows", "msgspec", "on"),  # the default
    ("picows", "msgspec", "off"), ("picows", "orjson", "off"),
    ("websockets", "msgspec", "off"), ("websockets", "orjson", "off"),
])
def test_end_to_end_saturation(benchmark: Any, transport: str, decoder: str, fast: str,
                               source: str) -> None:
    _saturate(benchmark, transport, decoder, source, fast=fast)


def _saturate(benchmark: Any, transport: str, decoder: str, source: str,
              batch: int | None = None, fast: str = "on") -> None:
    window = max(1.0, 10.0 * SCALE)
    tag = f"{transport[:2]}{decoder[:2]}{source[:2]}{batch or ''}{fast}"
    extra: tuple[str, ...] = ("--fast-path", fast)
    if batch is not None:
        extra += ("--publish-batch", str(batch))
    with sim_and_ingest(transport, decoder, tag, source, extra) as (proc, reader, block):
        ps = psutil.Process(proc.pid)
        counts: dict[int, list[np.ndarray]] = {0: [], 1: []}

        def drain() -> None:
            b = reader.poll()
            if len(b):
                a = b[b["kind"] == Kind.AGG_TRADE]
                for sid in (0, 1):
                    counts[sid].append(a[a["symbol"] == sid]["trade_id"].copy())

        deadline = time.monotonic() + 15
        while block.snapshot()["frames_received"] < 100:  # warm up: connected and flowing
            assert time.monotonic() < deadline, "ingest never received data"
            drain()
            time.sleep(0.05)
        res: dict[str, float] = {}

        def measure() -> None:
            m0, c0, t0 = block.snapshot(), ps.cpu_times(), time.monotonic()
            end = t0 + window
            while time.monotonic() < end:
                drain()
                time.sleep(0.01)
            m1, c1, t1 = block.snapshot(), ps.cpu_times(), time.monotonic()
            frames = m1["frames_received"] - m0["frames_received"]
            cpu = (c1.user + c1.system) - (c0.user + c0.system)
            res["msgs_per_s"] = frames / (t1 - t0)
            res["published_per_s"] = (m1["published"] - m0["published"]) / (t1 - t0)
            res["cpu_us_per_msg"] = cpu / max(frames, 1) * 1e6
            res["cpu_util"] = cpu / (t1 - t0)

        benchmark.pedantic(measure, rounds=1, iterations=1)
        drain()
        assert reader.missed == 0
        m = block.snapshot()
        assert m["skipped_total"] == 0
        assert m["gaps_unrecoverable"] == 0
        for sid in (0, 1):
            ids = np.concatenate(counts[sid])
            assert len(ids) > 0
            assert np.all(np.diff(ids) == 1), "ids not exactly once in order"
        benchmark.extra_info.update(res)
        path = "C fast path" if fast == "on" else decoder
        label = f"process {transport} + {path} <- {source}"
        RESULTS[label + (f" (batch {batch})" if batch is not None else "")] = res


# --- SBE vs JSON in the real process: one simulator, one book, two ingest processes ------------

#: walk actions per second per symbol for the SBE vs JSON process rows (~10 k frames/s to each
#: ingest): enough that every 20 ms diff window has changes (a window without one sends no diff
#: and would look like cadence), light enough that the simulator is not queueing (at 20 k it
#: nears its limit on this 2-core host and its own delays enter the book numbers). At this
#: rate an ingest is mostly idle, so its CPU per frame includes the fixed cost of waking up;
#: the marginal cost per frame is what the in-process rows measure.
SBE_SIM_RATE = 5000
SBE_KEY_ENV = "BENCH_SBE_API_KEY"
JSON_STREAMS = "trade,bookTicker,depth@100ms"
SBE_STREAMS = "trade,bestBidAsk,depth"
#: the SBE vs JSON process rows: label -> CPU and book-latency numbers
SBE_PROCESS: dict[str, dict[str, float]] = {}


@contextmanager
def sim_with_sbe_key() -> Iterator[tuple[Any, dict[str, str]]]:
    """A simulator serving JSON and SBE of one market walk, with an Ed25519 API key registered
    for the SBE endpoint; yields it and the environment an SBE ingest reads the key from (the
    key travels in an environment variable, never on a command line)."""
    import tempfile
    from pathlib import Path

    from nacl.signing import SigningKey

    from pipeline.sim.testing import run_sim_process

    name = "bench-sbe-ingest"
    with tempfile.TemporaryDirectory() as tmp:
        pub = Path(tmp) / "pub.hex"
        pub.write_text(SigningKey.generate().verify_key.encode().hex())
        with run_sim_process("--api-key", f"{name}={pub}", "--symbols", ",".join(SYMBOLS),
                             "--rate", str(SBE_SIM_RATE)) as sim:
            yield sim, {**os.environ, SBE_KEY_ENV: name}


class _Tap:
    """One ingest process under measurement: its ring drained into memory, its metrics and
    CPU times sampled."""

    def __init__(self, proc: Any, reader: Any, block: Any) -> None:
        self.reader, self.block = reader, block
        self.ps = psutil.Process(proc.pid)
        self.parts: list[np.ndarray] = []

    def drain(self) -> None:
        b = self.reader.poll()
        if len(b):
            self.parts.append(b.copy())

    def records(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.empty(0, TICK_DTYPE)

    def books_synced(self) -> bool:
        r = self.records()
        top = r[r["kind"] == Kind.DEPTH_TOP]
        return all((top["symbol"] == sid).any() for sid in range(len(SYMBOLS)))

    def sample(self) -> tuple[dict[str, Any], float]:
        c = self.ps.cpu_times()
        return self.block.snapshot(), c.user + c.system


def sbe_decoder_for(fast_path: str) -> str:
    """Which SBE decoder an ingest with this ``--fast-path`` builds (read from an Ingest made
    with the same settings, as the in-process rows do)."""
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    cfg = IngestConfig(symbols=SYMBOLS, streams=[], sbe_streams=["trade"],
                       sbe_api_key_env=SBE_KEY_ENV, fast_path=fast_path)
    w = RingWriter.create(f"bench_dec_{os.getpid()}", TICK_DTYPE, 1 << 10, symbols=SYMBOLS)
    try:
        return sbe_decoder_in_use(Ingest(cfg, w, None))
    finally:
        w.close()


def test_sbe_vs_json_process(benchmark: Any) -> None:
    """Two ingest processes on one simulator (so the same events and the same book): one on
    JSON ``trade,bookTicker,depth@100ms``, one on SBE ``trade,bestBidAsk,depth`` (20 ms diffs),
    both on their default ``--fast-path auto``. Over one window: frames and records per second,
    CPU us per frame and per record and CPU utilisation of each process (psutil user+sys over
    the window, as the saturation rows), and the book's freshness from each ring
    (benchmarks/book_latency.py: interval, staleness, lag behind the ticker). SBE frames are
    fewer (a taker's trades are one event; depth every 20 ms instead of 100), so the per-frame
    cost is not the comparison: CPU utilisation on the same market is.
    """
    from book_latency import book_latency

    window = max(3.0, 10.0 * SCALE)
    json_args = ("--streams", JSON_STREAMS)
    with sim_with_sbe_key() as (sim, env):
        sbe_args = ("--streams", "", "--sbe-streams", SBE_STREAMS, "--sbe-url", sim.sbe_url,
                    "--sbe-api-key-env", SBE_KEY_ENV)
        with ingest_process("pjs", sim.streams_url, sim.rest_url, json_args) as js, \
                ingest_process("psb", sim.streams_url, sim.rest_url, sbe_args, env) as sb:
            taps = {f"JSON {JSON_STREAMS}": _Tap(*js), f"SBE {SBE_STREAMS}": _Tap(*sb)}
            deadline = time.monotonic() + 30
            while not all(t.books_synced() for t in taps.values()):  # connected, books synced
                assert time.monotonic() < deadline, "a book never synced"
                for t in taps.values():
                    t.drain()
                time.sleep(0.05)
            res: dict[str, dict[str, float]] = {}

            def measure() -> None:
                since_ns = time.time_ns()
                s0 = {k: t.sample() for k, t in taps.items()}
                t0 = time.monotonic()
                while time.monotonic() < t0 + window:
                    for t in taps.values():
                        t.drain()
                    time.sleep(0.01)
                s1 = {k: t.sample() for k, t in taps.items()}
                secs = time.monotonic() - t0
                for k, tap in taps.items():
                    (m0, c0), (m1, c1) = s0[k], s1[k]
                    frames = m1["frames_received"] - m0["frames_received"]
                    pubs = m1["published"] - m0["published"]
                    res[k] = {"msgs_per_s": frames / secs, "published_per_s": pubs / secs,
                              "cpu_us_per_msg": (c1 - c0) / max(frames, 1) * 1e6,
                              "cpu_us_per_record": (c1 - c0) / max(pubs, 1) * 1e6,
                              "cpu_util": (c1 - c0) / secs,
                              **book_latency(tap.records(), len(SYMBOLS), since_ns)}

            benchmark.pedantic(measure, rounds=1, iterations=1)
            for t in taps.values():
                t.drain()
                assert t.reader.missed == 0
                assert t.block.snapshot()["skipped_total"] == 0
            _check_same_trades(*(t.records() for t in taps.values()))
    for k, r in res.items():
        assert r["books"] > 0, (k, r)
        assert r["lag_samples"] > 0, (k, r)
        SBE_PROCESS[k] = r
        benchmark.extra_info[k] = r
    benchmark.extra_info["sbe_decoder"] = sbe_decoder_for("auto")


def _check_same_trades(a: np.ndarray, b: np.ndarray) -> None:
    """Both processes saw the same market: each symbol's trades once and in order, and the
    trades both hold have the same prices and quantities."""
    for sid in range(len(SYMBOLS)):
        ta = a[(a["kind"] == Kind.TRADE) & (a["symbol"] == sid)]
        tb = b[(b["kind"] == Kind.TRADE) & (b["symbol"] == sid)]
        for t in (ta, tb):
            assert len(t) > 0
            assert np.all(np.diff(t["trade_id"]) == 1), "trades not once in order"
        common, ia, ib = np.intersect1d(ta["trade_id"], tb["trade_id"], return_indices=True)
        assert len(common) > 0
        assert np.array_equal(ta["price"][ia], tb["price"][ib])
        assert np.array_equal(ta["qty"][ia], tb["qty"][ib])


def _sbe_process_table() -> str:
    """The SBE vs JSON process rows: CPU, then the book's freshness."""
    lines = ["", f"SBE vs JSON, real ingest processes on one simulator (--rate {SBE_SIM_RATE} "
             f"per symbol, {len(SYMBOLS)} symbols, --fast-path auto)",
             f"{'process':44} {'frames/s':>9} {'recs/s':>8} {'us/frame':>9} {'us/rec':>7} "
             f"{'cpu util':>9}"]
    for k, r in SBE_PROCESS.items():
        lines.append(f"{k:44} {r['msgs_per_s']:>9.0f} {r['published_per_s']:>8.0f} "
                     f"{r['cpu_us_per_msg']:>9.2f} {r['cpu_us_per_record']:>7.2f} "
                     f"{r['cpu_util']:>9.3f}")
    lines += ["book freshness, ms p50/p99 (benchmarks/book_latency.py: interval = between book "
              "publications, staleness = publish - diff event time, lag = book behind the "
              "ticker of the same update id)",
              f"{'process':44} {'books/s':>8} {'interval':>13} {'staleness':>13} {'lag':>13}"]
    for k, r in SBE_PROCESS.items():
        lines.append(f"{k:44} {r['books_per_s']:>8.1f} "
                     f"{r['interval_p50_ms']:>6.1f}/{r['interval_p99_ms']:<6.1f} "
                     f"{r['staleness_p50_ms']:>6.2f}/{r['staleness_p99_ms']:<6.2f} "
                     f"{r['lag_p50_ms']:>6.1f}/{r['lag_p99_ms']:<6.1f}")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _ingest_report() -> Iterator[None]:
    """Hand the side-by-side table to the end-of-run summary after the module's last case."""
    yield
    if SBE_ROWS:
        emit(_sbe_vs_json_table())
    if SBE_PROCESS:
        emit(_sbe_process_table())
    if not RESULTS:
        return
    lines = ["", "ingest benchmark (CPU us per aggTrade message; target <= 2 us socket->ring)",
             f"{'path':52} {'msgs/s':>10} {'pub/s':>10} {'cpu us/msg':>11} {'cpu util':>9}"]
    nan = float("nan")
    for name, r in RESULTS.items():
        lines.append(f"{name:52} {r.get('msgs_per_s', nan):>10.0f} "
                     f"{r.get('published_per_s', nan):>10.0f} "
                     f"{r['cpu_us_per_msg']:>11.2f} "
                     f"{r.get('cpu_util', nan):>9.2f}")
    emit("\n".join(lines))
