"""Issue #13 order semantics against the simulator over real sockets (127.0.0.1, port 0):
amend keeping priority, cancel / cancelReplace by orderId, RESULT + STP + decimal recvWindow,
orders_in_doubt, and a lossless user-data handover during a rollover.

The handover test drives the sans-I/O :class:`Session` with a minimal shell of its own
(:class:`RawWs` sockets) so that it decides which connection's frames are read when: that is
the only way to put a fill deterministically into the overlap window.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pipeline.sim.testing")

from simhelpers import async_test, until
from test_trading_integration import fast_config, new_key, running, trading

from pipeline.binance.keys import load_private_key
from pipeline.sim.testing import RawWs, SimServer
from pipeline.trading.client import AMEND_ANSWERS, OrderClient
from pipeline.trading.session import (
    ExecKind,
    ExecUpdate,
    Open,
    OrderStatus,
    Send,
    Session,
    State,
)

pytestmark = pytest.mark.slow


@async_test
async def test_amend_keeps_id_and_priority_and_cancel_goes_by_order_id(
    tmp_path: Path, shm_name: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        async with running(tp):
            venue = sim.sim.service.venue
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            client = OrderClient.attach(f"{shm_name[-20:]}a", exec_ring=f"{shm_name}.exec")
            try:
                coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.005, price=price)
                ack = await asyncio.to_thread(client.wait, coid, 10.0)
                assert ack.status == "NEW"
                assert client.amend(coid, qty=0.003) == coid
                rep = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                assert rep.kind == "REPLACED"
                assert rep.qty == 0.003
                assert rep.order_id == ack.order_id  # the same order: priority kept
                (order,) = [o for o in venue.orders.values() if o.order_id == ack.order_id]
                assert order.client_order_id == coid  # the id re-sent: tracking survives
                assert float(order.orig_qty) == 0.003
                # an increase is refused locally (the venue would say -2038)
                client.amend(coid, qty=0.004)
                rej = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                assert rej.kind == "AMEND_REJECT"
                assert rej.qty == 0.003
                # a restarted trading process knows neither the quantity nor the amend count:
                # the venue's -2038 and MAX_NUM_ORDER_AMENDS answers come back as AMEND_REJECT
                del tp.session.table.orders[coid]
                client.amend(coid, qty=0.004, symbol="BTCUSDT")
                rej = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                assert (rej.kind, rej.error_code) == ("AMEND_REJECT", -2038)
                order.amends = 10
                client.amend(coid, qty=0.002, symbol="BTCUSDT")
                rej = await asyncio.to_thread(client.wait, coid, 10.0, AMEND_ANSWERS)
                assert (rej.kind, rej.error_code) == ("AMEND_REJECT", -1013)
                assert "MAX_NUM_ORDER_AMENDS" in rej.error_msg
                # cancel by orderId (acked), through the session so the request can be seen
                s = tp.session
                c2 = "sem-c2"
                assert s.place(c2, "BTCUSDT", "BUY", "LIMIT", 0.002, price, "GTC")
                tp._pump()
                await until(lambda: s.order_status(c2) is OrderStatus.NEW)
                assert s.modify(c2, "sem-c3", qty=0.002, price=round(price * 0.99, 2))
                (p,) = s.connections.conns[s.primary_conn].pending.values()  # type: ignore[index]
                assert p.params["cancelOrderId"] == s.table.orders[c2].order_id
                assert "cancelOrigClientOrderId" not in p.params
                tp._pump()
                await until(lambda: s.order_status("sem-c3") is OrderStatus.NEW)
                assert s.order_status(c2) is OrderStatus.CANCELED
                assert s.cancel("sem-c3")
                (p,) = s.connections.conns[s.primary_conn].pending.values()  # type: ignore[index]
                assert p.params["orderId"] == s.table.orders["sem-c3"].order_id
                assert "origClientOrderId" not in p.params
                tp._pump()
                await until(lambda: s.order_status("sem-c3") is OrderStatus.CANCELED)
            finally:
                client.close()


@async_test
async def test_result_stp_decimal_recv_window_and_orders_in_doubt(
    tmp_path: Path, shm_name: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), recv_window_ms=5000.5)
        async with running(tp):
            s = tp.session
            venue = sim.sim.service.venue
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            client = OrderClient.attach(f"{shm_name[-20:]}s", exec_ring=f"{shm_name}.exec")
            try:
                coid = client.place(
                    symbol="BTCUSDT", side="BUY", qty=0.001, price=price, stp="EXPIRE_BOTH"
                )
                ack = await asyncio.to_thread(client.wait, coid, 10.0)
                assert (ack.kind, ack.status) in (("ACK", "NEW"), ("NEW", "NEW"))
                (order,) = [o for o in venue.orders.values() if o.client_order_id == coid]
                assert order.stp_mode == "EXPIRE_BOTH"
            finally:
                client.close()
            # -1007: the order is in doubt until order.status answers
            await sim.set_fault("order_fault", kind="-1007", count=1)
            assert s.place("sem-u1", "BTCUSDT", "BUY", "LIMIT", 0.001, price, "GTC")
            tp._pump()
            await until(lambda: s.metrics["orders_unknown"] == 1)
            assert s.metrics["orders_in_doubt"] >= 0  # 1 until reconciled (may be at once)
            await until(lambda: s.order_status("sem-u1") is OrderStatus.NEW)
            await until(lambda: s.metrics["orders_in_doubt"] == 0)
            assert s.metrics["orders_unknown_now"] == 0


class MiniShell:
    """Just enough of a shell for :class:`Session`: the test decides when each socket is read."""

    def __init__(self, session: Session, url: str) -> None:
        self.session = session
        self.url = url
        self.socks: dict[int, RawWs] = {}
        self.seen: dict[int, list[dict[str, Any]]] = {}  # conn -> frames read (decoded)

    async def pump(self) -> None:
        acts = self.session.actions()
        while acts:
            for a in acts:
                if isinstance(a, Open):
                    self.socks[a.conn] = await RawWs.connect(self.url)
                    self.seen[a.conn] = []
                    self.session.connected(a.conn)
                elif isinstance(a, Send):
                    self.socks[a.conn].send_frame(1, a.text.encode())
            acts = self.session.actions()
        for ws in self.socks.values():
            await ws.writer.drain()

    async def read_until(self, conn: int, pred: Any, feed: bool = True) -> list[bytes]:
        """Read ``conn``'s frames until one satisfies ``pred``; feed them if ``feed``."""
        got: list[bytes] = []
        while True:
            op, data = await asyncio.wait_for(self.socks[conn].read_frame(), 10)
            if op != 1:
                continue
            got.append(data)
            msg = json.loads(data)
            self.seen[conn].append(msg)
            if feed:
                self.session.frame_received(conn, data.decode())
                await self.pump()
            if pred(msg):
                return got

    async def close(self) -> None:
        for ws in self.socks.values():
            await ws.close()


