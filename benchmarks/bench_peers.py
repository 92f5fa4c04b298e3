"""Peers on the same simulator load: the official ``binance-sdk-spot`` streams client and
``cryptofeed``, next to ``pipeline ingest``, each in its own process reading the aggTrade streams
of 2 symbols from ``pipeline sim``.

Measured per client: messages/s delivered to the user callback (for us: published into the
ring) and CPU microseconds per message of the client process (psutil user+sys over the window).
Each client checks its answer: per symbol, aggregate trade ids strictly increasing by one.

What each one does per message differs, and the table should be read with that in mind:
- binance-sdk-spot: aiohttp websocket, json -> pydantic ``AggTradeResponse`` -> callback;
- cryptofeed: websockets, yapic.json -> ``Trade`` object (Decimal price/qty) -> async callback.
  Its ``WSAsyncConn`` refuses any address that does not start with ``wss://`` (a hard check in
  ``cryptofeed/connection.py``); this benchmark shims that one check in the child process so it
  can read ``ws://127.0.0.1`` (nothing else is patched), and points the ``Binance`` feed's
  hard-coded websocket and REST endpoints at the simulator by subclassing;
- pipeline ingest: picows, msgspec -> record tuple -> exactly-once tracking -> ring publish.

Loads: 10 k aggTrade messages/s total (``--rate 5000 --rate-unit msgs`` per symbol) and
saturation (``--rate max``). ``BENCH_SCALE`` < 0.1 keeps only saturation with 1 s windows.
Peers that cannot be imported are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import psutil
import pytest
from summary import emit

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
SMOKE = SCALE < 0.1
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
WINDOW_S = max(1.0, 10.0 * SCALE)
CTX = mp.get_context("spawn")
RATES = ["max"] if SMOKE else ["10000", "max"]
PEERS = ("pipeline", "binance-sdk-spot", "cryptofeed")
RESULTS: list[dict[str, Any]] = []

# shared counters: [messages, id errors, ready, stop]
MSGS, BAD, READY, STOP = 0, 1, 2, 3


class Ids:
    """Strictly +1 aggregate trade ids per symbol; counts violations into the shared array."""

    def __init__(self, shared: Any) -> None:
        self.last: dict[str, int] = {}
        self.shared = shared

    def see(self, symbol: str, agg_id: int) -> None:
        last = self.last.get(symbol)
        if last is not None and agg_id != last + 1:
            self.shared[BAD] += 1
        self.last[symbol] = agg_id
        self.shared[MSGS] += 1


def _sdk_main(url: str, shared: Any) -> None:
    import asyncio

    from binance_common.configuration import ConfigurationWebSocketStreams
    from binance_sdk_spot.spot import Spot

    ids = Ids(shared)

    async def main() -> None:
        client = Spot(config_ws_streams=ConfigurationWebSocketStreams(stream_url=url))
        conn = await client.websocket_streams.create_connection()
        try:
            for s in SYMBOLS:
                stream = await conn.agg_trade(symbol=s.lower())
                stream.on("message", lambda d: ids.see(d.s, d.a))
            shared[READY] = 1
            while not shared[STOP]:  # noqa: ASYNC110  (a shared-memory flag: nothing to await)
                await asyncio.sleep(0.05)
        finally:
            await conn.close_connection(close_session=True)

    with contextlib.suppress(Exception):
        asyncio.run(main())


def _cryptofeed_main(ws_url: str, rest_url: str, shared: Any) -> None:
    import threading

    from cryptofeed import FeedHandler
    from cryptofeed import connection as cc
    from cryptofeed.defines import TRADES
    from cryptofeed.exchanges import Binance

    orig = cc.WSAsyncConn.__init__

    def init(self: Any, address: str, *args: Any, **kwargs: Any) -> None:
        # the only change: get past the wss:// scheme check, then use the real address
        orig(self, "wss://" + address.removeprefix("ws://"), *args, **kwargs)
        self.address = address

    cc.WSAsyncConn.__init__ = init

    class LocalBinance(Binance):
        websocket_endpoints: ClassVar = [cc.WebsocketEndpoint(ws_url)]
        rest_endpoints: ClassVar = [cc.RestEndpoint(rest_url, routes=cc.Routes(
            "/api/v3/exchangeInfo", l2book="/api/v3/depth?symbol={}&limit={}",
            authentication="/api/v3/userDataStream"))]

    ids = Ids(shared)

    async def trade(t: Any, _receipt: float) -> None:
        ids.see(t.symbol, int(t.id))

    fh = FeedHandler(config={"log": {"filename": os.devnull, "level": "WARNING"}})
    fh.add_feed(LocalBinance(symbols=[f"{s[:-4]}-{s[-4:]}" for s in SYMBOLS], channels=[TRADES],
                             callbacks={TRADES: trade}))

    def watch() -> None:
        while not shared[STOP]:
            if shared[MSGS]:
                shared[READY] = 1
            time.sleep(0.05)
        os._exit(0)  # FeedHandler.run() owns the loop and signals; leave without a fuss

    threading.Thread(target=watch, daemon=True).start()
    fh.run(install_signal_handlers=False)


def unavailable(peer: str) -> str | None:
    mod = {"binance-sdk-spot": "binance_sdk_spot", "cryptofeed": "cryptofeed"}.get(peer)
    if mod is None:
        return None
    try:
        __import__(mod)
    except ImportError as exc:
        return f"{peer} not importable ({exc}); pip install {peer}"
    return None


@contextlib.contextmanager
def run_peer(peer: str, sim: Any) -> Iterator[tuple[int, Any]]:
    """Start a client; yield (pid, counter function)."""
    if peer == "pipeline":
        from pipeline.ipc.ring import ring_stats
        from pipeline.sim.testing import stop_process

        ring, met = f"bench_{os.getpid()}_peer_r", f"bench_{os.getpid()}_peer_m"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--log-format", "text", "--log-level", "WARNING",
             "ingest", "--streams-url", sim.streams_url, "--rest-url", sim.rest_url, "--symbols",
             ",".join(SYMBOLS), "--streams", "aggTrade", "--ring", ring, "--metrics", met,
             "--ring-capacity", str(1 << 20), "--stall-timeout", "5"])

        def count() -> int:
            try:
                return int(ring_stats(ring)["cursor"])
            except FileNotFoundError:
                assert proc.poll() is None, "ingest exited"
                return 0

        try:
            yield proc.pid, count
        finally:
            stop_process(proc, 10)
        return
    shared = CTX.RawArray("q", 4)
    if peer == "binance-sdk-spot":
        child = CTX.Process(target=_sdk_main, args=(sim.streams_url, shared), daemon=True)
    else:
        child = CTX.Process(target=_cryptofeed_main, args=(sim.streams_url, sim.rest_url, shared),
                            daemon=True)
    child.start()
    try:
        assert child.pid is not None
        yield child.pid, lambda: int(shared[MSGS])
    finally:
        shared[STOP] = 1
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        assert shared[BAD] == 0, f"{peer}: aggregate ids not contiguous ({shared[BAD]} breaks)"


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


CASES = [(peer, rate) for rate in RATES for peer in PEERS]


@pytest.mark.parametrize(("peer", "rate"), CASES, ids=[f"{p}-{r}" for p, r in CASES])
def test_peer(benchmark: Any, peer: str, rate: str) -> None:
    reason = unavailable(peer)
    if reason:
        pytest.skip(reason)
    from pipeline.sim.testing import run_sim_process

    benchmark.group = f"peers {rate} msgs/s"
    sim_args = ["--rate", "max"] if rate == "max" else \
        ["--rate", f"{float(rate) / len(SYMBOLS):.1f}", "--rate-unit", "msgs"]
    with run_sim_process("--symbols", ",".join(SYMBOLS), *sim_args) as sim, \
            run_peer(peer, sim) as (pid, count):
        deadline = time.monotonic() + 30
        while count() < 50:
            assert time.monotonic() < deadline, f"{peer} received nothing"
            time.sleep(0.05)
        res: dict[str, float] = {}

        def window() -> None:
            n0, c0, t0 = count(), _cpu(pid), time.monotonic()
            time.sleep(WINDOW_S)
            n1, c1, t1 = count(), _cpu(pid), time.monotonic()
            res["msgs_per_s"] = (n1 - n0) / (t1 - t0)
            res["cpu_us_per_msg"] = (c1 - c0) / max(n1 - n0, 1) * 1e6
            res["cpu_util"] = (c1 - c0) / (t1 - t0)

        benchmark.pedantic(window, rounds=1, iterations=1)
    assert res["msgs_per_s"] > 0
    benchmark.extra_info.update(res)
    RESULTS.append({"peer": peer, "rate": rate, **res})


@pytest.fixture(scope="module", autouse=True)
def _peers_report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not RESULTS:
        return
    lines = ["", "peers on the same simulator load (aggTrade, 2 symbols; one client process each)",
             f"{'client':<18} {'rate':>7} {'msgs/s':>9} {'CPU us/msg':>10} {'cpu util':>8}"]
    for r in RESULTS:
        lines.append(f"{r['peer']:<18} {r['rate']:>7} {r['msgs_per_s']:>9.0f} "
                     f"{r['cpu_us_per_msg']:>10.2f} {r['cpu_util']:>8.2f}")
    emit("\n".join(lines))
