"""Side by side: our REST client (pipeline/net/http.py) vs aiohttp, against the simulator.

Why (issue #15): "use a well-kept HTTP library if it beats our own client". Each client makes
N sequential GETs of a depth snapshot (limit 100, ~5 KB) on one origin over 127.0.0.1 from a
separate simulator process (its REST weight limit lifted), which is how ingest uses REST. Rows:
our HttpConnection (keep-alive), aiohttp's ClientSession (pooled keep-alive), and our one-shot
``get_json`` (a new connection per request, what ingest did before). Prints median and p99 us
per request. Run: ``.venv/bin/python benchmarks/bench_rest_client.py [N]``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from pipeline.net.http import HttpConnection, get_json
from pipeline.sim.testing import run_sim_process

PARAMS: dict[str, str | int] = {"symbol": "BTCUSDT", "limit": 100}


async def timed(n: int, one: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(50):  # warm up
        await one()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await one()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


async def main(base: str, n: int) -> None:
    rows: list[tuple[str, list[float]]] = []
    conn = HttpConnection(base)

    async def ours() -> object:
        status, _h, body = await conn.get("/api/v3/depth", PARAMS)
        assert status == 200
        return body

    rows.append(("ours, keep-alive (HttpConnection)", await timed(n, ours)))
    await conn.close()
    try:
        import aiohttp
    except ImportError:
        aiohttp = None  # type: ignore[assignment]
    if aiohttp is not None:
        async with aiohttp.ClientSession(base) as session:

            async def lib() -> object:
                async with session.get("/api/v3/depth", params=PARAMS) as resp:
                    assert resp.status == 200
                    return await resp.read()

            rows.append((f"aiohttp {aiohttp.__version__} ClientSession", await timed(n, lib)))

    async def oneshot() -> object:
        return await get_json(base, "/api/v3/depth", PARAMS)

    rows.append(("ours, connection per request (get_json)", await timed(n, oneshot)))
    print(f"{n} sequential GET /api/v3/depth?limit=100 over 127.0.0.1 (us per request)")
    for name, us in rows:
        us.sort()
        p99 = us[int(len(us) * 0.99)]
        print(f"  {name:42s} median {statistics.median(us):7.1f}  p99 {p99:7.1f}")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with run_sim_process("--symbols", "BTCUSDT", "--rate", "1") as sim:
        sim.fault("rest_rate_limit", limit=10**9, interval=60)
        asyncio.run(main(sim.rest_url, n))
