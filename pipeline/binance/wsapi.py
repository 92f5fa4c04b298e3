"""Sans-I/O codec for the Binance WS API (binance-protocol.md §2, §3.2, §4).

Calling contract:
- :class:`RequestBuilder` turns ``(method, params)`` into ``(request_id, text)``; the caller
  writes ``text`` as one WebSocket text frame and remembers ``request_id``. It signs
  ``session.logon`` (and any request with ``sign=True``); after logon the caller passes
  ``sign=False`` and the request carries only ``timestamp`` (§2.13).
- :func:`decode_frame` turns one received text frame into a :class:`Response` (has ``id``) or
  a :class:`StreamEvent` (has ``event``; user data or ``serverShutdown``). A frame that is
  neither raises :class:`ProtocolError` - the remote's fault, never ours.
- :func:`parse_cancel_replace` and :func:`parse_order` read results; no exceptions escape for
  odd-but-valid payloads (string order ids, missing optional fields).

No socket, no clock: timestamps are arguments.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.binance.signing import Signer, render_value, sign_params

PROD_URL = "wss://ws-api.binance.com:443/ws-api/v3"
TESTNET_URL = "wss://ws-api.testnet.binance.vision/ws-api/v3"

# Methods whose request must carry ``timestamp`` (security type != NONE), §2.6.
SIGNED_METHODS = frozenset(
    {
        "session.logon",
        "order.place",
        "order.test",
        "order.cancel",
        "order.cancelReplace",
        "order.amend.keepPriority",
        "order.status",
        "openOrders.status",
        "openOrders.cancelAll",
        "account.status",
        "account.rateLimits.orders",
        "userDataStream.subscribe.signature",
    }
)
ORDER_METHODS = frozenset({"order.place", "order.cancelReplace"})


class ProtocolError(Exception):
    """A frame we cannot interpret. Always the remote's fault (``remote = True``)."""

    remote = True


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate_limit_type: str  # rateLimitType: REQUEST_WEIGHT | ORDERS | CONNECTIONS
    interval: str  # SECOND | MINUTE | HOUR | DAY
    interval_num: int  # intervalNum
    limit: int
    count: int


@dataclass(frozen=True, slots=True)
class ApiError:
    code: int
    msg: str
    data: Any = None

    @property
    def retry_after_ms(self) -> int | None:
        """``error.data.retryAfter`` (epoch ms), where 418 puts it and 429 probably does."""
        if isinstance(self.data, Mapping):
            value = self.data.get("retryAfter")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None


