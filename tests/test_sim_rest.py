"""REST endpoints of `pipeline sim` on the stream port (real HTTP over 127.0.0.1)."""

from __future__ import annotations

import asyncio
from itertools import pairwise
from typing import Any

import orjson
import pytest
import websockets
from simhelpers import fixture, run, shape

from pipeline.sim.server import SimConfig
from pipeline.sim.testing import SimServer, http_json, http_request


def cfg(**kw: Any) -> SimConfig:
    base: dict[str, Any] = {"symbols": ["BTCUSDT", "ETHUSDT"], "rate": 400.0, "seed": 2}
    base.update(kw)
    return SimConfig(**base)


def test_time_ping_and_unknown_paths() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            before = sim.sim.now_ms()
            status, headers, body = await http_request(sim.rest_url + "/api/v3/time")
            assert status == 200
            assert headers["content-type"].startswith("application/json")
            assert "x-mbx-used-weight-1m" in headers
            got = orjson.loads(body)
            assert shape(got) == shape(fixture("rest_time.json"))
            assert got["serverTime"] >= before
            assert await http_json(sim.rest_url + "/api/v3/ping") == (200, {})
            status, err = await http_json(sim.rest_url + "/api/v3/nope")
            assert status == 404
            assert set(err) == {"code", "msg"}
            status, _ = await http_json(sim.rest_url + "/elsewhere")
            assert status == 404

    run(go)


def test_exchange_info_shape_and_filters() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            status, info = await http_json(sim.rest_url + "/api/v3/exchangeInfo")
            assert status == 200
            doc = fixture("rest_exchangeInfo_docs.json")
            assert set(doc) - set(info) == {"sors"}  # SOR is out of scope
            assert [s["symbol"] for s in info["symbols"]] == ["BTCUSDT", "ETHUSDT"]
            doc_sym = doc["symbols"][0]
            btc = info["symbols"][0]
            assert set(btc) == set(doc_sym)
            for k, v in doc_sym.items():
                assert type(btc[k]) is type(v), k
            docs_filters = {f["filterType"]: f for f in fixture("rest_filters_docs.json")}
            filters = {f["filterType"]: f for f in btc["filters"]}
            for name in ("PRICE_FILTER", "LOT_SIZE", "MARKET_LOT_SIZE", "NOTIONAL"):
                assert shape(filters[name]) == shape(docs_filters[name]), name
            assert filters["PRICE_FILTER"]["tickSize"] == "0.01000000"
            assert filters["LOT_SIZE"]["stepSize"] == "0.00001000"
            assert btc["baseAsset"] == "BTC"
            assert btc["quoteAsset"] == "USDT"
            _, one = await http_json(sim.rest_url + "/api/v3/exchangeInfo?symbol=ETHUSDT")
            assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
            q = '?symbols=["ETHUSDT","BTCUSDT"]'.replace('"', "%22")
            _, two = await http_json(sim.rest_url + "/api/v3/exchangeInfo" + q)
            assert [s["symbol"] for s in two["symbols"]] == ["ETHUSDT", "BTCUSDT"]
            status, err = await http_json(sim.rest_url + "/api/v3/exchangeInfo?symbol=XRPUSDT")
            assert (status, err) == (400, {"code": -1121, "msg": "Invalid symbol."})

    run(go)


def test_depth_snapshot_shape_limits_and_sync_with_diff_stream() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            url = f"{sim.streams_url}/ws/btcusdt@depth@100ms"
            async with websockets.connect(url) as ws:
                first = orjson.loads(await ws.recv())
                status, snap = await http_json(
                    sim.rest_url + "/api/v3/depth?symbol=BTCUSDT&limit=5000"
                )
                assert status == 200
                lid = snap["lastUpdateId"]
                assert lid >= first["U"]  # else the documented algorithm would refetch
                diffs = [first]
                while diffs[-1]["u"] <= lid:
                    diffs.append(orjson.loads(await ws.recv()))
            live = [d for d in diffs if d["u"] > lid]
            assert live[0]["U"] <= lid + 1 <= live[0]["u"]
            for prev, d in pairwise(diffs):
                assert d["U"] == prev["u"] + 1
            assert shape(snap) == shape(fixture("rest_depth_snapshot.json"))
            _, ten = await http_json(sim.rest_url + "/api/v3/depth?symbol=BTCUSDT&limit=10")
            assert len(ten["bids"]) == len(ten["asks"]) == 10
            assert float(ten["bids"][0][0]) < float(ten["asks"][0][0])
            _, dflt = await http_json(sim.rest_url + "/api/v3/depth?symbol=ETHUSDT")
            assert len(dflt["bids"]) == 100 or len(dflt["bids"]) < 100 < 5000
            bad = (("", -1102), ("?symbol=btcusdt", -1121), ("?symbol=BTCUSDT&limit=x", -1100))
            for q, code in bad:
                status, err = await http_json(sim.rest_url + "/api/v3/depth" + q)
                assert status == 400
                assert err["code"] == code

    run(go)


