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

Where each part lives (one idea per module; every name is importable from here too):
:mod:`~pipeline.sim.units` (1e-8 units <-> strings/Decimals), :mod:`~pipeline.sim.market_specs`
(:class:`SymbolSpec`), :mod:`~pipeline.sim.market_events` (the event classes and
:class:`TakerBatch`), :mod:`~pipeline.sim.market_payloads` (``encode_*``),
:mod:`~pipeline.sim.market_book` (one symbol's book and id bookkeeping),
:mod:`~pipeline.sim.market_walk` (the seeded per-action walk) and
:mod:`~pipeline.sim.market_batch` (the numpy batch walk). :class:`Market` coordinates them: it
owns the symbols, the event queue and the trade listeners.

Prices and quantities are integers in units of 1e-8 inside (Binance publishes 8 decimals), so
``"60000.01000000"`` is ``6000001000000``. Decimals appear only at the venue-facing API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal

from pipeline.binance.filters import SymbolRules
from pipeline.sim.market_batch import make_and_cancel, take_batch
from pipeline.sim.market_book import (
    MAX_LEVELS,
    MIN_LEVELS,
    DepthAcc,
    EventQueue,
    Notification,
    SymbolBook,
)
from pipeline.sim.market_events import (
    DEPTH_SPEEDS_MS,
    PARTIAL_LEVELS,
    AggTrade,
    BookTicker,
    DepthUpdate,
    Event,
    TakerBatch,
    Trade,
)
from pipeline.sim.market_payloads import (
    encode_agg_trade,
    encode_book_ticker,
    encode_depth_diff,
    encode_event,
    encode_partial_depth,
    encode_trade,
)
from pipeline.sim.market_specs import QUOTE_ASSETS, SymbolSpec, default_spec
from pipeline.sim.market_walk import init_book, refill, walk_action
from pipeline.sim.units import SCALE, fmt_units, to_units, units_to_decimal

__all__ = [
    "DEPTH_SPEEDS_MS",
    "MAX_LEVELS",
    "MIN_LEVELS",
    "PARTIAL_LEVELS",
    "QUOTE_ASSETS",
    "SCALE",
    "AggTrade",
    "BookTicker",
    "DepthUpdate",
    "Event",
    "Market",
    "SymbolSpec",
    "TakerBatch",
    "Trade",
    "TradeListener",
    "default_spec",
    "encode_agg_trade",
    "encode_book_ticker",
    "encode_depth_diff",
    "encode_event",
    "encode_partial_depth",
    "encode_trade",
    "fmt_units",
    "to_units",
    "units_to_decimal",
]

TradeListener = Callable[[str, Decimal, Decimal, str, int], None]


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
        self._syms: dict[str, SymbolBook] = {}
        for sym in self.symbols:
            spec = (specs or {}).get(sym) or default_spec(sym)
            st = SymbolBook(spec, seed, history)
            init_book(st, initial_levels)
            st.accs = {speed: DepthAcc() for speed in DEPTH_SPEEDS_MS}
            st.last_bbo = st.bbo()
            self._syms[sym] = st
        self._events: EventQueue = []
        self._listeners: list[TradeListener] = []
        self._wakeup: Callable[[], None] | None = None
        self._notify: list[Notification] = []

    # ---- venue-facing API --------------------------------------------------------------

    def symbol_info(self, symbol: str) -> dict[str, object]:
        """Trading rules as Decimals (the exchangeInfo filters), for a quick look by name."""
        r = self._sym(symbol).spec.rules
        return {
            "symbol": r.symbol,
            "status": r.status,
            "base_asset": r.base_asset,
            "quote_asset": r.quote_asset,
            "tick_size": r.tick_size,
            "step_size": r.step_size,
            "min_qty": r.min_qty,
            "max_qty": r.max_qty,
            "min_notional": r.min_notional,
            "max_notional": r.max_notional,
            "min_price": r.min_price,
            "max_price": r.max_price,
        }

    def rules(self, symbol: str) -> SymbolRules:
        """The symbol's rules: what exchangeInfo advertises and the venue enforces."""
        return self._sym(symbol).spec.rules

    def set_status(self, symbol: str, status: str) -> SymbolRules:
        """Change a symbol's status (TRADING, CANCEL_ONLY, ...); returns the new rules.

        Raises :class:`~pipeline.binance.filters.RulesError` for a status Binance does not
        document. The book keeps walking: a status is a rule for orders, not for the market."""
        book = self._sym(symbol)
        book.spec = book.spec.with_status(status)
        return book.spec.rules

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
        return self._sym(symbol).bbo()

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
        fills = st.sweep(side == "BUY", qty_u, limit_u, now_ms, self._events, None)
        refill(st)
        st.after_change(self._events)
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
        st.trades.append(t, p, q, now_ms, buyer_maker)
        st.add_agg(AggTrade(st.symbol, st.agg_id, p, q, t, t, now_ms, buyer_maker), self._events)
        self._wake()
        return t

    # ---- driving the walk ----------------------------------------------------------------

    def step(self, symbol: str, now_ms: int, n: int = 1) -> None:
        """Run ``n`` random walk actions on one symbol."""
        st = self._sym(symbol)
        for _ in range(n):
            walk_action(st, now_ms, self._events, self._notify if self._listeners else None)
            refill(st)
            st.after_change(self._events)
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
        make_and_cancel(st, takers)
        refill(st)
        st.after_change(self._events)
        take_batch(st, takers, now_ms, self._events, self._notify if self._listeners else None)
        refill(st)
        st.after_change(self._events)
        self._flush_notify()

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
        return self._sym(symbol).flush_depth(speed_ms, now_ms)

    def add_depth_speed(self, speed_ms: int) -> None:
        """Accumulate diff depth for one more speed from now on (the SBE endpoint's 20 ms
        ``@depth``): its events take the same update ids as every other speed's."""
        for st in self._syms.values():
            st.accs.setdefault(speed_ms, DepthAcc())

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
        return self._sym(symbol).top(n)

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
        return st.hist.select(st.symbol, from_id, start_time, end_time, limit)

    def historical_trades(self, symbol: str, from_id: int | None, limit: int,
                          time_mult: int = 1) -> list[dict[str, object]]:
        """REST ``historicalTrades`` rows from the retained individual trades
        (:meth:`pipeline.sim.trade_history.TradeHistory.rows`)."""
        return self._sym(symbol).trades.rows(from_id, limit, time_mult)

    def check_invariants(self, symbol: str) -> None:
        """Raise AssertionError if the book is crossed or its bookkeeping is inconsistent."""
        self._sym(symbol).check_invariants()

    # ---- internals -------------------------------------------------------------------------

    def _sym(self, symbol: str) -> SymbolBook:
        try:
            return self._syms[symbol.upper()]
        except KeyError:
            raise KeyError(f"unknown symbol {symbol!r}") from None

    def _wake(self) -> None:
        if self._wakeup is not None and self._events:
            self._wakeup()
