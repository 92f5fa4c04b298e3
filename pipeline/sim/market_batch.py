"""The batched random walk: ``--rate max``'s way of outrunning any client.

Why a module of its own: it is the same order book with the same rules as the per-action walk
(:mod:`pipeline.sim.market_walk`; contiguous trade/agg/update ids, one aggTrade per taker order
per price level, REST history, depth diffs and bookTicker consistent with the book), only
generated a batch at a time with numpy: makers and cancels first, then many taker orders swept
through a flattened copy of the best levels at once, their prints kept as one
:class:`~pipeline.sim.market_events.TakerBatch` of columns. This is the simulator's hot path
(benchmarks/bench_sim.py): work here is per batch, never a Python call per print.
Randomness comes from the symbol's ``np_rng`` (and ``rng`` for the fair price).
"""

from __future__ import annotations

import bisect

import numpy as np

from pipeline.sim.market_book import BookSide, EventQueue, Notification, SymbolBook
from pipeline.sim.market_events import I64, TakerBatch


class FlatSide:
    """The best levels of one book side flattened for a vectorised sweep.

    ``cum`` is the cumulative quantity over the orders in priority order; ``lv_end`` the same at
    the end of each level. The last level is never consumed (``cap`` stops before it), so the
    best price after any taker order is always known; at most half the levels are offered, so
    one batch cannot empty a side."""

    __slots__ = ("cap", "cum", "lv_end", "lv_first", "lv_of", "prices")

    def __init__(self, side: BookSide, need: int) -> None:
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


def make_and_cancel(st: SymbolBook, takers: int) -> None:
    """The non-taker part of a batch of ``takers``: the fair price's drift, ``takers // 4``
    maker orders and ``takers // 24`` cancels (the walk's mix of actions)."""
    rng = st.rng
    tick = st.tick
    # fair price: the walk's +-1 tick steps (15 % of ~3 actions per taker), summed
    st.fair += tick * round(rng.gauss(0.0, (0.45 * takers) ** 0.5))
    st.fair = max(st.fair, tick * 20)
    bids, asks = st.bids, st.asks
    make_batch(st, max(1, takers // 4))
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
                st.remove_level(side, price)
            else:
                side.totals[price] -= orders.pop(int(order_x * len(orders)))
                st.level_changed(side, price, side.totals[price])


def make_batch(st: SymbolBook, n: int) -> None:
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


def take_batch(
    st: SymbolBook, n: int, now_ms: int, events: EventQueue, notify: list[Notification] | None
) -> None:
    """``n`` random taker orders against the current book, vectorised (see
    :meth:`pipeline.sim.market.Market.step_batch`)."""
    bb0, bq0, ba0, aq0 = st.bbo()
    if not (bb0 and ba0):
        return
    nrng = st.np_rng
    tick = st.tick
    p_buy = 0.5 + max(-0.3, min(0.3, (2 * st.fair - bb0 - ba0) / (10 * tick)))
    is_buy = nrng.random(n) < p_buy
    lot_steps = max(1, st.lot // st.step_u)
    qty = (1 + nrng.exponential(0.2 * lot_steps, n).astype(np.int64)) * st.step_u
    qb, qs = qty[is_buy], qty[~is_buy]
    fa = FlatSide(st.asks, int(qb.sum()))
    fb = FlatSide(st.bids, int(qs.sum()))
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
    changed_a = consume(st.asks, fa, int(cum_b[-1]) if len(cum_b) else 0)
    changed_b = consume(st.bids, fb, int(cum_s[-1]) if len(cum_s) else 0)
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
    st.hist.extend(a0, a_px, a_qty, a_f, a_l, now_ms, a_bm)
    st.trades.extend(t0, t_px, t_q, now_ms, t_bm)
    events.append(
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
    if notify is not None:
        # one print per taker side and price for the whole batch (see Market.add_trade_listener)
        keys, first, inv = np.unique(a_px * 2 + a_bm, return_index=True, return_inverse=True)
        sums = np.zeros(len(keys), np.int64)
        np.add.at(sums, inv, a_qty)
        order = np.argsort(first)
        sym = st.symbol
        notify.extend(
            (sym, k >> 1, q, "SELL" if k & 1 else "BUY", now_ms)
            for k, q in zip(keys[order].tolist(), sums[order].tolist(), strict=True)
        )


def consume(side: BookSide, fl: FlatSide, used: int) -> dict[int, int]:
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

