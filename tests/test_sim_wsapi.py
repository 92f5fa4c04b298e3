"""The simulated WS API over real sockets: a plain ``websockets`` client against
:func:`pipeline.sim.wsapi.serve_connection` on 127.0.0.1:0, with an injected clock.

Also the protocol reference's Ed25519 vectors (binance-protocol.md 3.5, the DERIVED WS API ones
made with the published PKCS#8 key) must verify, and one run through the full simulator
(:class:`pipeline.sim.testing.SimServer`).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from nacl.signing import SigningKey
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pipeline.sim.faults import Faults
from pipeline.sim.market import Market
from pipeline.sim.signatures import parse_public_key, signature_payload
from pipeline.sim.wsapi import WsApiService, serve_connection

T0 = 1_700_000_000_000
FIXTURES = Path(__file__).parent / "fixtures"


def fixture(rel: str) -> Any:
    return orjson.loads((FIXTURES / rel).read_bytes())


SK = SigningKey(bytes(range(32)))
KEY = "simKey0123456789abcdefABCDEF0123456789abcdefABCDEF0123456789abcd"
SK2 = SigningKey(bytes(range(1, 33)))
KEY2 = "simKey2"

# binance-protocol.md 3.5: the published Ed25519 key (fix-api.md) and the DERIVED WS API vectors
REF_PEM = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIIJEYWtGBrhACmb9Dvy+qa8WEf0lQOl1s4CLIAB9m89u
-----END PRIVATE KEY-----
"""
REF_PUB_HEX = "19420abfd752a565c15625e9da6eaf0086fc40c14960183214442c14996a800d"
REF_KEY_A = "sBRXrJx2DsOraMXOaUovEhgVRcjOvCtQwnWj8VxkOh1xqboS02SPGfKi2h8spZJb"
REF_KEY_B = "4yNzx3yWC5bS6YTwEkSRaC0nRmSQIIStAUOh1b6kqaBrTLIhjCpI5lJH8q8R8WNO"
REF_SIG_LOGON = (
    "QkxRSX10rV71REvvMibSfvHCKvHoDFDweKdzKXhHhcKIGkHoZPXAPVNsZYgJtf0CuKIm+cVrCqO07JHjZCVpAg=="
)
REF_SIG_LOGON_RW = (
    "wCEX+NFthTz3SNtwFiAAMUb+dyyUBgPfhVNKR0MBcfO+4SBknQqzpg+uyOYKKUJiPklWT5RfKswfd/hf0CNnDA=="
)
REF_SIG_ORDER = (
    "82wlF5RobwT7JZehRQgOaupNEm5GrAqJj5tqZeCCE6ZxkhlUbWBThOx00q3FVnCKn882P+9p85phztjk4bOMAQ=="
)


def ref_public_key() -> bytes:
    key = load_pem_private_key(REF_PEM, password=None)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


class Clock:
    """Injected server clock (ms); tests move it instead of sleeping."""

    def __init__(self, t: int = T0) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def sign(sk: SigningKey, params: dict[str, str]) -> str:
    return base64.b64encode(sk.sign(signature_payload(params).encode()).signature).decode()


def signed(params: dict[str, Any], ts: int, sk: SigningKey = SK, key: str = KEY) -> dict[str, Any]:
    p = {k: str(v) for k, v in params.items()} | {"apiKey": key, "timestamp": str(ts)}
    p["signature"] = sign(sk, p)
    return p


