"""Persist ticks to a database: SQLite (embedded default) or PostgreSQL (psycopg 3).

Tables (same columns in both databases)::

    market_ticks(symbol, kind, trade_id, price, qty, last_id, flags, event_time_ns, recv_time_ns)
        PRIMARY KEY (symbol, kind, trade_id)        -- aggTrade `a` / trade `t`
    book_tops(symbol, kind, update_id, bid_price, bid_qty, ask_price, ask_qty, event_time_ns,
              recv_time_ns)
        PRIMARY KEY (symbol, kind, update_id)       -- bookTicker `u` / depth top after diff `u`

Why it keeps up: rows are buffered and written in one transaction per batch (``batch_max`` rows
or ``flush_interval_s``, whichever first) with ``executemany`` (SQLite, WAL, synchronous=NORMAL)
or ``COPY`` into a temp table + one ``INSERT .. SELECT`` (PostgreSQL); the ring is polled in
batches of up to 8192 records, so per-record Python work is a tuple from ``tolist()``.

Why a restart never duplicates: the primary keys are the exchange ids and every insert is
``ON CONFLICT DO NOTHING``; on start the consumer reads ``max(id)`` per (symbol, kind), attaches
at the *oldest* record still in the ring (what was published while it was down) and skips
records at or below those ids until each key has caught up (the key is then trusted again, so
a simulator restarting its ids is not silently filtered forever).

:class:`PersistCore` is the database-agnostic part (records -> rows, resume filter, flush
policy; clock passed in); :class:`SqliteStore` / :class:`PostgresStore` talk to the databases.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.consumers import symbol_names, symbol_of
from pipeline.records import Kind

log = logging.getLogger("pipeline.persist")

TRADE_KINDS = (int(Kind.AGG_TRADE), int(Kind.TRADE))
BOOK_KINDS = (int(Kind.BOOK_TICKER), int(Kind.DEPTH_TOP))

TICK_COLUMNS = (
    "symbol", "kind", "trade_id", "price", "qty", "last_id", "flags", "event_time_ns",
    "recv_time_ns",
)  # fmt: skip
BOOK_COLUMNS = (
    "symbol", "kind", "update_id", "bid_price", "bid_qty", "ask_price", "ask_qty",
    "event_time_ns", "recv_time_ns",
)  # fmt: skip

METRICS_FIELDS = [
    ("inserted", "<i8"),
    ("book_inserted", "<i8"),
    ("duplicates", "<i8"),
    ("skipped_resume", "<i8"),
    ("flushes", "<i8"),
    ("pending", "<i8"),
    ("last_flush_ns", "<i8"),
    ("last_flush_us", "<f8"),
    ("missed", "<i8"),
    ("resyncs", "<i8"),
    ("lag", "<i8"),
    ("errors", "<i8"),
]

Row = tuple[Any, ...]
Key = tuple[str, int]


class Store(Protocol):
    """A database the persist consumer writes to. ``write`` is one transaction."""

    def setup(self) -> None: ...

    def max_ids(self) -> dict[Key, int]: ...

    def write(self, ticks: Sequence[Row], books: Sequence[Row]) -> tuple[int, int]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------
# pure core


def rows_from_batch(
    batch: np.ndarray, names: list[str], book_tops: bool = True
) -> tuple[list[Row], list[Row]]:
    """Tick records -> (market_ticks rows, book_tops rows); other kinds are not stored."""
    kinds = batch["kind"]
    trades = batch[np.isin(kinds, TRADE_KINDS)]
    tick_rows: list[Row] = []
    if len(trades):
        sym = [symbol_of(names, s) for s in trades["symbol"].tolist()]
        tick_rows = list(
            zip(
                sym,
                trades["kind"].tolist(),
                trades["trade_id"].tolist(),
                trades["price"].tolist(),
                trades["qty"].tolist(),
                trades["aux_id"].tolist(),
                trades["flags"].tolist(),
                trades["event_time_ns"].tolist(),
                trades["recv_time_ns"].tolist(),
                strict=True,
            )
        )
    book_rows: list[Row] = []
    if book_tops:
        books = batch[np.isin(kinds, BOOK_KINDS)]
        if len(books):
            sym = [symbol_of(names, s) for s in books["symbol"].tolist()]
            book_rows = list(
                zip(
                    sym,
                    books["kind"].tolist(),
                    books["trade_id"].tolist(),
                    books["bid_price"].tolist(),
                    books["bid_qty"].tolist(),
                    books["ask_price"].tolist(),
                    books["ask_qty"].tolist(),
                    books["event_time_ns"].tolist(),
                    books["recv_time_ns"].tolist(),
                    strict=True,
                )
            )
    return tick_rows, book_rows


@dataclass
class ResumeFilter:
    """Skips rows at or below the stored max id of their (symbol, kind), until that key has
    produced one row above it (then the key is released: ids only grow on a real exchange)."""

    max_ids: dict[Key, int] = field(default_factory=dict)
    skipped: int = 0

    def apply(self, rows: list[Row]) -> list[Row]:
        if not self.max_ids or not rows:
            return rows
        out = []
        for row in rows:
            key = (row[0], row[1])
            top = self.max_ids.get(key)
            if top is None:
                out.append(row)
            elif row[2] <= top:
                self.skipped += 1
            else:
                del self.max_ids[key]
                out.append(row)
        return out


@dataclass
class PersistCore:
    """Buffers rows and decides when to flush. Pure (the clock comes in with each call)."""

    batch_max: int = 8192
    flush_interval_s: float = 0.2
    book_tops: bool = True
    resume: ResumeFilter = field(default_factory=ResumeFilter)
    book_resume: ResumeFilter = field(default_factory=ResumeFilter)
    ticks: list[Row] = field(default_factory=list)
    books: list[Row] = field(default_factory=list)
    oldest: float | None = None  # when the oldest pending row arrived

    def add(self, batch: np.ndarray, names: list[str], now: float) -> bool:
        """Buffer a batch; True when the buffer should be flushed now."""
        ticks, books = rows_from_batch(batch, names, self.book_tops)
        ticks = self.resume.apply(ticks)
        books = self.book_resume.apply(books)
        if ticks or books:
            if self.oldest is None:
                self.oldest = now
            self.ticks.extend(ticks)
            self.books.extend(books)
        return self.pending >= self.batch_max

    @property
    def pending(self) -> int:
        return len(self.ticks) + len(self.books)

    def due(self, now: float) -> bool:
        return self.oldest is not None and (
            self.pending >= self.batch_max or now - self.oldest >= self.flush_interval_s
        )

    def take(self) -> tuple[list[Row], list[Row]]:
        ticks, books = self.ticks, self.books
        self.ticks, self.books, self.oldest = [], [], None
        return ticks, books


# ------------------------------------------------------------------------------------------------
# SQLite

SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS market_ticks (
    symbol TEXT NOT NULL,
    kind INTEGER NOT NULL,          -- pipeline.records.Kind: 1 aggTrade, 2 trade
    trade_id INTEGER NOT NULL,      -- aggTrade `a` / trade `t`
    price REAL NOT NULL,
    qty REAL NOT NULL,
    last_id INTEGER NOT NULL,       -- aggTrade `l` (last underlying trade id)
    flags INTEGER NOT NULL,         -- pipeline.records.Flags (1 = buyer is maker)
    event_time_ns INTEGER NOT NULL,
    recv_time_ns INTEGER NOT NULL,
    PRIMARY KEY (symbol, kind, trade_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS book_tops (
    symbol TEXT NOT NULL,
    kind INTEGER NOT NULL,          -- 3 bookTicker, 4 depth top after a diff
    update_id INTEGER NOT NULL,     -- `u`
    bid_price REAL NOT NULL,
    bid_qty REAL NOT NULL,
    ask_price REAL NOT NULL,
    ask_qty REAL NOT NULL,
    event_time_ns INTEGER NOT NULL,
    recv_time_ns INTEGER NOT NULL,
    PRIMARY KEY (symbol, kind, update_id)
) WITHOUT ROWID;
"""


