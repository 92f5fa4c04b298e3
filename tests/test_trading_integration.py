"""The trading process against the simulator's WS API (real sockets on 127.0.0.1, port 0).

Timings are shortened through the config (pings every 0.2 s, pong timeout 0.3 s, backoff from
10 ms); waits are for conditions with generous limits, never fixed sleeps for a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

pytest.importorskip("pipeline.sim.testing")
pytest.importorskip("pipeline.sim.wsapi")

from simhelpers import async_test, until

from pipeline.backoff import BackoffPolicy
from pipeline.binance.keys import load_private_key
from pipeline.ipc import shm
from pipeline.ipc.metrics import MetricsBlock, MetricsError
from pipeline.sim.testing import SimServer
from pipeline.trading.client import OrderClient
from pipeline.trading.process import TradingConfig, TradingProcess
from pipeline.trading.session import EXIT_AUTH, EXIT_GAVE_UP, OrderStatus, SessionConfig, State

pytestmark = pytest.mark.slow


_ENC, _PRIV = serialization.Encoding, serialization.PrivateFormat
# fmt -> how the private key is written; "raw" is then hex-encoded, "raw-b64" base64-encoded
_KEY_FORMATS = {
    "raw": (_ENC.Raw, _PRIV.Raw),
    "raw-b64": (_ENC.Raw, _PRIV.Raw),
    "der": (_ENC.DER, _PRIV.PKCS8),
    "pem": (_ENC.PEM, _PRIV.PKCS8),
}


def new_key(tmp_path: Path, fmt: str, name: str) -> tuple[Path, bytes]:
    """A fresh Ed25519 key written in ``fmt`` (raw hex / der / pem); returns (path, raw public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(_ENC.Raw, serialization.PublicFormat.Raw)
    encoding, private_format = _KEY_FORMATS[fmt]
    data = key.private_bytes(encoding, private_format, serialization.NoEncryption())
    if fmt == "raw":
        data = data.hex().encode()
    elif fmt == "raw-b64":
        data = base64.b64encode(data)
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


def trading(sim: SimServer, shm_name: str, api_key: str, signer: Any, *,
            transport: str = "picows", **kw: Any) -> TradingProcess:
    cfg = TradingConfig(
        url=sim.wsapi_url,
        session=fast_config(api_key, **kw),
        exec_ring=f"{shm_name}.exec",
        metrics_name=f"{shm_name}.metrics",
        scan_interval_s=0.05,
        transport=transport,
    )
    return TradingProcess(cfg, signer)


@contextlib.asynccontextmanager
async def running(tp: TradingProcess) -> AsyncIterator[TradingProcess]:
    """Run ``tp`` until it is Ready; on the way out stop it and check that it exited 0."""
    task = asyncio.create_task(tp.run())
    try:
        await until(lambda: tp.session.state is State.READY)
        yield tp
    finally:
        tp.request_stop()
        assert await task == 0


def assert_failed_block_left(name: str) -> None:
    """After Failed the metrics block stays (writer dead, state FAILED) for `pipeline health`."""
    try:
        with MetricsBlock.attach(name) as block:
            assert block.snapshot()["state"] == int(State.FAILED)
            assert block.writer_pid == os.getpid()  # the writer was this (test) process
    finally:
        shm.unlink(name)


@async_test
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
                functools.partial(
                    lambda tp: (
                        tp.session.state is State.READY
                        and tp.session.metrics["user_data_subscribed"] == 1
                    ),
                    tp,
                )
            )
            tp.request_stop()
            assert await task == 0
    # everything but the simulator's own loggers is our side of the connection
    client_records = [r for r in caplog.records if not r.name.startswith("pipeline.sim")]
    assert any(r.name.startswith("pipeline.session") for r in client_records)
    assert not any('"signature"' in r.getMessage() for r in client_records)
    assert not any("session.logon" in r.getMessage() for r in client_records)


@async_test
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


@async_test
@pytest.mark.parametrize("transport", ["picows", "websockets"])
async def test_blackhole_detected_reconnected_resubscribed(
    tmp_path: Path, shm_name: str, transport: str
) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), transport=transport)
        async with running(tp):
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


@async_test
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


