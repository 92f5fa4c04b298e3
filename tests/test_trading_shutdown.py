"""The trading session when the WS API sends ``serverShutdown`` with no lead (#15): Binance
promises none since 2026-06-09, and a 24 h close may come with no notice at all. The session
must log on again on a new connection, keep its user-data subscription, and never send an
order twice. Real sockets to the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pipeline.sim.wsapi")

from simhelpers import async_test, until
from test_trading_integration import new_key, running, trading

from pipeline.binance.keys import load_private_key
from pipeline.sim.testing import SimServer
from pipeline.trading.session import OrderStatus, State


@pytest.mark.parametrize("notice", [True, False])
@async_test
async def test_shutdown_with_no_lead_logs_on_again_and_orders_go_on(
        tmp_path: Path, shm_name: str, notice: bool) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        async with running(tp):
            s = tp.session
            service = sim.sim.service
            bid = float(sim.market.best("BTCUSDT")[0])
            assert s.place("before", "BTCUSDT", "BUY", "LIMIT", 0.001, round(bid * 0.9, 2))
            tp._pump()
            await until(lambda: s.order_status("before") is OrderStatus.NEW)
            logons = service.counters["logons"]
            first = s.primary_conn
            # serverShutdown and the close in the same instant, or the close alone
            await sim.set_fault("shutdown", target="wsapi", close_after=0, notice=notice)
            await until(lambda: s.primary_conn != first and s.state is State.READY)
            await until(lambda: service.counters["logons"] > logons)
            # the user-data subscription follows the logon's answer (READY does not wait for it)
            await until(lambda: s.metrics["user_data_subscribed"] == 1)
            assert s.place("after", "BTCUSDT", "BUY", "LIMIT", 0.001, round(bid * 0.9, 2))
            tp._pump()
            await until(lambda: s.order_status("after") is OrderStatus.NEW)
            coids = [o.client_order_id for o in service.venue.orders.values()]
            assert coids.count("before") == 1  # never sent twice across the reconnect
            assert coids.count("after") == 1
