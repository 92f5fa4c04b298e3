"""Amend (order.amend.keepPriority) follow-ups of #13 against the simulator over real sockets:
the local pre-trade rules refuse what the venue would refuse without sending it, and one amend
gives exactly one REPLACED record on the exec ring whether its reply or its executionReport
arrives first (the simulator sends the reply first; with ``wsapi_delay`` the report first).

Waits are for conditions (an answer on the exec ring, a request no longer pending), never
timed assertions. The pure rules are in tests/test_pretrade_amend.py, the table in
tests/test_amend.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("pipeline.sim.testing")

from simhelpers import async_test, until
from test_trading_integration import new_key, running, trading

from pipeline.binance.keys import load_private_key
from pipeline.sim.testing import SimServer
from pipeline.trading.client import AMEND_ANSWERS, STATUS_ANSWERS, OrderClient
from pipeline.trading.process import TradingProcess

pytestmark = pytest.mark.slow


def amends_at_venue(sim: SimServer) -> int:
    return int(sim.state()["venue"]["methods"].get("order.amend.keepPriority", 0))


def amend_pending(tp: TradingProcess) -> bool:
    conns = tp.session.connections.conns
    return any(p.kind == "amend" for c in conns.values() for p in c.pending.values())


@async_test
async def test_amend_refused_locally_by_the_symbols_rules_never_reaches_the_venue(
    tmp_path: Path, shm_name: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        async with running(tp):
            rules = tp._rules
            assert rules is not None
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            client = OrderClient.attach(f"{shm_name[-20:]}m", exec_ring=f"{shm_name}.exec")
            try:
                coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.005, price=price)
                ack = await asyncio.to_thread(client.wait, coid, 10.0)
                assert ack.status == "NEW"
                await until(lambda: "BTCUSDT" in rules.rules)  # learned from the first order
                # the simulator's BTCUSDT: step 0.00001 (notional is not checked on an amend:
                # pipeline/trading/pretrade.py amend_filter_violation says why)
                cases = [
                    (0.0030005, -1013, "Filter failure: LOT_SIZE (checked locally)"),
                    (0.006, -2038,
                     "Order amend (quantity increase) is not supported. (checked locally)"),
                    (0.005, -2038,
                     "Order amend (quantity increase) is not supported. (checked locally)"),
                ]  # fmt: skip
                for qty, code, text in cases:
                    client.amend(coid, qty=qty)
                    rej = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                    assert (rej.kind, rej.error_code, rej.error_msg) == ("AMEND_REJECT", code, text)
                    assert (rej.status, rej.qty, rej.order_id) == ("NEW", 0.005, ack.order_id)
                assert amends_at_venue(sim) == 0
                assert rules.metrics()["pretrade_rejected"] == len(cases)
                # a good amend still goes out
                client.amend(coid, qty=0.003)
                rep = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                assert (rep.kind, rep.qty) == ("REPLACED", 0.003)
                assert amends_at_venue(sim) == 1
                # an order this process does not track (placed before a restart): sent
                # unchecked, counted, and the venue's own answer comes back
                untracked = rules.metrics()["pretrade_untracked"]
                del tp.session.table.orders[coid]
                client.amend(coid, qty=0.0030005, symbol="BTCUSDT")
                rej = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                assert (rej.kind, rej.error_code) == ("AMEND_REJECT", -1013)
                assert "checked locally" not in rej.error_msg
                assert amends_at_venue(sim) == 2
                assert rules.metrics()["pretrade_untracked"] == untracked + 1
            finally:
                client.close()


@pytest.mark.parametrize("report_first", [False, True], ids=["reply-first", "report-first"])
@async_test
async def test_each_amend_gives_exactly_one_replaced_record_on_the_exec_ring(
    tmp_path: Path, shm_name: str, report_first: bool
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        async with running(tp):
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            client = OrderClient.attach(f"{shm_name[-20:]}r", exec_ring=f"{shm_name}.exec")
            try:
                coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.005, price=price)
                ack = await asyncio.to_thread(client.wait, coid, 10.0)
                assert ack.status == "NEW"
                for qty in (0.004, 0.003):
                    if report_first:  # the reply waits, the user-data event goes at once
                        await sim.set_fault("wsapi_delay", ms=50)
                    client.amend(coid, qty=qty)
                    rep = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                    assert (rep.kind, rep.qty) == ("REPLACED", qty)
                    # the record is the one that came first: the report carries ``I``
                    assert (rep.exec_id >= 0) is report_first
                    await until(lambda: not amend_pending(tp))  # the other one is in too
                    await sim.set_fault("wsapi_delay", ms=0)
                # a status answer comes after every record of both amends on the ring
                client.status(coid)
                st = await asyncio.to_thread(client.wait, coid, 10.0, STATUS_ANSWERS)
                assert st.qty == 0.003
                kinds = [r.kind for r in client.reports(coid)]
                assert [r.qty for r in client.reports(coid) if r.kind == "REPLACED"] == [
                    0.004, 0.003]  # fmt: skip
                assert kinds.count("REPLACED") == 2, kinds
                assert tp.session.metrics["orders_amended"] == 2
                assert tp.session.table.orders[coid].amends == 2
            finally:
                client.close()
