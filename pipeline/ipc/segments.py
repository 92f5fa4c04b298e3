"""The shared-memory shells of the ring: :class:`RingWriter` and :class:`RingReader` by name.

The pure cores (:class:`~pipeline.ipc.ring.WriterCore`, :class:`~pipeline.ipc.ring.ReaderCore`)
move records through any buffer; this module gives them a segment in ``/dev/shm`` and everything
that follows from living there: creating the segment (mode 0600, preallocated), replacing one left
by a dead writer (the generation bumps, attached readers resync), the readers table that ``pipeline
ring stats`` shows, waiting while idle (by an :class:`~pipeline.ipc.idle.IdlePolicy`), and
:func:`ring_stats` / :func:`list_rings` for the tools. Kept apart from the cores so that those stay
pure (no files, no processes) and testable over a ``bytearray``.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, Self

import numpy as np

from pipeline.ipc import shm, wake
from pipeline.ipc.idle import IdlePolicy, idle_policy, next_nap
from pipeline.ipc.layout import (
    E_MISSED,
    E_PID,
    FIXED_HEADER_BYTES,
    MAGIC,
    MAX_READERS,
    RING_HEADER,
    SLEEPER_BITS,
    W_CLOSED,
    W_CURSOR,
    W_EPOCH_NS,
    W_GENERATION,
    W_SLEEPERS,
    W_WAKEUPS,
    W_WRITER_PID,
    W_WRITER_START,
    RingError,
    RingExistsError,
    RingLayout,
    RingLayoutError,
    RingNotFoundError,
    align,
    claim_entry,
    format_header,
    list_readers,
    parse_header,
    reap_readers,
)
from pipeline.ipc.ring import ReaderCore, WriterCore

log = logging.getLogger("pipeline.ring")


class RingUntrustedError(RingLayoutError, shm.UntrustedSegmentError):
    """The name exists but fails the shared-memory trust rule (a symlink, a FIFO, a file of
    another uid or with group/other bits): refused, never retried by ``attach(wait_s=...)``."""


def _untrusted(exc: shm.UntrustedSegmentError) -> RingUntrustedError:
    return RingUntrustedError(exc.path, exc.reason, exc.inode)


class _SegmentHandle:
    """What a ring writer and a ring reader share as holders of one mapped segment: ``closed``
    and the context-manager protocol, both in terms of ``_seg`` and ``close()``."""

    _seg: shm.Segment | None

    def close(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._seg is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingWriter(_SegmentHandle, WriterCore):
    """The owner of a ring segment: creates it (mode 0600), publishes, and unlinks on close.

    A writer that restarts under the same name replaces a segment whose writer is dead or closed
    (bumping the generation, so attached readers resync) and refuses one whose writer is alive.
    """

    def __init__(self, seg: shm.Segment, layout: RingLayout, symbols: list[str]) -> None:
        super().__init__(seg.buf, layout)
        self._seg: shm.Segment | None = seg
        self.name = seg.name
        self.symbols = symbols
        self.symbol_ids = {s: k for k, s in enumerate(symbols)}
        self.generation = int(self._hdr[W_GENERATION])

    @classmethod
    def create(
        cls,
        name: str,
        dtype: np.dtype | str | type,
        capacity: int,
        symbols: Iterable[str] = (),
        *,
        max_readers: int = MAX_READERS,
        prefault: bool = True,
    ) -> RingWriter:
        """Create ring ``name`` (``/dev/shm/NAME``, mode 0600) for records of ``dtype``.

        ``capacity`` (a power of two) is how far a reader may fall behind before it is lapped;
        ``symbols`` is the id -> name table readers get as ``RingReader.symbols``. Raises
        :class:`RingExistsError` if a live writer owns the name, :class:`RingLayoutError` if the
        name holds something that is not a ring.

        ``prefault`` (default) allocates the whole segment now and maps every page: otherwise
        the first lap through the ring takes a page fault every 4 KiB (~0.15 us per 96-byte
        record on average, a few us of latency on each faulting publish), and a /dev/shm too
        small for the ring would kill the writer with SIGBUS mid-stream instead of failing here
        with :class:`RingError` (ENOSPC). Costs ~20-50 ms per 100 MB at startup.
        """
        syms = list(symbols)
        layout = RingLayout.compute(dtype, capacity, syms, max_readers)
        pid, start_ticks = shm.my_identity()
        generation = 1
        for _attempt in range(5):
            try:
                seg = shm.Segment.create(name, layout.total_size)
            except FileExistsError:
                generation = max(generation, _retire_stale(name) + 1)
                continue
            try:
                format_header(
                    seg.buf, layout, generation=generation, writer_pid=pid,
                    writer_start=start_ticks, epoch_ns=time.time_ns(),
                )  # fmt: skip
                if prefault:  # after the header: readers may attach meanwhile (nothing to read)
                    _prefault(seg, name, layout.seqs_off)
            except BaseException:
                seg.unlink()
                seg.close()
                raise
            log.info(
                "ring created",
                extra={"ring": name, "capacity": capacity, "record_size": layout.record_size,
                       "generation": generation, "bytes": layout.total_size},
            )  # fmt: skip
            return cls(seg, layout, syms)
        raise RingExistsError(f"could not create ring {name!r}: the name keeps reappearing")

    def close(self, unlink: bool = True) -> None:
        """Mark the ring closed (readers see it) and, by default, unlink it."""
        seg = self._seg
        if seg is None:
            return
        if self.staged:  # staged records are published, not dropped
            self.commit(time.time_ns() if self._stamp_off >= 0 else 0)
        self._seg = None
        self._hdr[W_CLOSED] = 1
        self.wake_readers()  # asleep on the cursor: they see the closed flag now, not later
        if unlink:
            seg.unlink()
        self._release()
        seg.close()

    @property
    def sleepers(self) -> int:
        """Readers asleep on this ring's futex now (bits of the header's sleepers word)."""
        return bin(int(self._hdr[W_SLEEPERS]) & (1 << 64) - 1).count("1")

    def reap_dead_readers(self) -> int:
        """Free the table entries (and sleepers bits) of readers whose process is gone; returns
        how many. Why the writer does it too: a reader killed while asleep leaves its bit set,
        and until someone reaps it every publish pays a futex wake for nobody. Attaching
        readers and ``pipeline ring stats`` reap as well; ingest calls this with its metrics
        flush while any bit is set."""
        seg = self._seg
        if seg is None:
            return 0
        bell = self._bell
        with seg.locked():
            return reap_readers(seg.buf, self.layout.max_readers, shm.pid_alive,
                                bell.clear if bell is not None else None)

    def __repr__(self) -> str:
        return f"RingWriter({self.name!r}, cursor={self.cursor}, capacity={self.capacity})"


def _prefault(seg: shm.Segment, name: str, start: int) -> None:
    """Allocate the segment's memory (a clear error if /dev/shm is too small) and write-touch
    every page from ``start`` on: the seq stamps and records of an empty ring, still zero and
    not readable by anyone (the cursor is 0), so writing zeros there changes nothing."""
    try:
        os.posix_fallocate(seg.fd, 0, seg.size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise RingError(
                f"cannot allocate {seg.size} bytes for ring {name!r} in {shm.SHM_DIR}: {exc}"
            ) from exc
        # EOPNOTSUPP and the like: the filesystem cannot preallocate; touching still maps
    first = align(start, mmap.PAGESIZE)
    pages = np.frombuffer(seg.buf, dtype=np.uint8)
    pages[first :: mmap.PAGESIZE] = 0
    del pages  # drop the buffer export, or the mapping could not be closed


def _retire_stale(name: str) -> int:
    """Unlink a segment left by a dead or closed writer; return its generation. Raises if a live
    writer owns it or if it is not a ring (never clobber something we do not understand)."""
    try:
        old = shm.Segment.open(name)
    except FileNotFoundError:
        return 0
    except shm.UntrustedSegmentError as exc:
        raise _untrusted(exc) from exc
    except OSError as exc:
        raise RingLayoutError(f"shared memory {name!r} exists and cannot be opened: {exc}") from exc
    try:
        parse_header(old.buf, name)
        hdr = old.buf[:FIXED_HEADER_BYTES].cast("q")
        pid, start = RING_HEADER.owner(hdr)
        gen, closed = hdr[W_GENERATION], hdr[W_CLOSED]
        hdr.release()
        if not closed and shm.pid_alive(pid, start):
            raise RingExistsError(f"ring {name!r} is owned by a live writer (pid {pid})")
        log.warning(
            "ring stale segment replaced",
            extra={"ring": name, "old_pid": pid, "old_generation": gen, "closed": bool(closed)},
        )
        old.unlink()
        return int(gen)
    finally:
        old.close()


class RingReader(_SegmentHandle, ReaderCore):
    """A consumer attached to a ring by name, from any process, at any time.

    Starts at the head (only records published after attaching) unless ``start="oldest"``.
    Registers in the ring's readers table so ``pipeline ring stats`` shows its lag. When idle it
    checks (at most every ``check_interval_s``) whether the writer closed or was replaced by a
    restarted writer; on a new segment it resyncs (``resyncs`` += 1, ``generation`` updated) and
    continues from the new segment's oldest record, counting any it can no longer read as missed.
    """

    def __init__(
        self,
        ring: str,
        seg: shm.Segment,
        layout: RingLayout,
        symbols: list[str],
        *,
        name: str,
        start: Literal["head", "oldest"] | int,
        verify: bool,
        check_interval_s: float,
        clock: Callable[[], float],
        idle: str | IdlePolicy = "low-latency",
    ) -> None:
        super().__init__(seg.buf, layout, start=start, verify=verify)
        self.ring = ring
        self.name = name
        self.symbols = symbols
        self._seg: shm.Segment | None = seg
        self.generation = int(self._hdr[W_GENERATION])
        self.epoch_ns = int(self._hdr[W_EPOCH_NS])
        self.resyncs = 0
        self.writer_closed = False
        self._check_interval = check_interval_s
        self._clock = clock
        self._next_check = clock() + check_interval_s
        self.idle = idle_policy(idle)
        self._idle_since: float | None = None  # perf_counter() when the idle period began
        self._last_nap = 0.0  # the last nap of that period
        #: the futex doorbell of this segment (None: naps) and this reader's sleepers bit (-1:
        #: none, unlisted or beyond SLEEPER_BITS: naps)
        self._bell: wake.Doorbell | None = None
        self._bit = -1
        #: idle waits that slept on the futex, and how many of those a publish ended
        self.sleeps = 0
        self.woken = 0
        self._register()

    @classmethod
    def attach(
        cls,
        ring: str,
        /,
        name: str = "",
        *,
        start: Literal["head", "oldest"] | int = "head",
        verify: bool = False,
        check_interval_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        wait_s: float = 0.0,
        idle: str | IdlePolicy = "low-latency",
    ) -> RingReader:
        """Attach to ring ``ring`` as reader ``name`` (shown by ``pipeline ring stats``).

        ``idle`` is how :meth:`wait` naps when there is nothing to read: ``"low-latency"``
        (default), ``"balanced"``, ``"low-cpu"`` or an :class:`IdlePolicy` (see there for the
        latency / CPU trade-off of each).

        ``wait_s`` > 0 keeps retrying that long while the ring is missing or still being
        created, for a consumer started before its writer; then the last error is raised.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                seg, layout, symbols = _open_ring(ring)
                break
            except RingUntrustedError:
                raise  # it will not become ours by waiting
            except (RingNotFoundError, RingLayoutError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        return cls(
            ring, seg, layout, symbols, name=name or f"pid{os.getpid()}", start=start,
            verify=verify, check_interval_s=check_interval_s, clock=clock, idle=idle,
        )  # fmt: skip

    @property
    def registered(self) -> bool:
        return self._entry is not None

    @property
    def inode(self) -> int:
        """Inode of the segment read now: with ``epoch_ns``, names this incarnation of the ring
        (a writer restarted under the same name has a new one)."""
        if self._seg is None:
            raise RingError(f"reader {self.name!r} of ring {self.ring!r} is closed")
        return self._seg.inode

    def shrunk(self) -> bool:
        """True if the segment file is now shorter than mapped: polling it could SIGBUS. Only
        our own uid can shrink a trusted segment; a reader of other processes' rings (the order
        intake) checks this on its scan."""
        return self._seg is None or self._seg.shrunk()

    @property
    def writer_pid(self) -> int:
        return int(self._hdr[W_WRITER_PID])

    def writer_alive(self) -> bool:
        return not self._hdr[W_CLOSED] and shm.pid_alive(
            int(self._hdr[W_WRITER_PID]), int(self._hdr[W_WRITER_START])
        )

    def _register(self) -> None:
        seg = self._seg
        assert seg is not None
        pid, start_ticks = shm.my_identity()
        self._bell = wake.doorbell(self._hdr, W_CURSOR, W_SLEEPERS)
        with seg.locked():
            reap_readers(seg.buf, self.layout.max_readers, shm.pid_alive,
                         self._bell.clear if self._bell is not None else None)
            claimed = claim_entry(
                seg.buf, self.layout.max_readers, self.name, pid, start_ticks, self.pos,
                time.time_ns(),
            )  # fmt: skip
        self._entry = None if claimed is None else claimed[1]
        self._bit = -1 if claimed is None or claimed[0] >= SLEEPER_BITS else claimed[0]
        if self._entry is None:
            log.warning(
                "ring readers table full; reading unlisted",
                extra={"ring": self.ring, "reader": self.name, "max": self.layout.max_readers},
            )

    def _unregister(self) -> None:
        bell, self._bell = self._bell, None
        if bell is not None:
            if self._bit >= 0:
                bell.clear(self._bit)  # (it is clear unless a signal handler raised mid-sleep)
            bell.close()
        self._bit = -1
        if self._entry is not None:
            self._entry[E_PID] = 0

    def _on_idle(self) -> np.ndarray:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            self.check_writer()
        return self._empty

    def check_writer(self) -> bool:
        """Look for a closed or replaced writer; resync to a new segment. True if resynced.
        ``poll`` calls this by itself when idle; call it directly to force a check."""
        if self._seg is None:
            raise RingError(f"reader {self.name!r} of ring {self.ring!r} is closed")
        if self._hdr[W_CURSOR] != self.pos:
            return False  # drain this segment first: its records are still valid and unread
        ino = shm.current_inode(self.ring)
        if ino is None or ino == self._seg.inode:
            self.writer_closed = bool(self._hdr[W_CLOSED])
            return False
        try:
            seg, layout, symbols = _open_ring(self.ring)
        except RingUntrustedError as exc:
            shm.note_refusal(exc)  # planted under our writer's name: logged once per inode
            return False
        except RingError:
            return False  # being created right now, or gone again: look next time
        if layout.dtype != self.dtype:
            seg.close()
            raise RingLayoutError(
                f"ring {self.ring!r} was restarted with record dtype {layout.dtype}, "
                f"this reader expects {self.dtype}"
            )
        self._unregister()
        self._release()
        old, self._seg = self._seg, seg
        old.close()
        self._bind(seg.buf, layout, "oldest")
        self.missed += self.pos  # records of the new generation already overwritten (if any)
        self.symbols = symbols
        self.generation = int(self._hdr[W_GENERATION])
        self.epoch_ns = int(self._hdr[W_EPOCH_NS])
        self.writer_closed = False
        self.resyncs += 1
        self._register()
        if self._entry is not None:
            self._entry[E_MISSED] = self.missed
        log.info(
            "ring reader resynced",
            extra={"ring": self.ring, "reader": self.name, "generation": self.generation},
        )
        return True

    def wait(
        self,
        timeout_s: float | None = None,
        *,
        spin: bool = False,
        spin_s: float | None = None,
        max_sleep_s: float | None = None,
    ) -> bool:
        """Wait until a record is available (True) or ``timeout_s`` passes (False).

        Idles by the reader's :class:`IdlePolicy` (``attach(..., idle=...)``): spin briefly,
        then sleep until the writer's next publish wakes it (a futex on the cursor, see
        :mod:`pipeline.ipc.wake`; each sleep is at most ``check_interval_s``, so a closed,
        replaced or dead writer is still noticed). Without wake-ups (the extension not built,
        a writer without them, a reader beyond the first 64 entries) it naps instead, doubling
        up to a cap that grows once the reader has been idle a while, with the thread's timer
        slack at 1 ns. The idle period spans consecutive timed-out waits, so a consumer looping
        on ``wait(0.05)`` still relaxes. ``spin=True`` spins forever (lowest latency, burns a
        core); ``spin_s`` / ``max_sleep_s`` override the policy's spin time / both nap caps for
        this call (the pre-policy interface; ``max_sleep_s`` also means naps, not the futex).
        """
        if self._hdr[W_CURSOR] != self.pos:
            self._idle_since = None
            return True
        shm.set_timer_slack_ns(1)
        policy = self.idle
        if max_sleep_s is not None and max_sleep_s <= 0:
            spin = True  # no naps at all
        elif spin_s is not None or max_sleep_s is not None:
            cap = policy.max_sleep_s if max_sleep_s is None else max_sleep_s
            policy = IdlePolicy(
                spin_s=policy.spin_s if spin_s is None else spin_s,
                first_nap_s=min(policy.first_nap_s, cap) or cap, max_sleep_s=cap,
                relax_after_s=policy.relax_after_s,
                relaxed_max_sleep_s=cap if max_sleep_s is not None else policy.relaxed_max_sleep_s,
                futex=policy.futex and max_sleep_s is None,
            )  # fmt: skip
        now = time.perf_counter
        t0 = now()
        since = self._idle_since
        nap = self._last_nap  # the idle period (and its nap doubling) goes on across waits
        if since is None:
            since = self._idle_since = t0
            nap = 0.0
        deadline = None if timeout_s is None else t0 + timeout_s
        hdr = self._hdr
        while True:
            if hdr[W_CURSOR] != self.pos:
                self._idle_since = None
                return True
            t = now()
            if deadline is not None and t >= deadline:
                self._last_nap = nap
                return False
            self._on_idle()  # rate-limited check for a restarted writer (may resync)
            hdr = self._hdr
            if hdr[W_CURSOR] != self.pos:
                self._idle_since = None
                return True
            if spin:
                continue
            if (policy.futex and self._bit >= 0 and t - since >= policy.spin_s
                    and hdr[W_WAKEUPS] and self._bell is not None):  # fmt: skip
                left = self._check_interval if deadline is None else deadline - t
                self.sleeps += 1
                if not self._bell.sleep(self._bit, self.pos, min(left, self._check_interval)):
                    self.woken += 1
                    if hdr[W_CURSOR] == self.pos and hdr[W_CLOSED]:
                        self.check_writer()  # woken by a closing writer: resync or note it
                        hdr = self._hdr
                continue
            nap = next_nap(policy, t - since, nap)
            if nap:
                time.sleep(nap if deadline is None else max(0.0, min(nap, deadline - t)))

    def poll_blocking(
        self, timeout_s: float | None = None, max_records: int | None = None, *, spin: bool = False
    ) -> np.ndarray:
        """``wait`` then ``poll``: the records available within ``timeout_s`` (maybe none)."""
        if self.wait(timeout_s, spin=spin):
            return self.poll(max_records)
        return self._empty

    def close(self) -> None:
        seg = self._seg
        if seg is None:
            return
        self._unregister()
        self._release()
        self._seg = None
        seg.close()

    def __repr__(self) -> str:
        return (
            f"RingReader({self.ring!r}, name={self.name!r}, pos={self.pos}, missed={self.missed})"
        )


def _open_ring(ring: str) -> tuple[shm.Segment, RingLayout, list[str]]:
    try:
        seg = shm.Segment.open(ring)
    except FileNotFoundError:
        raise RingNotFoundError(
            f"ring {ring!r} not found ({shm.SHM_DIR}/{ring} missing): is the writer running?"
        ) from None
    except shm.UntrustedSegmentError as exc:
        raise _untrusted(exc) from exc
    except OSError as exc:
        raise RingLayoutError(f"ring {ring!r} cannot be opened: {exc}") from exc
    try:
        layout, symbols = parse_header(seg.buf, ring)
    except BaseException:
        seg.close()
        raise
    return seg, layout, symbols


def ring_stats(ring: str) -> dict[str, Any]:
    """Writer and per-reader state of a ring (reaping entries of dead readers first).

    Keys: name, generation, epoch_ns, writer_pid, writer_alive, closed, cursor, capacity,
    record_size, dtype, symbols, readers (list of {name, pid, cursor, lag, missed, attached_ns}),
    sleeping (readers asleep on the cursor futex now), wakeups (the writer wakes them).
    """
    seg, layout, symbols = _open_ring(ring)
    try:
        hdr = seg.buf[:FIXED_HEADER_BYTES].cast("q")
        bell = wake.doorbell(hdr, W_CURSOR, W_SLEEPERS)
        with seg.locked():
            reap_readers(seg.buf, layout.max_readers, shm.pid_alive,
                         bell.clear if bell is not None else None)
        if bell is not None:
            bell.close()
        cursor = int(hdr[W_CURSOR])
        readers = list_readers(seg.buf, layout.max_readers)
        for r in readers:
            r["lag"] = cursor - r["cursor"]
            del r["start_ticks"]
        out = {
            "name": ring,
            "generation": int(hdr[W_GENERATION]),
            "epoch_ns": int(hdr[W_EPOCH_NS]),
            "writer_pid": int(hdr[W_WRITER_PID]),
            "writer_alive": not hdr[W_CLOSED]
            and shm.pid_alive(int(hdr[W_WRITER_PID]), int(hdr[W_WRITER_START])),
            "closed": bool(hdr[W_CLOSED]),
            "cursor": cursor,
            "capacity": layout.capacity,
            "record_size": layout.record_size,
            "dtype": str(layout.dtype),
            "symbols": len(symbols),
            "readers": readers,
            "sleeping": bin(int(hdr[W_SLEEPERS]) & (1 << 64) - 1).count("1"),
            "wakeups": bool(hdr[W_WAKEUPS]),
        }
        hdr.release()
        return out
    finally:
        seg.close()


def list_rings(prefix: str = "") -> list[str]:
    """Names of ring segments in /dev/shm starting with ``prefix`` (checked by magic)."""
    out = []
    for n in shm.list_names(prefix):
        head = shm.read_head(n, 8)
        if head == MAGIC:
            out.append(n)
    return out
