"""Seeded random-walk spot market: one real order book per symbol, Binance-shaped events.

PURE: no sockets, no clock, no asyncio. Every method that creates events takes ``now_ms``; the
shell (:mod:`pipeline.sim.server`) owns time and the sockets.

Calling contract
----------------
1. ``m = Market(["BTCUSDT"], seed=7)``.
2. Drive it: ``m.step(symbol, now_ms, n)`` runs ``n`` walk actions (a taker order that sweeps the
   book, a maker order joining, or a cancel). Takers from outside (the venue's user orders) call
   :meth:`Market.take`; extra public prints call :meth:`Market.publish_trade`.
   ``m.step_batch(symbol, now_ms, takers)`` is the same walk a batch at a time (makers, then
   ``takers`` taker orders swept with numpy): what ``--rate max`` uses to outrun any client.
3. After driving, ``m.drain_events()`` returns the real-time events produced since the last drain,
   in wire order: :class:`Trade`, :class:`AggTrade`, :class:`BookTicker`. ``m.drain_raw()`` is
   the same but keeps each batch as one :class:`TakerBatch` of numpy columns (the shell encodes
   those directly).
4. Diff depth is time-batched: every 100 ms / 1000 ms call ``m.flush_depth(symbol, speed, now_ms)``
   which returns one :class:`DepthUpdate` (or ``None`` when nothing changed). Partial depth is read
   with ``m.top(symbol, levels)``; REST snapshots with :meth:`Market.depth_snapshot`.
5. Encode with the ``encode_*`` functions (bytes of the bare payload, Binance field names).

Invariants (binance-protocol.md section 1.6/1.7, tested in tests/test_sim_market.py):
- trade ids and aggregate trade ids are contiguous per symbol; one aggTrade per taker order per
  price level (Binance merges the fills of one taker order at one price), covering trade ids
  ``f..l``;
- every book change takes the next update id; for each depth speed, ``U`` of an event equals the
  previous event's ``u`` + 1, and a snapshot's ``lastUpdateId`` includes exactly the updates <= it;
- ``bookTicker.u`` is the book update id at which the best levels took those values;
- the book is never crossed (best bid < best ask) after any public call returns;
- the same seed and the same call sequence give byte-identical events.

Prices and quantities are integers in units of 1e-8 inside (Binance publishes 8 decimals), so
``"60000.01000000"`` is ``6000001000000``. Decimals appear only at the venue-facing API.
"""

from __future__ import annotations

import bisect
import random
import zlib
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import numpy.typing as npt

