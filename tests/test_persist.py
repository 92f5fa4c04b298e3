"""Persist consumer: rows, resume filter, SQLite end to end (exact set, no duplicates across a
restart), and PostgreSQL against a real server this test starts itself."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.consumers.persist import (
    PersistCore,
    ResumeFilter,
    SqliteStore,
    rows_from_batch,
)
from pipeline.records import TICK_DTYPE, Flags, Kind
from pipeline.ring import RingWriter

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
            proc.kill()
            proc.wait()


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="psycopg not installed (optional extra 'postgres')")
    # PATH first, then where Debian's postgresql packages put the server binaries.
    debian = ":".join(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    search = os.pathsep.join(filter(None, [os.environ.get("PATH"), debian]))
    initdb, pg_ctl = shutil.which("initdb", path=search), shutil.which("pg_ctl", path=search)
    if not initdb or not pg_ctl:
        pytest.skip(
            "SKIPPED LOUDLY: no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
            "/usr/lib/postgresql/*/bin; install Debian's 'postgresql' package to run this test"
        )
    # Not pytest's tmp_path: that lives under a 0700 root-owned directory the server user
    # cannot enter. A fresh directory directly in the temp dir, removed at teardown.
    base = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        # postgres refuses to run as root: run the server as an unprivileged user
        import pwd

        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        runuser = shutil.which("runuser")
        if user is None or runuser is None:
            pytest.skip("running as root and no 'postgres'/'nobody' user + runuser to drop to")
        pw = pwd.getpwnam(user)
        for p in (base, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(base, 0o755)
        prefix = [runuser, "-u", user, "--"]
    port = _free_port()
    run = lambda *a: subprocess.run(  # noqa: E731
        [*prefix, *a], check=True, capture_output=True, timeout=120, cwd=base
    )
    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "pipeline", "--no-sync", "-E", "UTF8")
        run(
            pg_ctl, "-D", str(data), "-w", "-t", "60", "-l", str(base / "server.log"), "-o",
            f"-p {port} -k {sock} -c listen_addresses='' -c fsync=off"
            " -c dynamic_shared_memory_type=mmap",  # no /dev/shm segments left behind
            "start",
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a PostgreSQL server: {exc.stderr.decode()[-800:]}")
    try:
        yield f"postgresql://pipeline@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True, timeout=60, cwd=base,
        )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_postgres_store_is_idempotent_and_resumes(postgres_url: str) -> None:
    from pipeline.consumers.persist import PostgresStore

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
