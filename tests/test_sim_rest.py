"""REST endpoints of `pipeline sim` on the stream port (real HTTP over 127.0.0.1)."""

from __future__ import annotations

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
