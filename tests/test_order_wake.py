"""Issue #13: the order rings' doorbell (pipeline/trading/wake.py) instead of a 0.5 ms poll.

The channel alone (word + socket, in this process), then a trading process against the
simulator whose periodic scan and safety poll are set to a minute, so an order that is answered
at all was carried by the wake-up; and the fallback: a wake segment name held by a file the
trust rule refuses makes the trading process poll and say so in its metrics block.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

pytest.importorskip("pipeline.sim.testing")

from simhelpers import async_test, until
from test_trading_integration import new_key, running, trading

from pipeline.binance.keys import load_private_key
from pipeline.ipc import shm
from pipeline.ipc.metrics import MetricsBlock
from pipeline.sim.testing import SimServer
from pipeline.trading.client import OrderClient
from pipeline.trading.wake import WAKE_SCAN, WakeChannel, WakeSender, wake_name_for


def test_wake_name_follows_the_exec_ring() -> None:
    assert wake_name_for("pipeline.trading.exec") == "pipeline.trading.wake"
    assert wake_name_for("x.exec") == "x.wake"
    assert wake_name_for("plain") == "plain.wake"


def test_client_rings_only_while_the_trader_sleeps(shm_name: str) -> None:
    name = f"{shm_name}.wake"
    channel = WakeChannel.create(name)
    sender = WakeSender(name)
    try:
        sender.notify()  # created asleep: the first record rings
        assert channel.take() == (1, False)
        channel.set_sleeping(False)  # draining: records need no ring
        for _ in range(5):
            sender.notify()
        assert channel.take() == (0, False)
        assert sender.sent == 1
        sender.notify(WAKE_SCAN)  # a new ring is announced even to an awake trader
        assert channel.take() == (1, True)
        channel.set_sleeping(True)
        sender.notify()
        sender.notify()
        assert channel.take() == (2, False)
        assert channel.foreign == 0
        assert channel.wakes == 4
    finally:
        sender.close()
        channel.close()
    assert shm.current_inode(name) is None  # the segment goes with the channel


def test_a_replaced_trader_is_found_again(shm_name: str) -> None:
    name = f"{shm_name}.wake"
    first = WakeChannel.create(name)
    sender = WakeSender(name, recheck_s=0.0)
    try:
        sender.notify()
        assert first.take() == (1, False)
        first.close()  # the trading process exits (its word says: ring, to find out)
        second = WakeChannel.create(name)
        try:
            sender.notify()  # new segment inode: reconnects to the new socket
            assert second.take() == (1, False)
        finally:
            second.close()
        sender.notify()  # nobody there: nothing raised
        assert sender.failed + sender.sent >= 2
    finally:
        sender.close()


def test_a_stale_wake_segment_of_ours_is_replaced(shm_name: str) -> None:
    name = f"{shm_name}.wake"
    left = shm.Segment.create(name, 128)  # as if a trading process had been killed
    left.close()
    channel = WakeChannel.create(name)
    try:
        sender = WakeSender(name)
        sender.notify()
        sender.close()
        assert channel.take() == (1, False)
    finally:
        channel.close()


def test_client_ignores_an_untrusted_wake_segment(shm_name: str) -> None:
    name = f"{shm_name}.wake"
    channel = WakeChannel.create(name)
    try:
        os.chmod(shm.path_of(name), 0o644)  # group/other may write: not ours to trust
        sender = WakeSender(name)
        sender.notify()
        sender.close()
        assert sender.sent == 0
        assert channel.take() == (0, False)
    finally:
        channel.close()


@async_test
async def test_an_order_is_carried_by_the_wake_up_alone(tmp_path: Path, shm_name: str) -> None:
    """Periodic scan and safety poll at a minute: the ring is found because the client
    announced it, and each order executed because the client rang."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        tp.config.scan_interval_s = 60.0
        tp.config.wake_poll_interval_s = 60.0
        tp.config.spin_after_order_s = 0.0  # asleep again right after each order
        async with running(tp):
            assert tp._orders.wake is not None
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            client = OrderClient.attach(f"{shm_name[-20:]}w", exec_ring=f"{shm_name}.exec")
            try:
                for _ in range(3):
                    coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price)
                    ack = await asyncio.to_thread(client.wait, coid, 10.0)
                    assert (ack.kind, ack.status) == ("ACK", "NEW"), ack
                    client.cancel(coid, symbol="BTCUSDT")
                    done = await asyncio.to_thread(
                        client.wait, coid, 10.0, frozenset({"CANCELED", "CANCEL_REJECT"})
                    )
                    assert done.kind == "CANCELED", done
            finally:
                client.close()
            with MetricsBlock.attach(f"{shm_name}.metrics") as block:
                await until(lambda: block.snapshot()["order_wakes"] >= 1)
                snap = block.snapshot()
                assert snap["problem_order_wake_unavailable"] == 0
                assert snap["order_wakes_foreign"] == 0


@async_test
async def test_while_orders_flow_the_trader_stays_awake_and_clients_need_not_ring(
    tmp_path: Path, shm_name: str
) -> None:
    """After an order the trading process polls its rings for ``spin_after_order_s`` instead
    of sleeping: the next orders are taken without a ring (the client sees it awake)."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        tp.config.scan_interval_s = 60.0
        tp.config.wake_poll_interval_s = 60.0
        tp.config.spin_after_order_s = 60.0
        async with running(tp):
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            client = OrderClient.attach(f"{shm_name[-20:]}s", exec_ring=f"{shm_name}.exec")
            try:
                sender = client._wake
                assert sender is not None
                rang: list[int] = []
                for _ in range(4):
                    coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price)
                    ack = await asyncio.to_thread(client.wait, coid, 10.0)
                    assert (ack.kind, ack.status) == ("ACK", "NEW"), ack
                    client.cancel(coid, symbol="BTCUSDT")
                    done = await asyncio.to_thread(
                        client.wait, coid, 10.0, frozenset({"CANCELED", "CANCEL_REJECT"})
                    )
                    assert done.kind == "CANCELED", done
                    rang.append(sender.sent)
                assert rang[0] >= 1  # the first order woke it (and announced the ring)
                assert rang[1:] == [rang[0]] * 3, rang  # then it stayed awake: no more rings
            finally:
                client.close()


@async_test
async def test_without_a_wake_channel_orders_are_polled_and_health_says_so(
    tmp_path: Path, shm_name: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    planted = shm.path_of(f"{shm_name}.wake")
    planted.write_bytes(b"x" * 128)
    os.chmod(planted, 0o644)  # fails the trust rule: cannot be ours to replace
    try:
        async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
            tp = trading(sim, shm_name, "k", load_private_key(path))
            async with running(tp):
                assert tp._orders.wake is None
                price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
                client = OrderClient.attach(f"{shm_name[-20:]}p", exec_ring=f"{shm_name}.exec")
                try:
                    coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price)
                    ack = await asyncio.to_thread(client.wait, coid, 10.0)
                    assert (ack.kind, ack.status) == ("ACK", "NEW"), ack
                finally:
                    client.close()
                with MetricsBlock.attach(f"{shm_name}.metrics") as block:
                    await until(lambda: block.snapshot()["problem_order_wake_unavailable"] == 1)
        assert planted.read_bytes() == b"x" * 128  # never touched
    finally:
        planted.unlink()
