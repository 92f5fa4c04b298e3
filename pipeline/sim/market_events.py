"""The public events the simulated market produces (integers in 1e-8 units; times in ms).

Why a module of its own: the market makes them; the encoders
(:mod:`pipeline.sim.market_payloads`, :mod:`pipeline.sim.framing`) and REST read them, and none
of those needs the order book.
Plain ``__slots__`` classes, not dataclasses: a walk at full speed makes one per print.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipeline.sim.units import fmt_units

DEPTH_SPEEDS_MS = (100, 1000)
PARTIAL_LEVELS = (5, 10, 20)


class Trade:
    """One fill between a taker and one maker order (stream ``<symbol>@trade``)."""

    __slots__ = ("buyer_maker", "price", "qty", "symbol", "t", "time")
    kind = "trade"

    def __init__(
        self, symbol: str, t: int, price: int, qty: int, time: int, buyer_maker: bool
    ) -> None:
        self.symbol = symbol
        self.t = t
        self.price = price
        self.qty = qty
        self.time = time
        self.buyer_maker = buyer_maker


class AggTrade:
    """The fills of one taker order at one price (stream ``<symbol>@aggTrade``, REST aggTrades)."""

    __slots__ = ("a", "buyer_maker", "f", "l", "price", "qty", "symbol", "time")
    kind = "aggTrade"

    def __init__(
        self,
        symbol: str,
        a: int,
        price: int,
        qty: int,
        f: int,
        last: int,
        time: int,
        buyer_maker: bool,
    ) -> None:
        self.symbol = symbol
        self.a = a
        self.price = price
        self.qty = qty
        self.f = f
        self.l = last
        self.time = time
        self.buyer_maker = buyer_maker

    def rest_dict(self) -> dict[str, object]:
        """The REST /api/v3/aggTrades element (no e/E/s)."""
        return {
            "a": self.a,
            "p": fmt_units(self.price),
            "q": fmt_units(self.qty),
            "f": self.f,
            "l": self.l,
            "T": self.time,
            "m": self.buyer_maker,
            "M": True,
        }


class BookTicker:
    """Best bid/ask after update ``u`` (stream ``<symbol>@bookTicker``; no e/E on spot)."""

    __slots__ = ("ask_px", "ask_qty", "bid_px", "bid_qty", "symbol", "u")
    kind = "bookTicker"

    def __init__(
        self, symbol: str, u: int, bid_px: int, bid_qty: int, ask_px: int, ask_qty: int
    ) -> None:
        self.symbol = symbol
        self.u = u
        self.bid_px = bid_px
        self.bid_qty = bid_qty
        self.ask_px = ask_px
        self.ask_qty = ask_qty


class DepthUpdate:
    """Levels changed by updates ``U..u`` with their new absolute qty (0 = removed)."""

    __slots__ = ("E", "U", "asks", "bids", "speed", "symbol", "u")
    kind = "depth"

    def __init__(
        self,
        symbol: str,
        speed: int,
        E: int,
        U: int,
        u: int,
        bids: list[tuple[int, int]],
        asks: list[tuple[int, int]],
    ) -> None:
        self.symbol = symbol
        self.speed = speed
        self.E = E
        self.U = U
        self.u = u
        self.bids = bids
        self.asks = asks


Event = Trade | AggTrade | BookTicker

I64 = npt.NDArray[np.int64]


class TakerBatch:
    """The public prints of one :meth:`~pipeline.sim.market.Market.step_batch` as columns
    (one ``time`` for all).

    Trades ``t0 + i`` (price, qty, buyer_maker); aggTrades ``a0 + i`` covering trades
    ``f..l``, ``taker`` = index of the taker order that made it; one bookTicker per taker order
    (every taker changes the best level it hits). Encoding columns costs far less than making
    an object per event; :meth:`events` gives the objects in wire order for everyone else.
    """

    __slots__ = (
        "a0",
        "a_bm",
        "a_f",
        "a_l",
        "a_price",
        "a_qty",
        "a_taker",
        "bt_ap",
        "bt_aq",
        "bt_bp",
        "bt_bq",
        "bt_u",
        "symbol",
        "t0",
        "t_bm",
        "t_price",
        "t_qty",
        "time",
    )
    kind = "batch"

    def __init__(
        self,
        symbol: str,
        time: int,
        t0: int,
        trades: tuple[I64, I64, npt.NDArray[np.bool_]],
        a0: int,
        aggs: tuple[I64, I64, I64, I64, npt.NDArray[np.bool_], I64],
        tickers: tuple[I64, I64, I64, I64, I64],
    ) -> None:
        self.symbol = symbol
        self.time = time
        self.t0 = t0
        self.t_price, self.t_qty, self.t_bm = trades
        self.a0 = a0
        self.a_price, self.a_qty, self.a_f, self.a_l, self.a_bm, self.a_taker = aggs
        self.bt_u, self.bt_bp, self.bt_bq, self.bt_ap, self.bt_aq = tickers

    def __len__(self) -> int:
        return len(self.t_price) + len(self.a_price) + len(self.bt_u)

    def events(self) -> list[Event]:
        """As objects, in the order the per-action walk emits them: per taker order and price
        level its trades then the aggTrade, then the taker's bookTicker."""
        sym, tm, t0 = self.symbol, self.time, self.t0
        tp, tq, tb = self.t_price.tolist(), self.t_qty.tolist(), self.t_bm.tolist()
        ap, aq, af, al = (x.tolist() for x in (self.a_price, self.a_qty, self.a_f, self.a_l))
        ab, ak = self.a_bm.tolist(), self.a_taker.tolist()
        bu, bbp, bbq, bap, baq = (
            x.tolist() for x in (self.bt_u, self.bt_bp, self.bt_bq, self.bt_ap, self.bt_aq)
        )
        out: list[Event] = []
        i, n_aggs = 0, len(ap)
        for k in range(len(bu)):
            while i < n_aggs and ak[i] == k:
                for t in range(af[i], al[i] + 1):
                    j = t - t0
                    out.append(Trade(sym, t, tp[j], tq[j], tm, tb[j]))
                out.append(AggTrade(sym, self.a0 + i, ap[i], aq[i], af[i], al[i], tm, ab[i]))
                i += 1
            out.append(BookTicker(sym, bu[k], bbp[k], bbq[k], bap[k], baq[k]))
        return out