class Client:
    """Sequential test client: ``call`` returns the response; events are collected on the way."""

    def __init__(self, ws: ClientConnection, clock: Clock) -> None:
        self.ws = ws
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.n = 0

    async def send_raw(self, text: str) -> dict[str, Any]:
        await self.ws.send(text)
        return await self.next_response()

    async def next_response(self) -> dict[str, Any]:
        while True:
            frame = json.loads(await self.ws.recv())
            if "id" in frame:
                return frame
            self.events.append(frame)

    async def call(self, method: str, params: dict[str, Any] | None = None, rid: Any = ...) -> Any:
        if rid is ...:
            self.n += 1
            rid = self.n
        msg: dict[str, Any] = {"id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        resp = await self.send_raw(json.dumps(msg))
        assert resp["id"] == rid
        return resp

    async def ok(self, method: str, params: dict[str, Any] | None = None) -> Any:
        resp = await self.call(method, params)
        assert resp["status"] == 200, resp
        return resp["result"]

    async def logon(self, sk: SigningKey = SK, key: str = KEY) -> dict[str, Any]:
        return await self.ok("session.logon", signed({}, self.clock(), sk, key))

    async def wait_event(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            for i, ev in enumerate(self.events):
                if pred(ev):
                    return self.events.pop(i)
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
            assert "id" not in frame, frame
            self.events.append(frame)

    def ts(self) -> dict[str, str]:
        return {"timestamp": str(self.clock())}


@asynccontextmanager
async def venue_server(
    clock: Clock, faults: Faults | None = None, **limits: Any
) -> AsyncIterator[tuple[WsApiService, str]]:
    market = Market(["BTCUSDT", "ETHUSDT"], seed=3)
    keys = {
        KEY: bytes(SK.verify_key),
        KEY2: bytes(SK2.verify_key),
        REF_KEY_A: ref_public_key(),
        REF_KEY_B: ref_public_key(),
    }
    service = WsApiService(market, keys, faults or Faults(), clock, **limits)

    async def handler(conn: ServerConnection) -> None:
        await serve_connection(service, conn)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield service, f"ws://127.0.0.1:{port}/ws-api/v3"


@asynccontextmanager
async def client(url: str, clock: Clock) -> AsyncIterator[Client]:
    async with connect(url) as ws:
        yield Client(ws, clock)


def scenario(
    fn: Callable[[WsApiService, Client, Clock], Awaitable[None]],
    faults: Faults | None = None,
    **limits: Any,
) -> None:
    async def go() -> None:
        clock = Clock()
        async with (
            venue_server(clock, faults, **limits) as (service, url),
            client(url, clock) as c,
        ):
            await fn(service, c, clock)

    run(go())


def best(service: WsApiService) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    return service.market.best("BTCUSDT")


def limit(side: str, price: Decimal | str, qty: str = "0.01", **kw: str) -> dict[str, str]:
    p = {
        "symbol": "BTCUSDT",
        "side": side,
        "type": "LIMIT",
        "timeInForce": "GTC",
        "price": str(price),
        "quantity": qty,
    }
    p.update(kw)
    return p


# ---------------------------------------------------------------------------- envelope


def test_envelope_ids_rate_limits_and_basic_methods() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        uuid = "e2a85d9f-07a5-4f94-8d5f-789dc3deb097"
        for rid in (7, uuid, None):
            resp = await c.call("ping", rid=rid)
            assert resp["id"] == rid
            assert type(resp["id"]) is type(rid)
            assert resp["status"] == 200
            assert resp["result"] == {}
            assert "error" not in resp
        resp = await c.call("time")
        assert resp["result"] == {"serverTime": T0}
        [rl] = resp["rateLimits"]
        assert rl == {
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": "MINUTE",
            "intervalNum": 1,
            "limit": 6000,
            "count": 2 + 4,
        }  # connect (2) + 4 requests of weight 1
        resp = await c.call("v3/ping")
        assert resp["status"] == 200
        assert (await c.call("ping", {"returnRateLimits": False})).get("rateLimits") is None
        resp = await c.call("account.status", {"returnRateLimits": "true"})
        assert resp["rateLimits"][0]["count"] == 2 + 6 + 20  # weights: failed requests count too

    scenario(body)


def test_url_can_disable_rate_limits() -> None:
    async def go() -> None:
        clock = Clock()
        async with (
            venue_server(clock) as (_service, url),
            client(url + "?returnRateLimits=false", clock) as c,
        ):
            assert "rateLimits" not in await c.call("ping")
            assert "rateLimits" in await c.call("ping", {"returnRateLimits": True})

    run(go())


def test_malformed_requests() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        resp = await c.send_raw("{not json")
        assert resp["id"] is None
        assert resp["status"] == 400
        assert resp["error"]["code"] == -1100
        resp = await c.send_raw("[1,2]")
        assert (resp["id"], resp["status"]) == (None, 400)
        resp = await c.send_raw('{"id": 5}')
        assert resp["id"] == 5
        assert resp["error"]["code"] == -1102
        resp = await c.call("no.such.method")
        assert resp["status"] == 400
        assert resp["error"] == {"code": -1100, "msg": "Unknown method: no.such.method"}
        await c.ws.send(b"\x00binary")
        resp = await c.next_response()
        assert resp["status"] == 400
        assert (await c.call("ping"))["status"] == 200  # the connection survives all of it

    scenario(body)


# ---------------------------------------------------------------------------- session.logon


def test_logon_status_logout() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        status = await c.ok("session.status")
        assert status["apiKey"] is None
        assert status["authorizedSince"] is None
        assert status["userDataStream"] is None
        clock.t += 50
        res = await c.logon()
        live = orjson.loads((FIXTURES / "wsapi/session_logon_success.json").read_bytes())
        assert set(res) == set(live["result"])
        assert res["apiKey"] == KEY
        assert res["authorizedSince"] == T0 + 50
        assert res["connectedSince"] == T0
        assert res["userDataStream"] is False
        st = await c.ok("session.status")
        assert st["apiKey"] == KEY
        assert set(st) == set(fixture("wsapi/docs/session_status.json")["result"])
        assert set(res) == set(fixture("wsapi/docs/session_logon.json")["result"])
        out = await c.ok("session.logout")
        assert out["apiKey"] is None
        resp = await c.call("account.status", c.ts())
        assert resp["error"]["code"] == -1102  # logged out: apiKey needed again

    scenario(body)


def test_reference_ed25519_vectors_verify() -> None:
    """binance-protocol.md 3.5 DERIVED WS API vectors, signed with the published PKCS#8 key."""
    assert ref_public_key().hex() == REF_PUB_HEX

    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        clock.t = 1649729878532 + 100
        res = await c.ok(
            "session.logon",
            {"apiKey": REF_KEY_A, "timestamp": 1649729878532, "signature": REF_SIG_LOGON},
        )
        assert res["apiKey"] == REF_KEY_A
        res = await c.ok(
            "session.logon",
            {
                "apiKey": REF_KEY_A,
                "recvWindow": 5000,
                "timestamp": 1649729878532,
                "signature": REF_SIG_LOGON_RW,
            },
        )
        assert res["apiKey"] == REF_KEY_A
        clock.t = 1645423376532 + 50  # recvWindow=100 in this vector
        # the book of the seeded market is near 60000: a SELL at 52000 takes the bids
        resp = await c.call(
            "order.place",
            {
                "apiKey": REF_KEY_B,
                "price": "52000.00",
                "quantity": "0.01000000",
                "recvWindow": "100",
                "side": "SELL",
                "symbol": "BTCUSDT",
                "timeInForce": "GTC",
                "timestamp": 1645423376532,
                "type": "LIMIT",
                "signature": REF_SIG_ORDER,
            },
        )
        assert resp["status"] == 200, resp
        assert resp["result"]["status"] == "FILLED"
        # one flipped character in the signature: -1022
        clock.t = 1649729878532 + 100
        bad = REF_SIG_LOGON.replace("Q", "R", 1)
        resp = await c.call(
            "session.logon", {"apiKey": REF_KEY_A, "timestamp": 1649729878532, "signature": bad}
        )
        assert resp["error"]["code"] == -1022

    scenario(body)


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda p, t: p | {"signature": sign(SK2, p)}, -1022),  # signed with another key
        (lambda p, t: p | {"signature": "not base64!"}, -1022),
        (lambda p, t: p | {"apiKey": "unknownKey"}, -2015),
        (lambda p, t: p | {"apiKey": "bad key&=x"}, -2014),
        (lambda p, t: {k: v for k, v in p.items() if k != "timestamp"}, -1102),
        (lambda p, t: {k: v for k, v in p.items() if k != "signature"}, -1102),
    ],
)
def test_logon_errors(mutate: Callable[[dict[str, str], int], dict[str, str]], code: int) -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        resp = await c.call("session.logon", mutate(signed({}, clock()), clock()))
        assert resp["status"] == 400
        assert resp["error"]["code"] == code
        assert (await c.ok("session.status"))["apiKey"] is None

    scenario(body)


