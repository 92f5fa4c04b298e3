"""Persist consumer: rows, resume filter, SQLite end to end (exact set, no duplicates across a
restart), and PostgreSQL against a real server this test starts itself."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pghelpers import NO_SERVER, PgServer, find_server_binaries
from simhelpers import block_snapshot as _metrics

from pipeline.consumers.persist import (
    PersistCore,
    ResumeFilter,
    rows_from_batch,
)
from pipeline.consumers.stores import SqliteStore
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind
from pipeline.ipc.segments import RingWriter

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def agg_trades(sid: int, ids: range, price: float = 100.0) -> np.ndarray:
    out = np.zeros(len(ids), dtype=TICK_DTYPE)
    out["kind"] = int(Kind.AGG_TRADE)
    out["symbol"] = sid
    out["trade_id"] = np.asarray(ids, dtype=np.int64)
    out["aux_id"] = out["trade_id"] + 1
    out["price"] = price + np.arange(len(ids)) * 0.01
    out["qty"] = 0.5
    out["flags"] = int(Flags.BUYER_IS_MAKER)
    out["event_time_ns"] = 1_700_000_000_000_000_000
    out["recv_time_ns"] = out["event_time_ns"] + 1000
    out["publish_time_ns"] = out["recv_time_ns"] + 1000
    return out


def book_tickers(sid: int, ids: range) -> np.ndarray:
    out = np.zeros(len(ids), dtype=TICK_DTYPE)
    out["kind"] = int(Kind.BOOK_TICKER)
    out["symbol"] = sid
    out["trade_id"] = np.asarray(ids, dtype=np.int64)
    out["bid_price"], out["bid_qty"], out["ask_price"], out["ask_qty"] = 99.0, 1.0, 101.0, 2.0
    return out


# ---------------------------------------------------------------------------------------------
# pure parts


def test_rows_from_batch_splits_trades_and_book_tops() -> None:
    depth = np.zeros(1, dtype=TICK_DTYPE)
    depth["kind"] = int(Kind.DEPTH_LEVEL)
    batch = np.concatenate([agg_trades(0, range(5, 7)), book_tickers(1, range(1, 2)), depth])
    ticks, books = rows_from_batch(batch, SYMBOLS)
    assert ticks[0] == (
        "BTCUSDT",
        1,
        5,
        100.0,
        0.5,
        6,
        1,
        1_700_000_000_000_000_000,
        1_700_000_000_000_001_000,
    )
    assert [t[2] for t in ticks] == [5, 6]
    assert books == [("ETHUSDT", 3, 1, 99.0, 1.0, 101.0, 2.0, 0, 0)]
    assert rows_from_batch(batch, SYMBOLS, book_tops=False)[1] == []


def test_resume_filter_skips_stored_ids_then_trusts_the_key() -> None:
    f = ResumeFilter(max_ids={("BTCUSDT", 1): 10})
    rows = [("BTCUSDT", 1, i) for i in (8, 9, 10, 11, 3)] + [("ETHUSDT", 1, 1)]
    # 3 after 11: the key caught up, so a (simulator) id reset is no longer filtered
    assert f.apply(rows) == [("BTCUSDT", 1, 11), ("BTCUSDT", 1, 3), ("ETHUSDT", 1, 1)]
    assert f.skipped == 3


def test_core_flush_policy() -> None:
    core = PersistCore(batch_max=4, flush_interval_s=1.0)
    assert not core.due(0.0)
    assert not core.add(agg_trades(0, range(2)), SYMBOLS, now=10.0)
    assert not core.due(10.5)
    assert core.due(11.0)
    assert core.add(agg_trades(0, range(2, 4)), SYMBOLS, now=10.6)  # 4 rows: flush now
    ticks, books = core.take()
    assert len(ticks) == 4
    assert books == []
    assert core.pending == 0
    assert not core.due(100.0)


def test_sqlite_store_is_idempotent(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "t.sqlite")
    store.setup()
    ticks, books = rows_from_batch(
        np.concatenate([agg_trades(0, range(1, 101)), book_tickers(1, range(1, 11))]), SYMBOLS
    )
    assert store.write(ticks, books) == (100, 10)
    assert store.write(ticks[50:], books) == (0, 0)  # all conflicts: nothing twice
    assert store.max_ids() == {("BTCUSDT", 1): 100, ("ETHUSDT", 3): 10}
    assert store.conn is not None
    mode = store.conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


# ---------------------------------------------------------------------------------------------
# end to end through the ring, as a process


def _persist_proc(ring: str, db: Path, log: Path, metrics: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PIPELINE_LOG_FORMAT": "json", "PIPELINE_PERSIST_FLUSH_INTERVAL_S": "0.05"}
    with log.open("ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "consume", "persist", "--ring", ring,
             "--sqlite", str(db), "--metrics-name", metrics],
            stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        try:
            return int(c.execute("SELECT count(*) FROM market_ticks").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def _wait_count(db: Path, n: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while _count(db) < n:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, (_count(db), n, log.read_text()[-2000:])
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            _stop(proc)  # SIGTERM first: its metrics block is removed on a clean stop


def test_table_holds_exactly_the_published_trades_across_a_restart(
    shm_name: str, tmp_path: Path
) -> None:
    db, log = tmp_path / "ticks.sqlite", tmp_path / "persist.log"
    metrics = f"{shm_name}.pm"
    w = RingWriter.create(shm_name, TICK_DTYPE, 4096, SYMBOLS)
    try:
        proc = _persist_proc(shm_name, db, log, metrics)
        # starts at the oldest record in the ring: what was published before it attached counts
        w.publish_many(agg_trades(0, range(1, 1001)))
        w.publish_many(book_tickers(1, range(1, 201)))
        w.publish_many(agg_trades(1, range(1, 501)))
        _wait_count(db, 1500, proc, log)
        assert _stop(proc) == 0
        # published while persist is down; the ring still holds the earlier ones too, so the
        # restarted consumer sees ids it already stored (resume filter + ON CONFLICT) and new ones
        w.publish_many(agg_trades(0, range(1001, 1501)))
        proc = _persist_proc(shm_name, db, log, metrics)
        w.publish_many(agg_trades(1, range(501, 1001)))
        _wait_count(db, 2500, proc, log)
        assert _stop(proc) == 0
    finally:
        w.close()
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT symbol, kind, count(*), count(DISTINCT trade_id), min(trade_id), max(trade_id)"
            " FROM market_ticks GROUP BY symbol, kind ORDER BY symbol"
        ).fetchall()
        books = c.execute("SELECT count(*) FROM book_tops").fetchone()[0]
        sample = c.execute(
            "SELECT price, qty, last_id, flags FROM market_ticks"
            " WHERE symbol='BTCUSDT' AND trade_id=2"
        ).fetchone()
    assert rows == [("BTCUSDT", 1, 1500, 1500, 1, 1500), ("ETHUSDT", 1, 1000, 1000, 1, 1000)]
    assert books == 200
    assert sample == (100.01, 0.5, 3, 1)
    assert "persist_resume" in log.read_text()


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster on a free port, unix socket in tmp


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    pytest.importorskip("psycopg", reason="psycopg not installed (optional extra 'postgres')")
    found = find_server_binaries()
    if found is None:
        pytest.skip(f"SKIPPED LOUDLY: {NO_SERVER}")
    initdb, pg_ctl = found
    try:
        server = PgServer(initdb, pg_ctl)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not init a PostgreSQL cluster: {exc.stderr.decode()[-800:]}")
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        server.destroy()
        pytest.fail(f"could not start a PostgreSQL server: {exc.stderr.decode()[-800:]}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(pg_server: PgServer) -> str:
    if not pg_server.running:  # a test that stopped it and failed before restarting it
        pg_server.start()
    return pg_server.url


def test_postgres_store_is_idempotent_and_resumes(postgres_url: str) -> None:
    from pipeline.consumers.stores import PostgresStore

    store = PostgresStore(postgres_url)
    store.setup()
    ticks, books = rows_from_batch(
        np.concatenate([agg_trades(0, range(1, 2001)), book_tickers(1, range(1, 51))]), SYMBOLS
    )
    assert store.write(ticks, books) == (2000, 50)
    assert store.write(ticks[1000:], books[:10]) == (0, 0)
    assert store.max_ids() == {("BTCUSDT", 1): 2000, ("ETHUSDT", 3): 50}
    store.close()
    # a second connection (a restarted consumer) sees the same state and only adds new ids
    again = PostgresStore(postgres_url)
    again.setup()
    more, _ = rows_from_batch(agg_trades(0, range(1990, 2101)), SYMBOLS)
    assert again.write(more, []) == (100, 0)
    with again.conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT trade_id), max(trade_id) FROM market_ticks")
        assert cur.fetchone() == (2100, 2100, 2100)
        cur.execute("SELECT price, qty, last_id, flags FROM market_ticks WHERE trade_id = 2")
        assert cur.fetchone() == (100.01, 0.5, 3, 1)
    again.conn.rollback()
    again.close()


@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_binary_and_text_copy_store_exactly_the_rows_given(
    postgres_url: str, copy_format: str
) -> None:
    """The binary COPY (the default) must store what text COPY stores, bit for bit: floats that
    text would round, ids near int64's top, int2 kinds/flags, a non-ASCII symbol name."""
    from pipeline.consumers.stores import PostgresStore

    ticks = [
        ("BTCUSDT", 1, 1, 0.1 + 0.2, 1e-8, 2, 1, 1_700_000_000_000_000_001, 1_700_000_000_000_2),
        ("BTCUSDT", 2, 2**62 + 7, 65_000.123456789, 123.456, 2**62 + 8, 0, 1, 2),
        ("ÉTHUSDT", 1, 3, 5e-324, 1.7976931348623157e308, 4, 32_767, 0, -1),
    ]
    books = [("ETHUSDT", 3, 9, 3099.99, 0.3, 3100.01, 0.7, 10, 11)]
    store = PostgresStore(postgres_url, copy_format=copy_format)
    store.setup()
    try:
        with store.conn.transaction(), store.conn.cursor() as cur:
            cur.execute("TRUNCATE market_ticks, book_tops")
        assert store.write(ticks, books) == (3, 1)
        assert store.write(ticks, books) == (0, 0)  # ON CONFLICT: a replay adds nothing
        with store.conn.cursor() as cur:
            cur.execute("SELECT * FROM market_ticks ORDER BY trade_id")
            assert cur.fetchall() == sorted(ticks, key=lambda r: r[2])
            cur.execute("SELECT * FROM book_tops")
            assert cur.fetchall() == books
            cur.execute("TRUNCATE market_ticks, book_tops")  # leave the tables as found
        store.conn.commit()
    finally:
        store.close()


