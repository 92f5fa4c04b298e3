"""The trading process against the simulator's WS API (real sockets on 127.0.0.1, port 0).

Timings are shortened through the config (pings every 0.2 s, pong timeout 0.3 s, backoff from
10 ms); waits are for conditions with generous limits, never fixed sleeps for a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

pytest.importorskip("pipeline.sim.testing")
pytest.importorskip("pipeline.sim.wsapi")

from pipeline import shm
from pipeline.backoff import BackoffPolicy
from pipeline.binance.keys import load_private_key
from pipeline.metrics import MetricsBlock
from pipeline.orders import OrderClient
from pipeline.session import EXIT_AUTH, EXIT_GAVE_UP, OrderStatus, SessionConfig, State
from pipeline.sim.testing import SimServer
from pipeline.trading import TradingConfig, TradingProcess

pytestmark = pytest.mark.slow


def run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test body in a fresh event loop (no asyncio pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


def new_key(tmp_path: Path, fmt: str, name: str) -> tuple[Path, bytes]:
    """A fresh Ed25519 key written in ``fmt`` (raw hex / der / pem); returns (path, raw public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if fmt == "raw":
        data = (
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            .hex()
            .encode()
        )
    elif fmt == "raw-b64":
        data = base64.b64encode(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
    elif fmt == "der":
        data = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path = tmp_path / f"{name}.{fmt}"
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path, pub


def fast_config(api_key: str, **kw: Any) -> SessionConfig:
    defaults: dict[str, Any] = {
        "ping_interval_s": 0.2,
        "json_ping_interval_s": 0.2,
        "pong_timeout_s": 0.3,
        "request_timeout_s": 2.0,
        "backoff": BackoffPolicy(initial_s=0.01, max_s=0.05, max_attempts=kw.pop("attempts", 10)),
    }
    defaults.update(kw)
    return SessionConfig(api_key=api_key, **defaults)


def trading(sim: SimServer, shm_name: str, api_key: str, signer: Any, **kw: Any) -> TradingProcess:
    cfg = TradingConfig(
        url=sim.wsapi_url,
        session=fast_config(api_key, **kw),
        exec_ring=f"{shm_name}.exec",
        metrics_name=f"{shm_name}.metrics",
        scan_interval_s=0.05,
    )
    return TradingProcess(cfg, signer)


async def until(pred: Callable[[], bool], limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def assert_failed_block_left(name: str) -> None:
    """After Failed the metrics block stays (writer dead, state FAILED) for `pipeline health`."""
    try:
        with MetricsBlock.attach(name) as block:
            assert block.snapshot()["state"] == int(State.FAILED)
            assert block.writer_pid == os.getpid()  # the writer was this (test) process
    finally:
        shm.unlink(name)


@run
async def test_logon_with_raw_der_and_pem_keys(
    tmp_path: Path, shm_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = {
        fmt: new_key(tmp_path, fmt, f"k{i}")
        for i, fmt in enumerate(("raw", "raw-b64", "der", "pem"))
    }
    async with SimServer(api_keys={f"key-{fmt}": pub for fmt, (_, pub) in keys.items()}) as sim:
        for fmt, (path, _pub) in keys.items():
            tp = trading(
                sim, f"{shm_name}_{fmt.replace('-', '')}", f"key-{fmt}", load_private_key(path)
            )
            task = asyncio.create_task(tp.run())
            await until(
                lambda tp=tp: (
                    tp.session.state is State.READY
                    and tp.session.metrics["user_data_subscribed"] == 1
                )
            )
            tp.request_stop()
            assert await task == 0
    # everything but the simulator's own loggers is our side of the connection
    client_records = [r for r in caplog.records if not r.name.startswith("pipeline.sim")]
    assert any(r.name.startswith("pipeline.session") for r in client_records)
    assert not any('"signature"' in r.getMessage() for r in client_records)
    assert not any("session.logon" in r.getMessage() for r in client_records)


@run
async def test_wrong_key_is_fatal_and_not_retried(tmp_path: Path, shm_name: str) -> None:
    _, registered = new_key(tmp_path, "pem", "good")
    wrong, _ = new_key(tmp_path, "pem", "bad")
    async with SimServer(api_keys={"k": registered}) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(wrong))
        code = await asyncio.wait_for(tp.run(), 10)
        assert code == EXIT_AUTH
        assert tp.session.state is State.FAILED
        assert "-1022" in tp.exit_reason
        assert tp.session.metrics["reconnects_total"] == 0
        assert sim.state()["stats"]["wsapi_connections_total"] == 1
        assert_failed_block_left(f"{shm_name}.metrics")


@run
async def test_blackhole_detected_reconnected_resubscribed(tmp_path: Path, shm_name: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        task = asyncio.create_task(tp.run())
        try:
            await until(lambda: tp.session.state is State.READY)
            block = MetricsBlock.attach(f"{shm_name}.metrics")
            try:
                await until(lambda: block.snapshot()["last_pong_ns"] > 0)
                await sim.set_fault("blackhole", target="wsapi", duration=0.5)
                await until(lambda: tp.session.state is not State.READY)
                await until(
                    lambda: (
                        tp.session.state is State.READY
                        and tp.session.metrics["reconnects_total"] >= 1
                        and tp.session.metrics["user_data_subscribed"] == 1
                    )
                )
                await until(
                    lambda: (
                        block.snapshot()["reconnects_total"] >= 1
                        and block.snapshot()["state"] == int(State.READY)
                    )
                )
                snap = block.snapshot()
                assert snap["transitions_total"] >= 5  # ... -> Reconnecting -> ... -> Ready
                assert snap["authenticated_since_ns"] > 0
                assert snap["reconnect_attempts"] == 0  # reset after success
            finally:
                block.close()
        finally:
            tp.request_stop()
            assert await task == 0


@run
async def test_ten_refused_reconnects_fail(tmp_path: Path, shm_name: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), attempts=10)
        task = asyncio.create_task(tp.run())
        await until(lambda: tp.session.state is State.READY)
        await sim.set_fault("refuse")
        await sim.set_fault("drop", target="wsapi")
        code = await asyncio.wait_for(task, 20)
        assert code == EXIT_GAVE_UP
        assert tp.session.state is State.FAILED
        assert tp.session.metrics["reconnects_total"] == 9  # + the lost one = 10 attempts
        assert sim.faults.fired.get("refuse", 0) >= 9
        assert_failed_block_left(f"{shm_name}.metrics")


@run
async def test_orders_across_disconnects_and_1007(tmp_path: Path, shm_name: str) -> None:
    """Exactly one order per client order id at the venue; every order ends in a known state."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        task = asyncio.create_task(tp.run())
        try:
            await until(lambda: tp.session.state is State.READY)
            s = tp.session
            bid = float(sim.market.best("BTCUSDT")[0])
            price = round(bid * 0.95, 2)
            coids: list[str] = []
            venue = sim.sim.service.venue

            def at_venue(c: str) -> bool:
                return any(o.client_order_id == c for o in venue.orders.values())

            for round_no in range(4):
                if round_no == 0:  # answers held back: the orders execute, the replies are lost
                    await sim.set_fault("wsapi_delay", ms=2000)
                if round_no == 1:
                    await sim.set_fault("order_fault", kind="-1007", count=2)
                if round_no == 2:
                    await sim.set_fault("order_fault", kind="5xx", count=1)
                batch = [f"t{round_no}x{i}" for i in range(4)]
                for coid in batch:
                    assert s.place(coid, "BTCUSDT", "BUY", "LIMIT", 0.001, price, "GTC")
                    coids.append(coid)
                tp._pump()
                lost_before = s.metrics["reconnects_total"]
                if round_no == 0:
                    await until(lambda b=batch: all(at_venue(c) for c in b))
                    await sim.set_fault("drop", target="wsapi")
                    await sim.set_fault("wsapi_delay", ms=0)
                if round_no == 3:  # dropped before the writes surely went out
                    await sim.set_fault("drop", target="wsapi")
                if round_no in (0, 3):
                    await until(lambda n=lost_before: s.metrics["reconnects_total"] > n)
                await until(
                    lambda: (
                        s.state is State.READY
                        and all(
                            s.order_status(c) not in (OrderStatus.PENDING, OrderStatus.UNKNOWN)
                            for c in coids
                        )
                    ),
                    limit_s=15,
                )
            open_orders = sim.state()["venue"]["open_orders"]
            per_coid = collections.Counter(o.client_order_id for o in venue.orders.values())
            assert all(n == 1 for n in per_coid.values()), per_coid
            statuses = s.orders()
            for c in coids:
                assert statuses[c] in (
                    OrderStatus.NEW,
                    OrderStatus.FILLED,
                    OrderStatus.PARTIALLY_FILLED,
                    OrderStatus.REJECTED,
                ), c
                if statuses[c] is OrderStatus.NEW:
                    assert c in open_orders
                if statuses[c] is OrderStatus.REJECTED:
                    assert per_coid.get(c, 0) == 0
            assert all(statuses[c] is OrderStatus.NEW for c in coids[:8])  # reconciled
            # round 0: 4 placed (answers lost); round 1: 4 placed (2 answered -1007);
            # round 2: 3 placed (one 5xx, not placed); round 3: whatever got out before the drop
            assert all(per_coid[c] == 1 for c in coids[:8])
            assert sum(per_coid[c] for c in coids[8:12]) == 3
            assert s.metrics["orders_unknown"] >= 3
            assert s.metrics["orders_reconciled"] >= 3
        finally:
            tp.request_stop()
            assert await task == 0


@run
async def test_order_client_round_trip(tmp_path: Path, shm_name: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        task = asyncio.create_task(tp.run())
        try:
            await until(lambda: tp.session.state is State.READY)
            bid = float(sim.market.best("BTCUSDT")[0])
            client = OrderClient.attach(f"{shm_name[-20:]}c", exec_ring=f"{shm_name}.exec")
            try:
                coid = client.place(
                    symbol="BTCUSDT", side="BUY", type="LIMIT", qty=0.001, price=round(bid * 0.9, 2)
                )
                ack = await asyncio.to_thread(client.wait, coid, 10.0)
                assert ack.kind in ("ACK", "NEW")
                assert ack.status == "NEW"
                assert ack.order_id > 0
                new = client.modify(coid, qty=0.002, price=round(bid * 0.89, 2))
                ans = await asyncio.to_thread(client.wait, new, 10.0)
                assert ans.status == "NEW", ans
                client.status(new, symbol="BTCUSDT")
                st = await asyncio.to_thread(client.wait, new, 10.0, frozenset({"STATUS"}))
                assert st.qty == 0.002 or st.status == "NEW"
                client.cancel(new)
                c = await asyncio.to_thread(
                    client.wait, new, 10.0, frozenset({"CANCELED", "CANCEL_REJECT"})
                )
                assert c.kind == "CANCELED"
                assert c.status == "CANCELED"
            finally:
                client.close()
        finally:
            tp.request_stop()
            assert await task == 0


@run
async def test_server_shutdown_rolls_over_without_downtime(tmp_path: Path, shm_name: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        states: list[State] = []
        task = asyncio.create_task(tp.run())
        try:
            await until(lambda: tp.session.state is State.READY)
            hook = tp.session.on_transition

            def record(old: State, new: State, event: str) -> None:
                states.append(new)
                if hook is not None:
                    hook(old, new, event)

            tp.session.on_transition = record
            first = tp.session.primary_conn
            await sim.set_fault("shutdown", target="wsapi", close_after=1.0)
            await until(lambda: tp.session.metrics["rollovers_total"] == 1)
            assert tp.session.primary_conn != first
            assert tp.session.state is State.READY
            assert states == []  # never left Ready: make-before-break
            assert tp.session.metrics["reconnects_total"] == 0
            assert tp.session.metrics["user_data_subscribed"] == 1
            bid = float(sim.market.best("BTCUSDT")[0])
            assert tp.session.place("after1", "BTCUSDT", "BUY", "LIMIT", 0.001, round(bid * 0.9, 2))
            tp._pump()
            await until(lambda: tp.session.order_status("after1") is OrderStatus.NEW)
        finally:
            tp.request_stop()
            assert await task == 0


@run
async def test_429_is_honoured(tmp_path: Path, shm_name: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), json_ping_interval_s=100.0)
        task = asyncio.create_task(tp.run())
        try:
            await until(lambda: tp.session.state is State.READY)
            s = tp.session
            price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
            await sim.set_fault("order_fault", kind="429", count=1)
            assert s.place("r1", "BTCUSDT", "BUY", "LIMIT", 0.001, price)
            tp._pump()
            await until(lambda: s.order_status("r1") is OrderStatus.REJECTED)
            assert s.metrics["rate_limited_until_ns"] > 0
            assert not s.place("r2", "BTCUSDT", "BUY", "LIMIT", 0.001, price)  # held back
            await until(lambda: s.place("r3", "BTCUSDT", "BUY", "LIMIT", 0.001, price))
            tp._pump()
            await until(lambda: s.order_status("r3") is OrderStatus.NEW)
            venue = sim.sim.service.venue
            coids = {o.client_order_id for o in venue.orders.values()}
            assert "r1" not in coids
            assert "r2" not in coids
        finally:
            tp.request_stop()
            assert await task == 0
