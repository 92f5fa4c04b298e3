"""The simulated venue's filters: the validation of order requests against the symbol rules.

Why a module of its own: deciding whether a request is well formed and passes the symbol's filters
(binance-protocol.md section 5 pitfall 3) reads no account or order state, so it is checked here,
in full, before the matching engine sees anything. The order of checks is the exchange's:
mandatory/format (-1102/-1100/-1115..-1117/-1106), symbol (-1121), precision (-1111),
symbol status (-2010), filters (-1013). The rules themselves are the project's one
:class:`pipeline.binance.filters.SymbolRules`; this module only turns a violation into the
venue's error.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from pipeline.binance.filters import MSG_MARKET_CLOSED, SymbolRules, Violation
from pipeline.sim.venue_market_view import MarketView
from pipeline.sim.venue_orders import NewOrder
from pipeline.sim.venue_params import (
    MSG_BAD_SYMBOL,
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


def _refuse(v: Violation | None) -> None:
    """A violation of the shared rules as the venue answers it: -1013 "Filter failure: X"
    (-2010 "Market is closed." for a symbol that is not TRADING)."""
    if v is not None:
        raise VenueError(-2010 if v.filter == "SYMBOL_STATUS" else -1013, v.msg)


def check_status(rules: SymbolRules) -> None:
    """New orders (and amends) only on a TRADING symbol; cancels are not checked here.

    Binance: CANCEL_ONLY (since 2026-07-07) rejects new orders and accepts cancels
    (binance-protocol.md section 7.2). The code for the refusal is UNCONFIRMED: -2010
    "Market is closed." is the errors.md message for a symbol that does not trade.
    """
    if rules.status != "TRADING":
        raise VenueError(-2010, MSG_MARKET_CLOSED)


def check_qty(rules: SymbolRules, qty: Decimal, *, market: bool = False) -> None:
    """LOT_SIZE (and MARKET_LOT_SIZE) alone: an amend's ``newQty`` has no price to check."""
    _refuse(rules.qty_violation(qty, market=market))


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
        check_status(rules)
        if quote_qty is not None and quote_qty <= 0:  # MARKET only (checked above)
            raise VenueError(-1013, f"Filter failure: {rules.notional_filter}")
        ref = None
        if otype == "MARKET" and quote_qty is None:
            ref = self.view.reference_price(rules.symbol, side)
        _refuse(rules.check(otype, price, qty, quote_qty=quote_qty, reference_price=ref))
        if stp is not None:  # the symbol's allowed set (exchangeInfo); see MSG_STP_NOT_ALLOWED
            _refuse(rules.stp_violation(stp))
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
