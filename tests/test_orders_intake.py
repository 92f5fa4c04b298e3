"""Order intake against real client processes: dead clients' rings are read once, then reaped.

The issue this guards (#11): a client that crashed left its order ring behind; the trading
process re-attached it every scan from its oldest record, re-sent its cancel-all five times,
then re-published stale rejects forever, and the segment leaked. Here a real client process
publishes, is SIGKILLed, and the real :class:`OrderIntake` must take each command exactly once
and then remove the ring.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.ipc import shm
from pipeline.ipc.ring import RingWriter
from pipeline.trading.intake import OrderCommand, OrderIntake
from pipeline.trading.session import ExecUpdate
from pipeline.trading.wire import EXEC_DTYPE, LOCAL_STALE, REPLY_DTYPE, OrderAction, reply_ring_for

ROOT = Path(__file__).resolve().parents[1]

# The client: attaches, publishes one command of every account-level kind plus a STATUS and a
# PLACE (or waits for "more" on stdin first), says so, then sleeps until it is killed.
CLIENT = textwrap.dedent(
    """
    import sys, time
    from pipeline.trading.client import OrderClient
    from pipeline.trading.wire import OrderAction
    exec_ring, prefix, name, mode = sys.argv[1:5]
    c = OrderClient.attach(name, exec_ring=exec_ring, prefix=prefix)
    c.place(symbol="BTCUSDT", side="BUY", qty=1.0, price=10.0, client_order_id="p-1")
    if mode == "stepwise":
        print("first", flush=True)
        sys.stdin.readline()
    c.request(OrderAction.CANCEL_ALL, "BTCUSDT")
    c.status("p-1", symbol="BTCUSDT")
    c.request(OrderAction.ACCOUNT)
    c.request(OrderAction.OPEN_ORDERS)
    print("ready", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def rings(shm_name: str) -> Iterator[tuple[str, str]]:
    """An exec ring and its reply ring, as a trading process would own them; the order prefix."""
    exec_ring = RingWriter.create(f"{shm_name}.exec", EXEC_DTYPE, 64)
    replies = RingWriter.create(reply_ring_for(f"{shm_name}.exec"), REPLY_DTYPE, 64)
    try:
        yield f"{shm_name}.exec", f"{shm_name}.o."
    finally:
        replies.close()
        exec_ring.close()


def start_client(
    exec_ring: str, prefix: str, *args: str, script: str = CLIENT
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, exec_ring, prefix, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def expect_line(p: subprocess.Popen[str], line: str) -> None:
    assert p.stdout is not None
    got = p.stdout.readline().strip()
    assert got == line, f"client said {got!r} (exit code {p.poll()})"


def kill(p: subprocess.Popen[str]) -> None:
    """SIGKILL: no cleanup at all, the ring stays behind exactly as after a crash."""
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    for f in (p.stdin, p.stdout):
        if f is not None:
            f.close()


def cycles(
    intake: OrderIntake, n: int, now_ns: int | None = None
) -> tuple[list[OrderCommand], list[ExecUpdate]]:
    """``n`` scan + poll rounds, as the trading process's order loop runs them."""
    cmds: list[OrderCommand] = []
    rejects: list[ExecUpdate] = []
    for _ in range(n):
        intake.scan()
        c, r = intake.poll(time.time_ns() if now_ns is None else now_ns)
        cmds += c
        rejects += r
    return cmds, rejects


def test_dead_clients_cancel_all_is_issued_once_and_its_ring_reaped(
    rings: tuple[str, str],
) -> None:
    exec_ring, prefix = rings
    intake = OrderIntake(start_time_ns=time.time_ns(), max_order_age_s=600, prefix=prefix)
    p = start_client(exec_ring, prefix, "dead1", "all")
    try:
        expect_line(p, "ready")
    finally:
        kill(p)
    ring_path = shm.SHM_DIR / f"{prefix}dead1"
    assert ring_path.exists()  # what a crash leaves behind
    try:
        cmds, rejects = cycles(intake, 6)
        assert [c.action for c in cmds] == [
            OrderAction.PLACE,
            OrderAction.CANCEL_ALL,
            OrderAction.STATUS,
            OrderAction.ACCOUNT,
            OrderAction.OPEN_ORDERS,
        ]
        assert rejects == []
        assert not ring_path.exists(), "the dead client's ring was not reaped"
        assert (intake.reaped, len(intake.readers)) == (1, 0)
    finally:
        intake.close()
        shm.unlink(f"{prefix}dead1")


def test_records_a_dead_client_left_unread_are_drained_once(rings: tuple[str, str]) -> None:
    """The intake reads the client while it lives; it dies with commands not yet read: those
    are taken once (the ring is drained before it is reaped), nothing twice."""
    exec_ring, prefix = rings
    intake = OrderIntake(start_time_ns=time.time_ns(), max_order_age_s=600, prefix=prefix)
    p = start_client(exec_ring, prefix, "dead2", "stepwise")
    try:
        expect_line(p, "first")
        first, _ = cycles(intake, 2)
        assert [c.client_order_id for c in first] == ["p-1"]
        assert p.stdin is not None
        p.stdin.write("more\n")
        p.stdin.flush()
        expect_line(p, "ready")
    finally:
        kill(p)
    try:
        cmds, rejects = cycles(intake, 6)
        assert [c.action for c in cmds] == [
            OrderAction.CANCEL_ALL,
            OrderAction.STATUS,
            OrderAction.ACCOUNT,
            OrderAction.OPEN_ORDERS,
        ]
        assert rejects == []
        assert not (shm.SHM_DIR / f"{prefix}dead2").exists()
        assert intake.reaped == 1
    finally:
        intake.close()
        shm.unlink(f"{prefix}dead2")


def test_a_dead_clients_stale_records_are_rejected_once(rings: tuple[str, str]) -> None:
    """A trading process that starts after the client died rejects its records as stale,
    once each, and removes the ring: no stale rejects repeating every second."""
    exec_ring, prefix = rings
    p = start_client(exec_ring, prefix, "dead3", "all")
    try:
        expect_line(p, "ready")
    finally:
        kill(p)
    intake = OrderIntake(start_time_ns=time.time_ns(), max_order_age_s=600, prefix=prefix)
    try:
        cmds, rejects = cycles(intake, 6)
        assert cmds == []
        assert [r.error_code for r in rejects] == [LOCAL_STALE] * 5
        ids = [r.client_order_id for r in rejects]
        assert ids[:1] == ["p-1"]
        assert ids[2] == "p-1"
        assert len(set(ids)) == 4  # + three account-level requests, each once
        assert intake.stale == 5
        assert not (shm.SHM_DIR / f"{prefix}dead3").exists()
    finally:
        intake.close()
        shm.unlink(f"{prefix}dead3")


def test_a_ring_found_again_resumes_where_it_was_left(
    rings: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idempotence does not hang on the unlink: if the ring cannot be removed (here: the
    unlink is made to fail) and is even forgotten as reaped, it is re-attached at the sequence
    already taken, so no command kind is ever taken twice from one ring incarnation."""
    exec_ring, prefix = rings
    intake = OrderIntake(start_time_ns=time.time_ns(), max_order_age_s=600, prefix=prefix)
    p = start_client(exec_ring, prefix, "dead4", "all")
    try:
        expect_line(p, "ready")
    finally:
        kill(p)
    monkeypatch.setattr(shm, "unlink_if_inode", lambda name, inode: False)
    try:
        cmds, _ = cycles(intake, 4)
        assert len(cmds) == 5
        assert (shm.SHM_DIR / f"{prefix}dead4").exists()
        assert (intake.reaped, len(intake.readers)) == (0, 0)
        intake._skip.clear()  # forget that it was reaped: only the read-up-to table is left
        again, rejects = cycles(intake, 4)
        assert (again, rejects) == ([], [])
    finally:
        intake.close()
        monkeypatch.undo()
        shm.unlink(f"{prefix}dead4")


def test_a_live_client_is_never_reaped(rings: tuple[str, str], shm_name: str) -> None:
    exec_ring, prefix = rings
    intake = OrderIntake(start_time_ns=time.time_ns(), max_order_age_s=600, prefix=prefix)
    p = start_client(exec_ring, prefix, "alive", "all")
    try:
        expect_line(p, "ready")
        cmds, _ = cycles(intake, 4)
        assert len(cmds) == 5
        assert (shm.SHM_DIR / f"{prefix}alive").exists()
        assert len(intake.readers) == 1
        assert intake.reaped == 0
    finally:
        kill(p)
        intake.close()
        shm.unlink(f"{prefix}alive")
    assert os.path.exists(shm.SHM_DIR / f"{shm_name}.exec")


# ---- the whole trading process ----------------------------------------------------------------

FULL_CLIENT = textwrap.dedent(
    """
    import sys, time
    from pipeline.trading.client import OrderClient
    exec_ring, prefix, price = sys.argv[1], sys.argv[2], float(sys.argv[3])
    c = OrderClient.attach("crash", exec_ring=exec_ring, prefix=prefix)
    coid = c.place(symbol="BTCUSDT", side="BUY", qty=0.01, price=price)
    assert c.wait(coid, 20.0).status == "NEW"
    reply = c.cancel_all("BTCUSDT", timeout=20.0)
    assert reply["ok"] is True, reply
    print(reply["request_id"], flush=True)
    time.sleep(600)
    """
)


def test_trading_process_sends_a_dead_clients_cancel_all_once(
    shm_name: str, tmp_path: Path
) -> None:
    """The issue's scenario end to end: ``pipeline trade``'s process (in this process, against
    the simulator) serves a client that cancels all and is SIGKILLed. Its cancel-all reaches
    the exchange once (one reply on the reply ring), and its ring is reaped, not re-read."""
    import asyncio

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from simhelpers import async_test, until

    from pipeline.backoff import BackoffPolicy
    from pipeline.binance.keys import load_private_key
    from pipeline.ipc.ring import RingReader
    from pipeline.sim.testing import SimServer
    from pipeline.trading.process import TradingConfig, TradingProcess
    from pipeline.trading.session import SessionConfig, State

    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_path = tmp_path / "k.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    prefix = f"{shm_name}.o."

    @async_test
    async def body() -> None:
        async with SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
            cfg = TradingConfig(
                url=sim.wsapi_url,
                session=SessionConfig(
                    api_key="k", backoff=BackoffPolicy(initial_s=0.01, max_s=0.05)
                ),
                exec_ring=f"{shm_name}.exec",
                metrics_name=f"{shm_name}.metrics",
                scan_interval_s=0.05,
                order_prefix=prefix,
                max_order_age_s=600,
            )
            tp = TradingProcess(cfg, load_private_key(key_path))
            task = asyncio.create_task(tp.run())
            p = None
            try:
                await until(lambda: tp.session.state is State.READY)
                replies = RingReader.attach(reply_ring_for(cfg.exec_ring), start="oldest")
                price = round(float(sim.market.best("BTCUSDT")[0]) * 0.9, 2)
                p = start_client(cfg.exec_ring, prefix, str(price), script=FULL_CLIENT)
                assert p.stdout is not None
                rid = await asyncio.to_thread(p.stdout.readline)
                assert rid.strip(), f"client failed (exit {p.poll()})"
                kill(p)
                ring = shm.SHM_DIR / f"{prefix}crash"
                await until(lambda: not ring.exists())  # drained, then reaped
                for _ in range(5):  # scans after the reap find nothing to re-read
                    await asyncio.sleep(cfg.scan_interval_s)
                assert tp._intake is not None
                assert tp._intake.reaped == 1
                got = replies.poll()
                firsts = got[(got["chunk"] == 0) & (got["request_id"] == rid.strip().encode())]
                assert len(firsts) == 1, "the cancel-all was executed more than once"
                replies.close()
            finally:
                if p is not None and p.poll() is None:
                    kill(p)
                tp.request_stop()
                assert await task == 0

    body()
