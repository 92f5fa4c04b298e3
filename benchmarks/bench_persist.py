"""Persistence throughput: rows/s the persist consumer's stores write, SQLite vs PostgreSQL, and
PostgreSQL's COPY in text vs binary format (the store uses the faster one: binary).

What is timed is one :meth:`Store.write` call (one transaction) of a ring-sized batch, exactly as
the consumer flushes: ``rows_from_batch`` output of 8192 records, half aggTrades, half
bookTickers, with fresh exchange ids every round (a replay would only measure ON CONFLICT). The
PostgreSQL server is a real throwaway cluster (tests/pghelpers.py), fsync off like the tests:
this compares the client/wire paths, not disks. Skipped loudly without the server binaries.
A second pair of cases times the COPY alone, since the INSERT..SELECT .. ON CONFLICT that
follows it (index look-ups per row) is the larger, format-independent part of a flush.

    .venv/bin/python -m pytest benchmarks/bench_persist.py -p no:randomly --benchmark-only
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from summary import emit

from pipeline.consumers.persist import rows_from_batch
from pipeline.consumers.stores import (
    BOOK_COLUMNS,
    BOOK_PG_TYPES,
    TICK_COLUMNS,
    TICK_PG_TYPES,
    PostgresStore,
    Row,
    SqliteStore,
    Store,
)
from pipeline.ipc.records import TICK_DTYPE, Flags, Kind

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pghelpers import NO_SERVER, PgServer, find_server_binaries

BATCH = 8192  # records per flush (the consumer's default batch_max and ring poll size)
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"]
RESULTS: dict[str, dict[str, float]] = {}
_next_id = itertools.count(1)


def fresh_rows() -> tuple[list[Row], list[Row]]:
    """One flush worth of rows with ids never written before (so every row is inserted)."""
    first = next(_next_id) * BATCH
    ids = np.arange(first, first + BATCH, dtype=np.int64)
    batch = np.zeros(BATCH, dtype=TICK_DTYPE)
    batch["kind"] = np.where(ids % 2 == 0, int(Kind.AGG_TRADE), int(Kind.BOOK_TICKER))
    batch["symbol"] = ids % len(SYMBOLS)
    batch["trade_id"] = ids
    batch["aux_id"] = ids + 3
    batch["price"] = 60_000.0 + (ids % 1000) * 0.01
    batch["qty"] = 0.001 * (ids % 97 + 1)
    batch["bid_price"], batch["ask_price"] = batch["price"] - 0.01, batch["price"] + 0.01
    batch["bid_qty"], batch["ask_qty"] = 1.5, 2.5
    batch["flags"] = np.where(ids % 3 == 0, int(Flags.BUYER_IS_MAKER), 0)
    batch["event_time_ns"] = 1_700_000_000_000_000_000 + ids * 1000
    batch["recv_time_ns"] = batch["event_time_ns"] + 250_000
    return rows_from_batch(batch, SYMBOLS)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    pytest.importorskip("psycopg", reason="psycopg not installed (optional extra 'postgres')")
    found = find_server_binaries()
    if found is None:
        pytest.skip(f"SKIPPED LOUDLY: {NO_SERVER}")
    server = PgServer(*found)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def _sqlite(tmp_path: Path) -> Store:
    return SqliteStore(tmp_path / "bench.sqlite")


def _measure(benchmark: Any, store: Store, label: str) -> None:
    store.setup()
    pending: list[tuple[list[Row], list[Row]]] = []

    def setup() -> tuple[tuple[list[Row], list[Row]], dict[str, Any]]:
        rows = fresh_rows()
        pending.append(rows)
        return rows, {}

    written: list[tuple[int, int]] = []

    def write(ticks: list[Row], books: list[Row]) -> None:
        written.append(store.write(ticks, books))

    try:
        benchmark.pedantic(write, setup=setup, rounds=10, warmup_rounds=1, iterations=1)
    finally:
        store.close()
    # every row of every round was inserted: nothing dropped, no conflict measured by mistake
    assert written == [(len(t), len(b)) for t, b in pending]
    median = benchmark.stats.stats.median
    RESULTS[label] = {"rows_per_s": BATCH / median, "ms_per_flush": median * 1e3}
    benchmark.extra_info.update(RESULTS[label])


def test_sqlite_write(benchmark: Any, tmp_path: Path) -> None:
    _measure(benchmark, _sqlite(tmp_path), "SQLite executemany (WAL, synchronous=NORMAL)")


@pytest.mark.parametrize("copy_format", ["text", "binary"])
def test_postgres_copy(benchmark: Any, pg_server: PgServer, copy_format: str) -> None:
    store = PostgresStore(pg_server.url, copy_format=copy_format)
    suffix = " (the store's default)" if copy_format == "binary" else ""
    _measure(benchmark, store, f"PostgreSQL COPY {copy_format} + INSERT..SELECT{suffix}")


@pytest.mark.parametrize("copy_format", ["text", "binary"])
def test_postgres_copy_phase_alone(benchmark: Any, pg_server: PgServer, copy_format: str) -> None:
    """Only the COPY into the session's stage tables: the part the format changes (the
    INSERT..SELECT ON CONFLICT after it, the larger part, is the same for both)."""
    store = PostgresStore(pg_server.url, copy_format=copy_format)
    store.setup()
    conn = store.conn

    def copy(ticks: list[Row], books: list[Row]) -> None:
        with conn.transaction(), conn.cursor() as cur:  # ON COMMIT DELETE ROWS empties them
            store.copy_rows(cur, "stage_ticks", TICK_COLUMNS, TICK_PG_TYPES, ticks)
            store.copy_rows(cur, "stage_books", BOOK_COLUMNS, BOOK_PG_TYPES, books)

    try:
        benchmark.pedantic(
            copy, setup=lambda: (fresh_rows(), {}), rounds=20, warmup_rounds=1, iterations=1
        )
    finally:
        store.close()
    median = benchmark.stats.stats.median
    label = f"  of which the COPY {copy_format} alone"
    RESULTS[label] = {"rows_per_s": BATCH / median, "ms_per_flush": median * 1e3}
    benchmark.extra_info.update(RESULTS[label])


@pytest.fixture(scope="module", autouse=True)
def _persist_report() -> Iterator[None]:
    yield
    if not RESULTS:
        return
    lines = ["", f"persist benchmark (one transaction of {BATCH} rows: aggTrades + bookTickers)",
             f"{'store / path':62} {'rows/s':>10} {'ms/flush':>9}"]  # fmt: skip
    for name, r in RESULTS.items():
        lines.append(f"{name:62} {r['rows_per_s']:>10.0f} {r['ms_per_flush']:>9.2f}")
    emit("\n".join(lines))
