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

Target from the issue: <= 2 us of ingest-process CPU per aggTrade frame, socket to ring.
The summary table is printed by the last test (``test_zz_report``).
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
                     frames_for: Callable[[int, int], list[bytes]]) -> tuple[float, Any]:
    """Frames through ``Ingest.on_frame`` (the transport's entry point) into a real ring, all
    frames of a run in one uvloop loop iteration (as when one socket read carries many frames;
    the end-of-iteration commit runs after them). Returns the best CPU us per frame and the
    last id fed; checks every frame was published once."""
    import uvloop

    from pipeline.marketdata.ingest import Ingest

    n = 1000
    w = RingWriter.create(f"bench_{tag}_{os.getpid()}", TICK_DTYPE, 1 << 16, symbols=SYMBOLS)
    loop = uvloop.new_event_loop()
    ing = None
    try:
        ing = Ingest(cfg, w, None)
        ing.setup_publishing(loop)
        state: dict[str, float] = {"next": 1_000_000}

        async def one() -> None:
            frames = frames_for(n, int(state["next"]))
            state["next"] += n
            h = ing.on_frame  # type: ignore[union-attr]
            conn = _FakeConn()
            t0 = time.process_time()
            for f in frames:
                h(conn, f, 1)  # type: ignore[arg-type]
            state["best"] = min(state.get("best", 1e9), time.process_time() - t0)

        def run() -> None:
            loop.run_until_complete(one())

        benchmark(run)
        state["best"] = 1e9
        before = w.cursor
        runs = max(1, int(50 * SCALE))
        for _ in range(runs):
            run()
        assert w.cursor - before == runs * n  # every frame published once
        assert w.staged == 0
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


def depth_frames(n: int, first_u: int, width: int) -> list[bytes]:
    """Diff-depth frames (``@depth@100ms``) of ``width`` bid and ``width`` ask levels each,
    contiguous update ids from ``first_u``, prices moving around a 60,000 / 60,001 book."""
    out = []
    u = first_u
    for i in range(n):
        bids = b",".join(b'["%.2f","%.8f"]' % (60000.0 - ((i + k) % 200) * 0.01, 0.5 + k * 0.001)
                         for k in range(width))
        asks = b",".join(b'["%.2f","%.8f"]' % (60001.0 + ((i + k) % 200) * 0.01, 0.5 + k * 0.001)
                         for k in range(width))
        out.append(b'{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1768627409826,'
                   b'"s":"BTCUSDT","U":%d,"u":%d,"b":[%s],"a":[%s]}}'
                   % (u, u + 2 * width - 1, bids, asks))
        u += 2 * width
    return out


@pytest.mark.parametrize("width", [10, 100])
def test_depth_handler_to_ring(benchmark: Any, width: int) -> None:
    """Diff-depth frames (``width`` x ``width`` levels) through the live handler into a synced
    1,000-level book and the ring (the book's top published per diff, a frame's records
    committed together): the Python path, the default ``@depth@100ms`` stream of issue 15."""
    import uvloop

    from pipeline.marketdata.ingest import Ingest, IngestConfig

    cfg = IngestConfig(symbols=SYMBOLS, streams=["depth@100ms"])
    w = RingWriter.create(f"bench_depth{width}_{os.getpid()}", TICK_DTYPE, 1 << 16,
                          symbols=SYMBOLS)
    loop = uvloop.new_event_loop()
    ing = Ingest(cfg, w, None)
    try:
        ing.setup_publishing(loop)
        book = ing.depth.books[0]
        book.on_diff(999_000, 999_000, [], [])  # anchors the snapshot (no REST here)
        book.on_snapshot(999_999, [(60000.0 - k * 0.01, 1.0) for k in range(1000)],
                         [(60001.0 + k * 0.01, 1.0) for k in range(1000)])
        assert book.synced
        n = 200
        state = {"next": 1_000_000, "best": 1e9}

        async def one() -> None:
            frames = depth_frames(n, state["next"], width)
            state["next"] += n * 2 * width
            h = ing.on_frame
            conn = _FakeConn()
            t0 = time.process_time()
            for f in frames:
                h(conn, f, 1)  # type: ignore[arg-type]
            state["best"] = min(state["best"], time.process_time() - t0)

        before = ing.c["frames_received"]
        benchmark(lambda: loop.run_until_complete(one()))
        assert book.synced
        assert ing.c["frames_received"] - before >= n
        assert not any(v for k, v in ing.c.items() if k.startswith("skipped_")), ing.c
        assert book.update_id == state["next"] - 1  # every diff applied, in order
        us = state["best"] / n * 1e6
        RESULTS.setdefault(f"in-process depth {width}x{width} handler->ring (msgspec)", {})[
            "cpu_us_per_msg"] = us
        benchmark.extra_info["cpu_us_per_frame"] = us
    finally:
        ing.release()
        loop.close()
        w.close()


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
def sim_and_ingest(transport: str, decoder: str, tag: str, source: str = "sim",
                   extra: tuple[str, ...] = ()) -> Iterator[tuple[Any, Any, Any]]:
    ring, met = f"bench_{os.getpid()}_{tag}_r", f"bench_{os.getpid()}_{tag}_m"
    with feed(source) as (streams_url, rest_url):
        cmd = [sys.executable, "-m", "pipeline", "--log-format", "text", "--log-level",
               "WARNING", "ingest", "--streams-url", streams_url, "--rest-url",
               rest_url, "--symbols", ",".join(SYMBOLS), "--streams", "aggTrade",
               "--transport", transport, "--decoder", decoder, "--ring", ring, "--metrics", met,
               "--ring-capacity", str(1 << 20), "--stall-timeout", "5",
               "--metrics-interval", "0.02", *extra]
        proc = subprocess.Popen(cmd)
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


@pytest.fixture(scope="module", autouse=True)
def _ingest_report() -> Iterator[None]:
    """Hand the side-by-side table to the end-of-run summary after the module's last case."""
    yield
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
