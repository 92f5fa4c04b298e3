"""Pure tests of the simulated exchange core (pipeline.sim.venue): no sockets, no clock.

The market is the real seeded :class:`pipeline.sim.market.Market`; without ``step`` calls its
book is static, so every expectation below is computed from ``market.best``/``market.top``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.sim.market import Market, Trade
from pipeline.sim.venue import Venue, VenueError, fmt

NOW = 1_700_000_000_000
ACC = "alice"
D = Decimal


@pytest.fixture
def market() -> Market:
    return Market(["BTCUSDT", "ETHUSDT"], seed=1)


@pytest.fixture
def venue(market: Market) -> Venue:
    return Venue(market, [ACC, "bob"])


def limit(side: str, price: str, qty: str, tif: str = "GTC", **extra: str) -> dict[str, str]:
    p = {
        "symbol": "BTCUSDT",
        "side": side,
        "type": "LIMIT",
        "timeInForce": tif,
        "price": price,
        "quantity": qty,
    }
    p.update(extra)
    return p


def bal(v: Venue, asset: str, account: str = ACC) -> tuple[Decimal, Decimal]:
    b = v.accounts[account].bal(asset)
    return b.free, b.locked


def kinds(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [e["x"] if e["e"] == "executionReport" else e["e"] for _, e in events]


def errcode(exc: pytest.ExceptionInfo[VenueError]) -> tuple[int, str]:
    return exc.value.code, exc.value.msg


# ---------------------------------------------------------------------------- filters, params


@pytest.mark.parametrize(
    ("params", "code", "msg"),
    [
        ({"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT"}, -1102, "timeInForce"),
        (limit("BUY", "50000", "0.001") | {"price": ""}, -1102, "'price'"),
        (limit("BUY", "50000", "0.001") | {"symbol": "NOPE"}, -1121, "Invalid symbol."),
        (limit("BUY", "50000.001", "0.001"), -1013, "Filter failure: PRICE_FILTER"),
        (limit("BUY", "50000", "0.000001"), -1013, "Filter failure: LOT_SIZE"),
        (limit("BUY", "50000", "9001"), -1013, "Filter failure: LOT_SIZE"),
        (limit("BUY", "100", "0.001"), -1013, "Filter failure: NOTIONAL"),
        (
            limit("BUY", "50000", "0.000000001"),
            -1111,
            "Parameter 'quantity' has too much precision.",
        ),
        (limit("BUY", "5e4", "0.001"), -1100, "'price'"),
        (limit("BUY", "-1", "0.001"), -1100, "'price'"),
        (limit("UP", "50000", "0.001"), -1117, "Invalid side."),
        (limit("BUY", "50000", "0.001", tif="DAY"), -1115, "Invalid timeInForce."),
        (limit("BUY", "50000", "0.001") | {"type": "STOP_LOSS"}, -1116, "Invalid orderType."),
        (limit("BUY", "50000", "0.001") | {"newClientOrderId": "bad id!"}, -1100, "legal range"),
        (
            {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "1", "price": "1"},
            -1106,
            "'price'",
        ),
        ({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET"}, -1102, "'quantity'"),
    ],
)
def test_place_rejects_bad_params_and_filters(
    venue: Venue, params: dict[str, str], code: int, msg: str
) -> None:
    before = bal(venue, "USDT")
    with pytest.raises(VenueError) as exc:
        venue.place(ACC, params, NOW)
    assert exc.value.code == code
    assert msg in exc.value.msg
    assert exc.value.status == 400
    assert bal(venue, "USDT") == before
    assert venue.open_order_count() == 0


def test_trailing_zeros_are_not_extra_precision(venue: Venue) -> None:
    result, _ = venue.place(ACC, limit("BUY", "50000.0100000000", "0.00100000"), NOW)
    assert result["price"] == "50000.01000000"


# ---------------------------------------------------------------------------- LIMIT resting


def test_limit_rests_locks_funds_and_reports(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    price = bid - D("10")
    result, events = venue.place(ACC, limit("BUY", str(price), "0.5", newClientOrderId="c1"), NOW)
    assert result["status"] == "NEW"
    assert result["fills"] == []
    assert result["clientOrderId"] == "c1"
    assert result["orderListId"] == -1
    assert result["workingTime"] == NOW
    assert kinds(events) == ["NEW", "outboundAccountPosition"]
    new = events[0][1]
    assert new["c"] == "c1"
    assert new["C"] == ""
    assert new["X"] == "NEW"
    assert new["w"] is True
    assert new["p"] == fmt(price)
    assert new["q"] == "0.50000000"
    assert new["t"] == -1
    assert new["N"] is None
    cost = price * D("0.5")
    assert bal(venue, "USDT") == (D(1_000_000) - cost, cost)
    pos = events[1][1]
    usdt = next(b for b in pos["B"] if b["a"] == "USDT")
    assert usdt == {"a": "USDT", "f": fmt(D(1_000_000) - cost), "l": fmt(cost)}


def test_default_resp_types(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    res, _ = venue.place(ACC, limit("BUY", str(bid - 5), "0.01"), NOW)
    assert "fills" in res  # LIMIT defaults to FULL
    maker = limit("BUY", str(bid - 6), "0.01") | {"type": "LIMIT_MAKER"}
    del maker["timeInForce"]
    res, _ = venue.place(ACC, maker, NOW)
    assert set(res) == {"symbol", "orderId", "orderListId", "clientOrderId", "transactTime"}
    res, _ = venue.place(ACC, limit("BUY", str(bid - 7), "0.01", newOrderRespType="RESULT"), NOW)
    assert "fills" not in res
    assert res["status"] == "NEW"


def test_duplicate_open_client_id_rejected_then_reusable(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    p = limit("BUY", str(bid - 10), "0.01", newClientOrderId="dup")
    venue.place(ACC, p, NOW)
    with pytest.raises(VenueError) as exc:
        venue.place(ACC, p, NOW)
    assert errcode(exc) == (-2010, "Duplicate order sent.")
    # another account may use the same id
    venue.place("bob", p, NOW)
    venue.cancel(ACC, {"symbol": "BTCUSDT", "origClientOrderId": "dup"}, NOW)
    res, _ = venue.place(ACC, p, NOW + 1)  # closed orders free their id
    assert res["status"] == "NEW"


def test_insufficient_balance(market: Market) -> None:
    v = Venue(market, [ACC], quote_balance=100, base_balance=0)
    bid = market.best("BTCUSDT")[0]
    with pytest.raises(VenueError) as exc:
        v.place(ACC, limit("BUY", str(bid - 10), "0.01"), NOW)
    assert errcode(exc) == (-2010, "Account has insufficient balance for requested action.")
    with pytest.raises(VenueError) as exc:
        v.place(ACC, limit("SELL", str(bid + 1000), "0.01"), NOW)
    assert exc.value.code == -2010
    assert v.counters["orders_rejected"] == 2


def test_limit_maker_that_would_take_is_rejected(venue: Venue, market: Market) -> None:
    ask = market.best("BTCUSDT")[2]
    p = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "type": "LIMIT_MAKER",
        "price": str(ask),
        "quantity": "0.01",
    }
    with pytest.raises(VenueError) as exc:
        venue.place(ACC, p, NOW)
    assert errcode(exc) == (-2010, "Order would immediately match and take.")
    assert market.best("BTCUSDT")[2] == ask  # nothing taken


# ---------------------------------------------------------------------------- taker orders


def test_marketable_limit_fills_against_book(venue: Venue, market: Market) -> None:
    _bid, _bq, ask, ask_qty = market.best("BTCUSDT")
    qty = ask_qty / 2
    qty = qty - qty % D("0.00001")
    res, events = venue.place(ACC, limit("BUY", str(ask + 100), str(qty)), NOW)
    assert res["status"] == "FILLED"
    assert res["executedQty"] == fmt(qty)
    assert [f["price"] for f in res["fills"]] == [fmt(ask)]
    assert res["cummulativeQuoteQty"] == fmt(ask * qty)
    assert kinds(events) == ["NEW", "TRADE", "outboundAccountPosition"]
    trade = events[1][1]
    assert trade["X"] == "FILLED"
    assert trade["L"] == fmt(ask)
    assert trade["l"] == fmt(qty)
    assert trade["m"] is False
    assert trade["t"] == res["fills"][0]["tradeId"]
    assert trade["Y"] == fmt(ask * qty)
    # filled at the ask, not at the limit: the rest of the reservation is released
    assert bal(venue, "USDT") == (D(1_000_000) - ask * qty, D(0))
    assert bal(venue, "BTC") == (D(100) + qty, D(0))
    assert market.best("BTCUSDT")[3] == ask_qty - qty  # book liquidity was consumed
    assert venue.open_order_count() == 0


def test_market_buy_walks_levels(venue: Venue, market: Market) -> None:
    _, asks = market.top("BTCUSDT", 3)[1:]
    two_levels = D(asks[0][1] + asks[1][1]) / D(10**8)
    p = {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": str(two_levels)}
    res, events = venue.place(ACC, p, NOW)
    assert res["status"] == "FILLED"
    assert res["price"] == "0.00000000"
    assert len(res["fills"]) >= 2
    assert D(res["executedQty"]) == two_levels
    cost = sum(D(f["price"]) * D(f["qty"]) for f in res["fills"])
    assert D(res["cummulativeQuoteQty"]) == cost
    assert bal(venue, "USDT")[0] == D(1_000_000) - cost
    assert kinds(events).count("TRADE") == len(res["fills"])


def test_market_sell_by_quote_qty(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    p = {"symbol": "BTCUSDT", "side": "SELL", "type": "MARKET", "quoteOrderQty": "600"}
    res, _ = venue.place(ACC, p, NOW)
    assert res["origQuoteOrderQty"] == "600.00000000"
    assert D(res["executedQty"]) == (D(600) / bid).quantize(D("0.00001"), rounding="ROUND_DOWN")
    assert res["status"] == "FILLED"


def test_ioc_partial_fill_expires_remainder(venue: Venue, market: Market) -> None:
    _, _, ask, ask_qty = market.best("BTCUSDT")
    res, events = venue.place(ACC, limit("BUY", str(ask), str(ask_qty * 3), tif="IOC"), NOW)
    assert res["status"] == "EXPIRED"
    assert res["executedQty"] == fmt(ask_qty)
    assert kinds(events) == ["NEW", "TRADE", "EXPIRED", "outboundAccountPosition"]
    assert events[1][1]["X"] == "PARTIALLY_FILLED"
    assert bal(venue, "USDT") == (D(1_000_000) - ask * ask_qty, D(0))


def test_fok_all_or_nothing(venue: Venue, market: Market) -> None:
    _, _, ask, ask_qty = market.best("BTCUSDT")
    res, events = venue.place(ACC, limit("BUY", str(ask), str(ask_qty * 3), tif="FOK"), NOW)
    assert res["status"] == "EXPIRED"
    assert res["executedQty"] == "0.00000000"
    assert res["fills"] == []
    assert kinds(events) == ["NEW", "EXPIRED", "outboundAccountPosition"]
    assert market.best("BTCUSDT")[2:] == (ask, ask_qty)  # nothing taken
    assert bal(venue, "USDT") == (D(1_000_000), D(0))
    res, _ = venue.place(ACC, limit("BUY", str(ask + 10), str(ask_qty * 3), tif="FOK"), NOW)
    assert res["status"] == "FILLED"


def test_partially_filled_gtc_rests_remainder(venue: Venue, market: Market) -> None:
    _, _, ask, ask_qty = market.best("BTCUSDT")
    res, _ = venue.place(ACC, limit("BUY", str(ask), str(ask_qty * 2)), NOW)
    assert res["status"] == "PARTIALLY_FILLED"
    [open_] = venue.open_orders(ACC, {"symbol": "BTCUSDT"})
    assert open_["executedQty"] == fmt(ask_qty)
    assert bal(venue, "USDT")[1] == ask * ask_qty  # the unfilled half stays reserved


# ---------------------------------------------------------------------------- resting fills


def test_public_trade_fills_resting_order(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    price = bid - D("1")
    res, _ = venue.place(ACC, limit("BUY", str(price), "0.3"), NOW)
    sunk: list[Any] = []
    venue.event_sink = sunk.extend
    # a trade above the order's price does not reach it
    assert venue.on_public_trade("BTCUSDT", price + D("0.01"), D("1"), NOW + 1) == []
    events = venue.on_public_trade("BTCUSDT", price, D("0.1"), NOW + 2)
    assert kinds(events) == ["TRADE", "outboundAccountPosition"]
    er = events[0][1]
    assert (er["X"], er["l"], er["L"], er["m"]) == (
        "PARTIALLY_FILLED",
        "0.10000000",
        fmt(price),
        True,
    )
    events = venue.on_public_trade("BTCUSDT", price - D("5"), D("7"), NOW + 3)
    assert events[0][1]["X"] == "FILLED"
    assert events[0][1]["L"] == fmt(price)  # maker fills at its own price
    st = venue.order_status(ACC, {"symbol": "BTCUSDT", "orderId": str(res["orderId"])})
    assert st["status"] == "FILLED"
    assert st["isWorking"] is True
    assert bal(venue, "BTC") == (D(100) + D("0.3"), D(0))
    assert bal(venue, "USDT") == (D(1_000_000) - price * D("0.3"), D(0))
    assert venue.open_order_count() == 0


def test_walk_trades_fill_resting_orders_via_listener(venue: Venue, market: Market) -> None:
    bid, _, ask, _ = market.best("BTCUSDT")
    price = bid + D("0.01")
    assert price < ask
    res, _ = venue.place(ACC, limit("SELL", str(price), "0.001"), NOW)
    assert res["status"] == "NEW"
    sunk: list[tuple[str, dict[str, Any]]] = []
    venue.event_sink = sunk.extend
    for i in range(300):
        market.step("BTCUSDT", NOW + i, 1)
        if venue.open_order_count() == 0:
            break
    assert venue.open_order_count() == 0, "a walk buy at/above the order never printed"
    assert "TRADE" in kinds(sunk)
    # the user fill is a public trade too
    trades = [e for e in market.drain_events() if isinstance(e, Trade)]
    fill_ids = {e["t"] for _, e in sunk if e.get("x") == "TRADE"}
    assert fill_ids
    assert fill_ids <= {t.t for t in trades}


# ---------------------------------------------------------------------------- cancel / status


def test_cancel_by_order_id_and_client_id(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    a, _ = venue.place(ACC, limit("BUY", str(bid - 10), "0.01", newClientOrderId="a"), NOW)
    b, _ = venue.place(ACC, limit("BUY", str(bid - 11), "0.01", newClientOrderId="b"), NOW)
    res, events = venue.cancel(
        ACC,
        {"symbol": "BTCUSDT", "orderId": str(a["orderId"]), "newClientOrderId": "cancel-a"},
        NOW + 5,
    )
    assert res["status"] == "CANCELED"
    assert res["origClientOrderId"] == "a"
    assert res["clientOrderId"] == "cancel-a"
    assert res["transactTime"] == NOW + 5
    er = events[0][1]
    assert (er["x"], er["X"], er["c"], er["C"]) == ("CANCELED", "CANCELED", "cancel-a", "a")
    res, _ = venue.cancel(ACC, {"symbol": "BTCUSDT", "origClientOrderId": "b"}, NOW)
    assert res["orderId"] == b["orderId"]
    assert res["clientOrderId"].startswith("sim")
    assert bal(venue, "USDT") == (D(1_000_000), D(0))
    # cancel again / unknown / other account's order
    for params, account in [
        ({"symbol": "BTCUSDT", "orderId": str(a["orderId"])}, ACC),
        ({"symbol": "BTCUSDT", "origClientOrderId": "zzz"}, ACC),
        ({"symbol": "BTCUSDT", "orderId": str(b["orderId"])}, "bob"),
    ]:
        with pytest.raises(VenueError) as exc:
            venue.cancel(account, params, NOW)
        assert errcode(exc) == (-2011, "Unknown order sent.")
    with pytest.raises(VenueError) as exc:
        venue.cancel(ACC, {"symbol": "BTCUSDT"}, NOW)
    assert exc.value.code == -1102


def test_cancel_restrictions_and_id_mismatch(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    a, _ = venue.place(ACC, limit("BUY", str(bid - 10), "0.01", newClientOrderId="a"), NOW)
    with pytest.raises(VenueError) as exc:
        venue.cancel(
            ACC,
            {
                "symbol": "BTCUSDT",
                "orderId": str(a["orderId"]),
                "cancelRestrictions": "ONLY_PARTIALLY_FILLED",
            },
            NOW,
        )
    assert exc.value.code == -2011
    with pytest.raises(VenueError) as exc:
        venue.cancel(
            ACC,
            {"symbol": "BTCUSDT", "orderId": str(a["orderId"]), "origClientOrderId": "other"},
            NOW,
        )
    assert exc.value.code == -2039
    with pytest.raises(VenueError) as exc:
        venue.cancel(
            ACC,
            {"symbol": "BTCUSDT", "orderId": str(a["orderId"]), "cancelRestrictions": "SOMETIMES"},
            NOW,
        )
    assert exc.value.code == -1145


def test_order_status_and_open_orders(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    a, _ = venue.place(ACC, limit("BUY", str(bid - 10), "0.01", newClientOrderId="a"), NOW)
    st = venue.order_status(ACC, {"symbol": "BTCUSDT", "origClientOrderId": "a"})
    assert st["orderId"] == a["orderId"]
    for key in (
        "time",
        "updateTime",
        "isWorking",
        "workingTime",
        "stopPrice",
        "icebergQty",
        "origQuoteOrderQty",
        "selfTradePreventionMode",
    ):
        assert key in st
    with pytest.raises(VenueError) as exc:
        venue.order_status(ACC, {"symbol": "BTCUSDT", "orderId": "999999"})
    assert errcode(exc) == (-2013, "Order does not exist.")
    with pytest.raises(VenueError) as exc:
        venue.order_status("bob", {"symbol": "BTCUSDT", "orderId": str(a["orderId"])})
    assert exc.value.code == -2013
    assert [o["orderId"] for o in venue.open_orders(ACC, {})] == [a["orderId"]]
    assert venue.open_orders("bob", {}) == []
    venue.cancel(ACC, {"symbol": "BTCUSDT", "orderId": str(a["orderId"])}, NOW)
    assert venue.open_orders(ACC, {}) == []
    # closed orders stay queryable by id and by client id
    assert (
        venue.order_status(ACC, {"symbol": "BTCUSDT", "origClientOrderId": "a"})["status"]
        == "CANCELED"
    )


def test_cancel_all(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    with pytest.raises(VenueError) as exc:
        venue.cancel_all(ACC, {"symbol": "BTCUSDT"}, NOW)
    assert exc.value.code == -2011
    for i in range(3):
        venue.place(ACC, limit("BUY", str(bid - 10 - i), "0.01"), NOW)
    venue.place("bob", limit("BUY", str(bid - 10), "0.01"), NOW)
    results, events = venue.cancel_all(ACC, {"symbol": "BTCUSDT"}, NOW)
    assert [r["status"] for r in results] == ["CANCELED"] * 3
    assert kinds(events).count("CANCELED") == 3
    assert len(venue.open_orders("bob", {})) == 1


# ---------------------------------------------------------------------------- cancelReplace


def _cr(mode: str, **kw: str) -> dict[str, str]:
    p = {
        "symbol": "BTCUSDT",
        "cancelReplaceMode": mode,
        "side": "BUY",
        "type": "LIMIT",
        "timeInForce": "GTC",
        "quantity": "0.01",
    }
    p.update(kw)
    return p


def _replace_resting(
    venue: Venue, market: Market, old: str, new: str
) -> tuple[int, dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Rest a BUY 10 below the bid as ``old``, then cancel-replace it 5 below as ``new``."""
    bid = market.best("BTCUSDT")[0]
    venue.place(ACC, limit("BUY", str(bid - 10), "0.01", newClientOrderId=old), NOW)
    return venue.cancel_replace(
        ACC,
        _cr(
            "STOP_ON_FAILURE",
            cancelOrigClientOrderId=old,
            price=str(bid - 5),
            newClientOrderId=new,
        ),
        NOW,
    )


