"""systemd ``sd_notify`` without libsystemd: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

Why: the units are ``Type=notify`` with ``WatchdogSec=``, so systemd considers a component
started only when it says READY=1 (ingest: first frame in the ring; trading: session logged
on), and restarts it when it stops sending WATCHDOG=1. The watchdog must be fed from the
component's *own* health check (a hung event loop or a dead upstream must starve it), not from
a timer thread that would keep a wedged process alive.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd the
variable is unset and every call is a cheap no-op returning False.

API (what ingest/trading call)::

    from pipeline.ops import sdnotify
    sdnotify.notify("READY=1", "STATUS=streaming 3 symbols")   # -> True if sent
    sdnotify.ready("logged on")        # READY=1 + STATUS
    sdnotify.status("reconnecting (3)")
    sdnotify.stopping()
    wd = sdnotify.Watchdog()           # interval from $WATCHDOG_USEC (half of it), or disabled
    ...in the loop, cheaply and often:  wd.tick(healthy=last_frame_age_s < 10)
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

_sock: socket.socket | None = None


def socket_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` -> an address for ``sendto`` (``@x`` is the abstract ``\\0x``)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock / unknown forms: not supported, stay silent


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram. False if not under
    systemd or the send failed; never raises (notification is best-effort by design)."""
    global _sock
    env = os.environ if env is None else env
    addr = socket_address(env.get("NOTIFY_SOCKET", ""))
    if addr is None or not lines:
        return False
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        if _sock is None:
            _sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        _sock.sendto(payload, addr)
        return True
    except OSError:
        return False


def ready(status: str = "", env: Mapping[str, str] | None = None) -> bool:
    lines = ["READY=1", f"MAINPID={os.getpid()}"]
    if status:
        lines.append(f"STATUS={status}")
    return notify(*lines, env=env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    return notify(f"STATUS={text}", env=env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", env=env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled
    advises), or None when the watchdog is off or meant for another process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


class Watchdog:
    """Feeds WATCHDOG=1 at most every ``interval_s``, and only while the caller says it is
    healthy. Call :meth:`tick` from the component's main loop (it is cheap when not due)."""

    def __init__(
        self,
        interval_s: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[..., bool] = notify,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.interval_s = watchdog_interval(env) if interval_s is None else interval_s
        self._clock = clock
        self._send = send
        self._env = env
        self._next = 0.0
        self.sent = 0
        self.starved = 0  # ticks where we were due but unhealthy (systemd will act on it)

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None and self.interval_s > 0

    def tick(self, healthy: bool = True, status: str = "") -> bool:
        """Ping if due and healthy; returns True when a ping was sent."""
        if not self.enabled:
            return False
        now = self._clock()
        if now < self._next:
            return False
        if not healthy:
            self.starved += 1
            return False
        assert self.interval_s is not None
        self._next = now + self.interval_s
        lines = ["WATCHDOG=1"]
        if status:
            lines.append(f"STATUS={status}")
        ok = bool(self._send(*lines, env=self._env))
        self.sent += ok
        return ok


__all__ = ["Watchdog", "notify", "ready", "socket_address", "status", "stopping"]
