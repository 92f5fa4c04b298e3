"""An amend (order.amend.keepPriority) through the local pre-trade rules (#13 follow-up).

The rule functions and :meth:`PreTradeRules.check_amend` directly, one test per rule, on the
2021 exchangeInfo fixture (BTCUSDT: step 0.00001, minQty 0.00001, MIN_NOTIONAL 10); the whole
path (a real trading process, an OrderClient, the simulator's venue over real sockets) in
tests/test_order_semantics_sim.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.binance.filters import SymbolRules
from pipeline.trading.pretrade import (
    PreTradeRules,
    amend_filter_violation,
    amend_reduction_violation,
)

FIX = Path(__file__).parent / "fixtures" / "binance_rules"


def exchange_info() -> Any:
    return json.loads((FIX / "exchangeInfo_2021_trimmed.json").read_text())


def loaded(*symbols: str) -> PreTradeRules:
    core = PreTradeRules(symbols)
    core.loaded(exchange_info(), core.start_fetch())
    return core


def btcusdt() -> SymbolRules:
    return loaded("BTCUSDT").rules["BTCUSDT"]


# ---- the filters (pure) ------------------------------------------------------------------


def test_amend_off_the_step_size_is_lot_size() -> None:
    assert amend_filter_violation(btcusdt(), 0.000015) == (
        -1013, "Filter failure: LOT_SIZE (checked locally)")  # fmt: skip
    assert amend_filter_violation(btcusdt(), 0.00102) is None


def test_amend_below_min_qty_is_lot_size() -> None:
    rules = loaded("BNBBTC").rules["BNBBTC"]  # minQty 0.001 = stepSize
    assert amend_filter_violation(rules, 0.0005) == (
        -1013, "Filter failure: LOT_SIZE (checked locally)")  # fmt: skip


def test_amend_below_min_notional_is_the_venues_to_judge() -> None:
    # 0.0001 BTC at any price: MIN_NOTIONAL 10 is not applied to an amend (undocumented)
    assert amend_filter_violation(btcusdt(), 0.0001) is None


# ---- a reduction above the filled quantity (pure) --------------------------------------------


def test_amend_not_below_the_current_quantity_is_2038() -> None:
    for new in (1.0, 1.5):
        assert amend_reduction_violation(1.0, 0.0, new) == (
            -2038, "Order amend (quantity increase) is not supported. (checked locally)",
        )  # fmt: skip
    assert amend_reduction_violation(1.0, 0.0, 0.0)[0] == -2038  # type: ignore[index]
    assert amend_reduction_violation(1.0, 0.0, 0.99) is None


def test_amend_at_or_below_the_filled_quantity_is_2038() -> None:
    for new in (0.4, 0.3):
        assert amend_reduction_violation(1.0, 0.4, new) == (
            -2038, "Order amend rejected: newQty must exceed executedQty. (checked locally)",
        )  # fmt: skip
    assert amend_reduction_violation(1.0, 0.4, 0.41) is None


def test_amend_of_an_order_of_unknown_quantity_is_left_to_the_venue() -> None:
    assert amend_reduction_violation(0.0, 0.0, 5.0) is None


# ---- the core: counting, and what it does without rules ----------------------------------------


def test_check_amend_counts_refusals_and_checks_filters_before_the_reduction() -> None:
    core = loaded("BTCUSDT")
    ok = core.check_amend("BTCUSDT", 0.01, 0.0, 0.005)
    assert ok is None
    # off the step AND an increase: the venue's order names LOT_SIZE first
    assert core.check_amend("BTCUSDT", 0.01, 0.0, 0.020005) == (
        -1013, "Filter failure: LOT_SIZE (checked locally)")  # fmt: skip
    assert core.check_amend("BTCUSDT", 0.01, 0.0, 0.02)[0] == -2038  # type: ignore[index]
    assert core.check_amend("BTCUSDT", 0.01, 0.006, 0.005)[0] == -2038  # type: ignore[index]
    m = core.metrics()
    assert (m["pretrade_rejected"], m["pretrade_untracked"]) == (3, 0)
    core.amend_untracked()
    assert core.metrics()["pretrade_untracked"] == 1


def test_check_amend_without_rules_still_refuses_what_is_not_a_reduction() -> None:
    woken: list[int] = []
    core = PreTradeRules(wake=lambda: woken.append(1))
    # rules not loaded: the filters are the venue's to judge, and the symbol is learned
    assert core.check_amend("BTCUSDT", 0.01, 0.0, 0.000015) is None
    assert core.wanted == {"BTCUSDT"}
    assert woken
    assert core.check_amend("BTCUSDT", 0.01, 0.0, 0.01)[0] == -2038  # type: ignore[index]
    assert core.metrics()["pretrade_rejected"] == 1


def test_check_amend_ignores_the_symbol_status() -> None:
    # BCCBTC is BREAK: whether Binance takes an amend then is not documented; the venue decides
    core = loaded("BCCBTC")
    assert core.check_amend("BCCBTC", 2.0, 0.0, 1.0) is None


def test_nan_and_infinite_fields_are_refused_not_raised() -> None:
    """A client writing its order ring by hand can send NaN or inf; a Decimal NaN raises on
    the first comparison, which would have stopped the order path."""
    core = loaded("BTCUSDT")
    nan, inf = float("nan"), float("inf")
    assert core.check("BTCUSDT", "LIMIT", nan, 1.0) == (
        -1013, "Filter failure: PRICE_FILTER (checked locally)")  # fmt: skip
    assert core.check("BTCUSDT", "LIMIT", 60000.0, nan) == (
        -1013, "Filter failure: LOT_SIZE (checked locally)")  # fmt: skip
    assert core.check("BTCUSDT", "LIMIT", 60000.0, inf)[1].startswith(  # type: ignore[index]
        "Filter failure: LOT_SIZE")  # fmt: skip
    for bad in (nan, inf, -inf):
        assert core.check_amend("BTCUSDT", 0.01, 0.0, bad) == (
            -1013, "Filter failure: LOT_SIZE (checked locally)")  # fmt: skip
        assert amend_reduction_violation(0.01, 0.0, bad) is not None
    no_max = SymbolRules("X", "A", "B", step_size=btcusdt().step_size)  # maxQty 0: disabled
    assert amend_filter_violation(no_max, inf) == (
        -1013, "Filter failure: LOT_SIZE (checked locally)")  # fmt: skip
