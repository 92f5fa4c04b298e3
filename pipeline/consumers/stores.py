"""The databases the persist consumer writes to: SQLite (the embedded default) or PostgreSQL.

Tables (same columns in both databases)::

    market_ticks(symbol, kind, trade_id, price, qty, last_id, flags, event_time_ns, recv_time_ns)
        PRIMARY KEY (symbol, kind, trade_id)        -- aggTrade `a` / trade `t`
    book_tops(symbol, kind, update_id, bid_price, bid_qty, ask_price, ask_qty, event_time_ns,
              recv_time_ns)
        PRIMARY KEY (symbol, kind, update_id)       -- bookTicker `u` / depth top after diff `u`

Every insert is ``ON CONFLICT DO NOTHING`` on those exchange-id keys, which is what lets the
consumer (:mod:`pipeline.consumers.persist`) replay records after a restart without duplicates.
Kept apart from the consumer so that each database's SQL and connection handling reads on its
own, behind the one :class:`Store` protocol the consumer knows.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

TICK_COLUMNS = (
    "symbol", "kind", "trade_id", "price", "qty", "last_id", "flags", "event_time_ns",
    "recv_time_ns",
)  # fmt: skip
BOOK_COLUMNS = (
    "symbol", "kind", "update_id", "bid_price", "bid_qty", "ask_price", "ask_qty",
    "event_time_ns", "recv_time_ns",
)  # fmt: skip

Row = tuple[Any, ...]
Key = tuple[str, int]


class Store(Protocol):
    """A database the persist consumer writes to. ``write`` is one transaction.

    ``setup`` connects (when not connected) and creates the tables; it is retried by
    :class:`Persist` until it succeeds. ``reset`` runs after any failed call: it drops a broken
    connection so the next ``setup`` reconnects."""

    @property
    def connected(self) -> bool: ...

    def describe(self) -> str: ...

    def setup(self) -> None: ...

    def reset(self) -> None: ...

    def max_ids(self) -> dict[Key, int]: ...

    def write(self, ticks: Sequence[Row], books: Sequence[Row]) -> tuple[int, int]: ...

    def close(self) -> None: ...


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
    """SQLite in WAL mode: readers (sqlite3 CLI, dashboards) never block the writer.

    Nothing is opened until :meth:`setup` (the consumer retries it: a missing directory or a
    locked file at start is "retry later", not a crash). The busy timeout is short
    (``busy_timeout_ms``, 50 ms by default) on purpose: a write blocked by another connection's
    lock fails fast and is retried later with backoff, so the consumer keeps reading the ring
    meanwhile instead of stalling 5 s per attempt.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_ms: int = 50) -> None:
        self.path = str(path)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.conn: sqlite3.Connection | None = None

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def setup(self) -> None:
        if self.conn is not None:
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False,
            timeout=self.busy_timeout_ms / 1000,
        )  # fmt: skip
        try:
            conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; no commit lost
            conn.executescript(SQLITE_DDL)
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.OperationalError(f"{self.describe()} is not open")
        return self.conn

    def max_ids(self) -> dict[Key, int]:
        out: dict[Key, int] = {}
        for table, col in (("market_ticks", "trade_id"), ("book_tops", "update_id")):
            for sym, kind, top in self._conn().execute(
                f"SELECT symbol, kind, max({col}) FROM {table} GROUP BY symbol, kind"
            ):
                out[(sym, int(kind))] = int(top)
        return out

    def write(self, ticks: Sequence[Row], books: Sequence[Row]) -> tuple[int, int]:
        c = self._conn()
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
            self.reset()
            raise
        return mid - before, c.total_changes - mid

    def reset(self) -> None:
        """After a failed write: end the transaction if SQLite did not already (a disk-full
        COMMIT may have rolled back by itself). The connection stays open: SQLite errors
        (busy, full) do not break it."""
        c = self.conn
        if c is not None and c.in_transaction:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                self.close()  # a connection that cannot even roll back is reopened next time

    def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.close()


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


#: PostgreSQL types of the COPY columns, in TICK_COLUMNS / BOOK_COLUMNS order: binary COPY sends
#: each value in the column's own binary form, so psycopg must be told the types, not guess them
#: from Python ints (which it would send as int8/numeric).
TICK_PG_TYPES = ("text", "int2", "int8", "float8", "float8", "int8", "int2", "int8", "int8")
BOOK_PG_TYPES = ("text", "int2", "int8", "float8", "float8", "float8", "float8", "int8", "int8")
COPY_FORMATS = ("binary", "text")


