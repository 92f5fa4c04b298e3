"""`pipeline ring tail`: a ring's records as text, from the formatting to the command."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import orjson
import pytest

from pipeline.ipc import records as r
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind
from pipeline.ipc.ring import RingWriter
from pipeline.ipc.segments import ring_stats
from pipeline.ipc.tail import flag_names, record_filter, render, tick_line

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
T0 = 1_796_000_000_123_456_000  # 2026-11-30 ... .123456 UTC


def rows(*tuples: tuple) -> np.ndarray:
    return np.array([(*t, T0) for t in tuples], dtype=TICK_DTYPE)


SAMPLE = [
    r.agg_trade_record(0, int(Flags.BUYER_IS_MAKER), 60000.01, 0.5, 7, 70, T0, T0),
    r.book_ticker_record(1, 2999.5, 1.25, 2999.6, 2.0, 41, T0),
    r.gap_record(symbol=0, flags=int(Flags.TRADE_IDS), first_missing=8, last_missing=9,
                 recv_time_ns=T0),
    r.book_stale_record(symbol=1, update_id=41, recv_time_ns=T0),
    r.book_resync_record(symbol=1, flags=int(Flags.SNAPSHOT | Flags.RESYNCED),
                         snapshot_update_id=50, book_update_id=52, recv_time_ns=T0),
]


def test_each_kind_says_what_its_fields_mean() -> None:
    lines = [tick_line(rec, SYMBOLS) for rec in rows(*SAMPLE)]
    assert lines[0] == ("00:53:20.123456 AGG_TRADE   BTCUSDT    price 60000.01 qty 0.5 id 7 last 70"
                        " flags BUYER_IS_MAKER E 00:53:20.123456")  # fmt: skip
    assert "BOOK_TICKER ETHUSDT    bid 2999.5 x 1.25 ask 2999.6 x 2.0 u 41 flags - E -" in lines[1]
    assert "GAP         BTCUSDT    missing 8..9 flags TRADE_IDS" in lines[2]
    assert "BOOK_STALE  ETHUSDT    stale since u 41" in lines[3]
    assert "snapshot 50 book 52 flags SNAPSHOT|RESYNCED" in lines[4]


def test_unknown_flags_and_symbols_are_shown_not_dropped() -> None:
    assert flag_names(0) == "-"
    assert flag_names(int(Flags.LAPPED) | 0x400) == "LAPPED|0x400"
    rec = rows(r.trade_record(9, 0, 1.0, 2.0, 3, 0, T0))[0]
    assert " #9 " in tick_line(rec, SYMBOLS)


def test_json_lines_name_kind_symbol_and_flags() -> None:
    [line] = list(render(rows(SAMPLE[0]), SYMBOLS, as_json=True))
    d = orjson.loads(line)
    assert (d["kind_name"], d["symbol_name"], d["flag_names"]) == (
        "AGG_TRADE", "BTCUSDT", "BUYER_IS_MAKER")  # fmt: skip
    assert (d["price"], d["trade_id"], d["aux_id"]) == (60000.01, 7, 70)


def test_filters_select_and_typos_are_errors() -> None:
    batch = rows(*SAMPLE)
    only = record_filter(TICK_DTYPE, SYMBOLS, ["gap", "book_stale"], ["ethusdt"])
    assert only(batch)["kind"].tolist() == [Kind.BOOK_STALE]
    with pytest.raises(ValueError, match="unknown kind 'TRADES'"):
        record_filter(TICK_DTYPE, SYMBOLS, ["trades"])
    with pytest.raises(ValueError, match="'XRPUSDT' is not in this ring"):
        record_filter(TICK_DTYPE, SYMBOLS, [], ["XRPUSDT"])


@pytest.fixture
def ring(shm_name: str) -> Iterator[RingWriter]:
    w = RingWriter.create(shm_name, TICK_DTYPE, 1024, symbols=SYMBOLS)
    try:
        w.publish_many(rows(*SAMPLE))
        yield w
    finally:
        w.close()


def tail(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "ring", "tail", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_tail_prints_the_last_records_and_exits(ring: RingWriter, shm_name: str) -> None:
    out = tail(shm_name, "--last", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert "BOOK_STALE" in lines[0]
    assert "BOOK_RESYNC" in lines[1]
    out = tail(shm_name, "--last", "100", "--kind", "GAP,AGG_TRADE", "--json")
    assert [orjson.loads(x)["kind_name"] for x in out.stdout.splitlines()] == ["AGG_TRADE", "GAP"]
    bad = tail(shm_name, "--kind", "TRADES")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert "unknown kind 'TRADES'" in bad.stderr
    # an observer like any reader: gone from the table once it exits
    assert not any(x["name"].startswith("tail") for x in ring_stats(shm_name)["readers"])


def test_follow_prints_new_records_as_they_come(ring: RingWriter, shm_name: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ring", "tail", shm_name, "--last", "0", "--follow",
         "--max", "2", "--symbol", "BTCUSDT"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not any(x["name"].startswith("tail") for x in ring_stats(shm_name)["readers"]):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the tail never attached"
            time.sleep(0.05)
        ring.publish_many(rows(r.trade_record(1, 0, 5.0, 1.0, 1, T0, T0),  # ETHUSDT: filtered
                               r.trade_record(0, 0, 6.0, 1.0, 2, T0, T0),
                               r.trade_record(0, 0, 7.0, 1.0, 3, T0, T0)))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert [line.split()[2] for line in lines] == ["BTCUSDT", "BTCUSDT"]
    assert ["price 6.0" in lines[0], "price 7.0" in lines[1]] == [True, True]


def test_the_exec_ring_is_printed_by_name(shm_name: str) -> None:
    from pipeline.trading.wire import EXEC_DTYPE, ExecKind, ExecUpdate, OrderStatus, exec_record

    w = RingWriter.create(shm_name, EXEC_DTYPE, 1024)
    try:
        up = ExecUpdate("abc-1", ExecKind.ACK, OrderStatus.NEW, symbol="BTCUSDT", side="BUY",
                        order_id=5, price=50000.0, qty=0.001)  # fmt: skip
        w.publish(exec_record(up, T0))
        out = tail(shm_name)
    finally:
        w.close()
    assert out.returncode == 0, out.stderr
    [d] = [orjson.loads(x) for x in out.stdout.splitlines()]
    assert (d["client_order_id"], d["kind"], d["status"], d["order_id"]) == (
        "abc-1", "ACK", "NEW", 5)  # fmt: skip


def test_a_missing_ring_is_a_clear_error() -> None:
    out = tail("pt_no_such_ring_here")
    assert out.returncode == 1
    assert "pt_no_such_ring_here" in out.stderr
    assert "not found" in out.stderr
