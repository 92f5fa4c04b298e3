"""The seeded random walk that drives a simulated book, one action at a time.

Why apart from the book: the book holds the exchange's rules; this is the made-up order flow
(a fair price drifting by a tick, takers leaning towards it, makers joining around it, cancels)
and the depth the book is kept at. All randomness comes from the symbol's own ``random.Random``,
so the same seed and call sequence give the same book. The batched twin for ``--rate max`` is
:mod:`pipeline.sim.market_batch`.
"""

from __future__ import annotations

from pipeline.sim.market_book import (
    MAX_LEVELS,
    MIN_LEVELS,
    EventQueue,
    Notification,
    SymbolBook,
)


def init_book(st: SymbolBook, levels: int) -> None:
    """``levels`` price levels a tick apart on each side of the fair price, 1-3 orders each."""
    rng = st.rng
    for i in range(levels):
        off = st.tick * (i + 1)
        for side, price in ((st.bids, st.fair - off), (st.asks, st.fair + off)):
            for _ in range(rng.randint(1, 3)):
                st.add_order(side, price, maker_qty(st))


def maker_qty(st: SymbolBook) -> int:
    """A maker order's size: around the symbol's typical lot, on the step grid."""
    lots = 1 + int(st.rng.expovariate(1.0) * 2)
    q = st.lot * lots // 2 + st.step_u * st.rng.randrange(1, 100)
    return max(st.step_u, q - q % st.step_u)


def walk_action(
    st: SymbolBook, now_ms: int, events: EventQueue, notify: list[Notification] | None
) -> None:
    """One walk action: 30 % a taker that sweeps, 45 % a maker joining, 25 % a cancel."""
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
        st.sweep(buy, max(qty, st.step_u), None, now_ms, events, notify)
    elif r < 0.75:
        d = min(int(rng.expovariate(0.35)), 40)
        if rng.random() < 0.5:
            price = min(st.fair - st.tick * d, ba - st.tick)
            side = st.bids
        else:
            price = max(st.fair + st.tick * (d + 1), bb + st.tick)
            side = st.asks
        if price > 0:
            st.add_order(side, price, maker_qty(st))
    else:
        side = st.bids if rng.random() < 0.5 else st.asks
        depth = min(len(side.prices), 15)
        if depth:
            price = side.from_best(depth)[rng.randrange(depth)]
            orders = side.orders[price]
            i = rng.randrange(len(orders))
            if len(orders) == 1:
                st.remove_level(side, price)
            else:
                side.totals[price] -= orders.pop(i)
                st.level_changed(side, price, side.totals[price])


def refill(st: SymbolBook) -> None:
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
            st.add_order(side, price, maker_qty(st))
        while len(side.prices) > MAX_LEVELS:
            worst = side.worst()
            assert worst is not None
            st.remove_level(side, worst)
