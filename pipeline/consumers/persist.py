"""Persist ticks to a database: the consumer that turns ring records into database rows.

The databases (SQLite embedded by default, or PostgreSQL), their tables and SQL are
:mod:`pipeline.consumers.stores`; this module decides what to write and when.

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
policy; clock passed in); the :class:`~pipeline.consumers.stores.Store` implementations talk to
the databases.

Why a database outage loses nothing: the store may be down at start, restart, fill its disk or
be locked; :class:`Persist` retries with backoff, keeps at most ``max_pending`` rows (65 536 by
default) and then stops reading the ring, whose records wait there (see :class:`Persist`).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.backoff import Backoff, BackoffPolicy
from pipeline.consumers import symbol_names, symbol_of
from pipeline.consumers.stores import Key, Row, Store, is_database_error, open_store
from pipeline.ipc.records import Kind

log = logging.getLogger("pipeline.persist")

TRADE_KINDS = (int(Kind.AGG_TRADE), int(Kind.TRADE))
BOOK_KINDS = (int(Kind.BOOK_TICKER), int(Kind.DEPTH_TOP))

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
    ("sink_errors", "<i8"),  # failed database calls (connect, resume read, write), all time
    ("sink_connected", "<i8"),
    ("sink_reconnects", "<i8"),
    ("sink_failures_in_row", "<i8"),
    ("paused", "<i8"),  # 1: not reading the ring (store not reached yet, or buffer full)
    ("heartbeat_interval_ms", "<i8"),
    ("problem_sink_failing", "<i8"),  # health: non-zero = the store keeps failing
]

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
# consumer shell

SINK_BACKOFF = BackoffPolicy(initial_s=0.1, max_s=5.0, factor=2.0, jitter=0.2, max_attempts=0)


class Persist:
    """The consumer: feeds :class:`PersistCore`, flushes to a :class:`Store`, keeps metrics.

    Surviving the database (the store may be down at start, restart, fill its disk or be
    locked by someone else):

    * every database call goes through :meth:`_attempt`; a failure is counted (``sink_errors``),
      logged in one line without a traceback (a bug in this module still gets one), the rows
      stay buffered and the next attempt waits by :data:`SINK_BACKOFF` (0.1 s doubling to 5 s).
      Nothing raises out of ``on_batch`` / ``on_tick``: no crash loop.
    * the buffer is bounded: at most ``max_pending`` rows (default 65 536; :attr:`room` caps
      each ring poll); when full the consumer reports :attr:`paused` and
      :func:`~pipeline.consumers.run_consumer` stops reading the ring. The records stay in the
      ring and are read once the store is back (the reader's cursor did not move), so nothing
      is lost while the ring holds them, and nothing is written twice (``ON CONFLICT``). An
      outage longer than the ring's capacity shows as ``missed``.
    * the ring is not read at all until the store answered once (``max_ids`` for the resume
      filter), so a consumer started while its database is down just waits and says why.
    * health: ``problem_sink_failing`` is non-zero (the run of failed attempts) once the store
      has failed for ``fail_grace_s`` (2 s) in a row, or a buffered row has waited
      ``stale_after_s`` (10 s) for its commit; ``last_flush_ns`` is the last successful write.
      The block is written on every tick (0.25 s), ``heartbeat_interval_ms`` = 1000.
    """

    heartbeat_interval_ms = 1000

    def __init__(
        self,
        store: Store,
        core: PersistCore,
        *,
        metrics_name: str | None = "pipeline.persist.metrics",
        clock: Callable[[], float] = time.monotonic,
        log_interval_s: float = 10.0,
        max_pending: int = 65536,
        fail_grace_s: float = 2.0,
        stale_after_s: float = 10.0,
        backoff: BackoffPolicy = SINK_BACKOFF,
    ) -> None:
        self.store = store
        self.core = core
        self.clock = clock
        self.max_pending = max(1, int(max_pending))
        self.fail_grace_s = fail_grace_s
        self.stale_after_s = stale_after_s
        self.inserted = 0
        self.book_inserted = 0
        self.duplicates = 0
        self.flushes = 0
        self.errors = 0  # failed database calls, all time (metrics: sink_errors)
        self.reconnects = 0
        self.resumed = False  # max_ids read: the ring may be read
        self.last_flush_ns = 0
        self._ever_connected = False
        self._backoff = Backoff(backoff)
        self._next_attempt = clock()
        self._failing_since: float | None = None
        self._log_interval = log_interval_s
        self._next_log = clock() + log_interval_s
        self.metrics: Any = None
        if metrics_name:
            from pipeline.ipc.metrics import MetricsBlock

            self.metrics = MetricsBlock.create(metrics_name, METRICS_FIELDS)
            self.metrics.set(heartbeat_interval_ms=self.heartbeat_interval_ms)
        self._attempt(clock())  # first contact now; a failure is retried from the loop

    # --- state --------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while the ring must not be read: store never reached, or buffer full."""
        return not self.resumed or self.core.pending >= self.max_pending

    @property
    def room(self) -> int:
        """Records the next ring poll may return (one record makes at most one row)."""
        return max(0, self.max_pending - self.core.pending)

    @property
    def failures_in_row(self) -> int:
        return self._backoff.attempts

    def problem(self, now: float) -> int:
        """``problem_sink_failing``: 0 when fine, else the run of failed attempts (>= 1)."""
        failing = self._failing_since is not None and now - self._failing_since >= self.fail_grace_s
        oldest = self.core.oldest
        stale = oldest is not None and now - oldest >= self.stale_after_s
        return max(1, self.failures_in_row) if failing or stale else 0

    # --- database calls -----------------------------------------------------------------------

    def _attempt(self, now: float) -> bool:
        """Connect if needed, read the resume ids once, write what is buffered. True when all
        of that succeeded; on failure the rows stay buffered and the next try is scheduled."""
        ticks: list[Row] = []
        books: list[Row] = []
        oldest: float | None = None
        try:
            if not self.store.connected:
                self.store.setup()
                if self._ever_connected:
                    self.reconnects += 1
                self._ever_connected = True
            if not self.resumed:
                self._resume(self.store.max_ids())
            if not self.core.pending:
                self._succeeded(now)
                return True
            oldest = self.core.oldest
            ticks, books = self.core.take()
            t0 = time.perf_counter()
            n_ticks, n_books = self.store.write(ticks, books)
        except Exception as exc:  # every failure is retried, counted and logged
            if ticks or books:  # put the rows back: the retry writes them (ON CONFLICT: once)
                self.core.ticks[:0] = ticks
                self.core.books[:0] = books
                self.core.oldest = oldest if oldest is not None else now
            self._failed(now, exc)
            return False
        took_us = (time.perf_counter() - t0) * 1e6
        self.flushes += 1
        self.inserted += n_ticks
        self.book_inserted += n_books
        self.duplicates += len(ticks) - n_ticks + len(books) - n_books
        self.last_flush_ns = time.time_ns()
        self._succeeded(now)
        if self.metrics is not None:
            self.metrics.set(last_flush_us=took_us)
        return True

    def _resume(self, ids: dict[Key, int]) -> None:
        self.core.resume.max_ids = {k: v for k, v in ids.items() if k[1] in TRADE_KINDS}
        self.core.book_resume.max_ids = {k: v for k, v in ids.items() if k[1] in BOOK_KINDS}
        self.resumed = True
        if ids:
            log.info(
                "resuming after stored ids", extra={"event": "persist_resume", "keys": len(ids)}
            )

    def _failed(self, now: float, exc: Exception) -> None:
        self.errors += 1
        try:
            self.store.reset()
        except Exception:  # the next attempt starts from a fresh connect
            pass
        if self._failing_since is None:
            self._failing_since = now
        delay = self._backoff.next_delay() or self._backoff.policy.max_s
        self._next_attempt = now + delay
        what = "database not reachable" if not self.resumed else "database write failed"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning(
            "persist: %s (%s: %s); %d rows kept, retry in %.1fs",
            what, type(exc).__name__, reason, self.core.pending, delay,
            exc_info=not is_database_error(exc),
            extra={
                "event": "persist_error", "store": self.store.describe(),
                "failures_in_row": self.failures_in_row, "pending": self.core.pending,
            },
        )  # fmt: skip

    def _succeeded(self, now: float) -> None:
        if self._failing_since is not None:
            log.info(
                "persist: database back after %d failed attempts (%.1fs)",
                self.failures_in_row, now - self._failing_since,
                extra={"event": "persist_recovered", "store": self.store.describe(),
                       "reconnects": self.reconnects},
            )  # fmt: skip
        self._failing_since = None
        self._backoff.reset()
        self._next_attempt = now

    def _service(self, now: float, force: bool = False) -> None:
        """Retry a failed store once its backoff ran out, flush when the batch is due."""
        if now < self._next_attempt and not force:
            return
        if not self.resumed or self._failing_since is not None or self.core.due(now) or force:
            self._attempt(now)

    def flush(self) -> bool:
        """Write what is buffered now (ignoring the backoff). True on success; never raises."""
        now = self.clock()
        self._service(now, force=True)
        return self._failing_since is None and not self.core.pending

    # --- consumer interface -------------------------------------------------------------------

    def on_batch(self, batch: np.ndarray, reader: Any) -> None:
        now = self.clock()
        if self.core.add(batch, symbol_names(reader), now):
            self._service(now)

    def heartbeat(self, now: float) -> None:
        """Called while no ring is attached (waiting for it): keep retrying the store and keep
        the metrics block fresh."""
        self._service(now)
        self._publish(now)

    def on_tick(self, reader: Any, now: float) -> None:
        self._service(now)
        self._publish(now, reader)
        if now >= self._next_log:
            self._next_log = now + self._log_interval
            log.info(
                "persist status",
                extra={
                    "event": "persist_status", "inserted": self.inserted,
                    "book_inserted": self.book_inserted, "duplicates": self.duplicates,
                    "missed": int(reader.missed), "lag": int(reader.lag),
                    "pending": self.core.pending, "sink_errors": self.errors,
                },
            )  # fmt: skip

    def _publish(self, now: float, reader: Any = None) -> None:
        if self.metrics is None:
            return
        extra: dict[str, float] = {}
        if reader is not None:
            extra = {
                "missed": int(reader.missed), "resyncs": int(getattr(reader, "resyncs", 0)),
                "lag": int(reader.lag),
            }  # fmt: skip
        self.metrics.set(
            inserted=self.inserted, book_inserted=self.book_inserted,
            duplicates=self.duplicates, flushes=self.flushes, pending=self.core.pending,
            last_flush_ns=self.last_flush_ns, sink_errors=self.errors,
            sink_connected=int(self.store.connected), sink_reconnects=self.reconnects,
            sink_failures_in_row=self.failures_in_row, paused=int(self.paused),
            skipped_resume=self.core.resume.skipped + self.core.book_resume.skipped,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            problem_sink_failing=self.problem(now), **extra,
        )  # fmt: skip

    def close(self) -> None:
        """Last flush (one attempt), then close. Rows the store would not take are not lost
        while the ring still holds them: the next start reads from the oldest record and the
        resume filter skips what was stored."""
        try:
            if self.core.pending or not self.resumed:
                self.flush()
            if self.core.pending:
                log.error(
                    "persist: stopping with %d rows not written (database failing); the next "
                    "start re-reads them from the ring while it still holds them",
                    self.core.pending,
                    extra={"event": "persist_unflushed", "pending": self.core.pending},
                )
        finally:
            try:
                self.store.close()
            except Exception:  # a dead connection may fail to close
                pass
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            log.info(
                "persist stopped",
                extra={
                    "event": "persist_stopped", "inserted": self.inserted,
                    "book_inserted": self.book_inserted, "duplicates": self.duplicates,
                    "skipped_resume": self.core.resume.skipped, "sink_errors": self.errors,
                },
            )  # fmt: skip


def from_args(args: argparse.Namespace, cfg: Any) -> Persist:
    pc = cfg.persist
    sqlite_path = args.sqlite or pc.sqlite_path
    postgres_url = args.postgres_url if args.postgres_url is not None else pc.postgres_url
    batch_max = args.batch_max or pc.batch_max
    core = PersistCore(
        batch_max=batch_max,
        flush_interval_s=pc.flush_interval_s,
        book_tops=pc.book_tops,
    )
    store = open_store(sqlite_path, postgres_url)
    metrics = args.metrics_name
    if metrics is None:
        metrics = f"{cfg.run.shm_prefix}persist.metrics"
    max_pending = getattr(args, "max_pending", None) or max(65536, 2 * batch_max)
    return Persist(store, core, metrics_name=metrics or None, max_pending=max_pending)
