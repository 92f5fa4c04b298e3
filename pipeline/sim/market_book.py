"""One simulated symbol's order book and bookkeeping: price levels, ids, depth diffs, history.

Why apart from the walk and the coordinator: these are the exchange's rules (contiguous trade,
aggTrade and update ids; one aggTrade per taker order per price level; every level change takes
the next update id and lands in each diff-depth speed's accumulator; a bookTicker when the best
levels change), whoever drives the book: the per-action walk (:mod:`pipeline.sim.market_walk`),
the batched walk (:mod:`pipeline.sim.market_batch`) or a venue taker
(:meth:`pipeline.sim.market.Market.take`). Pure, integers in 1e-8 units, times in ms.

Events go to the ``events`` list the caller passes (the :class:`~pipeline.sim.market.Market`
queue) rather than one stored here: the coordinator swaps its queue on every drain.
"""

from __future__ import annotations

import bisect
import random
import zlib
from array import array

import numpy as np
import numpy.typing as npt

from pipeline.sim.market_events import (
    AggTrade,
    BookTicker,
    DepthUpdate,
    Event,
    TakerBatch,
    Trade,
)
from pipeline.sim.market_specs import SymbolSpec
from pipeline.sim.trade_history import TradeHistory
from pipeline.sim.units import to_units

MIN_LEVELS = 12
MAX_LEVELS = 200

#: what the market queues for the shell, in wire order
EventQueue = list[Event | TakerBatch]
#: pending trade-listener calls: (symbol, price units, qty units, taker side, time ms)
Notification = tuple[str, int, int, str, int]


class DepthAcc:
    """Changed levels since the last flush of one diff-depth speed."""

    __slots__ = ("asks", "bids", "first", "last")

    def __init__(self) -> None:
        self.first = 0  # 0 = nothing pending
        self.last = 0
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}


class BookSide:
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