def test_logon_timestamp_window() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        old = await c.call("session.logon", signed({}, clock() - 5001))
        assert old["error"] == {
            "code": -1021,
            "msg": "Timestamp for this request is outside of the recvWindow.",
        }
        ahead = await c.call("session.logon", signed({}, clock() + 1000))
        assert ahead["error"]["code"] == -1021
        ok = await c.call("session.logon", signed({"recvWindow": "10000"}, clock() - 9000))
        assert ok["status"] == 200
        micros = await c.call("session.logon", signed({}, clock() * 1000 + 5))
        assert micros["status"] == 200
        big = await c.call("session.logon", signed({"recvWindow": "60001"}, clock()))
        assert big["error"]["code"] == -1131
        # the -1022 capture's envelope has exactly our keys
        live = orjson.loads((FIXTURES / "wsapi/session_logon_error_-1022.json").read_bytes())
        bad = await c.call("session.logon", signed({}, clock()) | {"signature": sign(SK2, {})})
        assert set(bad) == set(live)
        assert bad["error"] == live["error"]

    scenario(body)


def test_reject_logons_fault() -> None:
    faults = Faults(reject_logons=2)

    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        for _ in range(2):
            resp = await c.call("session.logon", signed({}, clock()))
            assert resp["error"]["code"] == -1022
        await c.logon()
        assert faults.reject_logons == 0
        assert faults.fired.get("reject_logons") == 2

    scenario(body, faults)


def test_signed_requests_without_session() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        resp = await c.call("account.status", c.ts())
        assert resp["error"]["code"] == -1102
        assert "apiKey" in resp["error"]["msg"]
        acct = await c.ok("account.status", signed({}, clock()))
        assert acct["balances"]
        # another key on the same connection, per request
        acct2 = await c.ok("account.status", signed({}, clock(), SK2, KEY2))
        assert acct2["uid"] != acct["uid"]
        await c.logon()
        resp = await c.call("account.status", {})
        assert resp["error"]["code"] == -1102  # timestamp still required after logon
        old = await c.call("account.status", {"timestamp": clock() - 6000})
        assert old["error"]["code"] == -1021

    scenario(body)


# ---------------------------------------------------------------------------- trading + user data


