"""Ring consumers: the shared loop every consumer process runs (built-ins and plug-ins alike).

A consumer is a small class with ``on_batch(batch, reader)`` (records since the last call), an
optional ``on_tick(reader, now)`` (called about every ``tick_interval_s`` even when idle, for
status lines, commits and watchdog pings) and ``close()``. :func:`run_consumer` does the rest,
identically for every consumer:

* attach to the ring, retrying while it does not exist yet (consumers may start before ingest;
  systemd starts units in parallel);
* wait for records without burning a core (the ring's sleeping ``wait``), poll in batches;
* a restarted writer is picked up by the reader itself (``RingReader`` resyncs on a new
  generation; ``resyncs`` / ``missed`` say what happened), and a ring that disappears for good
  (writer closed) is waited for again;
* SIGTERM / SIGINT stop the loop cleanly: the consumer's ``close`` runs (final commit);
* ``sd_notify``: READY=1 once attached, WATCHDOG=1 while the loop turns, STOPPING=1 at the end;
* heartbeat: ``on_tick`` runs on every tick even when no record arrives, and a consumer's
  optional ``heartbeat(now)`` runs on every retry while the ring is still missing, so a
  consumer's metrics block stays fresh (``heartbeat_interval_ms``, see :mod:`pipeline.ops.health`)
  whenever the process is alive and not stuck;
* back-pressure: while a consumer's optional ``paused`` attribute is true (persist: its database
  is down and its bounded buffer is full) the ring is not read; the records wait in the ring.
  An optional ``room`` attribute caps one poll, so a bounded consumer's buffer stays exact;
* an exception from the consumer ends the loop: its traceback is logged, ``close`` still runs,
  and the exit code is 1 (a half-alive consumer that stopped reading would look healthy).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.consumers.registry import BUILTINS
from pipeline.ipc.records import symbol_of as symbol_of  # re-exported: consumers name it here
from pipeline.ops import sdnotify

log = logging.getLogger("pipeline.consumer")

# The built-in consumers (name -> "module:factory"), imported lazily so `pipeline consume monitor`
# never imports sqlite3 or psycopg. Plug-ins add theirs through the `pipeline.consumers` entry
# points: pipeline.consumers.registry.available() has both.
REGISTRY: dict[str, str] = BUILTINS


class Consumer(Protocol):
    """What :func:`run_consumer` drives."""

    def on_batch(self, batch: np.ndarray, reader: Any) -> None: ...

    def on_tick(self, reader: Any, now: float) -> None: ...

    def close(self) -> None: ...


@dataclass
class LoopOptions:
    ring: str
    reader_name: str
    start: Literal["head", "oldest"] = "head"
    max_records: int = 8192  # per poll: bounds the work (and memory) of one batch
    tick_interval_s: float = 0.25
    attach_retry_s: float = 0.2
    attach_timeout_s: float | None = None  # None: wait for the ring forever
    duration_s: float | None = None  # stop after this long (tests, demos)
    # How the reader idles (pipeline.ring.IdlePolicy): "balanced" keeps 200 us wake-ups for the
    # first 10 ms of quiet, then relaxes to 1 ms naps (~4% of a core idle instead of ~15%).
    idle: str = "balanced"


class StopFlag:
    """Set by SIGTERM/SIGINT (or by the caller); the loop checks it between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None

    def set(self, signum: int | None = None) -> None:
        self.signal = signum
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True if stopped."""
        return self._event.wait(seconds)

    def install(self) -> None:
        """Route SIGTERM and SIGINT to this flag (main thread only)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.set(signum)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def attach_with_retry(
    ring: str,
    name: str,
    stop: StopFlag,
    *,
    start: Literal["head", "oldest"] = "head",
    retry_s: float = 0.2,
    timeout_s: float | None = None,
    idle_check_s: float = 3600.0,
    idle: str = "balanced",
    on_wait: Callable[[float], None] | None = None,
) -> Any:
    """Attach as reader ``name``; while the ring is missing (writer not up yet) retry every
    ``retry_s``. Returns the reader, or None if stopped / timed out. A segment that exists but
    is not a ring (or another layout) is an error at once: retrying would not fix it. One that
    fails the shared-memory trust rule (another uid's file, a FIFO, a symlink) is logged once
    and waited out like a missing ring.

    ``idle_check_s`` is long on purpose: :func:`run_consumer` looks for a restarted writer itself
    (``check_writer`` once per tick) instead of letting ``wait`` do it mid-wait.

    ``on_wait(now)`` runs before every retry sleep (the consumer's heartbeat while waiting)."""
    from pipeline.ipc.segments import (
        RingError,
        RingLayoutError,
        RingNotFoundError,
        RingReader,
    )
    from pipeline.ipc.shm import UntrustedSegmentError

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = False
    refused: str | None = None
    while not stop:
        try:
            reader = RingReader.attach(
                ring, name, start=start, check_interval_s=idle_check_s, idle=idle
            )
        except RingNotFoundError:
            pass
        except UntrustedSegmentError as exc:
            # Someone else's file under our ring's name: never map it. Say so once per reason
            # and keep waiting at the normal pace (the operator removes it, or it goes away):
            # exiting would only turn it into a restart loop.
            if str(exc) != refused:
                refused = str(exc)
                log.error(
                    "ring %s refused: %s; waiting for a trusted one", ring, exc,
                    extra={"event": "ring_untrusted", "ring": ring},
                )  # fmt: skip
        except RingLayoutError as exc:
            if "still being created" not in str(exc) and "is empty" not in str(exc):
                raise
        except RingError:
            pass
        else:
            if waited:
                log.info("ring attached", extra={"event": "ring_attached", "ring": ring})
            return reader
        if not waited:
            log.info("waiting for ring %s", ring, extra={"event": "ring_waiting", "ring": ring})
            waited = True
        if deadline is not None and time.monotonic() >= deadline:
            return None
        if on_wait is not None:
            on_wait(time.monotonic())
        stop.sleep(retry_s)
    return None


