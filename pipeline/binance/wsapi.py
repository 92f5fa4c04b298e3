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

Venue numbers are validated here, once, at decode time (issue #11): ids, times, counts and
``retryAfter`` must be integers in int64 (non-negative where a negative value is nonsense; times
small enough that ms -> ns still fits int64), decimals must be finite. A reply whose number is
out of range is a :class:`ProtocolError` (``bad_number``), carrying the request id when the frame
had one, so the session can settle that request (an order becomes UNKNOWN and is reconciled)
instead of losing it. A bad ``rateLimits`` entry only drops that entry and is counted in
:attr:`Response.bad_fields`: the answer it rides on is still good. Text fields must be strings:
``str()`` of a 1000-deep JSON array raises RecursionError, so nothing here calls it on a value of
unknown shape.

No socket, no clock: timestamps are arguments.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
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
MAX_RECV_WINDOW_MS = 60000  # §4, §7.2


def recv_window_param(value: float | int | str | Decimal) -> int | Decimal:
    """``recvWindow`` as it is sent and signed: an int when whole (a JSON number, as before),
    else a Decimal of at most 3 decimals (sent as its exact text, ``5000.5``; §7.2: decimals
    since 2025-08-28 give microsecond precision). Out of ``(0, 60000]``, more than 3 decimals,
    or not a number: ``ValueError`` naming the rule, at configuration time, not at the venue."""
    if isinstance(value, bool):
        raise ValueError("recvWindow must be a number of milliseconds")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, ValueError, TypeError):
        raise ValueError(f"recvWindow {value!r} is not a number") from None
    if not dec.is_finite() or not 0 < dec <= MAX_RECV_WINDOW_MS:
        raise ValueError(f"recvWindow must be in (0, {MAX_RECV_WINDOW_MS}] ms, not {value!r}")
    dec = dec.normalize()
    exponent = dec.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if exponent >= 0:
        return int(dec)
    if exponent < -3:
        raise ValueError(f"recvWindow takes at most 3 decimals (microseconds), not {value!r}")
    return dec


INT64_MAX = (1 << 63) - 1
# The latest venue time (epoch ms) we accept: ms * 1e6 must still fit an int64 ns field.
MAX_TIME_MS = INT64_MAX // 1_000_000
# Error codes go to an int32 field of the exec ring; Binance's are small negatives.
_CODE_MIN, _CODE_MAX = -(1 << 31), (1 << 31) - 1
_INT_TEXT = re.compile(r"-?[0-9]{1,19}")


class ProtocolError(Exception):
    """A frame we cannot interpret. Always the remote's fault (``remote = True``).

    ``request_id`` is the frame's ``id`` when it had a usable one: the request it answers is
    then settled as "answer not understood" rather than left waiting for its deadline.
    """

    remote = True

    def __init__(self, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def venue_int(value: Any, what: str, *, lo: int = 0, hi: int = INT64_MAX) -> int:
    """A venue integer (JSON int, or a string of digits as some venues send ids) in
    ``[lo, hi]``; anything else raises :class:`ProtocolError` naming the field (``bad_number``).
    Floats and booleans are refused: an id or a time that is not an integer is not one."""
    if isinstance(value, bool):
        raise ProtocolError(f"bad_number: {what} is a boolean")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value):
        n = int(value)
    else:
        raise ProtocolError(f"bad_number: {what} is not an integer")
    if not lo <= n <= hi:
        raise ProtocolError(f"bad_number: {what} out of range")
    return n


def venue_time_ms(value: Any, what: str) -> int:
    """An epoch-ms venue time that converts to int64 ns (see :data:`MAX_TIME_MS`)."""
    return venue_int(value, what, hi=MAX_TIME_MS)


