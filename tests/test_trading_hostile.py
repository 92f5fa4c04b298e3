"""Issue #11, trading part: a confused or hostile exchange, over a real socket.

The simulator's ``hostile_reply`` fault sends what a real venue should not (numbers out of
int64, ``result: null`` for an order it DID execute, 100 000-deep JSON, 5xx to every status
query); the trading process runs in this process against it on 127.0.0.1 (the same harness as
tests/test_trading_integration.py). Waits are for conditions; the only timed window (the
reconciliation budget) turns the time it actually took into the allowance, so a slow machine
can only make the assertion easier.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipeline.sim.testing")

from simhelpers import async_test, until
from test_trading_integration import new_key, running, trading

from pipeline.binance.keys import load_private_key
from pipeline.ipc import shm
from pipeline.ipc.metrics import MetricsBlock
from pipeline.ipc.ring import RingReader
from pipeline.sim.testing import SimServer
from pipeline.trading.process import EXIT_CRASH
from pipeline.trading.session import (
    LOCAL_NOT_FOUND,
    LOCAL_OUTBOX_FULL,
    ExecKind,
    OrderStatus,
    State,
)
from pipeline.trading.wire import OrderAction

pytestmark = pytest.mark.slow

I64_MAX = (1 << 63) - 1


def _fired(sim: SimServer) -> int:
    return sim.faults.fired.get("hostile_reply", 0)


def _price(sim: SimServer) -> float:
    return round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)


def _moved(block: MetricsBlock, then: float) -> bool:
    return block.snapshot()["_updated_at_ns"] > then


def _records(reader: RingReader, seen: list[np.ndarray]) -> list[tuple[str, int, int, int]]:
    """Everything on the exec ring so far as (client order id, kind, status, error code)."""
    batch = reader.poll()
    if len(batch):
        seen.append(batch.copy())
    return [
        (
            bytes(r["client_order_id"]).decode(),
            int(r["kind"]),
            int(r["status"]),
            int(r["error_code"]),
        )
        for b in seen
        for r in b
    ]


# ---- bullet 1: numbers out of int64 must not half-kill the process ---------------------------


@async_test
async def test_int64_overflow_from_venue_is_a_counted_protocol_error(
    tmp_path: Path, shm_name: str
) -> None:
    """rateLimits count 2**63 and retryAfter 10**17 used to raise in _flush_metrics and kill
    the timer task (no pings, no reconnects, block still READY). Now: counted, and the
    process keeps pinging, trading and reconnecting."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), default_retry_after_s=0.3)
        async with running(tp):
            s = tp.session
            block = MetricsBlock.attach(f"{shm_name}.metrics")
            try:
                await sim.set_fault("hostile_reply", kind="rate_limits_overflow", count=3)
                await until(lambda: _fired(sim) >= 3)
                await until(lambda: s.metrics["protocol_errors"] >= 3)
                # the timer task is alive: a ping frame sent after the fault got its pong
                pong_then = s.metrics["last_pong_ns"]
                await until(lambda: s.metrics["last_pong_ns"] > pong_then)
                await until(lambda: block.snapshot()["protocol_errors"] >= 3)
                assert block.snapshot()["weight_used"] < I64_MAX

                await sim.set_fault("hostile_reply", kind="retry_after_overflow", count=1)
                assert s.place("ra1", "BTCUSDT", "BUY", "LIMIT", 0.001, _price(sim))
                tp._pump()
                await until(lambda: s.order_status("ra1") is OrderStatus.REJECTED)
                assert s.metrics["protocol_errors"] >= 4
                # the absurd retryAfter fell back to the default wait, not 3 million years
                until_ns = s.metrics["rate_limited_until_ns"]
                assert 0 < until_ns < time.time_ns() + 60 * 10**9
                await until(lambda: s.place("ra2", "BTCUSDT", "BUY", "LIMIT", 0.001, _price(sim)))
                tp._pump()
                await until(lambda: s.order_status("ra2") is OrderStatus.NEW)

                # and it still reconnects
                await sim.set_fault("drop", target="wsapi")
                await until(lambda: s.metrics["reconnects_total"] >= 1 and s.state is State.READY)
                await until(lambda: block.snapshot()["state"] == int(State.READY))
            finally:
                block.close()


