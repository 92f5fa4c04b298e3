"""The simulated exchange's trading core: accounts, orders, filters, matching, execution reports.

PURE: no sockets, no clock, no asyncio. Every call that changes state takes ``now_ms``; the WS API
shell (:mod:`pipeline.sim.wsapi`) owns time, signatures, rate limits and the connections.

Wire shapes follow the shared protocol reference (binance-protocol.md) section 2 (order.place
2.7, order.test 2.8, order.cancel 2.9, order.cancelReplace 2.10, order.amend.keepPriority 2.11,
queries 2.12, user data events 2.15). Parameter values
arrive as the TEXT the client sent (the shell turns JSON numbers into their text), so numbers are
parsed here with :class:`~decimal.Decimal`, never float.

Calling contract
----------------
1. ``v = Venue(market, accounts=["key1"])`` -- every account starts with ``quote_balance`` of each
   quote asset and ``base_balance`` of each base asset of the market's symbols. The venue registers
   itself as a trade listener on the market (if the market supports it).
2. Request handlers (:meth:`Venue.place`, :meth:`Venue.cancel`, :meth:`Venue.cancel_replace`,
   :meth:`Venue.order_status`, :meth:`Venue.open_orders`, :meth:`Venue.cancel_all`,
   :meth:`Venue.account_status`) take ``(account, params, now_ms)`` and either return a result or
   raise :class:`VenueError` (code/msg/status as Binance would send them). A handler that raises
   has changed NOTHING. Handlers that change state return ``(result, events)``.
3. ``events`` is a list of ``(account, payload)``: user-data payloads (``executionReport``,
   ``outboundAccountPosition``) the shell must push to that account's subscriptions, in order.
4. Resting orders fill when the market's walk prints a trade at or through their price
   (:meth:`Venue.on_public_trade`, called by the market's trade listener). Events produced that way
   go to ``event_sink`` (set by the shell), since no request is there to carry them.

Simplifications (documented so that nobody mistakes them for Binance behaviour):
- User orders resting on the book are invisible to the market (they do not add public liquidity).
- A resting order fills at its own price when a public trade prints at or through that price,
  for at most the printed quantity (shared by price, then time priority among user orders).
- Commission is a flat rate on the received asset (0 by default). Self-trade prevention is not
  simulated: user orders never meet each other, so ``selfTradePreventionMode`` (default
  ``"EXPIRE_MAKER"``, as on the live exchange in 2026) is only validated and reported.
- MAX_NUM_ORDERS (200 open orders per account and symbol) is enforced with -1013.
- Only LIMIT, LIMIT_MAKER and MARKET are simulated; other order types get -1116.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any, Protocol

ZERO = Decimal(0)
_Q8 = Decimal("0.00000001")
_UNITS = Decimal(100_000_000)  # pipeline.sim.market integer units per 1

Event = tuple[str, dict[str, Any]]
"""(account, user-data payload); the shell wraps it in ``{"subscriptionId":N,"event":...}``."""

_DECIMAL_RE = re.compile(r"^([0-9]{1,20})(\.[0-9]{1,20})?$")
_INT_RE = re.compile(r"^[0-9]{1,20}$")
_CLIENT_ID_RE = re.compile(r"^[a-zA-Z0-9\-_]{1,36}$")
_CLIENT_ID_RANGE = "^[a-zA-Z0-9-_]{1,36}$"
_DECIMAL_RANGE = "^([0-9]{1,20})(\\.[0-9]{1,20})?$"

SIDES = ("BUY", "SELL")
TIFS = ("GTC", "IOC", "FOK")
SIMULATED_TYPES = ("LIMIT", "LIMIT_MAKER", "MARKET")
RESP_TYPES = ("ACK", "RESULT", "FULL")
CANCEL_REPLACE_MODES = ("STOP_ON_FAILURE", "ALLOW_FAILURE")
CANCEL_RESTRICTIONS = ("ONLY_NEW", "ONLY_PARTIALLY_FILLED")
OPEN_STATUSES = ("NEW", "PARTIALLY_FILLED")
STP_MODES = ("NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH")

MSG_INSUFFICIENT = "Account has insufficient balance for requested action."
MSG_WOULD_TAKE = "Order would immediately match and take."
MSG_DUPLICATE = "Duplicate order sent."
MSG_UNKNOWN_ORDER = "Unknown order sent."
MSG_NO_SUCH_ORDER = "Order does not exist."
MSG_BAD_SYMBOL = "Invalid symbol."


class VenueError(Exception):
    """A refused request: ``status`` (HTTP semantics), ``code`` and ``msg`` as on the wire.

    ``data`` carries the extra object of cancelReplace failures (section 2.10) and rate-limit
    errors (``retryAfter``); it is ``None`` otherwise.
    """

    def __init__(
        self, code: int, msg: str, status: int = 400, data: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.status = status
        self.data = data

    def error_obj(self) -> dict[str, Any]:
        """The ``error`` member of a response envelope."""
        out: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.data is not None:
            out["data"] = self.data
        return out


def missing(name: str) -> VenueError:
    return VenueError(
        -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


def illegal(name: str, legal: str | None = None) -> VenueError:
    if legal is None:
        return VenueError(-1100, f"Illegal characters found in parameter '{name}'.")
    return VenueError(
        -1100, f"Illegal characters found in parameter '{name}'; legal range is '{legal}'."
    )


def not_required(name: str) -> VenueError:
    return VenueError(-1106, f"Parameter '{name}' sent when not required.")


def fmt(d: Decimal) -> str:
    """Binance's decimal rendering: fixed 8 decimals, no exponent (section 5, pitfall 4)."""
    return f"{d.quantize(_Q8, rounding=ROUND_DOWN):f}"


class MarketLike(Protocol):
    """What the venue needs from :class:`pipeline.sim.market.Market`."""

    def symbol_info(self, symbol: str) -> Mapping[str, Any]: ...

    def best(self, symbol: str) -> tuple[Any, Any, Any, Any]: ...

    def take(
        self, symbol: str, side: str, qty: Decimal, limit_price: Decimal | None, now_ms: int
    ) -> list[tuple[Decimal, Decimal, int]]: ...


# --------------------------------------------------------------------------------------------
# symbol rules (filters, binance-protocol.md section 5 pitfall 3)