@async_test
@pytest.mark.parametrize("transport", ["picows", "websockets"])
async def test_orders_across_disconnects_and_1007(
    tmp_path: Path, shm_name: str, transport: str
) -> None:
    """Exactly one order per client order id at the venue; every order ends in a known state,
    on either WebSocket transport (``--transport websockets`` is the fallback)."""
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), transport=transport)
        async with running(tp):
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
                    await until(functools.partial(lambda b: all(at_venue(c) for c in b), batch))
                    await sim.set_fault("drop", target="wsapi")
                    await sim.set_fault("wsapi_delay", ms=0)
                if round_no == 3:  # dropped before the writes surely went out
                    await sim.set_fault("drop", target="wsapi")
                if round_no in (0, 3):
                    await until(
                        functools.partial(lambda n: s.metrics["reconnects_total"] > n, lost_before)
                    )
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


@async_test
@pytest.mark.parametrize("transport", ["picows", "websockets"])
async def test_order_client_round_trip(tmp_path: Path, shm_name: str, transport: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), transport=transport)
        async with running(tp):
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


@async_test
async def test_server_shutdown_rolls_over_without_downtime(tmp_path: Path, shm_name: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path))
        states: list[State] = []
        async with running(tp):
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


@async_test
async def test_429_is_honoured(tmp_path: Path, shm_name: str) -> None:
    path, pub = new_key(tmp_path, "pem", "k")
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        tp = trading(sim, shm_name, "k", load_private_key(path), json_ping_interval_s=100.0)
        async with running(tp):
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


# ---- systemd notification ------------------------------------------------------------------


def test_watchdog_fed_only_while_healthy() -> None:
    """Ready, or reconnecting within the attempt budget, feeds the watchdog; Failed or an
    exhausted budget starves it (systemd then restarts the process)."""
    from pipeline.ops import sdnotify

    sent: list[tuple[str, ...]] = []
    now = [0.0]
    cfg = TradingConfig(url="ws://127.0.0.1:9/", session=fast_config("k", attempts=3))
    tp = TradingProcess(cfg, None)

    def send(*lines: str, env: Any = None) -> bool:
        sent.append(lines)
        return True

    tp._watchdog = sdnotify.Watchdog(1.0, clock=lambda: now[0], send=send)
    s = tp.session

    def step(state: State, attempts: int = 0) -> bool:
        s.state = state
        s.metrics["reconnect_attempts"] = attempts
        now[0] += 1.0
        before = len(sent)
        tp._feed_watchdog()
        return len(sent) > before

    assert step(State.CONNECTING)  # starting up
    assert step(State.READY)
    assert step(State.RECONNECTING, attempts=2)
    assert not step(State.RECONNECTING, attempts=3)  # budget spent: about to give up
    assert not step(State.FAILED)
    assert step(State.READY)
    assert all(lines[0] == "WATCHDOG=1" for lines in sent)