def test_postgres_store_refuses_an_unknown_copy_format() -> None:
    pytest.importorskip("psycopg")
    from pipeline.consumers.stores import PostgresStore

    with pytest.raises(ValueError, match="copy_format must be one of binary, text"):
        PostgresStore("postgresql://nowhere/db", copy_format="csv")


def test_persist_process_writes_to_postgres(
    postgres_url: str, shm_name: str, tmp_path: Path
) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS market_ticks, book_tops")
    log = tmp_path / "persist.log"
    w = RingWriter.create(shm_name, TICK_DTYPE, 4096, SYMBOLS)
    env = {**os.environ, "PIPELINE_LOG_FORMAT": "json", "PIPELINE_PERSIST_FLUSH_INTERVAL_S": "0.05"}
    try:
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "consume", "persist", "--ring", shm_name,
                 "--postgres-url", postgres_url, "--metrics-name", ""],
                stdout=subprocess.DEVNULL, stderr=err, env=env,
            )  # fmt: skip
        w.publish_many(agg_trades(1, range(1, 3001)))
        deadline = time.monotonic() + 30
        n = 0
        while n < 3000:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
            with psycopg.connect(postgres_url, autocommit=True) as c:
                try:
                    n = c.execute("SELECT count(*) FROM market_ticks").fetchone()[0]  # type: ignore[index]
                except psycopg.errors.UndefinedTable:
                    n = 0
        assert _stop(proc) == 0
    finally:
        w.close()
    with psycopg.connect(postgres_url, autocommit=True) as c:
        got = c.execute(
            "SELECT symbol, count(*), count(DISTINCT trade_id) FROM market_ticks GROUP BY symbol"
        ).fetchall()
    assert got == [("ETHUSDT", 3000, 3000)]


