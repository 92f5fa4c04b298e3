"""User data stream events (binance-protocol.md §2.14-2.15), parsed into small typed records.

Wire field names are kept in the comments, values converted once here: decimals to float,
times (ms) to ns. :func:`parse_event` takes the ``event`` object of a WS API frame (or a legacy
raw / combined payload) plus the local receive time, and never raises for an unknown event
type: it returns :class:`UnknownEvent`, which the caller counts. A known type with missing or
mistyped fields raises :class:`UserDataError` (remote fault), for the caller's counted skip.

Numbers are validated here (issue #11): ids and counts must be integers in int64, times in epoch
ms small enough that ms -> ns fits int64, decimals finite; text fields must be strings (``str()``
of a deeply nested JSON array raises RecursionError). Anything else is a ``UserDataError``.

The 2026 execution-report fields (section 7.2: ``I`` execution id, ``eR`` expiry reason, ``V`` STP
mode, ``w`` working, ``Y`` last quote qty, ``Q`` quote order qty, and the STP set ``v``/``A``/``B``
/``U``) are read too. ``I`` is what de-duplicates a report seen on two connections, so a bad one
refuses the report like any other id. The others only describe the order: a bad one must not cost
us a fill, so that field alone is dropped (its default kept), named in
:attr:`ExecutionReport.skipped_fields` for the caller to count, and logged (rate-limited).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from pipeline.binance.wsapi import INT64_MAX, MAX_TIME_MS, ProtocolError, venue_int
from pipeline.logs import RateLimitedLog

_MS = 1_000_000
_skip_log = RateLimitedLog(logging.getLogger("pipeline.userdata"))


class UserDataError(ValueError):
    """A user data event of a known type that we cannot read."""

    remote = True


def _kind(event: dict[str, Any]) -> str:
    e = event.get("e")
    return e if isinstance(e, str) else "event"


def _f(event: dict[str, Any], key: str, *, signed: bool = False) -> float:
    """A finite decimal; non-negative unless ``signed`` (a balance delta may be negative)."""
    value = event.get(key)
    if type(value) is str and not signed:  # the usual case, checked first: ~10 per report
        try:
            out = float(value)
        except ValueError:
            raise UserDataError(f"{_kind(event)}: field {key!r} is not a number") from None
        if 0.0 <= out < math.inf:  # False for nan
            return out
        raise UserDataError(f"bad_number: {_kind(event)}: field {key!r} out of range")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserDataError(f"{_kind(event)}: field {key!r} is not a number")
    try:
        # float() of the decimal text is correctly rounded: the same value float(Decimal(text))
        # gives, at a third of the cost (ten of these per executionReport)
        out = float(value)
    except (ValueError, OverflowError):
        raise UserDataError(f"{_kind(event)}: field {key!r} is not a number") from None
    if not math.isfinite(out) or (out < 0 and not signed):
        raise UserDataError(f"bad_number: {_kind(event)}: field {key!r} out of range")
    return out


def _i(
    event: dict[str, Any],
    key: str,
    default: int | None = None,
    *,
    lo: int = 0,
    hi: int = INT64_MAX,
) -> int:
    """An integer in ``[lo, hi]`` (JSON int, or a string of digits); floats are refused. The
    rule is the WS API decoder's (:func:`pipeline.binance.wsapi.venue_int`), one for every
    venue number; only the error type is this module's."""
    value = event.get(key, default)
    if value is None:
        raise UserDataError(f"{_kind(event)}: field {key!r} missing or not an integer")
    try:
        return venue_int(value, f"{_kind(event)}: field {key!r}", lo=lo, hi=hi)
    except ProtocolError as exc:
        raise UserDataError(str(exc)) from None


def _t(event: dict[str, Any], key: str, default: Any = None) -> int:
    """An epoch-ms time as ns (checked so the product fits int64)."""
    return _i(event, key, default, hi=MAX_TIME_MS) * _MS


def _s(event: dict[str, Any], key: str, default: str | None = None) -> str:
    value = event.get(key, default)
    if type(value) is str:
        return value
    if value is None:
        if default is not None:
            return default
        raise UserDataError(f"{_kind(event)}: field {key!r} missing")
    if not isinstance(value, str):
        raise UserDataError(f"{_kind(event)}: field {key!r} is not a string")
    return value


