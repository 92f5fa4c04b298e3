"""`pipeline ingest` against the simulator: real processes, real sockets, the ring read from this
(separate) process. Timings are shortened through flags so the fault schedule of the issue
(10 drops, a black hole, a serverShutdown, skipped ids) runs in ~15 s."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import pytest

from pipeline.ipc import shm
from pipeline.ipc.metrics import MetricsBlock, MetricsError
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind
from pipeline.ipc.ring import RingError, RingReader
from pipeline.sim.testing import SimProcess, run_sim_process
from tests.ingesthelpers import stale_marks

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
FAST = ["--stall-timeout", "1.0", "--backoff-base", "0.05", "--backoff-max", "0.3",
        "--healthy-after", "0.5", "--ping-interval", "0.5", "--backfill-grace", "0.05",
        "--metrics-interval", "0.05", "--rest-timeout", "2", "--ring-capacity", "262144"]


@dataclass
class Ingest:
    proc: subprocess.Popen[bytes]
    reader: RingReader
    metrics_block: MetricsBlock
    log_path: str
    batches: list[np.ndarray] = field(default_factory=list)

    def poll(self) -> None:
        b = self.reader.poll()
        if len(b):
            self.batches.append(b.copy())

    def records(self) -> np.ndarray:
        self.poll()
        return np.concatenate(self.batches) if self.batches else np.zeros(0, TICK_DTYPE)

    def metrics(self) -> dict[str, Any]:
        return self.metrics_block.snapshot()

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for(self, what: Callable[[], bool], timeout: float, label: str) -> None:
        """Poll the ring until ``what()`` holds (the deadline only bounds a failing test)."""
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, f"ingest died:\n{self.log_text()[-3000:]}"
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {label}\n{self.log_text()[-3000:]}")
            self.poll()
            time.sleep(0.02)


@contextmanager
def run_ingest(sim: SimProcess, name: str, *extra: str,
               symbols: list[str] = SYMBOLS) -> Iterator[Ingest]:
    ring, metrics = f"{name}_ring", f"{name}_met"
    log_path = f"/tmp/{name}_ingest.log"
    cmd = [sys.executable, "-m", "pipeline", "--log-format", "text", "ingest",
           "--streams-url", sim.streams_url, "--rest-url", sim.rest_url,
           "--symbols", ",".join(symbols), "--ring", ring, "--metrics", metrics, *FAST, *extra]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stderr=logf, stdout=subprocess.DEVNULL)
    reader = block = None
    try:
        # Both mappings are kept open for the whole test: they stay valid even if something
        # unlinks the names meanwhile.
        deadline = time.monotonic() + 15
        while reader is None or block is None:
            try:
                reader = reader or RingReader.attach(ring, name="itest", start="oldest")
                block = block or MetricsBlock.attach(metrics)
            except (FileNotFoundError, MetricsError, RingError):
                # not there yet, or created but not yet sized/initialised by ingest
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log_path) as f:
                        raise RuntimeError(f"ingest did not start:\n{f.read()[-3000:]}") from None
                time.sleep(0.05)
        ing = Ingest(proc, reader, block, log_path)
        yield ing
        ing.poll()
        assert ing.reader.missed == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, ing.log_text()[-3000:]
        # the final metrics flush happened on shutdown: its count matches what the ring holds
        final = block.snapshot()
        assert final["published"] == len(ing.records())
        if final["symbols"] >= 1 and len(agg_of(ing.records(), 0)):
            assert final["last_agg_id_0"] == int(agg_of(ing.records(), 0)["trade_id"][-1])
        assert not os.path.exists(f"/dev/shm/{ring}"), "ring not unlinked on shutdown"
        assert not os.path.exists(f"/dev/shm/{metrics}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            for seg in (ring, metrics):  # a killed ingest could not unlink its segments
                shm.unlink(seg)
        if reader is not None:
            reader.close()
        if block is not None:
            block.close()
        os.unlink(log_path)


def fastpath_built() -> bool:
    from pipeline.marketdata.fastpath import load

    return load()[0] is not None


def rest_agg_ids(sim: SimProcess, symbol: str, first: int, last: int) -> dict[int, tuple]:
    """The simulator's truth for ids first..last: id -> (price, qty, maker)."""
    out: dict[int, tuple] = {}
    frm = first
    while frm <= last:
        url = f"{sim.rest_url}/api/v3/aggTrades?symbol={symbol}&fromId={frm}&limit=1000"
        with urllib.request.urlopen(url, timeout=5) as resp:
            rows = json.loads(resp.read())
        if not rows:
            break
        for r in rows:
            if r["a"] <= last:
                out[r["a"]] = (float(r["p"]), float(r["q"]), r["m"])
        frm = rows[-1]["a"] + 1
    return out