@dataclass(frozen=True, slots=True)
class Response:
    id: str | int | None
    status: int
    result: Any = None
    error: ApiError | None = None
    rate_limits: tuple[RateLimit, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def code(self) -> int | None:
        return self.error.code if self.error else None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    event: dict[str, Any]
    subscription_id: int | None = None

    @property
    def type(self) -> str:
        e = self.event.get("e")
        return e if isinstance(e, str) else ""


def _rate_limits(raw: Any) -> tuple[RateLimit, ...]:
    if not isinstance(raw, list):
        return ()
    out = []
    for item in raw:
        try:
            out.append(
                RateLimit(
                    str(item["rateLimitType"]),
                    str(item["interval"]),
                    int(item["intervalNum"]),
                    int(item["limit"]),
                    int(item["count"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue  # a limit entry we cannot read is not worth failing the response for
    return tuple(out)


def _api_error(raw: Any) -> ApiError:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("code"), int):
        raise ProtocolError("error object without an integer code")
    return ApiError(int(raw["code"]), str(raw.get("msg", "")), raw.get("data"))


def decode_frame(text: str | bytes) -> Response | StreamEvent:
    """Decode one text frame (dispatch rule of §2.14: ``id`` -> response, ``event`` -> event)."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("frame is not JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a JSON object")
    if "id" in msg and "status" in msg:
        status = msg["status"]
        if not isinstance(status, int):
            raise ProtocolError("response status is not an integer")
        error = _api_error(msg["error"]) if msg.get("error") is not None else None
        if error is None and status != 200:
            error = ApiError(0, f"status {status} without an error object")
        rid = msg["id"]
        if rid is not None and not isinstance(rid, str | int):
            raise ProtocolError("response id is neither string, integer nor null")
        return Response(rid, status, msg.get("result"), error, _rate_limits(msg.get("rateLimits")))
    if isinstance(msg.get("event"), dict):
        sub = msg.get("subscriptionId")
        return StreamEvent(msg["event"], sub if isinstance(sub, int) else None)
    if isinstance(msg.get("data"), dict) and "stream" in msg:  # legacy combined user stream
        return StreamEvent(msg["data"])
    if isinstance(msg.get("e"), str):  # legacy raw user stream event
        return StreamEvent(msg)
    raise ProtocolError("frame is neither a response nor an event")


def _json_value(value: Any) -> Any:
    """Params go on the wire as rendered: ints stay ints, everything else is its signed text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return render_value(value)


class RequestBuilder:
    """Builds request frames; owns the request-id sequence and the signing decision.

    Ids are ``<prefix><n>`` strings (unique per process run: the prefix includes the pid and a
    random part), so a reply can never be confused with one from a previous connection.
    """

    def __init__(
        self,
        api_key: str,
        signer: Signer | None,
        *,
        recv_window_ms: int | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.api_key = api_key
        self._signer = signer
        self.recv_window_ms = recv_window_ms
        if id_prefix is None:
            id_prefix = f"{os.getpid():x}{os.urandom(3).hex()}-"
        self._prefix = id_prefix
        self._seq = itertools.count(1)

    def __repr__(self) -> str:
        return f"<RequestBuilder api_key={self.api_key[:6]}… signer={self._signer!r}>"

    def next_id(self) -> str:
        return f"{self._prefix}{next(self._seq)}"

    def params(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        timestamp_ms: int | None,
        sign: bool,
    ) -> dict[str, Any]:
        """The final params object: ``timestamp``/``recvWindow`` added, signed if asked."""
        out = {k: v for k, v in (params or {}).items() if v is not None}
        if method in SIGNED_METHODS or sign:
            if timestamp_ms is None:
                raise ValueError(f"{method} needs a timestamp")
            out["timestamp"] = int(timestamp_ms)
            if self.recv_window_ms is not None:
                out.setdefault("recvWindow", self.recv_window_ms)
        if sign or method == "session.logon":
            if self._signer is None:
                raise ValueError(f"{method} must be signed but no signer is configured")
            out["apiKey"] = self.api_key
            out = sign_params(out, self._signer)
        return {k: _json_value(v) for k, v in out.items()}

    def build(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timestamp_ms: int | None = None,
        sign: bool = False,
        request_id: str | None = None,
    ) -> tuple[str, str]:
        """``(request_id, frame_text)`` for one request."""
        rid = request_id or self.next_id()
        body: dict[str, Any] = {"id": rid, "method": method}
        p = self.params(method, params, timestamp_ms=timestamp_ms, sign=sign)
        if p:
            body["params"] = p
        return rid, orjson.dumps(body).decode()


# ---- result parsing ---------------------------------------------------------------------


def _num(value: Any) -> float:
    if value is None:
        return 0.0
    try:
        return float(str(value))  # correctly rounded, as float(Decimal(...)) is, and cheaper
    except ValueError:
        return 0.0


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True, slots=True)
class OrderInfo:
    """The order fields we act on, from order.place / cancel / status results (§2.7-2.12)."""

    symbol: str
    order_id: int  # orderId (some venues send it as a string; normalised)
    client_order_id: str  # clientOrderId
    orig_client_order_id: str  # origClientOrderId (cancel results), else ""
    status: str  # NEW, PARTIALLY_FILLED, FILLED, CANCELED, REJECTED, EXPIRED, ...
    price: float
    orig_qty: float  # origQty
    executed_qty: float  # executedQty
    cum_quote_qty: float  # cummulativeQuoteQty (sic)
    transact_time_ms: int  # transactTime, or updateTime for order.status
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)


def parse_order(result: Mapping[str, Any]) -> OrderInfo:
    if not isinstance(result, Mapping):
        raise ProtocolError("order result is not an object")
    return OrderInfo(
        symbol=str(result.get("symbol", "")),
        order_id=_int(result.get("orderId"), -1),
        client_order_id=str(result.get("clientOrderId", "")),
        orig_client_order_id=str(result.get("origClientOrderId", "") or ""),
        status=str(result.get("status", "")),
        price=_num(result.get("price")),
        orig_qty=_num(result.get("origQty")),
        executed_qty=_num(result.get("executedQty")),
        cum_quote_qty=_num(result.get("cummulativeQuoteQty", result.get("cumulativeQuoteQty"))),
        transact_time_ms=_int(result.get("transactTime", result.get("updateTime")), 0),
        # the decoded frame is ours alone: keep it rather than copy it on every order reply
        raw=result if isinstance(result, dict) else dict(result),
    )


@dataclass(frozen=True, slots=True)
class CancelReplaceOutcome:
    """Both legs of an order.cancelReplace (§2.10). ``None`` result = leg not attempted."""

    cancel_ok: bool
    new_order_ok: bool | None
    cancel: OrderInfo | None
    cancel_error: ApiError | None
    new_order: OrderInfo | None
    new_order_error: ApiError | None


def _leg(result: str | None, body: Any) -> tuple[bool | None, OrderInfo | None, ApiError | None]:
    if result == "NOT_ATTEMPTED" or (result is None and body is None):
        return None, None, None
    if isinstance(body, Mapping) and "code" in body and "orderId" not in body:
        return False, None, ApiError(_int(body.get("code")), str(body.get("msg", "")))
    if result == "FAILURE":
        return False, None, ApiError(0, "leg failed without an error object")
    if isinstance(body, Mapping):
        return True, parse_order(body), None
    return result == "SUCCESS", None, None


def parse_cancel_replace(resp: Response) -> CancelReplaceOutcome:
    """Read both legs from a 200 result or from ``error.data`` of a 400/409 (partial failure)."""
    if resp.ok:
        src = resp.result
    elif resp.error is not None and isinstance(resp.error.data, Mapping):
        src = resp.error.data
    else:  # e.g. 429 -1015 DO_NOTHING, or a plain -1013: nothing was done
        return CancelReplaceOutcome(False, None, None, resp.error, None, None)
    if not isinstance(src, Mapping):
        raise ProtocolError("cancelReplace result is not an object")
    c_ok, c_info, c_err = _leg(src.get("cancelResult"), src.get("cancelResponse"))
    n_ok, n_info, n_err = _leg(src.get("newOrderResult"), src.get("newOrderResponse"))
    return CancelReplaceOutcome(bool(c_ok), n_ok, c_info, c_err, n_info, n_err)
