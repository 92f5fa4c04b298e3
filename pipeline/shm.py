"""The only module that touches POSIX shared memory, mmap and process identity.

Why not ``multiprocessing.shared_memory.SharedMemory``: on Python 3.11 every ``SharedMemory``
(creator *and* attacher) is registered with the ``resource_tracker``, which unlinks the segment
when the *attaching* process exits, pulling the ring from under the writer and every other
reader (there is no ``track=False`` before 3.13). Opening ``/dev/shm/NAME`` with ``os.open`` and
mapping it with ``mmap`` is what ``shm_open(3)`` does on Linux, and involves no tracker at all.
Only the owner (writer) ever creates or unlinks a segment; segments are created mode 0600.

Process identity is ``(pid, start time in clock ticks)`` so a recycled pid is not mistaken for a
live writer or reader.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def check_name(name: str) -> str:
    """Reject names that are not a single safe file name under /dev/shm (no '/', no '..')."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid shared-memory name {name!r}: use letters, digits, '.', '_', '-' "
            "(no '/'), starting with a letter or digit, at most 201 characters"
        )
    return name


def path_of(name: str) -> Path:
    return SHM_DIR / check_name(name)


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
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
        """Map an existing segment. Raises FileNotFoundError if it does not exist."""
        path = path_of(name)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
            if st.st_size == 0:
                raise OSError(errno.EINVAL, f"{path} is empty (being created, or not a segment)")
            return cls(name, fd, st.st_size, readonly=readonly)
        except BaseException:
            os.close(fd)
            raise

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
    """Inode currently behind ``/dev/shm/NAME`` (None if absent): detects a restarted writer."""
    try:
        return os.stat(path_of(name)).st_ino
    except FileNotFoundError:
        return None


def unlink(name: str) -> bool:
    """Remove a segment by name; True if it existed. For cleanup tools and tests only."""
    try:
        os.unlink(path_of(name))
        return True
    except FileNotFoundError:
        return False


def list_names(prefix: str = "") -> list[str]:
    """Names of the files in /dev/shm starting with ``prefix`` (semaphores excluded), sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if n.startswith(prefix) and not n.startswith("sem."))


def read_head(name: str, nbytes: int) -> bytes | None:
    """The first ``nbytes`` of a segment without mapping it (None if missing or unreadable)."""
    try:
        fd = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
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