def is_reply(method_kind: str) -> Any:
    return lambda m: "id" in m and m.get("status") is not None and method_kind in str(m)


def trade_of(coid: str) -> Any:
    return lambda m: m.get("event", {}).get("x") == "TRADE" and m.get("event", {}).get("c") == coid


@async_test
async def test_fill_in_the_rollover_window_is_delivered_exactly_once(tmp_path: Path) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        cfg = fast_config("k", ping_interval_s=1000, json_ping_interval_s=1000,
                          handover_grace_s=60.0, request_timeout_s=10.0)  # fmt: skip
        s = Session(cfg, load_private_key(path))
        sh = MiniShell(s, sim.wsapi_url)
        try:
            s.start()
            await sh.pump()
            await sh.read_until(1, lambda m: (m.get("result") or {}).get("subscriptionId") == 0)
            assert s.state is State.READY
            # rollover: the standby's logon answer is held back, so it does not subscribe yet
            s.connections.server_shutdown(s.connections.conns[1])
            s.tick()
            await sh.pump()
            await sh.read_until(2, lambda m: "serverTime" in (m.get("result") or {}))
            (logon,) = await sh.read_until(2, lambda m: "apiKey" in (m.get("result") or {}),
                                           feed=False)  # fmt: skip
            # case B: a fill while only conn 1 is subscribed; conn 1 is not read yet
            assert s.place("hb1", "BTCUSDT", "BUY", "MARKET", 0.001)
            await sh.pump()
            await until(lambda: any(o.client_order_id == "hb1" and o.status == "FILLED"
                                    for o in sim.sim.service.venue.orders.values()))  # fmt: skip
            # conn 2 subscribes and is promoted before conn 1's frames are read
            s.frame_received(2, logon.decode())
            await sh.pump()
            await sh.read_until(2, lambda m: (m.get("result") or {}).get("subscriptionId") == 0)
            assert s.primary_conn == 2
            await sh.read_until(1, trade_of("hb1"))  # the old primary's late copy
            # case A: a fill while both connections are subscribed: two copies
            assert s.place("hb2", "BTCUSDT", "BUY", "MARKET", 0.001)
            await sh.pump()
            await sh.read_until(2, trade_of("hb2"))
            await sh.read_until(1, trade_of("hb2"))
            updates = [u for u in s.updates() if isinstance(u, ExecUpdate)]
            for coid, copies in (("hb1", {1}), ("hb2", {1, 2})):
                ids = {
                    (c, m["event"]["I"])
                    for c, frames in sh.seen.items()
                    for m in frames
                    if trade_of(coid)(m)
                }
                assert {c for c, _ in ids} == copies  # the window was really exercised
                trades = [u for u in updates if u.client_order_id == coid
                          and u.kind is ExecKind.TRADE]  # fmt: skip
                assert len(trades) == len({i for _, i in ids}) >= 1, (coid, trades)
            assert s.metrics["user_data_duplicates"] >= 1
        finally:
            s.stop()
            await sh.close()