# ---------------------------------------------------------------------------------------------
# outages: the database goes away (restart, never there at start, locked, disk full) while a
# real persist process reads a real ring. Every record must land exactly once afterwards.


def _start_persist(
    ring: str, log: Path, metrics: str, *db_args: str, flush_s: str = "0.05"
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PIPELINE_LOG_FORMAT": "json",
        "PIPELINE_PERSIST_FLUSH_INTERVAL_S": flush_s,
    }
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "consume", "persist", "--ring", ring,
             "--metrics-name", metrics, *db_args],
            stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip


def _until(
    what: str,
    pred: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 30,
) -> None:
    """Wait (no timing assertion: the deadline only turns a hang into a failure) until ``pred``;
    the persist process must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"persist died waiting for {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not reached: {what}: {log.read_text()[-3000:]}"
        time.sleep(0.05)


def _pg_count(url: str) -> int:
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as c:
            row = c.execute("SELECT count(*) FROM market_ticks").fetchone()
            return int(row[0]) if row else 0
    except psycopg.Error:
        return -1


def _pg_reset(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS market_ticks, book_tops")


def _no_traceback(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def test_persist_survives_a_postgres_restart_and_every_record_lands_once(
    pg_server: PgServer, postgres_url: str, shm_name: str, tmp_path: Path
) -> None:
    """Bug: the PostgreSQL sink never reconnected after a server restart (it exited once its
    buffer filled; health green meanwhile)."""
    import psycopg

    _pg_reset(postgres_url)
    log, metrics = tmp_path / "persist.log", f"{shm_name}.pm"
    w = RingWriter.create(shm_name, TICK_DTYPE, 16384, SYMBOLS)
    proc = _start_persist(shm_name, log, metrics, "--postgres-url", postgres_url)
    try:
        w.publish_many(agg_trades(0, range(1, 1001)))
        _until("first 1000 rows", lambda: _pg_count(postgres_url) == 1000, proc, log)
        pg_server.stop()
        # published while the server is down: the sink fails, keeps them, says so in metrics
        w.publish_many(agg_trades(0, range(1001, 2001)))
        _until("sink errors", lambda: _metrics(metrics).get("sink_errors", 0) > 0, proc, log)
        _until(
            "problem_sink_failing", lambda: _metrics(metrics).get("problem_sink_failing", 0) > 0,
            proc, log,
        )  # fmt: skip
        snap = _metrics(metrics)
        assert snap["sink_connected"] == 0
        assert snap["heartbeat_interval_ms"] > 0
        assert snap["pending"] == 1000  # buffered, not dropped
        pg_server.start()
        w.publish_many(agg_trades(0, range(2001, 3001)))
        w.publish_many(agg_trades(1, range(1, 501)))
        _until("all 3500 rows", lambda: _pg_count(postgres_url) == 3500, proc, log)
        _until(
            "problem cleared", lambda: _metrics(metrics).get("problem_sink_failing", 1) == 0,
            proc, log,
        )  # fmt: skip
        snap = _metrics(metrics)
        assert snap["sink_reconnects"] >= 1
        assert snap["sink_connected"] == 1
        assert snap["last_flush_ns"] > 0
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            _stop(proc)  # SIGTERM first: its metrics block is removed on a clean stop
        w.close()
        if not pg_server.running:
            pg_server.start()
    with psycopg.connect(postgres_url, autocommit=True) as c:
        got = c.execute(
            "SELECT symbol, count(*), count(DISTINCT trade_id), min(trade_id), max(trade_id)"
            " FROM market_ticks GROUP BY symbol ORDER BY symbol"
        ).fetchall()
    assert got == [("BTCUSDT", 3000, 3000, 1, 3000), ("ETHUSDT", 500, 500, 1, 500)]
    text = log.read_text()
    assert "persist_error" in text
    assert "persist_recovered" in text
    _no_traceback(log)


def test_persist_started_while_postgres_is_down_waits_and_then_writes_everything(
    pg_server: PgServer, postgres_url: str, shm_name: str, tmp_path: Path
) -> None:
    """Bug: a database error at start was a traceback and exit 1 (a crash loop under systemd)."""
    _pg_reset(postgres_url)
    log, metrics = tmp_path / "persist.log", f"{shm_name}.pm"
    w = RingWriter.create(shm_name, TICK_DTYPE, 16384, SYMBOLS)
    pg_server.stop()
    proc = _start_persist(shm_name, log, metrics, "--postgres-url", postgres_url)
    try:
        w.publish_many(agg_trades(1, range(1, 2001)))
        _until(
            "failing at start", lambda: _metrics(metrics).get("problem_sink_failing", 0) > 0,
            proc, log,
        )  # fmt: skip
        snap = _metrics(metrics)
        assert snap["paused"] == 1  # not reading the ring until the store answered once
        assert snap["pending"] == 0
        assert "database not reachable" in log.read_text()
        pg_server.start()
        _until("2000 rows", lambda: _pg_count(postgres_url) == 2000, proc, log)
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            _stop(proc)  # SIGTERM first: its metrics block is removed on a clean stop
        w.close()
        if not pg_server.running:
            pg_server.start()
    _no_traceback(log)
    assert "secret" not in log.read_text()


def _sqlite_rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT symbol, count(*), count(DISTINCT trade_id), min(trade_id), max(trade_id)"
            " FROM market_ticks GROUP BY symbol ORDER BY symbol"
        ).fetchall()


def test_sqlite_lock_held_by_another_connection_neither_stalls_nor_crashes_persist(
    shm_name: str, tmp_path: Path
) -> None:
    """Bug: "database is locked" crashed persist, after stalling ring reading 5 s per attempt.

    Also the bounded buffer: with ``--max-pending 2000`` the consumer reads exactly 2000 rows
    while the lock is held, then leaves the rest in the ring (lag) until the lock goes."""
    db, log, metrics = tmp_path / "ticks.sqlite", tmp_path / "persist.log", f"{shm_name}.pm"
    w = RingWriter.create(shm_name, TICK_DTYPE, 16384, SYMBOLS)
    proc = _start_persist(shm_name, log, metrics, "--sqlite", str(db), "--max-pending", "2000")
    holder: sqlite3.Connection | None = None
    try:
        w.publish_many(agg_trades(0, range(1, 101)))
        _wait_count(db, 100, proc, log)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # no other connection may write until we end it
        w.publish_many(agg_trades(0, range(101, 1601)))
        # the ring keeps being read while the writes fail
        _until(
            "1500 rows read while locked",
            lambda: (m := _metrics(metrics)).get("pending") == 1500 and m.get("lag") == 0,
            proc, log,
        )  # fmt: skip
        assert _metrics(metrics)["sink_errors"] > 0
        w.publish_many(agg_trades(0, range(1601, 3101)))
        _until(
            "buffer full, rest left in the ring",
            lambda: (m := _metrics(metrics)).get("pending") == 2000 and m.get("paused") == 1
            and m.get("lag") == 1000,
            proc, log,
        )  # fmt: skip
        _until(
            "problem_sink_failing", lambda: _metrics(metrics).get("problem_sink_failing", 0) > 0,
            proc, log,
        )  # fmt: skip
        holder.execute("ROLLBACK")
        holder.close()
        holder = None
        _wait_count(db, 3100, proc, log)
        _until(
            "recovered", lambda: (m := _metrics(metrics)).get("problem_sink_failing") == 0
            and m.get("paused") == 0 and m.get("missed") == 0,
            proc, log,
        )  # fmt: skip
        assert _stop(proc) == 0
    finally:
        if holder is not None:
            holder.close()
        if proc.poll() is None:
            _stop(proc)  # SIGTERM first: its metrics block is removed on a clean stop
        w.close()
    assert _sqlite_rows(db) == [("BTCUSDT", 3100, 3100, 1, 3100)]
    _no_traceback(log)
    assert "database is locked" in log.read_text()


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up. Needs root (mount)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("SKIPPED LOUDLY: mounting a tiny tmpfs for the disk-full test needs root")
    where = Path(tempfile.mkdtemp(prefix="pipeline-full-"))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        where.rmdir()
        pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        where.rmdir()


def _fill(where: Path) -> Path:
    """Fill the filesystem to the last byte; the file is removed to free the space."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):  # unbuffered: each write either lands or says ENOSPC
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_sqlite_disk_full_is_survived_and_nothing_is_lost(
    tiny_fs: Path, shm_name: str, tmp_path: Path
) -> None:
    """Bug: SQLite "database or disk is full" crashed persist."""
    db, log, metrics = tiny_fs / "ticks.sqlite", tmp_path / "persist.log", f"{shm_name}.pm"
    w = RingWriter.create(shm_name, TICK_DTYPE, 16384, SYMBOLS)
    proc = _start_persist(shm_name, log, metrics, "--sqlite", str(db))
    try:
        w.publish_many(agg_trades(0, range(1, 101)))
        _wait_count(db, 100, proc, log)
        filler = _fill(tiny_fs)
        w.publish_many(agg_trades(0, range(101, 5101)))
        _until("sink errors", lambda: _metrics(metrics).get("sink_errors", 0) > 0, proc, log)
        _until(
            "problem_sink_failing", lambda: _metrics(metrics).get("problem_sink_failing", 0) > 0,
            proc, log,
        )  # fmt: skip
        filler.unlink()
        _wait_count(db, 5100, proc, log)
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            _stop(proc)  # SIGTERM first: its metrics block is removed on a clean stop
        w.close()
    assert _sqlite_rows(db) == [("BTCUSDT", 5100, 5100, 1, 5100)]
    _no_traceback(log)
    assert "full" in log.read_text()


