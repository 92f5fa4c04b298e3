"""Local pre-trade checks from exchangeInfo (pipeline.trading.pretrade).

The core is tested directly with an injected clock; the whole path (a real trading process,
its REST fetch of exchangeInfo, an OrderClient, the simulator's venue) over real sockets on
127.0.0.1. Waits are for conditions, never timed assertions.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pipeline.sim.testing")

from simhelpers import async_test, until
from test_trading_integration import fast_config, new_key

from pipeline.binance.keys import load_private_key
from pipeline.sim.testing import SimServer, http_json
from pipeline.trading.client import OrderClient
from pipeline.trading.pretrade import PreTradeRules, RulesFetcher, rest_url_for
from pipeline.trading.process import TradingConfig, TradingProcess
from pipeline.trading.session import State
from pipeline.trading.wire import ExecKind, ExecUpdate, OrderStatus

FIX = Path(__file__).parent / "fixtures" / "binance_rules"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def exchange_info() -> Any:
    return json.loads((FIX / "exchangeInfo_2021_trimmed.json").read_text())


def test_rest_url_for_each_venue() -> None:
    assert rest_url_for("wss://ws-api.binance.com:443/ws-api/v3") == "https://api.binance.com"
    assert (
        rest_url_for("wss://ws-api.testnet.binance.vision/ws-api/v3")
        == "https://testnet.binance.vision"
    )
    assert rest_url_for("ws://127.0.0.1:4242/ws-api/v3") == "http://127.0.0.1:4242"


def test_unknown_symbol_goes_out_and_is_learned() -> None:
    clock = Clock()
    woken: list[int] = []
    core = PreTradeRules(monotonic=clock, wake=lambda: woken.append(1))
    assert core.seconds_until_fetch() is None  # nothing wanted: nothing to fetch
    assert core.check("BTCUSDT", "LIMIT", 60000.015, 0.001) is None  # no rules yet: venue decides
    assert woken
    assert core.seconds_until_fetch() == 0.0
    asked = core.start_fetch()
    assert asked == ["BTCUSDT"]
    assert core.seconds_until_fetch() is None  # one fetch at a time
    core.loaded(exchange_info(), asked)
    assert list(core.rules) == ["BTCUSDT"]  # only what was asked for
    assert core.check("BTCUSDT", "LIMIT", 60000.015, 0.001) == (
        -1013, "Filter failure: PRICE_FILTER (checked locally)")  # fmt: skip
    assert core.check("BTCUSDT", "LIMIT", 60000.01, 0.001) is None
    assert core.check("BTCUSDT", "LIMIT", 60000.0, 0.000015) == (
        -1013, "Filter failure: LOT_SIZE (checked locally)")  # fmt: skip
    assert core.check("BTCUSDT", "MARKET", 0.0, 100.06)[1].startswith(  # type: ignore[index]
        "Filter failure: MARKET_LOT_SIZE")  # fmt: skip
    m = core.metrics()
    assert (m["pretrade_symbols"], m["pretrade_rejected"], m["pretrade_loads"]) == (1, 3, 1)
    assert m["pretrade_unchecked_filters"] == 3  # PERCENT_PRICE, ICEBERG_PARTS, MAX_NUM_ALGO_ORDERS


def test_refresh_on_timer_on_venue_refusal_and_after_failure() -> None:
    clock = Clock()
    core = PreTradeRules(["BTCUSDT"], refresh_s=300.0, retry_s=5.0, stale_refresh_s=1.0,
                         monotonic=clock)  # fmt: skip
    core.loaded(exchange_info(), core.start_fetch())
    assert core.seconds_until_fetch() == 300.0
    clock.t += 300.0
    assert core.seconds_until_fetch() == 0.0  # the timer
    core.loaded(exchange_info(), core.start_fetch())
    # a venue -1013 (a filter changed under us) makes a fetch due within stale_refresh_s
    refused = ExecUpdate("b", ExecKind.REJECT, OrderStatus.REJECTED, error_code=-1013)
    core.note_refusals([ExecUpdate("a", ExecKind.ACK, OrderStatus.NEW), refused])
    assert core.seconds_until_fetch() == 1.0
    core.failed("GET ...: timed out")
    core.failed("GET ...: timed out")
    assert core.metrics()["pretrade_load_failures"] == 2
    assert core.seconds_until_fetch() == 5.0  # retry, and the rules we had stay in force
    assert core.check("BTCUSDT", "LIMIT", 60000.015, 0.001) is not None
    # an answer that is not exchangeInfo is a failure, not a crash
    core.loaded({"code": -1000, "msg": "x"}, core.start_fetch())
    assert core.metrics()["pretrade_load_failures"] == 3


def test_status_and_bad_entries() -> None:
    core = PreTradeRules(["BCCBTC", "ETHBTC"])
    body = exchange_info()
    body["symbols"].append({"symbol": "ETHBTC", "filters": "oops"})  # a bad duplicate: skipped
    core.loaded(body, core.start_fetch())
    assert core.metrics()["pretrade_symbols_skipped"] == 1
    assert core.check("BCCBTC", "LIMIT", 0.001, 1.0) == (
        -2010, "Market is closed. (checked locally): BCCBTC is BREAK")  # fmt: skip
    assert core.check("ETHBTC", "LIMIT", 0.07, 1.0) is None


@async_test
async def test_fetch_failure_keeps_orders_flowing_and_unknown_symbols_drop_out() -> None:
    async with SimServer(symbols=["BTCUSDT"]) as sim:
        core = PreTradeRules(["BTCUSDT", "NOPEUSDT"])
        await RulesFetcher(core, sim.rest_url).fetch_once()  # -1121 for the pair: one by one
        assert list(core.rules) == ["BTCUSDT"]
        assert core.wanted == {"BTCUSDT"}
        dead = PreTradeRules(["BTCUSDT"])
        await RulesFetcher(dead, "http://127.0.0.1:9", timeout_s=2.0).fetch_once()
        assert dead.metrics()["pretrade_load_failures"] == 1
        assert dead.last_error
        assert dead.check("BTCUSDT", "LIMIT", 1.005, 1.0) is None  # unchecked, not refused


@async_test
async def test_trading_process_refuses_locally_and_sim_never_sees_it(
    tmp_path: Path, shm_name: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        cfg = TradingConfig(
            url=sim.wsapi_url,
            session=fast_config("k"),
            exec_ring=f"{shm_name}.exec",
            metrics_name=f"{shm_name}.metrics",
            scan_interval_s=0.05,
            rules_symbols=("BTCUSDT",),
        )
        tp = TradingProcess(cfg, load_private_key(path))
        task = asyncio.create_task(tp.run())
        client = None
        try:
            await until(lambda: tp.session.state is State.READY)
            rules = tp._rules
            assert rules is not None
            await until(lambda: "BTCUSDT" in rules.rules)  # loaded at start over REST
            client = OrderClient.attach(f"{shm_name[-20:]}c", exec_ring=f"{shm_name}.exec")
            bid = float(sim.market.best("BTCUSDT")[0])
            good_price = round(bid * 0.9, 2)

            def placed() -> int:
                return int(sim.state()["venue"]["methods"].get("order.place", 0))

            # off the 0.01 tick: refused here, never sent
            bad = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=good_price + 0.005)
            rej = await asyncio.to_thread(client.wait, bad, 10.0)
            assert (rej.kind, rej.status, rej.error_code) == ("REJECT", "REJECTED", -1013)
            assert "PRICE_FILTER" in rej.error_msg
            assert "checked locally" in rej.error_msg
            assert placed() == 0
            # a good order still goes through
            good = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=good_price)
            ack = await asyncio.to_thread(client.wait, good, 10.0)
            assert ack.status == "NEW"
            assert placed() == 1
            # CANCEL_ONLY: the venue refuses the next order; that refusal makes the process
            # fetch the rules again, and the order after is refused locally
            loads = rules.loads
            status = await http_json(f"{sim.admin_url}/symbol_status", "POST",
                                     {"symbol": "BTCUSDT", "status": "CANCEL_ONLY"})  # fmt: skip
            assert status[0] == 200
            first = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=good_price)
            ans = await asyncio.to_thread(client.wait, first, 10.0)
            assert (ans.kind, ans.error_code, ans.error_msg) == ("REJECT", -2010,
                                                                  "Market is closed.")  # fmt: skip
            assert placed() == 2
            await until(lambda: rules.loads > loads)
            assert rules.rules["BTCUSDT"].status == "CANCEL_ONLY"
            second = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=good_price)
            local = await asyncio.to_thread(client.wait, second, 10.0)
            assert (local.kind, local.error_code) == ("REJECT", -2010)
            assert "CANCEL_ONLY" in local.error_msg
            assert placed() == 2  # never reached the simulator
            # cancels are still accepted by the venue
            client.cancel(good, symbol="BTCUSDT")
            gone = await asyncio.to_thread(
                client.wait, good, 10.0, frozenset({"CANCELED", "CANCEL_REJECT"})
            )
            assert gone.kind == "CANCELED"
            metrics = rules.metrics()
            assert metrics["pretrade_rejected"] == 2
            assert metrics["pretrade_load_failures"] == 0
        finally:
            if client is not None:
                client.close()
            tp.request_stop()
            assert await task == 0
