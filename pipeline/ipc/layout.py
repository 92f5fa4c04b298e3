"""The ring's format in memory: where every header word, reader entry, seq stamp and record lives.

One module owns the format so that the writer, the readers, ``pipeline ring stats`` and the
runner's stale-segment cleanup cannot disagree about it. Pure: everything here works over any
buffer (a ``bytearray`` in unit tests); the shared-memory side is :mod:`pipeline.ipc.segments`.

Layout (all integers are native little-endian int64 at 8-byte aligned offsets)::

    line 0   magic, layout version, header bytes, record size, capacity (power of two),
             writer pid, writer start ticks, generation
    line 1   write cursor, write intent         <- written only by the writer
             sleepers (bit k: reader entry k is asleep on the cursor futex; set and cleared by
             that reader, cleared by whoever reaps its entry), wake-ups (1: the writer wakes
             sleepers on every publish, see pipeline/ipc/wake.py)
    line 2   closed flag, epoch (creation time ns), dtype/symbols/readers table offsets
    line 3   seq array and data offsets, total size
    readers  MAX_READERS entries of one cache line each: pid, start ticks, cursor, missed,
             attach time ns, name (24 bytes utf-8); each written only by its reader
    dtype    JSON of ``numpy.lib.format.dtype_to_descr(dtype)``
    symbols  JSON list of symbol names (record ``symbol`` field = index into it)
    seqs     capacity x int64: the sequence number each slot holds
    data     capacity x record size, contiguous, so a batch is one memcpy (two when it wraps)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.ipc.header import HeaderFormat

MAGIC = b"PLRING\x00\x01"
MAGIC_WORD = int.from_bytes(MAGIC, "little")
#: 2: the sleepers and wake-ups words (a reader of version 1 would nap, never be woken; a
#: version 2 reader of a version 1 writer would sleep waiting for wake-ups that never come)
LAYOUT_VERSION = 2
CACHE_LINE = 64
MAX_READERS = 16
READER_NAME_BYTES = 24

# header word indexes (int64)
W_MAGIC, W_VERSION, W_HEADER_BYTES, W_RECORD_SIZE, W_CAPACITY = 0, 1, 2, 3, 4
W_WRITER_PID, W_WRITER_START, W_GENERATION = 5, 6, 7
W_CURSOR, W_INTENT = 8, 9  # line 1: the writer's line
W_SLEEPERS, W_WAKEUPS = 10, 11  # line 1 too: the writer reads them with the cursor it stores
#: reader entries that may sleep on the futex (one bit each of W_SLEEPERS); later ones nap
SLEEPER_BITS = 64
W_CLOSED, W_EPOCH_NS, W_DTYPE_OFF, W_DTYPE_LEN = 16, 17, 18, 19
W_SYMBOLS_OFF, W_SYMBOLS_LEN, W_READERS_OFF, W_READERS_MAX = 20, 21, 22, 23
W_SEQS_OFF, W_DATA_OFF, W_TOTAL_SIZE = 24, 25, 26
FIXED_HEADER_BYTES = 4 * CACHE_LINE
READERS_OFF = FIXED_HEADER_BYTES

# reader entry word indexes (int64); name bytes after E_NAME_OFF
E_PID, E_START, E_CURSOR, E_MISSED, E_ATTACH_NS = 0, 1, 2, 3, 4
E_NAME_OFF = 40
ENTRY_BYTES = CACHE_LINE

#: magic, version and writer words as every reader of a ring segment checks them
RING_HEADER = HeaderFormat(
    "ring", MAGIC, LAYOUT_VERSION, W_WRITER_PID, W_WRITER_START, version_name="layout version",
    magic_hint="; still being created, or something else uses that name",
    version_hint=": restart the writer or upgrade the reader",
)  # fmt: skip


class RingError(Exception):
    """Base class of every ring error."""


class RingNotFoundError(RingError, FileNotFoundError):
    """No segment of that name: the writer has not started (or has closed)."""


class RingLayoutError(RingError):
    """The segment is not a ring of a layout this code understands (foreign, or another version)."""


class RingExistsError(RingError, FileExistsError):
    """A live writer already owns a ring of that name."""


def align(n: int, to: int = CACHE_LINE) -> int:
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
        dtype_off = align(READERS_OFF + max_readers * ENTRY_BYTES)
        symbols_off = align(dtype_off + len(dtype_json))
        seqs_off = align(symbols_off + len(symbols_json))
        data_off = align(seqs_off + 8 * capacity)
        total = align(data_off + capacity * dt.itemsize, 4096)
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
    hdr[W_SLEEPERS] = 0
    hdr[W_WAKEUPS] = 0
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
        problem = RING_HEADER.problem(hdr, name)
        if problem is not None:
            raise RingLayoutError(problem)
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


# --- readers table ----------------------------------------------------------------------------


def _entries(mv: memoryview, layout_max: int) -> list[memoryview]:
    return [
        mv[READERS_OFF + k * ENTRY_BYTES : READERS_OFF + (k + 1) * ENTRY_BYTES]
        for k in range(layout_max)
    ]


def _entry_name(raw: memoryview) -> str:
    return bytes(raw[E_NAME_OFF:ENTRY_BYTES]).rstrip(b"\x00").decode("utf-8", "replace")


def reap_readers(
    mv: memoryview,
    max_readers: int,
    alive: Callable[[int, int], bool],
    clear_sleeper: Callable[[int], None] | None = None,
) -> int:
    """Free the entries of readers whose process is gone. Caller holds the readers lock.

    ``clear_sleeper(k)`` clears entry ``k``'s bit of the sleepers word (atomically: live
    readers set and clear theirs concurrently) before the entry is freed: a reader killed while
    asleep must not leave the writer waking nobody on every publish, nor its bit to the next
    reader of that entry."""
    reaped = 0
    for k, raw in enumerate(_entries(mv, max_readers)):
        words = raw[:E_NAME_OFF].cast("q")
        pid = words[E_PID]
        if pid and not alive(pid, words[E_START]):
            if clear_sleeper is not None and k < SLEEPER_BITS:
                clear_sleeper(k)
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
) -> tuple[int, memoryview] | None:
    """Claim a free reader entry (caller holds the readers lock); returns its index and int64
    words, or None when the table is full. The pid goes in last, so a half-filled entry is never
    listed."""
    encoded = name.encode("utf-8")[:READER_NAME_BYTES]
    for k, raw in enumerate(_entries(mv, max_readers)):
        words = raw[:E_NAME_OFF].cast("q")
        if words[E_PID] == 0:
            words[E_START] = start_ticks
            words[E_CURSOR] = cursor
            words[E_MISSED] = 0
            words[E_ATTACH_NS] = now_ns
            raw[E_NAME_OFF:ENTRY_BYTES] = encoded.ljust(READER_NAME_BYTES, b"\x00")
            words[E_PID] = pid
            return k, words
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