def test_order_lifecycle_with_user_data_events() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        sub = await c.call("userDataStream.subscribe")
        assert sub["result"] == fixture("wsapi/userDataStream_subscribe.json")["result"]
        assert (await c.ok("session.status"))["userDataStream"] is True
        bid, _, ask, ask_qty = best(service)
        placed = await c.call("order.place", limit("BUY", bid - 10, newClientOrderId="r1") | c.ts())
        assert placed["status"] == 200
        kinds = [r["rateLimitType"] + r["interval"] for r in placed["rateLimits"]]
        assert kinds == ["ORDERSSECOND", "ORDERSDAY", "REQUEST_WEIGHTMINUTE"]
        assert placed["rateLimits"][0]["count"] == 1
        res = placed["result"]
        assert res["status"] == "NEW"
        new = await c.wait_event(lambda e: e["event"].get("x") == "NEW")
        assert new["subscriptionId"] == 0
        assert new["event"]["c"] == "r1"
        assert new["event"]["i"] == res["orderId"]
        pos = await c.wait_event(lambda e: e["event"]["e"] == "outboundAccountPosition")
        assert {b["a"] for b in pos["event"]["B"]} == {"BTC", "USDT"}
        # marketable order: TRADE report after the fill, decimals as strings
        qty = str(min(ask_qty, Decimal("0.01")))
        filled = await c.ok("order.place", limit("BUY", ask, qty) | c.ts())
        assert filled["status"] == "FILLED"
        trade = await c.wait_event(lambda e: e["event"].get("x") == "TRADE")
        assert trade["event"]["X"] == "FILLED"
        assert trade["event"]["L"] == f"{ask:.8f}"
        assert isinstance(trade["event"]["z"], str)
        st = await c.ok("order.status", {"symbol": "BTCUSDT", "origClientOrderId": "r1"} | c.ts())
        assert st["orderId"] == res["orderId"]
        opened = await c.ok("openOrders.status", {"symbol": "BTCUSDT"} | c.ts())
        assert [o["clientOrderId"] for o in opened] == ["r1"]
        canceled = await c.ok(
            "order.cancel", {"symbol": "BTCUSDT", "orderId": res["orderId"]} | c.ts()
        )
        assert canceled["status"] == "CANCELED"
        ev = await c.wait_event(lambda e: e["event"].get("x") == "CANCELED")
        assert ev["event"]["C"] == "r1"
        again = await c.call(
            "order.cancel", {"symbol": "BTCUSDT", "orderId": res["orderId"]} | c.ts()
        )
        assert again["error"] == {"code": -2011, "msg": "Unknown order sent."}
        unknown = await c.call("order.status", {"symbol": "BTCUSDT", "orderId": 424242} | c.ts())
        assert unknown["error"]["code"] == -2013
        acct = await c.ok("account.status", c.ts())
        btc = next(b for b in acct["balances"] if b["asset"] == "BTC")
        assert Decimal(btc["free"]) == 100 + Decimal(qty)

    scenario(body)


def test_order_errors_over_the_wire() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        bid, _, ask, _ = best(service)
        cases = [
            ({"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT"}, -1102),
            (limit("BUY", "1.001"), -1013),
            (limit("BUY", bid, "0.000000001"), -1111),
            (limit("BUY", bid) | {"symbol": "XXXYYY"}, -1121),
            (limit("BUY", bid, "50"), -2010),  # 50 BTC * 60000 > 1,000,000 USDT
        ]
        for params, code in cases:
            resp = await c.call("order.place", params | c.ts())
            assert (resp["status"], resp["error"]["code"]) == (400, code), params
        maker = {
            "symbol": "BTCUSDT",
            "side": "BUY",
            "type": "LIMIT_MAKER",
            "price": str(ask),
            "quantity": "0.01",
        }
        resp = await c.call("order.place", maker | c.ts())
        assert resp["error"] == {"code": -2010, "msg": "Order would immediately match and take."}
        p = limit("BUY", bid - 20, newClientOrderId="d") | c.ts()
        assert (await c.call("order.place", p))["status"] == 200
        resp = await c.call("order.place", p)
        assert resp["error"] == {"code": -2010, "msg": "Duplicate order sent."}
        assert await c.ok("order.test", limit("BUY", bid - 20) | c.ts()) == {}
        resp = await c.call("order.test", limit("BUY", "1.001") | c.ts())
        assert resp["error"]["code"] == -1013
        assert len(service.venue.open_orders(KEY, {})) == 1  # order.test placed nothing

    scenario(body)


def test_numbers_as_json_numbers_are_signed_as_sent() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        bid = best(service)[0] - 100
        price_text = f"{bid:.2f}0"  # trailing zero: float() would lose it
        params = {
            "apiKey": KEY,
            "price": price_text,
            "quantity": "0.0100",
            "side": "BUY",
            "symbol": "BTCUSDT",
            "timeInForce": "GTC",
            "timestamp": str(clock()),
            "type": "LIMIT",
            "recvWindow": "5000",
        }
        sig = sign(SK, params)
        raw = (
            '{"id":"n1","method":"order.place","params":{"symbol":"BTCUSDT","side":"BUY",'
            f'"type":"LIMIT","timeInForce":"GTC","price":{price_text},"quantity":0.0100,'
            f'"recvWindow":5000,"timestamp":{clock()},"apiKey":"{KEY}","signature":"{sig}"}}}}'
        )
        resp = await c.send_raw(raw)
        assert resp["status"] == 200, resp
        assert resp["result"]["price"] == f"{bid:.8f}"
        # a boolean is signed as true/false
        p = signed(
            {"symbol": "BTCUSDT", "orderId": resp["result"]["orderId"], "returnRateLimits": "true"},
            clock(),
        )
        p["returnRateLimits"] = True  # JSON true, signed text "true"
        assert (await c.call("order.status", p))["status"] == 200

    scenario(body)


def test_resting_order_filled_by_walk_pushes_events() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        await c.ok("userDataStream.subscribe")
        bid = best(service)[0]
        res = await c.ok("order.place", limit("SELL", bid + Decimal("0.01"), "0.001") | c.ts())
        market = service.market
        for i in range(300):
            market.step("BTCUSDT", clock() + i, 1)
            if not service.venue.open_orders(KEY, {}):
                break
        ev = await c.wait_event(lambda e: e["event"].get("x") == "TRADE")
        assert ev["event"]["i"] == res["orderId"]
        assert ev["event"]["m"] is True
        st = await c.ok("order.status", {"symbol": "BTCUSDT", "orderId": res["orderId"]} | c.ts())
        assert st["status"] == "FILLED"

    scenario(body)