def agg_of(recs: np.ndarray, sid: int) -> np.ndarray:
    return recs[(recs["kind"] == Kind.AGG_TRADE) & (recs["symbol"] == sid)]


def assert_exactly_once_in_order(sim: SimProcess, recs: np.ndarray,
                                 min_trades: int = 50) -> dict[str, int]:
    """Every aggregate id from the first seen to the last, once, in order, with the simulator's
    values; returns backfilled counts per symbol."""
    backfilled = {}
    for sid, sym in enumerate(SYMBOLS):
        a = agg_of(recs, sid)
        ids = a["trade_id"]
        assert len(ids) > min_trades, f"{sym}: too few trades ({len(ids)})"
        diffs = np.diff(ids)
        bad = np.nonzero(diffs != 1)[0]
        assert len(bad) == 0, f"{sym}: ids not contiguous at {[(ids[i], ids[i + 1]) for i in bad]}"
        truth = rest_agg_ids(sim, sym, int(ids[0]), int(ids[-1]))
        assert sorted(truth) == ids.tolist()
        for r in a:
            p, q, m = truth[int(r["trade_id"])]
            assert (r["price"], r["qty"]) == (p, q)
            assert bool(r["flags"] & Flags.BUYER_IS_MAKER) == m
        backfilled[sym] = int(np.count_nonzero(a["flags"] & Flags.BACKFILLED))
    return backfilled