def venue_str(value: Any, what: str, default: str = "") -> str:
    """A text field: a string (None -> ``default``). Never ``str()`` of an unknown shape."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    raise ProtocolError(f"{what} is not a string")


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
        """``error.data.retryAfter`` (epoch ms), where 418 puts it and 429 probably does.
        None when absent or not a sane time (:func:`venue_time_ms`); decode counts the latter."""
        if isinstance(self.data, Mapping):
            value = self.data.get("retryAfter")
            if value is not None:
                try:
                    return venue_time_ms(value, "retryAfter")
                except ProtocolError:
                    return None
        return None


@dataclass(frozen=True, slots=True)
class Response:
    id: str | int | None
    status: int
    result: Any = None
    error: ApiError | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    # venue values we dropped while decoding (a bad rateLimits entry, a bad retryAfter): the
    # caller counts them as protocol errors; the rest of the answer is still good
    bad_fields: tuple[str, ...] = ()

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


def _rate_limits(raw: Any, bad: list[str]) -> tuple[RateLimit, ...]:
    """The ``rateLimits`` entries we can read; each one we cannot is named in ``bad`` (a limit
    entry we cannot read is not worth failing the response it rides on)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        bad.append("rateLimits is not a list")
        return ()
    out = []
    for item in raw:
        try:
            if not isinstance(item, Mapping):
                raise ProtocolError("rateLimits entry is not an object")
            out.append(
                RateLimit(
                    venue_str(item.get("rateLimitType"), "rateLimitType"),
                    venue_str(item.get("interval"), "interval"),
                    venue_int(item.get("intervalNum"), "intervalNum"),
                    venue_int(item.get("limit"), "limit"),
                    venue_int(item.get("count"), "count"),
                )
            )
        except ProtocolError as exc:
            bad.append(str(exc))
    return tuple(out)


def _api_error(raw: Any, rid: str | int | None, bad: list[str]) -> ApiError:
    if not isinstance(raw, Mapping) or "code" not in raw:
        raise ProtocolError("error object without an integer code", rid)
    try:
        code = venue_int(raw["code"], "error.code", lo=_CODE_MIN, hi=_CODE_MAX)
        msg = venue_str(raw.get("msg"), "error.msg")
    except ProtocolError as exc:
        raise ProtocolError(str(exc), rid) from None
    err = ApiError(code, msg, raw.get("data"))
    data = err.data
    has_retry = isinstance(data, Mapping) and data.get("retryAfter") is not None
    if has_retry and err.retry_after_ms is None:
        bad.append("bad_number: retryAfter out of range")
    return err


_ID_PREFIX = re.compile(rb'\A\s*\{\s*"id"\s*:\s*(?:"([A-Za-z0-9_.:-]{1,64})"|([0-9]{1,18}))\s*,')


def _sniff_id(text: str | bytes) -> str | int | None:
    """The ``id`` a frame we cannot parse starts with, if it plainly does (``{"id":...,``): the
    request it answers can then be settled at once instead of at its deadline."""
    head = text[:128]
    m = _ID_PREFIX.match(head.encode() if isinstance(head, str) else bytes(head))
    if m is None:
        return None
    return m.group(1).decode() if m.group(1) is not None else int(m.group(2))


def decode_frame(text: str | bytes) -> Response | StreamEvent:
    """Decode one text frame (dispatch rule of §2.14: ``id`` -> response, ``event`` -> event)."""
    try:
        msg = orjson.loads(text)
    except (orjson.JSONDecodeError, RecursionError):  # orjson caps depth at 1024: not JSON to us
        raise ProtocolError("frame is not JSON (or nested too deep)", _sniff_id(text)) from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a JSON object")
    if "id" in msg and "status" in msg:
        rid = msg["id"]
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
            raise ProtocolError("response id is neither string, integer nor null")
        status = msg["status"]
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ProtocolError("response status is not an HTTP status code", rid)
        bad: list[str] = []
        error = _api_error(msg["error"], rid, bad) if msg.get("error") is not None else None
        if error is None and status != 200:
            error = ApiError(0, f"status {status} without an error object")
        limits = _rate_limits(msg.get("rateLimits"), bad)
        return Response(rid, status, msg.get("result"), error, limits, tuple(bad))
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
        recv_window_ms: float | int | Decimal | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.api_key = api_key
        self._signer = signer
        self.recv_window_ms = None if recv_window_ms is None else recv_window_param(recv_window_ms)
        if id_prefix is None:
            id_prefix = f"{os.getpid():x}{os.urandom(3).hex()}-"
        self._prefix = id_prefix
        self._seq = itertools.count(1)

    def __repr__(self) -> str:
        return f"<RequestBuilder signer={self._signer!r}>"  # never any part of the key

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


