"""The only module that touches POSIX shared memory, mmap and process identity.

Why not ``multiprocessing.shared_memory.SharedMemory``: on Python 3.11 every ``SharedMemory``
(creator *and* attacher) is registered with the ``resource_tracker``, which unlinks the segment
when the *attaching* process exits, pulling the ring from under the writer and every other
reader (there is no ``track=False`` before 3.13). Opening ``/dev/shm/NAME`` with ``os.open`` and
mapping it with ``mmap`` is what ``shm_open(3)`` does on Linux, and involves no tracker at all.
Only the owner (writer) ever creates or unlinks a segment; segments are created mode 0600.

Process identity is ``(pid, start time in clock ticks)`` so a recycled pid is not mistaken for a
live writer or reader.

**The trust rule** (one place, used by every open, attach and scan): a name is mapped only if it
opens with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink is refused, a FIFO cannot block us) and
``fstat`` then says it is a regular file owned by our effective uid with no group/other
permission bits. Why: ``/dev/shm`` is world-writable, so any local account can create a name we
scan (an order ring that would place orders with our keys) or a FIFO that would hang ``open``;
only a file we created ourselves can be trusted, and only we (or root) can shrink a file we own,
so a mapped segment cannot be truncated under us into a SIGBUS. Anything else raises
:class:`UntrustedSegmentError` naming the path and the reason; scanners skip such a name and log
and count it once per (path, inode) (:func:`note_refusal`), never retrying it in a loop.

``PIPELINE_SHM_DIR`` (optional) moves every segment into a directory that must be ours with mode
0700 (created so if missing; a systemd ``RuntimeDirectory=`` fits), so a neighbour cannot even
create a name we scan. The default stays ``/dev/shm``, where ``shm_open`` looks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("pipeline.shm")

DEFAULT_SHM_DIR = Path("/dev/shm")
SHM_DIR = Path(os.environ.get("PIPELINE_SHM_DIR") or DEFAULT_SHM_DIR)
# \Z, and fullmatch: '$' would let a trailing newline through ("name\n" is another file).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")


class UntrustedSegmentError(OSError):
    """A segment name exists but fails the trust rule (see the module docstring).

    An ``OSError`` so existing ``except OSError`` paths still catch it; ``path``, ``reason`` and
    ``inode`` (None when it could not be opened at all) say what was refused and why.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, inode: int | None = None) -> None:
        super().__init__(errno.EPERM, f"refusing {os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason
        self.inode = inode

    def __str__(self) -> str:
        return str(self.strerror)


def check_name(name: str) -> str:
    """Reject names that are not a single safe file name under /dev/shm (no '/', no '..')."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid shared-memory name {name!r}: use letters, digits, '.', '_', '-' "
            "(no '/'), starting with a letter or digit, at most 201 characters"
        )
    return name


_dirs_checked: set[str] = set()  # at most a handful: SHM_DIR values seen by this process


def _check_dir(d: Path) -> None:
    """A private segment directory must be ours, mode 0700-ish (no group/other bits), not a
    symlink. Checked once per process per directory: nobody else can change that afterwards."""
    key = os.fspath(d)
    if key in _dirs_checked or d == DEFAULT_SHM_DIR:
        return
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o700)
    try:
        st = os.lstat(d)
    except OSError as exc:
        raise UntrustedSegmentError(d, f"segment directory unusable: {exc.strerror}") from None
    reason = None
    if not stat.S_ISDIR(st.st_mode):
        reason = "PIPELINE_SHM_DIR is not a directory (or is a symlink)"
    elif st.st_uid != os.geteuid():
        reason = f"PIPELINE_SHM_DIR is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    elif st.st_mode & 0o077:
        reason = f"PIPELINE_SHM_DIR has mode {stat.S_IMODE(st.st_mode):04o}: want 0700"
    if reason is not None:
        raise UntrustedSegmentError(d, reason, st.st_ino)
    _dirs_checked.add(key)


def path_of(name: str) -> Path:
    d = SHM_DIR
    _check_dir(d)
    return d / check_name(name)


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def untrusted_reason(st: os.stat_result) -> str | None:
    """Why a file (its ``fstat``) fails the trust rule, or None if it passes. Pure."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
        return f"not a regular file ({kind})"
    euid = os.geteuid()
    if st.st_uid != euid:
        return f"owned by uid {st.st_uid}, not by us (uid {euid})"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets group/other in (ours are 0600)"
    return None


def open_trusted(path: Path, flags: int) -> tuple[int, os.stat_result]:
    """Open ``path`` under the trust rule; returns ``(fd, fstat)``. The one gate every open of a
    segment goes through. Raises :class:`UntrustedSegmentError`, ``FileNotFoundError``, or
    another ``OSError``.

    ``O_NONBLOCK`` is what keeps a FIFO from blocking ``open`` forever (it has no effect on a
    regular file or on ``mmap``); ``O_NOFOLLOW`` makes a symlink fail with ELOOP."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedSegmentError(path, "a symbolic link (never followed)") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENXIO):
            raise UntrustedSegmentError(
                path, f"cannot be opened ({exc.strerror}): not ours"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        reason = untrusted_reason(st)
        if reason is not None:
            raise UntrustedSegmentError(path, reason, st.st_ino)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class _Refusals:
    """Refusals seen by scanners in this process: each (path, inode) is logged and counted once.

    Bounded: at most :data:`MAX` remembered pairs (forgotten all at once past that, so a flood of
    planted names costs at worst one more log line per name, never unbounded memory).
    """

    MAX = 1024

    def __init__(self) -> None:
        self.count = 0
        self._seen: set[tuple[str, int | None]] = set()

    def note(self, exc: UntrustedSegmentError) -> bool:
        key = (exc.path, exc.inode)
        if key in self._seen:
            return False
        if len(self._seen) >= self.MAX:
            self._seen.clear()
        self._seen.add(key)
        self.count += 1
        log.warning(
            "untrusted shared memory skipped",
            extra={"path": exc.path, "reason": exc.reason, "inode": exc.inode},
        )
        return True


refusals = _Refusals()


def note_refusal(exc: UntrustedSegmentError) -> bool:
    """Log and count a refusal once per (path, inode); True the first time. For scanners."""
    return refusals.note(exc)


class Segment:
    """One mapped shared-memory file. ``buf`` is a writable (or read-only) memoryview of it.

    Call :meth:`close` after dropping every view derived from ``buf``; the owner calls
    :meth:`unlink` first. ``inode`` identifies this incarnation of the name: a writer that
    restarts under the same name creates a new file with a new inode.
    """

    __slots__ = ("_mm", "buf", "fd", "inode", "name", "readonly", "size")

    def __init__(self, name: str, fd: int, size: int, readonly: bool) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.inode = os.fstat(fd).st_ino
        access = mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, access=access)
        self.buf = memoryview(self._mm)

    @classmethod
    def create(cls, name: str, size: int, mode: int = 0o600) -> Segment:
        """Create a new, zero-filled segment. Raises FileExistsError if the name is taken."""
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        path = path_of(name)
        if mode & 0o077:
            raise ValueError(f"segment mode {mode:04o}: group/other bits would make it untrusted")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what we asked for
            os.ftruncate(fd, size)
            return cls(name, fd, size, readonly=False)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    @classmethod
    def open(cls, name: str, readonly: bool = False) -> Segment:
        """Map an existing segment under the trust rule (:func:`open_trusted`). Raises
        FileNotFoundError if it does not exist, :class:`UntrustedSegmentError` if it is not ours,
        and a plain OSError (EINVAL) while it is still empty (being created)."""
        path = path_of(name)
        fd, st = open_trusted(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            if st.st_size == 0:
                raise OSError(errno.EINVAL, f"{path} is empty (being created, or not a segment)")
            return cls(name, fd, st.st_size, readonly=readonly)
        except BaseException:
            os.close(fd)
            raise

    def shrunk(self) -> bool:
        """True if the file is now shorter than our mapping (touching the tail would SIGBUS).

        Only our own uid (or root) can do that to a trusted segment; a reader of a segment it
        does not control checks this before reading, at the cost of one ``fstat``."""
        try:
            return os.fstat(self.fd).st_size < self.size
        except OSError:
            return True

    @property
    def mode(self) -> int:
        return stat.S_IMODE(os.fstat(self.fd).st_mode)

    def unlink(self) -> None:
        """Remove the name, only if it still refers to this incarnation (never a successor's)."""
        if current_inode(self.name) == self.inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path_of(self.name))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An advisory lock among *readers* (registration table); the writer never takes it."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap and close. Views of ``buf`` still held elsewhere keep the mapping alive."""
        if self.fd < 0:
            return
        self.buf.release()
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a numpy view still exports it; the mapping goes when that view does
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, size={self.size}, inode={self.inode})"


