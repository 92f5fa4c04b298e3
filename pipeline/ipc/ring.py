"""Lock-free single-producer / multi-consumer record ring in shared memory.

One writer (ingest) publishes fixed-size records (a numpy structured dtype, normally
:data:`pipeline.ipc.records.TICK_DTYPE`); any number of readers in any processes attach by name at
any time and each reads every record from where it attached, at its own pace. The writer never waits
for, locks against or even knows about readers: a reader more than ``capacity`` records behind is
jumped forward and told exactly how many records it lost (``missed``), like an Aeron broadcast
receiver counting laps. Nothing is lost silently and nothing is delivered twice.

Slot protocol (sequence ``s`` lives in slot ``s & (capacity - 1)``)::

    writer:  intent = s + n        (announces that slots of sequences < s + n - capacity die)
             copy record bytes     (one slice assignment per contiguous run)
             seqs[slot] = s ...    (per-slot sequence stamps)
             cursor = s + n        (publishes: everything below cursor is in place)
    reader:  c = cursor; copy [pos, c) (at most ``capacity``); i = intent
             records with sequence < i - capacity may have been overwritten during the copy:
             drop them and count them as missed (copy, then re-validate)

The per-slot stamps let a reader (``verify=True``) prove each delivered slot holds the sequence it
expected, i.e. tell a torn or overwritten slot from a good one independently of the intent check.
Ordering relies on the x86-64 memory model (stores are not reordered with stores, loads not with
loads) and on aligned 8-byte stores being atomic; CPython performs the steps above in program
order through opaque C calls.

Batching: ``stage(record)`` writes a record into its slot by the same protocol (intent first,
then bytes and seq stamp) but leaves the cursor alone; ``commit(stamp)`` stores the cursor once
for everything staged and can write a trailing timestamp field (``publish_time_ns``) at that
moment. Ingest stages the records of one event-loop iteration this way (~0.55 us per record
instead of ~0.9 us for a publish). The number staged is kept in the header, not in the writer
object: ``intent == cursor + staged`` at all times, which is what lets a compiled fast path
stage into the same batch given only buffers and integers (:meth:`WriterCore.fast_path_view`).

This module is the pure core that moves records through a ring: :class:`WriterCore`,
:class:`ReaderCore`, :func:`plan_read` and :func:`valid_after_copy`, over any writable buffer (a
``bytearray`` in unit tests). Where things live in that buffer is :mod:`pipeline.ipc.layout`; how
an idle reader waits is :mod:`pipeline.ipc.idle`; the shared-memory shells (:class:`RingWriter` /
:class:`RingReader`: the segment, the readers table, writer restarts, idle waiting, ``ring_stats``)
are :mod:`pipeline.ipc.segments`. Their names are re-exported here (the shells' on first use, so
importing the core maps nothing and touches no file) and ``from pipeline.ipc.ring import
RingReader`` keeps working.
"""

from __future__ import annotations

import importlib
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from pipeline.ipc import wake
from pipeline.ipc.idle import IDLE_PROFILES, IdlePolicy, idle_policy, nap_schedule, next_nap
from pipeline.ipc.layout import (
    CACHE_LINE,
    E_ATTACH_NS,
    E_CURSOR,
    E_MISSED,
    E_NAME_OFF,
    E_PID,
    E_START,
    ENTRY_BYTES,
    FIXED_HEADER_BYTES,
    LAYOUT_VERSION,
    MAGIC,
    MAGIC_WORD,
    MAX_READERS,
    READER_NAME_BYTES,
    READERS_OFF,
    W_CAPACITY,
    W_CLOSED,
    W_CURSOR,
    W_DATA_OFF,
    W_DTYPE_LEN,
    W_DTYPE_OFF,
    W_EPOCH_NS,
    W_GENERATION,
    W_HEADER_BYTES,
    W_INTENT,
    W_MAGIC,
    W_READERS_MAX,
    W_READERS_OFF,
    W_RECORD_SIZE,
    W_SEQS_OFF,
    W_SLEEPERS,
    W_SYMBOLS_LEN,
    W_SYMBOLS_OFF,
    W_TOTAL_SIZE,
    W_VERSION,
    W_WAKEUPS,
    W_WRITER_PID,
    W_WRITER_START,
    RingError,
    RingExistsError,
    RingLayout,
    RingLayoutError,
    RingNotFoundError,
    claim_entry,
    dtype_from_json,
    dtype_to_json,
    format_header,
    list_readers,
    parse_header,
    reap_readers,
    struct_for,
)

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ below imports them on first use
    from pipeline.ipc.segments import (
        RingReader,
        RingUntrustedError,
        RingWriter,
        list_rings,
        ring_stats,
    )

