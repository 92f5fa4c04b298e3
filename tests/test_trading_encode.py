"""Issue #13: pipeline/trading/encode.py writes request frames byte-identical to wsapi's builder.

Every order shape the session sends (place LIMIT / MARKET / LIMIT_MAKER, cancel by client id
and by order id, cancelReplace, amend, status, the account-level requests, pings and the
user-data subscription), with and without recvWindow, plus values that need escaping, values
that compare equal as dict keys but render apart (1, 1.0, True; 0.0, -0.0), and what must go
to wsapi itself (signed requests, params already carrying timestamp or recvWindow).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from pipeline.binance.keys import parse_private_key
from pipeline.binance.wsapi import RequestBuilder
from pipeline.trading.encode import TemplateRequestBuilder

TS = 1_767_225_600_123

PLACE_LIMIT = {
    "symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": 0.001,
    "newClientOrderId": "strat1m2k3-1", "price": 45000.12, "timeInForce": "GTC",
}  # fmt: skip
# fmt: off
SHAPES: list[tuple[str, dict[str, Any] | None]] = [
    ("order.place", PLACE_LIMIT),
    ("order.place", {"symbol": "BTCUSDT", "side": "SELL", "type": "MARKET", "quantity": 2.5,
                     "newClientOrderId": "m-1"}),
    ("order.place", {"symbol": "ETHUSDT", "side": "BUY", "type": "LIMIT_MAKER",
                     "quantity": 1e-05, "newClientOrderId": "lm-1", "price": 1e-08,
                     "timeInForce": "GTC"}),
    ("order.place", {**PLACE_LIMIT, "newOrderRespType": "RESULT",
                     "selfTradePreventionMode": "EXPIRE_MAKER"}),
    ("order.place", {**PLACE_LIMIT, "price": None}),  # None: dropped, as wsapi does
    ("order.cancel", {"symbol": "BTCUSDT", "origClientOrderId": "strat1m2k3-1"}),
    ("order.cancel", {"symbol": "BTCUSDT", "orderId": 123456789012}),
    ("order.cancelReplace", {"symbol": "BTCUSDT", "cancelReplaceMode": "STOP_ON_FAILURE",
                             "cancelOrigClientOrderId": "a-1", "side": "BUY", "type": "LIMIT",
                             "quantity": 0.002, "newClientOrderId": "a-2", "price": 44999.99,
                             "timeInForce": "GTC"}),
    ("order.amend.keepPriority", {"symbol": "BTCUSDT", "origClientOrderId": "a-2",
                                  "newClientOrderId": "a-2", "newQty": 0.001}),
    ("order.status", {"symbol": "BTCUSDT", "origClientOrderId": "a-2"}),
    ("openOrders.status", {}),
    ("openOrders.status", {"symbol": "BTCUSDT"}),
    ("openOrders.cancelAll", {"symbol": "BTCUSDT"}),
    ("account.status", {"omitZeroBalances": True}),
    ("userDataStream.subscribe", {}),
    ("userDataStream.subscribe", None),
    ("ping", None),
    ("time", {}),
    # equal as dict keys, rendered apart: 1 (JSON number), 1.0 / True / Decimal (text)
    ("order.place", {**PLACE_LIMIT, "quantity": 1}),
    ("order.place", {**PLACE_LIMIT, "quantity": 1.0}),
    ("order.place", {**PLACE_LIMIT, "quantity": True}),
    ("order.place", {**PLACE_LIMIT, "quantity": Decimal("1.000")}),
    ("order.place", {**PLACE_LIMIT, "quantity": 0.0}),
    ("order.place", {**PLACE_LIMIT, "quantity": -0.0}),
    ("order.place", {**PLACE_LIMIT, "quantity": 1e22}),
    # strings that need escaping, or are not ASCII
    ("order.place", {**PLACE_LIMIT, "symbol": 'BT"C\\USDT'}),
    ("order.place", {**PLACE_LIMIT, "symbol": "币安USDT"}),
    ("order.place", {**PLACE_LIMIT, "newClientOrderId": "tab\there\n"}),
    # keys it leaves to wsapi
    ("order.place", {**PLACE_LIMIT, "timestamp": 5}),
    ("order.place", {**PLACE_LIMIT, "recvWindow": 100}),
    ("order.place", {**PLACE_LIMIT, "we\"ird": 1}),
]
# fmt: on


@pytest.mark.parametrize("recv_window", [None, 5000, 5000.5])
def test_frames_are_byte_identical_to_wsapi(recv_window: float | None) -> None:
    try:
        ref = RequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        pytest.skip("this wsapi takes integer recvWindow only")
    tpl = TemplateRequestBuilder("key", None, recv_window_ms=recv_window, id_prefix="p-")  # type: ignore[arg-type]
    for round_ in range(2):  # the second round is served from the caches
        for method, params in SHAPES:
            want = ref.build(method, params, timestamp_ms=TS)
            got = tpl.build(method, params, timestamp_ms=TS)
            assert got == want, (round_, method, params)
            assert got[1].encode() == want[1].encode()
    rid = "fixed-id"
    assert tpl.build("order.place", PLACE_LIMIT, timestamp_ms=TS, request_id=rid) == ref.build(
        "order.place", PLACE_LIMIT, timestamp_ms=TS, request_id=rid
    )


def test_signed_requests_go_to_wsapi_and_errors_match() -> None:
    signer = parse_private_key(bytes(range(32)).hex())  # a fixed raw Ed25519 seed
    ref = RequestBuilder("key", signer, id_prefix="p-")
    tpl = TemplateRequestBuilder("key", signer, id_prefix="p-")
    assert tpl.build("session.logon", {}, timestamp_ms=TS) == ref.build(
        "session.logon", {}, timestamp_ms=TS
    )
    assert tpl.build("order.place", PLACE_LIMIT, timestamp_ms=TS, sign=True) == ref.build(
        "order.place", PLACE_LIMIT, timestamp_ms=TS, sign=True
    )
    with pytest.raises(ValueError, match="needs a timestamp"):
        tpl.build("order.place", PLACE_LIMIT)
    with pytest.raises(TypeError):
        tpl.build("order.place", {**PLACE_LIMIT, "quantity": [1]}, timestamp_ms=TS)
