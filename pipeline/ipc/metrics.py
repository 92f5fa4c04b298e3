"""Shared-memory metrics blocks: one writer process, any number of readers, consistent snapshots.

A block is a small segment (``/dev/shm/NAME``) holding a fixed set of numeric fields. The owning
process updates them with plain stores under a seqlock (the sequence word is odd while a write is
in progress) and never waits for anyone; ``snapshot()`` in any other process copies the fields
and retries while the sequence was odd or changed during the copy, so it never returns half of an
update. ``pipeline health`` lists blocks by prefix (:func:`list_blocks`) and prints snapshots.

Layout (native int64 words)::

    line 0   magic, version, header bytes, writer pid, writer start ticks, field count,
             description offset, description length
    line 1   seq (odd = writing), updated_at_ns      <- written only by the writer
    line 2+  field values, 8-byte aligned, in declaration order (each field 8 bytes wide)
    then     JSON description [[name, dtype], ...]
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.ipc import shm
from pipeline.ipc.header import HeaderFormat

log = logging.getLogger("pipeline.metrics")

MAGIC = b"PLMETR\x00\x01"
MAGIC_WORD = int.from_bytes(MAGIC, "little")
VERSION = 1
CACHE_LINE = 64

W_MAGIC, W_VERSION, W_HEADER_BYTES, W_WRITER_PID, W_WRITER_START = 0, 1, 2, 3, 4
W_NFIELDS, W_DESC_OFF, W_DESC_LEN = 5, 6, 7
W_SEQ, W_UPDATED_NS = 8, 9
VALUES_OFF = 2 * CACHE_LINE
#: magic, version and writer words as every reader of a metrics block checks them
METRICS_HEADER = HeaderFormat("metrics block", MAGIC, VERSION, W_WRITER_PID, W_WRITER_START)
_HEADER_WORDS = VALUES_OFF // 8

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
U64_MAX = (1 << 64) - 1
_LIMITS = {"q": (I64_MIN, I64_MAX), "Q": (0, U64_MAX)}

_CODES = {"i8": "q", "u8": "Q", "f8": "d", "i4": "q", "u4": "q", "i2": "q", "u2": "q", "i1": "q",
          "u1": "q", "b1": "q", "f4": "d"}  # fmt: skip


class MetricsError(Exception):
    """Base class of metrics block errors."""


class MetricsNotFoundError(MetricsError, FileNotFoundError):
    """No block of that name: the owning process is not running."""


class MetricsLayoutError(MetricsError):
    """The segment is not a metrics block this code understands."""


class MetricsUntrustedError(MetricsLayoutError, shm.UntrustedSegmentError):
    """The name exists but fails the shared-memory trust rule (symlink, FIFO, another uid's
    file, group/other bits): refused with the path and the reason."""


class MetricsBusyError(MetricsError):
    """No consistent snapshot could be taken (the writer died mid-update, or writes nonstop)."""


def _normalise(fields: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every field is stored 8 bytes wide: ints as int64 (uint64 for u8), floats as float64."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for entry in fields:
        if len(entry) != 2:
            raise ValueError(f"metrics field must be (name, dtype), got {entry!r}")
        name, dt = entry
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"metrics field name must be an identifier, got {name!r}")
        if name in seen:
            raise ValueError(f"duplicate metrics field {name!r}")
        try:
            key = np.dtype(dt).str.lstrip("<>=|")
        except TypeError:
            key = ""
        if key not in _CODES:
            raise ValueError(f"metrics field {name!r}: unsupported dtype {dt!r} (ints, floats)")
        seen.add(name)
        out.append((name, f"<{key}" if key not in ("b1",) else "|b1"))
    if not out:
        raise ValueError("a metrics block needs at least one field")
    return out


class MetricsBlock:
    """One metrics block. ``create`` makes the owner (read-write, unlinks on close); ``attach``
    maps it read-only for ``snapshot``."""

    def __init__(
        self,
        seg: shm.Segment,
        fields: list[tuple[str, str]],
        owner: bool,
        clock: Callable[[], int],
    ) -> None:
        self.name = seg.name
        self.fields = fields
        self.owner = owner
        self._seg: shm.Segment | None = seg
        self._clock = clock
        self._names = [n for n, _ in fields]
        codes = "".join(_CODES[dt.lstrip("<|")] for _, dt in fields)
        self._all = struct.Struct("<" + codes)
        self._one = {
            n: (VALUES_OFF + 8 * k, struct.Struct("<" + _CODES[dt.lstrip("<|")]))
            for k, (n, dt) in enumerate(fields)
        }
        self._is_int = {n: _CODES[dt.lstrip("<|")] in "qQ" for n, dt in fields}
        self._code = {n: _CODES[dt.lstrip("<|")] for n, dt in fields}
        self.saturated = 0  # values clamped to their field's range (see _saturate)
        self._warned: set[str] = set()  # fields already logged as saturated (<= field count)
        self._hdr = seg.buf[:VALUES_OFF].cast("q")
        self._buf = seg.buf
        self._values_end = VALUES_OFF + 8 * len(fields)

    # --- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        fields: Sequence[tuple[str, str]],
        *,
        clock: Callable[[], int] = time.time_ns,
    ) -> MetricsBlock:
        """Create (mode 0600) and own block ``name``. A block left by a dead owner is replaced;
        one whose owner is alive raises :class:`MetricsError`."""
        flds = _normalise(fields)
        desc = json.dumps(flds).encode()
        desc_off = VALUES_OFF + 8 * len(flds)
        size = ((desc_off + len(desc) + CACHE_LINE - 1) // CACHE_LINE) * CACHE_LINE
        pid, start = shm.my_identity()
        for _attempt in range(5):
            try:
                seg = shm.Segment.create(name, size)
                break
            except FileExistsError:
                _retire_stale(name)
        else:
            raise MetricsError(
                f"could not create metrics block {name!r}: the name keeps reappearing"
            )
        hdr = seg.buf[:VALUES_OFF].cast("q")
        hdr[W_VERSION] = VERSION
        hdr[W_HEADER_BYTES] = VALUES_OFF
        hdr[W_WRITER_PID] = pid
        hdr[W_WRITER_START] = start
        hdr[W_NFIELDS] = len(flds)
        hdr[W_DESC_OFF] = desc_off
        hdr[W_DESC_LEN] = len(desc)
        hdr[W_SEQ] = 0
        hdr[W_UPDATED_NS] = clock()
        seg.buf[desc_off : desc_off + len(desc)] = desc
        hdr[W_MAGIC] = MAGIC_WORD
        hdr.release()
        return cls(seg, flds, owner=True, clock=clock)

    @classmethod
    def attach(cls, name: str) -> MetricsBlock:
        """Map block ``name`` read-only. Raises :class:`MetricsNotFoundError` when missing."""
        try:
            seg = shm.Segment.open(name, readonly=True)
        except FileNotFoundError:
            raise MetricsNotFoundError(
                f"metrics block {name!r} not found ({shm.SHM_DIR}/{name} missing): "
                "is its process running?"
            ) from None
        except shm.UntrustedSegmentError as exc:
            raise MetricsUntrustedError(exc.path, exc.reason, exc.inode) from exc
        except OSError as exc:
            raise MetricsLayoutError(f"metrics block {name!r} cannot be opened: {exc}") from exc
        try:
            fields = _parse(seg.buf, name)
        except BaseException:
            seg.close()
            raise
        return cls(seg, fields, owner=False, clock=time.time_ns)

    def close(self) -> None:
        """Owner: unlink and unmap. Reader: unmap."""
        seg = self._seg
        if seg is None:
            return
        self._seg = None
        if self.owner:
            seg.unlink()
        self._hdr.release()
        seg.close()

    def __enter__(self) -> MetricsBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writer -------------------------------------------------------------------------------

    def set(self, **values: float) -> None:
        """Store several fields in one seqlock section (readers see all of them or none)."""
        if not self.owner:
            raise MetricsError(f"metrics block {self.name!r} is attached read-only")
        one = self._one
        for k in values:
            if k not in one:
                raise KeyError(f"metrics block {self.name!r} has no field {k!r}")
        hdr = self._hdr
        buf = self._buf
        seq = hdr[W_SEQ]
        hdr[W_SEQ] = seq + 1
        try:
            for k, v in values.items():
                off, st = one[k]
                try:
                    st.pack_into(buf, off, int(v) if self._is_int[k] else float(v))
                except (struct.error, OverflowError, ValueError):
                    st.pack_into(buf, off, self._saturate(k, v))
            hdr[W_UPDATED_NS] = self._clock()
        finally:
            hdr[W_SEQ] = seq + 2

    def incr(self, name: str, n: float = 1) -> float:
        """Add ``n`` to a field (one seqlock section); returns the new value."""
        if not self.owner:
            raise MetricsError(f"metrics block {self.name!r} is attached read-only")
        off, st = self._one[name]
        hdr = self._hdr
        seq = hdr[W_SEQ]
        hdr[W_SEQ] = seq + 1
        try:
            value: float = st.unpack_from(self._buf, off)[0] + n
            try:
                if self._is_int[name]:
                    value = int(value)
                st.pack_into(self._buf, off, value)
            except (struct.error, OverflowError, ValueError):
                value = self._saturate(name, value)
                st.pack_into(self._buf, off, value)
            hdr[W_UPDATED_NS] = self._clock()
        finally:
            hdr[W_SEQ] = seq + 2
        return value

    def _saturate(self, name: str, v: float) -> float:
        """``v`` clamped to field ``name``'s range: int64 (uint64 for u8) for ints (NaN -> 0,
        +-inf -> the bounds), +-inf for a float beyond float64.

        Why: metrics carry numbers that come from outside (a venue's ``rateLimits`` count of
        2**63, a ``retryAfter`` of 10**17); one of them must not raise out of the flush and take
        the process's timer task with it. Counted in ``saturated``, logged once per field."""
        self.saturated += 1
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "metrics value out of range saturated",
                extra={"block": self.name, "field": name, "value": repr(v)[:64]},
            )
        code = self._code[name]
        if code == "d":
            return float("inf") if v > 0 else float("-inf")
        lo, hi = _LIMITS[code]
        if v != v:  # NaN
            return 0
        return hi if v > hi else lo if v < lo else int(v)

    # --- readers ------------------------------------------------------------------------------

    def snapshot(self, max_tries: int = 100_000) -> dict[str, int | float]:
        """A consistent copy of every field, plus ``_updated_at_ns`` and ``_writer_pid``."""
        hdr = self._hdr
        buf = self._buf
        unpack = self._all.unpack_from
        for attempt in range(max_tries):
            s1 = hdr[W_SEQ]
            if s1 & 1:
                if attempt > 64:
                    time.sleep(0)
                continue
            raw = bytes(buf[VALUES_OFF : self._values_end])
            updated = hdr[W_UPDATED_NS]
            if hdr[W_SEQ] == s1:
                out: dict[str, int | float] = dict(zip(self._names, unpack(raw), strict=True))
                out["_updated_at_ns"] = updated
                out["_writer_pid"] = hdr[W_WRITER_PID]
                return out
        raise MetricsBusyError(
            f"metrics block {self.name!r}: no consistent snapshot in {max_tries} tries "
            f"(writer pid {hdr[W_WRITER_PID]} alive={self.writer_alive()})"
        )

    def writer_alive(self) -> bool:
        return shm.pid_alive(int(self._hdr[W_WRITER_PID]), int(self._hdr[W_WRITER_START]))

    @property
    def writer_pid(self) -> int:
        return int(self._hdr[W_WRITER_PID])

    @property
    def updated_at_ns(self) -> int:
        return int(self._hdr[W_UPDATED_NS])

    def __repr__(self) -> str:
        return f"MetricsBlock({self.name!r}, fields={self._names}, owner={self.owner})"


