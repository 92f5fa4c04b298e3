"""Issue #11 end to end: a hostile local account, and a hostile exchange, against a real
`pipeline trade` process.

The simulator and the trader run as subprocesses (the trader with its API key from a file), the
attacker is a shell run as uid 65534 through ``setpriv``. What must hold:

- an order ring planted by another uid under the trader's order prefix places no order at the
  venue; the trader keeps running, counts the refusal and ``pipeline health`` goes red naming it
  until the file is gone, while an order ring of our own still trades;
- a FIFO planted under the risk-limits name neither hangs the trader's start nor its first order
  (the order is refused by the risk gate, the process still stops on SIGTERM);
- out-of-int64 numbers and unreadable order replies from the exchange neither kill the trader's
  timers nor lose an order (UNKNOWN, then reconciled, placed once).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import block_snapshot
from test_shm_trust import NOBODY, as_nobody, order_ring_bytes

from pipeline.cli import main
from pipeline.ipc import shm
from pipeline.trading.client import OrderClient

testing = pytest.importorskip("pipeline.sim.testing")

pytestmark = pytest.mark.slow

BASE = [sys.executable, "-m", "pipeline"]


def need_foreign_uid() -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to run the attacker as uid 65534 (CI runs as root)")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(private key, public key, API key file 0600)."""
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    key_file = tmp_path / "api.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"hostile-neighbour-test-key\n")
    os.close(fd)
    return tmp_path / "k" / "ed25519_private.pem", tmp_path / "k" / "ed25519_public.pem", key_file