@pytest.mark.slow
def test_chaos_every_agg_trade_exactly_once(shm_name: str) -> None:
    """10 drops, a data stall, a black hole, a serverShutdown and withheld ids: every aggregate
    trade id exactly once, in order, with the simulator's values; no GAP record."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "7") as sim, \
            run_ingest(sim, shm_name, "--depth-levels", "3") as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 5, 15, "first trades")

        def pause(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                ing.poll()
                time.sleep(0.05)

        for i in range(10):
            sim.fault("drop", mode="abort" if i % 2 else "close")
            pause(0.9)
            if i == 1:  # data stops, pings still answered: only the stall watchdog sees it
                sim.fault("stall", duration=1.6)
                pause(2.0)
            if i == 3:
                sim.fault("blackhole", duration=1.8)
                pause(2.2)
            if i == 5:
                sim.fault("shutdown", close_after=1.5)
                pause(1.0)
            if i == 7:
                sim.fault("skip_agg_ids", count=4, symbol="ETHUSDT")
                pause(1.0)
        pause(1.0)
        ing.wait_for(lambda: ing.metrics()["conn_state_0"] == 2, 10, "connection up")
        last = {sid: int(agg_of(ing.records(), sid)["trade_id"][-1]) for sid in (0, 1)}
        ing.wait_for(lambda: all(int(agg_of(ing.records(), s)["trade_id"][-1]) > last[s] + 3
                                 for s in (0, 1)), 10, "trades after the faults")
        # metrics first, then the ring: ingest keeps running, so a snapshot taken after the read
        # could name ids the read did not see yet (a metrics flush only ever follows the commit
        # of the records behind it, so this order makes the id comparison below race-free)
        m = ing.metrics()
        recs = ing.records()
        state = sim.state()
        backfilled = assert_exactly_once_in_order(sim, recs)
        assert not np.any(recs["kind"] == Kind.GAP)
        assert backfilled["ETHUSDT"] >= 4  # the withheld ids came from REST
        assert state["faults"]["fired"].get("skip_agg_ids", 0) >= 4
        # 10 drops + the stall + the black hole (the stall watchdog or the unanswered keep-alive)
        assert m["reconnects"] >= 12, m
        assert m["stalls"] >= 1, m
        assert m["server_shutdowns"] >= 1
        assert m["rotations"] >= 1
        assert m["gaps_unrecoverable"] == 0
        assert m["ids_lost"] == 0
        assert 0 <= int(agg_of(recs, 1)["trade_id"][-1]) - m["last_agg_id_1"] < 200
        # other streams made it too, books were (re)synced and the top is never crossed
        assert np.any(recs["kind"] == Kind.BOOK_TICKER)
        assert np.any(recs["kind"] == Kind.BOOK_RESYNC)
        tops = recs[recs["kind"] == Kind.DEPTH_TOP]
        assert len(tops) > 0
        both = tops[(tops["bid_price"] > 0) & (tops["ask_price"] > 0)]
        assert np.all(both["bid_price"] < both["ask_price"])
        levels = recs[recs["kind"] == Kind.DEPTH_LEVEL]
        assert set(np.unique(levels["level"]).tolist()) <= {0, 1, 2}
        bt = recs[recs["kind"] == Kind.BOOK_TICKER]
        for sid in (0, 1):
            u = bt[bt["symbol"] == sid]["trade_id"]
            assert np.all(np.diff(u) > 0), "bookTicker duplicates or reordering"
        pub = recs["publish_time_ns"]
        assert np.all(pub >= recs["recv_time_ns"])
        # each lost connection marked the books stale (once per outage) until they were
        # current again: resynced after a break, or carried on by contiguous diffs
        marks = [stale_marks(recs, sid, ends=(Kind.BOOK_RESYNC, Kind.DEPTH_TOP))
                 for sid in (0, 1)]
        assert min(marks) >= 1
        assert 1 <= m["books_stale"] <= sum(marks)  # metrics were read before the ring


def test_rest_failure_produces_a_gap_record(shm_name: str) -> None:
    cpu = max(os.sched_getaffinity(0))  # also checks --cpu pinning
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "3") as sim, \
            run_ingest(sim, shm_name, "--rest-retries", "2", "--streams", "aggTrade",
                       "--cpu", str(cpu)) as ing:
        assert psutil.Process(ing.proc.pid).cpu_affinity() == [cpu]
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 5, 15, "first trades")
        sim.fault("rest_fail", duration=60)
        sim.fault("skip_agg_ids", count=3, symbol="BTCUSDT")
        ing.wait_for(lambda: np.any(ing.records()["kind"] == Kind.GAP), 15, "GAP record")
        last = int(agg_of(ing.records(), 0)["trade_id"][-1])
        ing.wait_for(lambda: int(agg_of(ing.records(), 0)["trade_id"][-1]) > last + 2, 10,
                     "trades after the gap")
        recs = ing.records()
        gaps = recs[recs["kind"] == Kind.GAP]
        assert len(gaps) == 1
        g = gaps[0]
        assert g["symbol"] == 0
        assert g["aux_id"] - g["trade_id"] + 1 == 3  # exactly the withheld ids
        ids = agg_of(recs, 0)["trade_id"].tolist()
        assert int(g["trade_id"]) - 1 in ids
        assert int(g["aux_id"]) + 1 in ids
        assert int(g["trade_id"]) not in ids
        # every other id exactly once, in order, GAP in its place in the sequence
        seq = [(int(r["trade_id"]), int(r["aux_id"])) if r["kind"] == Kind.GAP
               else (int(r["trade_id"]), int(r["trade_id"]))
               for r in recs if r["symbol"] == 0 and r["kind"] in (Kind.AGG_TRADE, Kind.GAP)]
        for (_, prev_last), (first, _) in itertools.pairwise(seq):
            assert first == prev_last + 1
        m = ing.metrics()
        assert m["gaps_unrecoverable"] == 1
        assert m["ids_lost"] == 3
        assert m["rest_errors"] >= 3
        assert not np.any(agg_of(recs, 1)["flags"] & Flags.BACKFILLED)


@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_rotation_is_make_before_break(shm_name: str, fast_path: str) -> None:
    """Server lifetime 2.5 s with a serverShutdown notice, plus our own --max-lifetime: every
    connection is replaced several times, and the ring sees no gap and no duplicate (with the
    compiled path and without it: the overlap's duplicates are its fallback's job), and the
    books never go stale nor resync after their first snapshot."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--max-lifetime", "2.5",
                         "--shutdown-notice", "1.0") as sim, \
            run_ingest(sim, shm_name, "--max-lifetime", "1.2",
                       "--streams", "aggTrade,bookTicker,depth@100ms",
                       "--fast-path", fast_path) as ing:
        ing.wait_for(lambda: ing.metrics()["rotations"] >= 4, 20, "4 rotations")
        last = {s: int(agg_of(ing.records(), s)["trade_id"][-1]) for s in (0, 1)}
        ing.wait_for(lambda: all(int(agg_of(ing.records(), s)["trade_id"][-1]) > last[s]
                                 for s in (0, 1)), 10, "trades after the last rotation")
        recs = ing.records()
        m = ing.metrics()
        backfilled = assert_exactly_once_in_order(sim, recs)
        assert not np.any(recs["kind"] == Kind.GAP)
        assert m["reconnects"] == 0, m  # never a break
        assert m["gaps_unrecoverable"] == 0
        assert backfilled == {"BTCUSDT": 0, "ETHUSDT": 0}, "rotation left a hole"
        assert not np.any(recs["kind"] == Kind.BOOK_STALE)
        resyncs = recs[recs["kind"] == Kind.BOOK_RESYNC]
        assert sorted(resyncs["symbol"].tolist()) == [0, 1]  # each book synced once, at start
        assert (m["books_stale"], m["book_breaks"]) == (0, 0)
        assert m["duplicates"] > 0  # the overlap delivered trades twice; the ring has them once
        expect = ("compiled (aggTrade, trade, bookTicker)" if fast_path == "auto"
                  else "off (--fast-path off)")
        assert f"fast path: {expect}" in ing.log_text()
        assert m["fast_path"] == (fast_path == "auto")
        assert (m["frames_fast"] > 0) == (fast_path == "auto")