@async_test
async def test_self_trade_prevention_reaches_the_strategy_with_the_report_fields(
    tmp_path: Path, shm_name: str
) -> None:
    """Two orders of our own account meet through a real `pipeline trade` session: the taker
    is expired by STP (EXPIRE_TAKER) and then one is shrunk (DECREMENT); the strategy reads
    the execution id, the STP mode and the prevented quantity from its exec records."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        async with running(tp):
            client = OrderClient.attach(f"{shm_name[-20:]}p", exec_ring=f"{shm_name}.exec")
            try:
                bid, _, ask, _ = sim.market.best("BTCUSDT")
                price = round(float((bid + ask) / 2), 2)
                assert float(bid) < price < float(ask)  # crosses only our own resting order

                async def answer(coid: str, kinds: frozenset[str]) -> Any:
                    return await asyncio.to_thread(client.wait, coid, 10.0, kinds)

                maker = client.place(symbol="BTCUSDT", side="BUY", qty=0.5, price=price,
                                     stp="EXPIRE_TAKER")  # fmt: skip
                assert (await answer(maker, frozenset({"ACK", "NEW"}))).status == "NEW"
                taker = client.place(symbol="BTCUSDT", side="SELL", qty=0.2, price=price,
                                     stp="EXPIRE_TAKER")  # fmt: skip
                t = await answer(taker, frozenset({"EXPIRED"}))
                assert (t.status, t.stp_mode) == ("EXPIRED_IN_MATCH", "EXPIRE_TAKER")
                assert t.exec_id > 0
                assert t.prevented_qty == 0.2

                taker2 = client.place(symbol="BTCUSDT", side="SELL", qty=0.2, price=price,
                                      stp="DECREMENT")  # fmt: skip
                t2 = await answer(taker2, frozenset({"EXPIRED"}))
                assert t2.status == "EXPIRED_IN_MATCH"
                assert t2.exec_id > t.exec_id
                m = await answer(maker, frozenset({"STATUS"}))  # shrunk, still working
                assert (m.status, m.working, m.prevented_qty) == ("NEW", True, 0.2)
                assert tp.session.metrics["user_data_fields_skipped"] == 0
            finally:
                client.close()