@pytest.fixture
def planted(shm_name: str) -> Iterator[list[Path]]:
    """Files the attacker planted: removed after the test whoever owns them."""
    paths: list[Path] = []
    try:
        yield paths
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def wait_for(what: str, cond: object, proc: subprocess.Popen[str], limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():  # type: ignore[operator]
        if proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(f"trade exited {proc.returncode} before {what}: {err[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def trader(shm_name: str) -> dict[str, int | float]:
    return block_snapshot(f"{shm_name}.trading.metrics")


def start_trade(
    sim: testing.SimProcess, keys: tuple[Path, Path, Path], shm_name: str, *extra: str
) -> subprocess.Popen[str]:
    private, _public, key_file = keys
    cmd = [*BASE, "trade", "--wsapi-url", sim.wsapi_url, "--api-key-file", str(key_file),
           "--private-key", str(private), "--exec-ring", f"{shm_name}.exec",
           "--metrics", f"{shm_name}.trading.metrics", "--order-prefix", f"{shm_name}.o.",
           *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
    _out, err = proc.communicate(timeout=30)
    return err


def venue_orders(sim: testing.SimProcess) -> int:
    return int(sim.state()["venue"]["venue"]["orders_placed"])


def health(shm_name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASE, "health", "--json", "--expect", "trading", "--ring", f"{shm_name}.exec"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PIPELINE_RUN_SHM_PREFIX": f"{shm_name}."},
    )  # fmt: skip


def test_a_foreign_order_ring_places_nothing_and_health_names_it(
    keys: tuple[Path, Path, Path], shm_name: str, planted: list[Path]
) -> None:
    need_foreign_uid()
    _private, public, key_file = keys
    with testing.run_sim_process("--symbols", "BTCUSDT", "--api-key-file",
                                 f"{key_file}={public}") as sim:  # fmt: skip
        proc = start_trade(sim, keys, shm_name)
        try:
            wait_for("READY", lambda: trader(shm_name).get("state") == 3, proc)
            evil = shm.SHM_DIR / f"{shm_name}.o.evil"
            r = as_nobody('umask 0; cat > "$1" && chmod 0666 "$1"', str(evil),
                          data=order_ring_bytes(b"evil-1"))  # fmt: skip
            assert r.returncode == 0, r.stderr
            planted.append(evil)
            assert os.lstat(evil).st_uid == NOBODY
            assert stat.S_IMODE(os.lstat(evil).st_mode) == 0o666
            wait_for("the refusal to be counted",
                     lambda: trader(shm_name).get("order_rings_refused", 0) >= 1,
                     proc)  # fmt: skip
            snap = trader(shm_name)
            assert snap["problem_untrusted_order_rings"] == 1
            assert venue_orders(sim) == 0  # the planted PLACE never reached the exchange
            res = health(shm_name)
            assert res.returncode == 1, res.stdout + res.stderr
            trading = json.loads(res.stdout)["trading"]
            assert any("untrusted_order_rings" in p for p in trading["problems"]), trading

            # Our own client still trades through the same trader.
            with OrderClient.attach("mine", exec_ring=f"{shm_name}.exec",
                                    prefix=f"{shm_name}.o.") as oc:  # fmt: skip
                coid = oc.place(symbol="BTCUSDT", side="BUY", type="LIMIT", price=1000.0,
                                qty=0.01, tif="GTC")  # fmt: skip
                report = oc.wait(coid, timeout=30)
                assert report.kind in ("ACK", "NEW"), report
            assert venue_orders(sim) == 1

            evil.unlink()  # the operator removes the planted file: health clears
            wait_for("the problem to clear",
                     lambda: trader(shm_name).get("problem_untrusted_order_rings") == 0,
                     proc)  # fmt: skip
            assert proc.poll() is None
        finally:
            err = stop(proc)
        assert proc.returncode == 0, err[-3000:]
        assert "evil" in err  # the refusal was logged, with the name
        assert venue_orders(sim) == 1


def test_a_fifo_under_the_risk_limits_name_neither_hangs_start_nor_orders(
    keys: tuple[Path, Path, Path], shm_name: str, planted: list[Path]
) -> None:
    _private, public, key_file = keys
    fifo = shm.SHM_DIR / f"{shm_name}.limits"
    os.mkfifo(fifo, 0o600)  # even one of our own: a FIFO is never a segment
    planted.append(fifo)
    with testing.run_sim_process("--symbols", "BTCUSDT", "--api-key-file",
                                 f"{key_file}={public}") as sim:  # fmt: skip
        proc = start_trade(sim, keys, shm_name, "--risk-limits", fifo.name)
        try:
            wait_for("READY", lambda: trader(shm_name).get("state") == 3, proc)
            with OrderClient.attach("mine", exec_ring=f"{shm_name}.exec",
                                    prefix=f"{shm_name}.o.") as oc:  # fmt: skip
                coid = oc.place(symbol="BTCUSDT", side="BUY", type="LIMIT", price=1000.0,
                                qty=0.01, tif="GTC")  # fmt: skip
                report = oc.wait(coid, timeout=30)
            assert report.kind == "REJECT", report
            assert "FIFO" in report.error_msg, report  # the reason, not "not found"
            assert venue_orders(sim) == 0  # refused by the risk gate, never sent
        finally:
            t0 = time.monotonic()
            err = stop(proc)
        assert proc.returncode == 0, err[-3000:]
        assert time.monotonic() - t0 < 30
        assert "FIFO" in err or "not a regular file" in err, err[-3000:]


# ---- a hostile exchange, against the same real processes ------------------------------------


def place(oc: OrderClient, price: float = 1000.0) -> str:
    return oc.place(symbol="BTCUSDT", side="BUY", type="LIMIT", price=price, qty=0.01, tif="GTC")


def test_hostile_venue_numbers_and_replies_neither_kill_nor_silence_a_real_trader(
    keys: tuple[Path, Path, Path], shm_name: str
) -> None:
    """rateLimits count 2**63 and retryAfter 10**17 used to kill the timer task (no pings, no
    reconnects, health green); `result: null` and orderId 2**64 lost the order. Against a real
    `pipeline trade` process: each is a counted protocol error, the process and its heartbeat
    live on, health stays green, and an order whose reply was unreadable is UNKNOWN, then
    reconciled, and placed exactly once."""
    _private, public, key_file = keys
    with testing.run_sim_process("--symbols", "BTCUSDT", "--api-key-file",
                                 f"{key_file}={public}") as sim:  # fmt: skip
        proc = start_trade(sim, keys, shm_name, "--ping-interval", "0.5",
                           "--json-ping-interval", "0.5")  # fmt: skip
        try:
            wait_for("READY", lambda: trader(shm_name).get("state") == 3, proc)
            sim.fault("hostile_reply", kind="rate_limits_overflow", count=3)
            wait_for("3 protocol errors counted",
                     lambda: trader(shm_name).get("protocol_errors", 0) >= 3, proc)  # fmt: skip
            pong = trader(shm_name)["last_pong_ns"]
            # the timer task lives: pings still go out and their pongs are seen
            wait_for("a later pong", lambda: trader(shm_name)["last_pong_ns"] > pong, proc)
            assert health(shm_name).returncode == 0
            with OrderClient.attach("mine", exec_ring=f"{shm_name}.exec",
                                    prefix=f"{shm_name}.o.") as oc:  # fmt: skip
                for kind in ("null_result", "order_id_overflow"):
                    sim.fault("hostile_reply", kind=kind, count=1)
                    coid = place(oc)
                    first = oc.wait(coid, timeout=30, kinds=frozenset({"UNKNOWN", "ACK"}))
                    final = oc.wait(coid, timeout=60, kinds=frozenset({"RECONCILED"}))
                    assert (first.kind, final.kind) == ("UNKNOWN", "RECONCILED"), kind
                    open_ids = str(sim.state()["venue"]["open_orders"])
                    assert open_ids.count(coid) == 1, (coid, open_ids)  # placed exactly once
                sim.fault("hostile_reply", kind="retry_after_overflow", count=1)
                assert oc.wait(place(oc), timeout=30).kind == "REJECT"
                until_ns = trader(shm_name)["rate_limited_until_ns"]
                assert until_ns < time.time_ns() + 600 * 10**9  # not 3 million years
            assert proc.poll() is None
            assert trader(shm_name)["state"] == 3
        finally:
            err = stop(proc)
        assert proc.returncode == 0, err[-3000:]
