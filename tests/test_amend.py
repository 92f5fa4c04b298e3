"""Issue #13 order semantics in the sans-I/O session core (no sockets, a fake clock): amend
keeping priority, cancel / cancelReplace by orderId, RESULT responses, STP mode, decimal
recvWindow, lossless user-data handover and the orders_in_doubt gauge.

Payload shapes follow binance-protocol.md 2.7, 2.9-2.11, 2.15 (amend: ``amendedOrder`` with
``qty`` and ``cumulativeQuoteQty``, single m); the simulator's versions are exercised over real
sockets in tests/test_order_semantics_sim.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_session import SIGNER, Driver, order_report, order_result

from pipeline.binance.signing import ws_payload
from pipeline.binance.wsapi import RequestBuilder
from pipeline.trading.session import (
    LOCAL_AMEND_LIMIT,
    LOCAL_INVALID,
    Close,
    ExecKind,
    ExecUpdate,
    OrderStatus,
)


def amend_result(coid: str, qty: str, executed: str = "0") -> dict[str, Any]:
    """An order.amend.keepPriority result (2.11), the current client id re-sent."""
    return {
        "transactTime": 7,
        "executionId": 99,
        "amendedOrder": {
            "symbol": "BTCUSDT",
            "orderId": 42,
            "orderListId": -1,
            "origClientOrderId": coid,
            "clientOrderId": coid,
            "price": "100",
            "qty": qty,
            "executedQty": executed,
            "preventedQty": "0",
            "quoteOrderQty": "0",
            "cumulativeQuoteQty": "0",
            "status": "NEW",
            "timeInForce": "GTC",
            "type": "LIMIT",
            "side": "BUY",
            "workingTime": 5,
            "selfTradePreventionMode": "NONE",
        },
    }


def acked(coid: str = "a1", qty: float = 1.0) -> Driver:
    d = Driver(json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    assert d.session.place(coid, "BTCUSDT", "BUY", "LIMIT", qty, 100.0, "GTC")
    d.reply(1, d.take("order.place"), result=order_result(coid))
    assert d.session.order_status(coid) is OrderStatus.NEW
    return d


def updates(d: Driver, coid: str, kind: ExecKind) -> list[ExecUpdate]:
    return [
        u
        for u in d.updates
        if isinstance(u, ExecUpdate) and u.client_order_id == coid and u.kind is kind
    ]


def report(coid: str, x: str, exec_id: int, *, q: str = "1", z: str = "0", last: str = "0",
           status: str = "NEW") -> dict[str, Any]:  # fmt: skip
    ev = order_report(coid, status, x, z=z, last=last)
    ev["I"] = exec_id
    ev["q"] = q
    return ev


# ---- amend -----------------------------------------------------------------------------------


def test_amend_keeps_the_client_id_and_updates_the_quantity() -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.4, client_id=7)
    msg = d.take("order.amend.keepPriority")
    p = msg["params"]
    assert p["orderId"] == 42
    assert "origClientOrderId" not in p
    assert p["newClientOrderId"] == "a1"  # the current id: the venue keeps it
    assert p["newQty"] == "0.4"
    assert p["symbol"] == "BTCUSDT"
    assert "timestamp" in p
    d.reply(1, msg, result=amend_result("a1", "0.4"))
    rep = updates(d, "a1", ExecKind.REPLACED)[-1]
    assert rep.qty == 0.4
    assert rep.client_id == 7
    assert rep.status is OrderStatus.NEW
    assert rep.event_time_ns == 7_000_000
    assert d.session.metrics["orders_amended"] == 1
    # the user data report of the same amend (x=REPLACED) also carries the quantity
    d.event(1, report("a1", "REPLACED", 5, q="0.3"))
    assert updates(d, "a1", ExecKind.REPLACED)[-1].qty == 0.3
    assert d.session.table.orders["a1"].qty == 0.3
    # a later cancel still finds the order by the same client id
    assert d.session.cancel("a1")
    assert d.take("order.cancel")["params"]["orderId"] == 42


def test_amend_before_the_ack_goes_by_client_order_id() -> None:
    d = Driver(json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    d.session.place("a2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.take("order.place")
    assert d.session.amend("a2", 0.5)
    p = d.take("order.amend.keepPriority")["params"]
    assert p["origClientOrderId"] == "a2"
    assert "orderId" not in p


def test_amend_rejected_by_the_venue_leaves_the_order_as_it_was() -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.5)
    msg = d.take("order.amend.keepPriority")
    d.reply(1, msg, status=400, error={"code": -2038, "msg": "Order amend rejected."})
    rej = updates(d, "a1", ExecKind.AMEND_REJECT)[-1]
    assert rej.error_code == -2038
    assert rej.status is OrderStatus.NEW
    assert rej.qty == 1.0
    assert d.session.table.orders["a1"].qty == 1.0
    assert d.session.order_status("a1") is OrderStatus.NEW
    # the venue's amend-count filter is an AMEND_REJECT too
    assert d.session.amend("a1", 0.5)
    d.reply(1, d.take("order.amend.keepPriority"), status=400,
            error={"code": -1013, "msg": "Filter failure: MAX_NUM_ORDER_AMENDS"})  # fmt: skip
    assert updates(d, "a1", ExecKind.AMEND_REJECT)[-1].error_code == -1013


def test_amend_refused_locally_for_an_increase_and_after_ten_amends() -> None:
    d = acked(qty=1.0)
    assert not d.session.amend("a1", 1.0)  # not a reduction: -2038 without the round trip
    assert not d.session.amend("a1", 0.0)
    d.pump()
    assert [u.error_code for u in updates(d, "a1", ExecKind.AMEND_REJECT)] == [LOCAL_INVALID] * 2
    qty = 1.0
    for _ in range(10):
        qty = round(qty - 0.05, 2)
        assert d.session.amend("a1", qty)
        d.reply(1, d.take("order.amend.keepPriority"), result=amend_result("a1", str(qty)))
    assert d.session.table.orders["a1"].amends == 10
    assert not d.session.amend("a1", 0.1)
    d.pump()
    last = updates(d, "a1", ExecKind.AMEND_REJECT)[-1]
    assert last.error_code == LOCAL_AMEND_LIMIT
    assert "MAX_NUM_ORDER_AMENDS" in last.error_msg
    assert "order.amend.keepPriority" not in d.methods()


@pytest.mark.parametrize("how", ["disconnect", "-1007"])
def test_amend_without_answer_makes_the_order_unknown_never_a_new_order(how: str) -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.5)
    msg = d.take("order.amend.keepPriority")
    if how == "disconnect":
        d.session.connection_lost(1, "gone")
        d.pump()
        d.tick_to(1.0)
        d.connect(2)
    else:
        d.reply(1, msg, status=400, error={"code": -1007, "msg": "Timeout"})
    assert updates(d, "a1", ExecKind.UNKNOWN)
    st = d.take("order.status")
    assert st["params"]["origClientOrderId"] == "a1"
    conn = 2 if how == "disconnect" else 1
    result = order_result("a1")
    result["origQty"] = "0.5"  # the amend did execute
    d.reply(conn, st, result=result)
    assert d.session.order_status("a1") is OrderStatus.NEW
    assert d.session.table.orders["a1"].qty == 0.5
    assert "order.place" not in d.methods()
    assert "order.amend.keepPriority" not in d.methods()


# ---- exactly one REPLACED per amend (its reply and its executionReport) ------------------------

FIX = Path(__file__).parent / "fixtures" / "trading"


def replaced(d: Driver, coid: str = "a1") -> list[ExecUpdate]:
    d.pump()
    return updates(d, coid, ExecKind.REPLACED)


def test_reply_then_report_gives_one_replaced_and_the_report_adds_its_state() -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.4)
    d.reply(1, d.take("order.amend.keepPriority"), result=amend_result("a1", "0.4"))
    d.event(1, report("a1", "REPLACED", 5, q="0.4"))
    (rep,) = replaced(d)
    assert rep.qty == 0.4
    order = d.session.table.orders["a1"]
    assert (order.qty, order.amends, d.session.metrics["orders_amended"]) == (0.4, 1, 1)
    # the report is still taken in: a fill after it is on the amended order
    d.event(1, report("a1", "TRADE", 6, q="0.4", z="0.1", last="0.1", status="PARTIALLY_FILLED"))
    assert d.session.table.orders["a1"].cum_qty == 0.1
    assert len(replaced(d)) == 1


def test_report_then_reply_gives_one_replaced_from_the_report() -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.4)
    msg = d.take("order.amend.keepPriority")
    d.event(1, report("a1", "REPLACED", 5, q="0.4"))
    d.reply(1, msg, result=amend_result("a1", "0.4"))
    (rep,) = replaced(d)
    assert (rep.qty, rep.exec_id) == (0.4, 5)  # the report's record: it carries ``I``
    order = d.session.table.orders["a1"]
    assert (order.qty, order.amends, d.session.metrics["orders_amended"]) == (0.4, 1, 1)


def test_two_amends_with_replies_and_reports_interleaved_give_two_and_never_raise_qty() -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.4)
    first = d.take("order.amend.keepPriority")
    assert d.session.amend("a1", 0.3)
    second = d.take("order.amend.keepPriority")
    d.reply(1, first, result=amend_result("a1", "0.4"))
    d.reply(1, second, result=amend_result("a1", "0.3"))
    d.event(1, report("a1", "REPLACED", 5, q="0.4"))  # the first amend's report, late
    assert d.session.table.orders["a1"].qty == 0.3  # not back up to 0.4
    d.event(1, report("a1", "REPLACED", 6, q="0.3"))
    assert [u.qty for u in replaced(d)] == [0.4, 0.3]
    assert d.session.table.orders["a1"].amends == 2


def test_report_first_goes_to_the_client_that_asked_for_the_amend() -> None:
    d = acked(qty=1.0)  # placed by client 0
    assert d.session.amend("a1", 0.4, client_id=7)
    msg = d.take("order.amend.keepPriority")
    d.event(1, report("a1", "REPLACED", 5, q="0.4"))
    d.reply(1, msg, result=amend_result("a1", "0.4"))
    (rep,) = replaced(d)
    assert rep.client_id == 7
    assert d.session.table.orders["a1"].amend_requesters == {}


def test_reply_lost_in_a_reconnect_the_report_alone_gives_the_replaced() -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.5)
    d.take("order.amend.keepPriority")
    d.event(1, report("a1", "REPLACED", 5, q="0.5"))  # the report, then the connection dies
    d.session.connection_lost(1, "gone")
    d.pump()
    d.tick_to(1.0)
    d.connect(2)
    st = d.take("order.status")
    result = order_result("a1")
    result["origQty"] = "0.5"
    d.reply(2, st, result=result)
    (rep,) = replaced(d)
    assert rep.qty == 0.5
    assert updates(d, "a1", ExecKind.RECONCILED)
    assert d.session.table.orders["a1"].qty == 0.5
    assert "order.amend.keepPriority" not in d.methods()  # never sent again


def test_amend_in_doubt_reconciled_by_status_then_its_late_report_is_the_one_replaced() -> None:
    d = acked(qty=1.0)
    assert d.session.amend("a1", 0.5)
    msg = d.take("order.amend.keepPriority")
    d.reply(1, msg, status=408, error={"code": -1007, "msg": "Timeout"})
    st = d.take("order.status")
    result = order_result("a1")
    result["origQty"] = "0.5"
    d.reply(1, st, result=result)
    assert not replaced(d)  # order.status says RECONCILED (with the quantity), not REPLACED
    assert updates(d, "a1", ExecKind.RECONCILED)[-1].qty == 0.5
    d.event(1, report("a1", "REPLACED", 5, q="0.5"))
    (rep,) = replaced(d)
    assert rep.qty == 0.5
    d.event(1, report("a1", "REPLACED", 5, q="0.5"))  # delivered twice (rollover): still one
    assert len(replaced(d)) == 1


def test_documented_payloads_in_either_order_give_one_replaced() -> None:
    """The documented amend response (2.11) and executionReport (2.15), re-addressed to one
    order (orderId 12, client id re-sent as newClientOrderId, qty 10 -> 5)."""
    reply = json.loads((FIX / "doc_order_amend_keepPriority.json").read_text())["result"]
    reply["amendedOrder"]["clientOrderId"] = "my_test_order1"
    event = json.loads((FIX / "ud_doc_executionReport.json").read_text())["event"]
    event.update(s="BTCUSDT", c="my_test_order1", x="REPLACED", X="NEW", i=12,
                 q="5.00000000", p="5.00000000")  # fmt: skip
    for report_first in (False, True):
        d = Driver(json_ping_interval_s=1000, ping_interval_s=1000)
        d.start_ready()
        assert d.session.place("my_test_order1", "BTCUSDT", "BUY", "LIMIT", 10.0, 5.0, "GTC")
        ack = order_result("my_test_order1")
        ack.update(orderId=12, origQty="10", price="5")
        d.reply(1, d.take("order.place"), result=ack)
        assert d.session.amend("my_test_order1", 5.0)
        msg = d.take("order.amend.keepPriority")
        if report_first:
            d.event(1, event)
        d.reply(1, msg, result=reply)
        if not report_first:
            d.event(1, event)
        (rep,) = replaced(d, "my_test_order1")
        assert (rep.qty, rep.order_id) == (5.0, 12)
        assert rep.exec_id == (8641984 if report_first else -1)  # the record that came first
        assert d.session.metrics["orders_amended"] == 1


# ---- cancel / cancelReplace by orderId ---------------------------------------------------------


def test_cancel_by_order_id_once_acked_by_client_id_before_and_while_unknown() -> None:
    d = Driver(json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    d.session.place("c1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    place = d.take("order.place")
    assert d.session.cancel("c1")  # not acked yet: only the client id is known
    c = d.take("order.cancel")["params"]
    assert c["origClientOrderId"] == "c1"
    assert "orderId" not in c
    d.reply(1, place, result=order_result("c1"))
    assert d.session.cancel("c1")
    c = d.take("order.cancel")["params"]
    assert c["orderId"] == 42
    assert "origClientOrderId" not in c
    d.session.place("c2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), status=503, error={"code": -1007, "msg": "Timeout"})
    assert d.session.order_status("c2") is OrderStatus.UNKNOWN
    assert d.session.cancel("c2")
    assert d.take("order.cancel")["params"]["origClientOrderId"] == "c2"


def test_cancel_replace_by_order_id_and_new_order_asks_result() -> None:
    d = acked("r1")
    assert d.session.modify("r1", "r2", qty=1.0, price=99.0)
    p = d.take("order.cancelReplace")["params"]
    assert p["cancelOrderId"] == 42
    assert "cancelOrigClientOrderId" not in p
    assert p["newOrderRespType"] == "RESULT"
    assert p["newClientOrderId"] == "r2"


# ---- RESULT, STP, recvWindow -------------------------------------------------------------------


def test_place_asks_result_and_sends_the_stp_mode() -> None:
    d = Driver(json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    assert d.session.place("p1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0, stp="EXPIRE_MAKER")
    msg = d.take("order.place")
    assert msg["params"]["newOrderRespType"] == "RESULT"
    assert msg["params"]["selfTradePreventionMode"] == "EXPIRE_MAKER"
    # a RESULT answer (2.7: no fills) is all the ack needs
    result = order_result("p1", "PARTIALLY_FILLED", "0.25")
    result.update(timeInForce="GTC", type="LIMIT", side="BUY", workingTime=5,
                  selfTradePreventionMode="EXPIRE_MAKER", origQuoteOrderQty="0")  # fmt: skip
    d.reply(1, msg, result=result)
    ack = updates(d, "p1", ExecKind.ACK)[-1]
    assert ack.status is OrderStatus.PARTIALLY_FILLED
    assert ack.cum_qty == 0.25
    assert ack.order_id == 42
    assert d.session.place("p2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    assert "selfTradePreventionMode" not in d.take("order.place")["params"]
    assert not d.session.place("p3", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0, stp="SOMETIMES")
    d.pump()
    assert d.last("p3").error_code == LOCAL_INVALID


@pytest.mark.parametrize(("value", "text"), [(5000.5, "5000.5"), ("6000.346", "6000.346"),
                                             (5000, 5000), (60000.0, 60000)])  # fmt: skip
def test_decimal_recv_window_is_sent_and_signed_exactly(value: Any, text: Any) -> None:
    b = RequestBuilder("KEY", SIGNER, recv_window_ms=value, id_prefix="t-")
    params = b.params("session.logon", {}, timestamp_ms=1_700_000_000_000, sign=True)
    assert params["recvWindow"] == text
    assert f"recvWindow={text}&" in ws_payload(params)
    assert SIGNER.verify(ws_payload(params).encode(), params["signature"])


@pytest.mark.parametrize("value", [0, -1, 60000.001, 5000.1234, float("inf"), "abc", True])
def test_recv_window_out_of_bounds_is_refused_at_configuration(value: Any) -> None:
    with pytest.raises(ValueError, match="recvWindow"):
        RequestBuilder("KEY", SIGNER, recv_window_ms=value)


# ---- lossless handover -------------------------------------------------------------------------


def rolled_over() -> Driver:
    """A resting order on conn 1; conn 2 promoted; conn 1 draining within its grace."""
    d = acked("h1")
    d.session.connections.server_shutdown(d.session.connections.conns[1])
    d.tick_to(0.01)
    d.connect(2)
    assert d.session.primary_conn == 2
    assert not any(isinstance(a, Close) and a.conn == 1 for a in d.other)
    return d


def test_fill_reaching_only_the_old_primary_after_promotion_is_delivered() -> None:
    d = rolled_over()
    # sent by the venue before conn 2 subscribed: only conn 1 carries it, and it is read late
    d.event(1, report("h1", "TRADE", 11, z="0.5", last="0.5", status="PARTIALLY_FILLED"))
    trades = updates(d, "h1", ExecKind.TRADE)
    assert len(trades) == 1
    assert trades[0].last_qty == 0.5
    assert d.session.order_status("h1") is OrderStatus.PARTIALLY_FILLED


def test_fill_on_both_connections_is_delivered_once_in_either_order() -> None:
    d = rolled_over()
    d.event(2, report("h1", "TRADE", 12, z="0.5", last="0.5", status="PARTIALLY_FILLED"))
    d.event(1, report("h1", "TRADE", 12, z="0.5", last="0.5", status="PARTIALLY_FILLED"))
    d.event(1, report("h1", "TRADE", 13, z="1", last="0.5", status="FILLED"))
    d.event(2, report("h1", "TRADE", 13, z="1", last="0.5", status="FILLED"))
    assert [u.last_qty for u in updates(d, "h1", ExecKind.TRADE)] == [0.5, 0.5]
    assert d.session.metrics["user_data_duplicates"] == 2
    assert d.session.order_status("h1") is OrderStatus.FILLED
    d.tick_to(1.0)  # the grace is over: conn 1 closes, the remembered ids are let go
    assert any(isinstance(a, Close) and a.conn == 1 for a in d.other)
    d.session.place("h2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.take("order.place", 2)
    d.event(2, report("h2", "NEW", 14))
    assert not d.session._seen_exec


def test_overlap_before_promotion_delivers_once() -> None:
    d = acked("h3")
    d.session.connections.server_shutdown(d.session.connections.conns[1])
    d.tick_to(0.01)
    # the standby is subscribed at the venue but its answer is not read yet: events arrive on
    # both connections, the primary's first
    d.session.connected(2)
    d.reply(2, d.take("time", 2), result={"serverTime": d.clock.wall // 1_000_000})
    d.reply(2, d.take("session.logon", 2), result={"apiKey": "KEY"})
    sub = d.take("userDataStream.subscribe", 2)
    d.event(1, report("h3", "TRADE", 21, z="0.2", last="0.2", status="PARTIALLY_FILLED"))
    d.reply(2, sub, result={"subscriptionId": 0})
    assert d.session.primary_conn == 2
    d.event(2, report("h3", "TRADE", 21, z="0.2", last="0.2", status="PARTIALLY_FILLED"))
    assert len(updates(d, "h3", ExecKind.TRADE)) == 1


# ---- orders in doubt ---------------------------------------------------------------------------


def test_orders_in_doubt_gauge_follows_unknown_orders() -> None:
    d = Driver(json_ping_interval_s=1000, ping_interval_s=1000, unknown_stale_s=5.0)
    d.start_ready()
    m = d.session.metrics
    d.session.place("u1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), status=503, error={"code": -1007, "msg": "Timeout"})
    assert m["orders_in_doubt"] == m["orders_unknown_now"] == 1
    assert m["orders_unknown"] == 1
    d.reply(1, d.take("order.status"), status=500, error={"code": -1000, "msg": "x"})
    d.tick_to(6.0)
    assert m["problem_unknown_orders_stale"] == 1
    assert m["orders_in_doubt"] == 1
    d.reply(1, d.take("order.status"), result=order_result("u1"))
    d.tick_to(1.0)
    assert m["orders_in_doubt"] == 0
    assert m["problem_unknown_orders_stale"] == 0
    assert m["orders_unknown"] == 1  # the counter keeps its history