def run_consumer(
    consumer: Consumer,
    opts: LoopOptions,
    stop: StopFlag | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    watchdog: sdnotify.Watchdog | None = None,
) -> int:
    """Attach and feed ``consumer`` until stopped. Returns an exit code: 0 clean stop, 1 the
    ring never appeared or the consumer raised (traceback logged, ``close`` still run)."""
    stop = stop if stop is not None else StopFlag()
    try:
        return _run(consumer, opts, stop, clock, watchdog)
    except Exception:
        log.exception(
            "consumer failed; stopping (exit 1)",
            extra={"event": "consumer_failed", "ring": opts.ring, "reader": opts.reader_name},
        )
        return 1


def _paused(consumer: Consumer) -> bool:
    return bool(getattr(consumer, "paused", False))


def _batch_size(consumer: Consumer, max_records: int) -> int:
    room = getattr(consumer, "room", None)
    return max_records if room is None else max(1, min(max_records, int(room)))


def _run(
    consumer: Consumer,
    opts: LoopOptions,
    stop: StopFlag,
    clock: Callable[[], float],
    watchdog: sdnotify.Watchdog | None,
) -> int:
    started = clock()
    end = None if opts.duration_s is None else started + opts.duration_s
    watchdog = watchdog if watchdog is not None else sdnotify.Watchdog()
    remaining = None if end is None else max(0.0, end - clock())
    timeout = opts.attach_timeout_s
    if remaining is not None:
        timeout = remaining if timeout is None else min(timeout, remaining)
    heartbeat: Callable[[float], None] | None = getattr(consumer, "heartbeat", None)
    try:
        reader = attach_with_retry(
            opts.ring, opts.reader_name, stop, start=opts.start, retry_s=opts.attach_retry_s,
            timeout_s=timeout, idle=opts.idle,
            on_wait=None if heartbeat is None else (lambda _now: heartbeat(clock())),
        )  # fmt: skip
    except BaseException:
        consumer.close()
        raise
    if reader is None:
        consumer.close()
        if stop or (end is not None and clock() >= end):
            return 0
        log.error("ring %s did not appear", opts.ring, extra={"event": "ring_missing"})
        return 1
    sdnotify.ready(f"reading {opts.ring} as {opts.reader_name}")
    next_tick = clock()
    try:
        while not stop:
            now = clock()
            if end is not None and now >= end:
                break
            if now >= next_tick:
                next_tick = now + opts.tick_interval_s
                reader.check_writer()  # writer restarted? resync (only once drained)
                consumer.on_tick(reader, now)
                watchdog.tick(healthy=True)
            wait_s = max(0.0, min(next_tick - now, opts.tick_interval_s))
            if _paused(consumer):
                # Back-pressure: leave the records in the ring until the consumer can take them
                # (its on_tick retries whatever blocks it). One sleep per tick, no polling.
                stop.sleep(wait_s)
            elif reader.wait(wait_s):
                batch = reader.poll(_batch_size(consumer, opts.max_records))
                if len(batch):
                    consumer.on_batch(batch, reader)
            elif reader.writer_closed:
                # The writer shut down cleanly and unlinked the ring: a restart will create a
                # new segment, which the reader finds by itself (check_writer) once it exists.
                stop.sleep(min(opts.attach_retry_s, opts.tick_interval_s))
        # Drain what is already published (bounded: one capacity's worth), so a consumer
        # stopped before ingest (the shutdown order) still has every record up to this moment.
        for _ in range(max(1, reader.capacity // max(1, opts.max_records)) + 1):
            if _paused(consumer):
                break  # what it cannot take stays in the ring for its next start
            batch = reader.poll(_batch_size(consumer, opts.max_records))
            if not len(batch):
                break
            consumer.on_batch(batch, reader)
        consumer.on_tick(reader, clock())
    finally:
        sdnotify.stopping()
        try:
            consumer.close()
        finally:
            reader.close()
    return 0


def symbol_names(reader: Any) -> list[str]:
    """The ring's symbol table (id -> name), tolerant of records with an unknown id."""
    return list(getattr(reader, "symbols", []) or [])

