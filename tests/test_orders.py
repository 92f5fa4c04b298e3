"""Order entry over shared memory, and the trading command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.ipc.ring import RingWriter
from pipeline.trading.client import ClientOrderIds, ExecReport, OrderClient, TradingNotRunningError
from pipeline.trading.intake import OrderIntake
from pipeline.trading.session import CLIENT_ORDER_ID_RE, ExecKind, ExecUpdate, OrderStatus
from pipeline.trading.wire import (
    EXEC_DTYPE,
    LOCAL_STALE,
    ORDER_DTYPE,
    OrderAction,
    client_id_of,
    exec_record,
)


def test_dtypes_are_aligned_and_fixed() -> None:
    assert ORDER_DTYPE.itemsize % 8 == 0
    assert EXEC_DTYPE.itemsize % 8 == 0
    assert ORDER_DTYPE.fields is not None
    assert ORDER_DTYPE.fields["client_order_id"][0].itemsize >= 36


def test_client_order_ids_unique_and_valid() -> None:
    a = ClientOrderIds("strategy-alpha_long_name", start_ns=1_700_000_000_000_000_000)
    b = ClientOrderIds("strategy-alpha_long_name", start_ns=1_700_000_000_000_001_000)
    ids = [a.next() for _ in range(5000)] + [b.next() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(CLIENT_ORDER_ID_RE.match(i) for i in ids)
    assert all(len(i) <= 36 for i in ids)


def test_exec_record_round_trip() -> None:
    u = ExecUpdate(
        "abc-1",
        ExecKind.TRADE,
        OrderStatus.PARTIALLY_FILLED,
        symbol="BTCUSDT",
        side="SELL",
        order_id=77,
        price=100.5,
        qty=2.0,
        last_qty=0.5,
        last_price=100.5,
        cum_qty=0.5,
        cum_quote=50.25,
        error_code=0,
        event_time_ns=5,
        submit_time_ns=3,
        client_id=9,
    )
    arr = np.array([exec_record(u, 11)], dtype=EXEC_DTYPE)
    r = ExecReport.from_record(arr[0])
    assert (r.client_order_id, r.kind, r.status, r.side) == (
        "abc-1",
        "TRADE",
        "PARTIALLY_FILLED",
        "SELL",
    )
    assert (r.order_id, r.last_qty, r.cum_quote, r.publish_time_ns) == (77, 0.5, 50.25, 11)
    assert int(arr[0]["client_id"]) == 9


def test_attach_without_trading_process_is_a_clear_error(shm_name: str) -> None:
    with pytest.raises(TradingNotRunningError, match="pipeline trade"):
        OrderClient.attach("c1", exec_ring=f"{shm_name}.exec")


def test_client_to_intake_and_back(shm_name: str) -> None:
    exec_ring = RingWriter.create(f"{shm_name}.exec", EXEC_DTYPE, 256)
    intake = OrderIntake(start_time_ns=time.time_ns() - 1, prefix=f"{shm_name}.o.")
    client = None
    try:
        import pipeline.trading.client as orders

        client_name = "c1"
        orig_prefix = orders.ORDER_RING_PREFIX
        orders.ORDER_RING_PREFIX = f"{shm_name}.o."
        try:
            client = OrderClient.attach(client_name, exec_ring=f"{shm_name}.exec")
        finally:
            orders.ORDER_RING_PREFIX = orig_prefix
        coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.5, price=100.25)
        cancel_id = client.cancel(coid, symbol="BTCUSDT")
        new = client.modify(coid, qty=1.0, price=99.0)
        assert intake.scan() == 1
        cmds, rejects = intake.poll(time.time_ns())
        assert not rejects
        assert [c.action for c in cmds] == [
            OrderAction.PLACE,
            OrderAction.CANCEL,
            OrderAction.MODIFY,
        ]
        place = cmds[0]
        assert (place.client_order_id, place.symbol, place.side, place.type, place.tif) == (
            coid,
            "BTCUSDT",
            "BUY",
            "LIMIT",
            "GTC",
        )
        assert (place.price, place.qty, place.client_id) == (100.25, 0.5, client_id_of("c1"))
        assert cmds[1].client_order_id == cancel_id == coid
        assert (cmds[2].client_order_id, cmds[2].orig_client_order_id) == (new, coid)
        # answers: one for us, one for another client
        exec_ring.publish(
            exec_record(
                ExecUpdate(coid, ExecKind.ACK, OrderStatus.NEW, order_id=5, client_id=999), 1
            )
        )
        exec_ring.publish(
            exec_record(
                ExecUpdate(coid, ExecKind.UNKNOWN, OrderStatus.UNKNOWN, client_id=client.client_id),
                1,
            )
        )
        exec_ring.publish(
            exec_record(
                ExecUpdate(
                    coid,
                    ExecKind.RECONCILED,
                    OrderStatus.NEW,
                    order_id=5,
                    client_id=client.client_id,
                ),
                2,
            )
        )
        r = client.wait(coid, timeout=2.0)
        assert (r.kind, r.status, r.order_id) == ("RECONCILED", "NEW", 5)  # UNKNOWN skipped
        with pytest.raises(TimeoutError):
            client.wait(new, timeout=0.05)
    finally:
        if client is not None:
            client.close()
        intake.close()
        exec_ring.close()


def test_intake_rejects_stale_records(shm_name: str) -> None:
    ring = RingWriter.create(f"{shm_name}.o.old", ORDER_DTYPE, 64)
    intake = OrderIntake(start_time_ns=time.time_ns(), max_order_age_s=5, prefix=f"{shm_name}.o.")
    try:
        before_start = time.time_ns() - 10**9
        ring.publish((1, 1, 1, 1, 7, 1.0, 1.0, before_start, b"BTCUSDT", b"old-1", b"", 0))
        ring.publish((1, 1, 1, 1, 7, 1.0, 1.0, time.time_ns(), b"BTCUSDT", b"new-1", b"", 0))
        intake.scan()
        cmds, rejects = intake.poll(time.time_ns())
        assert [c.client_order_id for c in cmds] == ["new-1"]
        assert [(r.client_order_id, r.error_code) for r in rejects] == [("old-1", LOCAL_STALE)]
        assert intake.stale == 1
        cmds, rejects = intake.poll(time.time_ns() + 6 * 10**9)
        assert cmds == []
        assert rejects == []
        ring.publish((1, 1, 1, 1, 7, 1.0, 1.0, time.time_ns() - 6 * 10**9, b"X", b"aged", b"", 0))
        _cmds, rejects = intake.poll(time.time_ns())
        assert [r.client_order_id for r in rejects] == ["aged"]
    finally:
        intake.close()
        ring.close()
    # the writer is gone: the next scan forgets the ring
    assert intake.scan() == 0


def test_place_validates_locally(shm_name: str) -> None:
    exec_ring = RingWriter.create(f"{shm_name}.exec", EXEC_DTYPE, 64)
    try:
        with OrderClient.attach(f"{os.getpid()}v", exec_ring=f"{shm_name}.exec") as c:
            with pytest.raises(ValueError):
                c.place(symbol="BTCUSDT", side="HOLD", qty=1, price=1)
            with pytest.raises(ValueError):
                c.place(symbol="", side="BUY", qty=1, price=1)
    finally:
        exec_ring.close()


# ---- command line ---------------------------------------------------------------------------


def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    pub = Path(capsys.readouterr().out.strip())
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    priv = tmp_path / "k" / "ed25519_private.pem"
    assert priv.stat().st_mode & 0o777 == 0o600
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 2  # never overwrites


def test_trade_cli_refuses_bad_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.pem"
    key.write_text("NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j")
    os.chmod(key, 0o600)
    assert (
        main(
            [
                "trade",
                "--api-key",
                "x",
                "--private-key",
                str(key),
                "--wsapi-url",
                "ws://127.0.0.1:1/ws-api/v3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "HMAC secret" in err
    assert "NhqPtmd" not in err
    os.chmod(key, 0o644)
    assert main(["trade", "--api-key", "x", "--private-key", str(key)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_order_cli_without_trading(shm_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "order",
            "place",
            "--symbol",
            "BTCUSDT",
            "--side",
            "BUY",
            "--price",
            "1",
            "--qty",
            "1",
            "--exec-ring",
            f"{shm_name}.exec",
        ]
    )
    assert code == 1
    assert "is `pipeline trade` running" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.slow
def test_trade_process_end_to_end(tmp_path: Path, shm_name: str) -> None:
    """`pipeline trade` against `pipeline sim` in subprocesses: orders via `pipeline order`,
    SIGTERM exits 0 and unlinks its segments; a wrong key exits 3 without retrying."""
    testing = pytest.importorskip("pipeline.sim.testing")
    env = {**os.environ, "PIPELINE_LOG_FORMAT": "json"}
    assert main(["keygen", "--out", str(tmp_path / "good")]) == 0
    assert main(["keygen", "--out", str(tmp_path / "bad")]) == 0
    pub = tmp_path / "good" / "ed25519_public.pem"
    with testing.run_sim_process("--symbols", "BTCUSDT", "--api-key", f"k1={pub}") as sim:
        base = [sys.executable, "-m", "pipeline"]
        trade = [
            *base,
            "trade",
            "--wsapi-url",
            sim.wsapi_url,
            "--api-key",
            "k1",
            "--exec-ring",
            f"{shm_name}.exec",
            "--metrics",
            f"{shm_name}.m",
            "--ping-interval",
            "0.5",
            "--json-ping-interval",
            "0.5",
            "--pong-timeout",
            "1",
        ]
        bad = subprocess.run(
            [*trade, "--private-key", str(tmp_path / "bad" / "ed25519_private.pem")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode == 3, bad.stderr[-2000:]
        assert "-1022" in bad.stderr
        assert len(re.findall(r"CONNECTING -> AUTHENTICATING", bad.stderr)) == 1

        proc = subprocess.Popen(
            [*trade, "--private-key", str(tmp_path / "good" / "ed25519_private.pem")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            from pipeline.ipc.metrics import MetricsBlock, MetricsError

            deadline = time.monotonic() + 20
            while True:
                try:
                    with MetricsBlock.attach(f"{shm_name}.m") as m:
                        if m.snapshot()["state"] == 3:
                            break
                except (FileNotFoundError, MetricsError):  # not there, or still being created
                    pass
                assert time.monotonic() < deadline, "trading never became READY"
                time.sleep(0.05)
            bid = float(sim.state()["market"]["BTCUSDT"]["best_bid"])

            def order(*args: str) -> subprocess.CompletedProcess[str]:
                """`pipeline order ...` against this trading process, as a subprocess."""
                return subprocess.run(
                    [*base, "order", *args, "--exec-ring", f"{shm_name}.exec"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )

            placed = order(
                "place", "--symbol", "BTCUSDT", "--side", "BUY", "--price", f"{bid * 0.9:.2f}",
                "--qty", "0.001",
            )  # fmt: skip
            assert placed.returncode == 0, (
                placed.stdout,
                proc.poll(),
                sorted(os.listdir("/dev/shm")),
            )
            ack = json.loads(placed.stdout)
            assert ack["status"] == "NEW"
            canceled = order("cancel", "--id", ack["client_order_id"])
            assert json.loads(canceled.stdout)["status"] == "CANCELED", canceled.stdout
        finally:
            proc.terminate()
            _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err[-2000:]
        assert not Path(f"/dev/shm/{shm_name}.exec").exists()
        assert not Path(f"/dev/shm/{shm_name}.m").exists()


def test_trade_cli_refuses_a_second_instance(
    tmp_path: Path, shm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.ipc.metrics import MetricsBlock

    assert main(["keygen", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    with MetricsBlock.create(f"{shm_name}.m", [("state", "<i8")]):  # a live owner holds it
        code = main(
            ["trade", "--api-key", "k", "--private-key", str(tmp_path / "ed25519_private.pem"),
             "--wsapi-url", "ws://127.0.0.1:9/ws-api/v3", "--metrics", f"{shm_name}.m",
             "--exec-ring", f"{shm_name}.exec"]
        )  # fmt: skip
    assert code == 2
    assert "another `pipeline trade`" in capsys.readouterr().err


# ---- replies (open orders / cancel-all / account) --------------------------------------------


def test_reply_chunks_reassemble_and_interleave() -> None:
    from pipeline.trading.client import ReplyAssembler
    from pipeline.trading.wire import REPLY_CHUNK, REPLY_DTYPE, reply_records

    big = json.dumps({"balances": [{"asset": f"A{i}", "free": "1.5"} for i in range(400)]})
    payload = big.encode()
    assert len(payload) > 5 * REPLY_CHUNK
    mine = reply_records(7, "req-1", payload)
    other = reply_records(8, "req-1", b'{"x": 1}')  # another client, same request id
    small = reply_records(7, "req-2", b"{}")
    assert REPLY_DTYPE.itemsize == 1024
    assert len(mine) == -(-len(payload) // REPLY_CHUNK)
    batch = np.concatenate([mine[:3], other, small, mine[3:]])
    asm = ReplyAssembler(7)
    assert asm.feed(batch[:4]) == []
    assert asm.feed(batch[4:]) == ["req-2", "req-1"]
    assert asm.done["req-1"] == payload
    assert json.loads(asm.done["req-2"]) == {}
    # a reply whose chunk went missing is never delivered half
    asm2 = ReplyAssembler(7)
    assert asm2.feed(np.concatenate([mine[:2], mine[3:]])) == []


def test_reply_ring_name_follows_the_exec_ring() -> None:
    from pipeline.trading.wire import REPLY_RING, reply_ring_for

    assert reply_ring_for("pipeline.trading.exec") == REPLY_RING
    assert reply_ring_for("pt_1_x.exec") == "pt_1_x.replies"
    assert reply_ring_for("odd") == "odd.replies"


def test_request_needs_a_running_trading_process(shm_name: str) -> None:
    from pipeline.trading.wire import OrderAction

    exec_ring = RingWriter.create(f"{shm_name}.exec", EXEC_DTYPE, 64)
    try:
        with OrderClient.attach("rq", exec_ring=f"{shm_name}.exec", prefix=f"{shm_name}.o.") as c:
            with pytest.raises(ValueError, match="symbol"):
                c.request(OrderAction.CANCEL_ALL)
            with pytest.raises(ValueError):
                c.request(OrderAction.PLACE)
            with pytest.raises(TradingNotRunningError, match="replies"):
                c.request(OrderAction.ACCOUNT)  # the exec ring exists, the reply ring does not
    finally:
        exec_ring.close()


def test_wait_reply_reports_a_lapped_reader_and_times_out(shm_name: str) -> None:
    from pipeline.trading.client import ReplyLostError
    from pipeline.trading.wire import REPLY_DTYPE, OrderAction, client_id_of, reply_records

    exec_ring = RingWriter.create(f"{shm_name}.exec", EXEC_DTYPE, 64)
    replies = RingWriter.create(f"{shm_name}.replies", REPLY_DTYPE, 8)
    try:
        with OrderClient.attach("lap", exec_ring=f"{shm_name}.exec", prefix=f"{shm_name}.o.") as c:
            rid = c.request(OrderAction.ACCOUNT)
            with pytest.raises(TimeoutError):
                c.wait_reply(rid, timeout=0.05)
            # our answer, then 20 records for another client: this reader (capacity 8) is
            # lapped before it reads, and our answer is gone
            replies.publish_many(reply_records(c.client_id, rid, b'{"ok": true}'))
            for k in range(20):
                replies.publish_many(reply_records(client_id_of("other"), f"x{k}", b"{}"))
            with pytest.raises(ReplyLostError, match="lapped"):
                c.wait_reply(rid, timeout=2.0)
            # the next answer arrives whole
            rid2 = c.request(OrderAction.OPEN_ORDERS, "BTCUSDT")
            replies.publish_many(reply_records(c.client_id, rid2, b'{"ok": true, "result": []}'))
            assert c.wait_reply(rid2, timeout=2.0) == {"ok": True, "result": []}
    finally:
        replies.close()
        exec_ring.close()


def test_reply_assembler_is_bounded() -> None:
    from pipeline.trading.client import ReplyAssembler
    from pipeline.trading.wire import MAX_REPLY_CHUNKS, REPLY_CHUNK, reply_records

    asm = ReplyAssembler(7)
    # replies whose first chunk was lapped never complete: at most MAX_PENDING are kept
    for k in range(1000):
        asm.feed(reply_records(7, f"lost-{k}", b"x" * (3 * REPLY_CHUNK))[1:])
    assert len(asm._parts) == ReplyAssembler.MAX_PENDING
    assert asm.corrupt == 1000 - ReplyAssembler.MAX_PENDING
    # a chunk count or index out of range is corrupt, never a huge allocation
    bad = reply_records(7, "bad", b"{}")
    bad["nchunks"] = MAX_REPLY_CHUNKS + 1
    assert asm.feed(bad) == []
    assert asm.corrupt == 1000 - ReplyAssembler.MAX_PENDING + 1
    # finished replies nobody waits for: the oldest go first
    for k in range(200):
        assert asm.feed(reply_records(7, f"done-{k}", b"{}")) == [f"done-{k}"]
    assert len(asm.done) == ReplyAssembler.MAX_DONE
    assert "done-199" in asm.done
    assert "done-0" not in asm.done
    assert asm.unclaimed == 200 - ReplyAssembler.MAX_DONE


def test_order_client_history_is_bounded(shm_name: str) -> None:
    exec_ring = RingWriter.create(f"{shm_name}.exec", EXEC_DTYPE, 1 << 14)
    try:
        with OrderClient.attach("bnd", exec_ring=f"{shm_name}.exec", prefix=f"{shm_name}.o.") as c:
            n = OrderClient.MAX_SEEN + 500
            batch = np.zeros(n, dtype=EXEC_DTYPE)
            batch["client_id"] = c.client_id
            batch["kind"] = int(ExecKind.ACK)
            batch["status"] = int(OrderStatus.NEW)
            batch["client_order_id"] = [f"o-{k}".encode() for k in range(n)]
            exec_ring.publish_many(batch)
            assert len(c.poll()) == n
            assert len(c._seen) <= OrderClient.MAX_SEEN
            assert c.reports("o-0") == []  # dropped with the oldest half
            assert [r.kind for r in c.reports(f"o-{n - 1}")] == ["ACK"]
            # a wait after the history was trimmed still finds answers published later
            coid = c.cancel("o-5", symbol="BTCUSDT")
            for k in range(OrderClient.MAX_MARKS + 10):
                c.status(f"s-{k}", symbol="BTCUSDT")
            assert len(c._mark) == OrderClient.MAX_MARKS
            done = ExecUpdate(coid, ExecKind.CANCELED, OrderStatus.CANCELED, client_id=c.client_id)
            exec_ring.publish(exec_record(done, 1))
            assert c.wait(coid, timeout=10.0).kind == "CANCELED"
    finally:
        exec_ring.close()
