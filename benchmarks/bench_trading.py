"""Order round trip: strategy -> shared memory -> trading process -> WS API -> ack -> back.

Three processes, as in production: the simulator (a spawned child with unlimited order/weight
limits so the benchmark measures latency, not rate limiting), ``pipeline trade`` (a subprocess)
and the strategy (this process, an :class:`pipeline.trading.client.OrderClient`). Each round places
a resting LIMIT order far from the market, waits for its ACK on the execution ring, and cancels
it (so the book stays small). The ACK record carries four wall-clock stamps::

    submit (client) -> sent (trading hands the request to websockets)
        -> reply (trading receives the response) -> publish (ACK on the exec ring) -> seen (client)

"ours" = (sent - submit) + (publish - reply) + (seen - publish): ring transit, intake polling,
session and codec, exec ring and client wake-up. "wire" = reply - sent: websockets send and
receive on both ends, loopback TCP and the simulator's own processing (an upper bound for the
network part). p50/p99 of the total and the share of each part are printed and recorded.

Issue #13 rows, side by side with the round trip: ``submit_to_wire`` (client submit -> the
request built and written to the transport: ``sent`` is stamped when the session builds the
request, and with picows the frame is written in the same call), the **floor** for it
(:func:`test_floor_write` - a minimal asyncio client writing a pre-built masked frame of the
same size to the same simulator WS API endpoint: what a write costs at all), ``reply_to_seen``
(venue reply bytes received -> exec record seen by the strategy) and the CPU an idle trading
process uses over 10 s (:func:`test_idle_trading_cpu`, psutil). Aims: submit -> wire p50 within
2x of the floor and < 15 us; reply -> seen p50 < 20 us; idle <= 2% of a core.

Scale with ``BENCH_SCALE`` (default 1.0 = 2000 orders; 0.01 for a smoke run).
Smoke run: ``BENCH_SCALE=0.01 pytest benchmarks/bench_trading.py --benchmark-disable``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from summary import emit

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))
N_ORDERS = max(20, int(2000 * SCALE))


def _sim_main(conn: Any, public_key: bytes) -> None:
    """Child process: the simulator with unlimited limits; sends its WS API URL, runs until told."""
    import asyncio

    from pipeline.sim.server import SimConfig
    from pipeline.sim.testing import SimServer

    async def main() -> None:
        cfg = SimConfig(symbols=["BTCUSDT"], rate=5.0, api_keys={"bench": public_key})
        cfg.wsapi_options = {"orders_per_10s": 10**9, "weight_per_minute": 10**9}
        async with SimServer(cfg) as sim:
            bid = float(sim.market.best("BTCUSDT")[0])
            conn.send({"url": sim.wsapi_url, "bid": bid})
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, conn.recv)  # any message = stop

    asyncio.run(main())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    from pipeline.binance.keys import generate_keypair, load_public_key
    from pipeline.ipc.metrics import MetricsBlock

    priv, pub = generate_keypair(tmp_path / "keys")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sim = ctx.Process(target=_sim_main, args=(child, load_public_key(pub)), daemon=True)
    sim.start()
    info = parent.recv()
    tag = f"bench{os.getpid()}"
    exec_ring, metrics = f"{tag}.exec", f"{tag}.metrics"
    trade = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "trade",
         "--wsapi-url", info["url"], "--api-key", "bench", "--private-key", str(priv),
         "--exec-ring", exec_ring, "--metrics", metrics],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with MetricsBlock.attach(metrics) as m:
                    if m.snapshot()["state"] == 3:
                        break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline or trade.poll() is not None:
                raise RuntimeError("trading process did not become READY")
            time.sleep(0.05)
        yield {"exec_ring": exec_ring, "bid": info["bid"], "tag": tag, "url": info["url"],
               "pid": trade.pid}
    finally:
        trade.terminate()
        _out, err = trade.communicate(timeout=20)
        parent.send("stop")
        sim.join(20)
        if sim.is_alive():
            sim.kill()
            sim.join()
        assert trade.returncode == 0, err[-2000:]


def test_order_round_trip(stack: dict[str, Any], benchmark: Any) -> None:
    from pipeline.trading.client import CANCEL_ANSWERS, OrderClient

    price = round(stack["bid"] * 0.5, 2)
    client = OrderClient.attach(f"{stack['tag']}c", exec_ring=stack["exec_ring"])
    try:
        # warm-up: the trading process discovers the new order ring (scan every 0.5 s)
        client.wait(client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price), 10)
        rows: list[tuple[int, int, int, int, int]] = []

        def one_round() -> None:
            coid = client.place(symbol="BTCUSDT", side="BUY", qty=0.001, price=price)
            ack = client.wait(coid, 10, frozenset({"ACK", "REJECT"}))
            seen = time.time_ns()
            assert ack.kind == "ACK", ack
            assert ack.status == "NEW"
            rows.append(
                (ack.submit_time_ns, ack.sent_time_ns, ack.reply_time_ns, ack.publish_time_ns,
                 seen)
            )  # fmt: skip
            client.cancel(coid, symbol="BTCUSDT")
            client.wait(coid, 10, CANCEL_ANSWERS)

        if getattr(benchmark, "disabled", False):  # --benchmark-disable runs once: all rounds
            def all_rounds() -> None:
                for _ in range(N_ORDERS):
                    one_round()

            benchmark(all_rounds)
        else:
            benchmark.pedantic(one_round, rounds=N_ORDERS, iterations=1, warmup_rounds=0)
    finally:
        client.close()

    a = np.array(rows, dtype=np.int64)
    assert len(a) == N_ORDERS
    submit, sent, reply, publish, seen = a.T
    assert np.all(submit <= sent)
    assert np.all(sent <= reply)
    assert np.all(reply <= publish)
    total = (seen - submit) / 1e3
    wire = (reply - sent) / 1e3
    ours = total - wire
    p50, p99 = np.percentile(total, [50, 99])
    summary = {
        "orders": len(a),
        "round_trip_p50_us": round(float(p50), 1),
        "round_trip_p99_us": round(float(p99), 1),
        "wire_p50_us": round(float(np.percentile(wire, 50)), 1),
        "ours_p50_us": round(float(np.percentile(ours, 50)), 1),
        "ours_share": round(float(ours.sum() / total.sum()), 3),
        "client_to_sent_p50_us": round(float(np.percentile((sent - submit) / 1e3, 50)), 1),
        "submit_to_wire_p99_us": round(float(np.percentile((sent - submit) / 1e3, 99)), 1),
        "reply_to_seen_p50_us": round(float(np.percentile((seen - reply) / 1e3, 50)), 1),
        "reply_to_seen_p99_us": round(float(np.percentile((seen - reply) / 1e3, 99)), 1),
        "reply_to_publish_p50_us": round(float(np.percentile((publish - reply) / 1e3, 50)), 1),
    }
    benchmark.extra_info.update(summary)
    emit("order round trip (strategy -> shm -> trading -> WS API -> ack -> strategy): "
         + json.dumps(summary))


def _order_frame_size() -> int:
    """Bytes of one order.place request as the trading process writes it (unmasked payload)."""
    from pipeline.trading.encode import TemplateRequestBuilder

    b = TemplateRequestBuilder("bench", None, id_prefix="1a2b3c4d5e-")
    params = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": 0.001,
              "newClientOrderId": "benchc1m2k3l4-1a", "price": 45000.12, "timeInForce": "GTC"}
    return len(b.build("order.place", params, timestamp_ms=1_767_225_600_123)[1].encode())


def _masked_text_frame(payload: bytes) -> bytes:
    """A client->server text frame (FIN, masked), built once: the floor writes it as is."""
    mask = os.urandom(4)
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    head = bytes([0x81]) + length
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def test_floor_write(stack: dict[str, Any], benchmark: Any) -> None:
    """The floor for submit -> wire: a minimal asyncio client, already connected to the
    simulator's WS API, writes a pre-built masked frame the size of an order request; each
    round times only ``transport.write`` (what any Python sender pays), then waits for the
    answer so rounds do not queue up."""
    import asyncio
    import base64
    from urllib.parse import urlsplit

    size = _order_frame_size()
    times: list[int] = []

    async def main() -> None:
        u = urlsplit(stack["url"])
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        payload = b'{"id":"f1","method":"ping","pad":"' + b"x" * max(0, size - 36) + b'"}'
        frame = _masked_text_frame(payload[:size] if len(payload) > size else payload)
        tr = writer.transport
        time_ns = time.time_ns
        for _ in range(N_ORDERS):
            t0 = time_ns()
            tr.write(frame)
            t1 = time_ns()
            times.append(t1 - t0)
            first = await reader.readexactly(2)  # the answer (an error: no such param), whole
            n = first[1] & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await reader.readexactly(8), "big")
            await reader.readexactly(n)
        writer.close()

    benchmark.pedantic(lambda: asyncio.run(main()), rounds=1, iterations=1)
    a = np.array(times, dtype=np.int64) / 1e3
    summary = {
        "frames": len(a),
        "frame_bytes": size,
        "floor_write_p50_us": round(float(np.percentile(a, 50)), 2),
        "floor_write_p99_us": round(float(np.percentile(a, 99)), 2),
    }
    benchmark.extra_info.update(summary)
    emit("floor: minimal asyncio client, pre-built masked frame -> transport.write: "
         + json.dumps(summary))


def test_idle_trading_cpu(stack: dict[str, Any], benchmark: Any) -> None:
    """CPU of the logged-on trading process with no orders for 10 s (a strategy attached, so
    its order ring is being watched). Aim: <= 2% of a core."""
    import psutil

    from pipeline.trading.client import OrderClient

    proc = psutil.Process(stack["pid"])
    client = OrderClient.attach(f"{stack['tag']}i", exec_ring=stack["exec_ring"])
    try:
        time.sleep(1.0)  # let it attach the ring and settle
        result: dict[str, float] = {}

        def measure() -> None:
            t0, c0 = time.monotonic(), proc.cpu_times()
            time.sleep(10.0 * min(1.0, max(SCALE, 0.1)))
            t1, c1 = time.monotonic(), proc.cpu_times()
            busy = (c1.user - c0.user) + (c1.system - c0.system)
            result["idle_cpu_pct"] = round(100 * busy / (t1 - t0), 2)
            result["seconds"] = round(t1 - t0, 1)

        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        client.close()
    benchmark.extra_info.update(result)
    emit("idle trading process CPU (% of one core, no orders): " + json.dumps(result))


def test_amend_vs_cancel_replace(stack: dict[str, Any], benchmark: Any) -> None:
    """Round trip of a quantity change, side by side: ``order.amend.keepPriority`` (the order
    keeps its id and queue place; at most 10 per order, so each order is amended 10 times and
    then cancelled) against ``order.cancelReplace`` (a new order each time). Each round is
    strategy submit -> the answer seen by the strategy."""
    from pipeline.trading.client import AMEND_ANSWERS, CANCEL_ANSWERS, PLACE_ANSWERS, OrderClient

    price = round(stack["bid"] * 0.5, 2)
    client = OrderClient.attach(f"{stack['tag']}a", exec_ring=stack["exec_ring"])
    rounds = max(20, N_ORDERS // 4)
    amend_us: list[float] = []
    replace_us: list[float] = []
    lot = 0.001

    def place(qty: float) -> str:
        coid = client.place(symbol="BTCUSDT", side="BUY", qty=qty, price=price)
        assert client.wait(coid, 10, PLACE_ANSWERS).kind in ("ACK", "NEW")
        return coid

    def run_all() -> None:
        place(lot)  # warm-up: the trading process discovers the new order ring
        while len(amend_us) < rounds:
            coid = place(11 * lot)
            for k in range(10, 0, -1):
                t0 = time.perf_counter_ns()
                client.amend(coid, qty=round(k * lot, 3), symbol="BTCUSDT")
                want = round(k * lot, 3)
                r = client.wait(coid, 10, AMEND_ANSWERS)
                amend_us.append((time.perf_counter_ns() - t0) / 1e3)
                # one REPLACED per amend (reply or report, whichever first): the next
                # amend's wait cannot take a stale one for its answer
                assert (r.kind, r.qty) == ("REPLACED", want), r
            client.cancel(coid, symbol="BTCUSDT")
            client.wait(coid, 10, CANCEL_ANSWERS)
        coid = place(lot)
        while len(replace_us) < rounds:
            t0 = time.perf_counter_ns()
            new = client.modify(coid, qty=lot, price=price, symbol="BTCUSDT", side="BUY",
                                type="LIMIT", tif="GTC")  # fmt: skip
            r = client.wait(new, 10, PLACE_ANSWERS)
            replace_us.append((time.perf_counter_ns() - t0) / 1e3)
            assert r.kind in ("ACK", "NEW"), r
            coid = new
        client.cancel(coid, symbol="BTCUSDT")
        client.wait(coid, 10, CANCEL_ANSWERS)

    try:
        benchmark.pedantic(run_all, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        client.close()
    a, c = np.array(amend_us), np.array(replace_us)
    summary = {
        "rounds_each": rounds,
        "amend_p50_us": round(float(np.percentile(a, 50)), 1),
        "amend_p99_us": round(float(np.percentile(a, 99)), 1),
        "cancel_replace_p50_us": round(float(np.percentile(c, 50)), 1),
        "cancel_replace_p99_us": round(float(np.percentile(c, 99)), 1),
    }
    benchmark.extra_info.update(summary)
    emit("amend vs cancelReplace (strategy submit -> answer seen): " + json.dumps(summary))


# ---- in-process rows: the trading process's own CPU per order, no sockets -------------------
#
# Why apart from the round trip: the round trip's "submit -> written" mixes this process's
# Python with two processes' wake-ups on two busy cores; these rows time only the code an
# order runs inside one process, so a change to it shows up as a ratio, not as noise.

_RULES_ENTRY = {  # an exchangeInfo symbol entry like the simulator's (checked on every PLACE)
    "symbol": "BTCUSDT", "status": "TRADING", "baseAsset": "BTC", "quoteAsset": "USDT",
    "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
    "allowedSelfTradePreventionModes": ["NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
    "filters": [
        {"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "1000000.00",
         "tickSize": "0.01"},
        {"filterType": "LOT_SIZE", "minQty": "0.00001", "maxQty": "9000.00000",
         "stepSize": "0.00001"},
        {"filterType": "NOTIONAL", "minNotional": "5.00", "applyMinToMarket": True,
         "maxNotional": "9000000.00", "applyMaxToMarket": False, "avgPriceMins": 5},
    ],
}  # fmt: skip


def _ready_dispatcher() -> tuple[Any, Any]:
    """A :class:`TradingProcess`'s dispatcher and session, logged on by hand (the venue's
    replies written here, no socket), with the exchangeInfo rules loaded and a connection
    object in place so the outbox check runs as in production. Returns (process, conn)."""
    from pipeline.binance.keys import parse_private_key
    from pipeline.trading.process import TradingConfig, TradingProcess
    from pipeline.trading.session import Send, State
    from pipeline.trading.sockets import WsConn

    tp = TradingProcess(TradingConfig(), parse_private_key("11" * 32))
    s = tp.session

    def answer(result: dict[str, Any]) -> None:
        sends = [a for a in s.actions() if isinstance(a, Send)]
        rid = json.loads(sends[-1].text)["id"]
        s.frame_received(1, json.dumps({"id": rid, "status": 200, "result": result}))

    s.start()
    s.actions()
    s.connected(1)
    answer({"serverTime": time.time_ns() // 1_000_000})
    answer({"apiKey": "bench"})
    answer({"subscriptionId": 0})
    assert s.state is State.READY
    s.updates()
    tp._sockets.conns[1] = WsConn(1, tp.config.outbox_capacity)
    assert tp._rules is not None
    tp._rules.check("BTCUSDT", "LIMIT", 1.0, 1.0)  # the first order of a symbol asks its rules
    tp._rules.loaded({"symbols": [_RULES_ENTRY]}, tp._rules.start_fetch())
    assert "BTCUSDT" in tp._rules.rules
    return tp, tp._sockets.conns[1]


def test_execute_place_in_process(benchmark: Any) -> None:
    """One PLACE through ``OrderDispatcher.execute`` as the trading process runs it: outbox
    check, exchangeInfo rules, order entry checks, order table, the request text; the
    session's Send action is then taken off (what the pump does before the socket write).
    Per round: one order. The table and the pending requests are emptied every 1000 orders
    (they are not what is measured; a full table would refuse)."""
    from pipeline.trading.intake import OrderCommand
    from pipeline.trading.wire import OrderAction

    tp, _conn = _ready_dispatcher()
    s = tp.session
    execute = tp._orders.execute
    link = s.connections
    n = [0]

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        n[0] += 1
        if n[0] % 1000 == 0:
            s.table.orders.clear()
            link.conns[1].pending.clear()
        cmd = OrderCommand(OrderAction.PLACE, 7, f"benchc1m2k3l4-{n[0]:x}", "", "BTCUSDT",
                           "BUY", "LIMIT", "GTC", 45000.12, 0.001, time.time_ns())  # fmt: skip
        return (cmd,), {}

    def one(cmd: Any) -> None:
        execute(cmd)
        s.actions()

    benchmark.pedantic(one, setup=setup, rounds=max(2000, int(20000 * SCALE)), warmup_rounds=100)
    assert s.metrics["orders_sent"] > 0
    assert not s.table.updates  # none refused


def test_exec_report_from_record(benchmark: Any) -> None:
    """The strategy's decoding of one ACK record off the exec ring (``OrderClient.poll``)."""
    from pipeline.trading.client import ExecReport
    from pipeline.trading.wire import EXEC_DTYPE, ExecKind, ExecUpdate, OrderStatus, exec_record

    u = ExecUpdate("benchc1m2k3l4-1a", ExecKind.ACK, OrderStatus.NEW, symbol="BTCUSDT",
                   side="BUY", order_id=123456789, price=45000.12, qty=0.001,
                   submit_time_ns=time.time_ns(), event_time_ns=time.time_ns(), client_id=7,
                   sent_time_ns=time.time_ns(), reply_time_ns=time.time_ns())  # fmt: skip
    rec = np.array([exec_record(u, time.time_ns())], dtype=EXEC_DTYPE)[0]
    r = benchmark(ExecReport.from_record, rec)
    assert (r.kind, r.status, r.side, r.qty) == ("ACK", "NEW", "BUY", 0.001)