__all__ = [
    "CACHE_LINE", "ENTRY_BYTES", "E_ATTACH_NS", "E_CURSOR", "E_MISSED", "E_NAME_OFF", "E_PID",
    "E_START", "FIXED_HEADER_BYTES", "IDLE_PROFILES", "LAYOUT_VERSION", "MAGIC", "MAGIC_WORD",
    "MAX_READERS", "READERS_OFF", "READER_NAME_BYTES", "W_CAPACITY", "W_CLOSED", "W_CURSOR",
    "W_DATA_OFF", "W_DTYPE_LEN", "W_DTYPE_OFF", "W_EPOCH_NS", "W_GENERATION", "W_HEADER_BYTES",
    "W_INTENT", "W_MAGIC", "W_READERS_MAX", "W_READERS_OFF", "W_RECORD_SIZE", "W_SEQS_OFF",
    "W_SYMBOLS_LEN", "W_SYMBOLS_OFF", "W_TOTAL_SIZE", "W_VERSION", "W_WRITER_PID",
    "W_WRITER_START", "FastPathView", "IdlePolicy", "ReaderCore", "RingError", "RingExistsError",
    "RingLayout",
    "RingLayoutError", "RingNotFoundError", "RingReader", "RingUntrustedError", "RingWriter",
    "WriterCore", "claim_entry", "dtype_from_json", "dtype_to_json", "format_header",
    "idle_policy", "list_readers", "list_rings", "nap_schedule", "next_nap", "parse_header",
    "plan_read", "reap_readers", "ring_stats", "struct_for", "valid_after_copy",
]  # fmt: skip

#: the shared-memory shells, re-exported from :mod:`pipeline.ipc.segments` on first use
_SHELLS = frozenset({"RingReader", "RingWriter", "RingUntrustedError", "list_rings", "ring_stats"})


def __getattr__(name: str) -> Any:
    """Import a shell from :mod:`pipeline.ipc.segments` when first asked for. Why lazily: the
    shells import this module (they are built on its cores), so an eager import here would be a
    cycle; and code that only needs the cores should not load the shared-memory side."""
    if name not in _SHELLS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("pipeline.ipc.segments"), name)
    globals()[name] = value  # later look-ups are plain module attributes
    return value


# --- pure read arithmetic ---------------------------------------------------------------------


def plan_read(
    pos: int, cursor: int, capacity: int, max_records: int | None
) -> tuple[int, int, int]:
    """Which records to copy: returns ``(start, count, lapped)``.

    ``lapped`` records (``pos <= seq < start``) were already overwritten before the read began;
    ``count`` records from ``start`` are to be copied (at most ``max_records`` and ``capacity``).
    """
    if cursor < pos:
        raise RingError(f"write cursor {cursor} is behind the read position {pos}: corrupt ring")
    start = pos
    lapped = 0
    if cursor - pos > capacity:
        start = cursor - capacity
        lapped = start - pos
    count = cursor - start
    if max_records is not None and count > max_records:
        count = max_records
    return start, count, lapped