def test_user_data_stream_subscription_rules() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        resp = await c.call("userDataStream.subscribe")
        assert resp["error"]["code"] == -1002
        await c.logon()
        assert (await c.ok("userDataStream.subscribe"))["subscriptionId"] == 0
        resp = await c.call("userDataStream.subscribe")
        assert resp["error"]["code"] == -2035
        # a second account on the same connection via .signature
        sub = await c.ok("userDataStream.subscribe.signature", signed({}, clock(), SK2, KEY2))
        assert sub == {"subscriptionId": 1}
        assert await c.ok("session.subscriptions") == [{"subscriptionId": 0}, {"subscriptionId": 1}]
        assert await c.ok("userDataStream.unsubscribe", {"subscriptionId": 1}) == {}
        term = c.events.pop()
        assert term == {"subscriptionId": 1, "event": {"e": "eventStreamTerminated", "E": clock()}}
        live = orjson.loads((FIXTURES / "userdata/eventStreamTerminated.json").read_bytes())
        assert set(term) == set(live)
        assert set(term["event"]) == set(live["event"])
        resp = await c.call("userDataStream.unsubscribe", {"subscriptionId": 1})
        assert resp["error"]["code"] == -2036
        await c.ok("session.logout")  # ends the logon subscription
        assert c.events.pop()["event"]["e"] == "eventStreamTerminated"
        assert await c.ok("session.subscriptions") == []
        resp = await c.call("userDataStream.unsubscribe")
        assert resp["error"]["code"] == -2036

    scenario(body)


def test_reconnect_needs_new_logon_but_orders_survive() -> None:
    async def go() -> None:
        clock = Clock()
        async with venue_server(clock) as (service, url):
            async with client(url, clock) as c:
                await c.logon()
                await c.ok("userDataStream.subscribe")
                bid = best(service)[0]
                res = await c.ok("order.place", limit("BUY", bid - 30) | c.ts())
            async with client(url, clock) as c2:
                assert (await c2.ok("session.status"))["apiKey"] is None
                assert (
                    await c2.call(
                        "order.status", {"symbol": "BTCUSDT", "orderId": res["orderId"]} | c2.ts()
                    )
                )["error"]["code"] == -1102
                await c2.logon()
                st = await c2.ok(
                    "order.status", {"symbol": "BTCUSDT", "orderId": res["orderId"]} | c2.ts()
                )
                assert st["status"] == "NEW"
                for _ in range(50):  # the old connection's teardown runs on the server side
                    if not service._subs:
                        break
                    await asyncio.sleep(0.01)
                assert service._subs == {}
                state = service.state()
                assert list(state["open_orders"]) == [st["clientOrderId"]]

    run(go())


# ---------------------------------------------------------------------------- cancelReplace


def test_cancel_replace_over_the_wire() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        bid, _, ask, _ = best(service)
        await c.ok("order.place", limit("BUY", bid - 10, newClientOrderId="o1") | c.ts())
        base = {
            "symbol": "BTCUSDT",
            "side": "BUY",
            "type": "LIMIT",
            "timeInForce": "GTC",
            "quantity": "0.01",
        }
        res = await c.ok(
            "order.cancelReplace",
            base
            | c.ts()
            | {
                "cancelReplaceMode": "STOP_ON_FAILURE",
                "cancelOrigClientOrderId": "o1",
                "price": str(bid - 5),
                "newClientOrderId": "o2",
            },
        )
        doc = orjson.loads((FIXTURES / "wsapi/docs/order_cancelReplace_success.json").read_bytes())
        assert set(res) == set(doc["result"])
        assert set(doc["result"]["cancelResponse"]) <= set(res["cancelResponse"])
        resp = await c.call(
            "order.cancelReplace",
            base
            | c.ts()
            | {
                "cancelReplaceMode": "STOP_ON_FAILURE",
                "cancelOrigClientOrderId": "gone",
                "price": str(bid - 5),
            },
        )
        stop = orjson.loads(
            (
                FIXTURES / "wsapi/docs/order_cancelReplace_400_cancel_failed_STOP_ON_FAILURE.json"
            ).read_bytes()
        )
        assert resp["status"] == 400
        assert resp["error"] == stop["error"]
        maker = {k: v for k, v in base.items() if k != "timeInForce"} | {"type": "LIMIT_MAKER"}
        resp = await c.call(
            "order.cancelReplace",
            maker
            | c.ts()
            | {
                "cancelReplaceMode": "STOP_ON_FAILURE",
                "cancelOrigClientOrderId": "o2",
                "price": str(ask),
            },
        )
        part = orjson.loads(
            (FIXTURES / "wsapi/docs/order_cancelReplace_409_new_order_failed.json").read_bytes()
        )
        assert resp["status"] == 409
        assert resp["error"]["code"] == -2021
        assert set(resp["error"]["data"]) == set(part["error"]["data"])
        assert (
            resp["error"]["data"]["newOrderResponse"] == part["error"]["data"]["newOrderResponse"]
        )
        assert resp["error"]["data"]["cancelResponse"]["status"] == "CANCELED"
        # ALLOW_FAILURE: unknown cancel + a new order that would take -> both failed, 400 -2022
        resp = await c.call(
            "order.cancelReplace",
            maker
            | c.ts()
            | {"cancelReplaceMode": "ALLOW_FAILURE", "cancelOrderId": 999, "price": str(ask)},
        )
        both = fixture("wsapi/docs/order_cancelReplace_400_both_failed.json")
        assert resp["status"] == both["status"]
        assert resp["error"] == both["error"]
        # ALLOW_FAILURE: unknown cancel + a good new order -> 409 -2021, order placed
        resp = await c.call(
            "order.cancelReplace",
            base
            | c.ts()
            | {"cancelReplaceMode": "ALLOW_FAILURE", "cancelOrderId": 999, "price": str(bid - 7)},
        )
        placed = fixture("wsapi/docs/order_cancelReplace_409_cancel_failed_new_order_placed.json")
        assert resp["status"] == placed["status"]
        assert resp["error"]["code"] == placed["error"]["code"]
        data, doc_data = resp["error"]["data"], placed["error"]["data"]
        assert data["cancelResponse"] == doc_data["cancelResponse"]
        assert (data["cancelResult"], data["newOrderResult"]) == ("FAILURE", "SUCCESS")
        assert set(doc_data["newOrderResponse"]) <= set(data["newOrderResponse"])
        live = fixture("wsapi/order_cancelReplace_success.json")["result"]
        assert set(live["newOrderResponse"]) <= set(data["newOrderResponse"])

    scenario(body)