SCALE = 100_000_000  # wire decimals: 8
DEPTH_SPEEDS_MS = (100, 1000)
PARTIAL_LEVELS = (5, 10, 20)
QUOTE_ASSETS = ("USDT", "FDUSD", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")

TradeListener = Callable[[str, Decimal, Decimal, str, int], None]


def to_units(value: Decimal | str | int) -> int:
    """Decimal -> integer 1e-8 units. Raises ValueError if it has more than 8 decimals."""
    d = Decimal(value) * SCALE
    i = int(d)
    if d != i:
        raise ValueError(f"{value} has more than 8 decimals")
    return i


_FMT_CACHE: dict[int, str] = {}


def fmt_units(units: int) -> str:
    """Integer 1e-8 units -> Binance's fixed 8-decimal string ("0.01000000").

    Cached: prices and quantities repeat a lot on the hot path."""
    s = _FMT_CACHE.get(units)
    if s is None:
        if units < 0:
            return "-" + fmt_units(-units)
        s = f"{units // SCALE}.{units % SCALE:08d}"
        if len(_FMT_CACHE) > 200_000:
            _FMT_CACHE.clear()
        _FMT_CACHE[units] = s
    return s


_DEC_CACHE: dict[int, Decimal] = {}


def units_to_decimal(units: int) -> Decimal:
    """Integer 1e-8 units -> Decimal with 8 places (cached: listeners get one per fill)."""
    d = _DEC_CACHE.get(units)
    if d is None:
        d = Decimal(fmt_units(units))
        if len(_DEC_CACHE) > 200_000:
            _DEC_CACHE.clear()
        _DEC_CACHE[units] = d
    return d


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


# --------------------------------------------------------------------------------------------
# Events (integers in 1e-8 units; times in ms)


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
    """The public prints of one :meth:`Market.step_batch` as columns (one ``time`` for all).

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


class _Flat:
    """The best levels of one book side flattened for a vectorised sweep.

    ``cum`` is the cumulative quantity over the orders in priority order; ``lv_end`` the same at
    the end of each level. The last level is never consumed (``cap`` stops before it), so the
    best price after any taker order is always known; at most half the levels are offered, so
    one batch cannot empty a side."""

    __slots__ = ("cap", "cum", "lv_end", "lv_first", "lv_of", "prices")

    def __init__(self, side: _Side, need: int) -> None:
        prices, orders, totals = side.prices, side.orders, side.totals
        n_lv = len(prices)
        lv_prices: list[int] = []
        flat: list[int] = []
        lv_end: list[int] = []
        lv_first: list[int] = []
        lv_of: list[int] = []
        cum = 0

        def add(i: int) -> None:
            p = prices[-1 - i] if side.is_bid else prices[i]
            lv = orders[p]
            lv_first.append(len(flat))
            lv_of.extend([len(lv_prices)] * len(lv))
            flat.extend(lv)
            lv_prices.append(p)
            lv_end.append(cum + totals[p])

        i = 0
        while i < max(1, n_lv // 2) and cum < need:  # never more than half the levels
            add(i)
            cum = lv_end[-1]
            i += 1
        self.cap = cum
        if n_lv:
            add(i)  # never consumed: the best level after the last taker
        self.prices = np.array(lv_prices, np.int64)
        self.cum = np.cumsum(np.array(flat, np.int64))
        self.lv_end = np.array(lv_end, np.int64)
        self.lv_first = lv_first
        self.lv_of = np.array(lv_of, np.int64)


# --------------------------------------------------------------------------------------------
# Wire encodings of the bare payloads (binance-protocol.md section 1.6)

_TRUE_FALSE = ("false", "true")


def encode_trade(ev: Trade) -> bytes:
    return (
        f'{{"e":"trade","E":{ev.time},"s":"{ev.symbol}","t":{ev.t},'
        f'"p":"{fmt_units(ev.price)}","q":"{fmt_units(ev.qty)}","T":{ev.time},'
        f'"m":{_TRUE_FALSE[ev.buyer_maker]},"M":true}}'
    ).encode()


def encode_agg_trade(ev: AggTrade) -> bytes:
    return (
        f'{{"e":"aggTrade","E":{ev.time},"s":"{ev.symbol}","a":{ev.a},'
        f'"p":"{fmt_units(ev.price)}","q":"{fmt_units(ev.qty)}","f":{ev.f},"l":{ev.l},'
        f'"T":{ev.time},"m":{_TRUE_FALSE[ev.buyer_maker]},"M":true}}'
    ).encode()


def encode_book_ticker(ev: BookTicker) -> bytes:
    return (
        f'{{"u":{ev.u},"s":"{ev.symbol}","b":"{fmt_units(ev.bid_px)}",'
        f'"B":"{fmt_units(ev.bid_qty)}","a":"{fmt_units(ev.ask_px)}",'
        f'"A":"{fmt_units(ev.ask_qty)}"}}'
    ).encode()


def _levels(levels: list[tuple[int, int]]) -> str:
    return ",".join(f'["{fmt_units(p)}","{fmt_units(q)}"]' for p, q in levels)


def encode_depth_diff(ev: DepthUpdate) -> bytes:
    return (
        f'{{"e":"depthUpdate","E":{ev.E},"s":"{ev.symbol}","U":{ev.U},"u":{ev.u},'
        f'"b":[{_levels(ev.bids)}],"a":[{_levels(ev.asks)}]}}'
    ).encode()


def encode_partial_depth(
    last_update_id: int, bids: list[tuple[int, int]], asks: list[tuple[int, int]]
) -> bytes:
    return (
        f'{{"lastUpdateId":{last_update_id},"bids":[{_levels(bids)}],"asks":[{_levels(asks)}]}}'
    ).encode()


def encode_event(ev: Event) -> bytes:
    if isinstance(ev, AggTrade):
        return encode_agg_trade(ev)
    if isinstance(ev, Trade):
        return encode_trade(ev)
    return encode_book_ticker(ev)


# --------------------------------------------------------------------------------------------
# Book and per-symbol state


class _DepthAcc:
    """Changed levels since the last flush of one diff-depth speed."""

    __slots__ = ("asks", "bids", "first", "last")

    def __init__(self) -> None:
        self.first = 0  # 0 = nothing pending
        self.last = 0
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}


class _Side:
    """One side of the book: sorted prices + FIFO of maker order quantities per price."""

    __slots__ = ("is_bid", "orders", "prices", "totals")

    def __init__(self, is_bid: bool) -> None:
        self.is_bid = is_bid
        self.prices: list[int] = []  # ascending for both sides
        self.orders: dict[int, list[int]] = {}
        self.totals: dict[int, int] = {}

    def best(self) -> int | None:
        if not self.prices:
            return None
        return self.prices[-1] if self.is_bid else self.prices[0]

    def worst(self) -> int | None:
        if not self.prices:
            return None
        return self.prices[0] if self.is_bid else self.prices[-1]

    def from_best(self, n: int) -> list[int]:
        """The n best prices, best first."""
        if self.is_bid:
            return self.prices[: -n - 1 : -1] if n < len(self.prices) else self.prices[::-1]
        return self.prices[:n]


class _AggHistory:
    """The retained aggregate trades of one symbol as compact columns (``array('q')``).

    Ids are contiguous, so ``a`` is implicit (``first`` + index). A walk at full speed makes
    hundreds of thousands of aggTrades a second: a column append costs far less than an object,
    and REST builds its few hundred :class:`AggTrade` objects only when asked.
    """

    __slots__ = ("bm", "f", "first", "l", "price", "qty", "time")

    def __init__(self) -> None:
        self.first = 0  # id of the oldest retained aggTrade
        self.price = array("q")
        self.qty = array("q")
        self.f = array("q")
        self.l = array("q")
        self.time = array("q")
        self.bm = array("b")

    def __len__(self) -> int:
        return len(self.price)

    def append(self, a: int, price: int, qty: int, f: int, last: int, t: int, bm: bool) -> None:
        if not self.price:
            self.first = a
        self.price.append(price)
        self.qty.append(qty)
        self.f.append(f)
        self.l.append(last)
        self.time.append(t)
        self.bm.append(bm)

    def extend(
        self,
        a0: int,
        price: npt.NDArray[np.int64],
        qty: npt.NDArray[np.int64],
        f: npt.NDArray[np.int64],
        last: npt.NDArray[np.int64],
        t: int,
        bm: npt.NDArray[np.bool_],
    ) -> None:
        if not self.price:
            self.first = a0
        self.price.frombytes(price.astype(np.int64).tobytes())
        self.qty.frombytes(qty.astype(np.int64).tobytes())
        self.f.frombytes(f.astype(np.int64).tobytes())
        self.l.frombytes(last.astype(np.int64).tobytes())
        self.time.frombytes(np.full(len(price), t, np.int64).tobytes())
        self.bm.frombytes(bm.astype(np.int8).tobytes())

    def trim(self, keep: int) -> None:
        drop = len(self.price) - keep
        if drop > 0:
            for col in (self.price, self.qty, self.f, self.l, self.time, self.bm):
                del col[:drop]
            self.first += drop

    def objects(self, symbol: str, lo: int, hi: int) -> list[AggTrade]:
        lo, hi = max(lo, 0), min(hi, len(self.price))
        pr, qt, f, la, tm, bm = self.price, self.qty, self.f, self.l, self.time, self.bm
        a0 = self.first
        return [
            AggTrade(symbol, a0 + i, pr[i], qt[i], f[i], la[i], tm[i], bool(bm[i]))
            for i in range(lo, hi)
        ]


class _Sym:
    __slots__ = (
        "accs",
        "agg_id",
        "asks",
        "bids",
        "fair",
        "hist",
        "last_bbo",
        "lot",
        "np_rng",
        "rng",
        "spec",
        "step_u",
        "symbol",
        "tick",
        "trade_id",
        "update_id",
    )

    def __init__(self, spec: SymbolSpec, seed: int) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.tick = to_units(spec.tick_size)
        self.step_u = to_units(spec.step_size)
        self.lot = max(self.step_u, to_units(spec.lot_qty))
        self.rng = random.Random((seed << 32) ^ zlib.crc32(spec.symbol.encode()))
        self.bids = _Side(True)
        self.asks = _Side(False)
        self.update_id = 1_000_000 + self.rng.randrange(1_000_000)
        self.trade_id = 100_000 + self.rng.randrange(100_000)
        self.agg_id = 50_000 + self.rng.randrange(50_000)
        start = to_units(spec.start_price)
        self.fair = start - start % self.tick
        self.accs: dict[int, _DepthAcc] = {}
        self.hist = _AggHistory()
        self.np_rng = np.random.default_rng(
            [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, zlib.crc32(spec.symbol.encode())]
        )
        self.last_bbo: tuple[int, int, int, int] = (0, 0, 0, 0)


MIN_LEVELS = 12
MAX_LEVELS = 200


class Market:
    """All simulated symbols. See the module docstring for the calling contract."""

    def __init__(
        self,
        symbols: list[str],
        seed: int = 0,
        *,
        specs: Mapping[str, SymbolSpec] | None = None,
        history: int = 100_000,
        initial_levels: int = 40,
    ) -> None:
        if not symbols:
            raise ValueError("at least one symbol is required")
        self.symbols: list[str] = [s.upper() for s in symbols]
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"duplicate symbols in {symbols}")
        self.seed = seed
        self._history = history
        self._slack = max(1, history // 4)  # trim in big chunks: a memmove
        self._syms: dict[str, _Sym] = {}
        for sym in self.symbols:
            spec = (specs or {}).get(sym) or default_spec(sym)
            st = _Sym(spec, seed)
            self._init_book(st, initial_levels)
            st.accs = {speed: _DepthAcc() for speed in DEPTH_SPEEDS_MS}
            st.last_bbo = self._bbo(st)
            self._syms[sym] = st
        self._events: list[Event | TakerBatch] = []
        self._listeners: list[TradeListener] = []
        self._wakeup: Callable[[], None] | None = None
        self._notify: list[tuple[str, int, int, str, int]] = []

    # ---- venue-facing API --------------------------------------------------------------

    def symbol_info(self, symbol: str) -> dict[str, object]:
        """Trading rules as Decimals (the exchangeInfo filters)."""
        spec = self._sym(symbol).spec
        return {
            "symbol": spec.symbol,
            "base_asset": spec.base_asset,
            "quote_asset": spec.quote_asset,
            "tick_size": spec.tick_size,
            "step_size": spec.step_size,
            "min_qty": spec.min_qty,
            "max_qty": spec.max_qty,
            "min_notional": spec.min_notional,
            "max_notional": spec.max_notional,
            "min_price": spec.tick_size,
            "max_price": Decimal("1000000"),
        }

    def spec(self, symbol: str) -> SymbolSpec:
        return self._sym(symbol).spec

    def best(self, symbol: str) -> tuple[Decimal, Decimal, Decimal, Decimal]:
        """(bid price, bid qty, ask price, ask qty) as Decimals."""
        bp, bq, ap, aq = self.best_units(symbol)
        return (
            units_to_decimal(bp),
            units_to_decimal(bq),
            units_to_decimal(ap),
            units_to_decimal(aq),
        )

    def best_units(self, symbol: str) -> tuple[int, int, int, int]:
        return self._bbo(self._sym(symbol))

    def add_trade_listener(self, fn: TradeListener) -> None:
        """``fn(symbol, price, qty, taker_side, now_ms)`` for every trade made by the walk.

        Not called for :meth:`take` or :meth:`publish_trade` (their caller already knows).
        :meth:`step_batch` reports its prints coalesced per taker side and price (one call per
        price a batch traded at, with the summed quantity, in order of first print): a resting
        order sees the same liquidity, and a full-speed walk does not pay a Decimal call and
        a listener call per trade.
        """
        self._listeners.append(fn)

    def remove_trade_listener(self, fn: TradeListener) -> None:
        self._listeners.remove(fn)

    def set_wakeup(self, fn: Callable[[], None] | None) -> None:
        """Called when events appear outside :meth:`step` (take/publish_trade), so a shell can
        drain them promptly instead of at its next tick."""
        self._wakeup = fn

    def take(
        self,
        symbol: str,
        side: str,
        qty: Decimal,
        limit_price: Decimal | None,
        now_ms: int,
    ) -> list[tuple[Decimal, Decimal, int]]:
        """Consume book liquidity like any taker; returns fills ``(price, qty, trade_id)``.

        BUY takes asks priced <= ``limit_price`` (all if None), SELL takes bids >= it. The
        remainder is not rested (the venue keeps user orders itself). Public trade, aggTrade,
        depth and bookTicker events follow exactly as for a walk taker.
        """
        if side not in ("BUY", "SELL"):
            raise ValueError(f"side must be BUY or SELL, not {side!r}")
        st = self._sym(symbol)
        qty_u = to_units(qty)
        limit_u = None if limit_price is None else to_units(limit_price)
        fills = self._sweep(st, side == "BUY", qty_u, limit_u, now_ms, notify=False)
        self._refill(st)
        self._after_change(st)
        self._wake()
        return [(units_to_decimal(p), units_to_decimal(q), t) for p, q, t in fills]

    def publish_trade(
        self, symbol: str, price: Decimal, qty: Decimal, taker_side: str, now_ms: int
    ) -> int:
        """Print a public trade that does not touch the public book (e.g. the walk filled a
        resting user order the venue keeps). Returns its trade id."""
        st = self._sym(symbol)
        p, q = to_units(price), to_units(qty)
        t = st.trade_id
        st.trade_id += 1
        buyer_maker = taker_side == "SELL"
        self._events.append(Trade(st.symbol, t, p, q, now_ms, buyer_maker))
        self._add_agg(st, AggTrade(st.symbol, st.agg_id, p, q, t, t, now_ms, buyer_maker))
        self._wake()
        return t

    # ---- driving the walk ----------------------------------------------------------------

    def step(self, symbol: str, now_ms: int, n: int = 1) -> None:
        """Run ``n`` random walk actions on one symbol."""
        st = self._sym(symbol)
        for _ in range(n):
            self._walk_action(st, now_ms)
            self._refill(st)
            self._after_change(st)
            self._flush_notify()

    def step_batch(self, symbol: str, now_ms: int, takers: int) -> None:
        """Run one batch of the walk at one instant: makers and cancels, then ``takers`` taker
        orders, swept through the book with numpy instead of one Python loop per fill.

        This is how ``--rate max`` keeps ahead of any client: it is the same order book with
        the same rules (contiguous trade/agg/update ids, one aggTrade per taker order per price
        level, REST history, depth diffs and bookTicker consistent with the book), only
        generated a batch at a time. The makers all come first, then the takers in random
        order; bookTicker follows each taker order (not each maker order). The events land
        in :meth:`drain_raw` as one :class:`TakerBatch`.
        """
        st = self._sym(symbol)
        if takers <= 0:
            return
        rng = st.rng
        tick = st.tick
        # fair price: the walk's +-1 tick steps (15 % of ~3 actions per taker), summed
        st.fair += tick * round(rng.gauss(0.0, (0.45 * takers) ** 0.5))
        st.fair = max(st.fair, tick * 20)
        bids, asks = st.bids, st.asks
        self._make_batch(st, max(1, takers // 4))
        cancels = takers // 24  # a random order among the 15 best levels of a random side
        draws = st.np_rng.random((3, cancels)).tolist()
        for side_x, level_x, order_x in zip(*draws, strict=True):
            side = bids if side_x < 0.5 else asks
            depth = min(len(side.prices), 15)
            if depth:
                i = int(level_x * depth)
                price = side.prices[-1 - i] if side.is_bid else side.prices[i]
                orders = side.orders[price]
                if len(orders) == 1:
                    self._remove_level(st, side, price)
                else:
                    side.totals[price] -= orders.pop(int(order_x * len(orders)))
                    self._level_changed(st, side, price, side.totals[price])
        self._refill(st)
        self._after_change(st)
        self._take_batch(st, takers, now_ms)
        self._refill(st)
        self._after_change(st)
        self._flush_notify()

    def _make_batch(self, st: _Sym, n: int) -> None:
        """``n`` maker orders at once (the walk's distribution around the fair price): each is
        one book update; bids stay below a split price inside the spread and asks at or
        above it, so the book cannot cross."""
        bb, ba = st.bids.best(), st.asks.best()
        if bb is None or ba is None:
            return
        tick, step = st.tick, st.step_u
        nrng = st.np_rng
        split = min(max(st.fair, bb + tick), ba)
        is_bid = nrng.random(n) < 0.5
        d = np.minimum(nrng.exponential(1 / 0.35, n).astype(np.int64), 40)
        price = np.where(
            is_bid,
            np.minimum(st.fair - tick * d, split - tick),
            np.maximum(st.fair + tick * (d + 1), split),
        )
        lots = 1 + (nrng.exponential(1.0, n) * 2).astype(np.int64)
        qty = st.lot * lots // 2 + step * nrng.integers(1, 100, n)
        qty = np.maximum(qty - qty % step, step)
        ok = price > 0
        if not ok.all():
            is_bid, price, qty = is_bid[ok], price[ok], qty[ok]
        made = len(price)
        if not made:
            return
        u0 = st.update_id
        st.update_id = u0 + made
        for side, sel in ((st.bids, is_bid), (st.asks, ~is_bid)):
            px, qs = price[sel], qty[sel]
            if not len(px):
                continue
            order = np.argsort(px, kind="stable")  # keeps time priority within a price
            px, qs = px[order], qs[order]
            cut = np.flatnonzero(px[1:] != px[:-1]) + 1
            changed: dict[int, int] = {}
            for p, q in zip(px[np.append(0, cut)].tolist(), np.split(qs, cut), strict=True):
                ql = q.tolist()
                lst = side.orders.get(p)
                if lst is None:
                    side.orders[p] = ql
                    side.totals[p] = total = sum(ql)
                    bisect.insort(side.prices, p)
                else:
                    lst.extend(ql)
                    side.totals[p] = total = side.totals[p] + sum(ql)
                changed[p] = total
            for acc in st.accs.values():
                if acc.first == 0:
                    acc.first = u0 + 1
                acc.last = st.update_id
                (acc.bids if side.is_bid else acc.asks).update(changed)

    def _take_batch(self, st: _Sym, n: int, now_ms: int) -> None:
        """``n`` random taker orders against the current book, vectorised (see step_batch)."""
        bb0, bq0, ba0, aq0 = self._bbo(st)
        if not (bb0 and ba0):
            return
        nrng = st.np_rng
        tick = st.tick
        p_buy = 0.5 + max(-0.3, min(0.3, (2 * st.fair - bb0 - ba0) / (10 * tick)))
        is_buy = nrng.random(n) < p_buy
        lot_steps = max(1, st.lot // st.step_u)
        qty = (1 + nrng.exponential(0.2 * lot_steps, n).astype(np.int64)) * st.step_u
        qb, qs = qty[is_buy], qty[~is_buy]
        fa = _Flat(st.asks, int(qb.sum()))
        fb = _Flat(st.bids, int(qs.sum()))
        cum_b, cum_s = np.cumsum(qb), np.cumsum(qs)
        ok_b, ok_s = cum_b <= fa.cap, cum_s <= fb.cap
        if not (ok_b.all() and ok_s.all()):  # not enough book: drop the takers that find none
            keep = np.empty(n, np.bool_)
            keep[is_buy] = ok_b
            keep[~is_buy] = ok_s
            is_buy, qty = is_buy[keep], qty[keep]
            cum_b, cum_s = cum_b[ok_b], cum_s[ok_s]
            n = len(is_buy)
            if n == 0:
                return
        buy_pos = np.flatnonzero(is_buy)
        sell_pos = np.flatnonzero(~is_buy)
        # fills: the union of taker and maker-order boundaries cuts each side's consumed
        # quantity into (taker, maker order) pieces = trades
        parts_gk: list[I64] = []
        parts_q: list[I64] = []
        parts_px: list[I64] = []
        for cum_t, pos, fl in ((cum_b, buy_pos, fa), (cum_s, sell_pos, fb)):
            if not len(cum_t):
                continue
            total = cum_t[-1]
            # two sorted runs: a stable sort merges them in linear time (timsort)
            edges = np.concatenate((cum_t, fl.cum[: np.searchsorted(fl.cum, total)]))
            edges.sort(kind="stable")
            if len(edges) > 1:
                edges = edges[np.append(True, edges[1:] != edges[:-1])]
            parts_q.append(np.diff(edges, prepend=0))
            parts_gk.append(pos[np.searchsorted(cum_t, edges)])
            parts_px.append(fl.prices[fl.lv_of[np.searchsorted(fl.cum, edges)]])
        gk = np.concatenate(parts_gk)
        order = np.argsort(gk, kind="stable")
        gk = gk[order]
        t_q = np.concatenate(parts_q)[order]
        t_px = np.concatenate(parts_px)[order]
        t_bm = ~is_buy[gk]
        n_t = len(gk)
        new = np.ones(n_t, np.bool_)
        new[1:] = (gk[1:] != gk[:-1]) | (t_px[1:] != t_px[:-1])
        starts = np.flatnonzero(new)
        n_a = len(starts)
        t0, a0, u0 = st.trade_id, st.agg_id, st.update_id
        a_taker = gk[starts]
        a_f = starts + t0
        a_l = np.append(starts[1:], n_t) + (t0 - 1)
        a_qty = np.add.reduceat(t_q, starts)
        a_px = t_px[starts]
        a_bm = t_bm[starts]
        # book ticker after each taker order: each side's state after its own last taker
        bt_u = np.cumsum(np.bincount(a_taker, minlength=n)) + u0
        nb = np.cumsum(is_buy) - 1
        ns = np.cumsum(~is_buy) - 1
        if len(cum_b):
            k = np.searchsorted(fa.cum, cum_b, side="right")
            lv = fa.lv_of[k]
            ask_px = np.where(nb >= 0, fa.prices[lv][nb], ba0)
            ask_q = np.where(nb >= 0, (fa.lv_end[lv] - cum_b)[nb], aq0)
        else:
            ask_px, ask_q = np.full(n, ba0, np.int64), np.full(n, aq0, np.int64)
        if len(cum_s):
            k = np.searchsorted(fb.cum, cum_s, side="right")
            lv = fb.lv_of[k]
            bid_px = np.where(ns >= 0, fb.prices[lv][ns], bb0)
            bid_q = np.where(ns >= 0, (fb.lv_end[lv] - cum_s)[ns], bq0)
        else:
            bid_px, bid_q = np.full(n, bb0, np.int64), np.full(n, bq0, np.int64)
        # apply to the book (only the levels reached), then the bookkeeping
        changed_a = self._consume(st.asks, fa, int(cum_b[-1]) if len(cum_b) else 0)
        changed_b = self._consume(st.bids, fb, int(cum_s[-1]) if len(cum_s) else 0)
        st.trade_id = t0 + n_t
        st.agg_id = a0 + n_a
        st.update_id = u0 + n_a  # one book update per aggTrade (taker x price level)
        for acc in st.accs.values():
            if acc.first == 0:
                acc.first = u0 + 1
            acc.last = st.update_id
            acc.asks.update(changed_a)
            acc.bids.update(changed_b)
        st.last_bbo = (int(bid_px[-1]), int(bid_q[-1]), int(ask_px[-1]), int(ask_q[-1]))
        hist = st.hist
        hist.extend(a0, a_px, a_qty, a_f, a_l, now_ms, a_bm)
        if len(hist) > self._history + self._slack:
            hist.trim(self._history)
        self._events.append(
            TakerBatch(
                st.symbol,
                now_ms,
                t0,
                (t_px, t_q, t_bm),
                a0,
                (a_px, a_qty, a_f, a_l, a_bm, a_taker),
                (bt_u, bid_px, bid_q, ask_px, ask_q),
            )
        )
        if self._listeners:
            # one print per taker side and price for the whole batch (see add_trade_listener)
            keys, first, inv = np.unique(a_px * 2 + a_bm, return_index=True, return_inverse=True)
            sums = np.zeros(len(keys), np.int64)
            np.add.at(sums, inv, a_qty)
            order = np.argsort(first)
            sym = st.symbol
            self._notify.extend(
                (sym, k >> 1, q, "SELL" if k & 1 else "BUY", now_ms)
                for k, q in zip(keys[order].tolist(), sums[order].tolist(), strict=True)
            )

    @staticmethod
    def _consume(side: _Side, fl: _Flat, used: int) -> dict[int, int]:
        """Take ``used`` from the front of a flattened side; returns {price: new total}."""
        if used <= 0:
            return {}
        k = int(np.searchsorted(fl.cum, used, side="right"))  # first order not fully used
        lv = int(fl.lv_of[k])
        gone = fl.prices[:lv].tolist()
        changed = dict.fromkeys(gone, 0)
        for p in gone:
            del side.orders[p]
            del side.totals[p]
        if gone:
            if side.is_bid:
                del side.prices[len(side.prices) - len(gone) :]
            else:
                del side.prices[: len(gone)]
        before = int(fl.cum[k - 1]) if k else 0  # consumed before order k
        if used > (int(fl.lv_end[lv - 1]) if lv else 0):  # level lv partly used
            p = int(fl.prices[lv])
            rest = side.orders[p][k - fl.lv_first[lv] :]
            rest[0] -= used - before
            side.orders[p] = rest
            side.totals[p] = total = int(fl.lv_end[lv]) - used
            changed[p] = total
        return changed

    def _flush_notify(self) -> None:
        if self._notify:
            # listeners run once the book is consistent again (they may call take())
            pending, self._notify = self._notify, []
            for sym, p, q, side, t in pending:
                dp, dq = units_to_decimal(p), units_to_decimal(q)
                for fn in self._listeners:
                    fn(sym, dp, dq, side, t)

    def drain_events(self) -> list[Event]:
        """Real-time events since the last drain, in order. The caller owns the list."""
        out: list[Event] = []
        for e in self.drain_raw():
            if isinstance(e, TakerBatch):
                out.extend(e.events())
            else:
                out.append(e)
        return out

    def drain_raw(self) -> list[Event | TakerBatch]:
        """Like :meth:`drain_events` but :meth:`step_batch` output stays one
        :class:`TakerBatch` (the shell encodes its columns directly)."""
        out = self._events
        self._events = []
        return out

    def flush_depth(self, symbol: str, speed_ms: int, now_ms: int) -> DepthUpdate | None:
        """The diff-depth event for one speed covering all updates since its last flush."""
        st = self._sym(symbol)
        acc = st.accs[speed_ms]
        if acc.first == 0:
            return None
        ev = DepthUpdate(
            st.symbol,
            speed_ms,
            now_ms,
            acc.first,
            acc.last,
            sorted(acc.bids.items(), reverse=True),
            sorted(acc.asks.items()),
        )
        st.accs[speed_ms] = _DepthAcc()
        return ev

    def last_update_id(self, symbol: str) -> int:
        return self._sym(symbol).update_id

    def next_agg_id(self, symbol: str) -> int:
        """The id the next aggregate trade of ``symbol`` will get: the difference over a call
        is how many aggTrade messages it printed (how ``--rate-unit msgs`` keeps its count)."""
        return self._sym(symbol).agg_id

    def next_trade_id(self, symbol: str) -> int:
        """The id the next trade (``@trade`` stream ``t``) of ``symbol`` will get."""
        return self._sym(symbol).trade_id

    def top(self, symbol: str, n: int) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
        """(lastUpdateId, n best bids, n best asks) in units, best first."""
        st = self._sym(symbol)
        bids = [(p, st.bids.totals[p]) for p in st.bids.from_best(n)]
        asks = [(p, st.asks.totals[p]) for p in st.asks.from_best(n)]
        return st.update_id, bids, asks

    def depth_snapshot(self, symbol: str, limit: int = 100) -> dict[str, object]:
        """REST /api/v3/depth body: consistent with the diff stream at ``lastUpdateId``."""
        uid, bids, asks = self.top(symbol, limit)
        return {
            "lastUpdateId": uid,
            "bids": [[fmt_units(p), fmt_units(q)] for p, q in bids],
            "asks": [[fmt_units(p), fmt_units(q)] for p, q in asks],
        }

    def agg_trades(
        self,
        symbol: str,
        *,
        from_id: int | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        limit: int = 500,
    ) -> list[AggTrade]:
        """Aggregate trades from the retained history (the newest ``history`` per symbol).

        With ``from_id``: ids >= from_id (an id older than the history starts at the oldest
        retained one). With start/end time: T within [start, end]. Neither: the newest ``limit``.
        """
        st = self._sym(symbol)
        hist = st.hist
        n = len(hist)
        if not n:
            return []
        if from_id is not None:
            lo = max(0, from_id - hist.first)
            out = hist.objects(st.symbol, lo, lo + limit)
            if end_time is not None:
                out = [a for a in out if a.time <= end_time]
            return out
        if start_time is not None or end_time is not None:
            times = hist.time
            lo = 0 if start_time is None else bisect.bisect_left(times, start_time)
            hi = n if end_time is None else bisect.bisect_right(times, end_time)
            if start_time is None:
                lo = max(lo, hi - limit)
            return hist.objects(st.symbol, lo, min(hi, lo + limit))
        return hist.objects(st.symbol, n - limit, n)

    def check_invariants(self, symbol: str) -> None:
        """Raise AssertionError if the book is crossed or its bookkeeping is inconsistent."""
        st = self._sym(symbol)
        for side in (st.bids, st.asks):
            assert side.prices == sorted(set(side.prices)), "price list not sorted/unique"
            assert set(side.prices) == set(side.orders) == set(side.totals)
            for p in side.prices:
                assert side.orders[p], "empty level"
                assert all(q > 0 for q in side.orders[p]), "non-positive order"
                assert sum(side.orders[p]) == side.totals[p], "level total"
                assert p > 0, "price <= 0"
                assert p % st.tick == 0, "price off tick"
        bb, ba = st.bids.best(), st.asks.best()
        assert bb is not None, "empty bid side"
        assert ba is not None, "empty ask side"
        assert bb < ba, f"crossed book {bb} >= {ba}"

    # ---- internals -------------------------------------------------------------------------

    def _sym(self, symbol: str) -> _Sym:
        try:
            return self._syms[symbol.upper()]
        except KeyError:
            raise KeyError(f"unknown symbol {symbol!r}") from None

    def _wake(self) -> None:
        if self._wakeup is not None and self._events:
            self._wakeup()

    def _init_book(self, st: _Sym, levels: int) -> None:
        rng = st.rng
        for i in range(levels):
            off = st.tick * (i + 1)
            for side, price in ((st.bids, st.fair - off), (st.asks, st.fair + off)):
                for _ in range(rng.randint(1, 3)):
                    self._add_order(st, side, price, self._maker_qty(st))

    def _maker_qty(self, st: _Sym) -> int:
        lots = 1 + int(st.rng.expovariate(1.0) * 2)
        q = st.lot * lots // 2 + st.step_u * st.rng.randrange(1, 100)
        return max(st.step_u, q - q % st.step_u)

    def _bbo(self, st: _Sym) -> tuple[int, int, int, int]:
        bb, ba = st.bids.best(), st.asks.best()
        return (
            bb or 0,
            st.bids.totals[bb] if bb is not None else 0,
            ba or 0,
            st.asks.totals[ba] if ba is not None else 0,
        )

    def _level_changed(self, st: _Sym, side: _Side, price: int, total: int) -> None:
        st.update_id += 1
        uid = st.update_id
        for acc in st.accs.values():
            if acc.first == 0:
                acc.first = uid
            acc.last = uid
            (acc.bids if side.is_bid else acc.asks)[price] = total

    def _add_order(self, st: _Sym, side: _Side, price: int, qty: int) -> None:
        orders = side.orders.get(price)
        if orders is None:
            side.orders[price] = [qty]
            side.totals[price] = qty
            bisect.insort(side.prices, price)
        else:
            orders.append(qty)
            side.totals[price] += qty
        self._level_changed(st, side, price, side.totals[price])

    def _remove_level(self, st: _Sym, side: _Side, price: int) -> None:
        del side.orders[price]
        del side.totals[price]
        side.prices.pop(bisect.bisect_left(side.prices, price))
        self._level_changed(st, side, price, 0)

    def _sweep(
        self,
        st: _Sym,
        buy: bool,
        qty: int,
        limit: int | None,
        now_ms: int,
        notify: bool,
    ) -> list[tuple[int, int, int]]:
        book = st.asks if buy else st.bids
        fills: list[tuple[int, int, int]] = []
        buyer_maker = not buy
        events = self._events
        while qty > 0 and book.prices:
            price = book.prices[0] if buy else book.prices[-1]
            if limit is not None and (price > limit if buy else price < limit):
                break
            orders = book.orders[price]
            first_t = st.trade_id
            level_qty = 0
            while qty > 0 and orders:
                fill = min(qty, orders[0])
                qty -= fill
                level_qty += fill
                if fill == orders[0]:
                    orders.pop(0)
                else:
                    orders[0] -= fill
                t = st.trade_id
                st.trade_id += 1
                fills.append((price, fill, t))
                events.append(Trade(st.symbol, t, price, fill, now_ms, buyer_maker))
            self._add_agg(
                st,
                AggTrade(
                    st.symbol,
                    st.agg_id,
                    price,
                    level_qty,
                    first_t,
                    st.trade_id - 1,
                    now_ms,
                    buyer_maker,
                ),
            )
            if orders:
                book.totals[price] -= level_qty
                self._level_changed(st, book, price, book.totals[price])
            else:
                self._remove_level(st, book, price)
        if notify and self._listeners and fills:
            side = "BUY" if buy else "SELL"
            self._notify.extend((st.symbol, p, q, side, now_ms) for p, q, _t in fills)
        return fills

    def _add_agg(self, st: _Sym, agg: AggTrade) -> None:
        st.agg_id += 1
        self._events.append(agg)
        hist = st.hist
        hist.append(agg.a, agg.price, agg.qty, agg.f, agg.l, agg.time, agg.buyer_maker)
        if len(hist) > self._history + self._slack:  # trim in chunks: O(1) amortised
            hist.trim(self._history)

    def _walk_action(self, st: _Sym, now_ms: int) -> None:
        rng = st.rng
        if rng.random() < 0.15:
            st.fair += st.tick if rng.random() < 0.5 else -st.tick
            st.fair = max(st.fair, st.tick * 20)
        bb, ba = st.bids.best(), st.asks.best()
        assert bb is not None
        assert ba is not None
        r = rng.random()
        if r < 0.3:
            # taker: leans towards the fair price so the walk follows it
            mid2 = bb + ba
            p_buy = 0.5 + max(-0.3, min(0.3, (2 * st.fair - mid2) / (10 * st.tick)))
            buy = rng.random() < p_buy
            lots = 1 + int(rng.expovariate(1.0) * 1.5)
            qty = st.lot * lots // 2 + st.step_u * rng.randrange(1, 50)
            qty -= qty % st.step_u
            self._sweep(st, buy, max(qty, st.step_u), None, now_ms, notify=True)
        elif r < 0.75:
            d = min(int(rng.expovariate(0.35)), 40)
            if rng.random() < 0.5:
                price = min(st.fair - st.tick * d, ba - st.tick)
                side = st.bids
            else:
                price = max(st.fair + st.tick * (d + 1), bb + st.tick)
                side = st.asks
            if price > 0:
                self._add_order(st, side, price, self._maker_qty(st))
        else:
            side = st.bids if rng.random() < 0.5 else st.asks
            depth = min(len(side.prices), 15)
            if depth:
                price = side.from_best(depth)[rng.randrange(depth)]
                orders = side.orders[price]
                i = rng.randrange(len(orders))
                if len(orders) == 1:
                    self._remove_level(st, side, price)
                else:
                    side.totals[price] -= orders.pop(i)
                    self._level_changed(st, side, price, side.totals[price])

    def _refill(self, st: _Sym) -> None:
        """Keep both sides at least MIN_LEVELS deep and at most MAX_LEVELS, never crossed."""
        for side in (st.bids, st.asks):
            while len(side.prices) < MIN_LEVELS:
                worst = side.worst()
                gap = st.tick * st.rng.randint(1, 3)
                if worst is None:
                    other = (st.asks if side.is_bid else st.bids).best()
                    ref = st.fair if other is None else other
                    price = ref - gap if side.is_bid else ref + gap
                else:
                    price = worst - gap if side.is_bid else worst + gap
                if price <= 0:
                    break
                self._add_order(st, side, price, self._maker_qty(st))
            while len(side.prices) > MAX_LEVELS:
                worst = side.worst()
                assert worst is not None
                self._remove_level(st, side, worst)

    def _after_change(self, st: _Sym) -> None:
        bbo = self._bbo(st)
        if bbo != st.last_bbo:
            st.last_bbo = bbo
            self._events.append(BookTicker(st.symbol, st.update_id, *bbo))