def valid_after_copy(start: int, count: int, intent: int, capacity: int) -> int:
    """How many of ``count`` records copied from ``start`` may have been overwritten during the
    copy, given the writer's ``intent`` read *after* the copy: those are the leading ones with
    sequence < intent - capacity. Returns the number to drop from the front."""
    oldest_intact = intent - capacity
    if start >= oldest_intact:
        return 0
    return min(count, oldest_intact - start)


# --- writer -----------------------------------------------------------------------------------


_pack_i64 = struct.Struct("<q").pack_into


class _RingEnd:
    """What both ends of a ring take from its memory and layout: the header, seq-stamp and
    record views, and the geometry they index with. One place, so writer and reader cannot
    disagree on where a slot lives."""

    def _map(self, mv: memoryview, layout: RingLayout) -> None:
        self.layout = layout
        self.dtype: np.dtype = layout.dtype
        self.capacity = layout.capacity
        self._mask = layout.capacity - 1
        self._rs = layout.record_size
        self._hdr = mv[:FIXED_HEADER_BYTES].cast("q")
        self._seqs = mv[layout.seqs_off : layout.seqs_off + 8 * layout.capacity].cast("q")
        self._data = mv[layout.data_off : layout.data_off + layout.capacity * self._rs]


class FastPathView(NamedTuple):
    """What a compiled fast path may use of a :class:`WriterCore` to stage records itself: its
    buffers and integers, nothing else (:meth:`WriterCore.fast_path_view`).

    Why a view: a compiled path that read the writer's attributes by name would break silently
    on a Python refactor. Everything it needs is memory and numbers, and the batch state is in
    the ring header, where the writer keeps it too:

    - ``header[cursor_word]`` is the cursor (records committed; only the writer's
      :meth:`~WriterCore.commit` moves it) and ``header[intent_word] - header[cursor_word]``
      the number of records staged, so ``header[intent_word]`` is the sequence ``s`` to stage
      next, in slot ``s & (capacity - 1)``;
    - staging ``s`` (at most ``max_staged`` staged at once): ``header[intent_word] = s + 1``,
      then the record into ``data[slot * record_size:][:record_size]`` (``stamp_offset``: the
      int64 the commit writes, left 0), then ``seqs[slot] = s``: the order
      :meth:`WriterCore.stage` keeps, so a lagging reader never takes a half-written slot.
    """

    data: memoryview  #: the record slots, ``capacity * record_size`` bytes
    seqs: memoryview  #: one int64 sequence stamp per slot
    header: memoryview  #: the ring header as int64 words
    capacity: int  #: slots (a power of two)
    record_size: int  #: bytes per slot
    max_staged: int  #: staged records at which the writer must commit
    stamp_offset: int  #: offset in a record of the field commit() writes; -1: none
    cursor_word: int  #: header word of the cursor
    intent_word: int  #: header word of the intent (cursor + staged)
    sleepers_word: int  #: header word of the sleeping readers' bits (see pipeline/ipc/wake.py)