# ---------------------------------------------------------------------------- rate limits


def test_weight_limit_429_then_418_ban_and_disconnect() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        # connect = 2; 8 pings fill the limit of 10
        for _ in range(8):
            assert (await c.call("ping"))["status"] == 200
        resp = await c.call("ping")
        assert resp["status"] == 429
        assert resp["error"]["code"] == -1003
        next_minute = T0 - T0 % 60_000 + 60_000
        assert resp["error"]["data"] == {"serverTime": T0, "retryAfter": next_minute}
        resp = await c.call("ping")  # the one request of grace
        assert resp["status"] == 429
        resp = await c.call("ping")
        assert resp["status"] == 418
        assert resp["error"]["data"]["retryAfter"] == T0 + 120_000
        assert "IP banned until" in resp["error"]["msg"]
        doc = fixture("wsapi/docs/error_418_ip_banned.json")
        assert set(resp) == set(doc)
        assert set(resp["error"]["data"]) == set(doc["error"]["data"])
        with pytest.raises(ConnectionClosed):
            await c.ws.recv()
        assert service.state()["banned_ips"] == ["127.0.0.1"]

    scenario(body, weight_per_minute=10)


def test_weight_429_respected_is_not_banned() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        for _ in range(8):
            await c.call("ping")
        resp = await c.call("ping")
        assert resp["status"] == 429
        clock.t = resp["error"]["data"]["retryAfter"]  # the client waited as told
        assert (await c.call("ping"))["status"] == 200

    scenario(body, weight_per_minute=10)


def test_order_count_limit() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        bid = best(service)[0]
        ids = [
            (await c.ok("order.place", limit("BUY", bid - 10 - i) | c.ts()))["orderId"]
            for i in range(3)
        ]
        resp = await c.call("order.place", limit("BUY", bid - 20) | c.ts())
        assert resp["status"] == 429
        assert resp["error"]["code"] == -1015
        assert (
            resp["error"]["msg"] == "Too many new orders; current limit is 3 orders per 10 SECOND."
        )
        assert resp["error"]["data"]["retryAfter"] == T0 - T0 % 10_000 + 10_000
        assert resp["rateLimits"][0]["count"] == 3
        doc = fixture("wsapi/docs/order_cancelReplace_429_DO_NOTHING.json")
        assert (resp["status"], resp["error"]["code"]) == (doc["status"], doc["error"]["code"])
        assert [r["interval"] for r in resp["rateLimits"]] == [
            r["interval"] for r in doc["rateLimits"]
        ]
        assert len(service.venue.open_orders(KEY, {})) == 3
        # cancels are not orders; CANCEL_ONLY cancels and fails the new leg with -1015
        resp = await c.call(
            "order.cancelReplace",
            limit("BUY", bid - 30)
            | c.ts()
            | {
                "cancelReplaceMode": "STOP_ON_FAILURE",
                "cancelOrderId": ids[0],
                "orderRateLimitExceededMode": "CANCEL_ONLY",
            },
        )
        assert resp["status"] == 409
        assert resp["error"]["data"]["newOrderResponse"]["code"] == -1015
        doc = fixture("wsapi/docs/order_cancelReplace_409_CANCEL_ONLY.json")
        assert set(resp["error"]["data"]) == set(doc["error"]["data"])
        assert set(doc["error"]["data"]["cancelResponse"]) <= set(
            resp["error"]["data"]["cancelResponse"]
        )
        assert resp["error"]["data"]["cancelResult"] == "SUCCESS"
        clock.t += 10_000
        assert (await c.call("order.place", limit("BUY", bid - 20) | c.ts()))["status"] == 200

    scenario(body, orders_per_10s=3)


# ---------------------------------------------------------------------------- faults


