"""Self-trade prevention in the simulator (issue #13), and the reports our parser reads from it.

Rules from Binance's STP FAQ (``faqs/stp_faq.md``, summarised in pipeline/sim/venue_stp.py):
the taker's mode decides; EXPIRE_* expire the named order(s) whole; DECREMENT (and TRANSFER
within one account) prevents the smaller remaining quantity on both and expires the smaller
order; NONE lets the trade happen. Every scenario: account alice rests a BUY inside the spread
(so no public liquidity is in the way), then sends a crossing SELL of the given mode.

The pure tests drive :class:`pipeline.sim.venue.Venue`; the socket test places both orders
through the simulator's WS API (raw ``order.place`` with ``selfTradePreventionMode``: the
client/CLI ``stp`` option is another engineer's part) and parses the user-data frames with
:func:`pipeline.binance.userdata.parse_event`, the parser the trading process uses.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from simhelpers import run
from test_sim_wsapi import Client, Clock, WsApiService, limit, scenario

from pipeline.binance.userdata import ExecutionReport, parse_event
from pipeline.sim.market import Market
from pipeline.sim.server import SimConfig
from pipeline.sim.testing import SimServer, http_json
from pipeline.sim.venue import Venue, VenueError
from pipeline.sim.venue_params import STP_MODES

NOW = 1_700_000_000_000
ACC = "alice"
D = Decimal


@pytest.fixture
def market() -> Market:
    return Market(["BTCUSDT"], seed=1)


def mid(market: Market) -> Decimal:
    bid, _, ask, _ = market.best("BTCUSDT")
    price = ((bid + ask) / 2).quantize(D("0.01"))
    assert bid < price < ask  # inside the spread: only our own orders can meet there
    return price


def order(side: str, price: Decimal, qty: str, **kw: str) -> dict[str, str]:
    p = {
        "symbol": "BTCUSDT",
        "side": side,
        "type": "LIMIT",
        "timeInForce": "GTC",
        "price": str(price),
        "quantity": qty,
        "newOrderRespType": "FULL",
    }
    p.update(kw)
    return p


def reports(events: list[tuple[str, dict[str, Any]]]) -> list[ExecutionReport]:
    out = []
    for _, ev in events:
        r = parse_event({"subscriptionId": 0, "event": ev}, 0)
        if isinstance(r, ExecutionReport):
            out.append(r)
    return out


def free_locked(v: Venue, asset: str) -> tuple[Decimal, Decimal]:
    b = v.accounts[ACC].bal(asset)
    return b.free, b.locked


def setup(market: Market, maker_qty: str, maker_mode: str = "NONE") -> tuple[Venue, Decimal, int]:
    v = Venue(market, [ACC])
    price = mid(market)
    res, _ = v.place(ACC, order("BUY", price, maker_qty, selfTradePreventionMode=maker_mode), NOW)
    assert res["status"] == "NEW"
    return v, price, res["orderId"]


def test_expire_taker(market: Market) -> None:
    v, price, maker_id = setup(market, "1")
    res, events = v.place(
        ACC, order("SELL", price, "3", selfTradePreventionMode="EXPIRE_TAKER"), NOW
    )
    assert res["status"] == "EXPIRED_IN_MATCH"
    assert res["fills"] == []
    assert res["preventedQuantity"] == "3.00000000"
    assert res["preventedMatches"] == [
        {
            "preventedMatchId": 0,
            "makerOrderId": maker_id,
            "price": f"{price:.8f}",
            "takerPreventedQuantity": "3.00000000",
        }
    ]
    new, prevented = reports(events)
    assert (new.exec_type, prevented.exec_type) == ("NEW", "TRADE_PREVENTION")
    assert prevented.status == "EXPIRED_IN_MATCH"
    assert prevented.expiry_reason == "NONE"  # no documented STP reason: X says why
    assert (prevented.prevented_qty, prevented.last_prevented_qty) == (3.0, 3.0)
    assert (prevented.prevented_match_id, prevented.counter_order_id) == (0, maker_id)
    assert (prevented.last_qty, prevented.last_quote) == (0.0, 0.0)
    assert prevented.stp_mode == "EXPIRE_TAKER"
    assert prevented.working is False
    assert v.orders[maker_id].status == "NEW"  # the maker is untouched
    assert free_locked(v, "BTC") == (D(100), D(0))  # the taker's reserve went back


def test_expire_maker_then_taker_rests(market: Market) -> None:
    v, price, maker_id = setup(market, "1")
    usdt_before = free_locked(v, "USDT")
    res, events = v.place(
        ACC, order("SELL", price, "3", selfTradePreventionMode="EXPIRE_MAKER"), NOW
    )
    assert res["status"] == "NEW"  # the taker goes on the book
    assert "preventedQuantity" not in res
    maker_report = [r for r in reports(events) if r.order_id == maker_id]
    assert [(r.exec_type, r.status) for r in maker_report] == [
        ("TRADE_PREVENTION", "EXPIRED_IN_MATCH")
    ]
    assert maker_report[0].prevented_qty == 1.0
    assert maker_report[0].stp_mode == "NONE"  # V is the maker's own mode
    status = v.order_status(ACC, {"symbol": "BTCUSDT", "orderId": str(maker_id)})
    assert status["status"] == "EXPIRED_IN_MATCH"
    assert status["preventedQuantity"] == "1.00000000"
    assert free_locked(v, "USDT") == (usdt_before[0] + usdt_before[1], D(0))


def test_expire_both(market: Market) -> None:
    v, price, maker_id = setup(market, "1")
    res, events = v.place(
        ACC, order("SELL", price, "3", selfTradePreventionMode="EXPIRE_BOTH"), NOW
    )
    assert res["status"] == "EXPIRED_IN_MATCH"
    prevented = [r for r in reports(events) if r.exec_type == "TRADE_PREVENTION"]
    assert sorted((r.order_id, r.last_prevented_qty) for r in prevented) == [
        (maker_id, 1.0),
        (res["orderId"], 3.0),
    ]
    assert {r.prevented_match_id for r in prevented} == {0}
    assert v.orders[maker_id].status == "EXPIRED_IN_MATCH"
    assert free_locked(v, "USDT")[1] == 0
    assert free_locked(v, "BTC")[1] == 0


@pytest.mark.parametrize("mode", ["DECREMENT", "TRANSFER"])
def test_decrement_expires_the_smaller_and_shrinks_the_larger(market: Market, mode: str) -> None:
    """FAQ scenario G (and H within one account, where TRANSFER behaves as DECREMENT)."""
    v, price, maker_id = setup(market, "6", maker_mode=mode)
    res, events = v.place(ACC, order("SELL", price, "2", selfTradePreventionMode=mode), NOW)
    assert res["status"] == "EXPIRED_IN_MATCH"
    assert res["preventedQuantity"] == "2.00000000"
    by_id = {r.order_id: r for r in reports(events) if r.exec_type == "TRADE_PREVENTION"}
    assert by_id[res["orderId"]].status == "EXPIRED_IN_MATCH"
    maker = by_id[maker_id]
    assert maker.status == "NEW"  # still open, 2 of its 6 prevented
    assert maker.expiry_reason == ""
    assert (maker.prevented_qty, maker.working) == (2.0, True)
    status = v.order_status(ACC, {"symbol": "BTCUSDT", "orderId": str(maker_id)})
    assert (status["status"], status["preventedQuantity"]) == ("NEW", "2.00000000")
    # the prevented 2 no longer reserve quote: 4 left at the price
    assert free_locked(v, "USDT")[1] == price * 4


def test_decrement_equal_quantities_expire_both(market: Market) -> None:
    v, price, maker_id = setup(market, "2")
    res, _ = v.place(ACC, order("SELL", price, "2", selfTradePreventionMode="DECREMENT"), NOW)
    assert res["status"] == "EXPIRED_IN_MATCH"
    assert v.orders[maker_id].status == "EXPIRED_IN_MATCH"


def test_none_self_trades(market: Market) -> None:
    v, price, maker_id = setup(market, "1")
    res, events = v.place(ACC, order("SELL", price, "1", selfTradePreventionMode="NONE"), NOW)
    assert res["status"] == "FILLED"
    assert [f["price"] for f in res["fills"]] == [f"{price:.8f}"]
    trades = [r for r in reports(events) if r.exec_type == "TRADE"]
    assert sorted((r.order_id, r.is_maker) for r in trades) == [
        (maker_id, True),
        (res["orderId"], False),
    ]
    assert trades[0].last_quote == float(price)
    assert v.orders[maker_id].status == "FILLED"


def test_default_mode_is_expire_maker(market: Market) -> None:
    v, price, maker_id = setup(market, "1")
    res, _ = v.place(ACC, order("SELL", price, "1"), NOW)
    assert res["selfTradePreventionMode"] == "EXPIRE_MAKER"
    assert v.orders[maker_id].status == "EXPIRED_IN_MATCH"


def test_other_accounts_do_not_trigger_stp(market: Market) -> None:
    v, price, maker_id = setup(market, "1")
    v.add_account("bob")
    res, _ = v.place("bob", order("SELL", price, "1", selfTradePreventionMode="EXPIRE_TAKER"), NOW)
    assert res["status"] == "NEW"
    assert v.orders[maker_id].status == "NEW"


def test_invalid_mode_is_refused(market: Market) -> None:
    v = Venue(market, [ACC])
    with pytest.raises(VenueError) as exc:
        v.place(ACC, order("BUY", mid(market), "1", selfTradePreventionMode="EXPIRE_ALL"), NOW)
    assert exc.value.code == -1100
    assert "selfTradePreventionMode" in exc.value.msg


@pytest.mark.parametrize(
    ("tif", "reason"),
    [("IOC", "UNFILLED_IOC_QUANTITY_EXPIRED"), ("FOK", "UNFILLED_FOK_ORDER_EXPIRED")],
)
def test_expiry_reason_on_unfilled_ioc_fok(market: Market, tif: str, reason: str) -> None:
    v = Venue(market, [ACC])
    _, _, ask, ask_qty = market.best("BTCUSDT")
    _, events = v.place(ACC, order("BUY", ask, str(ask_qty * 3), timeInForce=tif), NOW)
    expired = [r for r in reports(events) if r.exec_type == "EXPIRED"]
    assert [r.expiry_reason for r in expired] == [reason]


def test_exchange_info_advertises_every_mode() -> None:
    async def go() -> None:
        async with SimServer(SimConfig(symbols=["BTCUSDT"], rate=100.0, seed=2)) as sim:
            status, info = await http_json(sim.rest_url + "/api/v3/exchangeInfo")
            assert status == 200
            [btc] = info["symbols"]
            assert btc["allowedSelfTradePreventionModes"] == list(STP_MODES)
            assert btc["defaultSelfTradePreventionMode"] == "EXPIRE_MAKER"
            assert {"DECREMENT", "TRANSFER"} <= set(STP_MODES)

    run(go)


# ---------------------------------------------------------------------------- over the socket


@pytest.mark.parametrize(
    ("mode", "taker_status", "maker_status"),
    [
        ("NONE", "FILLED", "PARTIALLY_FILLED"),
        ("EXPIRE_TAKER", "EXPIRED_IN_MATCH", "NEW"),
        ("EXPIRE_MAKER", "NEW", "EXPIRED_IN_MATCH"),
        ("EXPIRE_BOTH", "EXPIRED_IN_MATCH", "EXPIRED_IN_MATCH"),
        ("DECREMENT", "EXPIRED_IN_MATCH", "NEW"),
        ("TRANSFER", "EXPIRED_IN_MATCH", "NEW"),
    ],
)
def test_stp_over_the_ws_api_parsed_by_our_user_data_parser(
    mode: str, taker_status: str, maker_status: str
) -> None:
    """Two orders of one account meet through the real simulator; the executionReports that
    reach the user-data subscription are parsed by the trading process's parser."""

    async def body(service: WsApiService, c: Client, clock: Clock) -> None:
        await c.logon()
        await c.ok("userDataStream.subscribe")
        bid, _, ask, _ = service.market.best("BTCUSDT")
        price = ((bid + ask) / 2).quantize(D("0.01"))
        assert bid < price < ask
        maker = await c.ok(
            "order.place",
            limit("BUY", price, "0.5", selfTradePreventionMode=mode, **c.ts()),
        )
        taker = await c.ok(
            "order.place",
            limit("SELL", price, "0.2", selfTradePreventionMode=mode, **c.ts()),
        )
        assert taker["status"] == taker_status
        assert taker["selfTradePreventionMode"] == mode

        def last_report(order_id: int) -> ExecutionReport:
            return parsed[order_id][-1]

        parsed: dict[int, list[ExecutionReport]] = {}
        want = {maker["orderId"]: maker_status, taker["orderId"]: taker_status}
        while any(not parsed.get(i) or parsed[i][-1].status != st for i, st in want.items()):
            frame = await c.wait_event(lambda f: f["event"].get("e") == "executionReport")
            r = parse_event(frame, clock() * 1_000_000)
            assert isinstance(r, ExecutionReport)
            assert r.skipped_fields == ()
            parsed.setdefault(r.order_id, []).append(r)
        exec_ids = [r.exec_id for rs in parsed.values() for r in rs]
        assert len(set(exec_ids)) == len(exec_ids)
        assert min(exec_ids) > 0
        t = last_report(taker["orderId"])
        assert t.stp_mode == mode
        if mode == "NONE":
            assert (t.exec_type, t.last_qty, t.last_quote) == (
                "TRADE",
                0.2,
                float(price * D("0.2")),
            )
            return
        prevented = [r for rs in parsed.values() for r in rs if r.exec_type == "TRADE_PREVENTION"]
        assert prevented
        assert all(r.prevented_match_id == 0 for r in prevented)
        for r in prevented:
            assert r.last_prevented_qty > 0
            assert r.last_qty == 0.0
            assert r.expiry_reason == ("NONE" if r.status == "EXPIRED_IN_MATCH" else "")
        if mode in ("DECREMENT", "TRANSFER"):
            m = last_report(maker["orderId"])
            assert (m.status, m.prevented_qty, m.working) == ("NEW", 0.2, True)

    scenario(body)