@dataclass(frozen=True)
class SymbolRules:
    """The filters the simulator enforces for one symbol; a zero value disables that rule."""

    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: Decimal
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_price: Decimal = ZERO
    max_price: Decimal = ZERO
    min_notional: Decimal = ZERO
    max_notional: Decimal = ZERO
    base_precision: int = 8
    quote_precision: int = 8

    @classmethod
    def from_info(cls, symbol: str, info: Mapping[str, Any]) -> SymbolRules:
        def dec(name: str, default: str = "0") -> Decimal:
            value = info.get(name, default)
            return value if isinstance(value, Decimal) else Decimal(str(value))

        base = info.get("base_asset") or info.get("baseAsset")
        quote = info.get("quote_asset") or info.get("quoteAsset")
        if not base or not quote:
            raise ValueError(f"symbol_info({symbol!r}) lacks base_asset/quote_asset")
        return cls(
            symbol=symbol,
            base_asset=str(base),
            quote_asset=str(quote),
            tick_size=dec("tick_size"),
            step_size=dec("step_size"),
            min_qty=dec("min_qty"),
            max_qty=dec("max_qty"),
            min_price=dec("min_price"),
            max_price=dec("max_price"),
            min_notional=dec("min_notional"),
            max_notional=dec("max_notional"),
            base_precision=int(info.get("base_precision", 8)),
            quote_precision=int(info.get("quote_precision", 8)),
        )

    def check_price(self, price: Decimal) -> None:
        if self.min_price and price < self.min_price:
            raise VenueError(-1013, "Filter failure: PRICE_FILTER")
        if self.max_price and price > self.max_price:
            raise VenueError(-1013, "Filter failure: PRICE_FILTER")
        if self.tick_size and price % self.tick_size != 0:
            raise VenueError(-1013, "Filter failure: PRICE_FILTER")
        if price <= 0:
            raise VenueError(-1013, "Filter failure: PRICE_FILTER")

    def check_qty(self, qty: Decimal) -> None:
        if qty <= 0:
            raise VenueError(-1013, "Filter failure: LOT_SIZE")
        if self.min_qty and qty < self.min_qty:
            raise VenueError(-1013, "Filter failure: LOT_SIZE")
        if self.max_qty and qty > self.max_qty:
            raise VenueError(-1013, "Filter failure: LOT_SIZE")
        if self.step_size and qty % self.step_size != 0:
            raise VenueError(-1013, "Filter failure: LOT_SIZE")

    def check_notional(self, notional: Decimal, *, apply_max: bool = True) -> None:
        if self.min_notional and notional < self.min_notional:
            raise VenueError(-1013, "Filter failure: NOTIONAL")
        if apply_max and self.max_notional and notional > self.max_notional:
            raise VenueError(-1013, "Filter failure: NOTIONAL")

    def floor_qty(self, qty: Decimal) -> Decimal:
        if not self.step_size:
            return qty.quantize(_Q8, rounding=ROUND_DOWN)
        return (qty // self.step_size) * self.step_size

    def floor_price(self, price: Decimal) -> Decimal:
        if not self.tick_size:
            return price.quantize(_Q8, rounding=ROUND_DOWN)
        return (price // self.tick_size) * self.tick_size


# --------------------------------------------------------------------------------------------
# parameter parsing (values are the text the client sent)


def _text(params: Mapping[str, str], name: str, *, required: bool = False) -> str | None:
    """The param's text; absent or empty is None, or -1102 if ``required``."""
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    return value


def parse_decimal(
    params: Mapping[str, str], name: str, *, required: bool, precision: int = 8
) -> Decimal | None:
    """Decimal param: -1102 if required and absent, -1100 if malformed, -1111 if too precise."""
    text = _text(params, name, required=required)
    if text is None:
        return None
    if not _DECIMAL_RE.match(text):
        raise illegal(name, _DECIMAL_RANGE)
    value = Decimal(text)
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > precision:
        raise VenueError(-1111, f"Parameter '{name}' has too much precision.")
    return value


def parse_int(params: Mapping[str, str], name: str, *, required: bool) -> int | None:
    text = _text(params, name, required=required)
    if text is None:
        return None
    if not _INT_RE.match(text):
        raise illegal(name)
    return int(text)


def parse_enum(
    params: Mapping[str, str],
    name: str,
    allowed: Sequence[str],
    *,
    required: bool,
    error: VenueError | None = None,
) -> str | None:
    text = _text(params, name, required=required)
    if text is None:
        return None
    if text not in allowed:
        raise error if error is not None else illegal(name)
    return text


def _cancel_restriction(params: Mapping[str, str]) -> str | None:
    """``cancelRestrictions`` of order.cancel and order.cancelReplace (-1145 if not known)."""
    return parse_enum(
        params,
        "cancelRestrictions",
        CANCEL_RESTRICTIONS,
        required=False,
        error=VenueError(-1145, "Invalid cancelRestrictions"),
    )


def parse_client_id(params: Mapping[str, str], name: str) -> str | None:
    text = _text(params, name)
    if text is None:
        return None
    if not _CLIENT_ID_RE.match(text):
        raise illegal(name, _CLIENT_ID_RANGE)
    return text


# --------------------------------------------------------------------------------------------
# state


@dataclass
class AssetBalance:
    free: Decimal = ZERO
    locked: Decimal = ZERO


@dataclass
class Account:
    """One trading account; the simulator maps each API key to its own account."""

    name: str
    balances: dict[str, AssetBalance] = field(default_factory=dict)
    update_time: int = 0

    def bal(self, asset: str) -> AssetBalance:
        b = self.balances.get(asset)
        if b is None:
            b = self.balances[asset] = AssetBalance()
        return b


@dataclass
class NewOrder:
    """A validated order.place request (filters passed; the matching engine has not seen it)."""

    symbol: str
    side: str
    type: str
    tif: str
    price: Decimal  # 0 for MARKET
    qty: Decimal  # 0 for MARKET by quoteOrderQty until sized against the book
    quote_qty: Decimal  # quoteOrderQty, 0 if not used
    client_order_id: str | None
    resp_type: str
    stp_mode: str | None = None
    strategy_id: int | None = None
    strategy_type: int | None = None


@dataclass
class Order:
    """One order's full state, as order.status reports it."""

    account: str
    symbol: str
    order_id: int
    client_order_id: str
    side: str
    type: str
    tif: str
    price: Decimal
    orig_qty: Decimal
    orig_quote_qty: Decimal
    time: int
    stp_mode: str
    executed_qty: Decimal = ZERO
    cum_quote: Decimal = ZERO
    status: str = "NEW"
    update_time: int = 0
    working_time: int = -1
    locked: Decimal = ZERO  # still reserved for the unfilled part (quote if BUY, base if SELL)
    cancel_client_id: str = ""
    amends: int = 0
    strategy_id: int | None = None
    strategy_type: int | None = None

    @property
    def remaining(self) -> Decimal:
        return self.orig_qty - self.executed_qty

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def _common(self) -> dict[str, Any]:
        return {
            "price": fmt(self.price),
            "origQty": fmt(self.orig_qty),
            "executedQty": fmt(self.executed_qty),
            "origQuoteOrderQty": fmt(self.orig_quote_qty),
            "cummulativeQuoteQty": fmt(self.cum_quote),
            "status": self.status,
            "timeInForce": self.tif,
            "type": self.type,
            "side": self.side,
        }

    def _strategy(self, out: dict[str, Any]) -> None:
        if self.strategy_id is not None:
            out["strategyId"] = self.strategy_id
        if self.strategy_type is not None:
            out["strategyType"] = self.strategy_type

    def ack(self, transact_time: int) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
            "transactTime": transact_time,
        }

    def place_result(
        self, resp_type: str, transact_time: int, fills: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """order.place result in the ACK / RESULT / FULL shape (section 2.7)."""
        out = self.ack(transact_time)
        if resp_type == "ACK":
            return out
        out.update(self._common())
        out["workingTime"] = self.working_time
        self._strategy(out)
        if resp_type == "FULL":
            out["fills"] = fills
        out["selfTradePreventionMode"] = self.stp_mode
        return out

    def cancel_result(self, transact_time: int) -> dict[str, Any]:
        """order.cancel result (section 2.9); clientOrderId is the cancel's id."""
        out: dict[str, Any] = {
            "symbol": self.symbol,
            "origClientOrderId": self.client_order_id,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.cancel_client_id,
            "transactTime": transact_time,
        }
        out.update(self._common())
        self._strategy(out)
        out["selfTradePreventionMode"] = self.stp_mode
        return out

    def status_result(self) -> dict[str, Any]:
        """order.status / openOrders.status element (section 2.12)."""
        out: dict[str, Any] = {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
        }
        out.update(self._common())
        out["stopPrice"] = fmt(ZERO)
        out["icebergQty"] = fmt(ZERO)
        out["time"] = self.time
        out["updateTime"] = self.update_time
        out["isWorking"] = self.working_time >= 0
        out["workingTime"] = self.working_time
        self._strategy(out)
        out["selfTradePreventionMode"] = self.stp_mode
        return out


# --------------------------------------------------------------------------------------------
# the venue


class Venue:
    """All accounts and orders of the simulated exchange; the module docstring has the contract."""

    def __init__(
        self,
        market: MarketLike,
        accounts: Iterable[str] = (),
        *,
        quote_balance: Decimal | str | int = Decimal(1_000_000),
        base_balance: Decimal | str | int = Decimal(100),
        balances: Mapping[str, Decimal | str | int] | None = None,
        maker_commission: Decimal | str = ZERO,
        taker_commission: Decimal | str = ZERO,
        stp_mode: str = "EXPIRE_MAKER",
        max_num_orders: int = 200,
        fill_on_touch: bool = True,
        max_closed_orders: int = 100_000,
        symbols: Iterable[str] | None = None,
    ) -> None:
        self.market = market
        syms = list(symbols) if symbols is not None else list(getattr(market, "symbols", []))
        self.rules: dict[str, SymbolRules] = {
            s: SymbolRules.from_info(s, market.symbol_info(s)) for s in syms
        }
        self._start_balances: dict[str, Decimal] = {}
        for r in self.rules.values():
            self._start_balances.setdefault(r.quote_asset, Decimal(quote_balance))
            self._start_balances.setdefault(r.base_asset, Decimal(base_balance))
        if balances:
            self._start_balances.update({k: Decimal(v) for k, v in balances.items()})
        self.maker_commission = Decimal(maker_commission)
        self.taker_commission = Decimal(taker_commission)
        self.stp_mode = stp_mode
        self.max_num_orders = max_num_orders
        self.fill_on_touch = fill_on_touch
        self.max_closed_orders = max_closed_orders
        self.accounts: dict[str, Account] = {}
        self.orders: dict[int, Order] = {}  # open orders + a bounded tail of closed ones
        self._closed: OrderedDict[int, None] = OrderedDict()
        self._open_by_cid: dict[tuple[str, str, str], int] = {}  # (account, symbol, cid) -> id
        self._last_by_cid: dict[tuple[str, str, str], int] = {}  # incl. closed orders
        self._book: dict[str, list[Order]] = {s: [] for s in self.rules}  # resting user orders
        self._next_order_id = 1
        self._next_exec_id = 1
        self._next_maker_trade_id = 10**12  # maker fills from public prints; far from market ids
        self._next_cid = 1
        self._taking = False
        self.event_sink: Callable[[list[Event]], None] | None = None
        # called with the account when one of its orders trades for the first time
        self.first_fill_sink: Callable[[str], None] | None = None
        self.counters: dict[str, int] = {
            "orders_placed": 0,
            "orders_rejected": 0,
            "orders_canceled": 0,
            "fills": 0,
            "maker_fills": 0,
        }
        for name in accounts:
            self.add_account(name)
        add_listener = getattr(market, "add_trade_listener", None)
        if add_listener is not None:
            add_listener(self._trade_listener)

    # ---------------------------------------------------------------- accounts

    def add_account(
        self, name: str, balances: Mapping[str, Decimal | str | int] | None = None
    ) -> Account:
        """Create (or return) an account, funded with the configured starting balances."""
        acct = self.accounts.get(name)
        if acct is not None:
            return acct
        acct = Account(name)
        start = dict(self._start_balances)
        if balances:
            start.update({k: Decimal(v) for k, v in balances.items()})
        for asset, amount in start.items():
            acct.balances[asset] = AssetBalance(free=amount)
        self.accounts[name] = acct
        return acct

    def _account(self, name: str) -> Account:
        acct = self.accounts.get(name)
        return acct if acct is not None else self.add_account(name)

    # ---------------------------------------------------------------- parsing

    def _symbol(self, params: Mapping[str, str], name: str = "symbol") -> SymbolRules:
        text = _text(params, name)
        if text is None:
            raise missing(name)
        rules = self.rules.get(text)
        if rules is None:
            raise VenueError(-1121, MSG_BAD_SYMBOL)
        return rules

    def parse_new_order(self, params: Mapping[str, str], now_ms: int) -> NewOrder:
        """Validate order.place params and the symbol filters (no state is read or changed).

        Order of checks: mandatory/format (-1102/-1100/-1115..-1117/-1106), symbol (-1121),
        precision (-1111), filters (-1013). Matching-engine rejections (-2010) come later.
        """
        rules = self._symbol(params)
        side = parse_enum(
            params, "side", SIDES, required=True, error=VenueError(-1117, "Invalid side.")
        )
        otype = parse_enum(
            params,
            "type",
            SIMULATED_TYPES,
            required=True,
            error=VenueError(-1116, "Invalid orderType."),
        )
        tif = parse_enum(
            params,
            "timeInForce",
            TIFS,
            required=False,
            error=VenueError(-1115, "Invalid timeInForce."),
        )
        price = parse_decimal(params, "price", required=False, precision=rules.quote_precision)
        qty = parse_decimal(params, "quantity", required=False, precision=rules.base_precision)
        quote_qty = parse_decimal(
            params, "quoteOrderQty", required=False, precision=rules.quote_precision
        )
        cid = parse_client_id(params, "newClientOrderId")
        resp = parse_enum(params, "newOrderRespType", RESP_TYPES, required=False)
        strategy_id = parse_int(params, "strategyId", required=False)
        strategy_type = parse_int(params, "strategyType", required=False)
        if strategy_type is not None and strategy_type < 1_000_000:
            raise illegal("strategyType")
        for unsupported in ("stopPrice", "trailingDelta", "icebergQty", "pegPriceType"):
            if _text(params, unsupported) is not None:
                raise not_required(unsupported)
        stp = parse_enum(params, "selfTradePreventionMode", STP_MODES, required=False)
        assert side is not None
        assert otype is not None
        if otype != "MARKET":  # LIMIT, LIMIT_MAKER: price and base quantity, no quoteOrderQty
            if otype == "LIMIT" and tif is None:
                raise missing("timeInForce")
            if otype == "LIMIT_MAKER" and tif is not None:
                raise not_required("timeInForce")
            if price is None:
                raise missing("price")
            if qty is None:
                raise missing("quantity")
            if quote_qty is not None:
                raise not_required("quoteOrderQty")
            tif = tif or "GTC"  # LIMIT_MAKER rests as GTC
        else:
            if tif is not None:
                raise not_required("timeInForce")
            if price is not None:
                raise not_required("price")
            if qty is None and quote_qty is None:
                raise missing("quantity")
            if qty is not None and quote_qty is not None:
                raise VenueError(-1106, "Parameter 'quoteOrderQty' sent when not required.")
            tif = "GTC"
        if price is not None:
            rules.check_price(price)
        if qty is not None:
            rules.check_qty(qty)
        if otype != "MARKET":
            assert price is not None
            assert qty is not None
            rules.check_notional(price * qty)
        elif quote_qty is not None:
            if quote_qty <= 0:
                raise VenueError(-1013, "Filter failure: NOTIONAL")
            rules.check_notional(quote_qty, apply_max=False)
        else:
            assert qty is not None
            ref = self._reference_price(rules.symbol, side)
            if ref is not None:
                rules.check_notional(ref * qty, apply_max=False)
        if resp is None:
            resp = "FULL" if otype in ("LIMIT", "MARKET") else "ACK"
        return NewOrder(
            symbol=rules.symbol,
            side=side,
            type=otype,
            tif=tif,
            price=price or ZERO,
            qty=qty or ZERO,
            quote_qty=quote_qty or ZERO,
            client_order_id=cid,
            resp_type=resp,
            stp_mode=stp,
            strategy_id=strategy_id,
            strategy_type=strategy_type,
        )

    def _best(self, symbol: str) -> tuple[Decimal | None, Decimal, Decimal | None, Decimal]:
        bid, bid_qty, ask, ask_qty = self.market.best(symbol)

        def dec(x: Any) -> Decimal | None:
            if x is None:
                return None
            d = x if isinstance(x, Decimal) else Decimal(str(x))
            return d if d > 0 else None

        return dec(bid), dec(bid_qty) or ZERO, dec(ask), dec(ask_qty) or ZERO

    def _reference_price(self, symbol: str, side: str) -> Decimal | None:
        bid, _, ask, _ = self._best(symbol)
        return ask if side == "BUY" else bid

    def _available(self, symbol: str, side: str, limit: Decimal | None) -> Decimal:
        """Liquidity a taker of ``side`` could take at or better than ``limit`` (for FOK)."""
        fn = getattr(self.market, "available", None)
        if fn is not None:
            return Decimal(fn(symbol, side, limit))
        top = getattr(self.market, "top", None)
        if top is not None:
            levels = _levels_of(top(symbol, 5000), "asks" if side == "BUY" else "bids")
            if levels is not None:
                total = ZERO
                for p, q in levels:
                    if limit is not None and (p > limit if side == "BUY" else p < limit):
                        break
                    total += q
                return total
        bid, bid_qty, ask, ask_qty = self._best(symbol)
        px, q = (ask, ask_qty) if side == "BUY" else (bid, bid_qty)
        if px is None or (limit is not None and (px > limit if side == "BUY" else px < limit)):
            return ZERO
        return q  # conservative: top level only

    # ---------------------------------------------------------------- order.place / order.test

    def test_order(self, account: str, params: Mapping[str, str], now_ms: int) -> dict[str, Any]:
        """order.test: validation only, nothing reaches the matching engine (section 2.8)."""
        self._account(account)
        self.parse_new_order(params, now_ms)
        if _text(params, "computeCommissionRates") == "true":
            m, t = fmt(self.maker_commission), fmt(self.taker_commission)
            return {
                "standardCommissionForOrder": {"maker": m, "taker": t},
                "specialCommissionForOrder": {"maker": fmt(ZERO), "taker": fmt(ZERO)},
                "taxCommissionForOrder": {"maker": fmt(ZERO), "taker": fmt(ZERO)},
                "discount": {
                    "enabledForAccount": False,
                    "enabledForSymbol": False,
                    "discountAsset": "BNB",
                    "discount": fmt(ZERO),
                },
            }
        return {}

    def place(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[dict[str, Any], list[Event]]:
        """order.place: validate, then submit to the matching engine. Raises VenueError."""
        spec = self.parse_new_order(params, now_ms)
        try:
            order, fills, events = self.submit(account, spec, now_ms)
        except VenueError:
            self.counters["orders_rejected"] += 1
            raise
        return order.place_result(spec.resp_type, now_ms, fills), events

    def submit(
        self, account: str, spec: NewOrder, now_ms: int
    ) -> tuple[Order, list[dict[str, Any]], list[Event]]:
        """Run a validated order through the (simulated) matching engine.

        Every rejection (-2010) is decided before anything changes. Returns the order, the FULL
        ``fills`` list and the user-data events (NEW, TRADE..., EXPIRED, account position).
        """
        acct = self._account(account)
        rules = self.rules[spec.symbol]
        bid, _, ask, _ = self._best(spec.symbol)
        buy = spec.side == "BUY"
        if spec.type == "LIMIT_MAKER" and (
            (buy and ask is not None and spec.price >= ask)
            or (not buy and bid is not None and spec.price <= bid)
        ):
            raise VenueError(-2010, MSG_WOULD_TAKE)
        cid = spec.client_order_id
        if cid is not None and (account, spec.symbol, cid) in self._open_by_cid:
            raise VenueError(-2010, MSG_DUPLICATE)
        if self.max_num_orders and spec.type != "MARKET" and spec.tif == "GTC":
            mine = sum(1 for o in self._book[spec.symbol] if o.account == account)
            if mine >= self.max_num_orders:
                raise VenueError(-1013, "Filter failure: MAX_NUM_ORDERS")
        qty = spec.qty
        if spec.type == "MARKET" and spec.quote_qty:
            ref = ask if buy else bid
            qty = rules.floor_qty(spec.quote_qty / ref) if ref is not None else ZERO
            if qty <= 0 or (rules.min_qty and qty < rules.min_qty):
                raise VenueError(-1013, "Filter failure: LOT_SIZE")
        # balance check (what must be reserved or spent)
        if buy:
            lock_asset = rules.quote_asset
            if spec.type == "MARKET":
                need = spec.quote_qty if spec.quote_qty else qty * (ask or ZERO)
            else:
                need = spec.price * qty
        else:
            lock_asset = rules.base_asset
            need = qty
        bal = acct.bal(lock_asset)
        if need > bal.free:
            raise VenueError(-2010, MSG_INSUFFICIENT)

        # ---- accepted: from here on state changes
        order = Order(
            account=account,
            symbol=spec.symbol,
            order_id=self._next_order_id,
            client_order_id=cid or self._gen_client_id(),
            side=spec.side,
            type=spec.type,
            tif=spec.tif,
            price=spec.price,
            orig_qty=qty,
            orig_quote_qty=spec.quote_qty,
            time=now_ms,
            update_time=now_ms,
            working_time=now_ms,
            stp_mode=spec.stp_mode or self.stp_mode,
            strategy_id=spec.strategy_id,
            strategy_type=spec.strategy_type,
        )
        self._next_order_id += 1
        self.orders[order.order_id] = order
        self._open_by_cid[(account, order.symbol, order.client_order_id)] = order.order_id
        self._last_by_cid[(account, order.symbol, order.client_order_id)] = order.order_id
        self.counters["orders_placed"] += 1
        changed: set[str] = {rules.base_asset, rules.quote_asset}
        is_market_buy = buy and spec.type == "MARKET"
        if not is_market_buy:  # MARKET BUY spends from free per fill, bounded by limit price
            bal.free -= need
            bal.locked += need
            order.locked = need
        events: list[Event] = [(account, self._report(order, "NEW", now_ms))]

        marketable = spec.type == "MARKET" or (
            (buy and ask is not None and spec.price >= ask)
            or (not buy and bid is not None and spec.price <= bid)
        )
        fills: list[dict[str, Any]] = []
        if marketable:
            limit: Decimal | None = None if spec.type == "MARKET" else spec.price
            if is_market_buy:
                cap = spec.quote_qty if spec.quote_qty else bal.free
                limit = rules.floor_price(min(cap, bal.free) / qty) if qty > 0 else ZERO
            take_qty = qty
            if spec.tif == "FOK" and self._available(spec.symbol, spec.side, limit) < qty:
                take_qty = ZERO
            raw: list[tuple[Decimal, Decimal, int]] = []
            if take_qty > 0:
                self._taking = True
                try:
                    raw = list(self.market.take(spec.symbol, spec.side, take_qty, limit, now_ms))
                finally:
                    self._taking = False
            for px, q, trade_id in raw:
                px = px if isinstance(px, Decimal) else Decimal(str(px))
                q = q if isinstance(q, Decimal) else Decimal(str(q))
                if q <= 0:
                    continue
                fills.append(
                    self._fill(
                        order, px, q, int(trade_id), maker=False, now_ms=now_ms, events=events
                    )
                )
        if order.remaining <= 0:
            order.status = "FILLED"
        elif spec.type == "MARKET" or spec.tif in ("IOC", "FOK"):
            order.status = "EXPIRED"
            events.append((account, self._report(order, "EXPIRED", now_ms)))
        else:
            self._rest(order)
        if not order.is_open:
            self._close(order)
        events.append((account, self._position(acct, changed, now_ms)))
        return order, fills, events

    def _gen_client_id(self) -> str:
        n = self._next_cid
        self._next_cid += 1
        return f"sim{n:019d}"

    def _rest(self, order: Order) -> None:
        book = self._book[order.symbol]
        book.append(order)

    def _close(self, order: Order) -> None:
        """Order left the book: release what it still reserved, free its client id."""
        acct = self._account(order.account)
        if order.locked:
            rules = self.rules[order.symbol]
            bal = acct.bal(rules.quote_asset if order.side == "BUY" else rules.base_asset)
            bal.locked -= order.locked
            bal.free += order.locked
            order.locked = ZERO
        self._open_by_cid.pop((order.account, order.symbol, order.client_order_id), None)
        book = self._book[order.symbol]
        if order in book:
            book.remove(order)
        self._closed[order.order_id] = None
        while len(self._closed) > self.max_closed_orders:
            old, _ = self._closed.popitem(last=False)
            gone = self.orders.pop(old, None)
            if gone is not None:
                key = (gone.account, gone.symbol, gone.client_order_id)
                if self._last_by_cid.get(key) == old:
                    del self._last_by_cid[key]

    def _fill(
        self,
        order: Order,
        px: Decimal,
        q: Decimal,
        trade_id: int,
        *,
        maker: bool,
        now_ms: int,
        events: list[Event],
    ) -> dict[str, Any]:
        """Apply one fill to the order and the balances; append its TRADE report."""
        acct = self._account(order.account)
        rules = self.rules[order.symbol]
        base, quote = acct.bal(rules.base_asset), acct.bal(rules.quote_asset)
        notional = px * q
        rate = self.maker_commission if maker else self.taker_commission
        if order.side == "BUY":
            commission = (q * rate).quantize(_Q8, rounding=ROUND_DOWN)
            commission_asset = rules.base_asset
            if order.type == "MARKET":
                quote.free -= notional
            else:
                reserved = order.price * q
                order.locked -= reserved
                quote.locked -= reserved
                quote.free += reserved - notional
            base.free += q - commission
        else:
            commission = (notional * rate).quantize(_Q8, rounding=ROUND_DOWN)
            commission_asset = rules.quote_asset
            order.locked -= q
            base.locked -= q
            quote.free += notional - commission
        if order.executed_qty == 0 and self.first_fill_sink is not None:
            self.first_fill_sink(order.account)
        order.executed_qty += q
        order.cum_quote += notional
        order.update_time = now_ms
        order.status = "FILLED" if order.remaining <= 0 else "PARTIALLY_FILLED"
        acct.update_time = now_ms
        self.counters["fills"] += 1
        if maker:
            self.counters["maker_fills"] += 1
        events.append(
            (
                order.account,
                self._report(
                    order,
                    "TRADE",
                    now_ms,
                    last_qty=q,
                    last_px=px,
                    commission=commission,
                    commission_asset=commission_asset,
                    trade_id=trade_id,
                    maker=maker,
                ),
            )
        )
        return {
            "price": fmt(px),
            "qty": fmt(q),
            "commission": fmt(commission),
            "commissionAsset": commission_asset,
            "tradeId": trade_id,
        }

    # ---------------------------------------------------------------- resting fills

    def _trade_listener(
        self, symbol: str, price: Any, qty: Any, taker_side: Any, now_ms: int
    ) -> None:
        if self._taking:  # our own taker order's prints: never fill our own resting orders
            return
        events = self.on_public_trade(symbol, price, qty, now_ms)
        if events and self.event_sink is not None:
            self.event_sink(events)

    def on_public_trade(self, symbol: str, price: Any, qty: Any, now_ms: int) -> list[Event]:
        """A public trade printed: fill resting user orders it reached (price, time priority)."""
        book = self._book.get(symbol)
        if not book:
            return []
        px = price if isinstance(price, Decimal) else Decimal(str(price))
        left = qty if isinstance(qty, Decimal) else Decimal(str(qty))

        def crossed(o: Order) -> bool:
            if o.side == "BUY":
                return px < o.price or (self.fill_on_touch and px == o.price)
            return px > o.price or (self.fill_on_touch and px == o.price)

        hits = [o for o in book if crossed(o)]
        if not hits:
            return []
        hits.sort(key=lambda o: (-o.price if o.side == "BUY" else o.price, o.time, o.order_id))
        events: list[Event] = []
        touched: dict[str, set[str]] = {}
        for o in hits:
            if left <= 0:
                break
            q = min(o.remaining, left)
            left -= q
            trade_id = self._print_maker_fill(o, q, now_ms)
            self._fill(o, o.price, q, trade_id, maker=True, now_ms=now_ms, events=events)
            rules = self.rules[symbol]
            touched.setdefault(o.account, set()).update((rules.base_asset, rules.quote_asset))
            if not o.is_open:
                self._close(o)
        for account, assets in touched.items():
            events.append((account, self._position(self._account(account), assets, now_ms)))
        return events

    def _print_maker_fill(self, o: Order, q: Decimal, now_ms: int) -> int:
        """A resting user order filled: that is a public trade too (taker = the other side)."""
        publish = getattr(self.market, "publish_trade", None)
        if publish is not None:
            taker = "SELL" if o.side == "BUY" else "BUY"
            return int(publish(o.symbol, o.price, q, taker, now_ms))
        trade_id = self._next_maker_trade_id
        self._next_maker_trade_id += 1
        return trade_id

    # ---------------------------------------------------------------- lookup / cancel

    def find_order(
        self,
        account: str,
        symbol: str,
        order_id: int | None,
        client_id: str | None,
        *,
        open_only: bool,
    ) -> Order | None:
        """By orderId (then checked against client_id, -2039 on mismatch) or by client id."""
        if order_id is not None:
            o = self.orders.get(order_id)
            if o is None or o.account != account or o.symbol != symbol:
                return None
            if client_id is not None and client_id != o.client_order_id:
                raise VenueError(-2039, "Client order id is not valid.")
        else:
            assert client_id is not None
            key = (account, symbol, client_id)
            oid = self._open_by_cid.get(key)
            if oid is None and not open_only:
                oid = self._last_by_cid.get(key)
            o = self.orders.get(oid) if oid is not None else None
        if o is not None and open_only and not o.is_open:
            return None
        return o

    def _order_ref(
        self, params: Mapping[str, str], id_name: str, cid_name: str
    ) -> tuple[int | None, str | None]:
        oid = parse_int(params, id_name, required=False)
        cid = _text(params, cid_name)
        if oid is None and cid is None:
            raise VenueError(
                -1102,
                f"Param '{cid_name}' or '{id_name}' must be sent, but both were empty/null!",
            )
        return oid, cid

    def order_status(self, account: str, params: Mapping[str, str]) -> dict[str, Any]:
        """order.status (section 2.12); -2013 when the order is unknown to this account."""
        rules = self._symbol(params)
        oid, cid = self._order_ref(params, "orderId", "origClientOrderId")
        o = self.find_order(account, rules.symbol, oid, cid, open_only=False)
        if o is None:
            raise VenueError(-2013, MSG_NO_SUCH_ORDER)
        return o.status_result()

    def open_orders(self, account: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """openOrders.status: optional ``symbol``; oldest first."""
        symbols: Iterable[str]
        if _text(params, "symbol") is not None:
            symbols = [self._symbol(params).symbol]
        else:
            symbols = list(self._book)
        out = []
        for s in symbols:
            for o in sorted(self._book[s], key=lambda o: o.order_id):
                if o.account == account:
                    out.append(o.status_result())
        return out

    def cancel(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[dict[str, Any], list[Event]]:
        """order.cancel (section 2.9): -2011 "Unknown order sent." for unknown/closed orders."""
        rules = self._symbol(params)
        oid, cid = self._order_ref(params, "orderId", "origClientOrderId")
        new_cid = parse_client_id(params, "newClientOrderId")
        restriction = _cancel_restriction(params)
        order = self._cancel_target(account, rules.symbol, oid, cid, restriction)
        return self._do_cancel(order, new_cid, now_ms)

    def _cancel_target(
        self,
        account: str,
        symbol: str,
        oid: int | None,
        cid: str | None,
        restriction: str | None,
    ) -> Order:
        order = self.find_order(account, symbol, oid, cid, open_only=True)
        if order is None:
            raise VenueError(-2011, MSG_UNKNOWN_ORDER)
        if (restriction == "ONLY_NEW" and order.status != "NEW") or (
            restriction == "ONLY_PARTIALLY_FILLED" and order.status != "PARTIALLY_FILLED"
        ):
            raise VenueError(-2011, "Order was not canceled due to cancel restrictions.")
        return order

    def _do_cancel(
        self, order: Order, new_cid: str | None, now_ms: int
    ) -> tuple[dict[str, Any], list[Event]]:
        order.cancel_client_id = new_cid or self._gen_client_id()
        order.status = "CANCELED"
        order.update_time = now_ms
        self._close(order)
        self.counters["orders_canceled"] += 1
        acct = self._account(order.account)
        acct.update_time = now_ms
        rules = self.rules[order.symbol]
        events: list[Event] = [
            (order.account, self._report(order, "CANCELED", now_ms, cancel=True)),
            (
                order.account,
                self._position(acct, {rules.base_asset, rules.quote_asset}, now_ms),
            ),
        ]
        return order.cancel_result(now_ms), events

    def cancel_all(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[list[dict[str, Any]], list[Event]]:
        """openOrders.cancelAll: every open order of the account on ``symbol``; -2011 if none."""
        rules = self._symbol(params)
        mine = sorted(
            (o for o in self._book[rules.symbol] if o.account == account),
            key=lambda o: o.order_id,
        )
        if not mine:
            raise VenueError(-2011, MSG_UNKNOWN_ORDER)
        results: list[dict[str, Any]] = []
        events: list[Event] = []
        for o in mine:
            res, ev = self._do_cancel(o, None, now_ms)
            results.append(res)
            events.extend(ev)
        return results, events

    # ---------------------------------------------------------------- amend (section 2.11)

    def amend_keep_priority(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> tuple[dict[str, Any], list[Event]]:
        """order.amend.keepPriority: reduce an open order's quantity, keeping its place.

        -1013 LOT_SIZE for a bad ``newQty``, -2013 unknown/closed order, -2038 when ``newQty``
        is not below the current quantity or not above the executed quantity, -1013
        MAX_NUM_ORDER_AMENDS after 10 amends, -2010 for a ``newClientOrderId`` already open.
        """
        rules = self._symbol(params)
        oid, cid = self._order_ref(params, "orderId", "origClientOrderId")
        new_cid = parse_client_id(params, "newClientOrderId")
        new_qty = parse_decimal(params, "newQty", required=True, precision=rules.base_precision)
        assert new_qty is not None
        rules.check_qty(new_qty)
        order = self.find_order(account, rules.symbol, oid, cid, open_only=True)
        if order is None:
            raise VenueError(-2013, MSG_NO_SUCH_ORDER)
        if new_qty >= order.orig_qty:
            raise VenueError(-2038, "Order amend (quantity increase) is not supported.")
        if new_qty <= order.executed_qty:
            raise VenueError(-2038, "Order amend rejected: newQty must exceed executedQty.")
        if order.amends >= 10:
            raise VenueError(-1013, "Filter failure: MAX_NUM_ORDER_AMENDS")
        prev = order.client_order_id
        if (
            new_cid is not None
            and new_cid != prev
            and (account, rules.symbol, new_cid) in self._open_by_cid
        ):
            raise VenueError(-2010, MSG_DUPLICATE)
        # ---- accepted
        acct = self._account(account)
        delta = order.orig_qty - new_qty
        release = order.price * delta if order.side == "BUY" else delta
        bal = acct.bal(rules.quote_asset if order.side == "BUY" else rules.base_asset)
        order.locked -= release
        bal.locked -= release
        bal.free += release
        order.orig_qty = new_qty
        order.amends += 1
        order.update_time = now_ms
        acct.update_time = now_ms
        if new_cid is not None and new_cid != prev:
            self._open_by_cid.pop((account, rules.symbol, prev), None)
            order.client_order_id = new_cid
            self._open_by_cid[(account, rules.symbol, new_cid)] = order.order_id
            self._last_by_cid[(account, rules.symbol, new_cid)] = order.order_id
        report = self._report(
            order, "REPLACED", now_ms, prev_client_id=prev if order.client_order_id != prev else ""
        )
        events: list[Event] = [
            (account, report),
            (account, self._position(acct, {rules.base_asset, rules.quote_asset}, now_ms)),
        ]
        amended = {
            "symbol": order.symbol,
            "orderId": order.order_id,
            "orderListId": -1,
            "origClientOrderId": prev,
            "clientOrderId": order.client_order_id,
            "price": fmt(order.price),
            "qty": fmt(order.orig_qty),
            "executedQty": fmt(order.executed_qty),
            "preventedQty": fmt(ZERO),
            "quoteOrderQty": fmt(order.orig_quote_qty),
            "cumulativeQuoteQty": fmt(order.cum_quote),  # sic: single m in amend responses
            "status": order.status,
            "timeInForce": order.tif,
            "type": order.type,
            "side": order.side,
            "workingTime": order.working_time,
            "selfTradePreventionMode": order.stp_mode,
        }
        return {"transactTime": now_ms, "executionId": report["I"], "amendedOrder": amended}, events

    # ---------------------------------------------------------------- cancelReplace

    def cancel_replace(
        self,
        account: str,
        params: Mapping[str, str],
        now_ms: int,
        *,
        new_order_error: VenueError | None = None,
    ) -> tuple[int, dict[str, Any], list[Event]]:
        """order.cancelReplace (section 2.10). Returns ``(status, body, events)``.

        ``body`` is the ``result`` object when status is 200, else the ``error`` object
        (``{code,msg,data{cancelResult,newOrderResult,cancelResponse,newOrderResponse}}``).
        Parameter/filter errors of either leg raise :class:`VenueError` before anything happens.
        ``new_order_error`` (set by the shell for orderRateLimitExceededMode=CANCEL_ONLY when the
        unfilled-order limit is hit) fails the new-order leg with that error after the cancel.
        """
        rules = self._symbol(params)
        mode = parse_enum(params, "cancelReplaceMode", CANCEL_REPLACE_MODES, required=True)
        oid, cid = self._order_ref(params, "cancelOrderId", "cancelOrigClientOrderId")
        cancel_cid = parse_client_id(params, "cancelNewClientOrderId")
        restriction = _cancel_restriction(params)
        parse_enum(
            params,
            "orderRateLimitExceededMode",
            ("DO_NOTHING", "CANCEL_ONLY"),
            required=False,
        )
        spec = self.parse_new_order(params, now_ms)
        assert spec.symbol == rules.symbol
        events: list[Event] = []
        cancel_resp: dict[str, Any]
        cancel_ok = False
        try:
            target = self._cancel_target(account, rules.symbol, oid, cid, restriction)
            cancel_resp, ev = self._do_cancel(target, cancel_cid, now_ms)
            events.extend(ev)
            cancel_ok = True
        except VenueError as exc:
            cancel_resp = {"code": exc.code, "msg": exc.msg}
        if not cancel_ok and mode == "STOP_ON_FAILURE":
            return (
                400,
                {
                    "code": -2022,
                    "msg": "Order cancel-replace failed.",
                    "data": {
                        "cancelResult": "FAILURE",
                        "newOrderResult": "NOT_ATTEMPTED",
                        "cancelResponse": cancel_resp,
                        "newOrderResponse": None,
                    },
                },
                events,
            )
        new_resp: dict[str, Any]
        new_ok = False
        try:
            if new_order_error is not None:
                raise new_order_error
            order, fills, ev = self.submit(account, spec, now_ms)
            events.extend(ev)
            new_resp = order.place_result(spec.resp_type, now_ms, fills)
            new_ok = True
        except VenueError as exc:
            self.counters["orders_rejected"] += 1
            new_resp = {"code": exc.code, "msg": exc.msg}
        if cancel_ok and new_ok:
            return (
                200,
                {
                    "cancelResult": "SUCCESS",
                    "newOrderResult": "SUCCESS",
                    "cancelResponse": cancel_resp,
                    "newOrderResponse": new_resp,
                },
                events,
            )
        data = {
            "cancelResult": "SUCCESS" if cancel_ok else "FAILURE",
            "newOrderResult": "SUCCESS" if new_ok else "FAILURE",
            "cancelResponse": cancel_resp,
            "newOrderResponse": new_resp,
        }
        if cancel_ok or new_ok:
            return (
                409,
                {
                    "code": -2021,
                    "msg": "Order cancel-replace partially failed.",
                    "data": data,
                },
                events,
            )
        return 400, {"code": -2022, "msg": "Order cancel-replace failed.", "data": data}, events

    # ---------------------------------------------------------------- account

    def account_status(
        self, account: str, params: Mapping[str, str], now_ms: int
    ) -> dict[str, Any]:
        """account.status (section 2.12); ``omitZeroBalances=true`` drops empty assets."""
        acct = self._account(account)
        omit = _text(params, "omitZeroBalances") == "true"
        balances = [
            {"asset": a, "free": fmt(b.free), "locked": fmt(b.locked)}
            for a, b in sorted(acct.balances.items())
            if not (omit and b.free == 0 and b.locked == 0)
        ]
        m, t = self.maker_commission, self.taker_commission
        return {
            "makerCommission": int(m * 10000),
            "takerCommission": int(t * 10000),
            "buyerCommission": 0,
            "sellerCommission": 0,
            "commissionRates": {
                "maker": fmt(m),
                "taker": fmt(t),
                "buyer": fmt(ZERO),
                "seller": fmt(ZERO),
            },
            "canTrade": True,
            "canWithdraw": True,
            "canDeposit": True,
            "brokered": False,
            "requireSelfTradePrevention": False,
            "preventSor": False,
            "updateTime": acct.update_time,
            "accountType": "SPOT",
            "balances": balances,
            "permissions": ["SPOT"],
            "uid": 100000000 + sorted(self.accounts).index(account),
        }

    def open_order_count(self) -> int:
        return sum(len(b) for b in self._book.values())

    def open_orders_by_client_id(self) -> dict[str, dict[str, Any]]:
        """For the admin ``/sim/state`` endpoint: every open order keyed by its client order id."""
        out: dict[str, dict[str, Any]] = {}
        for book in self._book.values():
            for o in book:
                out[o.client_order_id] = {
                    "account": o.account,
                    "symbol": o.symbol,
                    "orderId": o.order_id,
                    "side": o.side,
                    "type": o.type,
                    "price": fmt(o.price),
                    "origQty": fmt(o.orig_qty),
                    "executedQty": fmt(o.executed_qty),
                    "status": o.status,
                }
        return out

    # ---------------------------------------------------------------- events (section 2.15)

    def _report(
        self,
        o: Order,
        x: str,
        now_ms: int,
        *,
        last_qty: Decimal = ZERO,
        last_px: Decimal = ZERO,
        commission: Decimal | None = None,
        commission_asset: str | None = None,
        trade_id: int = -1,
        maker: bool = False,
        cancel: bool = False,
        prev_client_id: str = "",
    ) -> dict[str, Any]:
        exec_id = self._next_exec_id
        self._next_exec_id += 1
        ev: dict[str, Any] = {
            "e": "executionReport",
            "E": now_ms,
            "s": o.symbol,
            "c": o.cancel_client_id if cancel else o.client_order_id,
            "S": o.side,
            "o": o.type,
            "f": o.tif,
            "q": fmt(o.orig_qty),
            "p": fmt(o.price),
            "P": fmt(ZERO),
            "F": fmt(ZERO),
            "g": -1,
            "C": o.client_order_id if cancel else prev_client_id,
            "x": x,
            "X": o.status,
            "r": "NONE",
            "i": o.order_id,
            "l": fmt(last_qty),
            "z": fmt(o.executed_qty),
            "L": fmt(last_px),
            "n": fmt(commission) if commission is not None else "0",
            "N": commission_asset,
            "T": now_ms,
            "t": trade_id,
            "I": exec_id,
            "w": o.is_open,
            "m": maker,
            "M": x == "TRADE",
            "O": o.time,
            "Z": fmt(o.cum_quote),
            "Y": fmt(last_qty * last_px),
            "Q": fmt(o.orig_quote_qty),
        }
        if o.working_time >= 0:
            ev["W"] = o.working_time
        ev["V"] = o.stp_mode
        if o.strategy_id is not None:
            ev["j"] = o.strategy_id
        if o.strategy_type is not None:
            ev["J"] = o.strategy_type
        return ev

    @staticmethod
    def _position(acct: Account, assets: Iterable[str], now_ms: int) -> dict[str, Any]:
        return {
            "e": "outboundAccountPosition",
            "E": now_ms,
            "u": acct.update_time or now_ms,
            "B": [
                {"a": a, "f": fmt(acct.bal(a).free), "l": fmt(acct.bal(a).locked)}
                for a in sorted(assets)
            ],
        }


def _levels_of(book: Any, side: str) -> list[tuple[Decimal, Decimal]] | None:
    """Levels as Decimals from ``market.top``: ``(lastUpdateId, bids, asks)`` in integer 1e-8
    units (pipeline.sim.market), or a mapping with ``bids``/``asks`` of Decimals/strings."""
    try:
        if isinstance(book, Mapping):
            raw = book.get(side)
        elif isinstance(book, tuple | list) and len(book) == 3:
            raw = book[1] if side == "bids" else book[2]
        else:
            return None
        if raw is None:
            return None
        out: list[tuple[Decimal, Decimal]] = []
        for lvl in raw:
            p, q = lvl[0], lvl[1]
            if isinstance(p, int) and isinstance(q, int):
                out.append((Decimal(p) / _UNITS, Decimal(q) / _UNITS))
            else:
                out.append((Decimal(str(p)), Decimal(str(q))))
        return out
    except (TypeError, IndexError, InvalidOperation):
        return None