@async_test
async def test_a_dead_long_lived_task_ends_the_process(
    tmp_path: Path, shm_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Any exception in a long-lived task ends the process with EXIT_CRASH and the traceback
    logged, instead of leaving it half alive; the metrics block stays behind (writer gone)
    so `pipeline health` reports it."""
    caplog.set_level(logging.ERROR, logger="pipeline.trading")
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        task = asyncio.create_task(tp.run())
        try:
            await until(lambda: tp.session.state is State.READY)

            def broken_tick() -> None:
                raise RuntimeError("simulated bug in the timer task")

            tp.session.tick = broken_tick  # type: ignore[method-assign]
            tp._wake.set()
            code = await asyncio.wait_for(task, 10)
        finally:
            if not task.done():
                tp.request_stop()
                await task
        try:
            assert code == EXIT_CRASH
            assert "trading-timers" in tp.exit_reason
            crash = [r for r in caplog.records if getattr(r, "event", "") == "task_crashed"]
            assert crash
            assert crash[0].exc_info is not None
            with MetricsBlock.attach(f"{shm_name}.metrics") as block:  # left for `health`
                assert block.snapshot()["_writer_pid"] == os.getpid()
        finally:
            shm.unlink(f"{shm_name}.metrics")


# ---- bullets 2 and 5: a reply we cannot understand never loses the order ---------------------


@pytest.mark.parametrize("kind", ["null_result", "order_id_overflow", "deep_json"])
@async_test
async def test_unreadable_order_reply_makes_it_unknown_then_reconciled(
    tmp_path: Path, shm_name: str, kind: str
) -> None:
    """`{"status":200,"result":null}` left the order PENDING forever; an orderId of 2**64 lost
    the ACK and dropped the connection; 100k-deep JSON escaped as a RecursionError. The order
    WAS executed at the venue: it must become UNKNOWN, be reconciled to NEW, with the exec ring
    saying so and the connection kept."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        async with running(tp):
            s = tp.session
            seen: list[np.ndarray] = []
            with RingReader.attach(f"{shm_name}.exec", "t") as reader:
                await sim.set_fault("hostile_reply", kind=kind, count=1)
                assert s.place("h1", "BTCUSDT", "BUY", "LIMIT", 0.001, _price(sim))
                assert s.place("h2", "BTCUSDT", "BUY", "LIMIT", 0.001, _price(sim))
                tp._pump()
                await until(
                    lambda: (
                        s.order_status("h1") is OrderStatus.NEW
                        and s.order_status("h2") is OrderStatus.NEW
                    )
                )
                assert s.metrics["protocol_errors"] >= 1
                assert s.metrics["orders_unknown"] == 1
                assert s.metrics["orders_reconciled"] == 1
                assert s.metrics["reconnects_total"] == 0  # the connection was kept
                await until(
                    lambda: (
                        [(c, k) for c, k, _, _ in _records(reader, seen) if c == "h1"]
                        == [("h1", ExecKind.UNKNOWN), ("h1", ExecKind.RECONCILED)]
                    )
                )
                assert ("h2", ExecKind.ACK) in [(c, k) for c, k, _, _ in _records(reader, seen)]
            venue = sim.sim.service.venue
            placed = [o.client_order_id for o in venue.orders.values()]
            assert placed.count("h1") == 1  # never resent
            assert placed.count("h2") == 1


# ---- bullet 3: reconciliation has a budget -------------------------------------------------


@async_test
async def test_reconciliation_of_40_unknown_orders_stays_within_budget(
    tmp_path: Path, shm_name: str
) -> None:
    """40 UNKNOWN orders whose status queries all fail used to cost 240 order.status in 6 s
    (one per order per second). Now: per-order backoff, one weight budget (a fifth of the
    per-minute limit: at most 10 + 5/s requests), openOrders.status for the symbol, and the
    stale ones raise problem_unknown_orders_stale until they are known again (here: not found,
    since a 5xx order.place placed nothing)."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(
            sim,
            shm_name,
            "k",
            load_private_key(path),
            unknown_stale_s=0.5,
            reconcile_max_interval_s=1.0,
            json_ping_interval_s=100.0,
        )
        async with running(tp):
            s = tp.session
            block = MetricsBlock.attach(f"{shm_name}.metrics")
            try:
                await sim.set_fault("hostile_reply", kind="status_5xx", count=100_000)
                # 5xx: outcome unknown to the client, nothing placed (so no user data either)
                await sim.set_fault("order_fault", kind="5xx", count=40)
                coids = [f"b{i}" for i in range(40)]
                svc = sim.sim.service

                def asked() -> int:
                    m = svc.method_counts
                    return m.get("order.status", 0) + m.get("openOrders.status", 0)

                for c in coids:
                    assert s.place(c, "BTCUSDT", "BUY", "LIMIT", 0.001, _price(sim))
                t0 = time.monotonic()
                before = asked()
                tp._pump()
                await until(lambda: all(s.order_status(c) is OrderStatus.UNKNOWN for c in coids))
                await asyncio.sleep(3.0)  # an observation window, not a wait for an outcome
                n = asked() - before
                elapsed = time.monotonic() - t0
                assert n <= 10 + 5 * elapsed + 2, (n, elapsed)  # was 40 per second
                assert svc.method_counts.get("openOrders.status", 0) >= 1  # bulk was used
                await until(lambda: block.snapshot()["problem_unknown_orders_stale"] == 40)
                assert block.snapshot()["orders_unknown_now"] == 40

                await sim.set_fault("hostile_reply", kind="status_5xx", count=0)
                await until(
                    lambda: all(s.order_status(c) is OrderStatus.REJECTED for c in coids),
                    limit_s=30,
                )
                assert s.metrics["orders_reconciled"] == 40
                await until(lambda: block.snapshot()["problem_unknown_orders_stale"] == 0)
                assert block.snapshot()["orders_unknown_now"] == 0
            finally:
                block.close()


# ---- bullet 4: the outbox is bounded, with a clear reject ------------------------------------


def _cmd(action: OrderAction, coid: str, price: float) -> Any:
    return types.SimpleNamespace(
        action=action,
        client_order_id=coid,
        orig_client_order_id="",
        symbol="BTCUSDT",
        side="BUY",
        type="LIMIT",
        qty=0.001,
        price=price,
        tif="GTC",
        submit_time_ns=time.time_ns(),
        client_id=7,
        stp="",
    )


@async_test
async def test_outbox_is_bounded_orders_refused_then_connection_recycled(
    tmp_path: Path, shm_name: str
) -> None:
    """A connection whose writer does not drain: orders beyond the outbox's room are refused
    with LOCAL_OUTBOX_FULL on the exec ring (not queued without bound); when even pings find it
    full the connection is dropped and reopened, and the orders stuck in it become UNKNOWN and
    are reconciled (never sent: reported not found), never resent."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        tp.config.outbox_capacity = 64 + 8  # 8 frames of room for orders
        async with running(tp):
            s = tp.session
            conn = tp._conns[s.primary_conn]  # type: ignore[index]
            writer = next(t for t in conn.tasks if "writer" in t.get_name())
            writer.cancel()  # a writer stuck forever, as on a peer that stopped reading
            await asyncio.sleep(0)
            seen: list[np.ndarray] = []
            with RingReader.attach(f"{shm_name}.exec", "t") as reader:
                price = _price(sim)
                for i in range(20):
                    tp._execute(_cmd(OrderAction.PLACE, f"q{i}", price))
                tp._pump()
                recs = _records(reader, seen)
                refused = {
                    c for c, k, _, e in recs if k == ExecKind.REJECT and e == LOCAL_OUTBOX_FULL
                }
                assert len(refused) >= 12 - 1  # room for ~8 (one ping may have taken a slot)
                assert tp._metrics is not None
                await until(lambda: tp._metrics.snapshot()["outbox_full_rejects"] >= 11)  # type: ignore[union-attr]
                # pings keep coming; when the outbox is full the connection is recycled
                await until(lambda: s.metrics["reconnects_total"] >= 1 and s.state is State.READY)
                queued = [f"q{i}" for i in range(20) if f"q{i}" not in refused]
                await until(lambda: all(s.order_status(c) is OrderStatus.REJECTED for c in queued))
                recs = _records(reader, seen)
                for c in queued:
                    mine = [(k, e) for cc, k, _, e in recs if cc == c]
                    assert (ExecKind.UNKNOWN, mine[0][1]) == mine[0], mine
                    assert mine[-1] == (ExecKind.REJECT, LOCAL_NOT_FOUND), mine
            venue = sim.sim.service.venue
            assert not any(o.client_order_id.startswith("q") for o in venue.orders.values())


# ---- bullet 6: heartbeat ------------------------------------------------------------------


@async_test
async def test_idle_trader_writes_its_metrics_block_every_heartbeat(
    tmp_path: Path, shm_name: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}) as sim:
        tp = trading(
            sim,
            shm_name,
            "k",
            load_private_key(path),
            ping_interval_s=100,
            json_ping_interval_s=100,
        )
        tp.config.heartbeat_interval_s = 0.2
        async with running(tp):
            with MetricsBlock.attach(f"{shm_name}.metrics") as block:
                assert block.snapshot()["heartbeat_interval_ms"] == 200
                for _ in range(3):  # nothing happens, yet the block keeps moving
                    then = block.snapshot()["_updated_at_ns"]
                    await until(functools.partial(_moved, block, then))