def current_inode(name: str) -> int | None:
    """Inode currently behind ``/dev/shm/NAME`` (None if absent): detects a restarted writer.
    ``lstat``: the name itself, never what a symlink points to."""
    try:
        return os.lstat(path_of(name)).st_ino
    except FileNotFoundError:
        return None


def unlink(name: str) -> bool:
    """Remove a segment by name; True if it existed. For cleanup tools and tests only."""
    try:
        os.unlink(path_of(name))
        return True
    except FileNotFoundError:
        return False


def unlink_if_inode(name: str, inode: int) -> bool:
    """Remove ``name`` only while it is still the incarnation ``inode`` (never a successor that
    took the name meanwhile). True if removed."""
    if current_inode(name) != inode:
        return False
    try:
        os.unlink(path_of(name))
        return True
    except FileNotFoundError:
        return False


def list_names(prefix: str = "") -> list[str]:
    """Names in the segment directory starting with ``prefix``, sorted. Semaphores and names
    :func:`check_name` would refuse (we never create those) are left out."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(
        n
        for n in entries
        if n.startswith(prefix) and not n.startswith("sem.") and _NAME_RE.fullmatch(n)
    )


def read_head(name: str, nbytes: int) -> bytes | None:
    """The first ``nbytes`` of a segment without mapping it, under the trust rule.

    None if missing, unreadable or untrusted (the latter logged and counted once per name and
    inode by :func:`note_refusal`): scanners use this to recognise our segments by magic."""
    try:
        fd, _st = open_trusted(path_of(name), os.O_RDONLY)
    except UntrustedSegmentError as exc:
        note_refusal(exc)
        return None
    except (OSError, ValueError):
        return None
    try:
        return os.pread(fd, nbytes, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


# --- process identity -----------------------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])  # field 22 overall; rest starts at field 3
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_ticks: int = 0) -> bool:
    """True if ``pid`` runs and (when ``start_ticks`` is known) is the same process as then."""
    if pid <= 0:
        return False
    started = process_start_ticks(pid)
    if started is None:
        if os.path.isdir("/proc/self"):
            return False  # /proc works and has no such pid (or a zombie we cannot read)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return start_ticks == 0 or started == start_ticks


def my_identity() -> tuple[int, int]:
    pid = os.getpid()
    return pid, process_start_ticks(pid) or 0


# --- idle waiting -----------------------------------------------------------------------------

_PR_SET_TIMERSLACK = 29
_slack_done: set[int] = set()
_libc: ctypes.CDLL | None = None


def set_timer_slack_ns(ns: int = 1) -> bool:
    """Set this thread's timer slack (Linux prctl) so short sleeps wake on time.

    The default slack is 50 us, which stretches every ``time.sleep(20e-6)`` to ~70 us; with 1 ns
    a short sleep returns in ~25 us, so an idle consumer can sleep instead of spinning a core.
    Returns False where unsupported. Idempotent per thread.
    """
    global _libc
    tid = threading.get_ident()
    if tid in _slack_done:
        return True
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = _libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if ok:
        _slack_done.add(tid)
    return ok