def test_microsecond_time_unit_end_to_end(shm_name: str) -> None:
    """--time-unit MICROSECOND: the stream URL asks for it, the simulator sends microseconds, and
    every record still carries its exchange time in ns (close to the local receive time)."""
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "60", "--seed", "5") as sim, \
            run_ingest(sim, shm_name, "--time-unit", "MICROSECOND",
                       "--streams", "aggTrade,trade,depth") as ing:
        def ready() -> bool:
            r = ing.records()
            return len(agg_of(r, 0)) > 20 and bool(np.any(
                (r["kind"] == Kind.DEPTH_TOP) & (r["event_time_ns"] != 0)))  # from a diff

        ing.wait_for(ready, 15, "trades and diff-depth tops")
        recs = ing.records()
        assert_exactly_once_in_order(sim, recs, min_trades=10)
        timed = recs[np.isin(recs["kind"], [Kind.AGG_TRADE, Kind.TRADE, Kind.DEPTH_TOP])
                     & (recs["flags"] & Flags.BACKFILLED == 0)
                     & (recs["event_time_ns"] != 0)]  # tops from a REST snapshot have no time
        assert np.count_nonzero(timed["kind"] == Kind.DEPTH_TOP) > 0
        assert np.count_nonzero(timed["kind"] == Kind.TRADE) > 0
        lag_s = (timed["recv_time_ns"] - timed["event_time_ns"]) / 1e9
        assert np.all(np.abs(lag_s) < 5), lag_s  # a unit mix-up would be off by 1000x
        assert not np.any(recs["kind"] == Kind.GAP)


@pytest.mark.parametrize("transport", ["picows", "websockets"])
def test_malformed_flood_is_counted_and_survived(shm_name: str, transport: str) -> None:
    kinds = {"truncated": 40, "invalid_json": 40, "binary": 20, "bad_utf8": 20}
    with run_sim_process("--symbols", ",".join(SYMBOLS), "--rate", "40") as sim, \
            run_ingest(sim, shm_name, "--streams", "aggTrade", "--max-frame-bytes",
                       str(1 << 20), "--transport", transport) as ing:
        ing.wait_for(lambda: len(agg_of(ing.records(), 0)) > 3, 15, "first trades")
        for kind, n in kinds.items():
            sim.fault("malformed", kind=kind, count=n, target="streams")
        sim.fault("malformed", kind="oversized", count=3, size=(1 << 20) + 1000,
                  target="streams")
        expected_json = sum(kinds.values())
        ing.wait_for(lambda: ing.metrics()["skipped_total"] >= expected_json + 3, 15,
                     "skip counters")
        last = int(agg_of(ing.records(), 0)["trade_id"][-1])
        ing.wait_for(lambda: int(agg_of(ing.records(), 0)["trade_id"][-1]) > last + 2, 10,
                     "trades after the flood")
        m = ing.metrics()
        assert m["skipped_malformed_json"] == expected_json, m
        assert m["skipped_oversized"] == 3, m
        assert m["skipped_total"] == expected_json + 3
        assert m["reconnects"] == 0
        assert m["callback_errors"] == 0
        assert "frame skipped" in ing.log_text()
        # rate-limited: far fewer log lines than skipped frames
        assert ing.log_text().count("frame skipped") < 10
        assert_exactly_once_in_order(sim, ing.records(), min_trades=1)