def test_redact_url_hides_passwords() -> None:
    from pipeline.consumers.stores import redact_url

    assert redact_url("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert "s3cret" not in redact_url("host=db user=u password=s3cret dbname=x")
    assert redact_url("postgresql://u@/x?host=/tmp") == "postgresql://u@/x?host=/tmp"


def test_persist_shell_retries_a_store_that_cannot_open_with_backoff_and_flags_it(
    tmp_path: Path,
) -> None:
    """The shell alone, with a fake clock: a database that cannot be opened at start is no
    exception, pauses ring reading, turns into problem_sink_failing after the grace period, is
    retried only when its backoff is due, and clears once the store opens."""
    from pipeline.consumers.persist import Persist

    blocker = tmp_path / "var"
    blocker.write_text("a file where the database directory should be")
    now = [100.0]
    p = Persist(
        SqliteStore(blocker / "ticks.sqlite"), PersistCore(), metrics_name=None,
        clock=lambda: now[0], fail_grace_s=2.0,
    )  # fmt: skip
    assert p.paused
    assert p.errors == 1
    assert p.problem(now[0]) == 0  # within the grace period
    p.heartbeat(now[0])  # backoff not due: no second attempt
    assert p.errors == 1
    now[0] += 3.0
    p.heartbeat(now[0])
    assert p.errors == 2
    assert p.problem(now[0]) == 2
    blocker.unlink()
    now[0] += 10.0
    p.heartbeat(now[0])
    assert not p.paused
    assert p.problem(now[0]) == 0
    p.on_batch(agg_trades(0, range(1, 11)), _Reader())
    assert p.flush()
    assert p.inserted == 10
    p.close()
    assert _count(blocker / "ticks.sqlite") == 10


class _Reader:
    symbols = SYMBOLS
    missed = lag = 0