# ---------------------------------------------------------------------------- to the strategy


def test_exec_record_carries_the_report_fields_to_the_strategy() -> None:
    """What OrderClient decodes from the exec ring: the executionReport's I, eR, V, w, Y, A."""
    import numpy as np

    from pipeline.trading.client import ExecReport
    from pipeline.trading.wire import (
        EXEC_DTYPE,
        ExecKind,
        ExecUpdate,
        OrderStatus,
        exec_record,
    )

    u = ExecUpdate(
        "c1",
        ExecKind.EXPIRED,
        OrderStatus.EXPIRED_IN_MATCH,
        symbol="BTCUSDT",
        exec_id=117599651999,
        expiry_reason="NONE",
        stp_mode="DECREMENT",
        working=True,
        last_quote=19.83,
        prevented_qty=0.2,
        quote_order_qty=25.5,
    )
    rep = ExecReport.from_record(np.array([exec_record(u, 1)], dtype=EXEC_DTYPE)[0])
    assert (rep.status, rep.exec_id, rep.expiry_reason, rep.stp_mode) == (
        "EXPIRED_IN_MATCH",
        117599651999,
        "NONE",
        "DECREMENT",
    )
    assert (rep.working, rep.last_quote, rep.prevented_qty) == (True, 19.83, 0.2)
    assert rep.quote_order_qty == 25.5
    odd = ExecUpdate("c2", ExecKind.EXPIRED, OrderStatus.EXPIRED, expiry_reason="NEW_2027")
    rep = ExecReport.from_record(np.array([exec_record(odd, 1)], dtype=EXEC_DTYPE)[0])
    assert (rep.expiry_reason, rep.stp_mode, rep.exec_id) == ("OTHER", "", -1)
    assert rep.as_dict()["expiry_reason"] == "OTHER"  # `pipeline order` prints as_dict()
