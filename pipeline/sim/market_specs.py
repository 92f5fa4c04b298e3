"""Trading rules of a simulated symbol (the exchangeInfo filters) and the walk's start point.

Why apart from the market: REST exchangeInfo, the venue's order checks and the walk all read
these rules; none of them needs the order book to do so.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

QUOTE_ASSETS = ("USDT", "FDUSD", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """Trading rules of one symbol (the exchangeInfo filters) plus the walk's start point."""

    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: Decimal
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_notional: Decimal
    max_notional: Decimal
    start_price: Decimal
    lot_qty: Decimal  # typical size of one maker order in the walk


_KNOWN: dict[str, tuple[str, str, str, str, str, str]] = {
    # symbol: (tick, step, min_qty, max_qty, start price, typical maker qty)
    "BTCUSDT": ("0.01", "0.00001", "0.00001", "9000", "60000", "0.05"),
    "ETHUSDT": ("0.01", "0.0001", "0.0001", "9000", "3000", "0.5"),
    "BNBUSDT": ("0.01", "0.001", "0.001", "9000", "600", "2"),
}


def default_spec(symbol: str) -> SymbolSpec:
    """Rules for a symbol: realistic values for the majors, generic ones for anything else."""
    symbol = symbol.upper()
    quote = next((q for q in QUOTE_ASSETS if symbol.endswith(q) and len(symbol) > len(q)), None)
    if quote is None:
        raise ValueError(f"cannot split {symbol!r} into base and quote asset")
    base = symbol[: -len(quote)]
    tick, step, min_qty, max_qty, start, lot = _KNOWN.get(
        symbol, ("0.01", "0.001", "0.001", "900000", "100", "5")
    )
    return SymbolSpec(
        symbol=symbol,
        base_asset=base,
        quote_asset=quote,
        tick_size=Decimal(tick),
        step_size=Decimal(step),
        min_qty=Decimal(min_qty),
        max_qty=Decimal(max_qty),
        min_notional=Decimal("5"),
        max_notional=Decimal("9000000"),
        start_price=Decimal(start),
        lot_qty=Decimal(lot),
    )