class AggHistory:
    """The retained aggregate trades of one symbol as compact columns (``array('q')``).

    Ids are contiguous, so ``a`` is implicit (``first`` + index). A walk at full speed makes
    hundreds of thousands of aggTrades a second: a column append costs far less than an object,
    and REST builds its few hundred :class:`AggTrade` objects only when asked. It keeps the
    newest ``keep`` and trims in big chunks (a memmove, O(1) amortised) once a quarter more
    have piled up.
    """

    __slots__ = ("bm", "f", "first", "keep", "l", "limit", "price", "qty", "time")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.limit = keep + max(1, keep // 4)
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
        if len(self.price) > self.limit:
            self.trim(self.keep)

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
        if len(self.price) > self.limit:
            self.trim(self.keep)

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

    def select(
        self,
        symbol: str,
        from_id: int | None,
        start_time: int | None,
        end_time: int | None,
        limit: int,
    ) -> list[AggTrade]:
        """The REST aggTrades query over the retained history
        (see :meth:`pipeline.sim.market.Market.agg_trades`)."""
        n = len(self.price)
        if not n:
            return []
        if from_id is not None:
            lo = max(0, from_id - self.first)
            out = self.objects(symbol, lo, lo + limit)
            if end_time is not None:
                out = [a for a in out if a.time <= end_time]
            return out
        if start_time is not None or end_time is not None:
            times = self.time
            lo = 0 if start_time is None else bisect.bisect_left(times, start_time)
            hi = n if end_time is None else bisect.bisect_right(times, end_time)
            if start_time is None:
                lo = max(lo, hi - limit)
            return self.objects(symbol, lo, min(hi, lo + limit))
        return self.objects(symbol, n - limit, n)


class SymbolBook:
    """Everything simulated for one symbol: its rules, the book, the next ids, the diff-depth
    accumulators, the aggTrade history and the walk's seeded random state."""

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
        "trades",
        "update_id",
    )

    def __init__(self, spec: SymbolSpec, seed: int, history: int) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.tick = to_units(spec.tick_size)
        self.step_u = to_units(spec.step_size)
        self.lot = max(self.step_u, to_units(spec.lot_qty))
        self.rng = random.Random((seed << 32) ^ zlib.crc32(spec.symbol.encode()))
        self.bids = BookSide(True)
        self.asks = BookSide(False)
        self.update_id = 1_000_000 + self.rng.randrange(1_000_000)
        self.trade_id = 100_000 + self.rng.randrange(100_000)
        self.agg_id = 50_000 + self.rng.randrange(50_000)
        start = to_units(spec.start_price)
        self.fair = start - start % self.tick
        # empty until the initial book is built: its levels are not a diff
        self.accs: dict[int, DepthAcc] = {}
        self.hist = AggHistory(history)
        self.trades = TradeHistory(history)  # each fill, for REST historicalTrades
        self.np_rng = np.random.default_rng(
            [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, zlib.crc32(spec.symbol.encode())]
        )
        self.last_bbo: tuple[int, int, int, int] = (0, 0, 0, 0)

    # ---- reading -----------------------------------------------------------------------

    def bbo(self) -> tuple[int, int, int, int]:
        """(bid px, bid qty, ask px, ask qty) in units; 0s for an empty side."""
        bb, ba = self.bids.best(), self.asks.best()
        return (
            bb or 0,
            self.bids.totals[bb] if bb is not None else 0,
            ba or 0,
            self.asks.totals[ba] if ba is not None else 0,
        )

    def top(self, n: int) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
        """(lastUpdateId, n best bids, n best asks) in units, best first."""
        bids = [(p, self.bids.totals[p]) for p in self.bids.from_best(n)]
        asks = [(p, self.asks.totals[p]) for p in self.asks.from_best(n)]
        return self.update_id, bids, asks

    def flush_depth(self, speed_ms: int, now_ms: int) -> DepthUpdate | None:
        """The diff-depth event for one speed covering all updates since its last flush."""
        acc = self.accs[speed_ms]
        if acc.first == 0:
            return None
        ev = DepthUpdate(
            self.symbol,
            speed_ms,
            now_ms,
            acc.first,
            acc.last,
            sorted(acc.bids.items(), reverse=True),
            sorted(acc.asks.items()),
        )
        self.accs[speed_ms] = DepthAcc()
        return ev

    def check_invariants(self) -> None:
        """Raise AssertionError if the book is crossed or its bookkeeping is inconsistent."""
        for side in (self.bids, self.asks):
            assert side.prices == sorted(set(side.prices)), "price list not sorted/unique"
            assert set(side.prices) == set(side.orders) == set(side.totals)
            for p in side.prices:
                assert side.orders[p], "empty level"
                assert all(q > 0 for q in side.orders[p]), "non-positive order"
                assert sum(side.orders[p]) == side.totals[p], "level total"
                assert p > 0, "price <= 0"
                assert p % self.tick == 0, "price off tick"
        bb, ba = self.bids.best(), self.asks.best()
        assert bb is not None, "empty bid side"
        assert ba is not None, "empty ask side"
        assert bb < ba, f"crossed book {bb} >= {ba}"

    # ---- changing the book (one update id per level change) -----------------------------

    def level_changed(self, side: BookSide, price: int, total: int) -> None:
        self.update_id += 1
        uid = self.update_id
        for acc in self.accs.values():
            if acc.first == 0:
                acc.first = uid
            acc.last = uid
            (acc.bids if side.is_bid else acc.asks)[price] = total

    def add_order(self, side: BookSide, price: int, qty: int) -> None:
        orders = side.orders.get(price)
        if orders is None:
            side.orders[price] = [qty]
            side.totals[price] = qty
            bisect.insort(side.prices, price)
        else:
            orders.append(qty)
            side.totals[price] += qty
        self.level_changed(side, price, side.totals[price])

    def remove_level(self, side: BookSide, price: int) -> None:
        del side.orders[price]
        del side.totals[price]
        side.prices.pop(bisect.bisect_left(side.prices, price))
        self.level_changed(side, price, 0)

    def sweep(
        self,
        buy: bool,
        qty: int,
        limit: int | None,
        now_ms: int,
        events: EventQueue,
        notify: list[Notification] | None,
    ) -> list[tuple[int, int, int]]:
        """One taker order against the book; returns fills ``(price, qty, trade_id)``.

        Appends its trades and one aggTrade per price level to ``events``, and one entry per
        fill to ``notify`` unless that is None (no listeners, or a taker whose caller knows)."""
        book = self.asks if buy else self.bids
        fills: list[tuple[int, int, int]] = []
        buyer_maker = not buy
        while qty > 0 and book.prices:
            price = book.prices[0] if buy else book.prices[-1]
            if limit is not None and (price > limit if buy else price < limit):
                break
            orders = book.orders[price]
            first_t = self.trade_id
            level_qty = 0
            while qty > 0 and orders:
                fill = min(qty, orders[0])
                qty -= fill
                level_qty += fill
                if fill == orders[0]:
                    orders.pop(0)
                else:
                    orders[0] -= fill
                t = self.trade_id
                self.trade_id += 1
                fills.append((price, fill, t))
                events.append(Trade(self.symbol, t, price, fill, now_ms, buyer_maker))
                self.trades.append(t, price, fill, now_ms, buyer_maker)
            self.add_agg(
                AggTrade(
                    self.symbol,
                    self.agg_id,
                    price,
                    level_qty,
                    first_t,
                    self.trade_id - 1,
                    now_ms,
                    buyer_maker,
                ),
                events,
            )
            if orders:
                book.totals[price] -= level_qty
                self.level_changed(book, price, book.totals[price])
            else:
                self.remove_level(book, price)
        if notify is not None and fills:
            side = "BUY" if buy else "SELL"
            notify.extend((self.symbol, p, q, side, now_ms) for p, q, _t in fills)
        return fills

    def add_agg(self, agg: AggTrade, events: EventQueue) -> None:
        """Publish one aggTrade (the next id) and retain it for REST."""
        self.agg_id += 1
        events.append(agg)
        self.hist.append(agg.a, agg.price, agg.qty, agg.f, agg.l, agg.time, agg.buyer_maker)

    def after_change(self, events: EventQueue) -> None:
        """A bookTicker if the best levels differ from the last one published."""
        bbo = self.bbo()
        if bbo != self.last_bbo:
            self.last_bbo = bbo
            events.append(BookTicker(self.symbol, self.update_id, *bbo))
