"""The one SymbolRules (pipeline.binance.filters): parsing real exchangeInfo, exact checks.

Fixtures are real payloads (tests/fixtures/binance_rules/SOURCES.md): a 2021 production
exchangeInfo (MIN_NOTIONAL schema, a BREAK symbol) and the docs' example of every filter.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.binance.filters import (
    MSG_MARKET_CLOSED,
    RulesError,
    SymbolRules,
    parse_exchange_info,
)
from pipeline.sim.market import Market

D = Decimal
FIX = Path(__file__).parent / "fixtures" / "binance_rules"


def load(name: str) -> Any:
    return json.loads((FIX / name).read_text())


@pytest.fixture(scope="module")
def live() -> dict[str, SymbolRules]:
    return parse_exchange_info(load("exchangeInfo_2021_trimmed.json")).rules


def docs_entry(filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "symbol": "BNBUSDT",
        "status": "TRADING",
        "baseAsset": "BNB",
        "quoteAsset": "USDT",
        "filters": load("filters_docs.json") if filters is None else filters,
    }


def test_parses_the_live_2021_payload(live: dict[str, SymbolRules]) -> None:
    assert len(live) == 10
    btc = live["BTCUSDT"]
    assert (btc.base_asset, btc.quote_asset, btc.status) == ("BTC", "USDT", "TRADING")
    assert (btc.tick_size, btc.min_price, btc.max_price) == (D("0.01"), D("0.01"), D("1000000"))
    assert (btc.step_size, btc.min_qty, btc.max_qty) == (D("0.00001"), D("0.00001"), D("9000"))
    assert btc.market_max_qty == D("100.05381873")
    assert btc.market_step_size == 0
    assert (btc.notional_filter, btc.min_notional, btc.max_notional) == ("MIN_NOTIONAL", 10, 0)
    assert btc.max_num_orders == 200
    # kept by name, not checked: the venue is the authority on these
    assert btc.unchecked_filters == ("PERCENT_PRICE", "ICEBERG_PARTS", "MAX_NUM_ALGO_ORDERS")
    assert live["BCCBTC"].status == "BREAK"
    assert "MAX_POSITION" in live["BTCUPUSDT"].unchecked_filters


def test_docs_example_of_every_filter() -> None:
    r = SymbolRules.from_exchange_info(docs_entry())
    # NOTIONAL follows MIN_NOTIONAL in the docs list: the later one wins, as it names the filter
    assert (r.notional_filter, r.min_notional, r.max_notional) == ("NOTIONAL", 10, 10000)
    assert (r.apply_min_to_market, r.apply_max_to_market) == (False, False)
    assert r.max_num_order_amends == 10
    assert r.max_num_orders == 25
    assert "TRAILING_DELTA" in r.unchecked_filters
    assert "PERCENT_PRICE_BY_SIDE" in r.unchecked_filters
    assert "EXCHANGE_MAX_NUM_ORDERS" in r.unchecked_filters  # an exchange filter, misplaced


@pytest.mark.parametrize(
    ("price", "qty", "violated"),
    [
        ("60000.01", "0.001", None),
        ("60000.015", "0.001", "PRICE_FILTER"),  # off the 0.01 tick
        ("0.001", "1", "PRICE_FILTER"),  # below minPrice
        ("1000000.01", "0.001", "PRICE_FILTER"),  # above maxPrice
        ("0", "0.001", "PRICE_FILTER"),
        ("60000", "0.000015", "LOT_SIZE"),  # off the step
        ("60000", "9000.00001", "LOT_SIZE"),  # above maxQty
        ("60000", "0", "LOT_SIZE"),
        ("100", "0.001", "MIN_NOTIONAL"),  # 0.1 < 10: the 2021 name of the rule
    ],
)
def test_limit_checks_name_the_filter(
    live: dict[str, SymbolRules], price: str, qty: str, violated: str | None
) -> None:
    v = live["BTCUSDT"].check("LIMIT", D(price), D(qty))
    if violated is None:
        assert v is None
    else:
        assert v is not None
        assert (v.filter, v.msg) == (violated, f"Filter failure: {violated}")


def test_market_orders(live: dict[str, SymbolRules]) -> None:
    btc = live["BTCUSDT"]
    over = btc.check("MARKET", None, D("100.06"))
    assert over == ("MARKET_LOT_SIZE", "Filter failure: MARKET_LOT_SIZE")
    assert btc.check("MARKET", None, D("1")) is None  # no reference price: the venue decides
    low = btc.check("MARKET", None, D("0.0001"), reference_price=D("60000"))
    assert low is not None
    assert low.filter == "MIN_NOTIONAL"
    assert btc.check("MARKET", None, None, quote_qty=D("9.99")) is not None
    docs = SymbolRules.from_exchange_info(docs_entry())
    # applyMinToMarket false: a MARKET order below minNotional passes, a LIMIT one does not
    assert docs.check("MARKET", None, D("0.001"), reference_price=D("1")) is None
    assert docs.check("LIMIT", D("1"), D("0.001")) is not None


def test_status_other_than_trading_refuses_new_orders(live: dict[str, SymbolRules]) -> None:
    assert live["BCCBTC"].check("LIMIT", D("0.001"), D("1")) == ("SYMBOL_STATUS",
                                                                  MSG_MARKET_CLOSED)  # fmt: skip
    halted = live["BTCUSDT"].with_status("CANCEL_ONLY")
    v = halted.check("LIMIT", D("60000"), D("0.001"))
    assert v is not None
    assert v.filter == "SYMBOL_STATUS"
    with pytest.raises(RulesError, match="unknown symbol status"):
        halted.with_status("PAUSED")


def test_decimal_grid_is_exact() -> None:
    # 0.3 is not a multiple of 0.1 in binary floating point; it is in decimal
    r = SymbolRules("XUSDT", "X", "USDT", tick_size=D("0.1"), step_size=D("0.1"))
    assert 0.3 % 0.1 != 0  # the float trap this module must not fall into
    assert r.check("LIMIT", D("0.3"), D("0.3")) is None
    assert r.floor_price(D("0.39")) == D("0.3")
    assert r.floor_qty(D("0.39")) == D("0.3")


@given(
    ticks=st.integers(1, 10**12),
    tick_exp=st.integers(-8, 2),
    off=st.integers(1, 9),
)
def test_on_grid_property(ticks: int, tick_exp: int, off: int) -> None:
    tick = D(1).scaleb(tick_exp)
    r = SymbolRules("XUSDT", "X", "USDT", tick_size=tick)
    price = tick * ticks
    assert r.price_violation(price) is None
    assert r.price_violation(price + tick * D(off) / 10) is not None  # a fraction of a tick off


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"status": "TRADING"}, "without a symbol"),
        ({"symbol": "XUSDT", "quoteAsset": "USDT"}, "baseAsset/quoteAsset"),
        (docs_entry([{"filterType": "PRICE_FILTER", "tickSize": "abc"}]), "not a decimal"),
        (docs_entry([{"filterType": "PRICE_FILTER", "tickSize": 1e400}]), "out of range"),
        (docs_entry([{"filterType": "LOT_SIZE", "stepSize": "-1"}]), "out of range"),
        (docs_entry([{"tickSize": "1"}]), "without a filterType"),
        (docs_entry([{"filterType": "MAX_NUM_ORDERS", "maxNumOrders": "x"}]), "integer"),
        ("not an object", "not an object"),
    ],
)
def test_malformed_entries_are_a_clear_error(entry: Any, match: str) -> None:
    with pytest.raises(RulesError, match=match):
        SymbolRules.from_exchange_info(entry)


def test_a_bad_entry_is_skipped_not_fatal() -> None:
    body = {"symbols": [docs_entry(), {"symbol": "BAD"}, 7]}
    parsed = parse_exchange_info(body)
    assert list(parsed.rules) == ["BNBUSDT"]
    assert len(parsed.skipped) == 2
    assert parsed.unchecked_filters == len(parsed.rules["BNBUSDT"].unchecked_filters)
    assert list(parse_exchange_info(body, ["NOPE"]).rules) == []
    with pytest.raises(RulesError, match="symbols list"):
        parse_exchange_info({"code": -1121, "msg": "Invalid symbol."})


def test_simulator_advertises_what_it_enforces() -> None:
    """The simulator's exchangeInfo filters parse back into the very rules its venue uses."""
    m = Market(["BTCUSDT", "SOLUSDT"], seed=0)
    for sym in m.symbols:
        rules = m.rules(sym)
        entry = {
            "symbol": sym,
            "status": rules.status,
            "baseAsset": rules.base_asset,
            "quoteAsset": rules.quote_asset,
            "filters": rules.exchange_info_filters(),
        }
        assert SymbolRules.from_exchange_info(entry) == rules
