"""Issue #11: arbitrary JSON in every WS API reply field the session reads (sans-I/O core).

Properties, for any value in any of those fields: no exception escapes ``frame_received`` or
``tick``; the session stays usable; and once the exchange answers sanely again, every order
ends in a known state (an UNKNOWN one is reconciled). Failing the session is allowed only the
documented way (an unsolicited 401: state Failed with an Exit action).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_session import Driver, order_report, order_result

from pipeline.trading.session import Exit, Open, OrderStatus, State

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.sampled_from([2**63, 2**63 - 1, -(2**63), 2**64, 10**17, -1, 0])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["NEW", "FILLED", "UNKNOWN", "PENDING", "", "1e400", "nan", "-1"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)

_LIMIT = {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1}
# Paths into a reply (or an executionReport) the session reads; () = the whole result.
REPLY_PATHS: list[tuple[str | int, ...]] = [
    ("status",),
    ("result",),
    ("result", "orderId"),
    ("result", "status"),
    ("result", "symbol"),
    ("result", "clientOrderId"),
    ("result", "price"),
    ("result", "origQty"),
    ("result", "executedQty"),
    ("result", "cummulativeQuoteQty"),
    ("result", "transactTime"),
    ("error",),
    ("error", "code"),
    ("error", "msg"),
    ("error", "data"),
    ("error", "data", "retryAfter"),
    ("rateLimits",),
    ("rateLimits", 0, "count"),
    ("rateLimits", 0, "limit"),
    ("rateLimits", 0, "rateLimitType"),
    ("id",),
]
EVENT_FIELDS = [
    "e", "s", "c", "C", "S", "x", "X", "i", "l", "z", "L", "Z", "E", "T", "t", "q", "p", "I",
]  # fmt: skip
TARGETS = ["place", "reconcile", "cancel", "modify", "amend", "time", "event"]


def _set(obj: Any, path: tuple[str | int, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        seq = list(obj) if isinstance(obj, list) else [{}]
        seq[0] = _set(seq[0], rest, value)
        return seq
    out = dict(obj) if isinstance(obj, dict) else {}
    out[head] = _set(out.get(head), rest, value)
    return out


def _frame(d: Driver, msg: dict[str, Any], body: dict[str, Any]) -> None:
    try:
        text = json.dumps({"id": msg["id"], **body})
    except ValueError:  # e.g. a circular value cannot happen; keep json's own limits
        return
    d.session.frame_received(1, text)
    d.pump()


def _sane(d: Driver) -> None:
    """Play a well-behaved exchange until nothing is PENDING/UNKNOWN (or the session ended)."""
    opened = {a.conn for a in d.other if isinstance(a, Open)}  # already connected
    sent_before = set(d.session.orders())  # never a second order.place for one of these
    for _ in range(200):
        s = d.session
        if s.state is State.FAILED:
            assert any(isinstance(a, Exit) for a in d.other)
            return
        for a in list(d.other):
            if isinstance(a, Open) and a.conn not in opened:
                opened.add(a.conn)
                d.connect(a.conn)
        d.pump()
        sent, d.sent = d.sent, []
        for conn, msg in sent:
            m, p = msg["method"], msg.get("params", {})
            if m == "order.status":
                coid = p["origClientOrderId"]
                d.reply(conn, msg, result=order_result(coid, "NEW"))
            elif m == "openOrders.status":
                d.reply(conn, msg, result=[])
            elif m == "time":
                d.reply(conn, msg, result={"serverTime": d.clock.wall // 1_000_000})
            elif m == "order.place":
                assert p["newClientOrderId"] not in sent_before, "order resent: a duplicate"
                d.reply(conn, msg, result=order_result(p["newClientOrderId"]))
            else:
                d.reply(conn, msg, result={})
        statuses = s.orders().values()
        if not any(st_ in (OrderStatus.PENDING, OrderStatus.UNKNOWN) for st_ in statuses):
            return
        d.tick_to(1.0)
    raise AssertionError(f"orders never settled: {d.session.orders()}")


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    target=st.sampled_from(TARGETS),
    path=st.sampled_from(REPLY_PATHS),
    event_field=st.sampled_from(EVENT_FIELDS),
    value=JSON,
    status=st.sampled_from([200, 400, 408, 418, 429, 500, 503]),
)
def test_arbitrary_json_in_any_reply_field_never_escapes_nor_loses_an_order(
    target: str, path: tuple[str | int, ...], event_field: str, value: Any, status: int
) -> None:
    d = Driver(ping_interval_s=1000, json_ping_interval_s=1000, request_timeout_s=3)
    d.start_ready()
    s = d.session
    s.place("a1", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
    place = d.take("order.place")
    base: dict[str, Any] = {
        "status": status,
        "result": order_result("a1"),
        "rateLimits": [{**_LIMIT, "limit": 6000, "count": 10}],
    }
    if status != 200:
        base["error"] = {"code": -1000, "msg": "x", "data": {"retryAfter": 1}}
    fuzzed = _set(base, path, value)
    if target == "place":
        _frame(d, place, fuzzed)
    else:
        d.reply(1, place, result=order_result("a1"))
        assert s.order_status("a1") is OrderStatus.NEW
        if target == "reconcile":
            s.place("a2", "BTCUSDT", "BUY", "LIMIT", 1.0, 100.0)
            d.reply(1, d.take("order.place"), status=500, error={"code": -1000, "msg": "x"})
            _frame(d, d.take("order.status"), _set(fuzzed, ("result", "clientOrderId"), "a2"))
        elif target == "cancel":
            s.cancel("a1")
            _frame(d, d.take("order.cancel"), fuzzed)
        elif target == "modify":
            s.modify("a1", "a3", qty=1.0, price=99.0)
            _frame(d, d.take("order.cancelReplace"), fuzzed)
        elif target == "amend":  # by orderId (acked); the answer's shape is fuzzed too
            s.amend("a1", 0.5)
            amended = _set(fuzzed, ("result",), {"transactTime": 1, "amendedOrder": value})
            reply = amended if path == ("result",) else fuzzed
            _frame(d, d.take("order.amend.keepPriority"), reply)
        elif target == "time":
            d.tick_to(601)  # the periodic resync
            _frame(d, d.take("time"), _set(fuzzed, ("result", "serverTime"), value))
        elif target == "event":
            ev = order_report("a1", "PARTIALLY_FILLED", "TRADE", z="0.5", last="0.5")
            ev[event_field] = value
            d.event(1, ev)
    d.tick_to(0.5)
    _sane(d)
    if s.state is not State.FAILED:
        for coid, st_ in s.orders().items():
            assert st_ not in (OrderStatus.PENDING, OrderStatus.UNKNOWN), (coid, st_)