@dataclass(frozen=True, slots=True)
class ExecutionReport:
    symbol: str  # s
    client_order_id: str  # c (on a cancel: the cancel request's new client order id)
    orig_client_order_id: str  # C: id of the order being canceled, "" otherwise
    side: str  # S
    order_type: str  # o
    time_in_force: str  # f
    qty: float  # q
    price: float  # p
    exec_type: str  # x: NEW CANCELED REPLACED REJECTED TRADE EXPIRED TRADE_PREVENTION
    status: str  # X: NEW PARTIALLY_FILLED FILLED CANCELED REJECTED EXPIRED EXPIRED_IN_MATCH
    reject_reason: str  # r
    order_id: int  # i
    last_qty: float  # l
    cum_qty: float  # z
    last_price: float  # L
    cum_quote: float  # Z
    commission: float  # n
    commission_asset: str  # N (null -> "")
    trade_id: int  # t (-1 when not a trade)
    is_maker: bool  # m
    event_time_ns: int  # E
    transact_time_ns: int  # T
    recv_time_ns: int
    expiry_reason: str = ""  # eR: NONE UNFILLED_IOC_QUANTITY_EXPIRED ... ("" if absent)
    stp_mode: str = ""  # V: self-trade prevention mode ("" if absent)
    working: bool = False  # w: the order is on the book
    last_quote: float = 0.0  # Y: l * L of this report
    quote_order_qty: float = 0.0  # Q
    prevented_match_id: int = -1  # v (STP only)
    prevented_qty: float = 0.0  # A: cumulative quantity expired by STP
    last_prevented_qty: float = 0.0  # B: quantity expired by this STP event
    counter_order_id: int = -1  # U: the other order of the prevented match
    skipped_fields: tuple[str, ...] = ()  # optional fields dropped as malformed (count them)
    exec_id: int = -1  # I: unique per report (-1 if absent); de-duplicates a rollover's overlap

    @property
    def order_key(self) -> str:
        """The client order id our order table is keyed by: ``C`` for cancels, else ``c``."""
        return self.orig_client_order_id or self.client_order_id


@dataclass(frozen=True, slots=True)
class Balance:
    asset: str  # a
    free: float  # f
    locked: float  # l


@dataclass(frozen=True, slots=True)
class AccountPosition:
    event_time_ns: int  # E
    update_time_ns: int  # u
    balances: tuple[Balance, ...]  # B
    recv_time_ns: int


@dataclass(frozen=True, slots=True)
class BalanceUpdate:
    asset: str  # a
    delta: float  # d
    event_time_ns: int  # E
    clear_time_ns: int  # T
    recv_time_ns: int


@dataclass(frozen=True, slots=True)
class ListStatus:
    symbol: str  # s
    order_list_id: int  # g
    contingency_type: str  # c
    list_status_type: str  # l
    list_order_status: str  # L
    reject_reason: str  # r
    list_client_order_id: str  # C
    orders: tuple[tuple[str, int, str], ...]  # O: (symbol s, orderId i, clientOrderId c)
    event_time_ns: int  # E
    transact_time_ns: int  # T
    recv_time_ns: int


@dataclass(frozen=True, slots=True)
class StreamTerminated:
    """``eventStreamTerminated``: the subscription is gone; resubscribe if still wanted."""

    event_time_ns: int
    recv_time_ns: int


@dataclass(frozen=True, slots=True)
class ServerShutdown:
    """``serverShutdown``: open a new connection now (make-before-break)."""

    event_time_ns: int
    recv_time_ns: int


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    type: str
    recv_time_ns: int


UserDataEvent = (
    ExecutionReport
    | AccountPosition
    | BalanceUpdate
    | ListStatus
    | StreamTerminated
    | ServerShutdown
    | UnknownEvent
)


def unwrap(frame: dict[str, Any]) -> dict[str, Any]:
    """The event object of a WS API ``{"subscriptionId","event"}`` frame or a legacy one."""
    if isinstance(frame.get("event"), dict):
        return frame["event"]
    if isinstance(frame.get("data"), dict) and "stream" in frame:
        return frame["data"]
    return frame


def _optional_fields(ev: dict[str, Any]) -> tuple[Any, ...]:
    """The descriptive 2026 fields of a report; a malformed one is dropped, not the report.

    The usual report (strings where strings belong, no STP set) takes the first branch: a few
    type checks and two float() calls, so the reply -> exec record path stays lean."""
    get = ev.get
    expiry, stp, working, y, q = get("eR", ""), get("V", ""), get("w", False), get("Y"), get("Q")
    if (
        "v" not in ev
        and type(expiry) is str
        and type(stp) is str
        and type(working) is bool
        and type(y) is str
        and type(q) is str
        and len(expiry) <= 64
        and len(stp) <= 64
    ):
        try:
            last_quote, quote_qty = float(y), float(q)
        except ValueError:
            pass
        else:
            if 0.0 <= last_quote < math.inf and 0.0 <= quote_qty < math.inf:
                return (expiry, stp, working, last_quote, quote_qty, -1, 0.0, 0.0, -1, ())
    out: dict[str, Any] = dict(_OPTIONAL_DEFAULTS)
    skipped: list[str] = []
    for key, name, read in _OPTIONAL:
        if key in ev:
            try:
                out[name] = read(ev, key)
            except UserDataError as exc:
                skipped.append(key)
                _skip_log.warning(
                    "user_data_field_skipped",
                    "execution report field dropped",
                    field=key,
                    reason=str(exc)[:80],
                )
    return (*out.values(), tuple(skipped))


def _text(ev: dict[str, Any], key: str) -> str:
    value = ev[key]
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 64:
        raise UserDataError(f"{_kind(ev)}: field {key!r} is not a short string")
    return value


