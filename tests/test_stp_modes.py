"""A symbol's allowed self-trade prevention modes (exchangeInfo
``allowedSelfTradePreventionModes`` / ``defaultSelfTradePreventionMode``), end to end: parsed into
:class:`SymbolRules`, advertised and enforced by the simulator (``--stp-modes`` /
``--stp-default``), and refused locally by the trading process's pre-trade rules.

Binance's errors.md names no code or message for a mode a symbol does not allow: -1013 (the
code of every order-parameter rule checked before the matching engine) is our conservative
choice, the message is ours (:data:`MSG_STP_NOT_ALLOWED`). Over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest

pytest.importorskip("pipeline.sim.testing")

from simhelpers import async_test, until
from test_trading_integration import new_key, running, trading

from pipeline.binance.filters import (
    MSG_STP_NOT_ALLOWED,
    STP_MODES,
    RulesError,
    SymbolRules,
    parse_exchange_info,
)
from pipeline.binance.keys import load_private_key
from pipeline.config import ConfigError, load_config
from pipeline.sim import cli as sim_cli
from pipeline.sim.config import SimConfig
from pipeline.sim.market import Market
from pipeline.sim.market_specs import default_spec
from pipeline.sim.testing import SimServer, http_json
from pipeline.sim.venue import Venue, VenueError
from pipeline.trading.client import OrderClient
from pipeline.trading.pretrade import PreTradeRules

FIX = Path(__file__).parent / "fixtures" / "binance_rules"
ACC = "k"


def entry(**kw: object) -> dict[str, object]:
    e: dict[str, object] = {"symbol": "BTCUSDT", "baseAsset": "BTC", "quoteAsset": "USDT",
                            "filters": []}  # fmt: skip
    e.update(kw)
    return e


# ---- the rules (pure) -------------------------------------------------------------------------


def test_rules_take_the_allowed_set_and_default_from_exchange_info() -> None:
    r = SymbolRules.from_exchange_info(entry(
        allowedSelfTradePreventionModes=["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
        defaultSelfTradePreventionMode="EXPIRE_TAKER"))  # fmt: skip
    assert r.allowed_stp_modes == ("EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH")
    assert r.default_stp_mode == "EXPIRE_TAKER"
    assert r.stp_violation("EXPIRE_BOTH") is None
    assert r.stp_violation("") is None  # none named: the symbol's default
    v = r.stp_violation("DECREMENT")
    assert v is not None
    assert (v.filter, v.msg) == ("STP_MODE", MSG_STP_NOT_ALLOWED)


def test_an_entry_without_the_fields_allows_every_mode_and_a_bad_one_is_skipped() -> None:
    r = SymbolRules.from_exchange_info(entry())
    assert r.allowed_stp_modes == STP_MODES
    assert r.stp_violation("TRANSFER") is None
    bad = {"symbols": [entry(allowedSelfTradePreventionModes="NONE"),
                       entry(symbol="ETHUSDT", defaultSelfTradePreventionMode=3)]}  # fmt: skip
    parsed = parse_exchange_info(bad)
    assert parsed.rules == {}
    assert [s.split(":")[0] for s in parsed.skipped] == [
        "BTCUSDT.allowedSelfTradePreventionModes", "ETHUSDT.defaultSelfTradePreventionMode"]


def test_the_2021_fixture_without_stp_fields_still_parses() -> None:
    body = json.loads((FIX / "exchangeInfo_2021_trimmed.json").read_text())
    parsed = parse_exchange_info(body, ["BTCUSDT"])
    assert parsed.rules["BTCUSDT"].allowed_stp_modes == STP_MODES


def test_restricting_a_symbol_checks_modes_and_default() -> None:
    r = SymbolRules.from_exchange_info(entry())
    assert r.with_stp_modes(["NONE", "NONE"], "NONE").allowed_stp_modes == ("NONE",)
    with pytest.raises(RulesError):
        r.with_stp_modes(["NONE", "EXPIRE_ALL"], "NONE")
    with pytest.raises(RulesError):
        r.with_stp_modes(["EXPIRE_TAKER"], "EXPIRE_MAKER")  # the default must be allowed
    with pytest.raises(RulesError):
        r.with_stp_modes([], "NONE")


def test_pretrade_refuses_a_mode_the_symbol_does_not_allow() -> None:
    core = PreTradeRules(["BTCUSDT"])
    core.loaded({"symbols": [entry(allowedSelfTradePreventionModes=["NONE", "EXPIRE_MAKER"])]},
                core.start_fetch())  # fmt: skip
    assert core.check("BTCUSDT", "LIMIT", 100.0, 1.0, "EXPIRE_MAKER") is None
    assert core.check("BTCUSDT", "LIMIT", 100.0, 1.0) is None  # the default
    assert core.check("BTCUSDT", "LIMIT", 100.0, 1.0, "DECREMENT") == (
        -1013, f"{MSG_STP_NOT_ALLOWED} (checked locally)")  # fmt: skip
    assert core.metrics()["pretrade_rejected"] == 1


# ---- the simulator's configuration -------------------------------------------------------------


def test_sim_flags_and_their_problems() -> None:
    parser = argparse.ArgumentParser()
    sim_cli.register(parser.add_subparsers())
    args = parser.parse_args(["sim", "--stp-modes", "none,expire_taker", "--stp-default", "NONE"])
    cfg = sim_cli.build_config(args)
    assert (cfg.stp_modes, cfg.stp_default) == (["NONE", "EXPIRE_TAKER"], "NONE")
    for argv in (["sim", "--stp-modes", "NONE"], ["sim", "--stp-modes", "NONE,EXPIRE_ALL"]):
        with pytest.raises(ValueError, match="--stp-default/--stp-modes"):
            sim_cli.build_config(parser.parse_args(argv))
    assert SimConfig().stp_problem() == ""
    assert SimConfig().stp_modes == list(STP_MODES)  # all six by default


def test_toml_names_the_key_when_the_default_is_not_allowed(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[sim]\nstp_modes = ["NONE", "EXPIRE_TAKER"]\n')
    with pytest.raises(ConfigError, match=r"sim\.stp_default"):
        load_config(path, env={})
    path.write_text('[sim]\nstp_modes = ["NONE", "EXPIRE_TAKER"]\nstp_default = "NONE"\n')
    assert load_config(path, env={}).sim.stp_modes == ["NONE", "EXPIRE_TAKER"]


def test_venue_refuses_a_mode_not_allowed_and_uses_the_symbols_default() -> None:
    spec = default_spec("BTCUSDT").with_stp_modes(["NONE", "EXPIRE_TAKER"], "EXPIRE_TAKER")
    market = Market(["BTCUSDT"], seed=1, specs={"BTCUSDT": spec})
    v = Venue(market, [ACC])
    bid = market.best("BTCUSDT")[0]
    price = str((bid * Decimal("0.9")).quantize(Decimal("0.01")))
    base = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC",
            "price": price, "quantity": "0.001"}  # fmt: skip
    with pytest.raises(VenueError) as exc:
        v.place(ACC, {**base, "selfTradePreventionMode": "EXPIRE_MAKER"}, 1)
    assert (exc.value.code, exc.value.msg) == (-1013, MSG_STP_NOT_ALLOWED)
    assert v.open_order_count() == 0  # refused: nothing changed
    res, _ = v.place(ACC, base, 1)
    assert res["selfTradePreventionMode"] == "EXPIRE_TAKER"  # the symbol's default
    res, _ = v.place(ACC, {**base, "selfTradePreventionMode": "NONE"}, 1)
    assert res["selfTradePreventionMode"] == "NONE"


# ---- over real sockets ---------------------------------------------------------------------------


@async_test
async def test_sim_advertises_its_restricted_set_and_the_trading_process_refuses_locally(
    tmp_path: Path, shm_name: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    restricted = {"stp_modes": ["NONE", "EXPIRE_TAKER"], "stp_default": "NONE"}
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"], **restricted) as sim:
        status, info = await http_json(sim.rest_url + "/api/v3/exchangeInfo")
        assert status == 200
        [btc] = info["symbols"]
        assert btc["allowedSelfTradePreventionModes"] == ["NONE", "EXPIRE_TAKER"]
        assert btc["defaultSelfTradePreventionMode"] == "NONE"
        tp = trading(sim, shm_name, "k", load_private_key(path))
        async with running(tp):
            rules = tp._rules
            assert rules is not None
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            client = OrderClient.attach(f"{shm_name[-20:]}t", exec_ring=f"{shm_name}.exec")

            def placed() -> int:
                return int(sim.state()["venue"]["methods"].get("order.place", 0))

            try:
                # before the rules are loaded the venue is the one to refuse
                first = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price,
                                     stp="DECREMENT")  # fmt: skip
                rej = await asyncio.to_thread(client.wait, first, 10.0)
                assert (rej.kind, rej.error_code, rej.error_msg) == (
                    "REJECT", -1013, MSG_STP_NOT_ALLOWED)  # fmt: skip
                assert placed() == 1
                await until(lambda: "BTCUSDT" in rules.rules)
                assert rules.rules["BTCUSDT"].allowed_stp_modes == ("NONE", "EXPIRE_TAKER")
                # then the trading process refuses it without a round trip
                second = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price,
                                      stp="EXPIRE_BOTH")  # fmt: skip
                local = await asyncio.to_thread(client.wait, second, 10.0)
                assert (local.kind, local.error_code, local.error_msg) == (
                    "REJECT", -1013, f"{MSG_STP_NOT_ALLOWED} (checked locally)")  # fmt: skip
                assert placed() == 1
                # an allowed mode still goes out
                good = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price,
                                    stp="EXPIRE_TAKER")  # fmt: skip
                ack = await asyncio.to_thread(client.wait, good, 10.0)
                assert ack.status == "NEW"
                assert placed() == 2

                def replaced() -> int:
                    return int(sim.state()["venue"]["methods"].get("order.cancelReplace", 0))

                # a cancel-replace's replacement carries its own mode, checked the same way
                bad = client.modify(good, qty=0.002, price=price, stp="EXPIRE_BOTH")
                local = await asyncio.to_thread(client.wait, bad, 10.0)
                assert (local.kind, local.error_code, local.error_msg) == (
                    "REJECT", -1013, f"{MSG_STP_NOT_ALLOWED} (checked locally)")  # fmt: skip
                assert replaced() == 0
                new = client.modify(good, qty=0.002, price=price, stp="EXPIRE_TAKER")
                report = await asyncio.to_thread(client.wait, new, 10.0, frozenset({"NEW"}))
                assert report.stp_mode == "EXPIRE_TAKER"  # the venue's executionReport says so
                assert replaced() == 1
            finally:
                client.close()