def _num(value: Any, what: str = "number") -> float:
    """A decimal (string or number) as a finite, non-negative float; missing -> 0.0."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ProtocolError(f"bad_number: {what} is not a number")
    try:
        out = float(value)  # correctly rounded, as float(Decimal(...)) is, and cheaper
    except (ValueError, OverflowError):
        raise ProtocolError(f"bad_number: {what} is not a number") from None
    if not 0.0 <= out < math.inf:  # also refuses nan
        raise ProtocolError(f"bad_number: {what} out of range")
    return out


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
    """Read an order result; a field we cannot trust raises :class:`ProtocolError`."""
    if not isinstance(result, Mapping):
        raise ProtocolError("order result is not an object")
    oid = result.get("orderId")
    when = result.get("transactTime", result.get("updateTime"))
    return OrderInfo(
        symbol=venue_str(result.get("symbol"), "symbol"),
        order_id=-1 if oid is None else venue_int(oid, "orderId"),
        client_order_id=venue_str(result.get("clientOrderId"), "clientOrderId"),
        orig_client_order_id=venue_str(result.get("origClientOrderId"), "origClientOrderId"),
        status=venue_str(result.get("status"), "status"),
        price=_num(result.get("price"), "price"),
        orig_qty=_num(result.get("origQty"), "origQty"),
        executed_qty=_num(result.get("executedQty"), "executedQty"),
        cum_quote_qty=_num(
            result.get("cummulativeQuoteQty", result.get("cumulativeQuoteQty")),
            "cummulativeQuoteQty",
        ),
        transact_time_ms=0 if when is None else venue_time_ms(when, "transactTime"),
        # the decoded frame is ours alone: keep it rather than copy it on every order reply
        raw=result if isinstance(result, dict) else dict(result),
    )


def parse_amend(result: Mapping[str, Any]) -> OrderInfo:
    """The ``amendedOrder`` of an order.amend.keepPriority result (§2.11) as an
    :class:`OrderInfo`: ``qty`` (the new quantity) read as ``orig_qty``, ``cumulativeQuoteQty``
    (single m, unlike every other order result) as ``cum_quote_qty``, ``transactTime`` from
    the envelope."""
    if not isinstance(result, Mapping):
        raise ProtocolError("amend result is not an object")
    amended = result.get("amendedOrder")
    if not isinstance(amended, Mapping):
        raise ProtocolError("amend result without an amendedOrder object")
    info = parse_order(amended)
    when = result.get("transactTime")
    return OrderInfo(
        symbol=info.symbol,
        order_id=info.order_id,
        client_order_id=info.client_order_id,
        orig_client_order_id=info.orig_client_order_id,
        status=info.status,
        price=info.price,
        orig_qty=_num(amended.get("qty"), "qty"),
        executed_qty=info.executed_qty,
        cum_quote_qty=info.cum_quote_qty,
        transact_time_ms=0 if when is None else venue_time_ms(when, "transactTime"),
        raw=info.raw,
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
        code = venue_int(body.get("code"), "code", lo=_CODE_MIN, hi=_CODE_MAX)
        return False, None, ApiError(code, venue_str(body.get("msg"), "msg"))
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
