"""The order path's fast forms do what the plain forms they replaced did (issue 13 follow-up).

- The request builder's one fragment cache cannot smuggle a cached field into a frame that
  wsapi must build (``recvWindow`` given in the params), and values equal as dict keys but
  rendered apart stay apart whatever the order they arrive in.
- A PLACE through the dispatcher (send gate asked once) writes the same frame, pending request
  and order table entry as the session did, and a refused order still writes nothing.
- :class:`ExecReport` decoded by :meth:`ExecReport.from_record` equals, field for field, the
  frozen dataclass it was: same attributes, equality, hash, repr, immutability.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import Any

from pipeline.binance.wsapi import RequestBuilder
from pipeline.trading.encode import TemplateRequestBuilder

TS = 1_767_225_600_123
PLACE = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": 0.001,
         "newClientOrderId": "s-1", "price": 45000.12, "timeInForce": "GTC"}  # fmt: skip


def _pair(recv_window: int | None = 5000) -> tuple[RequestBuilder, TemplateRequestBuilder]:
    ref = RequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")
    tpl = TemplateRequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")
    return ref, tpl


def test_a_recv_window_in_the_params_is_never_served_from_the_cache() -> None:
    """The builder's own recvWindow fragment is cached; params that carry the same value must
    still go to wsapi (which keeps the caller's value once), not get it twice."""
    ref, tpl = _pair(5000)
    for params in (PLACE, {**PLACE, "recvWindow": 5000}, {**PLACE, "recvWindow": 5000}, PLACE):
        got = tpl.build("order.place", params, timestamp_ms=TS)
        assert got == ref.build("order.place", params, timestamp_ms=TS)
        assert got[1].count("recvWindow") == 1


def test_equal_keys_rendered_apart_in_any_order() -> None:
    """1, 1.0, True, Decimal 1, 0.0 and -0.0 are equal dict keys: a cache keyed by value alone
    would answer one with another's text. Shuffled, twice each, against wsapi."""
    values: list[Any] = [1, 1.0, True, Decimal("1"), 0.0, -0.0, 2.5, "1", "1.0", 1e-08]
    rng = random.Random(7)
    for recv_window in (None, 5000):
        ref, tpl = _pair(recv_window)
        seq = values * 2
        rng.shuffle(seq)
        for v in seq:
            for key in ("quantity", "price", "symbol"):
                params = {**PLACE, key: v}
                assert tpl.build("order.place", params, timestamp_ms=TS) == ref.build(
                    "order.place", params, timestamp_ms=TS
                ), (key, v)


def test_request_ids_that_need_escaping_are_escaped() -> None:
    """Generated ids skip the escape check only when the prefix is plain text."""
    for prefix in ("p-", 'q"\\-', "é-"):
        ref = RequestBuilder("key", None, id_prefix=prefix)
        tpl = TemplateRequestBuilder("key", None, id_prefix=prefix)
        for _ in range(3):
            got = tpl.build("order.place", PLACE, timestamp_ms=TS)
            assert got == ref.build("order.place", PLACE, timestamp_ms=TS)
            assert json.loads(got[1])["id"] == got[0]


class _Clock:
    def __init__(self) -> None:
        self.mono = 1_000 * 10**9
        self.wall = 1_767_225_600_123 * 10**6

    def monotonic_ns(self) -> int:
        return self.mono

    def time_ns(self) -> int:
        return self.wall


def _ready_session(recv_window: int | None) -> Any:
    """A session logged on by hand (the venue's answers written here), building its frames
    with the template builder."""
    from pipeline.binance.keys import parse_private_key
    from pipeline.trading.session import Send, Session, SessionConfig, State

    signer = parse_private_key(bytes(range(32)).hex())
    cfg = SessionConfig(api_key="key", recv_window_ms=recv_window)
    builder = TemplateRequestBuilder("key", signer, recv_window_ms=recv_window, id_prefix="p-")
    s = Session(cfg, signer, clock=_Clock(), builder=builder)

    def answer(result: dict[str, Any]) -> None:
        sends = [a for a in s.actions() if isinstance(a, Send)]
        rid = json.loads(sends[-1].text)["id"]
        s.frame_received(1, json.dumps({"id": rid, "status": 200, "result": result}))

    s.start()
    s.actions()
    s.connected(1)
    answer({"serverTime": 1_767_225_600_123})
    answer({"apiKey": "key"})
    answer({"subscriptionId": 0})
    assert s.state is State.READY
    s.updates()
    return s


def test_place_writes_the_frame_pending_request_and_order_wsapi_would() -> None:
    """A PLACE asks the send gate once now: the frame is still wsapi's byte for byte, the
    pending request and the order table entry are the ones the session always kept, and a
    refused order (duplicate id, bad side, not ready) writes nothing."""
    from pipeline.trading.session import ExecKind, OrderStatus, Send

    for recv_window in (None, 5000):
        s = _ready_session(recv_window)
        ref = RequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")
        for _ in range(3):  # the id sequence so far: time, session.logon, subscribe
            ref.next_id()
        assert s.place("o-1", "BTCUSDT", "BUY", "LIMIT", 0.001, 45000.12, "GTC",
                       submit_time_ns=5, client_id=7, stp="EXPIRE_MAKER")  # fmt: skip
        (send,) = s.actions()
        assert isinstance(send, Send)
        params = {"symbol": "BTCUSDT", "selfTradePreventionMode": "EXPIRE_MAKER",
                  "side": "BUY", "type": "LIMIT", "quantity": 0.001, "newClientOrderId": "o-1",
                  "price": 45000.12, "timeInForce": "GTC",
                  "newOrderRespType": "RESULT"}  # fmt: skip
        rid, text = ref.build("order.place", params, timestamp_ms=1_767_225_600_123)
        assert send.text == text
        p = s.connections.conns[1].pending[rid]
        assert (p.method, p.kind, p.coid, p.new_coid, p.params) == (
            "order.place", "place", "o-1", "", params)  # fmt: skip
        assert p.deadline_ns == s.clock.mono + int(s.config.request_timeout_s * 1e9)
        order = s.tracked("o-1")
        assert (order.status, order.order_id, order.submit_time_ns, order.client_id) == (
            OrderStatus.PENDING, -1, 5, 7)  # fmt: skip
        assert s.metrics["orders_sent"] == 1
        assert not s.place("o-1", "BTCUSDT", "BUY", "LIMIT", 0.001, 45000.12)  # duplicate
        assert not s.place("o-2", "BTCUSDT", "UP", "LIMIT", 0.001, 45000.12)  # bad side
        s.stop()
        assert not s.place("o-3", "BTCUSDT", "BUY", "LIMIT", 0.001, 45000.12)  # not ready
        assert not [a for a in s.actions() if isinstance(a, Send)]
        kinds = [(u.client_order_id, u.kind) for u in s.updates()]
        # the stop leaves o-1 in doubt (written, never answered): UNKNOWN, never resent
        assert kinds == [("o-1", ExecKind.REJECT), ("o-2", ExecKind.REJECT),
                         ("o-1", ExecKind.UNKNOWN), ("o-3", ExecKind.REJECT)]  # fmt: skip
        assert s.metrics["orders_sent"] == 1