@pytest.mark.slow
def test_sd_notify_ready_after_logon_watchdog_and_stopping(tmp_path: Path, shm_name: str) -> None:
    """`pipeline trade` under a fake systemd: a real AF_UNIX datagram socket as NOTIFY_SOCKET."""
    import socket
    import subprocess
    import sys
    import tempfile

    from pipeline.cli import main
    from pipeline.sim.testing import run_sim_process

    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    pub = tmp_path / "k" / "ed25519_public.pem"
    key = tmp_path / "k" / "ed25519_private.pem"
    sockdir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # AF_UNIX paths are short
    sock_path = os.path.join(sockdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    messages: list[tuple[str, int]] = []  # (datagram, block state when it arrived)

    metrics = f"{shm_name}.trading.metrics"  # <prefix>trading.metrics: `pipeline health` finds it

    def block_value(name: str) -> float:
        try:
            with MetricsBlock.attach(metrics) as m:
                return m.snapshot()[name]
        except (FileNotFoundError, MetricsError):  # not there, or still being created
            return -1

    def block_state() -> int:
        return int(block_value("state"))

    try:
        with run_sim_process("--symbols", "BTCUSDT", "--api-key", f"k1={pub}") as sim:
            env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
            env.pop("WATCHDOG_PID", None)
            log_path = tmp_path / "trade.log"
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pipeline", "trade", "--wsapi-url", sim.wsapi_url,
                     "--api-key", "k1", "--private-key", str(key),
                     "--exec-ring", f"{shm_name}.exec", "--metrics", metrics,
                     "--order-prefix", f"{shm_name}.o.", "--ping-interval", "0.2"],
                    env=env, stdout=subprocess.DEVNULL, stderr=log_file,
                )  # fmt: skip
            try:
                deadline = time.monotonic() + 20

                def seen(prefix: str) -> list[int]:
                    return [i for i, (m, _) in enumerate(messages) if prefix in m.split("\n")]

                def done() -> bool:
                    ready = seen("READY=1")
                    return bool(ready) and any(i > ready[0] for i in seen("WATCHDOG=1"))

                while not done():
                    assert time.monotonic() < deadline, (messages, log_path.read_text()[-2000:])
                    assert proc.poll() is None, log_path.read_text()[-2000:]
                    try:
                        data = sock.recv(4096).decode()
                    except TimeoutError:
                        continue
                    messages.append((data, block_state()))
                while block_value("rtt_us") <= 0:  # a ping frame's pong came back
                    assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                    time.sleep(0.02)
                health = health_json(tmp_path, shm_name)
            finally:
                proc.terminate()
                proc.wait(20)
            assert proc.returncode == 0, log_path.read_text()[-2000:]
            while True:  # what was sent while stopping
                try:
                    messages.append((sock.recv(4096).decode(), -1))
                except TimeoutError:
                    break
    finally:
        sock.close()
        os.unlink(sock_path)
        os.rmdir(sockdir)
    ready = [(m, st) for m, st in messages if "READY=1" in m.split("\n")]
    assert len(ready) == 1
    text, state_then = ready[0]
    assert state_then == int(State.READY)  # logged on before systemd hears "started"
    assert f"MAINPID={proc.pid}" in text.split("\n")
    assert "STATUS=ready: logged on" in text.split("\n")
    assert any(m.startswith("WATCHDOG=1") for m, _ in messages)
    assert "STOPPING=1" in [m for m, _ in messages]
    # `pipeline health --json` while it ran: the trading fields, from the trading block
    code, rep = health
    t = rep["trading"]
    assert code == 0, rep
    assert t["healthy"] is True
    assert t["block"] == f"{shm_name}.trading.metrics"
    assert t["state"] == "READY"
    assert t["reconnects"] == 0
    assert t["orders_unknown"] == 0
    assert t["last_rtt_us"] > 0
    assert t["metrics"]["pid"] == proc.pid


def health_json(tmp_path: Path, shm_name: str) -> tuple[int, dict[str, Any]]:
    """Run `pipeline health --json` (a subprocess, as an operator would) against the blocks
    under this test's prefix; returns (exit code, report)."""
    import json
    import subprocess
    import sys

    cfg = tmp_path / "health.toml"
    cfg.write_text(f'[run]\nshm_prefix = "{shm_name}."\n')
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "health", "--json", "--config", str(cfg),
         "--expect", "trading", "--ring", f"{shm_name}.exec"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return out.returncode, json.loads(out.stdout)


# ---- account-level requests over the reply ring ------------------------------------------------


