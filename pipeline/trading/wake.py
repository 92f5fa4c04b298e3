"""The order rings' doorbell: a strategy wakes the trading process instead of being polled.

Why: polling the order rings every 0.5 ms kept an idle ``pipeline trade`` at 91-95% of a core
(short asyncio sleeps become zero-length timers). Now the trading process sleeps until a client
rings, and a client pays the ring (one ``send`` syscall, ~1-2 us) only while the trading process
is actually asleep.

Two parts, both created by the trading process:

- **A word in shared memory** (segment ``X.wake`` for exec ring ``X.exec``, :func:`wake_name_for`,
  mode 0600 under the trust rule of :mod:`pipeline.ipc.shm`): ``sleeping`` is 1 while the
  trading process will not look at the rings again until woken, 0 while it is draining them.
  It also holds the address of the socket below.
- **A Unix datagram socket** in the abstract namespace with a random name (no file to plant,
  clean up or squat: the name exists only once bound). Every datagram is one byte:
  :data:`WAKE_ORDERS` (records were published) or :data:`WAKE_SCAN` (a new order ring exists:
  look for it now rather than at the next periodic scan).

No lost wake-up: the trading process sets ``sleeping`` *then* polls every ring once more before
it waits; a client publishes its record *then* reads ``sleeping``. Either the trading process's
last poll sees the record or the client sees ``sleeping`` and rings. Python gives us no memory
fence between a client's store and its load, so on a machine that reorders them a wake-up can
in principle still be missed: the trading process's slow safety poll (``wake_poll_interval_s``,
0.1 s) bounds what that costs, and never loses the order.

Security (README "Security model"): the word is read only from a segment that passes the trust
rule (ours, 0600), so only our uid chose the socket address a client sends to. Another uid can
find an abstract socket in ``/proc/net/unix`` and send to it, so every datagram's sender is
checked with ``SO_PASSCRED`` (kernel-stamped, not spoofable): a foreign one wakes nothing, is
counted (``wakes_foreign``) and logged. A wake-up carries no authority either way: the trading
process still reads only trusted rings. If the channel cannot be set up the trading process
falls back to polling and says so in ``pipeline health`` (``problem_order_wake_unavailable``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

from pipeline.ipc import shm

WAKE_ORDERS = b"o"
WAKE_SCAN = b"s"
_MAGIC = b"PLWAKE01"
_SIZE = 128
_ADDR_MAX = 100  # bytes of the abstract address after its leading NUL
_WORDS = slice(8, 16)  # u32 sleeping, u32 address length
_ADDR = slice(16, 16 + _ADDR_MAX)
_MAX_DATAGRAMS = 256  # read per readiness callback: a flood cannot keep the loop here
_UCRED = struct.Struct("iII")  # pid, uid, gid (SCM_CREDENTIALS)


def wake_name_for(exec_ring: str) -> str:
    """The wake segment that goes with an exec ring (``X.exec`` -> ``X.wake``), found from the
    one name a trading process and its clients already share (as :func:`reply_ring_for`)."""
    base = exec_ring[: -len(".exec")] if exec_ring.endswith(".exec") else exec_ring
    return f"{base}.wake"


class WakeChannel:
    """The trading process's end: the socket it waits on and the ``sleeping`` word it writes.

    :meth:`create` raises ``OSError`` when it cannot be set up (the caller then polls)."""

    def __init__(self, segment: shm.Segment, sock: socket.socket) -> None:
        self._segment = segment
        self._sock = sock
        self._words = segment.buf[_WORDS].cast("I")
        self._euid = os.geteuid()
        self.wakes = 0  # datagrams from our own uid
        self.foreign = 0  # datagrams from another uid (ignored)

    @classmethod
    def create(cls, name: str) -> WakeChannel:
        try:
            segment = shm.Segment.create(name, _SIZE)
        except FileExistsError:
            # Left by a trading process that died: the exec ring (created before this) proves
            # no live one owns the name. Remove it only if it is ours (the trust rule), retry.
            fd, _st = shm.open_trusted(shm.path_of(name), os.O_RDONLY)
            os.close(fd)
            shm.unlink(name)
            segment = shm.Segment.create(name, _SIZE)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                addr = f"pipeline-wake-{os.getpid()}-{os.urandom(8).hex()}".encode()
                sock.bind(b"\0" + addr)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            segment.unlink()
            segment.close()
            raise
        buf = segment.buf
        buf[_ADDR][: len(addr)] = addr
        words = buf[_WORDS].cast("I")
        words[1] = len(addr)
        words[0] = 1  # asleep until the first drain: clients ring
        words.release()
        buf[:8] = _MAGIC  # last: a client that sees the magic sees a complete segment
        return cls(segment, sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_sleeping(self, sleeping: bool) -> None:
        self._words[0] = 1 if sleeping else 0

    def take(self) -> tuple[int, bool]:
        """Read the pending datagrams (at most :data:`_MAX_DATAGRAMS`): ``(wake-ups from our
        uid, whether one of them asked for a scan)``. Foreign ones are counted and ignored."""
        own = 0
        scan = False
        recvmsg = self._sock.recvmsg
        space = socket.CMSG_SPACE(_UCRED.size)
        for _ in range(_MAX_DATAGRAMS):
            try:
                data, anc, _flags, _addr = recvmsg(1, space)
            except (BlockingIOError, InterruptedError):
                break
            uid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    uid = _UCRED.unpack_from(payload)[1]
            if uid != self._euid:
                self.foreign += 1
                continue
            own += 1
            if data == WAKE_SCAN:
                scan = True
        self.wakes += own
        return own, scan

    def close(self) -> None:
        """Tell clients to ring (so they find out we are gone), then remove everything."""
        with contextlib.suppress(ValueError):
            self._words[0] = 1
        self._words.release()
        self._sock.close()
        self._segment.unlink()
        self._segment.close()


class WakeSender:
    """A client's end: :meth:`notify` after publishing an order record.

    Costs one shared-memory read while the trading process is awake, one ``send`` while it
    sleeps. Without a channel (trading process not running, too old, or polling) it does
    nothing and looks again at most once a second; a trading process that was replaced (new
    segment inode, checked once a second, or a refused send) is found again the same way.
    """

    __slots__ = ("_check_at", "_inode", "_segment", "_sock", "_words", "failed", "name",
                 "recheck_s", "sent")  # fmt: skip

    def __init__(self, name: str, *, recheck_s: float = 1.0) -> None:
        self.name = name
        self.recheck_s = recheck_s
        self._segment: shm.Segment | None = None
        self._sock: socket.socket | None = None
        self._words: memoryview | None = None
        self._inode = 0
        self._check_at = 0.0
        self.sent = 0
        self.failed = 0  # sends refused: the trading process went away

    def notify(self, what: bytes = WAKE_ORDERS) -> None:
        words = self._words
        now = time.monotonic()
        if now >= self._check_at:
            self._check_at = now + self.recheck_s
            if words is None or shm.current_inode(self.name) != self._inode:
                self._reopen()
                words = self._words
        if words is None or not (words[0] or what is WAKE_SCAN):
            return
        try:
            self._sock.send(what)  # type: ignore[union-attr]
            self.sent += 1
        except BlockingIOError:
            pass  # its queue is full of wake-ups already: it will look
        except OSError:
            self.failed += 1
            self._drop()

    def _reopen(self) -> None:
        self._drop()
        try:
            segment = shm.Segment.open(self.name, readonly=True)
        except (OSError, ValueError):
            return  # absent, untrusted or still being created: the trading process polls
        try:
            buf = segment.buf
            words = buf[_WORDS].cast("I")
            n = words[1]
            if bytes(buf[:8]) != _MAGIC or not 0 < n <= _ADDR_MAX:
                words.release()
                raise OSError("not a complete wake segment")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.setblocking(False)
                sock.connect(b"\0" + bytes(buf[_ADDR][:n]))
            except BaseException:
                sock.close()
                words.release()
                raise
        except (OSError, ValueError):  # ValueError: a segment too short for its words
            segment.close()
            return
        self._segment, self._sock, self._words, self._inode = segment, sock, words, segment.inode

    def _drop(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    def close(self) -> None:
        self._drop()