class WriterCore(_RingEnd):
    """Publishes records into a formatted ring buffer. Single producer: one WriterCore per ring.

    Calling contract: ``publish(record)`` or ``publish_many(array)`` any number of times; each
    returns immediately; ``cursor`` is the number of records published so far.

    Batching without building an array: ``stage(record)`` any number of times (each writes the
    record into its slot, unpublished), then ``commit(stamp)`` publishes them all at once (one
    cursor store; the stamp field, see :meth:`configure_staging`, written at commit). ``publish``
    and ``publish_many`` commit staged records first, so the order is always the call order.

    The number staged is not kept in this object but in the ring header: the intent word is
    always ``cursor + staged`` (every write announces itself there first). So a compiled path
    given :meth:`fast_path_view` stages into the same batch without reaching into this object,
    and ``staged`` / :meth:`commit` see its records.
    """

    def __init__(self, buf: memoryview | bytearray, layout: RingLayout) -> None:
        self._bind(memoryview(buf), layout)

    def _bind(self, mv: memoryview, layout: RingLayout) -> None:
        self._map(mv, layout)
        self._seqs_np: np.ndarray | None = np.frombuffer(self._seqs, dtype=np.int64)
        self._data_np: np.ndarray | None = np.frombuffer(self._data, dtype=np.uint8)
        self._iota = np.arange(0, dtype=np.int64)
        st = struct_for(self.dtype)
        self._pack_into = st.pack_into if st is not None else None
        #: the cursor as this object last stored or read it back: a compiled path publishing
        #: through :meth:`fast_path_view` moves the header's, so every method that trusts this
        #: one first checks it against the intent (equal only when nothing is staged and nobody
        #: else published), and :meth:`commit` re-reads it
        self._cursor = int(self._hdr[W_CURSOR])
        #: the futex doorbell (None: the extension is not built): stores the cursor and wakes
        #: sleeping readers, only if there are any (one load per publish otherwise)
        self._bell = wake.doorbell(self._hdr, W_CURSOR, W_SLEEPERS)
        self._ring_bell = self._bell.publish if self._bell is not None else None
        self._hdr[W_WAKEUPS] = int(self._bell is not None)
        intent = int(self._hdr[W_INTENT])
        if intent != self._cursor:  # staged by an earlier writer and never committed
            raise RingError(
                f"ring intent {intent} != cursor {self._cursor}: a writer staged records it "
                "never committed; such a ring cannot be resumed, create a new one"
            )
        self.configure_staging(None)

    def configure_staging(self, stamp_field: str | None, max_staged: int = 64) -> None:
        """Set up :meth:`stage` / :meth:`commit`.

        ``stamp_field`` (it must be the dtype's last field, an int64) is left out of the tuples
        given to :meth:`stage` and written by :meth:`commit` with its ``stamp`` argument (e.g.
        ``publish_time_ns``: the time records become visible, not the time they were staged).
        ``max_staged`` bounds a batch: :meth:`stage` returns True once that many records wait,
        and never holds more than ``capacity`` (it commits by itself at that point).
        """
        if self.staged:
            self.commit(0)
        names = self.dtype.names
        if max_staged < 1:
            raise ValueError(f"max_staged must be >= 1, got {max_staged}")
        if stamp_field is None:
            self._stage_pack = self._pack_into  # None for an unpackable dtype: stage() refuses
            self._stamp_off = -1
        else:
            if names is None or names[-1] != stamp_field:
                raise ValueError(
                    f"stamp field {stamp_field!r} must be the last field of {self.dtype}"
                )
            fdt, off = self.dtype.fields[stamp_field][:2]  # type: ignore[index]
            if fdt != np.dtype("<i8"):
                raise ValueError(f"stamp field {stamp_field!r} must be <i8, not {fdt}")
            st = struct_for(self.dtype, len(names) - 1)
            if st is None:
                raise ValueError(f"records of dtype {self.dtype} cannot be staged (not packable)")
            self._stage_pack = st.pack_into
            self._stamp_off = int(off)
        self.max_staged = min(max_staged, self.capacity)
        #: the sequence whose staging fills the batch: kept by commit(); publish() leaves it
        #: behind (it only ever errs low, and stage() then corrects it)
        self._batch_full_seq = self._cursor + self.max_staged - 1

    @property
    def staged(self) -> int:
        """Records staged but not yet committed (invisible to readers), by this object or by a
        fast path given :meth:`fast_path_view`."""
        return int(self._hdr[W_INTENT]) - int(self._hdr[W_CURSOR])

    def fast_path_view(self) -> FastPathView:
        """The buffers and geometry a compiled path needs to stage records into this writer's
        batch (see :class:`FastPathView` for the protocol). The view's memoryviews hold the
        ring's memory: whoever takes buffers from them must release them before the writer
        closes."""
        return FastPathView(
            data=self._data, seqs=self._seqs, header=self._hdr, capacity=self.capacity,
            record_size=self._rs, max_staged=self.max_staged, stamp_offset=self._stamp_off,
            cursor_word=W_CURSOR, intent_word=W_INTENT, sleepers_word=W_SLEEPERS,
        )  # fmt: skip

    def stage(self, record: tuple[Any, ...]) -> bool:
        """Write a record (a tuple of the fields, minus the stamp field if one is configured)
        into the next free slot without publishing it; :meth:`commit` publishes every staged
        record with one cursor store. Returns True when ``max_staged`` records are waiting:
        commit now. The slot is announced (``intent``) before it is written, as in
        :meth:`publish`, so a lagging reader still never takes a half-written slot for a good
        one; until the commit, readers see nothing of it.

        Why: per record this costs the pack alone (no tuple rebuilt to append a timestamp, no
        clock read, no cursor store), about half of :meth:`publish`.
        """
        pack = self._stage_pack
        if pack is None:
            raise TypeError(f"records of dtype {self.dtype} cannot be staged (not packable)")
        hdr = self._hdr
        s = hdr[W_INTENT]  # cursor + staged: the next sequence to stage
        i = s & self._mask
        hdr[W_INTENT] = s + 1
        pack(self._data, i * self._rs, *record)
        self._seqs[i] = s
        if s >= self._batch_full_seq:  # perhaps max_staged are waiting (one compare: hot path)
            c = self._cursor = hdr[W_CURSOR]  # (a compiled path may have published since)
            n = s + 1 - c
            if n >= self.max_staged:
                if n >= self.capacity:
                    self.commit(time.time_ns() if self._stamp_off >= 0 else 0)
                return True
            self._batch_full_seq = c + self.max_staged - 1  # publish() moved on
        return False

    def commit(self, stamp: int = 0) -> int:
        """Publish every staged record (writing ``stamp`` into the stamp field, if configured).
        Returns how many were published."""
        hdr = self._hdr
        s = self._cursor = hdr[W_CURSOR]  # a compiled path may have published since
        n = hdr[W_INTENT] - s
        if not n:
            return 0
        off = self._stamp_off
        if off >= 0:
            rs = self._rs
            i = s & self._mask
            data = self._data
            if n <= 8 or rs % 8 or off % 8:
                pack = _pack_i64
                mask = self._mask
                for k in range(n):
                    pack(data, ((s + k) & mask) * rs + off, stamp)
            else:  # strided int64 view of the stamp field: one assignment per contiguous run
                assert self._data_np is not None, "ring writer is closed"
                q = self._data_np.view(np.int64)
                r8, o8 = rs // 8, off // 8
                first = min(n, self.capacity - i)
                q[i * r8 + o8 : (i + first) * r8 : r8] = stamp
                if n > first:
                    q[o8 : (n - first) * r8 : r8] = stamp
        bell = self._ring_bell
        if bell is None:
            hdr[W_CURSOR] = s + n
        else:
            bell(s + n)
        self._cursor = s + n
        self._batch_full_seq = s + n + self.max_staged - 1
        return n

    @property
    def cursor(self) -> int:
        """Records published so far (the next record's sequence number)."""
        return int(self._hdr[W_CURSOR])

    def publish(self, record: Any) -> int:
        """Publish one record: a tuple of its fields (fastest: packed straight into the slot), a
        numpy void of the ring dtype, or raw bytes of the record size. Returns its sequence
        number. A record that fails to pack raises, and readers never see it."""
        hdr = self._hdr
        s = self._cursor
        if hdr[W_INTENT] != s:  # records are staged (here or by a fast path): they go first
            self.commit(time.time_ns() if self._stamp_off >= 0 else 0)
            s = self._cursor
        after = s + 1
        i = s & self._mask
        pack = self._pack_into
        if pack is not None and type(record) is tuple:
            hdr[W_INTENT] = after
            pack(self._data, i * self._rs, *record)
        else:
            raw = self._raw(record)
            off = i * self._rs
            hdr[W_INTENT] = after
            self._data[off : off + self._rs] = raw
        self._seqs[i] = s
        bell = self._ring_bell
        if bell is None:
            hdr[W_CURSOR] = after
        else:
            bell(after)
        self._cursor = after
        return s

    def _raw(self, record: Any) -> Any:
        """The bytes of a record that is not a packable tuple (checked against the dtype)."""
        if isinstance(record, np.void):
            if record.dtype is not self.dtype and record.dtype != self.dtype:
                raise TypeError(f"record dtype {record.dtype} is not the ring dtype {self.dtype}")
            return record.tobytes()
        if isinstance(record, tuple):
            return np.array(record, dtype=self.dtype).tobytes()
        if len(record) != self._rs:
            raise ValueError(f"raw record of {len(record)} bytes, ring records are {self._rs}")
        return record

    def publish_many(self, records: np.ndarray) -> int:
        """Publish a batch (structured array of the ring dtype) with one copy per contiguous run.
        Returns the sequence number of the first record. A batch larger than the capacity keeps
        only its last ``capacity`` records (readers count the rest as missed)."""
        if self._hdr[W_INTENT] != self._cursor:
            self.commit(time.time_ns() if self._stamp_off >= 0 else 0)
        n = len(records)
        s = self._cursor
        if n == 0:
            return s
        if records.dtype is not self.dtype and records.dtype != self.dtype:
            raise TypeError(f"batch dtype {records.dtype} is not the ring dtype {self.dtype}")
        if records.ndim != 1:
            raise ValueError(f"batch must be one-dimensional, got shape {records.shape}")
        if not records.flags.c_contiguous:
            records = np.ascontiguousarray(records)
        cap = self.capacity
        first_seq = s
        hdr = self._hdr
        hdr[W_INTENT] = s + n
        if n > cap:
            records = records[n - cap :]
            s += n - cap
            n = cap
        if len(self._iota) < n:
            self._iota = np.arange(max(n, 2 * len(self._iota)), dtype=np.int64)
        src = records.view(np.uint8)
        rs = self._rs
        i = s & self._mask
        first = cap - i
        data = self._data_np
        seqs = self._seqs_np
        assert data is not None, "ring writer is closed"
        assert seqs is not None, "ring writer is closed"
        if n <= first:
            data[i * rs : (i + n) * rs] = src
            np.add(self._iota[:n], s, out=seqs[i : i + n])
        else:
            data[i * rs :] = src[: first * rs]
            data[: (n - first) * rs] = src[first * rs :]
            np.add(self._iota[:first], s, out=seqs[i:])
            np.add(self._iota[first:n], s, out=seqs[: n - first])
        bell = self._ring_bell
        if bell is None:
            hdr[W_CURSOR] = s + n
        else:
            bell(s + n)
        self._cursor = s + n
        return first_seq

    def wake_readers(self) -> None:
        """Wake every reader asleep on this ring (a closing writer: they look at once)."""
        if self._bell is not None:
            self._bell.wake()

    @property
    def wakes(self) -> int:
        """Futex wake calls this writer made (0 without the extension): each is a publish that
        found a reader asleep, and costs a system call."""
        return self._bell.wakes if self._bell is not None else 0

    def _release(self) -> None:
        self._seqs_np = None
        self._data_np = None
        bell, self._bell, self._ring_bell = self._bell, None, None
        if bell is not None:
            bell.close()
        for mv in (self._hdr, self._seqs, self._data):
            try:
                mv.release()
            except (BufferError, ValueError):
                pass


