"""A simulated symbol: its trading rules (:class:`pipeline.binance.filters.SymbolRules`) and
the walk's start point.

Why apart from the market: REST exchangeInfo, the venue's order checks and the walk all read
these rules; none of them needs the order book to do so. The rules themselves are the one
class the trading process also parses from exchangeInfo, so the simulator cannot advertise one
grid and enforce another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

from pipeline.binance.filters import SymbolRules

QUOTE_ASSETS = ("USDT", "FDUSD", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")
MAX_PRICE = Decimal("1000000")


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """A simulated symbol: the rules it trades under plus where and how big the walk starts."""

    rules: SymbolRules
    start_price: Decimal
    lot_qty: Decimal  # typical size of one maker order in the walk

    @property
    def symbol(self) -> str:
        return self.rules.symbol

    @property
    def tick_size(self) -> Decimal:
        return self.rules.tick_size

    @property
    def step_size(self) -> Decimal:
        return self.rules.step_size

    def with_stp_modes(self, allowed: list[str], default: str) -> SymbolSpec:
        """The same symbol allowing only ``allowed`` STP modes (``--stp-modes``)."""
        return replace(self, rules=self.rules.with_stp_modes(allowed, default))

    def with_status(self, status: str) -> SymbolSpec:
        """The same symbol under another status (``POST /sim/symbol_status``)."""
        return replace(self, rules=self.rules.with_status(status))


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
    tick, step, min_qty, max_qty, start, lot = _KNOWN.get(
        symbol, ("0.01", "0.001", "0.001", "900000", "100", "5")
    )
    rules = SymbolRules(
        symbol=symbol,
        base_asset=symbol[: -len(quote)],
        quote_asset=quote,
        tick_size=Decimal(tick),
        min_price=Decimal(tick),
        max_price=MAX_PRICE,
        step_size=Decimal(step),
        min_qty=Decimal(min_qty),
        max_qty=Decimal(max_qty),
        market_step_size=Decimal(step),
        market_min_qty=Decimal(min_qty),
        market_max_qty=Decimal(max_qty),
        min_notional=Decimal("5"),
        max_notional=Decimal("9000000"),
        apply_min_to_market=True,
        apply_max_to_market=False,
        max_num_orders=200,
    )
    return SymbolSpec(rules=rules, start_price=Decimal(start), lot_qty=Decimal(lot))