def test_bad_config_exits_2_naming_the_flag() -> None:
    for args, flag in ((["--symbols", "btc-usdt"], "--symbols"),
                       (["--streams", "aggTrade,klines"], "--streams"),
                       (["--streams-url", "http://x"], "--streams-url"),
                       (["--ring-capacity", "1000"], "--ring-capacity"),
                       (["--transport", "aiohttp"], "--transport"),
                       (["--stall-timeout", "0"], "--stall-timeout"),
                       (["--publish-batch", "0"], "--publish-batch"),
                       (["--publish-batch", "2048", "--ring-capacity", "1024"],
                        "--publish-batch"),
                       (["--fast-path", "maybe"], "--fast-path"),
                       (["--time-unit", "NANOSECOND"], "--time-unit")):
        p = subprocess.run([sys.executable, "-m", "pipeline", "ingest", *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert flag in p.stderr
        assert "Traceback" not in p.stderr


def test_frame_handler_paths_in_process(shm_name: str) -> None:
    """The handler on recorded frames, without sockets: dedupe of trades / bookTicker / partial
    depth, control replies, serverShutdown, skips, and the book path up to a snapshot."""
    import asyncio
    from pathlib import Path

    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    fix = Path(__file__).parent / "fixtures" / "streams_ingest"
    syms = ["BTCUSDT", "ETHUSDT", "NKNUSDT", "FLMUSDT"]
    cfg = IngestConfig(symbols=syms, streams=["trade", "bookTicker", "depth@100ms",
                                              "depth20@100ms"], depth_levels=2)

    class FakeShard:
        index = 0
        wake = asyncio.Event()

    class FakeConn:
        last_ns = 0
        first_pending = False
        shutdown_requested = False
        shard = FakeShard()

    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 12, symbols=syms)
    try:
        ing = Ingest(cfg, w, None)
        spawned: list[int] = []
        ing._spawn = lambda coro, running, key: (coro.close(), spawned.append(key))  # type: ignore[method-assign]
        conn = FakeConn()
        h = ing.handle
        trade = json.loads((fix / "trade.json").read_text())[0]
        raw = json.dumps(trade).encode()
        h(conn, raw, 5)  # type: ignore[arg-type]
        h(conn, raw, 6)  # type: ignore[arg-type]  # duplicate (two connections)
        for line in (fix / "combined_session.jsonl").read_bytes().splitlines():
            h(conn, line, 7)  # type: ignore[arg-type]
        part = json.dumps(json.loads((fix / "depth20.json").read_text())[0]).encode()
        h(conn, part, 8)  # type: ignore[arg-type]
        h(conn, part, 9)  # type: ignore[arg-type]  # same lastUpdateId: dropped
        h(conn, (fix / "hostile/subscribe_ack_result_null.json").read_bytes(), 10)  # type: ignore[arg-type]
        h(conn, (fix / "serverShutdown_combined.json").read_bytes(), 11)  # type: ignore[arg-type]
        h(conn, b"garbage", 12)  # type: ignore[arg-type]
        rd = RingReader.attach(shm_name, name="t", start="oldest")
        r = rd.poll()
        rd.close()
        assert len(r) == w.cursor
        kinds = r["kind"].tolist()
        assert kinds.count(Kind.TRADE) == 1
        assert conn.shutdown_requested
        assert ing.c["duplicates"] >= 2
        assert ing.c["control_replies"] == 1
        assert ing.skipped["malformed_json"] == 1
        from pipeline.binance.streams import STREAM_SUFFIXES

        names = [json.loads(x)["stream"] for x in (fix / "combined_session.jsonl").read_text()
                 .splitlines()]
        unknown = [n for n in names if n.split("@")[0].upper() not in syms
                   or n.split("@", 1)[1] not in STREAM_SUFFIXES]
        assert len(unknown) == 40  # 3 symbols not configured, and kline_1m
        assert ing.skipped["unknown_stream"] == len(unknown)
        # NKNUSDT bookTicker: the session's 74 updates, strictly increasing ids
        bt = r[(r["kind"] == Kind.BOOK_TICKER) & (r["symbol"] == 2)]
        assert len(bt) == 74
        assert np.all(np.diff(bt["trade_id"]) > 0)
        # partial depth: one DEPTH_TOP + 2 DEPTH_LEVEL, flagged SNAPSHOT, symbol FLMUSDT
        snap = r[(r["symbol"] == 3)]
        assert snap["kind"].tolist() == [Kind.DEPTH_TOP, Kind.DEPTH_LEVEL, Kind.DEPTH_LEVEL]
        assert np.all(snap["flags"] & Flags.SNAPSHOT)
        assert snap["level"].tolist() == [0, 0, 1]
        assert snap[0]["bid_price"] == 0.4856
        # diff depth: a snapshot fetch was requested for NKNUSDT, nothing published yet
        assert 2 in spawned
        assert not np.any((r["kind"] == Kind.DEPTH_TOP) & (r["symbol"] == 2))
        # the recorded snapshot syncs the book; then the next diffs publish tops
        body = json.loads((fix / "depth_snapshot.json").read_text())
        book = ing.depth.books[2]
        book.on_snapshot(body["lastUpdateId"], [(float(p), float(q)) for p, q in body["bids"]],
                         [(float(p), float(q)) for p, q in body["asks"]])
        assert book.synced
    finally:
        w.close()


def test_long_stream_lists_go_out_as_paced_subscribe_batches(shm_name: str,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """When the URL cannot hold every stream, the rest is subscribed in SUBSCRIBE batches paced
    under the 5 messages/s limit (the simulator enforces it and would drop the connection)."""
    import asyncio

    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata import ingest as ingmod
    from pipeline.marketdata import shards
    from pipeline.sim.server import SimConfig
    from pipeline.sim.testing import SimServer

    syms = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]
    monkeypatch.setattr(shards, "MAX_URL_CHARS", 60)  # one stream in the URL
    monkeypatch.setattr(shards, "SUBSCRIBE_BATCH", 1)  # 8 SUBSCRIBE messages: > 5/s unpaced
    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 14, symbols=syms)

    async def main() -> tuple[dict[str, int], set[int], int]:
        async with SimServer(SimConfig(symbols=syms, rate=50.0)) as sim:
            cfg = ingmod.validate(ingmod.IngestConfig(
                streams_url=sim.streams_url, rest_url=sim.rest_url, symbols=syms,
                streams=["aggTrade", "bookTicker", "trade"], ring=shm_name, metrics="unused"))
            ing = ingmod.Ingest(cfg, w, None)
            shard = ing.shards[0]
            assert len(shard.url_streams) == 1
            assert len(shard.sub_streams) == 8
            task = asyncio.get_running_loop().create_task(ing.run())
            rd = RingReader.attach(shm_name, name="t", start="oldest")
            seen: set[int] = set()
            try:
                for _ in range(400):  # until every symbol's trades and tickers flow
                    b = rd.poll()
                    seen |= {int(k) * 10 + int(s) for k, s in zip(b["kind"], b["symbol"],
                                                                  strict=True)}
                    if ing.c["control_replies"] >= 8 and len(seen) >= 9:
                        break
                    await asyncio.sleep(0.02)
            finally:
                rd.close()
                ing.stop()
                await task
            return dict(ing.c), seen, shard.conn is None

    try:
        c, seen, _ = asyncio.run(main())
    finally:
        w.close()
    assert c["control_replies"] == 8
    assert c["control_errors"] == 0
    assert c["reconnects"] == 0  # paced: the simulator never dropped us for flooding
    assert seen == {k * 10 + i for k in (Kind.AGG_TRADE, Kind.BOOK_TICKER, Kind.TRADE)
                    for i in range(3)}