def test_agg_trades_backfill_matches_live_stream() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            url = f"{sim.streams_url}/ws/btcusdt@aggTrade"
            async with websockets.connect(url) as ws:
                live = [orjson.loads(await ws.recv()) for _ in range(30)]
            start = live[0]["a"]
            status, headers, body = await http_request(
                f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT&fromId={start}&limit=30"
            )
            assert status == 200
            assert headers["x-mbx-used-weight-1m"].isdigit()
            rest = orjson.loads(body)
            assert shape(rest) == shape(fixture("rest_aggTrades.json"))
            assert [r["a"] for r in rest] == list(range(start, start + 30))
            for r, w in zip(rest, live, strict=True):
                assert r == {k: w[k] for k in ("a", "p", "q", "f", "l", "T", "m", "M")}
            _, newest = await http_json(f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT")
            assert 30 <= len(newest) <= 500
            assert newest[-1]["a"] >= live[-1]["a"]
            t0, t1 = live[5]["T"], live[20]["T"]
            _, window = await http_json(
                f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT&startTime={t0}&endTime={t1}"
            )
            assert window
            assert all(t0 <= w["T"] <= t1 for w in window)
            assert window[0]["a"] <= live[5]["a"]
            bad = [
                ("limit=1001", -1130),
                ("limit=0", -1130),
                ("fromId=-1", -1100),
                (f"startTime={t0}&endTime={t0 + 3_600_001}", -1127),
            ]
            for q, code in bad:
                status, err = await http_json(
                    f"{sim.rest_url}/api/v3/aggTrades?symbol=BTCUSDT&{q}"
                )
                assert (status, err["code"]) == (400, code), q
            status, err = await http_json(f"{sim.rest_url}/api/v3/aggTrades")
            assert (status, err["code"]) == (400, -1102)

    run(go)


def test_book_ticker_rest() -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=1.0)) as sim:
            status, bt = await http_json(f"{sim.rest_url}/api/v3/ticker/bookTicker?symbol=BTCUSDT")
            assert status == 200
            assert list(bt) == ["symbol", "bidPrice", "bidQty", "askPrice", "askQty"]
            assert float(bt["bidPrice"]) < float(bt["askPrice"])

    run(go)


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_rest_rejects_other_methods(method: str) -> None:
    async def go() -> None:
        async with SimServer(cfg(rate=1.0)) as sim:
            status, _h, _b = await http_request(sim.rest_url + "/api/v3/time", method)
            assert status == 405

    run(go)


def test_symbol_status_admin_and_exchange_info() -> None:
    """``POST /sim/symbol_status``: exchangeInfo reports the status; bad requests say why."""

    async def go() -> None:
        async with SimServer(cfg()) as sim:
            url = f"{sim.admin_url}/symbol_status"
            ok = await http_json(url, "POST", {"symbol": "BTCUSDT", "status": "CANCEL_ONLY"})
            assert ok == (200, {"ok": True, "symbol": "BTCUSDT", "status": "CANCEL_ONLY"})
            _, info = await http_json(sim.rest_url + "/api/v3/exchangeInfo")
            assert {s["symbol"]: s["status"] for s in info["symbols"]} == {
                "BTCUSDT": "CANCEL_ONLY", "ETHUSDT": "TRADING"}  # fmt: skip
            for body, why in [
                ({"symbol": "BTCUSDT", "status": "PAUSED"}, "status must be one of"),
                ({"symbol": "XRPUSDT", "status": "TRADING"}, "unknown symbol"),
                ({"symbol": "BTCUSDT"}, "give `symbol` and `status`"),
                ([1], "JSON object"),
            ]:
                status, err = await http_json(url, "POST", body)
                assert status == 400, body
                assert why in err["error"], (body, err)
            assert (await http_json(url))[0] == 405
            assert sim.state()["faults"]["fired"]["symbol_status"] == 1

    run(go)