class PostgresStore:
    """PostgreSQL via psycopg 3: COPY into a session temp table, then one
    ``INSERT .. SELECT .. ON CONFLICT DO NOTHING`` per table per transaction (COPY is several
    times faster than multi-row INSERTs, and the conflict handling stays in the server).

    The COPY is binary by default: ``benchmarks/bench_persist.py`` measures it against text COPY
    on the same rows (the binary form skips formatting every float and int as text in Python and
    parsing it again in the server). ``copy_format="text"`` stays for that comparison.

    The connection is made in :meth:`setup`, not in the constructor, and is dropped by
    :meth:`reset` once psycopg says it is broken (server restart, network): the next
    :meth:`setup` reconnects and recreates the session's temp tables. ``connect_timeout`` (2 s,
    libpq's minimum) bounds how long one attempt can hold the consumer loop.
    """

    def __init__(self, url: str, connect_timeout_s: int = 2, copy_format: str = "binary") -> None:
        if copy_format not in COPY_FORMATS:
            raise ValueError(f"copy_format must be one of {', '.join(COPY_FORMATS)}")
        self.copy_format = copy_format
        try:
            import psycopg
        except ImportError as exc:
            raise RuntimeError(
                "persist.postgres_url is set but psycopg is not installed: "
                "pip install 'binance-shm-pipeline[postgres]' (psycopg[binary])"
            ) from exc
        self._psycopg = psycopg
        self._url = url
        self._connect_timeout = connect_timeout_s
        self.conn: Any = None

    @property
    def connected(self) -> bool:
        c = self.conn
        return c is not None and not c.closed and not c.broken

    def describe(self) -> str:
        """Where we write, for logs: the URL without credentials."""
        return f"postgresql:{redact_url(self._url)}"

    def setup(self) -> None:
        if self.connected:
            return
        self.reset()
        kwargs: dict[str, Any] = {"autocommit": False, "application_name": "pipeline-persist"}
        if "connect_timeout" not in self._url:
            kwargs["connect_timeout"] = self._connect_timeout
        conn = self._psycopg.connect(self._url, **kwargs)
        try:
            with conn.transaction(), conn.cursor() as cur:
                for ddl in POSTGRES_DDL:
                    cur.execute(ddl)
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS stage_ticks "
                    "(LIKE market_ticks INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                cur.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS stage_books "
                    "(LIKE book_tops INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def _conn(self) -> Any:
        if self.conn is None:
            raise self._psycopg.OperationalError(f"{self.describe()}: not connected")
        return self.conn

    def max_ids(self) -> dict[Key, int]:
        out: dict[Key, int] = {}
        conn = self._conn()
        with conn.transaction(), conn.cursor() as cur:
            for table, col in (("market_ticks", "trade_id"), ("book_tops", "update_id")):
                cur.execute(f"SELECT symbol, kind, max({col}) FROM {table} GROUP BY symbol, kind")
                for sym, kind, top in cur.fetchall():
                    out[(sym, int(kind))] = int(top)
        return out

    def write(self, ticks: Sequence[Row], books: Sequence[Row]) -> tuple[int, int]:
        counts = [0, 0]
        conn = self._conn()
        with conn.transaction(), conn.cursor() as cur:
            for k, (rows, stage, table, cols, types) in enumerate(
                (
                    (ticks, "stage_ticks", "market_ticks", TICK_COLUMNS, TICK_PG_TYPES),
                    (books, "stage_books", "book_tops", BOOK_COLUMNS, BOOK_PG_TYPES),
                )
            ):
                if not rows:
                    continue
                self.copy_rows(cur, stage, cols, types, rows)
                cur.execute(f"INSERT INTO {table} SELECT * FROM {stage} ON CONFLICT DO NOTHING")
                counts[k] = max(cur.rowcount, 0)  # the stage empties itself at COMMIT
        return counts[0], counts[1]

    def copy_rows(
        self, cur: Any, table: str, cols: Sequence[str], types: Sequence[str], rows: Sequence[Row]
    ) -> None:
        """COPY ``rows`` into ``table`` in this store's format (the benchmark times it alone)."""
        binary = self.copy_format == "binary"
        options = " (FORMAT BINARY)" if binary else ""
        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN{options}") as copy:
            if binary:
                copy.set_types(types)
            for row in rows:
                copy.write_row(row)

    def reset(self) -> None:
        """Drop a broken connection (the next :meth:`setup` reconnects); keep a healthy one
        (a failed transaction was already rolled back by ``conn.transaction()``)."""
        c = self.conn
        if c is not None and (c.closed or c.broken):
            self.conn = None
            try:
                c.close()
            except Exception:  # closing a dead connection may fail; it is gone
                pass

    def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.close()


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``; also hides
    ``password=`` in key=value conninfo strings. Logs must never carry a secret."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url, flags=re.IGNORECASE)


def open_store(sqlite_path: str, postgres_url: str = "") -> Store:
    """The store for this configuration, not yet connected (:class:`Persist` connects and
    retries). Raises RuntimeError only for what a retry cannot fix (psycopg missing)."""
    return PostgresStore(postgres_url) if postgres_url else SqliteStore(sqlite_path)


def is_database_error(exc: BaseException) -> bool:
    """An error of the database or its connection (retried quietly, one line, no traceback),
    as opposed to a bug in this module (logged with its traceback, still retried)."""
    if isinstance(exc, sqlite3.Error | OSError):
        return True
    return any(
        c.__module__.startswith("psycopg") and c.__name__ == "Error" for c in type(exc).__mro__
    )