class SqliteStore:
    """SQLite in WAL mode: readers (sqlite3 CLI, dashboards) never block the writer."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

    def setup(self) -> None:
        c = self.conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses no commit
        c.execute("PRAGMA busy_timeout=5000")
        c.executescript(SQLITE_DDL)

    def max_ids(self) -> dict[Key, int]:
        out: dict[Key, int] = {}
        for table, col in (("market_ticks", "trade_id"), ("book_tops", "update_id")):
            for sym, kind, top in self.conn.execute(
                f"SELECT symbol, kind, max({col}) FROM {table} GROUP BY symbol, kind"
            ):
                out[(sym, int(kind))] = int(top)
        return out

    def write(self, ticks: Sequence[Row], books: Sequence[Row]) -> tuple[int, int]:
        c = self.conn
        before = c.total_changes
        c.execute("BEGIN")
        try:
            if ticks:
                c.executemany(
                    "INSERT INTO market_ticks VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    ticks,
                )
            mid = c.total_changes
            if books:
                c.executemany(
                    "INSERT INTO book_tops VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    books,
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return mid - before, c.total_changes - mid

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------------------------------------
# PostgreSQL

POSTGRES_DDL = [
    """CREATE TABLE IF NOT EXISTS market_ticks (
        symbol text NOT NULL,
        kind smallint NOT NULL,
        trade_id bigint NOT NULL,
        price double precision NOT NULL,
        qty double precision NOT NULL,
        last_id bigint NOT NULL,
        flags smallint NOT NULL,
        event_time_ns bigint NOT NULL,
        recv_time_ns bigint NOT NULL,
        PRIMARY KEY (symbol, kind, trade_id))""",
    """CREATE TABLE IF NOT EXISTS book_tops (
        symbol text NOT NULL,
        kind smallint NOT NULL,
        update_id bigint NOT NULL,
        bid_price double precision NOT NULL,
        bid_qty double precision NOT NULL,
        ask_price double precision NOT NULL,
        ask_qty double precision NOT NULL,
        event_time_ns bigint NOT NULL,
        recv_time_ns bigint NOT NULL,
        PRIMARY KEY (symbol, kind, update_id))""",
]


class PostgresStore:
    """PostgreSQL via psycopg 3: COPY into a session temp table, then one
    ``INSERT .. SELECT .. ON CONFLICT DO NOTHING`` per table per transaction (COPY is several
    times faster than multi-row INSERTs, and the conflict handling stays in the server)."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise RuntimeError(
                "persist.postgres_url is set but psycopg is not installed: "
                "pip install 'pipeline[postgres]' (psycopg[binary])"
            ) from exc
        self._psycopg = psycopg
        self.conn = psycopg.connect(url, autocommit=False, application_name="pipeline-persist")

    def setup(self) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            for ddl in POSTGRES_DDL:
                cur.execute(ddl)
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS stage_ticks "
                "(LIKE market_ticks INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS stage_books "
                "(LIKE book_tops INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )

    def max_ids(self) -> dict[Key, int]:
        out: dict[Key, int] = {}
        with self.conn.transaction(), self.conn.cursor() as cur:
            for table, col in (("market_ticks", "trade_id"), ("book_tops", "update_id")):
                cur.execute(f"SELECT symbol, kind, max({col}) FROM {table} GROUP BY symbol, kind")
                for sym, kind, top in cur.fetchall():
                    out[(sym, int(kind))] = int(top)
        return out

    def write(self, ticks: Sequence[Row], books: Sequence[Row]) -> tuple[int, int]:
        counts = [0, 0]
        with self.conn.transaction(), self.conn.cursor() as cur:
            for k, (rows, stage, table, cols) in enumerate(
                (
                    (ticks, "stage_ticks", "market_ticks", TICK_COLUMNS),
                    (books, "stage_books", "book_tops", BOOK_COLUMNS),
                )
            ):
                if not rows:
                    continue
                collist = ", ".join(cols)
                with cur.copy(f"COPY {stage} ({collist}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cur.execute(f"INSERT INTO {table} SELECT * FROM {stage} ON CONFLICT DO NOTHING")
                counts[k] = max(cur.rowcount, 0)  # the stage empties itself at COMMIT
        return counts[0], counts[1]

    def close(self) -> None:
        self.conn.close()


def open_store(sqlite_path: str, postgres_url: str = "") -> Store:
    store: Store = PostgresStore(postgres_url) if postgres_url else SqliteStore(sqlite_path)
    store.setup()
    return store


# ------------------------------------------------------------------------------------------------
# consumer shell


class Persist:
    """The consumer: feeds :class:`PersistCore`, flushes to a :class:`Store`, keeps metrics."""

    def __init__(
        self,
        store: Store,
        core: PersistCore,
        *,
        metrics_name: str | None = "pipeline.persist.metrics",
        clock: Callable[[], float] = time.monotonic,
        log_interval_s: float = 10.0,
    ) -> None:
        self.store = store
        self.core = core
        self.clock = clock
        self.inserted = 0
        self.book_inserted = 0
        self.duplicates = 0
        self.flushes = 0
        self.errors = 0
        self._log_interval = log_interval_s
        self._next_log = clock() + log_interval_s
        ids = store.max_ids()
        core.resume.max_ids = {k: v for k, v in ids.items() if k[1] in TRADE_KINDS}
        core.book_resume.max_ids = {k: v for k, v in ids.items() if k[1] in BOOK_KINDS}
        if ids:
            log.info(
                "resuming after stored ids", extra={"event": "persist_resume", "keys": len(ids)}
            )
        self.metrics: Any = None
        if metrics_name:
            from pipeline.metrics import MetricsBlock

            self.metrics = MetricsBlock.create(metrics_name, METRICS_FIELDS)

    def on_batch(self, batch: np.ndarray, reader: Any) -> None:
        if self.core.add(batch, symbol_names(reader), self.clock()):
            self.flush()

    def flush(self) -> None:
        if not self.core.pending:
            return
        ticks, books = self.core.take()
        t0 = time.perf_counter()
        try:
            n_ticks, n_books = self.store.write(ticks, books)
        except Exception:
            self.errors += 1
            # Put the rows back: the next flush retries them (ON CONFLICT makes that safe).
            self.core.ticks[:0] = ticks
            self.core.books[:0] = books
            self.core.oldest = self.clock()
            log.exception("persist write failed; will retry", extra={"event": "persist_error"})
            if self.metrics is not None:
                self.metrics.set(errors=self.errors)
            raise
        took_us = (time.perf_counter() - t0) * 1e6
        self.flushes += 1
        self.inserted += n_ticks
        self.book_inserted += n_books
        self.duplicates += len(ticks) - n_ticks + len(books) - n_books
        if self.metrics is not None:
            self.metrics.set(
                inserted=self.inserted, book_inserted=self.book_inserted,
                duplicates=self.duplicates, flushes=self.flushes, pending=self.core.pending,
                last_flush_ns=time.time_ns(), last_flush_us=took_us,
                skipped_resume=self.core.resume.skipped + self.core.book_resume.skipped,
            )  # fmt: skip

    def on_tick(self, reader: Any, now: float) -> None:
        if self.core.due(now):
            try:
                self.flush()
            except Exception:
                pass  # logged and counted in flush; rows kept for the next attempt
        if self.metrics is not None:
            self.metrics.set(
                missed=int(reader.missed), resyncs=int(getattr(reader, "resyncs", 0)),
                lag=int(reader.lag), pending=self.core.pending,
            )  # fmt: skip
        if now >= self._next_log:
            self._next_log = now + self._log_interval
            log.info(
                "persist status",
                extra={
                    "event": "persist_status", "inserted": self.inserted,
                    "book_inserted": self.book_inserted, "duplicates": self.duplicates,
                    "missed": int(reader.missed), "lag": int(reader.lag),
                },
            )  # fmt: skip

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.store.close()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            log.info(
                "persist stopped",
                extra={
                    "event": "persist_stopped", "inserted": self.inserted,
                    "book_inserted": self.book_inserted, "duplicates": self.duplicates,
                    "skipped_resume": self.core.resume.skipped,
                },
            )  # fmt: skip


def from_args(args: argparse.Namespace, cfg: Any) -> Persist:
    pc = cfg.persist
    sqlite_path = args.sqlite or pc.sqlite_path
    postgres_url = args.postgres_url if args.postgres_url is not None else pc.postgres_url
    core = PersistCore(
        batch_max=args.batch_max or pc.batch_max,
        flush_interval_s=pc.flush_interval_s,
        book_tops=pc.book_tops,
    )
    store = open_store(sqlite_path, postgres_url)
    metrics = args.metrics_name
    if metrics is None:
        metrics = f"{cfg.run.shm_prefix}persist.metrics"
    return Persist(store, core, metrics_name=metrics or None)
