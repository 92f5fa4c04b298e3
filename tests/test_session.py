"""The session state machine, driven by hand with a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pipeline.backoff import Backoff, BackoffPolicy
from pipeline.binance.keys import parse_private_key
from pipeline.binance.signing import ws_payload
from pipeline.trading.session import (
    EXIT_AUTH,
    EXIT_GAVE_UP,
    LOCAL_BAD_REPLY,
    LOCAL_DUPLICATE_ID,
    LOCAL_INVALID,
    LOCAL_NOT_FOUND,
    LOCAL_NOT_READY,
    LOCAL_RATE_LIMITED,
    LOCAL_TABLE_FULL,
    TRANSITIONS,
    ApiReply,
    Close,
    ExecKind,
    ExecUpdate,
    Exit,
    LocalProtocolError,
    Open,
    OrderStatus,
    Ping,
    Send,
    Session,
    SessionConfig,
    State,
)

FIX_PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIIJEYWtGBrhACmb9Dvy+qa8WEf0lQOl1s4CLIAB9m89u\n"
    "-----END PRIVATE KEY-----\n"
)
SIGNER = parse_private_key(FIX_PEM)
S = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.mono = 1_000 * S
        self.wall = 1_700_000_000 * S

    def monotonic_ns(self) -> int:
        return self.mono

    def time_ns(self) -> int:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += int(seconds * S)
        self.wall += int(seconds * S)


class Driver:
    """Plays the exchange: collects actions, answers requests by hand."""

    def __init__(self, **cfg: Any) -> None:
        self.clock = FakeClock()
        policy = BackoffPolicy(jitter=0.0, max_attempts=cfg.pop("max_attempts", 10))
        config = SessionConfig(api_key="KEY", backoff=policy, **cfg)
        self.session = Session(
            config, SIGNER, clock=self.clock, backoff=Backoff(policy, random.Random(1))
        )
        self.transitions: list[tuple[State, State, str]] = []
        self.session.on_transition = lambda a, b, e: self.transitions.append((a, b, e))
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.other: list[Any] = []
        self.updates: list[ExecUpdate | ApiReply] = []

    def pump(self) -> list[Any]:
        acts = self.session.actions()
        for a in acts:
            if isinstance(a, Send):
                self.sent.append((a.conn, json.loads(a.text)))
            else:
                self.other.append(a)
        self.updates.extend(self.session.updates())
        return acts

    def take(self, method: str, conn: int | None = None) -> dict[str, Any]:
        self.pump()
        for i, (c, msg) in enumerate(self.sent):
            if msg["method"] == method and (conn is None or c == conn):
                del self.sent[i]
                return msg
        raise AssertionError(f"no {method} sent; sent={[m['method'] for _, m in self.sent]}")

    def methods(self) -> list[str]:
        self.pump()
        return [m["method"] for _, m in self.sent]

    def reply(
        self,
        conn: int,
        msg: dict[str, Any],
        status: int = 200,
        result: Any = None,
        error: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        frame: dict[str, Any] = {"id": msg["id"], "status": status, **extra}
        if error is not None:
            frame["error"] = error
        else:
            frame["result"] = {} if result is None else result
        self.session.frame_received(conn, json.dumps(frame))
        self.pump()

    def event(self, conn: int, event: dict[str, Any]) -> None:
        self.session.frame_received(conn, json.dumps({"subscriptionId": 0, "event": event}))
        self.pump()

    def connect(self, conn: int, *, server_offset_ms: int = 0) -> None:
        """Drive one connection from connected to subscribed."""
        self.session.connected(conn)
        t = self.take("time", conn)
        self.reply(conn, t, result={"serverTime": self.clock.wall // 1_000_000 + server_offset_ms})
        logon = self.take("session.logon", conn)
        params = logon["params"]
        assert SIGNER.verify(ws_payload(params).encode(), params["signature"])
        self.reply(conn, logon, result={"apiKey": "KEY"})
        sub = self.take("userDataStream.subscribe", conn)
        self.reply(conn, sub, result={"subscriptionId": 0})

    def start_ready(self) -> None:
        self.session.start()
        assert Open(1) in self.pump()
        self.connect(1)
        assert self.session.state is State.READY

    def tick_to(self, seconds: float) -> list[Any]:
        self.clock.advance(seconds)
        self.session.tick()
        return self.pump()

    def last(self, coid: str) -> ExecUpdate:
        for u in reversed(self.updates):
            if isinstance(u, ExecUpdate) and u.client_order_id == coid:
                return u
        raise AssertionError(f"no update for {coid}")


def order_report(
    coid: str, status: str, x: str, *, orig: str = "", z: str = "0", last: str = "0"
) -> dict[str, Any]:
    return {
        "e": "executionReport",
        "E": 1,
        "s": "BTCUSDT",
        "c": coid,
        "S": "BUY",
        "o": "LIMIT",
        "f": "GTC",
        "q": "1",
        "p": "100",
        "C": orig,
        "x": x,
        "X": status,
        "r": "NONE",
        "i": 42,
        "l": last,
        "z": z,
        "L": "100",
        "n": "0",
        "N": None,
        "T": 1,
        "t": -1,
        "Z": "0",
        "m": False,
    }


def order_result(coid: str, status: str = "NEW", executed: str = "0") -> dict[str, Any]:
    return {
        "symbol": "BTCUSDT",
        "orderId": 42,
        "clientOrderId": coid,
        "status": status,
        "price": "100",
        "origQty": "1",
        "executedQty": executed,
        "cummulativeQuoteQty": "0",
        "transactTime": 5,
    }


UNKNOWN_ORDER = {"code": -2011, "msg": "Unknown order sent."}
_CANCEL_REPLACE_MSG = {
    -2021: "Order cancel-replace partially failed.",
    -2022: "Order cancel-replace failed.",
}


def cancel_replace_error(
    code: int, cancel: tuple[str, Any], new_order: tuple[str, Any]
) -> dict[str, Any]:
    """The ``error`` of a failed order.cancelReplace: each leg is ``(result, response)``."""
    return {
        "code": code,
        "msg": _CANCEL_REPLACE_MSG[code],
        "data": {
            "cancelResult": cancel[0],
            "newOrderResult": new_order[0],
            "cancelResponse": cancel[1],
            "newOrderResponse": new_order[1],
        },
    }


def test_transition_table_covers_the_documented_path() -> None:
    path = [
        ("start", State.CONNECTING),
        ("connected", State.AUTHENTICATING),
        ("logon_ok", State.READY),
        ("lost", State.RECONNECTING),
        ("retry", State.CONNECTING),
        ("connect_failed", State.RECONNECTING),
        ("give_up", State.FAILED),
    ]
    state = State.DISCONNECTED
    for event, expected in path:
        state = TRANSITIONS[(state, event)]
        assert state is expected
    assert (State.FAILED, "stop") not in TRANSITIONS


def test_happy_path_logon_then_only_timestamp() -> None:
    d = Driver()
    d.start_ready()
    assert [(a.name, b.name) for a, b, _ in d.transitions] == [
        ("DISCONNECTED", "CONNECTING"),
        ("CONNECTING", "AUTHENTICATING"),
        ("AUTHENTICATING", "READY"),
    ]
    assert d.session.metrics["user_data_subscribed"] == 1
    assert d.session.metrics["transitions_total"] == 3
    assert d.session.place("abc_1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.5, "GTC")
    msg = d.take("order.place")
    assert "signature" not in msg["params"]
    assert "apiKey" not in msg["params"]
    assert msg["params"]["newClientOrderId"] == "abc_1"
    assert msg["params"]["price"] == "100.5"
    assert isinstance(msg["params"]["timestamp"], int)
    d.reply(1, msg, result=order_result("abc_1"))
    u = d.last("abc_1")
    assert (u.kind, u.status, u.order_id) == (ExecKind.ACK, OrderStatus.NEW, 42)
    assert d.session.metrics["orders_acked"] == 1


def test_clock_offset_used_for_timestamps() -> None:
    d = Driver()
    d.session.start()
    d.pump()
    d.session.connected(1)
    t = d.take("time")
    d.reply(1, t, result={"serverTime": d.clock.wall // 1_000_000 + 5000})
    logon = d.take("session.logon")
    assert logon["params"]["timestamp"] == d.clock.wall // 1_000_000 + 5000
    assert d.session.metrics["clock_offset_ms"] == pytest.approx(5000, abs=1)


def test_wrong_key_is_fatal_without_retry_storm() -> None:
    d = Driver()
    d.session.start()
    d.pump()
    d.session.connected(1)
    d.reply(1, d.take("time"), result={"serverTime": 1})
    d.reply(
        1,
        d.take("session.logon"),
        status=400,
        error={"code": -1022, "msg": "Signature for this request is not valid."},
    )
    assert d.session.state is State.FAILED
    exits = [a for a in d.other if isinstance(a, Exit)]
    assert exits
    assert exits[0].code == EXIT_AUTH
    assert "-1022" in exits[0].reason
    assert "registered" in exits[0].reason
    for _ in range(20):
        d.tick_to(120)
    assert not [a for a in d.other if isinstance(a, Open) and a.conn != 1]
    assert d.session.next_deadline() is None


def test_unsolicited_401_fails_the_session() -> None:
    d = Driver()
    d.start_ready()
    d.session.frame_received(
        1,
        json.dumps(
            {
                "id": None,
                "status": 401,
                "error": {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
            }
        ),
    )
    d.pump()
    assert d.session.state is State.FAILED
    assert d.session.exit_code == EXIT_AUTH


def test_missing_pong_kills_and_reconnects_with_backoff() -> None:
    d = Driver(ping_interval_s=30, pong_timeout_s=10, json_ping_interval_s=1000)
    d.start_ready()
    acts = d.tick_to(30)
    assert Ping(1) in acts
    d.tick_to(5)
    d.session.pong(1)  # answered in time: alive
    assert d.session.metrics["rtt_us"] == pytest.approx(5e6)
    acts = d.tick_to(30)
    assert Ping(1) in acts
    acts = d.tick_to(10.5)  # no pong: dead
    assert any(isinstance(a, Close) and a.conn == 1 for a in acts)
    assert d.session.state is State.RECONNECTING
    assert d.tick_to(0.9) == []  # first backoff delay is 1 s
    acts = d.tick_to(0.2)
    assert Open(2) in acts
    d.connect(2)
    assert d.session.state is State.READY
    assert d.session.metrics["reconnects_total"] == 1
    assert d.session.metrics["reconnect_attempts"] == 0  # reset after success
    assert d.session.metrics["user_data_subscribed"] == 1


def test_missing_json_ping_reply_kills() -> None:
    d = Driver(ping_interval_s=1000, json_ping_interval_s=5, pong_timeout_s=2)
    d.start_ready()
    d.tick_to(5)
    ping = d.take("ping")
    d.reply(1, ping)
    assert d.session.metrics["last_json_ping_reply_ns"] > 0
    d.tick_to(5)
    d.take("ping")
    d.tick_to(2.5)
    assert d.session.state is State.RECONNECTING


def test_gives_up_after_max_attempts() -> None:
    d = Driver(max_attempts=10)
    d.session.start()
    d.pump()
    conn = 1
    for attempt in range(1, 11):
        d.session.connect_failed(conn, "refused")
        acts = d.pump()
        if attempt == 10:
            break
        assert d.session.state is State.RECONNECTING
        acts = d.tick_to(61)
        opens = [a for a in acts if isinstance(a, Open)]
        assert len(opens) == 1
        conn = opens[0].conn
    assert d.session.state is State.FAILED
    assert d.session.exit_code == EXIT_GAVE_UP
    assert any(isinstance(a, Exit) and a.code == EXIT_GAVE_UP for a in d.other)


def test_order_in_flight_on_disconnect_is_reconciled_not_resent() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("o1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.take("order.place")
    d.session.connection_lost(1, "reset")
    d.pump()
    assert d.last("o1").status is OrderStatus.UNKNOWN
    assert d.session.metrics["orders_unknown"] == 1
    d.tick_to(1.1)
    d.connect(2)
    status = d.take("order.status", 2)
    assert status["params"]["origClientOrderId"] == "o1"
    assert "order.place" not in d.methods()
    d.reply(2, status, result=order_result("o1", "FILLED", "1"))
    u = d.last("o1")
    assert (u.kind, u.status, u.cum_qty) == (ExecKind.RECONCILED, OrderStatus.FILLED, 1.0)
    assert d.session.metrics["orders_reconciled"] == 1
    assert "order.place" not in d.methods()


def test_minus_1007_then_not_found_is_reported_rejected_never_resent() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("o2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), status=408, error={"code": -1007, "msg": "Timeout"})
    assert d.last("o2").status is OrderStatus.UNKNOWN
    status = d.take("order.status")
    d.reply(1, status, status=400, error={"code": -2013, "msg": "Order does not exist."})
    u = d.last("o2")
    assert (u.status, u.error_code) == (OrderStatus.REJECTED, LOCAL_NOT_FOUND)
    assert "order.place" not in d.methods()
    # a late report (the order did reach the book after all) is applied and counted
    d.event(1, order_report("o2", "NEW", "NEW"))
    assert d.session.order_status("o2") is OrderStatus.NEW
    assert d.session.metrics["orders_late"] == 1


def test_unknown_resolved_by_user_data_stream() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("o3", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), status=500, error={"code": -1000, "msg": "x"})
    status = d.take("order.status")
    d.event(1, order_report("o3", "NEW", "NEW"))
    assert d.last("o3").kind is ExecKind.RECONCILED
    d.reply(1, status, result=order_result("o3"))  # late status answer changes nothing
    assert d.session.metrics["orders_reconciled"] == 1


def test_request_deadline_makes_order_unknown() -> None:
    d = Driver(request_timeout_s=3, json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    d.session.place("o4", "BTCUSDT", "SELL", "MARKET", 1.0)
    msg = d.take("order.place")
    assert "timeInForce" not in msg["params"]
    assert "price" not in msg["params"]
    d.tick_to(3.1)
    assert d.last("o4").status is OrderStatus.UNKNOWN
    assert d.session.metrics["requests_timed_out"] == 1
    d.take("order.status")


def test_minus_1021_resyncs_and_retries_once() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("o5", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    first = d.take("order.place")
    d.reply(1, first, status=400, error={"code": -1021, "msg": "Timestamp outside recvWindow"})
    t = d.take("time")
    d.reply(1, t, result={"serverTime": d.clock.wall // 1_000_000 - 3000})
    second = d.take("order.place")
    assert second["params"]["newClientOrderId"] == "o5"
    assert second["id"] != first["id"]
    d.reply(1, second, status=400, error={"code": -1021, "msg": "again"})
    assert d.last("o5").status is OrderStatus.REJECTED
    assert "order.place" not in d.methods()
    assert d.session.metrics["time_resyncs"] == 1


def test_rate_limit_429_blocks_until_retry_after() -> None:
    d = Driver(json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    d.session.place("o6", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    retry = d.clock.wall // 1_000_000 + 2000
    d.reply(
        1,
        d.take("order.place"),
        status=429,
        error={"code": -1003, "msg": "Too many", "data": {"retryAfter": retry}},
    )
    assert d.last("o6").status is OrderStatus.REJECTED
    assert not d.session.place("o7", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.pump()
    assert d.last("o7").error_code == LOCAL_RATE_LIMITED
    assert "order.place" not in d.methods()
    d.tick_to(2.1)
    assert d.session.place("o8", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.take("order.place")


def test_local_rejects() -> None:
    d = Driver()
    assert not d.session.place("x1", "BTCUSDT", "BUY", "LIMIT", 1.0, 1.0)
    d.pump()
    assert d.last("x1").error_code == LOCAL_NOT_READY
    d.start_ready()
    assert not d.session.place("bad id!", "BTCUSDT", "BUY", "LIMIT", 1.0, 1.0)
    assert not d.session.place("a" * 37, "BTCUSDT", "BUY", "LIMIT", 1.0, 1.0)
    assert not d.session.place("x2", "BTCUSDT", "HOLD", "LIMIT", 1.0, 1.0)
    assert not d.session.place("x3", "BTCUSDT", "BUY", "LIMIT", 1.0, None)
    d.pump()
    assert d.last("x3").error_code == LOCAL_INVALID
    assert d.session.place("x4", "BTCUSDT", "BUY", "LIMIT", 1.0, 1.0)
    assert not d.session.place("x4", "BTCUSDT", "BUY", "LIMIT", 1.0, 1.0)
    d.pump()
    assert d.last("x4").error_code == LOCAL_DUPLICATE_ID
    assert d.methods().count("order.place") == 1


def test_server_shutdown_make_before_break() -> None:
    d = Driver(json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    d.session.place("o9", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    place = d.take("order.place", 1)
    d.session.frame_received(1, json.dumps({"event": {"e": "serverShutdown", "E": 1}}))
    acts = d.tick_to(0.01)
    assert Open(2) in acts
    assert d.session.state is State.READY  # still trading on the old connection
    d.connect(2)
    assert d.session.primary_conn == 2
    assert d.session.metrics["rollovers_total"] == 1
    assert not any(isinstance(a, Close) and a.conn == 1 for a in d.other)  # draining
    # a report without an execution id cannot be de-duplicated: only the primary's counts
    d.event(1, order_report("o9", "NEW", "NEW"))
    assert d.session.order_status("o9") is OrderStatus.PENDING
    d.reply(1, place, result=order_result("o9"))
    assert d.session.order_status("o9") is OrderStatus.NEW
    # answered, but kept for the handover grace: its user data may still be on the way
    assert not any(isinstance(a, Close) and a.conn == 1 for a in d.other)
    d.tick_to(1.01)
    assert any(isinstance(a, Close) and a.conn == 1 for a in d.other)
    assert d.session.place("o10", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.take("order.place", 2)


def test_proactive_rollover_before_24h() -> None:
    d = Driver(
        max_connection_age_s=100,
        json_ping_interval_s=1000,
        ping_interval_s=1000,
        time_sync_interval_s=1000,
    )
    d.start_ready()
    assert d.tick_to(50) == []
    acts = d.tick_to(51)
    assert Open(2) in acts
    d.connect(2)
    assert d.session.primary_conn == 2
    assert d.session.next_deadline() == d.clock.mono + int(1.0 * 1e9)  # the handover grace
    d.tick_to(1.0)
    assert any(isinstance(a, Close) and a.conn == 1 for a in d.other)


def test_lost_primary_during_rollover_promotes_ready_standby() -> None:
    d = Driver(max_connection_age_s=10, json_ping_interval_s=1000, ping_interval_s=1000)
    d.start_ready()
    d.tick_to(11)
    d.connect(2)
    assert d.session.primary_conn == 2
    d.session.connection_lost(2, "x")
    d.pump()
    assert d.session.state is State.RECONNECTING


def test_cancel_replace_partial_failure() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("m1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), result=order_result("m1"))
    assert d.session.modify("m1", "m2", qty=1.0, price=99.0)
    msg = d.take("order.cancelReplace")
    assert msg["params"]["cancelOrderId"] == 42  # acked: by orderId (7.2)
    assert "cancelOrigClientOrderId" not in msg["params"]
    assert msg["params"]["newClientOrderId"] == "m2"
    assert msg["params"]["cancelReplaceMode"] == "STOP_ON_FAILURE"
    d.reply(
        1,
        msg,
        status=409,
        error=cancel_replace_error(
            -2021,
            ("SUCCESS", order_result("m1", "CANCELED") | {"origClientOrderId": "m1"}),
            ("FAILURE", {"code": -2010, "msg": "Order would immediately match"}),
        ),
    )
    assert d.session.order_status("m1") is OrderStatus.CANCELED
    u = d.last("m2")
    assert (u.status, u.error_code) == (OrderStatus.REJECTED, -2010)


def test_cancel_replace_stop_on_failure() -> None:
    d = Driver()
    d.start_ready()
    assert d.session.modify("gone", "m3", qty=1.0, price=99.0, symbol="BTCUSDT", side="BUY")
    d.reply(
        1,
        d.take("order.cancelReplace"),
        status=400,
        error=cancel_replace_error(-2022, ("FAILURE", UNKNOWN_ORDER), ("NOT_ATTEMPTED", None)),
    )
    assert d.last("gone").kind is ExecKind.CANCEL_REJECT
    assert d.last("m3").status is OrderStatus.REJECTED


def test_cancel_and_execution_reports() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("c1", "BTCUSDT", "BUY", "LIMIT", 2.0, 100.0)
    d.reply(1, d.take("order.place"), result=order_result("c1"))
    d.event(1, order_report("c1", "PARTIALLY_FILLED", "TRADE", z="1", last="1"))
    u = d.last("c1")
    assert (u.kind, u.last_qty, u.cum_qty) == (ExecKind.TRADE, 1.0, 1.0)
    assert d.session.cancel("c1")
    d.reply(1, d.take("order.cancel"), result=order_result("c1", "CANCELED", "1"))
    assert d.session.order_status("c1") is OrderStatus.CANCELED
    d.event(1, order_report("cx", "CANCELED", "CANCELED", orig="c1", z="1"))
    assert d.last("c1").kind is ExecKind.CANCELED
    d.event(1, order_report("not-ours", "NEW", "NEW"))  # ignored
    assert d.session.order_status("not-ours") is None


def test_a_late_reply_never_moves_the_status_back() -> None:
    """Reports (user data) and replies (the request's connection) travel apart: a place reply
    that says NEW, arriving after the reports of fills, must not make a filled order look
    working again, nor a partly filled one untouched."""
    d = Driver()
    d.start_ready()
    d.session.place("c1", "BTCUSDT", "BUY", "LIMIT", 2.0, 100.0)
    d.session.place("c2", "BTCUSDT", "BUY", "LIMIT", 2.0, 100.0)
    r1, r2 = d.take("order.place"), d.take("order.place")
    d.event(1, order_report("c1", "FILLED", "TRADE", z="2", last="2"))
    d.event(1, order_report("c2", "PARTIALLY_FILLED", "TRADE", z="1", last="1"))
    d.reply(1, r1, result=order_result("c1"))  # NEW, executed 0: older than the reports
    d.reply(1, r2, result=order_result("c2"))
    assert d.session.order_status("c1") is OrderStatus.FILLED
    assert d.session.order_status("c2") is OrderStatus.PARTIALLY_FILLED
    assert (d.last("c1").status, d.last("c1").cum_qty) == (OrderStatus.FILLED, 2.0)
    assert (d.last("c2").status, d.last("c2").cum_qty) == (OrderStatus.PARTIALLY_FILLED, 1.0)


def test_stream_terminated_resubscribes() -> None:
    d = Driver()
    d.start_ready()
    d.event(1, {"e": "eventStreamTerminated", "E": 1})
    assert d.session.metrics["user_data_subscribed"] == 0
    d.reply(1, d.take("userDataStream.subscribe"), result={"subscriptionId": 1})
    assert d.session.metrics["user_data_subscribed"] == 1


def test_generic_requests_and_status_query() -> None:
    d = Driver()
    d.start_ready()
    assert d.session.request("account.status", tag="acct")
    msg = d.take("account.status")
    assert "timestamp" in msg["params"]
    d.reply(
        1,
        msg,
        result={"balances": []},
        rateLimits=[
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": 6000,
                "count": 25,
            },
            {
                "rateLimitType": "ORDERS",
                "interval": "SECOND",
                "intervalNum": 10,
                "limit": 50,
                "count": 3,
            },
        ],
    )
    reply = d.updates[-1]
    assert isinstance(reply, ApiReply)
    assert reply.tag == "acct"
    assert reply.response.ok
    assert (d.session.metrics["weight_used"], d.session.metrics["weight_limit"]) == (25, 6000)
    assert (d.session.metrics["orders_used"], d.session.metrics["orders_limit"]) == (3, 50)
    assert d.session.query("zz", "BTCUSDT")
    d.reply(1, d.take("order.status"), result=order_result("zz", "FILLED", "1"))
    assert d.last("zz").status is OrderStatus.FILLED


def test_garbage_frames_are_counted_not_fatal() -> None:
    d = Driver()
    d.start_ready()
    d.session.frame_received(1, "{not json")
    d.session.frame_received(1, json.dumps({"id": "nope", "status": 200, "result": {}}))
    d.session.frame_received(
        1, json.dumps({"subscriptionId": 0, "event": {"e": "executionReport"}})
    )
    assert d.session.metrics["protocol_errors"] == 3
    assert d.session.state is State.READY


def test_bad_transition_is_a_local_error() -> None:
    d = Driver()
    with pytest.raises(LocalProtocolError) as exc:
        d.session.connections.transition("logon_ok")
    assert not exc.value.remote


def test_stop_closes_everything() -> None:
    d = Driver()
    d.start_ready()
    d.session.stop()
    acts = d.pump()
    assert any(isinstance(a, Close) for a in acts)
    assert d.session.state is State.DISCONNECTED


def test_cancel_replace_allow_failure_new_order_placed() -> None:
    d = Driver(cancel_replace_mode="ALLOW_FAILURE")
    d.start_ready()
    assert d.session.modify("old", "n1", qty=1.0, price=99.0, symbol="BTCUSDT", side="BUY")
    msg = d.take("order.cancelReplace")
    assert msg["params"]["cancelReplaceMode"] == "ALLOW_FAILURE"
    d.reply(
        1,
        msg,
        status=409,
        error=cancel_replace_error(
            -2021, ("FAILURE", UNKNOWN_ORDER), ("SUCCESS", order_result("n1"))
        ),
    )
    assert d.last("old").kind is ExecKind.CANCEL_REJECT
    assert d.last("old").error_code == -2011
    assert d.last("n1").kind is ExecKind.ACK
    assert d.session.order_status("n1") is OrderStatus.NEW


def test_modify_lost_in_flight_makes_both_orders_unknown() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("m5", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), result=order_result("m5"))
    d.session.modify("m5", "m6", qty=1.0, price=99.0)
    d.take("order.cancelReplace")
    d.session.connection_lost(1, "reset")
    d.pump()
    assert d.session.order_status("m5") is OrderStatus.UNKNOWN
    assert d.session.order_status("m6") is OrderStatus.UNKNOWN
    d.tick_to(1.1)
    d.connect(2)
    queried = {d.take("order.status", 2)["params"]["origClientOrderId"] for _ in range(2)}
    assert queried == {"m5", "m6"}


def test_order_waiting_for_resync_is_not_forgotten_when_connection_drops() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("w1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), status=400, error={"code": -1021, "msg": "ts"})
    d.take("time")
    d.session.connection_lost(1, "reset")
    d.pump()
    assert d.session.order_status("w1") is OrderStatus.UNKNOWN
    d.tick_to(1.1)
    d.connect(2)
    status = d.take("order.status", 2)
    d.reply(2, status, status=400, error={"code": -2013, "msg": "Order does not exist."})
    assert d.session.order_status("w1") is OrderStatus.REJECTED
    assert "order.place" not in d.methods()


def test_logon_timeout_counts_as_failed_attempt() -> None:
    d = Driver(request_timeout_s=2, ping_interval_s=100, json_ping_interval_s=100)
    d.session.start()
    d.pump()
    d.session.connected(1)
    d.reply(1, d.take("time"), result={"serverTime": 1})
    d.take("session.logon")
    d.tick_to(2.1)
    assert d.session.state is State.RECONNECTING
    assert d.session.metrics["reconnect_attempts"] == 1


def test_unknown_order_is_asked_again_until_known() -> None:
    d = Driver(reconcile_interval_s=1.0, ping_interval_s=100, json_ping_interval_s=100)
    d.start_ready()
    d.session.place("u1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), status=408, error={"code": -1007, "msg": "Timeout"})
    first = d.take("order.status")
    d.reply(1, first, status=503, error={"code": -1007, "msg": "Timeout"})  # still unknown
    assert d.session.order_status("u1") is OrderStatus.UNKNOWN
    assert "order.status" not in d.methods()
    d.tick_to(1.1)
    again = d.take("order.status")
    assert again["params"]["origClientOrderId"] == "u1"
    d.reply(1, again, result=order_result("u1", "CANCELED"))
    assert d.session.order_status("u1") is OrderStatus.CANCELED
    d.tick_to(1.1)
    assert "order.status" not in d.methods()


def test_order_table_is_bounded_and_keeps_live_orders() -> None:
    d = Driver(max_orders=10)
    d.start_ready()
    d.session.place("live", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), result=order_result("live"))
    for i in range(30):
        coid = f"f{i}"
        d.session.place(coid, "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
        d.reply(1, d.take("order.place"), status=400, error={"code": -2010, "msg": "no"})
    table = d.session.orders()
    assert len(table) <= 10
    assert table["live"] is OrderStatus.NEW
    assert "f29" in table


# ---- issue #11: hostile replies, reconciliation budget, bounds ---------------------------------


def test_order_table_full_of_live_orders_rejects_new_ones() -> None:
    d = Driver(max_orders=10)
    d.start_ready()
    for i in range(10):
        d.session.place(f"l{i}", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
        d.reply(1, d.take("order.place"), result=order_result(f"l{i}"))
    assert not d.session.place("over", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.pump()
    assert (d.last("over").kind, d.last("over").error_code) == (ExecKind.REJECT, LOCAL_TABLE_FULL)
    assert "order.place" not in d.methods()
    assert len(d.session.orders()) == 10
    # one finishes: room again (the final one is forgotten)
    d.event(1, order_report("l0", "FILLED", "TRADE", z="1", last="1"))
    d.clock.advance(1.1)
    assert d.session.place("next", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    assert "l0" not in d.session.orders()


@pytest.mark.parametrize(
    "result",
    [
        {},
        [],
        {**order_result("x"), "orderId": 2**64},
        {**order_result("x"), "orderId": -5},
        {**order_result("x"), "status": "BOGUS"},
        {**order_result("x"), "status": "UNKNOWN"},
        {**order_result("x"), "symbol": ["nested"]},
        {**order_result("x"), "price": "nan"},
        {**order_result("x"), "transactTime": 10**17},
    ],
)
def test_unreadable_place_reply_makes_the_order_unknown_and_reconciled(result: Any) -> None:
    d = Driver()
    d.start_ready()
    d.session.place("x", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), result=result)
    assert d.session.order_status("x") is OrderStatus.UNKNOWN
    assert (d.last("x").kind, d.last("x").error_code) == (ExecKind.UNKNOWN, LOCAL_BAD_REPLY)
    assert d.session.metrics["protocol_errors"] == 1
    status = d.take("order.status")
    d.reply(1, status, result=order_result("x"))
    assert (d.last("x").kind, d.last("x").status) == (ExecKind.RECONCILED, OrderStatus.NEW)
    assert d.session.state is State.READY


def test_null_result_and_deep_json_resolve_the_request_at_once() -> None:
    d = Driver()
    d.start_ready()
    d.session.place("n1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    rid = d.take("order.place")["id"]
    d.session.frame_received(1, json.dumps({"id": rid, "status": 200, "result": None}))
    d.pump()
    assert d.session.order_status("n1") is OrderStatus.UNKNOWN
    d.session.place("n2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    rid = d.take("order.place")["id"]
    deep = f'{{"id":"{rid}","status":200,"result":{"[" * 100_000}{"]" * 100_000}}}'
    d.session.frame_received(1, deep)  # no RecursionError: a counted protocol error
    d.pump()
    assert d.session.order_status("n2") is OrderStatus.UNKNOWN
    assert d.session.metrics["protocol_errors"] == 2
    # an error whose msg is 1000-deep (str() of it would recurse) is a protocol error too
    d.session.place("n3", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    rid = d.take("order.place")["id"]
    msg = "[" * 1000 + "]" * 1000
    d.session.frame_received(
        1, f'{{"id":"{rid}","status":400,"error":{{"code":-1013,"msg":{msg}}}}}'
    )
    d.pump()
    assert d.session.order_status("n3") is OrderStatus.UNKNOWN
    assert d.session.metrics["protocol_errors"] == 3


def test_out_of_range_rate_limits_and_retry_after_are_counted_not_fatal() -> None:
    d = Driver(default_retry_after_s=5.0)
    d.start_ready()
    assert d.session.request("account.status", tag="a")
    limit = {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1}
    d.reply(1, d.take("account.status"), rateLimits=[{**limit, "limit": 6000, "count": 2**63}])
    assert d.session.metrics["protocol_errors"] == 1
    assert d.session.metrics["weight_used"] == 0  # the bad entry was dropped
    d.session.place("r", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    err = {"code": -1003, "msg": "Too many", "data": {"retryAfter": 10**17}}
    d.reply(1, d.take("order.place"), status=429, error=err)
    assert d.session.metrics["protocol_errors"] >= 2
    assert d.session.order_status("r") is OrderStatus.REJECTED
    d.tick_to(5.1)  # the default wait, not 10**17 ms
    assert d.session.place("r2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)


def test_reconciliation_backs_off_and_goes_bulk() -> None:
    d = Driver(reconcile_interval_s=1.0, ping_interval_s=1000, json_ping_interval_s=1000)
    d.start_ready()
    for i in range(5):
        d.session.place(f"u{i}", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    for _ in range(5):
        d.reply(1, d.take("order.place"), status=500, error={"code": -1000, "msg": "x"})
    # the first ones are asked at once, one by one, within the burst budget
    firsts = [d.take("order.status") for _ in range(5)]
    for m in firsts:
        d.reply(1, m, status=500, error={"code": -1000, "msg": "x"})
    assert "order.status" not in d.methods()
    d.tick_to(1.1)  # all five due again: one openOrders.status for the symbol instead
    bulk = d.take("openOrders.status")
    assert bulk["params"]["symbol"] == "BTCUSDT"
    assert "order.status" not in d.methods()
    d.reply(1, bulk, status=500, error={"code": -1000, "msg": "x"})
    d.tick_to(1.1)
    assert "openOrders.status" not in d.methods()  # backoff doubled: 2 s now
    d.tick_to(1.1)
    bulk = d.take("openOrders.status")
    listed = {**order_result("u0"), "clientOrderId": "u0"}
    d.reply(1, bulk, result=[listed])
    assert d.session.order_status("u0") is OrderStatus.NEW
    d.tick_to(1.1)  # not listed: only order.status can tell filled from never placed
    asked = {d.take("order.status")["params"]["origClientOrderId"] for _ in range(4)}
    assert asked == {"u1", "u2", "u3", "u4"}


def test_stale_unknown_orders_raise_the_problem_metric() -> None:
    d = Driver(unknown_stale_s=3.0, ping_interval_s=1000, json_ping_interval_s=1000)
    d.start_ready()
    d.session.place("s1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    d.reply(1, d.take("order.place"), status=500, error={"code": -1000, "msg": "x"})
    d.tick_to(1.0)
    assert d.session.metrics["orders_unknown_now"] == 1
    assert d.session.metrics["problem_unknown_orders_stale"] == 0
    for _ in range(3):
        d.tick_to(1.1)
    assert d.session.metrics["problem_unknown_orders_stale"] == 1
    d.event(1, order_report("s1", "NEW", "NEW"))
    d.tick_to(1.1)
    assert d.session.metrics["problem_unknown_orders_stale"] == 0
    assert d.session.metrics["orders_unknown_now"] == 0


def test_order_answers_fill_the_round_trip_histogram_and_nothing_else_does() -> None:
    """Each answered order request lands in one bucket by its written -> answered time (the
    bounds are inclusive); logon, time and status requests do not count."""
    from pipeline.trading.session import ORDER_RTT_FIELDS

    d = Driver()
    d.start_ready()
    m = d.session.metrics
    assert sum(m[f] for f in ORDER_RTT_FIELDS) == 0  # the handshake's requests are not orders
    d.session.place("h1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    msg = d.take("order.place")
    d.clock.advance(0.0003)  # exactly 300 us: the 300 us bucket
    d.reply(1, msg, result=order_result("h1"))
    assert d.session.cancel("h1")
    msg = d.take("order.cancel")
    d.clock.advance(0.2)  # beyond the last bound
    d.reply(1, msg, result=order_result("h1", "CANCELED"))
    d.session.query("h1", "BTCUSDT")
    d.reply(1, d.take("order.status"), result=order_result("h1", "CANCELED"))
    counts = {f: m[f] for f in ORDER_RTT_FIELDS if m[f]}
    assert counts == {"order_rtt_le_300us": 1, "order_rtt_le_inf": 1}
    assert sum(m[f] for f in ORDER_RTT_FIELDS) == 2
    assert m["order_rtt_sum_us"] == 300.0 + 200_000.0
