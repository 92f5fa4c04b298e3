"""Pure tests of the simulator's market (pipeline/sim/market.py): ids, U/u rules, book, seeds."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sim import market as mk
from pipeline.sim.market import AggTrade, BookTicker, Market, Trade

FIX = Path(__file__).parent / "fixtures" / "streams"


def _fixture_payloads(name: str) -> list[dict]:
    out = []
    for item in json.loads((FIX / name).read_text()):
        out.append(item["data"] if "data" in item and "stream" in item else item)
    return out


def _run(m: Market, symbol: str, steps: int, t0: int = 1_700_000_000_000) -> list[mk.Event]:
    events: list[mk.Event] = []
    for i in range(steps):
        m.step(symbol, t0 + i, 1)
        m.check_invariants(symbol)
        events.extend(m.drain_events())
    return events


def test_units_roundtrip_and_format() -> None:
    assert mk.fmt_units(mk.to_units("0.01")) == "0.01000000"
    assert mk.fmt_units(mk.to_units(Decimal("60000.5"))) == "60000.50000000"
    assert mk.fmt_units(0) == "0.00000000"
    with pytest.raises(ValueError, match="8 decimals"):
        mk.to_units("0.000000001")


def test_trade_and_agg_ids_are_contiguous_and_agg_covers_its_trades() -> None:
    m = Market(["BTCUSDT"], seed=11)
    events = _run(m, "BTCUSDT", 3000)
    trades = [e for e in events if isinstance(e, Trade)]
    aggs = [e for e in events if isinstance(e, AggTrade)]
    assert len(trades) > 200
    assert len(aggs) > 100
    assert [t.t for t in trades] == list(range(trades[0].t, trades[0].t + len(trades)))
    assert [a.a for a in aggs] == list(range(aggs[0].a, aggs[0].a + len(aggs)))
    by_id = {t.t: t for t in trades}
    assert aggs[0].f == trades[0].t
    for prev, a in pairwise(aggs):
        assert a.f == prev.l + 1
    multi = 0
    for a in aggs:
        covered = [by_id[i] for i in range(a.f, a.l + 1)]
        assert {t.price for t in covered} == {a.price}
        assert sum(t.qty for t in covered) == a.qty
        assert {t.buyer_maker for t in covered} == {a.buyer_maker}
        multi += a.l > a.f
    assert multi > 0, "some taker should have hit several maker orders at one price"


def _apply(book: dict[str, dict[int, int]], diff: mk.DepthUpdate) -> None:
    for side, levels in (("b", diff.bids), ("a", diff.asks)):
        for p, q in levels:
            if q == 0:
                book[side].pop(p, None)
            else:
                book[side][p] = q


@pytest.mark.parametrize("speed", mk.DEPTH_SPEEDS_MS)
def test_depth_diffs_are_contiguous_and_rebuild_the_book(speed: int) -> None:
    m = Market(["ETHUSDT"], seed=5)
    _run(m, "ETHUSDT", 50)
    # the documented sync: snapshot, then drop diffs with u <= lastUpdateId, first must straddle
    m.flush_depth("ETHUSDT", speed, 0)  # start a fresh window
    _run(m, "ETHUSDT", 7)
    uid, bids, asks = m.top("ETHUSDT", 5000)
    book = {"b": dict(bids), "a": dict(asks)}
    prev_u = None
    diffs = []
    for i in range(60):
        _run(m, "ETHUSDT", 1 + i % 9)
        d = m.flush_depth("ETHUSDT", speed, 1000 + i)
        assert d is not None
        diffs.append(d)
    first = True
    for d in diffs:
        assert d.u >= d.U
        if prev_u is not None:
            assert prev_u + 1 == d.U
        prev_u = d.u
        if d.u <= uid:
            continue
        if first:
            assert d.U <= uid + 1 <= d.u
            first = False
        _apply(book, d)
    final_uid, fb, fa = m.top("ETHUSDT", 5000)
    assert final_uid == prev_u
    assert book["b"] == dict(fb)
    assert book["a"] == dict(fa)
    assert m.flush_depth("ETHUSDT", speed, 99_999) is None  # nothing changed since


def test_book_ticker_tracks_best_levels_and_update_id() -> None:
    m = Market(["BNBUSDT"], seed=2)
    last_u = 0
    for i in range(500):
        m.step("BNBUSDT", i, 1)
        tickers = [e for e in m.drain_events() if isinstance(e, BookTicker)]
        if tickers:
            bt = tickers[-1]
            assert (bt.bid_px, bt.bid_qty, bt.ask_px, bt.ask_qty) == m.best_units("BNBUSDT")
            assert bt.u == m.last_update_id("BNBUSDT")
            assert bt.u > last_u
            assert bt.bid_px < bt.ask_px
            last_u = bt.u


def _wire_bytes(
    seed: int,
    steps: int,
    step: Callable[[Market, str, int], object],
    depth_symbol: str,
    depth_every: int = 1,
) -> list[bytes]:
    """Everything a two-symbol market puts on the wire in ``steps`` steps, encoded: the bytes a
    seed must reproduce exactly. ``step(m, symbol, t)`` advances one symbol; every
    ``depth_every`` steps a depth diff of ``depth_symbol`` is flushed as well."""
    m = Market(["BTCUSDT", "ETHUSDT"], seed=seed)
    out = []
    for i in range(steps):
        for s in m.symbols:
            step(m, s, 1000 + i)
        out += [mk.encode_event(e) for e in m.drain_events()]
        if i % depth_every == 0:
            d = m.flush_depth(depth_symbol, 100, 1000 + i)
            if d:
                out.append(mk.encode_depth_diff(d))
    return out


def test_same_seed_same_bytes_other_seed_differs() -> None:
    def run(seed: int) -> list[bytes]:
        return _wire_bytes(seed, 400, lambda m, s, t: m.step(s, t, 2), "BTCUSDT", depth_every=10)

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_take_sweeps_asks_up_to_limit_and_publishes_trades() -> None:
    m = Market(["BTCUSDT"], seed=9)
    m.drain_events()
    heard: list[tuple] = []
    m.add_trade_listener(lambda *a: heard.append(a))
    _uid, _bids, asks = m.top("BTCUSDT", 3)
    limit = mk.units_to_decimal(asks[1][0])
    want = mk.units_to_decimal(asks[0][1] + asks[1][1] + asks[2][1])  # more than 2 levels hold
    fills = m.take("BTCUSDT", "BUY", want, limit, 123)
    assert fills
    assert {p for p, _q, _t in fills} == {mk.units_to_decimal(asks[0][0]), limit}
    assert sum(q for _p, q, _t in fills) == mk.units_to_decimal(asks[0][1] + asks[1][1])
    events = m.drain_events()
    trades = [e for e in events if isinstance(e, Trade)]
    assert [t.t for t in trades] == [t for _p, _q, t in fills]
    assert all(not t.buyer_maker and t.time == 123 for t in trades)  # buyer is the taker
    aggs = [e for e in events if isinstance(e, AggTrade)]
    assert len(aggs) == 2  # one per price level
    assert heard == []  # the listener is for walk trades only
    bp, _bq, ap, _aq = m.best("BTCUSDT")
    assert ap > limit
    assert bp < ap
    m.check_invariants("BTCUSDT")
    # SELL below every bid: nothing within the limit
    assert m.take("BTCUSDT", "SELL", Decimal("0.001"), Decimal("999999"), 124) == []
    with pytest.raises(ValueError, match="BUY or SELL"):
        m.take("BTCUSDT", "buy", Decimal("1"), None, 1)


def test_walk_trades_reach_listeners_as_decimals() -> None:
    m = Market(["BTCUSDT"], seed=1)
    heard: list[tuple] = []
    m.add_trade_listener(lambda *a: heard.append(a))
    events = _run(m, "BTCUSDT", 300)
    trades = [e for e in events if isinstance(e, Trade)]
    assert len(heard) == len(trades)
    sym, price, qty, side, now = heard[0]
    assert sym == "BTCUSDT"
    assert isinstance(price, Decimal)
    assert price == mk.units_to_decimal(trades[0].price)
    assert qty == mk.units_to_decimal(trades[0].qty)
    assert side == ("SELL" if trades[0].buyer_maker else "BUY")
    assert now == trades[0].time


def test_publish_trade_keeps_ids_contiguous_without_touching_book() -> None:
    m = Market(["BTCUSDT"], seed=3)
    _run(m, "BTCUSDT", 100)
    before = m.top("BTCUSDT", 50)
    t = m.publish_trade("BTCUSDT", Decimal("60000.01"), Decimal("0.001"), "SELL", 5)
    assert m.top("BTCUSDT", 50) == before
    events = m.drain_events()
    assert isinstance(events[0], Trade)
    assert events[0].t == t
    assert events[0].buyer_maker
    agg = events[1]
    assert isinstance(agg, AggTrade)
    assert agg.f == agg.l == t
    events = _run(m, "BTCUSDT", 200)
    nxt = next(e for e in events if isinstance(e, Trade))
    assert nxt.t == t + 1


def test_agg_trade_history_queries_and_bound() -> None:
    m = Market(["BTCUSDT"], seed=4, history=300)
    events = _run(m, "BTCUSDT", 3000)
    aggs = [e for e in events if isinstance(e, AggTrade)]
    assert len(aggs) > 600
    newest = m.agg_trades("BTCUSDT", limit=10)
    assert [a.a for a in newest] == [a.a for a in aggs[-10:]]
    mid = aggs[-200]
    got = m.agg_trades("BTCUSDT", from_id=mid.a, limit=50)
    assert [a.a for a in got] == list(range(mid.a, mid.a + 50))
    oldest = m.agg_trades("BTCUSDT", from_id=aggs[0].a, limit=5)
    assert oldest[0].a > aggs[0].a  # trimmed: starts at the oldest retained
    assert len(m.agg_trades("BTCUSDT", limit=1000)) <= 300 + 75
    t_lo, t_hi = aggs[-100].time, aggs[-50].time
    window = m.agg_trades("BTCUSDT", start_time=t_lo, end_time=t_hi, limit=1000)
    assert window
    assert all(t_lo <= a.time <= t_hi for a in window)
    assert window[0].a == min(a.a for a in aggs if a.time >= t_lo)


def test_symbol_info_and_specs() -> None:
    m = Market(["BTCUSDT", "SOLUSDT"], seed=0)
    info = m.symbol_info("BTCUSDT")
    assert info["tick_size"] == Decimal("0.01")
    assert info["base_asset"] == "BTC"
    assert info["quote_asset"] == "USDT"
    assert all(
        isinstance(info[k], Decimal)
        for k in ("step_size", "min_qty", "max_qty", "min_notional", "max_notional")
    )
    assert m.symbol_info("SOLUSDT")["base_asset"] == "SOL"
    with pytest.raises(KeyError, match="unknown symbol"):
        m.best("XRPUSDT")
    with pytest.raises(ValueError, match="base and quote"):
        Market(["FOO"])


def _types(d: dict) -> dict[str, type]:
    return {k: type(v) for k, v in d.items()}


def test_encodings_match_live_payload_shapes() -> None:
    m = Market(["BTCUSDT"], seed=8)
    events = _run(m, "BTCUSDT", 400)
    agg = orjson.loads(mk.encode_agg_trade(next(e for e in events if isinstance(e, AggTrade))))
    trade = orjson.loads(mk.encode_trade(next(e for e in events if isinstance(e, Trade))))
    bt = orjson.loads(mk.encode_book_ticker(next(e for e in events if isinstance(e, BookTicker))))
    diff = m.flush_depth("BTCUSDT", 100, 1)
    assert diff is not None
    depth = orjson.loads(mk.encode_depth_diff(diff))
    partial = orjson.loads(mk.encode_partial_depth(*m.top("BTCUSDT", 20)))
    live_agg = _fixture_payloads("aggTrade.json")[0]
    live_trade = _fixture_payloads("trade.json")[0]  # current schema: no b/a
    live_bt = _fixture_payloads("bookTicker.json")[0]
    live_depth = _fixture_payloads("depthUpdate.json")[0]
    live_partial = _fixture_payloads("depth20.json")[0]
    for ours, live in (
        (agg, live_agg),
        (trade, live_trade),
        (bt, live_bt),
        (depth, live_depth),
        (partial, live_partial),
    ):
        assert list(ours) == list(live)  # same keys, same order
        assert _types(ours) == _types(live)
    assert len(partial["bids"]) == len(partial["asks"]) == 20
    for p, q in depth["b"] + depth["a"] + partial["bids"]:
        assert len(p.split(".")[1]) == 8
        assert len(q.split(".")[1]) == 8


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    ops=st.lists(
        st.tuples(st.sampled_from(["step", "buy", "sell"]), st.integers(1, 20)), max_size=40
    ),
)
def test_property_book_never_crossed_ids_contiguous(seed: int, ops: list[tuple[str, int]]) -> None:
    m = Market(["BTCUSDT"], seed=seed)
    t_ids: list[int] = []
    a_ids: list[int] = []
    for i, (op, n) in enumerate(ops):
        if op == "step":
            m.step("BTCUSDT", i, n)
        else:
            m.take("BTCUSDT", op.upper(), Decimal(n) / 100, None, i)
        m.check_invariants("BTCUSDT")
        for e in m.drain_events():
            if isinstance(e, Trade):
                t_ids.append(e.t)
            elif isinstance(e, AggTrade):
                a_ids.append(e.a)
    assert t_ids == list(range(t_ids[0], t_ids[0] + len(t_ids))) if t_ids else True
    assert a_ids == list(range(a_ids[0], a_ids[0] + len(a_ids))) if a_ids else True


def _run_batches(
    m: Market, symbol: str, batches: int, takers: int = 300, t0: int = 1_700_000_000_000
) -> list[mk.Event]:
    events: list[mk.Event] = []
    for i in range(batches):
        m.step_batch(symbol, t0 + i, takers)
        m.check_invariants(symbol)
        got = m.drain_events()
        tickers = [e for e in got if isinstance(e, BookTicker)]
        assert tickers, "every batch moves the best levels"
        bt = tickers[-1]
        assert (bt.bid_px, bt.bid_qty, bt.ask_px, bt.ask_qty) == m.best_units(symbol)
        assert bt.u <= m.last_update_id(symbol)
        events.extend(got)
    return events


def _check_prints(events: list[mk.Event]) -> tuple[list[Trade], list[AggTrade]]:
    trades = [e for e in events if isinstance(e, Trade)]
    aggs = [e for e in events if isinstance(e, AggTrade)]
    assert [t.t for t in trades] == list(range(trades[0].t, trades[0].t + len(trades)))
    assert [a.a for a in aggs] == list(range(aggs[0].a, aggs[0].a + len(aggs)))
    by_id = {t.t: t for t in trades}
    assert aggs[0].f == trades[0].t
    for prev, a in pairwise(aggs):
        assert a.f == prev.l + 1
    for a in aggs:
        covered = [by_id[i] for i in range(a.f, a.l + 1)]
        assert {t.price for t in covered} == {a.price}
        assert sum(t.qty for t in covered) == a.qty
        assert {(t.buyer_maker, t.time) for t in covered} == {(a.buyer_maker, a.time)}
    return trades, aggs


def test_step_batch_keeps_ids_contiguous_and_the_book_sane_mixed_with_the_walk() -> None:
    m = Market(["BTCUSDT"], seed=21)
    events = _run_batches(m, "BTCUSDT", 20)
    events += _run(m, "BTCUSDT", 50)  # the per-action walk continues the same ids
    m.take("BTCUSDT", "SELL", Decimal("0.3"), None, 5)
    m.publish_trade("BTCUSDT", Decimal("60000.01"), Decimal("0.001"), "BUY", 5)
    events += m.drain_events()
    events += _run_batches(m, "BTCUSDT", 20, takers=1000)
    _trades, aggs = _check_prints(events)
    assert len(aggs) > 10_000
    assert sum(a.l > a.f for a in aggs) > 0, "some taker should hit several orders at one price"
    assert {a.buyer_maker for a in aggs} == {True, False}
    tickers = [e.u for e in events if isinstance(e, BookTicker)]
    assert tickers == sorted(set(tickers))  # strictly increasing
    assert len({a.price for a in aggs}) > 5  # the price moves


@pytest.mark.parametrize("speed", mk.DEPTH_SPEEDS_MS)
def test_step_batch_depth_diffs_rebuild_the_book(speed: int) -> None:
    m = Market(["ETHUSDT"], seed=6)
    _run_batches(m, "ETHUSDT", 5)
    m.flush_depth("ETHUSDT", speed, 0)
    uid, bids, asks = m.top("ETHUSDT", 5000)
    book = {"b": dict(bids), "a": dict(asks)}
    prev_u = uid
    for i in range(40):
        if i % 3:
            m.step_batch("ETHUSDT", 1000 + i, 50 + 40 * i)
        else:
            m.step("ETHUSDT", 1000 + i, 1 + i % 7)
        m.drain_events()
        d = m.flush_depth("ETHUSDT", speed, 1000 + i)
        assert d is not None
        assert prev_u + 1 == d.U
        assert d.u >= d.U
        prev_u = d.u
        _apply(book, d)
    final_uid, fb, fa = m.top("ETHUSDT", 5000)
    assert final_uid == prev_u
    assert book["b"] == dict(fb)
    assert book["a"] == dict(fa)


def test_step_batch_rest_history_equals_the_stream() -> None:
    m = Market(["BTCUSDT"], seed=2, history=5000)
    events = _run_batches(m, "BTCUSDT", 10)
    aggs = [e for e in events if isinstance(e, AggTrade)]
    mid = aggs[len(aggs) // 2]
    got = m.agg_trades("BTCUSDT", from_id=mid.a, limit=200)
    want = aggs[len(aggs) // 2 : len(aggs) // 2 + 200]
    assert [g.rest_dict() for g in got] == [w.rest_dict() for w in want]
    assert [g.a for g in m.agg_trades("BTCUSDT", limit=7)] == [a.a for a in aggs[-7:]]
    window = m.agg_trades("BTCUSDT", start_time=aggs[-1].time, end_time=aggs[-1].time)
    assert window
    assert {a.time for a in window} == {aggs[-1].time}
    # a long run keeps only about `history` of them
    _run_batches(m, "BTCUSDT", 30, takers=1000)
    assert 5000 <= len(m.agg_trades("BTCUSDT", from_id=0, limit=10**9)) <= 5000 + 1250


def test_step_batch_same_seed_same_bytes() -> None:
    def go(seed: int) -> list[bytes]:
        return _wire_bytes(seed, 8, lambda m, s, t: m.step_batch(s, t, 200), "ETHUSDT")

    assert go(5) == go(5)
    assert go(5) != go(6)


def test_step_batch_listeners_hear_every_traded_quantity_per_price() -> None:
    m = Market(["BTCUSDT"], seed=12)
    heard: list[tuple] = []
    m.add_trade_listener(lambda *a: heard.append(a))
    events = _run_batches(m, "BTCUSDT", 5)
    want: dict[tuple[int, str], int] = {}
    for t in events:
        if isinstance(t, Trade):
            key = (t.price, "SELL" if t.buyer_maker else "BUY")
            want[key] = want.get(key, 0) + t.qty
    got: dict[tuple[int, str], int] = {}
    for sym, price, qty, side, _now in heard:
        assert sym == "BTCUSDT"
        assert isinstance(price, Decimal)
        key = (mk.to_units(price), side)
        got[key] = got.get(key, 0) + mk.to_units(qty)
    assert got == want
    assert len(heard) < sum(isinstance(e, Trade) for e in events)  # coalesced


def test_step_batch_survives_a_thin_book() -> None:
    m = Market(["BNBUSDT"], seed=3, initial_levels=1)
    for i in range(30):
        m.take("BNBUSDT", "BUY" if i % 2 else "SELL", Decimal("50"), None, i)
        m.step_batch("BNBUSDT", i, 5000)
        m.check_invariants("BNBUSDT")
    _check_prints(m.drain_events())
