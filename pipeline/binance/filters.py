"""A symbol's trading rules as exchangeInfo sends them, and the pure check of an order against them.

Why one class for the whole project: the simulator's venue enforces these rules (error -1013
"Filter failure: X"), its market walk prices and sizes orders on the same grid, and the trading
process refuses a violating order locally instead of paying a round trip to learn the same
answer. Three copies of "what PRICE_FILTER means" would drift; this is the only one.

Parsing follows the wire (binance-protocol.md section 5 pitfall 3, ``filters.md``): a
``symbols[]`` entry of ``GET /api/v3/exchangeInfo`` with ``status``, ``baseAsset``/``quoteAsset``
and ``filters``. Each rule whose value is 0 is disabled, as on Binance. A filter type this module
does not check (PERCENT_PRICE, ICEBERG_PARTS, TRAILING_DELTA, MAX_POSITION, a type added next
year) is kept by name in :attr:`SymbolRules.unchecked_filters` and otherwise ignored, never a
crash: the venue is the authority on what we do not check.

Arithmetic is exact: prices and quantities are :class:`~decimal.Decimal` and "on the grid" is
``value % tick == 0`` in decimal, never a float modulo (``0.3 % 0.1`` is not 0 in binary).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any, NamedTuple

ZERO = Decimal(0)
_Q8 = Decimal("0.00000001")

#: selfTradePreventionMode values (binance-protocol.md 7.2) in Binance's documented order; a
#: symbol allows a subset (exchangeInfo ``allowedSelfTradePreventionModes``).
STP_MODES = ("NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH", "DECREMENT", "TRANSFER")

#: Symbol statuses Binance documents (``enums.md``); CANCEL_ONLY since 2026-07-07.
SYMBOL_STATUSES = frozenset(
    {
        "PRE_TRADING",
        "TRADING",
        "POST_TRADING",
        "END_OF_DAY",
        "HALT",
        "AUCTION_MATCH",
        "BREAK",
        "CANCEL_ONLY",
    }
)
#: Filter types :meth:`SymbolRules.check` enforces; any other type is kept by name, unchecked.
CHECKED_FILTERS = frozenset(
    {"PRICE_FILTER", "LOT_SIZE", "MARKET_LOT_SIZE", "MIN_NOTIONAL", "NOTIONAL",
     "MAX_NUM_ORDERS", "MAX_NUM_ORDER_AMENDS"}
)  # fmt: skip
DEFAULT_ORDER_TYPES: tuple[str, ...] = ("LIMIT", "LIMIT_MAKER", "MARKET")
#: What Binance answers a new order on a symbol that is not TRADING (errors.md, -2010 table).
MSG_MARKET_CLOSED = "Market is closed."
#: Binance's default STP mode on its symbols' exchangeInfo (``defaultSelfTradePreventionMode``)
DEFAULT_STP_MODE = "EXPIRE_MAKER"
#: An order whose ``selfTradePreventionMode`` the symbol does not allow. errors.md lists no
#: code or message for it (checked 2026-12): -1013 (rejected before the matching engine, as
#: every order-parameter rule) is our conservative choice, and the text is ours.
MSG_STP_NOT_ALLOWED = "selfTradePreventionMode is not allowed for this symbol."


class RulesError(ValueError):
    """An exchangeInfo symbol entry we cannot turn into rules (missing or malformed field)."""


class Violation(NamedTuple):
    """Why an order would be refused: the filter's name and the message Binance sends."""

    filter: str
    msg: str


def _violation(name: str) -> Violation:
    return Violation(name, f"Filter failure: {name}")


_PRICE = _violation("PRICE_FILTER")
_LOT = _violation("LOT_SIZE")
_MARKET_LOT = _violation("MARKET_LOT_SIZE")
_CLOSED = Violation("SYMBOL_STATUS", MSG_MARKET_CLOSED)
_STP = Violation("STP_MODE", MSG_STP_NOT_ALLOWED)


