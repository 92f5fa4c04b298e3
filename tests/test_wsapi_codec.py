"""WS API codec against recorded responses (tests/fixtures/trading, see SOURCES.md)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from pipeline.binance.keys import parse_private_key
from pipeline.binance.signing import HmacSigner, ws_payload
from pipeline.binance.wsapi import (
    ProtocolError,
    RequestBuilder,
    Response,
    StreamEvent,
    decode_frame,
    parse_cancel_replace,
    parse_order,
)

FIX = Path(__file__).parent / "fixtures" / "trading"
FIX_PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIIJEYWtGBrhACmb9Dvy+qa8WEf0lQOl1s4CLIAB9m89u\n"
    "-----END PRIVATE KEY-----\n"
)


def load(name: str) -> bytes:
    return (FIX / name).read_bytes()


def response(name: str) -> Response:
    r = decode_frame(load(name))
    assert isinstance(r, Response)
    return r


def test_logon_request_is_signed_with_vector() -> None:
    b = RequestBuilder(
        "sBRXrJx2DsOraMXOaUovEhgVRcjOvCtQwnWj8VxkOh1xqboS02SPGfKi2h8spZJb",
        parse_private_key(FIX_PEM),
        id_prefix="t",
    )
    rid, text = b.build("session.logon", timestamp_ms=1649729878532)
    msg = json.loads(text)
    assert rid == "t1" == msg["id"]
    assert msg["method"] == "session.logon"
    assert msg["params"]["signature"] == (
        "QkxRSX10rV71REvvMibSfvHCKvHoDFDweKdzKXhHhcKIGkHoZPXAPVNsZYgJtf0CuKIm+cVrCqO07JHjZCVpAg=="
    )
    assert msg["params"]["timestamp"] == 1649729878532


def test_after_logon_requests_carry_only_timestamp() -> None:
    b = RequestBuilder("KEY", parse_private_key(FIX_PEM), id_prefix="t")
    _, text = b.build(
        "order.place",
        {
            "symbol": "BTCUSDT",
            "side": "BUY",
            "type": "LIMIT",
            "price": 0.1,
            "quantity": "10",
            "timeInForce": "GTC",
            "newClientOrderId": "abc",
            "recvWindow": None,
        },
        timestamp_ms=1655716096498,
    )
    params = json.loads(text)["params"]
    assert "signature" not in params
    assert "apiKey" not in params
    assert "recvWindow" not in params
    assert params["timestamp"] == 1655716096498
    assert params["price"] == "0.1"
    _, text = b.build("ping")
    assert json.loads(text) == {"id": "t2", "method": "ping"}
    with pytest.raises(ValueError, match="timestamp"):
        b.build("order.status", {"symbol": "X"})


def test_explicit_sign_matches_hmac_vector_and_renders_bools() -> None:
    b = RequestBuilder(
        "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
        HmacSigner("NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"),
    )
    _, text = b.build("account.status", timestamp_ms=1660801839480, sign=True)
    assert json.loads(text)["params"]["signature"] == (
        "83303b4a136ac1371795f465808367242685a9e3a42b22edb4d977d0696eb45c"
    )
    _, text = b.build("account.status", {"omitZeroBalances": True}, timestamp_ms=1, sign=True)
    params = json.loads(text)["params"]
    assert params["omitZeroBalances"] == "true"
    assert "omitZeroBalances=true" in ws_payload(params)


def test_recv_window_is_added_to_signed_requests() -> None:
    b = RequestBuilder("K", None, recv_window_ms=5000)
    _, text = b.build("order.status", {"symbol": "X"}, timestamp_ms=5)
    assert json.loads(text)["params"]["recvWindow"] == 5000
    with pytest.raises(ValueError, match="no signer"):
        b.build("session.logon", timestamp_ms=5)


def test_ids_are_unique_per_builder() -> None:
    a, b = RequestBuilder("K", None), RequestBuilder("K", None)
    ids = {a.next_id() for _ in range(100)} | {b.next_id() for _ in range(100)}
    assert len(ids) == 200


def test_logon_success_and_rate_limits() -> None:
    r = response("session_logon_success.json")
    assert r.ok
    assert r.result["authorizedSince"] == 1768633854263
    assert r.rate_limits[0].rate_limit_type == "REQUEST_WEIGHT"
    assert (r.rate_limits[0].limit, r.rate_limits[0].count) == (6000, 25)


def test_logon_error() -> None:
    r = response("session_logon_error_-1022.json")
    assert not r.ok
    assert r.status == 400
    assert r.code == -1022


def test_418_retry_after() -> None:
    r = response("doc_error_418_ip_banned.json")
    assert r.status == 418
    assert r.error is not None
    assert r.error.retry_after_ms == 1659146400000


def test_order_place_full() -> None:
    r = response("order_place_LIMIT_NEW.json")
    info = parse_order(r.result)
    assert info.order_id == 55471195855
    assert info.client_order_id == "4AACYCgVtUwAAQAAAAAA"
    assert info.status == "NEW"
    assert info.price == 80000.0
    assert info.orig_qty == 0.0001
    kinds = [(x.rate_limit_type, x.interval, x.limit) for x in r.rate_limits]
    assert ("ORDERS", "SECOND", 100) in kinds


@pytest.mark.parametrize(
    "name",
    [
        "doc_order_place_ACK.json",
        "doc_order_place_RESULT.json",
        "doc_order_place_FULL.json",
        "doc_order_cancel.json",
        "order_cancel.json",
    ],
)
def test_order_shapes(name: str) -> None:
    info = parse_order(response(name).result)
    assert info.order_id > 0
    assert info.client_order_id


def test_cancel_all_and_empty_open_orders() -> None:
    r = response("openOrders_cancelAll.json")
    assert [parse_order(x).status for x in r.result] == ["CANCELED"]
    assert response("openOrders_status_empty.json").result == []


def test_account_status_large() -> None:
    r = response("account_status.json")
    assert len(r.result["balances"]) == 739


def test_cancel_replace_success() -> None:
    out = parse_cancel_replace(response("order_cancelReplace_success.json"))
    assert out.cancel_ok
    assert out.new_order_ok
    assert out.cancel is not None
    assert out.cancel.status == "CANCELED"
    assert out.new_order is not None
    assert out.new_order.order_id == 20443189559


def test_cancel_replace_new_order_failed_409() -> None:
    out = parse_cancel_replace(response("doc_order_cancelReplace_409_new_order_failed.json"))
    assert out.cancel_ok is True
    assert out.new_order_ok is False
    assert out.new_order_error is not None
    assert out.new_order_error.code == -2010


def test_cancel_replace_cancel_failed_new_placed_409() -> None:
    r = response("doc_order_cancelReplace_409_cancel_failed_new_order_placed.json")
    out = parse_cancel_replace(r)
    assert out.cancel_ok is False
    assert out.cancel_error is not None
    assert out.cancel_error.code == -2011
    assert out.new_order_ok is True
    assert out.new_order is not None


def test_cancel_replace_stop_on_failure_not_attempted() -> None:
    r = response("doc_order_cancelReplace_400_cancel_failed_STOP_ON_FAILURE.json")
    out = parse_cancel_replace(r)
    assert out.cancel_ok is False
    assert out.new_order_ok is None


def test_cancel_replace_both_failed_and_429() -> None:
    out = parse_cancel_replace(response("doc_order_cancelReplace_400_both_failed.json"))
    assert out.cancel_ok is False
    assert out.new_order_ok is False
    out = parse_cancel_replace(response("doc_order_cancelReplace_429_DO_NOTHING.json"))
    assert out.cancel_ok is False
    assert out.new_order_ok is None
    assert out.cancel_error is not None
    assert out.cancel_error.code == -1015
    out = parse_cancel_replace(response("doc_order_cancelReplace_409_CANCEL_ONLY.json"))
    assert out.cancel_ok is True
    assert out.new_order_ok is False


def test_events() -> None:
    ev = decode_frame(load("doc_serverShutdown.json"))
    assert isinstance(ev, StreamEvent)
    assert ev.type == "serverShutdown"
    assert ev.subscription_id is None
    ev = decode_frame(load("ud_eventStreamTerminated.json"))
    assert isinstance(ev, StreamEvent)
    assert ev.subscription_id == 0


def test_unsolicited_401_with_null_id() -> None:
    frame = {
        "id": None,
        "status": 401,
        "error": {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
    }
    r = decode_frame(orjson.dumps(frame))
    assert isinstance(r, Response)
    assert r.id is None
    assert r.code == -2015


@pytest.mark.parametrize(
    "frame",
    [
        b"not json",
        b"[1,2]",
        b'{"id":1,"status":"200"}',
        b'{"foo":1}',
        b'{"id":1,"status":400,"error":{"msg":"no code"}}',
        b'{"id":[1],"status":200}',
    ],
)
def test_malformed_frames_are_remote_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_frame(frame)
    assert exc.value.remote


def test_status_without_error_object_is_an_error() -> None:
    r = decode_frame(b'{"id":"x","status":503}')
    assert isinstance(r, Response)
    assert not r.ok
    assert r.status == 503


def test_string_order_id_is_normalised() -> None:
    assert parse_order({"orderId": "55329759393", "clientOrderId": "x"}).order_id == 55329759393


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        ({"id": "r1", "status": 200, "result": {}, "rateLimits": "x"}, None),
        ({"id": "r1", "status": 99, "result": {}}, "r1"),
        ({"id": "r1", "status": True, "result": {}}, "r1"),
        ({"id": "r1", "status": 400, "error": {"code": 2**40, "msg": "x"}}, "r1"),
        ({"id": "r1", "status": 400, "error": {"code": -1, "msg": [[1]]}}, "r1"),
    ],
)
def test_bad_numbers_and_shapes_in_responses(frame: dict, request_id: str | None) -> None:
    """Out-of-range or mistyped venue values: a ProtocolError naming the request it answers
    (so the session can settle it), or, for rateLimits, a dropped-and-counted field."""
    from pipeline.binance.wsapi import ProtocolError

    text = json.dumps(frame)
    if request_id is None:
        resp = decode_frame(text)
        assert isinstance(resp, Response)
        assert resp.bad_fields
        return
    with pytest.raises(ProtocolError) as exc:
        decode_frame(text)
    assert exc.value.request_id == request_id


def test_rate_limit_count_beyond_int64_is_dropped_and_counted() -> None:
    limit = {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1}
    frame = {
        "id": "r",
        "status": 429,
        "error": {"code": -1003, "msg": "x", "data": {"retryAfter": 10**17}},
        "rateLimits": [{**limit, "limit": 6000, "count": 2**63}, {**limit, "limit": 1, "count": 1}],
    }
    resp = decode_frame(json.dumps(frame))
    assert isinstance(resp, Response)
    assert [r.count for r in resp.rate_limits] == [1]
    assert resp.error is not None
    assert resp.error.retry_after_ms is None  # 10**17 ms: ns would overflow int64
    assert len(resp.bad_fields) == 2


def test_order_id_beyond_int64_is_a_protocol_error() -> None:
    from pipeline.binance.wsapi import ProtocolError

    with pytest.raises(ProtocolError, match="orderId"):
        parse_order({"symbol": "BTCUSDT", "orderId": 2**64, "status": "NEW"})
    assert parse_order({"symbol": "BTCUSDT", "orderId": "12", "status": "NEW"}).order_id == 12
