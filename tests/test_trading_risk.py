"""Pre-trade risk in the trading process (`pipeline trade --risk-limits`).

Unit tests drive :class:`pipeline.trading.riskgate.RiskGate` with a fake limits view and injected
clocks;
the integration test runs the real risk consumer core (:class:`pipeline.consumers.risk.Risk`,
reading the exec ring as reader "risk") next to a trading process against the simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from simhelpers import async_test, until

from pipeline.consumers.risk import LimitsTable, Risk, RiskBook, RiskLimits, field_name
from pipeline.ipc.metrics import MetricsNotFoundError
from pipeline.trading.client import OrderClient
from pipeline.trading.process import TradingConfig, TradingProcess
from pipeline.trading.riskgate import RiskGate
from pipeline.trading.session import ExecKind, OrderStatus, SessionConfig, State
from pipeline.trading.wire import LOCAL_RISK

# ---- RiskGate (pure, fake view) ---------------------------------------------------------------


class FakeBlock:
    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.alive = True
        self.closed = False

    def writer_alive(self) -> bool:
        return self.alive

    def snapshot(self) -> dict[str, float]:
        return dict(self.table)


class FakeView:
    def __init__(self, block: FakeBlock) -> None:
        self.block = block

    def close(self) -> None:
        self.block.closed = True


def table(pos: float = 0.0, open_buy: float = 0.0, updated_ns: int = 1_000, max_pos: float = 1.0):
    return {
        "halt": 0,
        "max_order_notional": 1e9,
        "updated_ns": updated_ns,
        field_name("BTCUSDT", "pos"): pos,
        field_name("BTCUSDT", "open_buy"): open_buy,
        field_name("BTCUSDT", "open_sell"): 0.0,
        field_name("BTCUSDT", "mark"): 100.0,
        field_name("BTCUSDT", "max_pos"): max_pos,
        field_name("BTCUSDT", "max_notional"): 1e9,
    }


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_000
        self.mono = 0.0


def gate_with(blocks: list[FakeBlock | None], clocks: Clocks, **kw: Any) -> RiskGate:
    """A gate whose attach() hands out ``blocks`` in turn (None: not found)."""
    seq = list(blocks)

    def attach(name: str, max_age_s: float) -> FakeView:
        b = seq.pop(0) if len(seq) > 1 else seq[0]
        if b is None:
            raise MetricsNotFoundError(name)
        return FakeView(b)

    return RiskGate(
        "limits", attach=attach, now_ns=lambda: clocks.wall, monotonic=lambda: clocks.mono, **kw
    )


def test_gate_fails_closed_without_a_table_and_attaches_later() -> None:
    clocks = Clocks()
    block = FakeBlock(table())
    gate = gate_with([None, block], clocks)
    assert (gate.check("BTCUSDT", "BUY", 0.1, 100.0) or "").startswith("risk_unavailable")
    clocks.mono += 0.1  # retry is rate limited
    assert (gate.check("BTCUSDT", "BUY", 0.1, 100.0) or "").startswith("risk_unavailable")
    clocks.mono += 1.0
    assert gate.check("BTCUSDT", "BUY", 0.1, 100.0) is None


def test_gate_refuses_stale_and_dead_tables_and_reattaches_a_restarted_one() -> None:
    clocks = Clocks()
    old = FakeBlock(table(updated_ns=1_000))
    new = FakeBlock(table(updated_ns=1_000))
    gate = gate_with([old, new], clocks, max_age_s=5.0)
    clocks.wall = 1_000 + 6 * 10**9
    assert (gate.check("BTCUSDT", "BUY", 0.1, 100.0) or "").startswith("risk_stale")
    clocks.wall = 2_000
    old.alive = False  # the risk process died: refused until a new table appears
    reason = gate.check("BTCUSDT", "BUY", 0.1, 100.0)
    assert reason == "risk_unavailable: the risk process is not running"
    assert not old.closed  # re-attach attempts are rate limited
    clocks.mono += 1.0
    assert gate.check("BTCUSDT", "BUY", 0.1, 100.0) is None  # the restarted one
    assert old.closed


def test_gate_names_the_limit_and_counts_in_flight_orders_until_risk_saw_them() -> None:
    clocks = Clocks()
    block = FakeBlock(table(max_pos=1.0, updated_ns=1_000))
    gate = gate_with([block], clocks)
    reason = gate.check("BTCUSDT", "BUY", 1.5, 100.0)
    assert reason is not None
    assert reason.startswith("max_position BTCUSDT")
    assert gate.check("BTCUSDT", "BUY", 0.6, 100.0) is None
    gate.sent("a", "BTCUSDT", "BUY", 0.6)
    # the table does not know "a" yet: a second 0.6 would make 1.2 > 1.0
    reason = gate.check("BTCUSDT", "BUY", 0.6, 100.0)
    assert reason is not None
    assert "open buys 0.6" in reason
    assert gate.check("BTCUSDT", "SELL", 0.6, 100.0) is None  # other side unaffected
    gate.published("a", ExecKind.ACK, OrderStatus.NEW, exec_cursor=10)
    gate.observe(9, now_ns=2_000)  # risk reader not past the ACK yet
    assert gate.needs_observation
    gate.observe(10, now_ns=3_000)
    assert not gate.needs_observation
    # a table published before we saw the reader past the ACK may not include it
    block.table = table(open_buy=0.6, updated_ns=2_500)
    assert gate.check("BTCUSDT", "BUY", 0.6, 100.0) is not None
    assert "a" in gate.inflight
    # one published after: "a" is in it, and is no longer counted twice
    block.table = table(open_buy=0.6, updated_ns=3_001)
    assert gate.check("BTCUSDT", "BUY", 0.3, 100.0) is None
    assert gate.inflight == {}


def test_gate_forgets_rejected_orders_at_once_and_caps_in_flight() -> None:
    clocks = Clocks()
    gate = gate_with([FakeBlock(table())], clocks, max_inflight=2)
    gate.sent("r", "BTCUSDT", "BUY", 0.9)
    gate.published("r", ExecKind.REJECT, OrderStatus.REJECTED, exec_cursor=1)
    assert gate.inflight == {}
    gate.sent("x", "BTCUSDT", "SELL", 0.1)
    gate.sent("y", "BTCUSDT", "SELL", 0.1)
    reason = gate.check("BTCUSDT", "BUY", 0.1, 100.0)
    assert reason is not None
    assert reason.startswith("risk_inflight")
    gate.observe(None, now_ns=5)  # no risk reader on the exec ring: nothing retires
    assert len(gate.inflight) == 2


# ---- against the simulator ----------------------------------------------------------------------


def new_key(tmp_path: Path) -> tuple[Path, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    return path, pub


@pytest.mark.slow
@async_test
async def test_risk_limits_against_the_simulator(
    tmp_path: Path, shm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sim_testing = pytest.importorskip("pipeline.sim.testing")
    from pipeline.backoff import BackoffPolicy
    from pipeline.binance.keys import load_private_key
    from pipeline.cli import main

    path, pub = new_key(tmp_path)
    exec_ring = f"{shm_name}.exec"
    prefix = f"{shm_name}.o."
    limits_name = f"{shm_name}.limits"
    async with sim_testing.SimServer(api_keys={"k": pub}, symbols=["BTCUSDT"]) as sim:
        bid = float(sim.market.best("BTCUSDT")[0])
        price = round(bid * 0.9, 2)
        book = RiskBook(["BTCUSDT"])
        book.on_mark("BTCUSDT", bid)
        risk = Risk(
            book,
            RiskLimits(max_position={"BTCUSDT": 0.01}, max_order_notional=1e9),
            LimitsTable(limits_name, ["BTCUSDT"]),
            exec_ring,
        )
        driving = asyncio.Event()
        driving.set()

        async def drive() -> None:  # the risk consumer's loop, paused while `driving` is clear
            while True:
                await driving.wait()
                risk.on_tick(None, time.monotonic())
                await asyncio.sleep(0.005)

        cfg = TradingConfig(
            url=sim.wsapi_url,
            session=SessionConfig(
                api_key="k",
                ping_interval_s=0.5,
                json_ping_interval_s=0.5,
                pong_timeout_s=1.0,
                request_timeout_s=2.0,
                backoff=BackoffPolicy(initial_s=0.01, max_s=0.05),
            ),
            exec_ring=exec_ring,
            metrics_name=f"{shm_name}.metrics",
            scan_interval_s=0.05,
            order_prefix=prefix,
            risk_limits=limits_name,
        )
        tp = TradingProcess(cfg, load_private_key(path))
        driver = asyncio.create_task(drive())
        task = asyncio.create_task(tp.run())
        client = None
        try:
            await until(lambda: tp.session.state is State.READY and risk.exec_reader is not None)
            client = OrderClient.attach("rk", exec_ring=exec_ring, prefix=prefix)
            venue = sim.sim.service.venue

            def at_venue(c: str) -> bool:
                return any(o.client_order_id == c for o in venue.orders.values())

            async def place(qty: float) -> Any:
                assert client is not None
                coid = client.place(symbol="BTCUSDT", side="BUY", qty=qty, price=price)
                return await asyncio.to_thread(client.wait, coid, 10.0)

            # 1. a breach of max_position never reaches the exchange; the reason names it
            big = await place(0.02)
            assert (big.kind, big.status, big.error_code) == ("REJECT", "REJECTED", LOCAL_RISK)
            assert big.error_msg.startswith("max_position BTCUSDT"), big.error_msg
            assert not at_venue(big.client_order_id)
            # 2. within limits: accepted by the simulator
            ok1 = await place(0.004)
            assert (ok1.kind, ok1.status, ok1.error_code) == ("ACK", "NEW", 0)
            assert at_venue(ok1.client_order_id)
            # the risk consumer takes it in; then it is no longer counted as in flight
            snap = risk.table.block.snapshot
            await until(lambda: snap()[field_name("BTCUSDT", "open_buy")] == pytest.approx(0.004))
            assert tp._risk is not None
            await until(lambda: not tp._risk.inflight)  # type: ignore[union-attr]
            # 3. the table lags (risk paused): our own in-flight order still counts
            driving.clear()
            ok2 = await place(0.004)
            assert ok2.status == "NEW"
            lagging = await place(0.004)  # table 0.004 open + in flight 0.004 + 0.004 > 0.01
            assert lagging.error_code == LOCAL_RISK
            assert "open buys 0.008" in lagging.error_msg, lagging.error_msg
            assert not at_venue(lagging.client_order_id)
            # 4. risk catches up: the same order is refused by the table alone, not double
            # counted (still 0.008 open, not 0.012)
            driving.set()
            await until(lambda: not tp._risk.inflight)  # type: ignore[union-attr]
            again = await place(0.004)
            assert again.error_code == LOCAL_RISK
            assert "open buys 0.008" in again.error_msg, again.error_msg
            # 5. `pipeline order place` prints the reason
            capsys.readouterr()
            code = await asyncio.to_thread(
                main,
                ["order", "place", "--symbol", "BTCUSDT", "--side", "BUY", "--qty", "0.05",
                 "--price", str(price), "--exec-ring", exec_ring, "--order-prefix", prefix,
                 "--client", "rkcli"],
            )  # fmt: skip
            out, err = capsys.readouterr()
            assert code == 1
            answer = json.loads(out)
            assert answer["error_code"] == LOCAL_RISK
            assert answer["error_msg"].startswith("max_position BTCUSDT")
            assert "refused by the risk check: max_position BTCUSDT" in err
            m = tp._metrics
            assert m is not None
            await until(lambda: m.snapshot()["orders_risk_rejected"] == 4)
        finally:
            if client is not None:
                client.close()
            tp.request_stop()
            assert await task == 0
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
            risk.close()