def _dec(entry: Mapping[str, Any], key: str, where: str) -> Decimal:
    """A decimal field sent as a string (or a number, tolerated); absent means 0 (disabled)."""
    raw = entry.get(key, "0")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float, Decimal)):
        raise RulesError(f"{where}.{key}: not a decimal: {raw!r}")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise RulesError(f"{where}.{key}: not a decimal: {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise RulesError(f"{where}.{key}: out of range: {raw!r}")
    return value


def _int(entry: Mapping[str, Any], key: str, default: int, where: str) -> int:
    raw = entry.get(key, default)
    if type(raw) is not int or raw < 0:
        raise RulesError(f"{where}.{key}: not a non-negative integer: {raw!r}")
    return raw


def on_grid(value: Decimal, step: Decimal) -> bool:
    """``value`` is a whole multiple of ``step`` (a zero step disables the rule)."""
    return not step or value % step == 0


@dataclass(frozen=True, slots=True)
class SymbolRules:
    """One symbol's status and filters; see the module docstring. A zero value disables a rule.

    ``notional_filter`` is the name the notional rule was sent under: ``NOTIONAL`` (current) or
    ``MIN_NOTIONAL`` (the 2021 schema), so a refusal names the filter the venue would name.
    """

    symbol: str
    base_asset: str
    quote_asset: str
    status: str = "TRADING"
    base_precision: int = 8
    quote_precision: int = 8
    tick_size: Decimal = ZERO
    min_price: Decimal = ZERO
    max_price: Decimal = ZERO
    step_size: Decimal = ZERO
    min_qty: Decimal = ZERO
    max_qty: Decimal = ZERO
    market_step_size: Decimal = ZERO
    market_min_qty: Decimal = ZERO
    market_max_qty: Decimal = ZERO
    notional_filter: str = "NOTIONAL"
    min_notional: Decimal = ZERO
    max_notional: Decimal = ZERO
    apply_min_to_market: bool = True
    apply_max_to_market: bool = False
    max_num_orders: int = 0
    max_num_order_amends: int = 0
    order_types: tuple[str, ...] = DEFAULT_ORDER_TYPES
    unchecked_filters: tuple[str, ...] = field(default=())
    # exchangeInfo ``allowedSelfTradePreventionModes`` / ``defaultSelfTradePreventionMode``;
    # an entry without them allows all six (the venue decides)
    allowed_stp_modes: tuple[str, ...] = STP_MODES
    default_stp_mode: str = DEFAULT_STP_MODE

    # ---- parsing -----------------------------------------------------------------------

    @classmethod
    def from_exchange_info(cls, entry: Mapping[str, Any]) -> SymbolRules:
        """Rules from one ``symbols[]`` entry exactly as Binance sends it; :class:`RulesError`
        when a field we rely on is missing or malformed (the caller counts and skips it)."""
        if not isinstance(entry, Mapping):
            raise RulesError(f"symbol entry is not an object: {type(entry).__name__}")
        symbol, base, quote = entry.get("symbol"), entry.get("baseAsset"), entry.get("quoteAsset")
        if not isinstance(symbol, str) or not symbol:
            raise RulesError(f"symbol entry without a symbol: {str(entry)[:80]}")
        where = symbol[:40]
        if not isinstance(base, str) or not isinstance(quote, str) or not base or not quote:
            raise RulesError(f"{where}: baseAsset/quoteAsset missing")
        status = entry.get("status", "TRADING")
        if not isinstance(status, str):
            raise RulesError(f"{where}.status: not a string: {status!r}")
        types = entry.get("orderTypes", DEFAULT_ORDER_TYPES)
        if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
            raise RulesError(f"{where}.orderTypes: not a list of strings")
        filters = entry.get("filters", [])
        if not isinstance(filters, list):
            raise RulesError(f"{where}.filters: not a list")
        allowed_stp = entry.get("allowedSelfTradePreventionModes", STP_MODES)
        if not isinstance(allowed_stp, (list, tuple)) or not all(
            isinstance(m, str) for m in allowed_stp
        ):
            raise RulesError(f"{where}.allowedSelfTradePreventionModes: not a list of strings")
        default_stp = entry.get("defaultSelfTradePreventionMode", DEFAULT_STP_MODE)
        if not isinstance(default_stp, str):
            raise RulesError(f"{where}.defaultSelfTradePreventionMode: not a string")
        kw: dict[str, Any] = {}
        unchecked: list[str] = []
        for f in filters:
            if not isinstance(f, Mapping) or not isinstance(f.get("filterType"), str):
                raise RulesError(f"{where}.filters: entry without a filterType: {str(f)[:80]}")
            kind = f["filterType"]
            at = f"{where}.{kind}"
            if kind == "PRICE_FILTER":
                kw.update(min_price=_dec(f, "minPrice", at), max_price=_dec(f, "maxPrice", at),
                          tick_size=_dec(f, "tickSize", at))  # fmt: skip
            elif kind == "LOT_SIZE":
                kw.update(min_qty=_dec(f, "minQty", at), max_qty=_dec(f, "maxQty", at),
                          step_size=_dec(f, "stepSize", at))  # fmt: skip
            elif kind == "MARKET_LOT_SIZE":
                kw.update(market_min_qty=_dec(f, "minQty", at),
                          market_max_qty=_dec(f, "maxQty", at),
                          market_step_size=_dec(f, "stepSize", at))  # fmt: skip
            elif kind == "NOTIONAL":
                kw.update(notional_filter=kind, min_notional=_dec(f, "minNotional", at),
                          max_notional=_dec(f, "maxNotional", at),
                          apply_min_to_market=f.get("applyMinToMarket", True) is True,
                          apply_max_to_market=f.get("applyMaxToMarket", False) is True)  # fmt: skip
            elif kind == "MIN_NOTIONAL":
                kw.update(notional_filter=kind, min_notional=_dec(f, "minNotional", at),
                          max_notional=ZERO,
                          apply_min_to_market=f.get("applyToMarket", True) is True)  # fmt: skip
            elif kind == "MAX_NUM_ORDERS":
                kw["max_num_orders"] = _int(f, "maxNumOrders", 0, at)
            elif kind == "MAX_NUM_ORDER_AMENDS":
                kw["max_num_order_amends"] = _int(f, "maxNumOrderAmends", 0, at)
            else:
                unchecked.append(kind[:40])
        return cls(
            symbol=symbol,
            base_asset=base,
            quote_asset=quote,
            status=status,
            base_precision=_int(entry, "baseAssetPrecision", 8, where),
            quote_precision=_int(entry, "quoteAssetPrecision", 8, where),
            order_types=tuple(types),
            unchecked_filters=tuple(unchecked),
            allowed_stp_modes=tuple(m[:40] for m in allowed_stp),
            default_stp_mode=default_stp[:40],
            **kw,
        )

    def with_stp_modes(self, allowed: Iterable[str], default: str) -> SymbolRules:
        """The same rules allowing only ``allowed`` STP modes, ``default`` for an order that
        names none (a simulator restricting a symbol); :class:`RulesError` for a mode Binance
        does not document or a default that is not allowed."""
        modes = tuple(dict.fromkeys(allowed))
        unknown = [m for m in (*modes, default) if m not in STP_MODES]
        if unknown or not modes:
            raise RulesError(f"STP modes must be some of {', '.join(STP_MODES)}: {unknown}")
        if default not in modes:
            raise RulesError(f"default STP mode {default} is not among the allowed {modes}")
        return replace(self, allowed_stp_modes=modes, default_stp_mode=default)

    def with_status(self, status: str) -> SymbolRules:
        """The same rules under another symbol status (exchangeInfo changes nothing else)."""
        if status not in SYMBOL_STATUSES:
            raise RulesError(f"unknown symbol status {status!r}")
        return replace(self, status=status)

    def exchange_info_filters(self) -> list[dict[str, Any]]:
        """The filters in exchangeInfo's current shape (what a simulator advertises)."""

        def d(x: Decimal) -> str:
            return format(x.quantize(_Q8), "f")

        out: list[dict[str, Any]] = [
            {"filterType": "PRICE_FILTER", "minPrice": d(self.min_price),
             "maxPrice": d(self.max_price), "tickSize": d(self.tick_size)},
            {"filterType": "LOT_SIZE", "minQty": d(self.min_qty), "maxQty": d(self.max_qty),
             "stepSize": d(self.step_size)},
            {"filterType": "MARKET_LOT_SIZE", "minQty": d(self.market_min_qty),
             "maxQty": d(self.market_max_qty), "stepSize": d(self.market_step_size)},
        ]  # fmt: skip
        if self.notional_filter == "MIN_NOTIONAL":
            out.append({"filterType": "MIN_NOTIONAL", "minNotional": d(self.min_notional),
                        "applyToMarket": self.apply_min_to_market, "avgPriceMins": 5})  # fmt: skip
        else:
            out.append({"filterType": "NOTIONAL", "minNotional": d(self.min_notional),
                        "applyMinToMarket": self.apply_min_to_market,
                        "maxNotional": d(self.max_notional),
                        "applyMaxToMarket": self.apply_max_to_market,
                        "avgPriceMins": 5})  # fmt: skip
        if self.max_num_orders:
            out.append({"filterType": "MAX_NUM_ORDERS", "maxNumOrders": self.max_num_orders})
        if self.max_num_order_amends:
            out.append({"filterType": "MAX_NUM_ORDER_AMENDS",
                        "maxNumOrderAmends": self.max_num_order_amends})  # fmt: skip
        return out

    # ---- the checks (pure; each returns None or the violated filter) --------------------

    @property
    def trading(self) -> bool:
        return self.status == "TRADING"

    def price_violation(self, price: Decimal) -> Violation | None:
        """PRICE_FILTER: ``minPrice <= price <= maxPrice`` and on the tick grid."""
        if price <= 0:
            return _PRICE
        if self.min_price and price < self.min_price:
            return _PRICE
        if self.max_price and price > self.max_price:
            return _PRICE
        if not on_grid(price, self.tick_size):
            return _PRICE
        return None

    def qty_violation(self, qty: Decimal, *, market: bool = False) -> Violation | None:
        """LOT_SIZE (every order), then MARKET_LOT_SIZE (MARKET orders)."""
        if qty <= 0:
            return _LOT
        if (self.min_qty and qty < self.min_qty) or (self.max_qty and qty > self.max_qty):
            return _LOT
        if not on_grid(qty, self.step_size):
            return _LOT
        if market and (
            (self.market_min_qty and qty < self.market_min_qty)
            or (self.market_max_qty and qty > self.market_max_qty)
            or not on_grid(qty, self.market_step_size)
        ):
            return _MARKET_LOT
        return None

    def notional_violation(self, notional: Decimal, *, market: bool = False) -> Violation | None:
        """(MIN_)NOTIONAL: ``minNotional <= price * qty <= maxNotional``; for a MARKET order
        each bound applies only when the filter says so (``applyMinToMarket`` ...)."""
        below = bool(self.min_notional) and notional < self.min_notional
        above = bool(self.max_notional) and notional > self.max_notional
        if (below and (not market or self.apply_min_to_market)) or (
            above and (not market or self.apply_max_to_market)
        ):
            return _violation(self.notional_filter)
        return None

    def stp_violation(self, mode: str) -> Violation | None:
        """``selfTradePreventionMode`` not in the symbol's allowed set ("" = none named: the
        symbol's default applies, which is allowed)."""
        if mode and mode not in self.allowed_stp_modes:
            return _STP
        return None

    def check(
        self,
        order_type: str,
        price: Decimal | None,
        qty: Decimal | None,
        *,
        quote_qty: Decimal | None = None,
        reference_price: Decimal | None = None,
    ) -> Violation | None:
        """None when a new order passes the status and filters, else the first violation in
        the venue's order: status, PRICE_FILTER, LOT_SIZE/MARKET_LOT_SIZE, notional.

        A MARKET order's notional is ``quoteOrderQty`` or ``qty * reference_price`` (skipped
        when no reference price is known: the venue decides then).
        """
        if self.status != "TRADING":
            return _CLOSED
        market = order_type == "MARKET"
        if price is not None:
            v = self.price_violation(price)
            if v is not None:
                return v
        if qty is not None:
            v = self.qty_violation(qty, market=market)
            if v is not None:
                return v
        if not market:
            if price is not None and qty is not None:
                return self.notional_violation(price * qty)
            return None
        if quote_qty is not None:
            return self.notional_violation(quote_qty, market=True)
        if qty is not None and reference_price is not None:
            return self.notional_violation(qty * reference_price, market=True)
        return None

    # ---- the grid ----------------------------------------------------------------------

    def floor_qty(self, qty: Decimal) -> Decimal:
        """The largest quantity on the step grid not above ``qty`` (8 decimals without one)."""
        if not self.step_size:
            return qty.quantize(_Q8, rounding=ROUND_DOWN)
        return (qty // self.step_size) * self.step_size

    def floor_price(self, price: Decimal) -> Decimal:
        """The largest price on the tick grid not above ``price``."""
        if not self.tick_size:
            return price.quantize(_Q8, rounding=ROUND_DOWN)
        return (price // self.tick_size) * self.tick_size


@dataclass
class ParsedExchangeInfo:
    """What :func:`parse_exchange_info` made of one answer: the rules and what it skipped."""

    rules: dict[str, SymbolRules]
    skipped: list[str]  # one reason per symbol entry that could not be parsed
    unchecked_filters: int  # filters kept by name only, over all symbols


def parse_exchange_info(body: Any, wanted: Iterable[str] | None = None) -> ParsedExchangeInfo:
    """Every parseable ``symbols[]`` entry of an exchangeInfo answer (optionally only
    ``wanted``); a bad entry is skipped with its reason, never an exception for the rest.

    Raises :class:`RulesError` only when the answer as a whole is not exchangeInfo."""
    if not isinstance(body, Mapping) or not isinstance(body.get("symbols"), list):
        raise RulesError("exchangeInfo answer without a symbols list")
    want = set(wanted) if wanted is not None else None
    rules: dict[str, SymbolRules] = {}
    skipped: list[str] = []
    unchecked = 0
    for entry in body["symbols"]:
        try:
            r = SymbolRules.from_exchange_info(entry)
        except RulesError as exc:
            skipped.append(str(exc)[:200])
            continue
        if want is None or r.symbol in want:
            rules[r.symbol] = r
            unchecked += len(r.unchecked_filters)
    return ParsedExchangeInfo(rules, skipped, unchecked)