def _agg_frame(sym: str, agg_id: int) -> bytes:
    return (b'{"stream":"%s@aggTrade","data":{"e":"aggTrade","E":1768627409826,"s":"%s",'
            b'"a":%d,"p":"95311.64000000","q":"0.00084000","f":1,"l":2,"T":1768627409825,'
            b'"m":true,"M":true}}' % (sym.lower().encode(), sym.encode(), agg_id))


@pytest.mark.parametrize("fast_path", ["off", "auto"])
@pytest.mark.parametrize("batch", [1, 4, 64])
def test_every_frame_is_visible_once_decoded_within_a_loop_iteration(
        shm_name: str, batch: int, fast_path: str) -> None:
    """Frames handled in one event-loop iteration (one socket read's burst): each record is
    visible as soon as its frame is handled, never held back for the rest of the burst,
    whatever ``--publish-batch`` (it bounds only a multi-record frame's commit); in order,
    exactly once, publish_time_ns the time it became visible. The same with the compiled
    path taking the frames after the first of each stream (``auto``)."""

    import uvloop

    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 10, symbols=SYMBOLS)
    loop = uvloop.new_event_loop()
    try:
        cfg = IngestConfig(symbols=SYMBOLS, streams=["aggTrade", "bookTicker"],
                           publish_batch=batch, fast_path=fast_path)
        ing = Ingest(cfg, w, None)
        ing.setup_publishing(loop)
        assert (ing.fast is not None) == (fast_path == "auto" and fastpath_built())

        class FakeConn:
            last_ns = 0
            first_pending = False

        seen_cursor: list[int] = []

        async def one_iteration(first: int, n: int, u: int) -> None:
            conn = FakeConn()
            for k in range(n):
                ing.on_frame(conn, _agg_frame("BTCUSDT", first + k), 1_000 + k)  # type: ignore[arg-type]
                seen_cursor.append(w.cursor)
            ing.on_frame(conn, b'{"stream":"ethusdt@bookTicker","data":{"u":%d,"s":"ETHUSDT",'  # type: ignore[arg-type]
                       b'"b":"1.5","B":"2","a":"1.6","A":"3"}}' % u, 2_000)
            seen_cursor.append(w.cursor)

        before_ns = time.time_ns()
        loop.run_until_complete(one_iteration(100, 10, 7))
        loop.run_until_complete(one_iteration(110, 3, 8))
        assert w.staged == 0
        rd = RingReader.attach(shm_name, name="t", start="oldest")
        r = rd.poll()
        rd.close()
        assert len(r) == 15 == w.cursor
        agg = r[r["kind"] == Kind.AGG_TRADE]
        assert agg["trade_id"].tolist() == list(range(100, 113))  # exactly once, in order
        assert agg["recv_time_ns"].tolist() == [1_000 + k for k in range(10)] + [1_000, 1_001,
                                                                                  1_002]
        assert r["kind"].tolist()[10] == Kind.BOOK_TICKER  # mixed kinds keep their order
        assert r["bid_price"][10] == 1.5
        assert np.all(r["publish_time_ns"] >= before_ns)
        assert ing.c["frames_received"] + (ing.fast.frames if ing.fast else 0) == 15
        if ing.fast is not None:
            assert ing.fast.frames == 13  # all but the first aggTrade and the first bookTicker
        assert seen_cursor == list(range(1, 16))  # every record visible at once
        assert np.all(np.diff(r["publish_time_ns"]) >= 0)
    finally:
        ing.release()
        loop.close()
        w.close()


