"""What the simulated venue sees of the market: best prices, available depth, taking, printing.

Why a module of its own: the market (:mod:`pipeline.sim.market`) speaks integer 1e-8 units or
Decimals depending on the call, and optional capabilities (``available``, ``top``,
``publish_trade``) may be missing from a stand-in market. This adapter is the one place that
turns those answers into Decimals, so the filters and the matching engine never guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from pipeline.binance.filters import SymbolRules
from pipeline.sim.venue_params import ZERO

_UNITS = Decimal(100_000_000)  # pipeline.sim.market integer units per 1


class MarketLike(Protocol):
    """What the venue needs from :class:`pipeline.sim.market.Market`."""

    def rules(self, symbol: str) -> SymbolRules: ...

    def best(self, symbol: str) -> tuple[Any, Any, Any, Any]: ...

    def take(
        self, symbol: str, side: str, qty: Decimal, limit_price: Decimal | None, now_ms: int
    ) -> list[tuple[Decimal, Decimal, int]]: ...


class MarketView:
    """The venue's Decimal view of a :class:`MarketLike` market (no state of its own)."""

    def __init__(self, market: MarketLike) -> None:
        self.market = market

    def best(self, symbol: str) -> tuple[Decimal | None, Decimal, Decimal | None, Decimal]:
        """``(bid, bid_qty, ask, ask_qty)``; an empty side is ``None`` with quantity 0."""
        bid, bid_qty, ask, ask_qty = self.market.best(symbol)

        def dec(x: Any) -> Decimal | None:
            if x is None:
                return None
            d = x if isinstance(x, Decimal) else Decimal(str(x))
            return d if d > 0 else None

        return dec(bid), dec(bid_qty) or ZERO, dec(ask), dec(ask_qty) or ZERO

    def reference_price(self, symbol: str, side: str) -> Decimal | None:
        """The price a MARKET order of ``side`` would meet first (for its NOTIONAL filter)."""
        bid, _, ask, _ = self.best(symbol)
        return ask if side == "BUY" else bid

    def available(self, symbol: str, side: str, limit: Decimal | None) -> Decimal:
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
        bid, bid_qty, ask, ask_qty = self.best(symbol)
        px, q = (ask, ask_qty) if side == "BUY" else (bid, bid_qty)
        if px is None or (limit is not None and (px > limit if side == "BUY" else px < limit)):
            return ZERO
        return q  # conservative: top level only


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
