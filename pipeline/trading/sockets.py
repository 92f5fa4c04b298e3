"""The trading process's WebSocket connections: open, read, write, ping, abort.

Why apart from the process: this is the only code that touches sockets (the ``websockets``
client, ping frames via ``ws.ping()``); every decision about a connection is the session's, so
all this does is turn its Open/Send/Ping/Close actions into I/O and report back what happened
(``connected``, ``frame_received``, ``pong``, ``connection_lost``, ``connect_failed``), then
let the process pump the session's answers out again.

Bounds: each connection's outbox holds at most ``outbox_capacity`` frames; orders are refused
locally once fewer than :data:`OUTBOX_RESERVE` slots are left (:meth:`WsConnections.busy`), and
a frame that still finds it full drops the connection (:meth:`WsConnections.overflow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.logs import RateLimitedLog
from pipeline.trading.session import Session

if TYPE_CHECKING:
    from pipeline.trading.process import TradingConfig

# The websockets library logs every frame at DEBUG, session.logon (with its signature)
# included. Its logger for our connections is pinned at INFO so no log level can leak one.
_ws_log = logging.getLogger("pipeline.trading.websockets")
_ws_log.setLevel(logging.INFO)

OUTBOX_RESERVE = 64  # outbox slots kept for pings and reconciliation when refusing orders

StartTask = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[Any]"]


class WsConn:
    """One WebSocket connection of the session: its socket, outbox and tasks."""

    __slots__ = ("id", "outbox", "tasks", "ws")

    def __init__(self, conn_id: int, capacity: int) -> None:
        self.id = conn_id
        self.ws: Any = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue(capacity)
        self.tasks: list[asyncio.Task[Any]] = []


class WsConnections:
    """The session's connections by id (``conns``, shared with the process's pump).

    ``pump`` is the process's pump (session actions -> I/O, updates -> rings), called after
    every event handed to the session; ``start_task`` starts a long-lived task whose death by
    exception ends the process.
    """

    def __init__(
        self,
        config: TradingConfig,
        session: Session,
        *,
        pump: Callable[[], None],
        start_task: StartTask,
        rate_limited_log: RateLimitedLog,
    ) -> None:
        self.config = config
        self.session = session
        self.conns: dict[int, WsConn] = {}
        self._pump = pump
        self._task = start_task
        self._rl = rate_limited_log

    def open(self, conn_id: int) -> None:
        """The session's Open: a new connection, connecting in its own task."""
        conn = WsConn(conn_id, self.config.outbox_capacity)
        self.conns[conn.id] = conn
        conn.tasks.append(self._task(self._connect(conn), f"connect-{conn.id}"))

    def ping(self, conn_id: int) -> None:
        """The session's Ping: a ping frame, its pong reported to the session."""
        conn = self.conns.get(conn_id)
        if conn is not None and conn.ws is not None:
            conn.tasks.append(self._task(self._ping(conn), f"ping-{conn.id}"))

    def close(self, conn_id: int) -> None:
        """The session's Close: forget the connection and kill it at once."""
        conn = self.conns.pop(conn_id, None)
        if conn is not None:
            self.abort(conn)

    def prune(self) -> None:
        """Forget finished tasks (the timer loop calls this on every wake-up)."""
        for conn in self.conns.values():
            conn.tasks = [t for t in conn.tasks if not t.done()]

    def overflow(self, conn: WsConn) -> None:
        """A frame found the outbox full: the connection is not draining. Drop it (its
        unanswered requests become UNKNOWN / failed in the session) and let it reconnect."""
        self._rl.warning(
            "outbox_full",
            f"outbox of connection {conn.id} full ({self.config.outbox_capacity} frames): "
            "dropping the connection",
        )
        if self.conns.pop(conn.id, None) is not None:
            self.session.connection_lost(conn.id, "outbox full: connection not draining")
            self.abort(conn)

    def busy(self) -> bool:
        """True if new orders must be refused: the primary's outbox is nearly full."""
        primary = self.session.primary_conn
        conn = self.conns.get(primary) if primary is not None else None
        if conn is None:
            return False  # the session itself answers "not ready"
        queued = conn.outbox.qsize() + self.session.queued_actions
        return queued >= self.config.outbox_capacity - OUTBOX_RESERVE

    async def _connect(self, conn: WsConn) -> None:
        from websockets.asyncio.client import connect

        host = urlsplit(self.config.url).hostname or ""
        kwargs: dict[str, Any] = {}
        if host in ("127.0.0.1", "localhost", "::1"):
            kwargs["proxy"] = None
        try:
            ws = await connect(
                self.config.url,
                ping_interval=None,
                ping_timeout=None,
                compression=None,
                open_timeout=self.config.open_timeout_s,
                close_timeout=1.0,
                max_size=1 << 24,
                logger=_ws_log,
                **kwargs,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every connect failure is the session's to classify
            if conn.id in self.conns:
                self.conns.pop(conn.id, None)
                self.session.connect_failed(conn.id, f"{type(exc).__name__}: {exc}"[:200])
                self._pump()
            return
        if conn.id not in self.conns:  # closed while connecting
            ws.transport.abort()
            return
        conn.ws = ws
        conn.tasks.append(self._task(self._reader(conn), f"reader-{conn.id}"))
        conn.tasks.append(self._task(self._writer(conn), f"writer-{conn.id}"))
        self.session.connected(conn.id)
        self._pump()

    async def _reader(self, conn: WsConn) -> None:
        from websockets.exceptions import ConnectionClosed

        reason = "closed"
        while True:
            # Only the socket's errors mean "connection lost". An exception from the session
            # or the shell below is a bug: it ends this task and so the process (_task_done).
            try:
                msg = await conn.ws.recv()
            except ConnectionClosed as exc:
                reason = f"closed by peer ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:200]
                break
            self.session.frame_received(conn.id, msg)
            self._pump()
        if conn.id in self.conns:
            self.conns.pop(conn.id, None)
            self.session.connection_lost(conn.id, reason)
            self._pump()
            self.abort(conn)

    async def _writer(self, conn: WsConn) -> None:
        try:
            while True:
                text = await conn.outbox.get()
                await conn.ws.send(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket's: send failed
            if conn.id in self.conns:
                self.conns.pop(conn.id, None)
                self.session.connection_lost(conn.id, f"send failed: {type(exc).__name__}")
                self._pump()
                self.abort(conn)

    async def _ping(self, conn: WsConn) -> None:
        try:
            waiter = await conn.ws.ping()
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception:
            return  # the reader sees the closed connection
        if conn.id in self.conns:
            self.session.pong(conn.id)
            self._pump()

    def abort(self, conn: WsConn) -> None:
        """Kill a connection at once: a black-holed peer would never finish a close handshake."""
        current = asyncio.current_task()
        for t in conn.tasks:
            if t is not current:
                t.cancel()
        if conn.ws is not None:
            with contextlib.suppress(Exception):
                conn.ws.transport.abort()

    async def settle(self) -> None:
        """Let aborted connections' tasks finish so nothing is left pending at exit."""
        pending = [t for c in self.conns.values() for t in c.tasks]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0)