@pytest.mark.parametrize("fast_path", ["off", "auto"])
def test_metrics_report_what_readers_can_see_within_a_loop_iteration(shm_name: str,
                                                                     fast_path: str) -> None:
    """A metrics flush in the same loop iteration as a burst of frames: the published count and
    last aggregate id it reports are what readers can see (every record is, at once)."""
    import uvloop

    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    class FakeMetrics:
        def __init__(self) -> None:
            self.vals: dict[str, Any] = {}

        def set(self, **kw: Any) -> None:
            self.vals = kw

    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 10, symbols=SYMBOLS)
    loop = uvloop.new_event_loop()
    try:
        met = FakeMetrics()
        ing = Ingest(IngestConfig(symbols=SYMBOLS, streams=["aggTrade"], fast_path=fast_path),
                     w, met)
        ing.setup_publishing(loop)

        class FakeConn:
            last_ns = 0
            first_pending = False

        async def iteration() -> None:
            for k in range(5):
                ing.on_frame(FakeConn(), _agg_frame("ETHUSDT", 500 + k), 1)  # type: ignore[arg-type]
            assert (w.cursor, w.staged) == (5, 0)  # none waits for the iteration's end
            ing.flush_metrics()

        loop.run_until_complete(iteration())
        assert met.vals["published"] == 5 == w.cursor
        assert met.vals["last_agg_id_1"] == 504
        assert met.vals["frames_received"] == 5
        assert met.vals["fast_path"] == (fast_path == "auto" and fastpath_built())
        assert met.vals["frames_fast"] == (4 if met.vals["fast_path"] else 0)  # all but the 1st
        with RingReader.attach(shm_name, start="oldest") as rd:
            assert rd.poll()["trade_id"].tolist() == [500, 501, 502, 503, 504]
        ing.release()
        assert ing.trackers[1].last == 504  # the ids the compiled path published are handed back
    finally:
        ing.release()
        loop.close()
        w.close()