# --- reader -----------------------------------------------------------------------------------


class ReaderCore(_RingEnd):
    """Reads a formatted ring from a position on; never writes the ring (only its own entry).

    Calling contract: call ``poll()`` repeatedly; each call returns the records published since
    the last one (a fresh, writable structured array, possibly empty) and adds to ``missed`` any
    records that were overwritten before they could be read. ``pos`` is the next sequence to read.
    """

    _after_copy: Callable[[], None] | None = None  # test hook: runs between copy and re-check
    _retrying = False

    def __init__(
        self,
        buf: memoryview | bytearray,
        layout: RingLayout,
        *,
        start: Literal["head", "oldest"] | int = "head",
        verify: bool = False,
    ) -> None:
        self.missed = 0
        self.verify = verify
        self._entry: memoryview | None = None
        self._bind(memoryview(buf), layout, start)

    def _bind(
        self, mv: memoryview, layout: RingLayout, start: Literal["head", "oldest"] | int
    ) -> None:
        self._map(mv, layout)
        self._empty = np.empty(0, dtype=self.dtype)
        self._empty.flags.writeable = False
        cursor = int(self._hdr[W_CURSOR])
        if start == "head":
            self.pos = cursor
        elif start == "oldest":
            self.pos = max(0, cursor - self.capacity)
        else:
            self.pos = int(start)

    @property
    def lag(self) -> int:
        """Records published but not yet read (can exceed capacity: those will count as missed)."""
        return int(self._hdr[W_CURSOR]) - self.pos

    @property
    def writer_cursor(self) -> int:
        return int(self._hdr[W_CURSOR])

    def poll(self, max_records: int | None = None) -> np.ndarray:
        """Records published since the last poll, oldest first (at most ``max_records``).

        Records overwritten before or during the copy are counted in ``missed``, never returned.
        Empty means caught up (``lag == 0``), or, rarely, a writer lapping this reader during
        two copies in a row: poll again.
        """
        hdr = self._hdr
        cursor = hdr[W_CURSOR]
        pos = self.pos
        if cursor == pos:
            return self._on_idle()
        cap = self.capacity
        avail = cursor - pos
        if avail > cap or avail < 0 or (max_records is not None and avail > max_records):
            start, count, lapped = plan_read(pos, cursor, cap, max_records)
        else:  # the common case of plan_read, inlined: it is the hot path
            start, count, lapped = pos, avail, 0
        rs = self._rs
        i = start & self._mask
        end = i + count
        data = self._data
        if end <= cap:
            raw = bytearray(data[i * rs : end * rs])
            seqs = self._seqs[i:end].tolist() if self.verify else None
        else:
            raw = bytearray(data[i * rs :])
            raw += data[: (end - cap) * rs]
            seqs = (
                self._seqs[i:].tolist() + self._seqs[: end - cap].tolist() if self.verify else None
            )
        if self._after_copy is not None:
            self._after_copy()
        intent = hdr[W_INTENT]
        self.pos = start + count
        entry = self._entry
        if entry is not None:
            entry[E_CURSOR] = start + count
        if lapped or start < intent - cap:
            drop = valid_after_copy(start, count, intent, cap)
            self.missed += lapped + drop
            if entry is not None:
                entry[E_MISSED] = self.missed
        else:
            drop = 0
        if seqs is not None:
            self._verify(seqs, start, count, drop)
        if drop:
            if drop == count:  # all of it was overwritten while copying: read what is there now
                if self._retrying:  # (once: a writer lapping every copy must not recurse)
                    return self._empty
                self._retrying = True
                try:
                    return self.poll(max_records)
                finally:
                    self._retrying = False
            return np.frombuffer(raw, self.dtype, -1, drop * rs)
        return np.frombuffer(raw, self.dtype)

    @staticmethod
    def _verify(seqs: list[int], start: int, count: int, drop: int) -> None:
        expect = list(range(start + drop, start + count))
        if seqs[drop:] != expect:
            bad = next(
                k for k, (a, b) in enumerate(zip(seqs[drop:], expect, strict=True)) if a != b
            )
            raise RingError(
                f"slot for sequence {expect[bad]} holds sequence {seqs[drop + bad]}: "
                "a second writer, or a corrupt ring"
            )

    def _on_idle(self) -> np.ndarray:
        return self._empty

    def _release(self) -> None:
        for mv in (self._hdr, self._seqs, self._data, self._entry):
            if mv is not None:
                try:
                    mv.release()
                except (BufferError, ValueError):
                    pass
        self._entry = None