def _flag(ev: dict[str, Any], key: str) -> bool:
    value = ev[key]
    if not isinstance(value, bool):
        raise UserDataError(f"{_kind(ev)}: field {key!r} is not a boolean")
    return value


def _id(ev: dict[str, Any], key: str) -> int:
    return _i(ev, key, lo=-1)


_OPTIONAL: tuple[tuple[str, str, Any], ...] = (
    ("eR", "expiry_reason", _text),
    ("V", "stp_mode", _text),
    ("w", "working", _flag),
    ("Y", "last_quote", _f),
    ("Q", "quote_order_qty", _f),
    ("v", "prevented_match_id", _id),
    ("A", "prevented_qty", _f),
    ("B", "last_prevented_qty", _f),
    ("U", "counter_order_id", _id),
)
# in ExecutionReport field order (the positional tail after recv_time_ns, up to skipped_fields)
_OPTIONAL_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("expiry_reason", ""),
    ("stp_mode", ""),
    ("working", False),
    ("last_quote", 0.0),
    ("quote_order_qty", 0.0),
    ("prevented_match_id", -1),
    ("prevented_qty", 0.0),
    ("last_prevented_qty", 0.0),
    ("counter_order_id", -1),
)


def parse_execution_report(ev: dict[str, Any], recv_time_ns: int) -> ExecutionReport:
    """An ``executionReport`` (section 2.15). Required fields and ``I`` raise
    :class:`UserDataError`; the descriptive optional ones are dropped alone when malformed."""
    exec_id = ev.get("I", -1)
    if type(exec_id) is not int or not -1 <= exec_id <= INT64_MAX:
        exec_id = _i(ev, "I", -1, lo=-1)
    # positional, in field order: keywords cost ~1 us per report on this path. mypy cannot
    # count a starred tuple: _optional_fields returns exactly the 10 fields after recv_time_ns.
    return ExecutionReport(  # type: ignore[call-arg]
        _s(ev, "s"),
        _s(ev, "c"),
        _s(ev, "C", ""),
        _s(ev, "S"),
        _s(ev, "o"),
        _s(ev, "f", ""),
        _f(ev, "q"),
        _f(ev, "p"),
        _s(ev, "x"),
        _s(ev, "X"),
        _s(ev, "r", "NONE"),
        _i(ev, "i"),
        _f(ev, "l"),
        _f(ev, "z"),
        _f(ev, "L"),
        _f(ev, "Z"),
        _f(ev, "n"),
        _s(ev, "N", ""),
        _i(ev, "t", -1, lo=-1),
        ev.get("m") is True,
        _t(ev, "E"),
        _t(ev, "T", ev.get("E")),
        recv_time_ns,
        *_optional_fields(ev),
        exec_id,
    )


def parse_event(frame: dict[str, Any], recv_time_ns: int) -> UserDataEvent:
    ev = unwrap(frame)
    kind = ev.get("e")
    if kind == "executionReport":
        return parse_execution_report(ev, recv_time_ns)
    if kind == "outboundAccountPosition":
        raw = ev.get("B")
        if not isinstance(raw, list):
            raise UserDataError("outboundAccountPosition: field 'B' is not a list")
        balances = []
        for b in raw:
            if not isinstance(b, dict):
                raise UserDataError("outboundAccountPosition: balance is not an object")
            balances.append(Balance(_s(b, "a"), _f(b, "f"), _f(b, "l")))
        return AccountPosition(_t(ev, "E"), _t(ev, "u", ev.get("E")), tuple(balances), recv_time_ns)
    if kind == "balanceUpdate":
        return BalanceUpdate(
            _s(ev, "a"),
            _f(ev, "d", signed=True),
            _t(ev, "E"),
            _t(ev, "T", ev.get("E")),
            recv_time_ns,
        )
    if kind == "listStatus":
        orders = []
        raw_orders = ev.get("O") or []
        if not isinstance(raw_orders, list):
            raise UserDataError("listStatus: field 'O' is not a list")
        for o in raw_orders:
            if isinstance(o, dict):
                orders.append((_s(o, "s", ""), _i(o, "i", -1, lo=-1), _s(o, "c", "")))
        return ListStatus(
            symbol=_s(ev, "s"),
            order_list_id=_i(ev, "g"),
            contingency_type=_s(ev, "c", ""),
            list_status_type=_s(ev, "l", ""),
            list_order_status=_s(ev, "L", ""),
            reject_reason=_s(ev, "r", "NONE"),
            list_client_order_id=_s(ev, "C", ""),
            orders=tuple(orders),
            event_time_ns=_t(ev, "E"),
            transact_time_ns=_t(ev, "T", ev.get("E")),
            recv_time_ns=recv_time_ns,
        )
    if kind == "eventStreamTerminated":
        return StreamTerminated(_t(ev, "E"), recv_time_ns)
    if kind == "serverShutdown":
        return ServerShutdown(_t(ev, "E"), recv_time_ns)
    return UnknownEvent(kind if isinstance(kind, str) else "", recv_time_ns)