def test_fault_minus_1007_places_the_order_exactly_once() -> None:
    faults = Faults(order_fault="-1007", order_fault_count=1)

    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        await c.ok("userDataStream.subscribe")
        bid = best(service)[0]
        p = limit("BUY", bid - 10, newClientOrderId="unk1") | c.ts()
        resp = await c.call("order.place", p)
        assert resp["status"] == 408
        assert resp["error"]["code"] == -1007
        assert "execution status unknown" in resp["error"]["msg"]
        # the client reconciles: the order IS there, once
        st = await c.ok("order.status", {"symbol": "BTCUSDT", "origClientOrderId": "unk1"} | c.ts())
        assert st["status"] == "NEW"
        retry = await c.call("order.place", p)  # a blind retry is a duplicate
        assert retry["error"]["code"] == -2010
        opened = await c.ok("openOrders.status", c.ts())
        assert [o["clientOrderId"] for o in opened] == ["unk1"]
        assert faults.order_fault_count == 0
        await c.wait_event(lambda e: e["event"].get("c") == "unk1")

    scenario(body, faults)


@pytest.mark.parametrize(("kind", "status", "code"), [("5xx", 500, -1000), ("429", 429, -1003)])
def test_order_faults_that_place_nothing(kind: str, status: int, code: int) -> None:
    faults = Faults(order_fault=kind, order_fault_count=1)

    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        bid = best(service)[0]
        p = limit("BUY", bid - 10, newClientOrderId="f1") | c.ts()
        resp = await c.call("order.place", p)
        assert (resp["status"], resp["error"]["code"]) == (status, code)
        assert service.venue.open_orders(KEY, {}) == []
        if kind == "429":
            clock.t = resp["error"]["data"]["retryAfter"]
        assert (await c.call("order.place", p | c.ts()))["status"] == 200

    scenario(body, faults)


def test_events_follow_the_response_without_delay() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        await c.ok("userDataStream.subscribe")
        bid = best(service)[0]
        msg = {"id": "p", "method": "order.place", "params": limit("BUY", bid - 10) | c.ts()}
        await c.ws.send(json.dumps(msg))
        first = json.loads(await c.ws.recv())
        assert first["id"] == "p"
        second = json.loads(await c.ws.recv())
        assert second["event"]["x"] == "NEW"
        assert second["event"]["i"] == first["result"]["orderId"]

    scenario(body)


def test_wsapi_delay_sends_events_before_the_response() -> None:
    faults = Faults(wsapi_delay_ms=300)

    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        await c.ok("userDataStream.subscribe")
        bid = best(service)[0]
        await c.ws.send(
            json.dumps(
                {"id": "d", "method": "order.place", "params": limit("BUY", bid - 10) | c.ts()}
            )
        )
        first = json.loads(await c.ws.recv())
        assert "event" in first  # state changed on receipt; only the response waits
        resp = await c.next_response()
        assert resp["id"] == "d"
        assert resp["status"] == 200

    scenario(body, faults)


# ---------------------------------------------------------------------------- full simulator


def test_through_the_sim_server() -> None:
    from pipeline.sim.testing import SimServer

    async def go() -> None:
        async with SimServer(
            symbols=["BTCUSDT"], api_keys={KEY: bytes(SK.verify_key)}, rate=50.0
        ) as sim:
            clock = Clock(0)
            async with connect(sim.wsapi_url) as ws:
                c = Client(ws, clock)
                now = (await c.ok("time"))["serverTime"]
                clock.t = now
                await c.logon()
                await c.ok("userDataStream.subscribe")
                bid = sim.market.best("BTCUSDT")[0]
                res = await c.ok("order.place", limit("BUY", bid - 50) | c.ts())
                ev = await c.wait_event(lambda e: e["event"].get("x") == "NEW")
                assert ev["event"]["i"] == res["orderId"]
                st = await c.ok(
                    "order.status", {"symbol": "BTCUSDT", "orderId": res["orderId"]} | c.ts()
                )
                assert st["status"] in ("NEW", "PARTIALLY_FILLED", "FILLED")

    run(go())


def test_cancel_all_rate_limit_query_and_key_switch() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        await c.ok("userDataStream.subscribe")
        bid = best(service)[0]
        for i in range(2):
            await c.ok("order.place", limit("BUY", bid - 10 - i) | c.ts())
        first = (await c.ok("openOrders.status", c.ts()))[0]
        amended = await c.ok(
            "order.amend.keepPriority",
            {"symbol": "BTCUSDT", "orderId": first["orderId"], "newQty": "0.005"} | c.ts(),
        )
        assert amended["amendedOrder"]["qty"] == "0.00500000"
        ev = await c.wait_event(lambda e: e["event"].get("x") == "REPLACED")
        assert ev["event"]["i"] == first["orderId"]
        orders = await c.ok("account.rateLimits.orders", c.ts())
        assert [(o["interval"], o["count"]) for o in orders] == [("SECOND", 2), ("DAY", 2)]
        canceled = await c.ok("openOrders.cancelAll", {"symbol": "BTCUSDT"} | c.ts())
        live = orjson.loads((FIXTURES / "wsapi/openOrders_cancelAll.json").read_bytes())
        assert [set(r) for r in canceled] == [set(live["result"][0])] * 2
        resp = await c.call("openOrders.cancelAll", {"symbol": "BTCUSDT"} | c.ts())
        assert resp["error"]["code"] == -2011
        empty = await c.call("openOrders.status", c.ts())
        live_empty = fixture("wsapi/openOrders_status_empty.json")
        assert set(empty) == set(live_empty)
        assert empty["result"] == live_empty["result"]
        # logging on with another key ends the first key's logon subscription
        c.events.clear()
        res = await c.logon(SK2, KEY2)
        assert res["apiKey"] == KEY2
        assert res["userDataStream"] is False
        assert c.events[-1]["event"]["e"] == "eventStreamTerminated"

    scenario(body)


