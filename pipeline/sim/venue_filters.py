"""The simulated venue's filters: per-symbol rules and the validation of order requests.

Why a module of its own: deciding whether a request is well formed and passes the symbol's filters
(binance-protocol.md section 5 pitfall 3) reads no account or order state, so it is checked here,
in full, before the matching engine sees anything. The order of checks is the exchange's:
mandatory/format (-1102/-1100/-1115..-1117/-1106), symbol (-1121), precision (-1111),
filters (-1013).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any

from pipeline.sim.venue_market_view import MarketView
from pipeline.sim.venue_orders import NewOrder
from pipeline.sim.venue_params import (
    MSG_BAD_SYMBOL,
    Q8,
    RESP_TYPES,
    SIDES,
    SIMULATED_TYPES,
    STP_MODES,
    TIFS,
    ZERO,
    VenueError,
    illegal,
    missing,
    not_required,
    param_text,
    parse_client_id,
    parse_decimal,
    parse_enum,
    parse_int,
)


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
            return qty.quantize(Q8, rounding=ROUND_DOWN)
        return (qty // self.step_size) * self.step_size

    def floor_price(self, price: Decimal) -> Decimal:
        if not self.tick_size:
            return price.quantize(Q8, rounding=ROUND_DOWN)
        return (price // self.tick_size) * self.tick_size


class OrderValidator:
    """Looks symbols up and validates order requests; reads the market only for MARKET notional."""

    def __init__(self, rules: Mapping[str, SymbolRules], view: MarketView) -> None:
        self.rules = rules
        self.view = view

    def symbol(self, params: Mapping[str, str], name: str = "symbol") -> SymbolRules:
        text = param_text(params, name)
        if text is None:
            raise missing(name)
        rules = self.rules.get(text)
        if rules is None:
            raise VenueError(-1121, MSG_BAD_SYMBOL)
        return rules

    def new_order(self, params: Mapping[str, str]) -> NewOrder:
        """Validate order.place params and the symbol filters (no state is read or changed).

        Order of checks: mandatory/format (-1102/-1100/-1115..-1117/-1106), symbol (-1121),
        precision (-1111), filters (-1013). Matching-engine rejections (-2010) come later.
        """
        rules = self.symbol(params)
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
            if param_text(params, unsupported) is not None:
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
            ref = self.view.reference_price(rules.symbol, side)
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


def parse_order_ref(
    params: Mapping[str, str], id_name: str, cid_name: str
) -> tuple[int | None, str | None]:
    """The order a request names: by id, by client id, or both (-1102 when neither is sent)."""
    oid = parse_int(params, id_name, required=False)
    cid = param_text(params, cid_name)
    if oid is None and cid is None:
        raise VenueError(
            -1102,
            f"Param '{cid_name}' or '{id_name}' must be sent, but both were empty/null!",
        )
    return oid, cid