@async_test
async def test_open_orders_cancel_all_and_account(
    tmp_path: Path, shm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from pipeline.cli import main

    path, pub = new_key(tmp_path, "pem", "k")
    prefix = f"{shm_name}.o."
    async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT", "ETHUSDT"]) as sim:
        cfg = TradingConfig(
            url=sim.wsapi_url,
            session=fast_config("k"),
            exec_ring=f"{shm_name}.exec",
            metrics_name=f"{shm_name}.metrics",
            scan_interval_s=0.05,
            order_prefix=prefix,
        )
        tp = TradingProcess(cfg, load_private_key(path))
        task = asyncio.create_task(tp.run())
        client = None
        try:
            await until(lambda: tp.session.state is State.READY)
            client = OrderClient.attach("acct", exec_ring=f"{shm_name}.exec", prefix=prefix)
            placed = []
            for sym in ("BTCUSDT", "BTCUSDT", "ETHUSDT"):
                price = round(float(sim.market.best(sym)[0]) * 0.9, 2)
                coid = client.place(symbol=sym, side="BUY", qty=0.01, price=price)
                assert (await asyncio.to_thread(client.wait, coid, 10.0)).status == "NEW"
                placed.append(coid)

            every = await asyncio.to_thread(client.open_orders)
            assert every["ok"] is True
            assert every["method"] == "openOrders.status"
            assert sorted(o["clientOrderId"] for o in every["result"]) == sorted(placed)
            btc = await asyncio.to_thread(client.open_orders, "BTCUSDT")
            assert sorted(o["clientOrderId"] for o in btc["result"]) == sorted(placed[:2])

            account = await asyncio.to_thread(client.account)
            assert account["ok"] is True
            assert account["result"]["canTrade"] is True
            assert any(b["asset"] == "USDT" for b in account["result"]["balances"])

            # the command line prints the same JSON
            capsys.readouterr()
            args = ["--exec-ring", f"{shm_name}.exec", "--order-prefix", prefix]
            code = await asyncio.to_thread(
                main, ["order", "open-orders", "--symbol", "ETHUSDT", *args]
            )
            cli = json.loads(capsys.readouterr().out)
            assert code == 0
            assert [o["clientOrderId"] for o in cli["result"]] == [placed[2]]

            code = await asyncio.to_thread(
                main, ["order", "cancel-all", "--symbol", "BTCUSDT", *args]
            )
            canceled = json.loads(capsys.readouterr().out)
            assert code == 0
            assert canceled["method"] == "openOrders.cancelAll"
            assert sorted(o["origClientOrderId"] for o in canceled["result"]) == sorted(placed[:2])
            assert all(o["status"] == "CANCELED" for o in canceled["result"])
            # the session learns of the cancels from the user data stream
            await until(
                lambda: all(tp.session.order_status(c) is OrderStatus.CANCELED for c in placed[:2])
            )
            # nothing left on BTCUSDT: the exchange's error comes back, exit 1
            code = await asyncio.to_thread(
                main, ["order", "cancel-all", "--symbol", "BTCUSDT", *args]
            )
            refused = json.loads(capsys.readouterr().out)
            assert code == 1
            assert refused["ok"] is False
            assert refused["error"]["code"] == -2011

            code = await asyncio.to_thread(main, ["order", "account", *args])
            assert code == 0
            assert json.loads(capsys.readouterr().out)["result"]["accountType"] == "SPOT"
            left = await asyncio.to_thread(client.open_orders)
            assert [o["clientOrderId"] for o in left["result"]] == [placed[2]]
            assert tp._metrics is not None
            await until(lambda: tp._metrics.snapshot()["replies_sent"] == 8)  # type: ignore[union-attr]
        finally:
            if client is not None:
                client.close()
            tp.request_stop()
            assert await task == 0


def test_oversized_reply_becomes_an_error_reply(shm_name: str) -> None:
    """A reply bigger than a quarter of the reply ring is replaced by an error naming the limit
    (a whole reply must fit while the client reads it, or it would be lapped mid-reply)."""
    import json

    import numpy as np

    from pipeline.binance.wsapi import Response
    from pipeline.ipc.ring import RingReader, RingWriter
    from pipeline.trading.answers import ReplyTag
    from pipeline.trading.client import ReplyAssembler
    from pipeline.trading.wire import LOCAL_REPLY_TOO_LARGE, REPLY_DTYPE

    cfg = TradingConfig(url="ws://127.0.0.1:9/", session=fast_config("k"), reply_capacity=8)
    tp = TradingProcess(cfg, None)
    tp._answers.reply_writer = RingWriter.create(f"{shm_name}.replies", REPLY_DTYPE, 8)
    try:
        with RingReader.attach(f"{shm_name}.replies", "t") as reader:
            orders = [{"symbol": "BTCUSDT", "clientOrderId": f"c{i}"} for i in range(100)]
            tp._answers.send_reply(
                ReplyTag(5, "big", "openOrders.status"), Response("1", 200, orders)
            )
            tp._answers.send_reply(
                ReplyTag(5, "small", "openOrders.status"), Response("2", 200, [])
            )
            asm = ReplyAssembler(5)
            assert asm.feed(reader.poll()) == ["big", "small"]
            big = json.loads(asm.done["big"])
            assert big["ok"] is False
            assert big["result"] is None
            assert big["error"]["code"] == LOCAL_REPLY_TOO_LARGE
            assert "exceeds the 1936-byte limit" in big["error"]["msg"]
            assert json.loads(asm.done["small"]) == {
                "request_id": "small",
                "method": "openOrders.status",
                "ok": True,
                "status": 200,
                "result": [],
                "error": None,
            }
            assert reader.missed == 0
            assert isinstance(reader.poll(), np.ndarray)
    finally:
        tp._answers.reply_writer.close()