def test_parse_public_key_formats() -> None:
    key = load_pem_private_key(REF_PEM, password=None).public_key()
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    raw = bytes.fromhex(REF_PUB_HEX)
    assert parse_public_key(pem) == raw
    assert parse_public_key(pem.decode()) == raw
    assert parse_public_key(REF_PUB_HEX) == raw
    assert parse_public_key(base64.b64encode(raw).decode()) == raw
    assert parse_public_key(raw) == raw
    with pytest.raises(ValueError, match="PUBLIC"):
        parse_public_key(REF_PEM)
    with pytest.raises(ValueError, match="Ed25519"):
        parse_public_key(base64.b64encode(b"x" * 40).decode())


def test_unfilled_order_count_rules() -> None:
    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        bid, _, ask, _ = best(service)

        async def count() -> int:
            orders = await c.ok("account.rateLimits.orders", c.ts())
            return int(orders[0]["count"])

        rejected = await c.call("order.place", limit("BUY", "1.001") | c.ts())
        assert rejected["error"]["code"] == -1013
        assert await count() == 0  # refused orders do not count
        await c.ok("order.place", limit("BUY", ask, "0.001") | c.ts())
        assert await count() == 0  # filled at once: off the unfilled count again
        res = await c.ok("order.place", limit("BUY", bid - 1, "0.002") | c.ts())
        assert await count() == 1
        service.venue.on_public_trade("BTCUSDT", bid - 1, Decimal("0.001"), clock())
        assert await count() == 0  # first (partial) fill of a resting order
        service.venue.on_public_trade("BTCUSDT", bid - 1, Decimal("0.001"), clock())
        assert await count() == 0
        st = await c.ok("order.status", {"symbol": "BTCUSDT", "orderId": res["orderId"]} | c.ts())
        assert st["status"] == "FILLED"

    scenario(body)


# ---------------------------------------------------------------------------- 2026 changelog


def test_successful_order_requests_weigh_nothing_failed_ones_do() -> None:
    """Since 2026-04-02 a successful order.place / cancel / cancelReplace / amend weighs 0 on
    the WS API (binance-protocol.md 7.2); a failed one still costs its weight."""

    def used(resp: dict[str, Any]) -> int:
        return next(r["count"] for r in resp["rateLimits"]
                    if r["rateLimitType"] == "REQUEST_WEIGHT")

    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        base = used(await c.call("ping"))  # connect 2 + logon 2 + ping 1
        assert base == 5
        bid = best(service)[0]
        placed = await c.call("order.place", limit("BUY", bid - 10, newClientOrderId="w1")
                              | c.ts())
        assert placed["status"] == 200
        assert used(placed) == base
        amended = await c.call("order.amend.keepPriority", {
            "symbol": "BTCUSDT", "origClientOrderId": "w1", "newQty": "0.005"} | c.ts())
        assert amended["status"] == 200
        assert used(amended) == base
        replaced = await c.call("order.cancelReplace", limit("BUY", bid - 11) | c.ts() | {
            "cancelReplaceMode": "STOP_ON_FAILURE", "cancelOrigClientOrderId": "w1",
            "newClientOrderId": "w2"})
        assert replaced["status"] == 200
        assert used(replaced) == base
        canceled = await c.call("order.cancel", {"symbol": "BTCUSDT",
                                                 "origClientOrderId": "w2"} | c.ts())
        assert canceled["status"] == 200
        assert used(canceled) == base
        # failures still count: a cancel of nothing (1), a place the filters refuse (1)
        gone = await c.call("order.cancel", {"symbol": "BTCUSDT",
                                             "origClientOrderId": "w2"} | c.ts())
        assert gone["status"] == 400
        assert used(gone) == base + 1
        refused = await c.call("order.place", limit("BUY", bid - 10, qty="0") | c.ts())
        assert refused["status"] == 400
        assert used(refused) == base + 2
        # other methods keep their weight
        assert used(await c.call("order.status", {"symbol": "BTCUSDT",
                                                  "origClientOrderId": "w2"} | c.ts())) \
            == base + 2 + 4

    scenario(body)


def test_rate_limits_advertise_raw_requests_300000() -> None:
    """exchangeInfo's rateLimits (the WS API service's, which it enforces) carry RAW_REQUESTS
    300,000 per 5 minutes (was 61,000)."""
    service = WsApiService(Market(["BTCUSDT"], seed=1), {}, Faults(), Clock())
    raw = [e for e in service.rate_limits_info() if e["rateLimitType"] == "RAW_REQUESTS"]
    assert raw == [{"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5,
                    "limit": 300_000}]


def test_rest_exchange_info_says_raw_requests_300000() -> None:
    from pipeline.sim.testing import SimServer, http_json

    async def go() -> None:
        async with SimServer(symbols=["BTCUSDT"]) as sim:
            status, body = await http_json(f"{sim.rest_url}/api/v3/exchangeInfo")
            assert status == 200
            raw = [r for r in body["rateLimits"] if r["rateLimitType"] == "RAW_REQUESTS"]
            assert raw == [{"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE",
                            "intervalNum": 5, "limit": 300_000}]

    run(go())