@pytest.mark.parametrize("fast_path", ["off", "auto"])
def test_every_connection_keeps_its_own_state_whichever_path_takes_its_frames(
        shm_name: str, fast_path: str) -> None:
    """The compiled path keeps no per-connection state (it never looks inside a connection):
    each connection's last frame time and first-frame signal are still kept by the shell, for
    every loop iteration the connection delivers in, with two connections interleaved (a
    rotation's overlap) and the compiled path staging nearly every frame."""
    import uvloop

    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    class RotatingConn:
        def __init__(self) -> None:
            self.last_ns = 0
            self.first_pending = True
            self.first_seen_ns: int | None = None

        def got_first(self) -> None:
            self.first_pending = False
            self.first_seen_ns = self.last_ns

    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 10, symbols=SYMBOLS)
    loop = uvloop.new_event_loop()
    ing = Ingest(IngestConfig(symbols=SYMBOLS, streams=["aggTrade"], fast_path=fast_path),
                 w, None)
    try:
        ing.setup_publishing(loop)
        old, new = RotatingConn(), RotatingConn()

        async def iteration(frames: list[tuple[RotatingConn, int, int]]) -> None:
            for conn, agg_id, recv_ns in frames:
                ing.on_frame(conn, _agg_frame("BTCUSDT", agg_id), recv_ns)  # type: ignore[arg-type]

        loop.run_until_complete(iteration([(old, 100 + k, 1_000 + k) for k in range(4)]))
        assert old.first_seen_ns == 1_000
        assert 1_000 <= old.last_ns <= 1_003
        # the overlap: the new connection's first frames, then both alternate
        loop.run_until_complete(iteration(
            [(new, 104, 2_000), (new, 105, 2_001), (old, 106, 2_002), (new, 107, 2_003)]))
        assert new.first_seen_ns == 2_000  # its first frame was noticed, staged or not
        assert 2_000 <= new.last_ns <= 2_003
        assert 2_002 <= old.last_ns <= 2_003  # it delivered in this iteration too
        loop.run_until_complete(iteration([(new, 108 + k, 3_000 + k) for k in range(3)]))
        assert 3_000 <= new.last_ns <= 3_002
        assert old.last_ns < 3_000  # silent since: the stall detector must see that
        assert w.staged == 0
        if ing.fast is not None:
            assert ing.fast.frames == 10  # all but the very first frame: the compiled path's
        with RingReader.attach(shm_name, start="oldest") as rd:
            assert rd.poll()["trade_id"].tolist() == list(range(100, 111))
    finally:
        ing.release()
        loop.close()
        w.close()


def _trade_frame(sym: str, trade_id: int) -> bytes:
    return (b'{"stream":"%s@trade","data":{"e":"trade","E":1768627409826,"s":"%s","t":%d,'
            b'"p":"95311.64000000","q":"0.00084000","T":1768627409825,"m":true,"M":true}}'
            % (sym.lower().encode(), sym.encode(), trade_id))


def test_trade_id_holes_are_waited_for_then_reported(shm_name: str) -> None:
    """@trade ids: out-of-order arrivals within --backfill-grace are put back in order; a hole
    that stays open and that REST cannot fill (nothing listens on the REST port here) becomes
    one GAP record flagged TRADE_IDS, then the stream goes on; late and repeated ids are
    dropped. (Backfilled from historicalTrades when REST answers: tests/test_ingest_rest.py.)"""
    import asyncio

    import uvloop

    from pipeline.ipc.ring import RingWriter
    from pipeline.marketdata.ingest import Ingest, IngestConfig

    w = RingWriter.create(shm_name, TICK_DTYPE, 1 << 10, symbols=SYMBOLS)
    loop = uvloop.new_event_loop()
    ing = None
    try:
        cfg = IngestConfig(symbols=SYMBOLS, streams=["trade"], backfill_grace=0.05,
                           rest_url="http://127.0.0.1:9", rest_retries=0)
        ing = Ingest(cfg, w, None)
        ing.setup_publishing(loop)

        class FakeConn:
            last_ns = 0
            first_pending = False

        conn = FakeConn()

        async def scenario() -> None:
            assert ing is not None
            for t in (1, 2, 5, 3, 4):  # 5 early: held until 3 and 4 arrive
                ing.on_frame(conn, _trade_frame("ETHUSDT", t), t)  # type: ignore[arg-type]
            await asyncio.sleep(0.15)
            for t in (6, 9):  # 7 and 8 never come
                ing.on_frame(conn, _trade_frame("ETHUSDT", t), t)  # type: ignore[arg-type]
            deadline = time.monotonic() + 5
            while ing.c["trade_gaps"] == 0:
                assert time.monotonic() < deadline, "no GAP record"
                await asyncio.sleep(0.01)
            for t in (8, 9, 10):  # late, repeated, next
                ing.on_frame(conn, _trade_frame("ETHUSDT", t), t)  # type: ignore[arg-type]

        loop.run_until_complete(scenario())
        with RingReader.attach(shm_name, start="oldest") as rd:
            r = rd.poll()
        assert [(int(k), int(i)) for k, i in zip(r["kind"], r["trade_id"], strict=True)] == [
            *[(Kind.TRADE, t) for t in range(1, 7)], (Kind.GAP, 7), (Kind.TRADE, 9),
            (Kind.TRADE, 10)]
        gap = r[r["kind"] == Kind.GAP][0]
        assert (gap["symbol"], gap["aux_id"], gap["flags"]) == (1, 8, Flags.TRADE_IDS)
        assert ing.c["trade_gaps"] == 1
        assert ing.c["trade_ids_lost"] == 2
        assert ing.c["duplicates"] == 2
    finally:
        if ing is not None:
            ing.release()
        loop.close()
        w.close()
