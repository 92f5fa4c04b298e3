"""Lock-free single-producer / multi-consumer record ring in shared memory.

One writer (ingest) publishes fixed-size records (a numpy structured dtype, normally
:data:`pipeline.ipc.records.TICK_DTYPE`); any number of readers in any processes attach by name at
any time and each reads every record from where it attached, at its own pace. The writer never waits
for, locks against or even knows about readers: a reader more than ``capacity`` records behind is
jumped forward and told exactly how many records it lost (``missed``), like an Aeron broadcast
receiver counting laps. Nothing is lost silently and nothing is delivered twice.

Layout (all integers are native little-endian int64 at 8-byte aligned offsets)::

    line 0   magic, layout version, header bytes, record size, capacity (power of two),
             writer pid, writer start ticks, generation
    line 1   write cursor, write intent         <- written only by the writer, nothing else here
    line 2   closed flag, epoch (creation time ns), dtype/symbols/readers table offsets
    line 3   seq array and data offsets, total size
    readers  MAX_READERS entries of one cache line each: pid, start ticks, cursor, missed,
             attach time ns, name (24 bytes utf-8); each written only by its reader
    dtype    JSON of ``numpy.lib.format.dtype_to_descr(dtype)``
    symbols  JSON list of symbol names (record ``symbol`` field = index into it)
    seqs     capacity x int64: the sequence number each slot holds
    data     capacity x record size, contiguous, so a batch is one memcpy (two when it wraps)

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
against ~0.9 us for ``publish`` of a tuple with a fresh clock read).

Idle waiting (:meth:`RingReader.wait`) follows an :class:`IdlePolicy` chosen per reader
(``attach(..., idle="low-latency" | "balanced" | "low-cpu")``): spin, then naps doubling to a
short cap, then to a longer cap once idle for a while; :func:`next_nap` is the schedule as a pure
function.

The pure core (:class:`RingLayout`, :func:`format_header`, :class:`WriterCore`,
:class:`ReaderCore`, :func:`plan_read`, :func:`valid_after_copy`, :func:`next_nap`) works over any
writable buffer (a ``bytearray`` in unit tests); :class:`RingWriter` / :class:`RingReader` add the
shared-memory segment, the readers table, writer restarts and idle waiting.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import numpy as np

from pipeline.ipc import shm

log = logging.getLogger("pipeline.ring")

MAGIC = b"PLRING\x00\x01"
MAGIC_WORD = int.from_bytes(MAGIC, "little")
LAYOUT_VERSION = 1
CACHE_LINE = 64
MAX_READERS = 16
READER_NAME_BYTES = 24

# header word indexes (int64)
W_MAGIC, W_VERSION, W_HEADER_BYTES, W_RECORD_SIZE, W_CAPACITY = 0, 1, 2, 3, 4
W_WRITER_PID, W_WRITER_START, W_GENERATION = 5, 6, 7
W_CURSOR, W_INTENT = 8, 9  # line 1: the writer's line
W_CLOSED, W_EPOCH_NS, W_DTYPE_OFF, W_DTYPE_LEN = 16, 17, 18, 19
W_SYMBOLS_OFF, W_SYMBOLS_LEN, W_READERS_OFF, W_READERS_MAX = 20, 21, 22, 23
W_SEQS_OFF, W_DATA_OFF, W_TOTAL_SIZE = 24, 25, 26
FIXED_HEADER_BYTES = 4 * CACHE_LINE
READERS_OFF = FIXED_HEADER_BYTES

# reader entry word indexes (int64); name bytes after E_NAME_OFF
E_PID, E_START, E_CURSOR, E_MISSED, E_ATTACH_NS = 0, 1, 2, 3, 4
E_NAME_OFF = 40
ENTRY_BYTES = CACHE_LINE


class RingError(Exception):
    """Base class of every ring error."""


class RingNotFoundError(RingError, FileNotFoundError):
    """No segment of that name: the writer has not started (or has closed)."""


class RingLayoutError(RingError):
    """The segment is not a ring of a layout this code understands (foreign, or another version)."""


class RingExistsError(RingError, FileExistsError):
    """A live writer already owns a ring of that name."""


class RingUntrustedError(RingLayoutError, shm.UntrustedSegmentError):
    """The name exists but fails the shared-memory trust rule (a symlink, a FIFO, a file of
    another uid or with group/other bits): refused, never retried by ``attach(wait_s=...)``."""


def _untrusted(exc: shm.UntrustedSegmentError) -> RingUntrustedError:
    return RingUntrustedError(exc.path, exc.reason, exc.inode)


def _align(n: int, to: int = CACHE_LINE) -> int:
    return (n + to - 1) // to * to


def _tuplify(descr: Any) -> Any:
    """JSON turns the tuples of a numpy descr into lists; turn them back."""
    if isinstance(descr, str):
        return descr
    out = []
    for entry in descr:
        name = tuple(entry[0]) if isinstance(entry[0], list) else entry[0]
        fields: list[Any] = [name, _tuplify(entry[1])]
        if len(entry) > 2:
            fields.append(tuple(entry[2]))
        out.append(tuple(fields))
    return out


def dtype_to_json(dtype: np.dtype) -> bytes:
    return json.dumps(np.lib.format.dtype_to_descr(dtype)).encode()


def dtype_from_json(raw: bytes) -> np.dtype:
    return np.lib.format.descr_to_dtype(_tuplify(json.loads(raw)))


_STRUCT_CODES = {
    "b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I",
    "i8": "q", "u8": "Q", "f4": "f", "f8": "d",
}  # fmt: skip


def struct_for(dtype: np.dtype, n_fields: int | None = None) -> struct.Struct | None:
    """A ``struct.Struct`` packing a record tuple straight into its slot bytes (~0.3 us, vs
    ~7 us for numpy's field-by-field row assignment), or None when the dtype has fields struct
    cannot express (subarrays, nested records, big-endian mixes).

    With ``n_fields``, the struct covers only the first ``n_fields`` fields (and stops there: the
    bytes after the last of them are left alone), for :meth:`WriterCore.stage`, which fills the
    trailing stamp field itself."""
    if dtype.names is None:
        return None
    names = dtype.names if n_fields is None else dtype.names[:n_fields]
    parts = ["<"]
    pos = 0
    for name in names:
        fdt, off = dtype.fields[name][:2]  # type: ignore[index]
        if fdt.subdtype is not None or fdt.names is not None or fdt.byteorder == ">":
            return None
        code = _STRUCT_CODES.get(f"{fdt.kind}{fdt.itemsize}")
        if code is None:
            return None
        if off < pos:
            return None
        if off > pos:
            parts.append(f"{off - pos}x")
        parts.append(code)
        pos = off + fdt.itemsize
    if n_fields is not None:
        return struct.Struct("".join(parts))
    if dtype.itemsize > pos:
        parts.append(f"{dtype.itemsize - pos}x")
    st = struct.Struct("".join(parts))
    return st if st.size == dtype.itemsize else None


@dataclass(frozen=True)
class RingLayout:
    """Where everything lives in a ring segment of a given dtype, capacity and symbol table."""

    dtype: np.dtype
    capacity: int
    max_readers: int
    dtype_off: int
    dtype_json: bytes
    symbols_off: int
    symbols_json: bytes
    seqs_off: int
    data_off: int
    total_size: int

    @property
    def record_size(self) -> int:
        return self.dtype.itemsize

    @classmethod
    def compute(
        cls,
        dtype: np.dtype | str | type,
        capacity: int,
        symbols: Sequence[str] = (),
        max_readers: int = MAX_READERS,
    ) -> RingLayout:
        dt = np.dtype(dtype)
        if dt.itemsize <= 0:
            raise ValueError(f"record dtype must have a positive size, got {dt}")
        if dt.hasobject:
            raise ValueError(f"record dtype must not hold Python objects: {dt}")
        if not isinstance(capacity, int) or capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= 2, got {capacity!r}")
        if not 1 <= max_readers <= 4096:
            raise ValueError(f"max_readers must be in 1..4096, got {max_readers}")
        syms = list(symbols)
        for s in syms:
            if not isinstance(s, str):
                raise ValueError(f"symbols must be strings, got {s!r}")
        dtype_json = dtype_to_json(dt)
        symbols_json = json.dumps(syms).encode()
        dtype_off = _align(READERS_OFF + max_readers * ENTRY_BYTES)
        symbols_off = _align(dtype_off + len(dtype_json))
        seqs_off = _align(symbols_off + len(symbols_json))
        data_off = _align(seqs_off + 8 * capacity)
        total = _align(data_off + capacity * dt.itemsize, 4096)
        return cls(
            dt, capacity, max_readers, dtype_off, dtype_json, symbols_off, symbols_json,
            seqs_off, data_off, total,
        )  # fmt: skip


def format_header(
    buf: memoryview | bytearray,
    layout: RingLayout,
    *,
    generation: int = 1,
    writer_pid: int = 0,
    writer_start: int = 0,
    epoch_ns: int = 0,
) -> None:
    """Initialise a zero-filled buffer as an empty ring. The magic goes in last, so a reader
    that maps the segment while it is being created sees "not a ring yet", never half a header."""
    mv = memoryview(buf)
    if len(mv) < layout.total_size:
        raise ValueError(
            f"buffer of {len(mv)} bytes is smaller than the layout ({layout.total_size})"
        )
    hdr = mv[:FIXED_HEADER_BYTES].cast("q")
    hdr[W_MAGIC] = 0
    hdr[W_VERSION] = LAYOUT_VERSION
    hdr[W_HEADER_BYTES] = layout.seqs_off
    hdr[W_RECORD_SIZE] = layout.record_size
    hdr[W_CAPACITY] = layout.capacity
    hdr[W_WRITER_PID] = writer_pid
    hdr[W_WRITER_START] = writer_start
    hdr[W_GENERATION] = generation
    hdr[W_CURSOR] = 0
    hdr[W_INTENT] = 0
    hdr[W_CLOSED] = 0
    hdr[W_EPOCH_NS] = epoch_ns
    hdr[W_DTYPE_OFF] = layout.dtype_off
    hdr[W_DTYPE_LEN] = len(layout.dtype_json)
    hdr[W_SYMBOLS_OFF] = layout.symbols_off
    hdr[W_SYMBOLS_LEN] = len(layout.symbols_json)
    hdr[W_READERS_OFF] = READERS_OFF
    hdr[W_READERS_MAX] = layout.max_readers
    hdr[W_SEQS_OFF] = layout.seqs_off
    hdr[W_DATA_OFF] = layout.data_off
    hdr[W_TOTAL_SIZE] = layout.total_size
    mv[layout.dtype_off : layout.dtype_off + len(layout.dtype_json)] = layout.dtype_json
    mv[layout.symbols_off : layout.symbols_off + len(layout.symbols_json)] = layout.symbols_json
    hdr[W_MAGIC] = MAGIC_WORD
    hdr.release()


def parse_header(
    buf: memoryview | bytearray, name: str = "<buffer>"
) -> tuple[RingLayout, list[str]]:
    """Read and validate a ring header. Raises :class:`RingLayoutError` naming the segment."""
    mv = memoryview(buf)
    if len(mv) < FIXED_HEADER_BYTES:
        raise RingLayoutError(f"shared memory {name!r} is too small ({len(mv)} bytes) to be a ring")
    hdr = mv[:FIXED_HEADER_BYTES].cast("q")
    try:
        if hdr[W_MAGIC] != MAGIC_WORD:
            raise RingLayoutError(
                f"shared memory {name!r} is not a ring (bad magic "
                f"{bytes(mv[:8])!r}; still being created, or something else uses that name)"
            )
        if hdr[W_VERSION] != LAYOUT_VERSION:
            raise RingLayoutError(
                f"ring {name!r} has layout version {hdr[W_VERSION]}, this code reads "
                f"{LAYOUT_VERSION}: restart the writer or upgrade the reader"
            )
        try:
            dtype_off, dtype_len = hdr[W_DTYPE_OFF], hdr[W_DTYPE_LEN]
            sym_off, sym_len = hdr[W_SYMBOLS_OFF], hdr[W_SYMBOLS_LEN]
            dtype = dtype_from_json(bytes(mv[dtype_off : dtype_off + dtype_len]))
            symbols = json.loads(bytes(mv[sym_off : sym_off + sym_len]))
            layout = RingLayout.compute(
                dtype, int(hdr[W_CAPACITY]), symbols, int(hdr[W_READERS_MAX])
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise RingLayoutError(f"ring {name!r} has a corrupt header: {exc}") from exc
        expect = (layout.record_size, layout.seqs_off, layout.data_off, layout.total_size)
        got = (hdr[W_RECORD_SIZE], hdr[W_SEQS_OFF], hdr[W_DATA_OFF], hdr[W_TOTAL_SIZE])
        if expect != got or len(mv) < layout.total_size:
            raise RingLayoutError(
                f"ring {name!r} header is inconsistent (sizes/offsets {got} vs {expect}, "
                f"segment {len(mv)} bytes)"
            )
        return layout, symbols
    finally:
        hdr.release()


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


class WriterCore(_RingEnd):
    """Publishes records into a formatted ring buffer. Single producer: one WriterCore per ring.

    Calling contract: ``publish(record)`` or ``publish_many(array)`` any number of times; each
    returns immediately; ``cursor`` is the number of records published so far.

    Batching without building an array: ``stage(record)`` any number of times (each writes the
    record into its slot, unpublished), then ``commit(stamp)`` publishes them all at once (one
    cursor store; the stamp field, see :meth:`configure_staging`, written at commit). ``publish``
    and ``publish_many`` commit staged records first, so the order is always the call order.
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
        self._cursor = int(self._hdr[W_CURSOR])
        self._staged = 0
        self.configure_staging(None)

    def configure_staging(self, stamp_field: str | None, max_staged: int = 64) -> None:
        """Set up :meth:`stage` / :meth:`commit`.

        ``stamp_field`` (it must be the dtype's last field, an int64) is left out of the tuples
        given to :meth:`stage` and written by :meth:`commit` with its ``stamp`` argument (e.g.
        ``publish_time_ns``: the time records become visible, not the time they were staged).
        ``max_staged`` bounds a batch: :meth:`stage` returns True once that many records wait,
        and never holds more than ``capacity`` (it commits by itself at that point).
        """
        if self._staged:
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

    @property
    def staged(self) -> int:
        """Records staged but not yet committed (invisible to readers)."""
        return self._staged

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
        n = self._staged
        s = self._cursor + n
        i = s & self._mask
        self._hdr[W_INTENT] = s + 1
        pack(self._data, i * self._rs, *record)
        self._seqs[i] = s
        n += 1
        self._staged = n
        if n >= self.max_staged:
            if n >= self.capacity:
                self.commit(time.time_ns() if self._stamp_off >= 0 else 0)
            return True
        return False

    def commit(self, stamp: int = 0) -> int:
        """Publish every staged record (writing ``stamp`` into the stamp field, if configured).
        Returns how many were published."""
        n = self._staged
        if not n:
            return 0
        s = self._cursor
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
        self._staged = 0
        self._hdr[W_CURSOR] = s + n
        self._cursor = s + n
        return n

    @property
    def cursor(self) -> int:
        """Records published so far (the next record's sequence number)."""
        return self._cursor

    def publish(self, record: Any) -> int:
        """Publish one record: a tuple of its fields (fastest: packed straight into the slot), a
        numpy void of the ring dtype, or raw bytes of the record size. Returns its sequence
        number. A record that fails to pack raises, and readers never see it."""
        if self._staged:
            self.commit(time.time_ns() if self._stamp_off >= 0 else 0)
        s = self._cursor
        i = s & self._mask
        hdr = self._hdr
        if type(record) is tuple and self._pack_into is not None:
            hdr[W_INTENT] = s + 1
            self._pack_into(self._data, i * self._rs, *record)
        else:
            raw = self._raw(record)
            off = i * self._rs
            hdr[W_INTENT] = s + 1
            self._data[off : off + self._rs] = raw
        self._seqs[i] = s
        hdr[W_CURSOR] = s + 1
        self._cursor = s + 1
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
        if self._staged:
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
        hdr[W_CURSOR] = s + n
        self._cursor = s + n
        return first_seq

    def _release(self) -> None:
        self._seqs_np = None
        self._data_np = None
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


# --- readers table ----------------------------------------------------------------------------


def _entries(mv: memoryview, layout_max: int) -> list[memoryview]:
    return [
        mv[READERS_OFF + k * ENTRY_BYTES : READERS_OFF + (k + 1) * ENTRY_BYTES]
        for k in range(layout_max)
    ]


def _entry_name(raw: memoryview) -> str:
    return bytes(raw[E_NAME_OFF:ENTRY_BYTES]).rstrip(b"\x00").decode("utf-8", "replace")


def reap_readers(mv: memoryview, max_readers: int, alive: Callable[[int, int], bool]) -> int:
    """Free the entries of readers whose process is gone. Caller holds the readers lock."""
    reaped = 0
    for raw in _entries(mv, max_readers):
        words = raw[:E_NAME_OFF].cast("q")
        pid = words[E_PID]
        if pid and not alive(pid, words[E_START]):
            words[E_PID] = 0
            reaped += 1
        words.release()
    return reaped


def claim_entry(
    mv: memoryview,
    max_readers: int,
    name: str,
    pid: int,
    start_ticks: int,
    cursor: int,
    now_ns: int,
) -> memoryview | None:
    """Claim a free reader entry (caller holds the readers lock); returns its int64 words or None
    when the table is full. The pid goes in last, so a half-filled entry is never listed."""
    encoded = name.encode("utf-8")[:READER_NAME_BYTES]
    for raw in _entries(mv, max_readers):
        words = raw[:E_NAME_OFF].cast("q")
        if words[E_PID] == 0:
            words[E_START] = start_ticks
            words[E_CURSOR] = cursor
            words[E_MISSED] = 0
            words[E_ATTACH_NS] = now_ns
            raw[E_NAME_OFF:ENTRY_BYTES] = encoded.ljust(READER_NAME_BYTES, b"\x00")
            words[E_PID] = pid
            return words
        words.release()
    return None


def list_readers(mv: memoryview, max_readers: int) -> list[dict[str, Any]]:
    out = []
    for raw in _entries(mv, max_readers):
        words = raw[:E_NAME_OFF].cast("q")
        if words[E_PID]:
            out.append(
                {
                    "name": _entry_name(raw),
                    "pid": words[E_PID],
                    "start_ticks": words[E_START],
                    "cursor": words[E_CURSOR],
                    "missed": words[E_MISSED],
                    "attached_ns": words[E_ATTACH_NS],
                }
            )
        words.release()
    return out


# --- idle waiting (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class IdlePolicy:
    """How :meth:`RingReader.wait` spends an idle period: the latency / CPU trade-off.

    Phases, measured from the start of the idle period (the first ``wait`` that found nothing;
    consecutive timed-out waits continue the same period, a wait that finds data ends it):

    1. spin for ``spin_s`` (records arriving then are seen within ~1 us);
    2. nap, starting at ``first_nap_s`` and doubling up to ``max_sleep_s`` until the period is
       ``relax_after_s`` old (a record then waits at most one nap, <= ``max_sleep_s``);
    3. keep doubling up to ``relaxed_max_sleep_s`` (a quiet feed: worst-case wake-up latency is
       one such nap, for much less CPU).

    Each nap is a wake-up costing a few us of CPU (syscall, timer, one Python loop turn; timer
    slack at 1 ns). Measured on an idle ring (benchmarks/bench_ring.py ``test_reader_idle_cpu``,
    2-core VM): ``low-latency`` (200 us cap forever) ~15% of a core, ``balanced`` (200 us for the
    first 10 ms of idleness, then up to 1 ms) ~4.4%, ``low-cpu`` (no spin, 500 us, then up to
    2 ms after 5 ms) ~3%. The price is wake-up latency once idle for a while: up to 1 ms
    (balanced) or 2 ms (low-cpu) for the first record after a quiet spell.

    ``low-latency`` is the default because it is what every reader had before (a trading client
    waiting for an order acknowledgement must not see it up to 1 ms late because the reply ring
    had been quiet); consumers that only watch market data should ask for ``balanced`` or
    ``low-cpu``.
    """

    spin_s: float = 50e-6
    first_nap_s: float = 10e-6
    max_sleep_s: float = 200e-6
    relax_after_s: float = 0.01
    relaxed_max_sleep_s: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("spin_s", "first_nap_s", "max_sleep_s", "relax_after_s",
                     "relaxed_max_sleep_s"):  # fmt: skip
            v = getattr(self, name)
            if not v >= 0 or v == float("inf"):
                raise ValueError(f"IdlePolicy.{name} must be finite and >= 0, got {v!r}")
        if self.first_nap_s <= 0:
            raise ValueError(f"IdlePolicy.first_nap_s must be > 0, got {self.first_nap_s!r}")
        if self.max_sleep_s < self.first_nap_s:
            raise ValueError("IdlePolicy.max_sleep_s must be >= first_nap_s")
        if self.relaxed_max_sleep_s < self.max_sleep_s:
            raise ValueError("IdlePolicy.relaxed_max_sleep_s must be >= max_sleep_s")


IDLE_PROFILES: dict[str, IdlePolicy] = {
    "low-latency": IdlePolicy(relaxed_max_sleep_s=200e-6),
    "balanced": IdlePolicy(),
    "low-cpu": IdlePolicy(spin_s=0.0, first_nap_s=50e-6, max_sleep_s=500e-6, relax_after_s=0.005,
                          relaxed_max_sleep_s=2e-3),
}


def idle_policy(idle: str | IdlePolicy) -> IdlePolicy:
    """A profile by name (see :data:`IDLE_PROFILES`) or an explicit policy."""
    if isinstance(idle, IdlePolicy):
        return idle
    try:
        return IDLE_PROFILES[idle]
    except KeyError:
        raise ValueError(
            f"unknown idle profile {idle!r}; choose one of {', '.join(IDLE_PROFILES)} "
            "or pass an IdlePolicy"
        ) from None


def next_nap(policy: IdlePolicy, idle_s: float, last_nap_s: float) -> float:
    """How long to sleep next (0.0 = keep spinning), ``idle_s`` into an idle period, after a nap
    of ``last_nap_s`` (0.0 before the first nap). Pure: the whole schedule of
    :meth:`RingReader.wait`, testable without clocks."""
    if idle_s < policy.spin_s:
        return 0.0
    cap = policy.max_sleep_s if idle_s < policy.relax_after_s else policy.relaxed_max_sleep_s
    nap = policy.first_nap_s if last_nap_s <= 0.0 else last_nap_s * 2
    return min(nap, cap)


def nap_schedule(policy: IdlePolicy, duration_s: float) -> list[tuple[float, float]]:
    """The ``(idle_s, nap_s)`` naps of an idle period of ``duration_s`` if every nap lasted
    exactly as asked (spinning itself not listed): documentation and tests."""
    out: list[tuple[float, float]] = []
    t = policy.spin_s
    nap = 0.0
    while t < duration_s:
        nap = next_nap(policy, t, nap)
        out.append((t, nap))
        t += nap
    return out


# --- shared-memory shells ---------------------------------------------------------------------


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
        if self._staged:  # staged records are published, not dropped
            self.commit(time.time_ns() if self._stamp_off >= 0 else 0)
        self._seg = None
        self._hdr[W_CLOSED] = 1
        if unlink:
            seg.unlink()
        self._release()
        seg.close()

    def __repr__(self) -> str:
        return f"RingWriter({self.name!r}, cursor={self._cursor}, capacity={self.capacity})"


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
    first = _align(start, mmap.PAGESIZE)
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
        pid, start, gen, closed = (hdr[W_WRITER_PID], hdr[W_WRITER_START], hdr[W_GENERATION],
                                   hdr[W_CLOSED])  # fmt: skip
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
        with seg.locked():
            reap_readers(seg.buf, self.layout.max_readers, shm.pid_alive)
            self._entry = claim_entry(
                seg.buf, self.layout.max_readers, self.name, pid, start_ticks, self.pos,
                time.time_ns(),
            )  # fmt: skip
        if self._entry is None:
            log.warning(
                "ring readers table full; reading unlisted",
                extra={"ring": self.ring, "reader": self.name, "max": self.layout.max_readers},
            )

    def _unregister(self) -> None:
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
        then naps doubling up to a cap that grows once the reader has been idle a while, with
        the thread's timer slack at 1 ns. The idle period spans consecutive timed-out waits, so
        a consumer looping on ``wait(0.05)`` still relaxes. ``spin=True`` spins forever (lowest
        latency, burns a core); ``spin_s`` / ``max_sleep_s`` override the policy's spin time /
        both nap caps for this call (the pre-policy interface).
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
    record_size, dtype, symbols, readers (list of {name, pid, cursor, lag, missed, attached_ns}).
    """
    seg, layout, symbols = _open_ring(ring)
    try:
        with seg.locked():
            reap_readers(seg.buf, layout.max_readers, shm.pid_alive)
        hdr = seg.buf[:FIXED_HEADER_BYTES].cast("q")
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