def _parse(buf: memoryview, name: str) -> list[tuple[str, str]]:
    if len(buf) < VALUES_OFF:
        raise MetricsLayoutError(f"shared memory {name!r} is too small to be a metrics block")
    hdr = buf[:VALUES_OFF].cast("q")
    try:
        problem = METRICS_HEADER.problem(hdr, name)
        if problem is not None:
            raise MetricsLayoutError(problem)
        off, length, n = hdr[W_DESC_OFF], hdr[W_DESC_LEN], hdr[W_NFIELDS]
        try:
            raw = json.loads(bytes(buf[off : off + length]))
            fields = _normalise([tuple(f) for f in raw])
        except (ValueError, TypeError) as exc:
            raise MetricsLayoutError(
                f"metrics block {name!r} has a corrupt description: {exc}"
            ) from exc
        if len(fields) != n or off != VALUES_OFF + 8 * n or len(buf) < off + length:
            raise MetricsLayoutError(f"metrics block {name!r} header is inconsistent")
        return fields
    finally:
        hdr.release()


def _retire_stale(name: str) -> None:
    try:
        old = shm.Segment.open(name, readonly=True)
    except FileNotFoundError:
        return
    except shm.UntrustedSegmentError as exc:
        raise MetricsUntrustedError(exc.path, exc.reason, exc.inode) from exc
    except OSError as exc:
        raise MetricsLayoutError(
            f"shared memory {name!r} exists and cannot be opened: {exc}"
        ) from exc
    try:
        _parse(old.buf, name)
        hdr = old.buf[:VALUES_OFF].cast("q")
        pid, start = METRICS_HEADER.owner(hdr)
        hdr.release()
        if shm.pid_alive(pid, start):
            raise MetricsError(f"metrics block {name!r} is owned by a live process (pid {pid})")
        old.unlink()
    finally:
        old.close()


def list_blocks(prefix: str = "pipeline.") -> list[str]:
    """Names of metrics blocks in /dev/shm starting with ``prefix`` (checked by magic)."""
    return [n for n in shm.list_names(prefix) if shm.read_head(n, 8) == MAGIC]


def snapshot_all(prefix: str = "pipeline.") -> dict[str, dict[str, Any]]:
    """Snapshots of every block under ``prefix``; a block that vanished mid-scan is skipped."""
    out: dict[str, dict[str, Any]] = {}
    for name in list_blocks(prefix):
        try:
            block = MetricsBlock.attach(name)
        except MetricsError:
            continue
        try:
            snap: dict[str, Any] = dict(block.snapshot())
            snap["_writer_alive"] = block.writer_alive()
            out[name] = snap
        except MetricsBusyError:
            continue
        finally:
            block.close()
    return out