def test_cancel_replace_success(venue: Venue, market: Market) -> None:
    status, body, events = _replace_resting(venue, market, "old", "new")
    assert status == 200
    assert body["cancelResult"] == body["newOrderResult"] == "SUCCESS"
    assert body["cancelResponse"]["origClientOrderId"] == "old"
    assert body["newOrderResponse"]["clientOrderId"] == "new"
    assert kinds(events) == [
        "CANCELED",
        "outboundAccountPosition",
        "NEW",
        "outboundAccountPosition",
    ]
    assert [o["clientOrderId"] for o in venue.open_orders(ACC, {})] == ["new"]


def test_cancel_replace_reuses_the_canceled_client_id(venue: Venue, market: Market) -> None:
    status, _, _ = _replace_resting(venue, market, "same", "same")
    assert status == 200


def test_cancel_replace_stop_on_failure(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    status, body, events = venue.cancel_replace(
        ACC, _cr("STOP_ON_FAILURE", cancelOrderId="12345", price=str(bid - 5)), NOW
    )
    assert status == 400
    assert body["code"] == -2022
    assert body["data"] == {
        "cancelResult": "FAILURE",
        "newOrderResult": "NOT_ATTEMPTED",
        "cancelResponse": {"code": -2011, "msg": "Unknown order sent."},
        "newOrderResponse": None,
    }
    assert events == []
    assert venue.open_orders(ACC, {}) == []


def test_cancel_replace_allow_failure_places_new(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    status, body, _ = venue.cancel_replace(
        ACC, _cr("ALLOW_FAILURE", cancelOrderId="12345", price=str(bid - 5)), NOW
    )
    assert status == 409
    assert body["code"] == -2021
    assert body["msg"] == "Order cancel-replace partially failed."
    assert body["data"]["cancelResult"] == "FAILURE"
    assert body["data"]["newOrderResult"] == "SUCCESS"
    assert body["data"]["newOrderResponse"]["status"] == "NEW"
    assert len(venue.open_orders(ACC, {})) == 1


def test_cancel_replace_new_order_fails_old_stays_canceled(venue: Venue, market: Market) -> None:
    bid, _, ask, _ = market.best("BTCUSDT")
    venue.place(ACC, limit("BUY", str(bid - 10), "0.01", newClientOrderId="old"), NOW)
    p = _cr("STOP_ON_FAILURE", cancelOrigClientOrderId="old", price=str(ask), type="LIMIT_MAKER")
    del p["timeInForce"]
    status, body, _ = venue.cancel_replace(ACC, p, NOW)
    assert status == 409
    assert body["data"]["cancelResult"] == "SUCCESS"
    assert body["data"]["newOrderResponse"] == {
        "code": -2010,
        "msg": "Order would immediately match and take.",
    }
    assert venue.open_orders(ACC, {}) == []  # not transactional


def test_cancel_replace_both_fail(venue: Venue, market: Market) -> None:
    ask = market.best("BTCUSDT")[2]
    p = _cr("ALLOW_FAILURE", cancelOrderId="777", price=str(ask), type="LIMIT_MAKER")
    del p["timeInForce"]
    status, body, _ = venue.cancel_replace(ACC, p, NOW)
    assert status == 400
    assert body["code"] == -2022
    assert body["data"]["cancelResult"] == body["data"]["newOrderResult"] == "FAILURE"


def test_cancel_replace_filter_failure_touches_nothing(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    venue.place(ACC, limit("BUY", str(bid - 10), "0.01", newClientOrderId="old"), NOW)
    with pytest.raises(VenueError) as exc:
        venue.cancel_replace(
            ACC, _cr("STOP_ON_FAILURE", cancelOrigClientOrderId="old", price="1.001"), NOW
        )
    assert exc.value.code == -1013
    assert [o["clientOrderId"] for o in venue.open_orders(ACC, {})] == ["old"]


def test_cancel_replace_cancel_only_rate_limit(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    venue.place(ACC, limit("BUY", str(bid - 10), "0.01", newClientOrderId="old"), NOW)
    err = VenueError(-1015, "Too many new orders; current limit is 50 orders per 10 SECOND.")
    status, body, _ = venue.cancel_replace(
        ACC,
        _cr("STOP_ON_FAILURE", cancelOrigClientOrderId="old", price=str(bid - 5)),
        NOW,
        new_order_error=err,
    )
    assert status == 409
    assert body["data"]["newOrderResponse"]["code"] == -1015
    assert venue.open_orders(ACC, {}) == []


# ---------------------------------------------------------------------------- account, shapes


def test_account_status(venue: Venue) -> None:
    acct = venue.account_status(ACC, {}, NOW)
    assets = {b["asset"]: b for b in acct["balances"]}
    assert assets["USDT"] == {"asset": "USDT", "free": "1000000.00000000", "locked": "0.00000000"}
    assert assets["BTC"]["free"] == "100.00000000"
    assert acct["accountType"] == "SPOT"
    assert acct["canTrade"] is True


def test_configured_balances(market: Market) -> None:
    v = Venue(market, [ACC], balances={"USDT": "5", "BTC": "0"})
    acct = v.account_status(ACC, {"omitZeroBalances": "true"}, NOW)
    assert {b["asset"] for b in acct["balances"]} == {"USDT", "ETH"}


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def _load(rel: str) -> Any:
    return orjson.loads((FIXTURES / rel).read_bytes())


def test_shapes_match_captured_payloads(venue: Venue, market: Market) -> None:
    """Our payloads carry every key of real Binance captures (tests/fixtures/*/SOURCES.md)."""
    bid = market.best("BTCUSDT")[0]
    placed, events = venue.place(ACC, limit("BUY", str(bid - 10), "0.01"), NOW)
    live = _load("wsapi/order_place_LIMIT_NEW.json")["result"]
    assert set(placed) == set(live)
    canceled, cevents = venue.cancel(
        ACC, {"symbol": "BTCUSDT", "orderId": str(placed["orderId"])}, NOW
    )
    assert set(canceled) == set(_load("wsapi/order_cancel.json")["result"])
    new_live = _load("userdata/executionReport_NEW.json")[3]["event"]
    assert set(events[0][1]) == set(new_live)
    canceled_live = _load("userdata/executionReport_CANCELED.json")[0]
    assert set(canceled_live) <= set(cevents[0][1])
    assert (cevents[0][1]["x"], cevents[0][1]["X"]) == (canceled_live["x"], canceled_live["X"])
    trade_live = _load("userdata/executionReport_TRADE.json")[1]
    assert set(trade_live) <= set(cevents[0][1])
    acct_live = _load("wsapi/account_status.json")["result"]
    assert set(venue.account_status(ACC, {}, NOW)) == set(acct_live)
    for rt in ("ACK", "RESULT", "FULL"):
        doc = _load(f"wsapi/docs/order_place_{rt}.json")["result"]
        res, _ = venue.place(ACC, limit("BUY", str(bid - 20), "0.01", newOrderRespType=rt), NOW)
        assert set(doc) <= set(res), rt
    pos_live = _load("userdata/outboundAccountPosition.json")[4]["event"]
    assert set(events[1][1]) == set(pos_live)
    assert {frozenset(b) for b in events[1][1]["B"]} == {frozenset(b) for b in pos_live["B"]}
    doc_er = _load("userdata/docs_executionReport.json")["event"]
    assert set(doc_er) - {"v"} <= set(events[0][1])  # v: prevented match id, STP only


# ---------------------------------------------------------------------------- invariants

_OPS = st.one_of(
    st.tuples(
        st.just("place"),
        st.sampled_from(["alice", "bob"]),
        st.sampled_from(["BUY", "SELL"]),
        st.sampled_from(["GTC", "IOC", "FOK", "MARKET", "LIMIT_MAKER"]),
        st.integers(-30, 30),  # price offset from mid, in ticks of 0.5 USDT
        st.integers(1, 40_000),  # quantity in steps of 0.00001
    ),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("amend"), st.integers(0, 50), st.integers(1, 99)),
    st.tuples(st.just("print"), st.integers(-30, 30), st.integers(1, 40_000)),
    st.tuples(st.just("walk"), st.integers(1, 20)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OPS, max_size=25), seed=st.integers(0, 3))
def test_balances_stay_consistent(ops: list[tuple[Any, ...]], seed: int) -> None:
    """Whatever happens: no negative balance, locked funds == what open orders reserve, and
    every balance change is explained by the fills reported in executionReports."""
    market = Market(["BTCUSDT"], seed=seed)
    v = Venue(market, ["alice", "bob"], quote_balance=20_000, base_balance=1)
    seen: list[tuple[str, dict[str, Any]]] = []
    v.event_sink = seen.extend
    rejected: list[int] = []
    now = NOW
    for op in ops:
        now += 7
        bid, _, ask, _ = market.best("BTCUSDT")
        mid = (bid + ask) / 2
        try:
            if op[0] == "place":
                _, acct, side, kind, off, q = op
                qty = str(D(q) * D("0.00001"))
                price = str((mid + D(off) / 2).quantize(D("0.01")))
                if kind == "MARKET":
                    p = {"symbol": "BTCUSDT", "side": side, "type": "MARKET", "quantity": qty}
                elif kind == "LIMIT_MAKER":
                    p = {
                        "symbol": "BTCUSDT",
                        "side": side,
                        "type": kind,
                        "price": price,
                        "quantity": qty,
                    }
                else:
                    p = limit(side, price, qty, tif=kind)
                _, evs = v.place(acct, p, now)
                seen.extend(evs)
            elif op[0] == "cancel":
                opened = sorted(v.orders.values(), key=lambda o: o.order_id)
                opened = [o for o in opened if o.is_open]
                if opened:
                    o = opened[op[1] % len(opened)]
                    _, evs = v.cancel(
                        o.account, {"symbol": "BTCUSDT", "orderId": str(o.order_id)}, now
                    )
                    seen.extend(evs)
            elif op[0] == "amend":
                opened = [
                    o for o in sorted(v.orders.values(), key=lambda o: o.order_id) if o.is_open
                ]
                if opened:
                    o = opened[op[1] % len(opened)]
                    new_qty = (o.orig_qty * op[2] / 100).quantize(D("0.00001"))
                    _, evs = v.amend_keep_priority(
                        o.account,
                        {"symbol": "BTCUSDT", "orderId": str(o.order_id), "newQty": str(new_qty)},
                        now,
                    )
                    seen.extend(evs)
            elif op[0] == "print":
                px = (mid + D(op[1]) / 2).quantize(D("0.01"))
                seen.extend(v.on_public_trade("BTCUSDT", px, D(op[2]) * D("0.00001"), now))
            else:
                market.step("BTCUSDT", now, op[1])
        except VenueError as exc:
            rejected.append(exc.code)
        assert set(rejected) <= {-2010, -1013, -2038}  # balance, would-take, filters, amend
        for name, acct in v.accounts.items():
            reserved = {"USDT": D(0), "BTC": D(0)}
            for o in v.orders.values():
                if o.account == name and o.is_open:
                    reserved["USDT" if o.side == "BUY" else "BTC"] += o.locked
            for asset in ("USDT", "BTC"):
                b = acct.bal(asset)
                assert b.free >= 0, (name, asset, b)
                assert b.locked == reserved[asset], (name, asset, b, reserved)
    for name, acct in v.accounts.items():
        usdt, btc = D(20_000), D(1)
        for a, ev in seen:
            if a == name and ev["e"] == "executionReport" and ev["x"] == "TRADE":
                sign = 1 if ev["S"] == "BUY" else -1
                btc += sign * D(ev["l"])
                usdt -= sign * D(ev["l"]) * D(ev["L"])
        u, b = acct.bal("USDT"), acct.bal("BTC")
        assert u.free + u.locked == usdt
        assert b.free + b.locked == btc


def test_amend_keep_priority_reduces_quantity(venue: Venue, market: Market) -> None:
    bid = market.best("BTCUSDT")[0]
    price = bid - D(10)
    res, _ = venue.place(ACC, limit("BUY", str(price), "0.5", newClientOrderId="am"), NOW)
    out, events = venue.amend_keep_priority(
        ACC,
        {
            "symbol": "BTCUSDT",
            "orderId": str(res["orderId"]),
            "newQty": "0.2",
            "newClientOrderId": "am2",
        },
        NOW + 1,
    )
    doc = _load("wsapi/docs/order_amend_keepPriority.json")["result"]
    assert set(out) == set(doc)
    assert set(out["amendedOrder"]) == set(doc["amendedOrder"])
    assert out["amendedOrder"]["qty"] == "0.20000000"
    assert out["amendedOrder"]["origClientOrderId"] == "am"
    assert out["amendedOrder"]["clientOrderId"] == "am2"
    er = events[0][1]
    assert (er["x"], er["X"], er["q"], er["c"], er["C"]) == (
        "REPLACED",
        "NEW",
        "0.20000000",
        "am2",
        "am",
    )
    assert er["I"] == out["executionId"]
    assert bal(venue, "USDT") == (D(1_000_000) - price * D("0.2"), price * D("0.2"))
    st = venue.order_status(ACC, {"symbol": "BTCUSDT", "origClientOrderId": "am2"})
    assert st["origQty"] == "0.20000000"
    for qty, code in (("0.2", -2038), ("0.3", -2038), ("0.000001", -1013)):
        with pytest.raises(VenueError) as exc:
            venue.amend_keep_priority(
                ACC, {"symbol": "BTCUSDT", "orderId": str(res["orderId"]), "newQty": qty}, NOW
            )
        assert exc.value.code == code
    with pytest.raises(VenueError) as exc:
        venue.amend_keep_priority(
            ACC, {"symbol": "BTCUSDT", "orderId": "999", "newQty": "0.1"}, NOW
        )
    assert exc.value.code == -2013


def test_amend_of_a_partly_filled_order_must_stay_above_what_is_filled(
    venue: Venue, market: Market
) -> None:
    """order.amend.keepPriority's second -2038 (section 2.11): ``newQty`` at or below the
    executed quantity is refused; above it the order keeps its fills and stays PARTIALLY_FILLED."""
    _, _, ask, ask_qty = market.best("BTCUSDT")
    # takes the whole best ask and rests the rest: filled ask_qty of 3 * ask_qty
    res, _ = venue.place(ACC, limit("BUY", str(ask), str(ask_qty * 3)), NOW)
    assert (res["status"], res["executedQty"]) == ("PARTIALLY_FILLED", fmt(ask_qty))
    ref = {"symbol": "BTCUSDT", "orderId": str(res["orderId"])}
    step = market.rules("BTCUSDT").step_size
    for qty in (ask_qty, ask_qty - step):  # at, then below, what is filled
        with pytest.raises(VenueError) as exc:
            venue.amend_keep_priority(ACC, {**ref, "newQty": str(qty)}, NOW + 1)
        assert errcode(exc) == (-2038, "Order amend rejected: newQty must exceed executedQty.")
    out, events = venue.amend_keep_priority(ACC, {**ref, "newQty": str(ask_qty * 2)}, NOW + 2)
    er = events[0][1]
    assert (er["x"], er["X"], er["q"], er["z"]) == (
        "REPLACED", "PARTIALLY_FILLED", fmt(ask_qty * 2), fmt(ask_qty))  # fmt: skip
    assert out["amendedOrder"]["executedQty"] == fmt(ask_qty)


def test_max_num_orders_and_stp_modes(market: Market) -> None:
    v = Venue(market, [ACC], max_num_orders=2)
    bid = market.best("BTCUSDT")[0]
    r1, _ = v.place(ACC, limit("BUY", str(bid - 10), "0.01"), NOW)
    assert r1["selfTradePreventionMode"] == "EXPIRE_MAKER"
    r2, _ = v.place(ACC, limit("BUY", str(bid - 11), "0.01", selfTradePreventionMode="NONE"), NOW)
    assert r2["selfTradePreventionMode"] == "NONE"
    with pytest.raises(VenueError) as exc:
        v.place(ACC, limit("BUY", str(bid - 12), "0.01"), NOW)
    assert errcode(exc) == (-1013, "Filter failure: MAX_NUM_ORDERS")
    with pytest.raises(VenueError) as exc:
        v.place(ACC, limit("BUY", str(bid - 12), "0.01", selfTradePreventionMode="WHATEVER"), NOW)
    assert exc.value.code == -1100


# ---------------------------------------------------------------------------- symbol status


def test_cancel_only_refuses_new_orders_and_accepts_cancels(venue: Venue, market: Market) -> None:
    """CANCEL_ONLY (binance-protocol.md 7.2): new orders rejected, cancels accepted. An amend
    and a cancelReplace (whose new leg is a new order) are refused whole: nothing changes."""
    price = str(market.best("BTCUSDT")[0] - D(10))
    res, _ = venue.place(ACC, limit("BUY", price, "0.5", newClientOrderId="co1"), NOW)
    venue.set_symbol_status("BTCUSDT", "CANCEL_ONLY")
    with pytest.raises(VenueError) as exc:
        venue.place(ACC, limit("BUY", price, "0.5"), NOW)
    assert errcode(exc) == (-2010, "Market is closed.")
    with pytest.raises(VenueError) as exc:
        venue.test_order(ACC, limit("BUY", price, "0.5"), NOW)
    assert errcode(exc) == (-2010, "Market is closed.")
    amend = {"symbol": "BTCUSDT", "orderId": str(res["orderId"]), "newQty": "0.2"}
    with pytest.raises(VenueError) as exc:
        venue.amend_keep_priority(ACC, amend, NOW)
    assert errcode(exc) == (-2010, "Market is closed.")
    replace = limit("BUY", price, "0.4") | {
        "cancelReplaceMode": "STOP_ON_FAILURE", "cancelOrigClientOrderId": "co1"}  # fmt: skip
    with pytest.raises(VenueError):
        venue.cancel_replace(ACC, replace, NOW)
    assert venue.orders[res["orderId"]].status == "NEW"  # untouched by the refusals
    # another symbol trades on
    eth = str(market.best("ETHUSDT")[0] - D(10))
    venue.place(ACC, limit("BUY", eth, "0.5") | {"symbol": "ETHUSDT"}, NOW)
    out, events = venue.cancel(ACC, {"symbol": "BTCUSDT", "origClientOrderId": "co1"}, NOW)
    assert out["status"] == "CANCELED"
    assert kinds(events)[0] == "CANCELED"
    venue.set_symbol_status("BTCUSDT", "TRADING")
    venue.place(ACC, limit("BUY", price, "0.5"), NOW)