# --- issue #15: weights, 429/418 with Retry-After, historicalTrades, keep-alive ----------------


def test_every_answer_carries_the_used_weight_of_its_endpoint() -> None:
    """Weights per binance-protocol.md 1.7 / 7.3, counted for errors too (Binance does)."""

    async def go() -> None:
        from pipeline.net.http import HttpConnection

        async with SimServer(cfg(rate=1.0)) as sim:
            conn = HttpConnection(sim.rest_url)
            try:
                used = []
                for path, params in [
                    ("/api/v3/ping", None), ("/api/v3/exchangeInfo", None),
                    ("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 100}),
                    ("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 500}),
                    ("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 1000}),
                    ("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 5000}),
                    ("/api/v3/aggTrades", {"symbol": "BTCUSDT"}),
                    ("/api/v3/historicalTrades", {"symbol": "BTCUSDT"}),
                    ("/api/v3/historicalTrades", {"symbol": "NOPE"}),  # 400, still weighed
                ]:
                    status, headers, _ = await conn.get(path, params)
                    assert status in (200, 400)
                    used.append(int(headers["x-mbx-used-weight-1m"]))
                steps = [b - a for a, b in pairwise([0, *used])]
                if steps[0] < 0 or any(s < 0 for s in steps):  # the minute rolled over
                    pytest.skip("a REQUEST_WEIGHT minute ended during the test")
                assert steps == [1, 20, 5, 25, 50, 250, 4, 25, 25]
            finally:
                await conn.close()

    run(go)


def test_historical_trades_are_the_trades_the_stream_printed() -> None:
    async def go() -> None:
        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade") as ws:
                live = [orjson.loads(await ws.recv()) for _ in range(40)]
            start = live[0]["t"]
            status, rows = await http_json(
                f"{sim.rest_url}/api/v3/historicalTrades?symbol=BTCUSDT&fromId={start}&limit=40")
            assert status == 200
            assert list(rows[0]) == ["id", "price", "qty", "quoteQty", "time", "isBuyerMaker",
                                     "isBestMatch"]
            assert [r["id"] for r in rows] == [w["t"] for w in live]
            for r, w in zip(rows, live, strict=True):
                assert (r["price"], r["qty"], r["time"], r["isBuyerMaker"]) == \
                    (w["p"], w["q"], w["T"], w["m"])
            _, newest = await http_json(f"{sim.rest_url}/api/v3/historicalTrades?symbol=BTCUSDT")
            assert 40 <= len(newest) <= 500
            assert newest[-1]["id"] >= live[-1]["t"]
            status, err = await http_json(
                f"{sim.rest_url}/api/v3/historicalTrades?symbol=BTCUSDT&limit=1001")
            assert (status, err["code"]) == (400, -1130)

    run(go)


def test_time_unit_header_gives_microsecond_rest_times() -> None:
    async def go() -> None:
        from pipeline.net.http import HttpConnection

        async with SimServer(cfg()) as sim:
            async with websockets.connect(f"{sim.streams_url}/ws/btcusdt@trade") as ws:
                t = orjson.loads(await ws.recv())
            conn = HttpConnection(sim.rest_url)
            try:
                q = {"symbol": "BTCUSDT", "fromId": t["t"], "limit": 1}
                _, _, ms = await conn.get("/api/v3/historicalTrades", q)
                _, _, us = await conn.get("/api/v3/historicalTrades", q,
                                          headers={"X-MBX-TIME-UNIT": "MICROSECOND"})
                assert orjson.loads(us)[0]["time"] == orjson.loads(ms)[0]["time"] * 1000 \
                    == t["T"] * 1000
                _, _, agg = await conn.get("/api/v3/aggTrades", {"symbol": "BTCUSDT"},
                                           headers={"X-MBX-TIME-UNIT": "MICROSECOND"})
                assert orjson.loads(agg)[-1]["T"] > 10**15
                status, _, body = await conn.get("/api/v3/time",
                                                 headers={"X-MBX-TIME-UNIT": "NANOS"})
                assert (status, orjson.loads(body)["code"]) == (400, -1194)
            finally:
                await conn.close()

    run(go)


def test_rate_limit_fault_429_then_418_for_a_client_that_keeps_going() -> None:
    """Over the (lowered) limit: 429 with Retry-After to the window's end; a request before
    that: 418 with the ban's length; during the ban: 418 again. All counted."""

    async def go() -> None:
        from pipeline.net.http import HttpConnection

        async with SimServer(cfg(rate=1.0)) as sim:
            await sim.set_fault("rest_rate_limit", limit=30, interval=60)
            conn = HttpConnection(sim.rest_url)
            try:
                statuses = []
                headers: dict[str, str] = {}
                while len(statuses) < 50:
                    status, headers, body = await conn.get("/api/v3/ping")
                    statuses.append(status)
                    if status != 200:
                        break
                assert statuses[-1] == 429
                assert orjson.loads(body)["code"] == -1003
                assert 1 <= int(headers["retry-after"]) <= 60
                status, headers, _ = await conn.get("/api/v3/ping")  # ignores Retry-After
                assert status == 418
                assert int(headers["retry-after"]) >= 2
                status, _, _ = await conn.get("/api/v3/ping")
                assert status == 418
                st = sim.sim.rest.limits.stats
                assert (st["rate_limited"], st["banned"], st["early_after_429"],
                        st["during_ban"]) == (1, 2, 1, 1)
                await sim.set_fault("rest_rate_limit", on=False)
                assert sim.faults.rest_limit is None
            finally:
                await conn.close()

    run(go)


def test_forced_answers_and_bad_fault_parameters() -> None:
    from pipeline.sim.faults import FaultError, parse_fault

    for params in ({"force": "500"}, {"limit": 0}, {"interval": -1}, {"what": 1}):
        with pytest.raises(FaultError):
            parse_fault("rest_rate_limit", params)

    async def go() -> None:
        async with SimServer(cfg(rate=1.0)) as sim:
            await sim.set_fault("rest_rate_limit", force="429", count=2, retry_after=3)
            status, headers, _ = await http_request(sim.rest_url + "/api/v3/ping")
            assert (status, headers["retry-after"]) == (429, "3")
            assert "x-mbx-used-weight-1m" in headers
            status, _h, _ = await http_request(sim.rest_url + "/api/v3/ping")
            assert status == 429
            assert sim.faults.rest_force is None
            status, _h, _ = await http_request(sim.rest_url + "/api/v3/ping")
            assert status == 418  # the client asked again before Retry-After: banned

    run(go)


def test_keep_alive_answers_many_requests_on_one_connection() -> None:
    """A client that keeps its connection makes one; ``Connection: close`` clients one each;
    a keep-alive connection the server closed is reopened for the next request."""

    async def go() -> None:
        from pipeline.net.http import HttpConnection

        async with SimServer(cfg(rate=1.0)) as sim:
            conn = HttpConnection(sim.rest_url)
            try:
                for _ in range(20):
                    status, headers, _ = await conn.get("/api/v3/time")
                    assert status == 200
                    assert headers["connection"] == "keep-alive"
                assert conn.opened == 1
                assert sim.sim.rest.connections == 1
                for _ in range(3):
                    assert (await http_request(sim.rest_url + "/api/v3/ping"))[0] == 200
                assert sim.sim.rest.connections == 4
                sim.sim.rest.close_sessions()  # the server drops idle keep-alive connections
                await asyncio.sleep(0.05)
                assert (await conn.get("/api/v3/ping"))[0] == 200
                assert conn.opened == 2
                # the admin API answers on a keep-alive connection too
                status, _h, body = await conn.get("/sim/state")
                assert status == 200
                assert orjson.loads(body)["port"] == sim.port
            finally:
                await conn.close()

    run(go)
