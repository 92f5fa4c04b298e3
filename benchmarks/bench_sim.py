"""How many market-stream messages per second `pipeline sim` pushes to one client.

The simulator runs as its own process (``pipeline sim --rate max``) so it has a core to itself;
the client here is a blocking raw socket that does the WebSocket handshake and then only walks
frame headers in 1 MiB reads and counts frames (no JSON, no unmasking: servers do not mask),
so it is not the bottleneck. Ingest benchmarks compare their own rate with this one to know
whether they measured the client or the simulator.

``--rate max`` is the real order-book walk (consistent with REST and the venue), run in numpy
batches and encoded with byte templates (market.Market.step_batch, server.batch_frames); there
is no separate replay mode any more (``--turbo`` is an alias). Cases: one symbol's aggTrade
stream alone (what the ingest benchmarks subscribe to), combined and raw; one symbol's
``trade + aggTrade + bookTicker``; and three symbols. The answer is checked: the frames counted
must be text frames and their number exactly what was asked for; a sample is parsed and must
be one of the subscribed streams.

Each round is one fresh connection reading FRAMES frames; the best and the median of the rounds
and the machine's load average are recorded in ``extra_info`` (a shared machine is noisy).

Scale with ``BENCH_SCALE`` (default 1.0; 0.01 for a smoke run).

Run: ``.venv/bin/python -m pytest benchmarks/bench_sim.py -q -s --benchmark-disable``
(``-s`` prints the rates).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import statistics
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from summary import emit

from pipeline.sim.testing import SimProcess, run_sim_process

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
FRAMES = max(2_000, int(500_000 * SCALE))


def count_frames(url: str, n: int, deadline_s: float = 60.0) -> tuple[int, float, bytes]:
    """Read exactly ``n`` frames; returns (text frames, seconds from first byte, one sample)."""
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port))
    sock.settimeout(deadline_s)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + (f"?{u.query}" if u.query else "")
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, buf = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:100]
        count = text = 0
        sample = b""
        t0: float | None = None
        pos = 0
        data = bytearray(buf)
        while count < n:
            # walk complete frames in the buffer
            end = len(data)
            while count < n and pos + 2 <= end:
                b0 = data[pos]
                ln = data[pos + 1] & 0x7F
                hdr = 2
                if ln == 126:
                    if pos + 4 > end:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
                    hdr = 4
                elif ln == 127:
                    if pos + 10 > end:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    hdr = 10
                if pos + hdr + ln > end:
                    break
                if b0 == 0x81:
                    text += 1
                    if not sample:
                        sample = bytes(data[pos + hdr : pos + hdr + ln])
                if b0 & 0x0F in (0x1, 0x2):  # data frames only: pings do not count
                    count += 1
                pos += hdr + ln
            del data[:pos]
            pos = 0
            if count >= n:
                break
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"closed after {count} frames")
            if t0 is None:
                t0 = time.perf_counter()
            data += chunk
        return text, time.perf_counter() - (t0 or time.perf_counter()), sample
    finally:
        sock.close()


@pytest.fixture(scope="module")
def sim() -> Any:
    """The real walk as fast as the client takes (consistent with REST and the venue)."""
    with run_sim_process(
        "--rate", "max", "--symbols", "BTCUSDT,ETHUSDT,BNBUSDT", "--max-incoming-per-s", "0"
    ) as proc:
        yield proc


@pytest.mark.parametrize(
    ("path", "streams"),
    [
        ("/stream?streams=", ["btcusdt@aggTrade"]),
        ("/ws/", ["btcusdt@aggTrade"]),
        ("/stream?streams=", ["btcusdt@trade", "btcusdt@aggTrade", "btcusdt@bookTicker"]),
        (
            "/stream?streams=",
            [
                f"{s}@{k}"
                for s in ("btcusdt", "ethusdt", "bnbusdt")
                for k in ("trade", "aggTrade", "bookTicker")
            ],
        ),
    ],
    ids=["1sym-aggTrade-combined", "1sym-aggTrade-raw", "1sym-3streams", "3sym-9streams"],
)
def test_sim_push_rate_one_client(
    benchmark: Any, sim: SimProcess, path: str, streams: list[str]
) -> None:
    url = f"{sim.streams_url}{path}{'/'.join(streams)}"
    rates: list[float] = []
    combined = path.startswith("/stream")

    def once() -> None:
        text, secs, sample = count_frames(url, FRAMES)
        assert text == FRAMES
        frame = json.loads(sample)
        if combined:
            assert frame["stream"] in streams
        else:
            assert f"{frame['s'].lower()}@{frame['e']}" in streams
        rates.append(text / secs)

    benchmark.pedantic(once, rounds=5 if SCALE >= 1 else 1, iterations=1)
    load = os.getloadavg()
    benchmark.extra_info["messages_per_s_best"] = round(max(rates))
    benchmark.extra_info["messages_per_s_median"] = round(statistics.median(rates))
    benchmark.extra_info["loadavg_1m"] = load[0]
    emit(
        f"sim push rate {path}{'/'.join(streams)[:48]}: best {max(rates):,.0f} msg/s, "
        f"median {statistics.median(rates):,.0f} ({len(rates)} rounds, load {load[0]:.2f})"
    )
